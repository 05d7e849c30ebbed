//! Integrity at rest: a payload file corrupted on disk is found (on restart,
//! by `relay check`, or on the first read), quarantined and reported, and
//! its bytes are never served.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;
use web_node::net::api::{BlockInfo, ChunkList};

fn web(dir: &std::path::Path) -> std::path::PathBuf {
    let w = dir.join("web");
    std::fs::create_dir_all(&w).unwrap();
    std::fs::write(w.join("index.html"), "hi").unwrap();
    w
}

fn block_file(data: &std::path::Path, b: &BlockInfo) -> std::path::PathBuf {
    let hex = b.hash.to_hex();
    data.join("blocks").join(&hex[..2]).join(hex)
}

/// Flip one byte near the end of a block file (inside its payload).
fn corrupt(path: &std::path::Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 0x40;
    std::fs::write(path, bytes).unwrap();
}

fn by_name(url: &str, name: &str) -> BlockInfo {
    list(url, "B").into_iter().find(|i| i.name == name).unwrap()
}

#[test]
fn payload_corrupted_while_down_is_reported_on_restart_and_not_served() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir(tmp.path());
    let web = web(tmp.path());
    let data = tmp.path().join("data");
    let r = ChildRelay::start(&data, &model, &web);
    let x = by_name(&r.url, "layer0.expert1");
    let y = by_name(&r.url, "layer1.expert0");
    let good_x = get(&format!("{}/blocks/{}/payload", r.url, x.hash)).body;
    let good_y = get(&format!("{}/blocks/{}/payload", r.url, y.hash)).body;
    r.terminate();

    corrupt(&block_file(&data, &x));
    let log = tmp.path().join("relay.log");
    let r = ChildRelay::start_args(&data, &model, &web, &[], None, Some(&log));
    // Never served: the payload and its chunk list are errors, not bytes.
    let p = get(&format!("{}/blocks/{}/payload", r.url, x.hash));
    assert_eq!(p.status, 500, "{}", String::from_utf8_lossy(&p.body));
    assert_eq!(p.error(500).code, "corrupt");
    assert_ne!(p.body.len(), good_x.len());
    assert_eq!(
        get(&format!("{}/blocks/{}/chunks", r.url, x.hash))
            .error(500)
            .code,
        "corrupt"
    );
    // Reported: the start-up check logs it and moved the file to quarantine/.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("quarantined") && text.contains(&x.hash.to_hex()) {
            break;
        }
        assert!(Instant::now() < deadline, "not reported: {text}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(data.join("quarantine").join(x.hash.to_hex()).is_file());
    // The header stays in the chain; other payloads are served as before.
    assert!(list(&r.url, "B").iter().any(|i| i.hash == x.hash));
    assert_eq!(
        get(&format!("{}/blocks/{}/payload", r.url, y.hash)).body,
        good_y
    );
    r.terminate();

    // `relay check` while stopped: finds a new corruption, lists both, exits 1.
    corrupt(&block_file(&data, &y));
    let out = Command::new(env!("CARGO_BIN_EXE_relay"))
        .args(["check", "--data"])
        .arg(&data)
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains(&x.hash.to_hex()) && text.contains(&y.hash.to_hex()),
        "{text}"
    );
    assert!(text.contains("(1 found now)"), "{text}");
    // Restart: still listed, still not served.
    let r = ChildRelay::start(&data, &model, &web);
    assert_eq!(
        get(&format!("{}/blocks/{}/payload", r.url, y.hash))
            .error(500)
            .code,
        "corrupt"
    );
    assert!(list(&r.url, "B").iter().any(|i| i.hash == y.hash));
}

#[test]
fn corruption_found_while_serving_is_never_served() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir(tmp.path());
    let data = tmp.path().join("data");
    let relay = TestRelay::start(&data, Some(&model), None);
    let url = &relay.url;
    let s = by_name(url, "shared");
    let chunks: ChunkList = get(&format!("{url}/blocks/{}/chunks", s.hash)).json();
    assert!(!chunks.chunks.is_empty());
    corrupt(&block_file(&data, &s));
    // A range is served only from whole chunks checked against the chunk
    // list: the bad chunk is refused and the payload quarantined.
    let r = get_with(
        &format!("{url}/blocks/{}/payload", s.hash),
        "range",
        &format!("bytes=-{}", 20),
    );
    assert_eq!(r.error(500).code, "corrupt");
    let r = get(&format!("{url}/blocks/{}/payload", s.hash));
    assert_eq!(r.error(500).code, "corrupt");
    assert!(data.join("quarantine").join(s.hash.to_hex()).is_file());
    assert!(relay
        .state
        .store
        .quarantined(&s.hash)
        .unwrap()
        .unwrap()
        .contains("chunk"));
}
