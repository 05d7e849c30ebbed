//! Bounded memory and connections under hostile clients: concurrent
//! maximum-size uploads, garbage refused at its first bytes, slowloris and
//! stalled bodies cut after short (test-configured) timeouts with no staged
//! file left, and a descriptor limit after which other clients are served.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::common::*;
use relay::ServeOptions;
use web_node::model::Slot;

fn web(dir: &std::path::Path) -> std::path::PathBuf {
    let w = dir.join("web");
    std::fs::create_dir_all(&w).unwrap();
    std::fs::write(w.join("index.html"), "hi").unwrap();
    w
}

fn post_head(s: &mut TcpStream, path: &str, ct: &str, len: u64) {
    write!(
        s,
        "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: {ct}\r\ncontent-length: {len}\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
}

/// Read until the server closes; the status code (0 if none) and how long it took.
fn read_reply(s: &mut TcpStream, within: Duration) -> (u16, String, Duration) {
    let t = Instant::now();
    s.set_read_timeout(Some(within)).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let st = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (st, text, t.elapsed())
}

#[test]
fn memory_stays_bounded_through_concurrent_maximum_size_uploads() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir(tmp.path());
    let data = tmp.path().join("data");
    let keys = tmp.path().join("meta-keys");
    std::fs::write(
        &keys,
        format!(
            "# test\n{}\n",
            hex::encode(miner_key(50).verifying_key().to_bytes())
        ),
    )
    .unwrap();
    // Limits of this test: JSON bodies of at most 16 MiB decoded 2 at a time
    // (the defaults), binary bodies streamed.
    let r = ChildRelay::start_args(
        &data,
        &model,
        &web(tmp.path()),
        &[
            "--max-json-body",
            "16777216",
            "--json-concurrency",
            "2",
            "--meta-keys",
            keys.to_str().unwrap(),
        ],
        None,
        None,
    );
    // A second model whose shared slot is 64 MiB, published by a listed key.
    let big = big_config(64);
    let op = miner_key(50);
    let (up, big_meta_block, _) = meta_upload("big", &big, vec![], &[], &op);
    let resp = post_json(&format!("{}/upload_moe_experts", r.url), &seed_json(&up));
    assert_eq!(resp.status, 201, "{}", String::from_utf8_lossy(&resp.body));
    let big_meta = big_meta_block.hash;
    let base = r.peak_rss();
    // 8 JSON uploads of the maximum size at once: a 12 MiB safetensors payload
    // (16 MiB of base64) under a signature that does not match it.
    let meta = list(&r.url, "A")[0].hash;
    let head = list(&r.url, "B")
        .into_iter()
        .find(|i| i.name == "shared")
        .unwrap()
        .hash;
    let small = slot_payload(&test_config(), Slot::Shared, 1);
    let (mut up, _) = upload(Slot::Shared, &small, vec![head], Some(meta), &miner_key(1));
    use base64::Engine as _;
    let n = (12 * 1024 * 1024 - 4096) / 4;
    let tensors =
        web_node::model::random::safetensors_bytes(&[("x".into(), vec![n], vec![0.5f32; n])])
            .unwrap();
    up.tensor_data_b64 = base64::engine::general_purpose::STANDARD.encode(tensors);
    let body = seed_json(&up);
    assert!(body.len() <= 16 * 1024 * 1024);
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (url, body) = (r.url.clone(), body.clone());
            std::thread::spawn(move || {
                match ureq::post(&format!("{url}/upload_moe_experts"))
                    .set("content-type", "application/json")
                    .send_bytes(&body)
                {
                    Ok(resp) => resp.status(),
                    Err(ureq::Error::Status(s, r)) => {
                        if s != 401 && s != 503 {
                            eprintln!("{s}: {}", r.into_string().unwrap_or_default());
                        }
                        s
                    }
                    Err(ureq::Error::Transport(_)) => 0, // refused while sending
                }
            })
        })
        .collect();
    let statuses: Vec<u16> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(
        statuses.iter().all(|s| [401, 503, 0].contains(s)) && statuses.contains(&401),
        "{statuses:?}"
    );
    let after_json = r.peak_rss();
    // 8 binary uploads of 64 MiB at once, streamed (first versions of the
    // big model's shared slot, by its meta block's signer).
    let statuses: Vec<String> = (0..8u64)
        .map(|i| {
            let s = streamed_slot(&big, Slot::Shared, big_meta, vec![], &op, i);
            assert!(s.len >= 64 << 20);
            let addr = r.addr();
            std::thread::spawn(move || send_streamed(&addr, &s, Duration::ZERO))
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    assert!(
        statuses.iter().all(|s| s.contains("400")),
        "bogus roots: {statuses:?}"
    );
    // Garbage refused at its first bytes: the answer comes while the client
    // has sent 8 of the 1 GiB it announced.
    let mut s = TcpStream::connect(r.addr()).unwrap();
    post_head(&mut s, "/blocks", "application/octet-stream", 1 << 30);
    s.write_all(b"GARBAGE!").unwrap();
    let (st, text, took) = read_reply(&mut s, Duration::from_secs(5));
    assert_eq!(st, 400, "{text}");
    assert!(text.contains("bad magic"), "{text}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    let peak = r.peak_rss();
    eprintln!(
        "relay VmHWM: {} MiB at start, {} MiB after 8 x 16 MiB JSON, {} MiB after 8 x 64 MiB binary",
        base >> 20,
        after_json >> 20,
        peak >> 20
    );
    // Unbounded, the JSON uploads alone would need 8 x ~44 MiB and the binary
    // ones 8 x 64 MiB; decoding two JSON bodies at a time needs ~90 MiB.
    assert!(
        after_json - base < 160 << 20,
        "JSON: {} MiB",
        (after_json - base) >> 20
    );
    assert!(
        peak - after_json < 48 << 20,
        "binary: {} MiB",
        (peak - after_json) >> 20
    );
    assert!(files(&data.join("tmp")).is_empty());
    assert_eq!(list(&r.url, "B").len(), Slot::all(&test_config()).len());
}

fn short_timeouts() -> ServeOptions {
    ServeOptions::default()
        .header_timeout(Duration::from_millis(1500))
        .keepalive_timeout(Duration::from_millis(700))
}

#[test]
fn slowloris_and_idle_connections_are_cut() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir(tmp.path());
    let relay = TestRelay::start_full(
        &tmp.path().join("data"),
        Some(&model),
        None,
        |s| s,
        short_timeouts(),
    );
    let addr = relay.addr();
    // Slowloris: a header line every 200 ms never completes the request.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(b"GET /heads HTTP/1.1\r\n").unwrap();
    let t = Instant::now();
    let mut cut = false;
    for i in 0..50 {
        std::thread::sleep(Duration::from_millis(200));
        if s.write_all(format!("x-slow-{i}: 1\r\n").as_bytes())
            .is_err()
        {
            cut = true;
            break;
        }
        let mut b = [0u8; 1];
        s.set_nonblocking(true).unwrap();
        let r = s.read(&mut b);
        s.set_nonblocking(false).unwrap();
        if matches!(r, Ok(0)) || matches!(&r, Err(e) if e.kind() != std::io::ErrorKind::WouldBlock)
        {
            cut = true;
            break;
        }
    }
    let took = t.elapsed();
    assert!(cut, "slowloris connection still open after {took:?}");
    assert!(took < Duration::from_secs(4), "{took:?}");
    // A connection that sends nothing, and one idle after a response.
    let mut idle = TcpStream::connect(&addr).unwrap();
    let (_, _, took) = read_reply(&mut idle, Duration::from_secs(10));
    assert!(took < Duration::from_secs(3), "idle: {took:?}");
    let mut ka = TcpStream::connect(&addr).unwrap();
    ka.write_all(b"GET /heads HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    let (st, _, took) = read_reply(&mut ka, Duration::from_secs(10));
    assert_eq!(st, 200);
    assert!(took < Duration::from_secs(3), "keep-alive: {took:?}");
    // Still serving.
    assert_eq!(get(&format!("{}/heads", relay.url)).status, 200);
}

#[test]
fn stalled_upload_bodies_are_cut_and_leave_no_staged_file() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let big = big_config(64);
    let relay = TestRelay::start_full(
        &data,
        Some(&meta_only_dir(tmp.path(), &big)),
        None,
        |s| s.with_options(|o| o.body_idle_timeout = Duration::from_secs(1)),
        short_timeouts(),
    );
    let before = (list(&relay.url, "A"), list(&relay.url, "B"));
    // Binary: envelope, safetensors header and 1 MiB of a 64 MiB payload,
    // then silence.
    let meta = before.0[0].hash;
    let up = streamed_slot(&big, Slot::Shared, meta, vec![], &operator_key(&data), 1);
    let mut s = TcpStream::connect(relay.addr()).unwrap();
    let env = up.block.encode();
    post_head(
        &mut s,
        "/blocks",
        "application/octet-stream",
        env.len() as u64 + up.len,
    );
    s.write_all(&env).unwrap();
    s.write_all(&up.prefix).unwrap();
    s.write_all(&vec![0u8; 1 << 20]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while files(&data.join("tmp")).is_empty() {
        assert!(Instant::now() < deadline, "the upload was never staged");
        std::thread::sleep(Duration::from_millis(10));
    }
    let (st, text, took) = read_reply(&mut s, Duration::from_secs(10));
    assert_eq!(st, 408, "{text}");
    assert!(text.contains("\"timeout\""), "{text}");
    assert!(took < Duration::from_secs(4), "{took:?}");
    assert!(files(&data.join("tmp")).is_empty(), "staged file removed");
    // JSON: 10 bytes of 1000, then silence.
    let mut s = TcpStream::connect(relay.addr()).unwrap();
    post_head(&mut s, "/upload_moe_experts", "application/json", 1000);
    s.write_all(b"{\"expert_").unwrap();
    let (st, text, _) = read_reply(&mut s, Duration::from_secs(10));
    assert_eq!(st, 408, "{text}");
    assert_eq!((list(&relay.url, "A"), list(&relay.url, "B")), before);
}

#[test]
fn descriptor_limit_is_respected_and_other_clients_are_served_after() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir(tmp.path());
    let data = tmp.path().join("data");
    // Limits of this test: 128 descriptors for the relay process, so at most
    // 128 - 64 (reserve) = 64 connections; idle ones cut after 2 s.
    let mut r = ChildRelay::start_args(
        &data,
        &model,
        &web(tmp.path()),
        &[
            "--max-connections-per-ip",
            "10000",
            "--keepalive-timeout",
            "2",
            "--header-timeout",
            "2",
        ],
        Some(128),
        None,
    );
    let shared = list(&r.url, "B")
        .into_iter()
        .find(|i| i.name == "shared")
        .unwrap();
    // 300 connections from one attacker, held open.
    let mut held = Vec::new();
    for _ in 0..300 {
        match TcpStream::connect(r.addr()) {
            Ok(s) => held.push(s),
            Err(_) => break,
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    // Over the cap: answered 503 (or closed), never left hanging.
    let mut extra = TcpStream::connect(r.addr()).unwrap();
    extra
        .write_all(b"GET /heads HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .unwrap();
    let (st, text, took) = read_reply(&mut extra, Duration::from_secs(10));
    assert!(st == 503 || st == 0, "{st}: {text}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    let mut refused = 0;
    for s in held.iter_mut() {
        s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let mut b = [0u8; 64];
        let answered = match s.read(&mut b) {
            Ok(0) => true,
            Ok(n) => n > 0 && b.starts_with(b"HTTP/1.1 503"),
            Err(_) => false,
        };
        if answered {
            refused += 1;
        }
    }
    assert!(refused >= 300 - 64, "only {refused} of 300 refused");
    assert!(r.child.try_wait().unwrap().is_none(), "relay alive");
    // The idle attackers are cut by the keep-alive timeout; then everyone is
    // served again, files included (payloads, uploads).
    std::thread::sleep(Duration::from_secs(3));
    drop(held);
    assert_eq!(get(&format!("{}/heads", r.url)).status, 200);
    let p = get(&format!("{}/blocks/{}/payload", r.url, shared.hash));
    assert_eq!((p.status, p.body.len() as u64), (200, shared.payload_len));
    let cfg = test_config();
    let slot = Slot::Router { layer: 0 };
    let head = list(&r.url, "B")
        .into_iter()
        .find(|i| i.name == "layer0.router")
        .unwrap()
        .hash;
    let payload = slot_payload(&cfg, slot, 5);
    let (_, block) = upload(slot, &payload, vec![head], shared.meta, &miner_key(1));
    let resp = post_bin(
        &format!("{}/blocks", r.url),
        &envelope_and_payload(&block, &payload),
    );
    assert_eq!(resp.status, 201, "{}", String::from_utf8_lossy(&resp.body));
}
