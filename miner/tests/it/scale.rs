//! A chain past one listing page (issue 22): a random Mixtral of 16 layers
//! × 64 experts (hidden 8, so it stays small: 1,041 chain-B blocks, one
//! listing page is 1,000) as a relay's genesis, and every client on it:
//! `aiblock export` gives the checkpoint back byte for byte, `aiblock
//! improve --relay` builds on the head of a slot on the second page, and
//! native nodes (`aiblock peer`'s `miner::peer::run`) list, verify, hold
//! and serve a layer whose blocks are all past the first page.
//!
//! One relay for all of it, in this order (improve changes a head, so it
//! runs after export).

use std::path::Path;
use std::time::{Duration, Instant};

use test_support::http::{get, get_json};
use test_support::relay::TestRelay;
use web_node::model::random::{small_config, write_random_model};
use web_node::net::api::BlockInfo;
use web_node::node::Source;

use crate::cli::{aiblock, ok};
use crate::node::{node_cfg, Node, WAIT};

const LAYERS: usize = 16;
const EXPERTS: usize = 64;

fn scale_model(dir: &Path) -> std::path::PathBuf {
    let m = dir.join("model");
    let mut cfg = small_config(259, 8, 8, LAYERS, 2, 1);
    cfg.num_local_experts = EXPERTS;
    write_random_model(&m, &cfg, 22).unwrap();
    m
}

/// Every chain-B block, following the relay's `after` cursor by hand (an
/// oracle independent of the client core's pager).
fn list_b(url: &str) -> Vec<BlockInfo> {
    let mut out: Vec<BlockInfo> = Vec::new();
    loop {
        let q = match out.last() {
            None => "limit=1000".to_string(),
            Some(l) => format!("after={}&limit=1000", l.hash.to_hex()),
        };
        let r = get(&format!("{url}/chain/B/blocks?{q}"));
        assert_eq!(r.status, 200);
        let page: Vec<BlockInfo> = r.json();
        let n = page.len();
        out.extend(page);
        if n < 1000 {
            return out;
        }
    }
}

#[test]
fn a_chain_of_1041_blocks_exports_improves_and_serves_past_the_first_page() {
    // On tmpfs where there is one: the relay syncs every genesis block to
    // disk, which a busy disk makes the slowest part of this test.
    let tmp = match Path::new("/dev/shm").is_dir() {
        true => tempfile::tempdir_in("/dev/shm").unwrap(),
        false => tempfile::tempdir().unwrap(),
    };
    let work = tmp.path();
    let model = scale_model(work);
    let relay = TestRelay::start(&work.join("data"), Some(&model), None);
    let url = relay.url.as_str();

    // The relay's listing is more than one page.
    let b = list_b(url);
    assert_eq!(b.len(), 1 + LAYERS + LAYERS * EXPERTS);
    assert!(b.len() > 1000);
    let first_page: Vec<&str> = b[..1000].iter().map(|i| i.name.as_str()).collect();
    let last = "layer15.expert63";
    assert!(!first_page.contains(&last), "{last} is past the first page");

    // export: every head, byte for byte the checkpoint the relay started from.
    ok(&aiblock(
        &["export", "--relay", url, "--out", "exported"],
        work,
    ));
    let original = std::fs::read(model.join("model.safetensors")).unwrap();
    let exported = std::fs::read(work.join("exported/model.safetensors")).unwrap();
    assert_eq!(original.len(), exported.len());
    assert!(
        original == exported,
        "model.safetensors differs from the checkpoint"
    );
    let cfg = |d: &Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(d.join("config.json")).unwrap()).unwrap()
    };
    assert_eq!(cfg(&model), cfg(&work.join("exported")));

    // Native nodes: A holds all of layer 15 (past the first page), B gets
    // one expert of it from A through the relay.
    let a = Node::start(node_cfg(&[&relay], &work.join("a"), &["layer15.*"]));
    let sa = a.wait_complete();
    assert_eq!(sa.wanted.len(), EXPERTS + 1, "64 experts and the router");
    assert!(sa.held.values().any(|n| n == last), "{:?}", sa.held);
    let info = b.iter().find(|i| i.name == last).unwrap().clone();
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
    let bnode = Node::start(node_cfg(&[&relay], &work.join("b"), &[last]));
    let sb = bnode.wait_complete();
    let mut a_key = [0u8; 32];
    hex::decode_to_slice(&sa.id, &mut a_key).unwrap();
    assert_eq!(
        sb.stats.bytes_received.get(&Source::Peer(a_key)).copied(),
        Some(info.payload_len),
        "{:?}",
        sb.stats.bytes_received
    );
    drop(bnode);
    drop(a);

    // improve --relay on a slot of the second page: its block's parent is
    // that slot's head, and the relay makes it the new head.
    ok(&aiblock(&["keygen", "--out", "key"], work));
    let out = ok(&aiblock(
        &[
            "improve", "--relay", url, "--expert", last, "--skill", "copy", "--key", "key",
            "--steps", "1", "--force",
        ],
        work,
    ));
    assert!(out.contains("published"), "{out}");
    let after = list_b(url);
    let head = after.iter().find(|i| i.name == last && i.is_head).unwrap();
    assert_ne!(head.hash, info.hash);
    assert_eq!(head.parents, vec![info.hash]);
    assert_eq!(after.len(), b.len() + 1);
}

/// A relay that ignores the listing cursor (every request gets the same
/// page and a `Link` to "the next"): the CLI stops with the core's error
/// instead of looping. Answers at most `max` requests; returns their
/// request lines.
fn looping_relay(page: Vec<u8>, max: usize) -> (String, std::thread::JoinHandle<Vec<String>>) {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let t = std::thread::spawn(move || {
        let mut served = Vec::new();
        for conn in listener.incoming().take(max) {
            let mut conn = conn.unwrap();
            let mut r = BufReader::new(conn.try_clone().unwrap());
            let mut first = String::new();
            r.read_line(&mut first).unwrap();
            served.push(first.trim().to_string());
            let mut line = String::new();
            while r.read_line(&mut line).unwrap() > 2 {
                line.clear();
            }
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
                 link: </chain/B/blocks?after=00&limit=1000>; rel=\"next\"\r\nconnection: close\r\n\r\n",
                page.len()
            );
            let _ = conn.write_all(head.as_bytes());
            let _ = conn.write_all(&page);
        }
        served
    });
    (url, t)
}

#[test]
fn a_relay_that_ignores_the_cursor_is_refused_not_followed_forever() {
    use web_node::chain::{BlockBuilder, BlockHash, BlockKind, PayloadDtype};
    let key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    let block = BlockBuilder::new(
        BlockKind::Expert,
        "layer0.expert0".into(),
        Some(BlockHash([1; 32])),
        PayloadDtype::F32,
    )
    .sign(b"x", &key);
    let page = serde_json::to_vec(&vec![BlockInfo::from(&block)]).unwrap();
    let (url, server) = looping_relay(page, 2);
    let tmp = tempfile::tempdir().unwrap();
    let o = aiblock(&["export", "--relay", &url, "--out", "x"], tmp.path());
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("does not advance"), "{err}");
    // Unblock the server if the CLI asked fewer times than expected.
    let _ = std::net::TcpStream::connect(url.trim_start_matches("http://"))
        .and_then(|mut c| std::io::Write::write_all(&mut c, b"GET /none HTTP/1.1\r\n\r\n"));
    let asked = server.join().unwrap();
    // Its own cursor (the last block it accepted), not the relay's Link.
    assert_eq!(
        asked[..2],
        [
            "GET /chain/B/blocks?limit=1000 HTTP/1.1".to_string(),
            format!(
                "GET /chain/B/blocks?after={}&limit=1000 HTTP/1.1",
                block.hash.to_hex()
            ),
        ]
    );
}
