//! The real relay binary: restart persistence, graceful shutdown, and kill -9
//! in the middle of an upload.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::common::*;
use web_node::model::Slot;
use web_node::net::api::BlockInfo;

fn web(dir: &std::path::Path) -> std::path::PathBuf {
    let w = dir.join("web");
    std::fs::create_dir_all(&w).unwrap();
    std::fs::write(w.join("index.html"), "hi").unwrap();
    w
}

/// Upload one new version of each of a few experts; returns their hashes.
fn upload_some(url: &str, n: usize) -> Vec<BlockInfo> {
    let cfg = test_config();
    let meta = list(url, "A")[0].hash;
    let mut out = Vec::new();
    for e in 0..n {
        let slot = Slot::Expert {
            layer: 0,
            expert: e,
        };
        let head = list(url, "B")
            .into_iter()
            .rev()
            .find(|i| i.name == slot.to_string())
            .unwrap()
            .hash;
        let payload = slot_payload(&cfg, slot, 50 + e as u64);
        let (_, block) = upload(slot, &payload, vec![head], Some(meta), &miner_key(1));
        let r = post_bin(
            &format!("{url}/blocks"),
            &envelope_and_payload(&block, &payload),
        );
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
        out.push(r.json());
    }
    out
}

#[test]
fn restart_keeps_everything() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir(tmp.path());
    let web = web(tmp.path());
    let data = tmp.path().join("data");
    let r = ChildRelay::start(&data, &model, &web);
    let uploaded = upload_some(&r.url, 3);
    let (a, b) = (list(&r.url, "A"), list(&r.url, "B"));
    let heads: serde_json::Value = get(&format!("{}/heads", r.url)).json();
    let key = std::fs::read(data.join("operator.key")).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(data.join("operator.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    r.terminate();

    // Same data dir: no second genesis, same blocks, heads and key.
    let r = ChildRelay::start(&data, &model, &web);
    assert_eq!(list(&r.url, "A"), a);
    assert_eq!(list(&r.url, "B"), b);
    assert_eq!(
        get(&format!("{}/heads", r.url)).json::<serde_json::Value>(),
        heads
    );
    assert_eq!(std::fs::read(data.join("operator.key")).unwrap(), key);
    for u in &uploaded {
        assert!(b.iter().any(|i| i.hash == u.hash && i.is_head));
    }
    assert_eq!(fetch_and_validate_all(&r.url), a.len() + b.len());
}

#[test]
fn kill_9_mid_upload_leaves_no_half_block() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir(tmp.path());
    let web = web(tmp.path());
    let data = tmp.path().join("data");
    let r = ChildRelay::start(&data, &model, &web);
    upload_some(&r.url, 2);
    let (a, b) = (list(&r.url, "A"), list(&r.url, "B"));
    let blocks_before = files(&data.join("blocks"));

    // A large binary upload: a valid envelope for a big payload, sent in part.
    let cfg = test_config();
    let slot = Slot::Expert {
        layer: 1,
        expert: 1,
    };
    let head = b.iter().find(|i| i.name == "layer1.expert1").unwrap().hash;
    // The slot's real tensors: the relay checks the envelope and the
    // safetensors header as they stream in, so the upload is staged.
    let payload = slot_payload(&cfg, slot, 9);
    let (_, block) = upload(slot, &payload, vec![head], Some(a[0].hash), &miner_key(1));
    let body = envelope_and_payload(&block, &payload);
    let addr = r.url.trim_start_matches("http://").to_string();
    let mut s = TcpStream::connect(&addr).unwrap();
    write!(
        s,
        "POST /blocks HTTP/1.1\r\nhost: x\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    // Everything but the last bytes: the relay waits for the rest.
    s.write_all(&body[..body.len() - 64]).unwrap();
    s.flush().unwrap();
    // Wait until the relay has staged part of it, then kill it hard.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // The staged file exists (its bytes may still sit in the relay's
        // write buffer).
        if !files(&data.join("tmp")).is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the upload never reached the staging dir"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    r.kill9();
    drop(s);
    assert!(
        !files(&data.join("tmp")).is_empty(),
        "the half upload is on disk before restart"
    );
    let _ = cfg;

    let r = ChildRelay::start(&data, &model, &web);
    assert_eq!(list(&r.url, "A"), a);
    assert_eq!(list(&r.url, "B"), b);
    assert!(
        files(&data.join("tmp")).is_empty(),
        "staged upload removed on restart"
    );
    assert_eq!(
        files(&data.join("blocks")),
        blocks_before,
        "no new or half block file"
    );
    assert!(get(&format!("{}/blocks/{}", r.url, block.hash)).status == 404);
    assert_eq!(fetch_and_validate_all(&r.url), a.len() + b.len());
}
