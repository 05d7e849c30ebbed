//! What an operator meets, on the real `relay` binary: every form of
//! `--data` (relative, absolute, `./x/../x`, symlinked, trailing slash) for
//! `serve` and `check`; restarts that write no second genesis; `/healthz`
//! and `/readyz` (also while PostgreSQL is stopped); graceful shutdown
//! during a streaming upload.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use relay::server::health::Readiness;
use web_node::chain::{BlockBuilder, BlockHash, PayloadDtype};
use web_node::model::Slot;
use web_node::net::api::BlockInfo;

/// The real relay binary started in `cwd` with `args` after `serve`
/// (quality gate off, port 0, JSON logs to a file in `cwd`).
struct Served {
    child: Child,
    url: String,
}

impl Served {
    fn start(cwd: &Path, args: &[&str]) -> Self {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(cwd.join("relay.log"))
            .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_relay"))
            .current_dir(cwd)
            .args(["--log-format", "json", "serve", "--addr", "127.0.0.1:0"])
            .args(["--gate", "accept-all", "--no-scrub"])
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let Some(url) = line.trim().strip_prefix("relay listening on ") else {
            let _ = child.wait();
            let log = std::fs::read_to_string(cwd.join("relay.log")).unwrap_or_default();
            panic!("relay {args:?} did not start (first line {line:?}); log:\n{log}");
        };
        Self {
            url: url.to_string(),
            child,
        }
    }

    fn addr(&self) -> String {
        self.url.trim_start_matches("http://").to_string()
    }

    /// SIGTERM or SIGINT; the exit status and how long it took.
    fn signal_and_wait(mut self, sig: &str) -> (std::process::ExitStatus, Duration) {
        let t = Instant::now();
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(ok.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return (st, t.elapsed());
            }
            assert!(Instant::now() < deadline, "relay did not exit after {sig}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn hashes(url: &str) -> (Vec<BlockHash>, Vec<BlockHash>) {
    let h = |c| list(url, c).iter().map(|b: &BlockInfo| b.hash).collect();
    (h("A"), h("B"))
}

/// A signed new version of `slot` on top of its current head, with its payload.
fn new_version(
    url: &str,
    slot: Slot,
    key: &ed25519_dalek::SigningKey,
    address: &str,
    seed: u64,
) -> (web_node::chain::Block, Vec<u8>) {
    let name = slot.to_string();
    let head = list(url, "B")
        .into_iter()
        .find(|b| b.name == name && b.is_head)
        .unwrap_or_else(|| panic!("no head for {name}"));
    let payload = slot_payload(&test_config(), slot, seed);
    let block = BlockBuilder::slot(head.meta.unwrap(), slot, PayloadDtype::F32)
        .parents(vec![head.hash])
        .candidate_loss(Some(0.5))
        .address(address)
        .timestamp_ms(1_700_000_000_000 + seed)
        .chunk_size(4096)
        .sign(&payload, key);
    (block, payload)
}

/// A new version of `slot` uploaded through `POST /blocks` (the streamed
/// binary path, which stages a file in the data dir).
fn upload_new_version(url: &str, slot: Slot, key: &ed25519_dalek::SigningKey, seed: u64) {
    let (block, payload) = new_version(url, slot, key, "operator-test", seed);
    let r = post_bin(
        &format!("{url}/blocks"),
        &envelope_and_payload(&block, &payload),
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
}

/// Start uploading a new version of `shared`: the request head, the envelope
/// and the first 1 KiB of the payload, then wait until the relay has staged
/// it in `data/tmp`. Returns the block, the whole body, the connection and
/// how much of the body was sent.
fn begin_upload(
    r: &Served,
    data: &Path,
    address: &str,
    seed: u64,
) -> (web_node::chain::Block, Vec<u8>, TcpStream, usize) {
    let (block, payload) = new_version(&r.url, Slot::Shared, &miner_key(3), address, seed);
    let body = envelope_and_payload(&block, &payload);
    let mut s = TcpStream::connect(r.addr()).unwrap();
    write!(
        s,
        "POST /blocks HTTP/1.1\r\nhost: x\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    let cut = block.encoded_len() + 1024;
    s.write_all(&body[..cut]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while files(&data.join("tmp")).is_empty() {
        assert!(Instant::now() < deadline, "the upload was never staged");
        std::thread::sleep(Duration::from_millis(10));
    }
    (block, body, s, cut)
}

/// Every form of `--data` names one store: genesis once, uploads staged and
/// placed, a restart finds the same chain, `relay check` agrees.
#[test]
fn every_form_of_data_dir_serves_restarts_and_checks() {
    let tmp = tempfile::tempdir().unwrap();
    let cwd = tmp.path().join("work");
    std::fs::create_dir_all(cwd.join("sub")).unwrap();
    let model = model_dir(tmp.path());
    let model_s = model.display().to_string();
    let abs = cwd.join("abs-data").display().to_string();
    std::os::unix::fs::symlink(cwd.join("real-data"), cwd.join("link-data")).unwrap();
    std::fs::create_dir_all(cwd.join("real-data")).unwrap();
    // (form given to --data, the directory it names)
    let forms: Vec<(String, std::path::PathBuf)> = vec![
        ("data".into(), cwd.join("data")),
        ("./dot-data".into(), cwd.join("dot-data")),
        ("./sub/../up-data".into(), cwd.join("up-data")),
        ("slash-data/".into(), cwd.join("slash-data")),
        (abs.clone(), cwd.join("abs-data")),
        ("link-data".into(), cwd.join("real-data")),
    ];
    for (i, (form, dir)) in forms.iter().enumerate() {
        let r = Served::start(&cwd, &["--data", form, "--model", &model_s]);
        let first = hashes(&r.url);
        assert_eq!(first.0.len(), 1, "{form}: one meta block");
        assert_eq!(
            first.1.len(),
            Slot::all(&test_config()).len(),
            "{form}: every slot at genesis"
        );
        upload_new_version(&r.url, Slot::Shared, &miner_key(1), i as u64);
        let after = hashes(&r.url);
        assert_eq!(after.1.len(), first.1.len() + 1, "{form}");
        let (st, _) = r.signal_and_wait("INT");
        assert!(st.success(), "{form}: exit status {st}");
        // The store lives where the form points, and nothing is left staged.
        assert!(
            dir.join("index.redb").is_file(),
            "{form}: {}",
            dir.display()
        );
        assert!(
            files(&dir.join("tmp")).is_empty(),
            "{form}: staged files left"
        );
        // Same form again: the same chain, no second genesis.
        let r = Served::start(&cwd, &["--data", form, "--model", &model_s]);
        assert_eq!(hashes(&r.url), after, "{form}: restart");
        let (st, _) = r.signal_and_wait("TERM");
        assert!(st.success(), "{form}: exit status {st}");
        let out = Command::new(env!("CARGO_BIN_EXE_relay"))
            .current_dir(&cwd)
            .args(["check", "--data", form])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{form}: check: {text}");
        assert!(text.contains("all payloads match"), "{form}: {text}");
    }
    // The symlink still is one: the store went through it.
    assert!(cwd.join("link-data").is_symlink());
    // A --data that is a file is refused with a clear error, nothing written.
    std::fs::write(cwd.join("a-file"), b"x").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_relay"))
        .current_dir(&cwd)
        .args(["serve", "--addr", "127.0.0.1:0", "--data", "a-file/"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("a-file"), "{err}");
    // JSON logs: one object per line.
    let log = std::fs::read_to_string(cwd.join("relay.log")).unwrap();
    let mut n = 0;
    for line in log.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line:?}"));
        assert!(
            v.get("level").is_some() && v.get("timestamp").is_some(),
            "{line}"
        );
        n += 1;
    }
    assert!(n > 10, "{n} log lines");
}

#[test]
fn healthz_and_readyz_answer() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir(tmp.path());
    let r = Served::start(
        tmp.path(),
        &["--data", "data", "--model", &model.display().to_string()],
    );
    let h = get(&format!("{}/healthz", r.url));
    assert_eq!(h.status, 200);
    let v: serde_json::Value = h.json();
    assert_eq!(v["status"], "ok");
    let rd = get(&format!("{}/readyz", r.url));
    assert_eq!(rd.status, 200, "{}", String::from_utf8_lossy(&rd.body));
    let rd: Readiness = rd.json();
    assert!(rd.ready && rd.reason.is_none(), "{rd:?}");
    assert_eq!(rd.store, "ok");
    assert_eq!(rd.database, "not configured");
    assert_eq!(rd.chain_blocks, 1 + Slot::all(&test_config()).len());
    assert_eq!(
        get(&format!("{}/readyz", r.url)).status,
        200,
        "a second probe"
    );
}

fn wait_ready(url: &str, want: u16, within: Duration) -> Readiness {
    let deadline = Instant::now() + within;
    loop {
        let r = get(&format!("{url}/readyz"));
        if r.status == want {
            return r.json();
        }
        assert!(
            Instant::now() < deadline,
            "/readyz stayed {} ({}), wanted {want}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn readyz_follows_postgres_down_and_back() {
    // A server of its own: this test stops it.
    let Some(pg) = test_support::pg::TestPg::start() else {
        return;
    };
    let url = pg.create_db();
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir(tmp.path());
    let r = Served::start(
        tmp.path(),
        &[
            "--data",
            "data",
            "--model",
            &model.display().to_string(),
            "--database",
            &url,
        ],
    );
    let up = wait_ready(&r.url, 200, Duration::from_secs(10));
    assert_eq!(up.database, "ok");
    pg.pause().unwrap();
    let down = wait_ready(&r.url, 503, Duration::from_secs(15));
    assert!(!down.ready);
    assert!(
        down.reason
            .as_deref()
            .unwrap_or_default()
            .contains("database"),
        "{down:?}"
    );
    // Liveness is not readiness: the process still serves.
    assert_eq!(get(&format!("{}/healthz", r.url)).status, 200);
    pg.resume().unwrap();
    let back = wait_ready(&r.url, 200, Duration::from_secs(30));
    assert_eq!(back.database, "ok");
    let (st, _) = r.signal_and_wait("TERM");
    assert!(st.success(), "exit status {st}");
}

/// SIGTERM while an upload streams in: new connections are refused, the
/// upload is cut at the deadline, the relay exits 0 with no staged file
/// left, nothing of the upload stored, and the usage counters written.
#[test]
fn graceful_shutdown_cuts_a_streaming_upload_and_flushes_usage() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir(tmp.path());
    let data = tmp.path().join("data");
    let args = [
        "--data",
        "data",
        "--model",
        &model.display().to_string(),
        "--shutdown-timeout",
        "2",
    ];
    let r = Served::start(tmp.path(), &args);
    let before = hashes(&r.url);
    // Usage to flush: a chat runs experts.
    let chat = post_json(
        &format!("{}/chat", r.url),
        br#"{"prompt":"hello","max_tokens":3}"#,
    );
    assert_eq!(chat.status, 200, "{}", String::from_utf8_lossy(&chat.body));
    // A valid new version of `shared`, of which only the envelope and the
    // first bytes arrive before the signal.
    let (block, _, mut s, _) = begin_upload(&r, &data, "slow", 99);
    let addr = r.addr();
    let pid = r.child.id();
    let t = Instant::now();
    assert!(Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    // While it drains, the listener is closed: new connections are refused.
    let mut refused = false;
    while t.elapsed() < Duration::from_millis(1500) {
        if TcpStream::connect(&addr).is_err() {
            refused = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        refused,
        "the relay still accepts connections while draining"
    );
    let (st, _) = r.signal_and_wait("0");
    let took = t.elapsed();
    assert!(st.success(), "exit status {st}");
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(10),
        "exit after {took:?} (deadline 2 s)"
    );
    // The upload was cut: the client sees the connection end, not a 201.
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    assert!(!reply.contains(" 201 "), "{reply}");
    assert!(files(&data.join("tmp")).is_empty(), "staged file left");
    // Usage written: the chat's experts have tokens in data/usage.redb.
    let usage = relay::usage::Usage::open(&data.join("usage.redb")).unwrap();
    let tokens: u64 = before
        .1
        .iter()
        .map(|h| usage.version_counters(h).tokens)
        .sum();
    assert!(tokens > 0, "usage counters were not flushed");
    drop(usage);
    // Nothing of the cut upload was stored.
    let r = Served::start(tmp.path(), &args);
    assert_eq!(hashes(&r.url), before);
    assert!(!list(&r.url, "B").iter().any(|b| b.hash == block.hash));
}

/// SIGTERM while an upload streams in, whose last bytes arrive within the
/// deadline: the upload finishes (201), the block is stored, and the relay
/// exits 0 right after, well before the deadline.
#[test]
fn graceful_shutdown_lets_an_upload_in_flight_finish() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir(tmp.path());
    let data = tmp.path().join("data");
    let args = [
        "--data",
        "data",
        "--model",
        &model.display().to_string(),
        "--shutdown-timeout",
        "20",
    ];
    let r = Served::start(tmp.path(), &args);
    let (block, body, mut s, cut) = begin_upload(&r, &data, "finishing", 77);
    let pid = r.child.id();
    assert!(Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    std::thread::sleep(Duration::from_millis(300));
    // The rest of the body, after the signal.
    s.write_all(&body[cut..]).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    assert!(
        reply.starts_with("HTTP/1.1 201"),
        "the upload in flight was not finished: {reply:?}"
    );
    let t = Instant::now();
    let (st, _) = r.signal_and_wait("0");
    assert!(st.success(), "exit status {st}");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "the relay waited for its deadline after the last request ended"
    );
    assert!(files(&data.join("tmp")).is_empty(), "staged file left");
    let r = Served::start(tmp.path(), &args);
    assert!(list(&r.url, "B")
        .iter()
        .any(|b| b.hash == block.hash && b.is_head));
}

/// A data dir made from an older model of the same name (another
/// tokenizer, or the same tokenizer with other weights) is refused at start
/// with what to do; the same model restarts; nothing is written either way.
#[test]
fn data_from_an_older_model_is_detected() {
    let tmp = tempfile::tempdir().unwrap();
    let cwd = tmp.path().join("work");
    std::fs::create_dir_all(&cwd).unwrap();
    let model = model_dir(tmp.path());
    let model_s = model.display().to_string();
    let r = Served::start(&cwd, &["--data", "data", "--model", &model_s]);
    let first = hashes(&r.url);
    let (st, _) = r.signal_and_wait("INT");
    assert!(st.success());
    // The block files (the index may grow when it is opened, not change).
    let blocks_of = |d: &Path| -> Vec<(String, u64)> {
        files(d)
            .into_iter()
            .filter(|(n, _)| n.starts_with("blocks/") || n == "operator.key")
            .collect()
    };
    let before = blocks_of(&cwd.join("data"));
    let refused = |why: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_relay"))
            .current_dir(&cwd)
            .args([
                "serve",
                "--addr",
                "127.0.0.1:0",
                "--data",
                "data",
                "--model",
                &model_s,
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{why}: started; {err}");
        assert!(
            err.contains("older model") && err.contains("mv ") && err.contains(why),
            "{why}: {err}"
        );
        assert_eq!(
            blocks_of(&cwd.join("data")),
            before,
            "{why}: the data dir changed"
        );
    };
    // Retrained with the same tokenizer: other weights.
    web_node::model::random::write_random_model(&model, &test_config(), 8).unwrap();
    refused("weights");
    // Another tokenizer (a retrained default has one).
    let tok = model.join("tokenizer.json");
    let mut t: serde_json::Value = serde_json::from_slice(&std::fs::read(&tok).unwrap()).unwrap();
    t["added_tokens"][0]["content"] = serde_json::Value::String("<bos2>".into());
    std::fs::write(&tok, serde_json::to_vec(&t).unwrap()).unwrap();
    refused("tokenizer");
    // The model that made the data starts again, same chain.
    web_node::model::random::write_random_model(&model, &test_config(), 7).unwrap();
    let r = Served::start(&cwd, &["--data", "data", "--model", &model_s]);
    assert_eq!(hashes(&r.url), first);
    let (st, _) = r.signal_and_wait("INT");
    assert!(st.success());
}
