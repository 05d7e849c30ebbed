//! Native nodes (`miner::peer::run`, and the real `aiblock peer` binary)
//! on a real relay (the relay library on 127.0.0.1, in process:
//! `test_support::relay::TestRelay`): blocks shared node to node through
//! the relay, verified; a relay restart with
//! nodes that reconnect and resume an interrupted fetch; a node restarted on
//! its data dir; a corrupt payload file dropped and fetched again.
//!
//! The waits below are bounded only so that a broken build fails instead of
//! hanging; no assertion depends on how fast anything is.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use relay::server::ServeConfig;
use relay::ServeOptions;
use test_support::http::{get_bytes, get_json};
use test_support::relay::{Launch, TestRelay};
use web_node::chain::BlockHash;
use web_node::net::api::BlockInfo;
use web_node::node::{NodeEvent, Source};

use crate::node::{model_dir, node_cfg, Node, WAIT};

/// A relay serving in this process (`test_support`'s, through the
/// production accept loop) on `port` (0: any free one); `stop` releases its
/// store so that another can open the same data dir.
fn start_relay(data: &Path, model: &Path, port: u16) -> TestRelay {
    let cfg = ServeConfig {
        data_dir: data.to_path_buf(),
        web_dir: None,
        model_dir: Some(model.to_path_buf()),
        database: None,
    };
    TestRelay::launch(
        cfg,
        |s| s,
        ServeOptions::default(),
        Launch {
            port,
            ..Launch::default()
        },
    )
}

/// `GET /p2p/stats`.
fn relay_stats(r: &TestRelay) -> serde_json::Value {
    get_json(&format!("{}/p2p/stats", r.http()))
}

fn counter(v: &serde_json::Value, name: &str) -> u64 {
    v[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name} in {v}"))
}

/// The current head of a slot.
fn head(r: &TestRelay, name: &str) -> BlockInfo {
    test_support::http::head(&r.url, name)
}

fn payload_file(data: &Path, h: &BlockHash) -> PathBuf {
    data.join("payloads").join(format!("{}.bin", h.to_hex()))
}

#[test]
fn a_node_gets_an_expert_that_only_another_node_holds() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir(tmp.path());
    let relay = start_relay(&tmp.path().join("relay"), &model, 0);
    let slot = "layer1.expert3";
    let info = head(&relay, slot);
    let chunks = info.payload_len.div_ceil(u64::from(info.chunk_size));
    assert!(chunks >= 2, "the test wants a multi-chunk expert");

    // A fetches it first: only the relay's store has it.
    let a = Node::start(node_cfg(&[&relay], &tmp.path().join("a"), &[slot]));
    let sa = a.wait_complete();
    assert_eq!(sa.held.values().collect::<Vec<_>>(), vec![slot]);
    assert_eq!(sa.stats.bytes_received[&Source::Relay], info.payload_len);
    // The relay knows A holds it before B asks.
    let a_id = sa.id.clone();
    let t0 = Instant::now();
    loop {
        let nodes: serde_json::Value = get_json(&format!("{}/p2p/nodes", relay.http()));
        if nodes.to_string().contains(&info.hash.to_hex()) {
            break;
        }
        assert!(
            t0.elapsed() < WAIT,
            "the relay never listed A's block: {nodes}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Once stored, A serves it from its file, not from memory.
    a.wait("A to keep the payload only on disk", |s| {
        s.held.len() == 1 && s.held_in_memory == 0
    });
    let before = relay_stats(&relay);

    // B gets it from A, through the relay, and verifies it.
    let b = Node::start(node_cfg(&[&relay], &tmp.path().join("b"), &[slot]));
    let sb = b.wait_complete();
    let after = relay_stats(&relay);
    assert_eq!(
        counter(&after, "chunks_from_store"),
        counter(&before, "chunks_from_store"),
        "the relay's store served none of it"
    );
    assert_eq!(
        counter(&after, "chunks_from_peers") - counter(&before, "chunks_from_peers"),
        chunks
    );
    assert_eq!(
        after["per_peer"][&a_id]["chunks_served"].as_u64(),
        Some(chunks)
    );
    let mut a_key = [0u8; 32];
    hex::decode_to_slice(&a_id, &mut a_key).unwrap();
    assert_eq!(
        sb.stats.bytes_received[&Source::Peer(a_key)],
        info.payload_len
    );
    assert_eq!(sb.stats.total_received(), info.payload_len);
    assert_eq!(sb.stats.total_bad(), 0);
    // Stored, and byte for byte the relay's payload.
    let want = get_bytes(&format!("{}/blocks/{}/payload", relay.http(), info.hash));
    assert_eq!(
        std::fs::read(payload_file(&tmp.path().join("b"), &info.hash)).unwrap(),
        want
    );
    let ra = a.stop();
    assert_eq!(ra.stats.bytes_served, info.payload_len);
    assert_eq!(ra.stats.chunks_served, chunks);
    b.stop();
}

#[test]
fn a_node_serves_from_its_data_dir_and_a_removed_file_is_refused_not_fatal() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir(tmp.path());
    let relay = start_relay(&tmp.path().join("relay"), &model, 0);
    let slot = "layer0.expert2";
    let info = head(&relay, slot);
    let chunks = info.payload_len.div_ceil(u64::from(info.chunk_size));
    let adir = tmp.path().join("a");
    // A's data dir holds the payload already: A loads it from disk and
    // holds it there, nothing in memory, nothing downloaded.
    std::fs::create_dir_all(adir.join("payloads")).unwrap();
    let want = get_bytes(&format!("{}/blocks/{}/payload", relay.http(), info.hash));
    std::fs::write(payload_file(&adir, &info.hash), &want).unwrap();
    let a = Node::start(node_cfg(&[&relay], &adir, &[slot]));
    let sa = a.wait_complete();
    assert_eq!((sa.loaded_from_disk, sa.held_in_memory), (1, 0));
    let a_id = sa.id.clone();
    let t0 = Instant::now();
    while !get_json::<serde_json::Value>(&format!("{}/p2p/nodes", relay.http()))
        .to_string()
        .contains(&info.hash.to_hex())
    {
        assert!(t0.elapsed() < WAIT, "the relay never listed A's block");
        std::thread::sleep(Duration::from_millis(20));
    }

    // B gets every chunk from A's file, byte for byte.
    let b = Node::start(node_cfg(&[&relay], &tmp.path().join("b"), &[slot]));
    b.wait_complete();
    let rb = b.stop();
    let mut a_key = [0u8; 32];
    hex::decode_to_slice(&a_id, &mut a_key).unwrap();
    assert_eq!(
        rb.stats.bytes_received.get(&Source::Peer(a_key)),
        Some(&info.payload_len)
    );
    assert_eq!(
        std::fs::read(payload_file(&tmp.path().join("b"), &info.hash)).unwrap(),
        want
    );

    // A's file goes away: C still gets the block (A refuses, the relay
    // fails over to its store) and A stays up.
    std::fs::remove_file(payload_file(&adir, &info.hash)).unwrap();
    let c = Node::start(node_cfg(&[&relay], &tmp.path().join("c"), &[slot]));
    c.wait_complete();
    c.stop();
    assert_eq!(
        std::fs::read(payload_file(&tmp.path().join("c"), &info.hash)).unwrap(),
        want
    );
    let sa = a.status();
    assert!(sa.logged_in);
    let ra = a.stop();
    assert_eq!(ra.stats.chunks_served, chunks);
    assert!(ra.stats.chunks_refused >= 1, "{:?}", ra.stats);
}

#[test]
fn nodes_reconnect_after_a_relay_restart_and_an_interrupted_fetch_completes() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir(tmp.path());
    let rdata = tmp.path().join("relay");
    let relay = start_relay(&rdata, &model, 0);
    let port = relay.addr().parse::<SocketAddr>().unwrap().port();
    let slot = "layer0.expert6";
    let info = head(&relay, slot);
    assert!(info.payload_len > u64::from(info.chunk_size));

    let a = Node::start(node_cfg(&[&relay], &tmp.path().join("a"), &[slot]));
    a.wait_complete();

    // B asks one chunk at a time and stops (in its event hook) after the
    // first one arrived, while the relay restarts.
    let (reached_tx, reached_rx) = mpsc::channel::<()>();
    let (resume_tx, resume_rx) = mpsc::channel::<()>();
    let gate = Mutex::new(Some((reached_tx, resume_rx)));
    let target = info.hash;
    let mut cfg = node_cfg(&[&relay], &tmp.path().join("b"), &[slot]);
    cfg.max_in_flight = 1;
    cfg.on_event = Some(Arc::new(move |ev: &NodeEvent| {
        if let NodeEvent::Progress { hash, received, of } = ev {
            if *hash == target && *received == 1 && *of > 1 {
                if let Some((reached, resume)) = gate.lock().unwrap().take() {
                    reached.send(()).unwrap();
                    resume.recv().unwrap();
                }
            }
        }
    }));
    let b = Node::start(cfg);
    reached_rx.recv_timeout(WAIT).unwrap();
    relay.stop();
    resume_tx.send(()).unwrap();
    // B and A lose the relay.
    b.wait("B to notice the relay is gone", |s| !s.logged_in);
    a.wait("A to notice the relay is gone", |s| !s.logged_in);
    assert!(
        !b.status().held.contains_key(&target),
        "the fetch was interrupted"
    );

    // Same data dir, same port: both log in again; B's fetch completes.
    let relay = start_relay(&rdata, &model, port);
    let sb = b.wait_complete();
    let sa = a.wait("A to log in again", |s| s.logged_in);
    assert!(sb.stats.logins >= 2 && sa.stats.logins >= 2);
    // Only the missing chunk was fetched after the restart.
    assert_eq!(sb.stats.total_received(), info.payload_len);
    let want = get_bytes(&format!("{}/blocks/{}/payload", relay.http(), info.hash));
    assert_eq!(
        std::fs::read(payload_file(&tmp.path().join("b"), &info.hash)).unwrap(),
        want
    );
    // The relay lists both as online holders again.
    let stats = relay_stats(&relay);
    assert!(counter(&stats, "peers_online") >= 2, "{stats}");
}

#[test]
fn a_restarted_node_downloads_nothing_it_holds_and_replaces_corrupt_files() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir(tmp.path());
    let relay = start_relay(&tmp.path().join("relay"), &model, 0);
    let data = tmp.path().join("n");
    let globs = ["layer0.expert1", "layer0.expert2", "layer1.expert*"];

    let t0 = Instant::now();
    let n = Node::start(node_cfg(&[&relay], &data, &globs));
    let first = n.wait_complete();
    let secs = t0.elapsed().as_secs_f64();
    let report = n.stop();
    let bytes = report.stats.total_received();
    eprintln!(
        "fetched {bytes} bytes in {secs:.3} s (sync, login, chunks, checks, fsync): {:.1} MB/s",
        bytes as f64 / secs / 1e6
    );
    let held = first.held.len();
    assert_eq!(held, 2 + 8);
    assert!(report.stats.total_received() > 0);

    // Again on the same dir: everything is loaded and verified from disk.
    let n = Node::start(node_cfg(&[&relay], &data, &globs));
    let s = n.wait_complete();
    let r = n.stop();
    assert_eq!(s.loaded_from_disk, held as u64);
    assert_eq!(r.stats.total_received(), 0, "nothing downloaded again");
    assert_eq!(r.stats.logins, 1);

    // One file corrupted, one stale file, one temp file left by a crash.
    let victim = head(&relay, "layer1.expert5");
    let path = payload_file(&data, &victim.hash);
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    let stale = payload_file(&data, &BlockHash([7; 32]));
    std::fs::write(&stale, b"old").unwrap();
    let temp = data.join("payloads").join(".abc.1.tmp");
    std::fs::write(&temp, b"half").unwrap();

    let n = Node::start(node_cfg(&[&relay], &data, &globs));
    let s = n.wait_complete();
    let r = n.stop();
    assert_eq!(s.dropped_files, 3);
    assert_eq!(s.loaded_from_disk, held as u64 - 1);
    assert_eq!(
        r.stats.total_received(),
        victim.payload_len,
        "only the corrupt one again"
    );
    assert!(!stale.exists() && !temp.exists());
    let want = get_bytes(&format!("{}/blocks/{}/payload", relay.http(), victim.hash));
    assert_eq!(std::fs::read(&path).unwrap(), want);
}

#[test]
fn the_aiblock_peer_binary_logs_in_and_holds_its_blocks() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir(tmp.path());
    let relay = start_relay(&tmp.path().join("relay"), &model, 0);
    let info = head(&relay, "layer1.expert0");
    let data = tmp.path().join("node");
    let mut child = Command::new(env!("CARGO_BIN_EXE_aiblock"))
        .args([
            "peer",
            "--relay",
            &relay.ws(),
            "--data",
            data.to_str().unwrap(),
            "--experts",
            "layer1.expert0",
            "--serve-compute",
        ])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut log = Vec::new();
    let mut logged_in = false;
    let mut held = false;
    let t0 = Instant::now();
    while !(logged_in && held) {
        let left = WAIT.saturating_sub(t0.elapsed());
        let Ok(line) = rx.recv_timeout(left) else {
            let _ = child.kill();
            panic!(
                "aiblock peer did not log in and hold its block:\n{}",
                log.join("\n")
            );
        };
        logged_in |= line.contains("logged in");
        held |= line.contains("payload stored") && line.contains("layer1.expert0");
        log.push(line);
    }
    let key = std::fs::read_to_string(data.join("peer.key")).unwrap();
    assert_eq!(key.trim().len(), 64, "a hex key was created");
    // The relay sees it online, holding the block.
    let t0 = Instant::now();
    loop {
        let nodes: serde_json::Value = get_json(&format!("{}/p2p/nodes", relay.http()));
        if nodes.to_string().contains(&info.hash.to_hex()) {
            break;
        }
        assert!(
            t0.elapsed() < WAIT,
            "the relay never listed the node's block: {nodes}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let want = get_bytes(&format!("{}/blocks/{}/payload", relay.http(), info.hash));
    assert_eq!(
        std::fs::read(payload_file(&data, &info.hash)).unwrap(),
        want
    );
}

#[test]
fn aiblock_demo_runs_a_distributed_chat_on_three_nodes() {
    // `aiblock demo` runs the `relay` binary found next to itself; cargo
    // builds a crate's own binaries only (scripts/test.sh builds them all
    // before the tests).
    let relay = Path::new(env!("CARGO_BIN_EXE_aiblock"))
        .with_file_name(format!("relay{}", std::env::consts::EXE_SUFFIX));
    assert!(
        relay.is_file(),
        "{} is missing: build it first (`cargo build -p relay`)",
        relay.display()
    );
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir(tmp.path());
    let out = Command::new(env!("CARGO_BIN_EXE_aiblock"))
        .args([
            "demo",
            "--model",
            model.to_str().unwrap(),
            "--max-tokens",
            "4",
            "--keep",
            tmp.path().join("demo").to_str().unwrap(),
        ])
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "aiblock demo failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("same tokens: yes"), "{stdout}");
    // Every routed expert was computed by one of the nodes (none fell back
    // to the relay), and node3's blocks came from the other nodes.
    let computed: Vec<&str> = stdout
        .lines()
        .filter(|l| l.trim_start().starts_with("layer") && l.contains(".expert"))
        .collect();
    assert!(!computed.is_empty(), "{stdout}");
    for l in &computed {
        assert!(l.contains(" node"), "not computed by a node: {l}");
    }
    let node3 = stdout
        .lines()
        .find(|l| l.starts_with("node3") && l.contains("holds"))
        .unwrap();
    assert!(
        node3.contains("fetched 0.00 MB from the relay's store"),
        "node3 fetched from peers only: {node3}"
    );
    // Node 1's payload files are on disk under --keep.
    assert!(
        std::fs::read_dir(tmp.path().join("demo/node1/payloads"))
            .unwrap()
            .count()
            > 0
    );
}
