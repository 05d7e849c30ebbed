//! Readers under attack. Starts a relay (this binary re-run with `--serve`,
//! a child process with the quality gate and default limits, the per-IP
//! upload rate raised so that the attacks reach the expensive paths), then
//! measures `GET /heads` and `GET /chain/B/blocks` latency idle and while,
//! all at once:
//!
//! * a 1 GiB binary upload streams in (valid header, refused at its end),
//! * quality-gate evaluations run back to back (real eval runs, refused claims),
//! * 8 clients post maximum-size (16 MiB) JSON uploads in a loop,
//! * 200 slowloris connections dribble header bytes,
//! * 2 clients post garbage binary bodies in a loop;
//!
//! and prints the relay's peak memory (VmHWM of the child).
//!
//! `cargo run --release -p relay --example attack_bench [-- <upload MiB, default 1024>]`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use test_support::relay::TestRelay;
use web_node::chain::{BlockBuilder, BlockHash, BlockKind, PayloadDtype};
use web_node::model::random::{
    random_tensors, safetensors_bytes, slot_safetensors_prefix, small_config, write_random_model,
};
use web_node::model::{Config, Slot};
use web_node::net::api::{BlockInfo, SeedUpload, UploadOptions};

fn cfg() -> Config {
    small_config(259, 16, 24, 2, 2, 1)
}

/// The key that publishes the big model (listed as a meta key).
fn publisher() -> SigningKey {
    SigningKey::from_bytes(&[42; 32])
}

/// A config whose `shared` slot is about `mib` MiB of f32.
fn big_config(mib: u64) -> Config {
    let hidden = 1024usize;
    let vocab = ((mib << 20) / (2 * hidden as u64 * 4)) as usize;
    small_config(vocab.max(300), hidden, 64, 1, 4, 2)
}

/// The relay under attack (`test_support`'s in-process relay, through the
/// production accept loop), in this child process until it is killed. The
/// per-IP rate is lifted (every client is 127.0.0.1); the per-key rate is
/// the default one.
fn serve_child(data: &Path, model: &Path) {
    let cfg = relay::server::ServeConfig {
        data_dir: data.to_path_buf(),
        web_dir: None,
        model_dir: Some(model.to_path_buf()),
        database: None,
    };
    let r = TestRelay::start_cfg(
        cfg,
        |s| {
            s.with_gate(Arc::new(relay::quality::QualityGate::default()))
                .with_meta_keys([publisher().verifying_key().to_bytes()])
                .with_options(|o| {
                    o.key_rate = relay::server::limits::Rate {
                        burst: relay::server::limits::KEY_BURST,
                        per_minute: relay::server::limits::KEY_PER_MINUTE,
                    }
                })
        },
        relay::ServeOptions::default(),
    );
    println!("{}", r.url);
    loop {
        std::thread::park();
    }
}

fn vm_hwm(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap()
        * 1024
}

fn list(url: &str) -> Vec<BlockInfo> {
    serde_json::from_reader(
        ureq::get(&format!("{url}/chain/B/blocks"))
            .call()
            .unwrap()
            .into_reader(),
    )
    .unwrap()
}

fn stats(mut v: Vec<Duration>) -> String {
    v.sort();
    let p = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
    format!(
        "p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms  ({} requests)",
        p(0.5).as_secs_f64() * 1e3,
        p(0.99).as_secs_f64() * 1e3,
        v[v.len() - 1].as_secs_f64() * 1e3,
        v.len()
    )
}

/// A TCP connection from a chosen loopback address (attackers and the
/// measuring client get their own, as separate hosts would).
fn connect_from(src: [u8; 4], addr: &str) -> std::io::Result<TcpStream> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind(std::net::SocketAddr::from((src, 0)))?;
    let t = rt.block_on(sock.connect(addr.parse().map_err(std::io::Error::other)?))?;
    let s = t.into_std()?;
    s.set_nonblocking(false)?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// A minimal keep-alive HTTP/1.1 GET client on its own source address.
struct Reader {
    addr: String,
    conn: Option<BufReader<TcpStream>>,
}

impl Reader {
    fn get(&mut self, path: &str) -> Duration {
        let t = Instant::now();
        if self.conn.is_none() {
            self.conn = Some(BufReader::new(
                connect_from([127, 0, 0, 2], &self.addr).unwrap(),
            ));
        }
        let c = self.conn.as_mut().unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n");
        c.get_mut().write_all(req.as_bytes()).unwrap();
        let mut len = 0usize;
        let mut line = String::new();
        let mut first = true;
        loop {
            line.clear();
            if c.read_line(&mut line).unwrap() == 0 {
                panic!("connection closed");
            }
            if first {
                assert!(line.starts_with("HTTP/1.1 200"), "{line}");
                first = false;
            }
            let l = line.to_ascii_lowercase();
            if let Some(v) = l.strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
            if line == "\r\n" {
                break;
            }
        }
        let mut body = vec![0u8; len];
        c.read_exact(&mut body).unwrap();
        t.elapsed()
    }
}

fn read_status(s: &mut TcpStream) -> u16 {
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out)
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--serve") {
        serve_child(Path::new(&args[2]), Path::new(&args[3]));
        return;
    }
    let mib: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1024);
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    write_random_model(&model, &cfg(), 1).unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .arg("--serve")
        .arg(tmp.path().join("data"))
        .arg(&model)
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line.trim().to_string();
    let addr = url.trim_start_matches("http://").to_string();
    let pid = child.id();
    let blocks = list(&url);
    let meta = blocks[0].meta;
    let head_of = |n: &str| blocks.iter().find(|b| b.name == n).unwrap().hash;

    let mut reader = Reader {
        addr: addr.clone(),
        conn: None,
    };
    let mut sample = |path: &str| reader.get(path);
    for _ in 0..50 {
        sample("/heads");
    }
    let idle_heads: Vec<Duration> = (0..1000).map(|_| sample("/heads")).collect();
    let idle_chain: Vec<Duration> = (0..300).map(|_| sample("/chain/B/blocks")).collect();
    let hwm_idle = vm_hwm(pid);

    // The large upload: the first version of a big model's shared slot
    // (published by a listed key), a valid safetensors header then zeros,
    // under a bogus root: every byte is read, hashed and staged, then refused.
    let big = big_config(mib);
    let meta_json = web_node::chain::MetaPayload::new(
        "big",
        serde_json::from_slice(&web_node::model::random::config_json(&big).unwrap()).unwrap(),
        None,
    )
    .unwrap()
    .to_json();
    let (up, big_meta) = SeedUpload::build(
        BlockKind::Meta,
        "big",
        &meta_json,
        &UploadOptions::default(),
        &publisher(),
    )
    .unwrap();
    let r = ureq::post(&format!("{url}/upload_moe_experts"))
        .set("content-type", "application/json")
        .send_bytes(&serde_json::to_vec(&up).unwrap())
        .unwrap();
    assert_eq!(r.status(), 201);
    let (prefix, len) = slot_safetensors_prefix(&big, Slot::Shared);
    // A bogus root: the relay reads every byte and refuses it at the end.
    let block = BlockBuilder::slot(big_meta.hash, Slot::Shared, PayloadDtype::F32)
        .address("big")
        .timestamp_ms(1)
        .sign_for(len, BlockHash([0xEE; 32]), &publisher());
    let stop = Arc::new(AtomicBool::new(false));
    let evals = Arc::new(AtomicUsize::new(0));
    let jsons = Arc::new(AtomicUsize::new(0));
    let garbage = Arc::new(AtomicUsize::new(0));
    let cut = Arc::new(AtomicUsize::new(0));
    let mut attackers = Vec::new();
    // Evaluations: honest-looking new versions of a router, false claims.
    {
        let (url, stop, evals) = (url.clone(), stop.clone(), evals.clone());
        let head = head_of("layer0.router");
        attackers.push(std::thread::spawn(move || {
            let want: Vec<String> = Slot::Router { layer: 0 }
                .tensors(&cfg())
                .into_iter()
                .map(|t| t.name)
                .collect();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let t: Vec<_> = random_tensors(&cfg(), 100 + i)
                    .into_iter()
                    .filter(|(n, _, _)| want.contains(n))
                    .collect();
                let payload = safetensors_bytes(&t).unwrap();
                let mut seed = [7u8; 32];
                seed[..8].copy_from_slice(&i.to_le_bytes());
                let opts = UploadOptions {
                    parents: vec![head],
                    meta,
                    candidate_loss: Some(0.001),
                    ..Default::default()
                };
                let (up, _) = SeedUpload::build(
                    BlockKind::Router,
                    "layer0.router",
                    &payload,
                    &opts,
                    &SigningKey::from_bytes(&seed),
                )
                .unwrap();
                let r = ureq::post(&format!("{url}/upload_moe_experts"))
                    .set("content-type", "application/json")
                    .send_bytes(&serde_json::to_vec(&up).unwrap());
                if matches!(r, Err(ureq::Error::Status(422, _))) {
                    evals.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    // Maximum-size JSON uploads (bad signature).
    let (mut up, _) = SeedUpload::build(
        BlockKind::Router,
        "layer0.router",
        &safetensors_bytes(&[("x".into(), vec![4], vec![0.0; 4])]).unwrap(),
        &UploadOptions {
            meta,
            ..Default::default()
        },
        &SigningKey::from_bytes(&[3; 32]),
    )
    .unwrap();
    use base64::Engine as _;
    up.tensor_data_b64 =
        base64::engine::general_purpose::STANDARD.encode(vec![1u8; 12 * 1024 * 1024 - 4096]);
    let big_json = Arc::new(serde_json::to_vec(&up).unwrap());
    for _ in 0..8 {
        let (url, stop, jsons, body) = (url.clone(), stop.clone(), jsons.clone(), big_json.clone());
        attackers.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let _ = ureq::post(&format!("{url}/upload_moe_experts"))
                    .set("content-type", "application/json")
                    .send_bytes(&body);
                jsons.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // Slowloris: 200 connections from 4 addresses, one header byte per
    // second each.
    for k in 0..4u8 {
        let (addr, stop, cut) = (addr.clone(), stop.clone(), cut.clone());
        attackers.push(std::thread::spawn(move || {
            let mut conns: Vec<TcpStream> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                while conns.len() < 50 {
                    match connect_from([127, 0, 0, 10 + k], &addr) {
                        Ok(mut s) => {
                            let _ = s.write_all(b"GET /heads HTTP/1.1\r\nhost: x\r\n");
                            conns.push(s);
                        }
                        Err(_) => break,
                    }
                }
                let before = conns.len();
                conns.retain_mut(|s| s.write_all(b"x").is_ok());
                cut.fetch_add(before - conns.len(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_secs(1));
            }
        }));
    }
    // Garbage binary bodies.
    for _ in 0..2 {
        let (url, stop, garbage) = (url.clone(), stop.clone(), garbage.clone());
        attackers.push(std::thread::spawn(move || {
            let body = vec![0xABu8; 1 << 20];
            while !stop.load(Ordering::Relaxed) {
                let _ = ureq::post(&format!("{url}/blocks"))
                    .set("content-type", "application/octet-stream")
                    .send_bytes(&body);
                garbage.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let done = Arc::new(AtomicBool::new(false));
    let (a2, d2) = (addr.clone(), done.clone());
    let big = std::thread::spawn(move || {
        let t = Instant::now();
        let mut s = connect_from([127, 0, 0, 3], &a2).unwrap();
        let env = block.encode();
        write!(
            s,
            "POST /blocks HTTP/1.1\r\nhost: x\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            env.len() as u64 + len
        )
        .unwrap();
        s.write_all(&env).unwrap();
        s.write_all(&prefix).unwrap();
        let piece = vec![0u8; 1 << 20];
        let mut left = len - prefix.len() as u64;
        while left > 0 {
            let n = (piece.len() as u64).min(left) as usize;
            s.write_all(&piece[..n]).unwrap();
            left -= n as u64;
        }
        let st = read_status(&mut s);
        d2.store(true, Ordering::SeqCst);
        (st, t.elapsed())
    });
    std::thread::sleep(Duration::from_millis(500));
    let mut heads = Vec::new();
    let mut chain = Vec::new();
    while !done.load(Ordering::SeqCst) || heads.len() < 300 {
        heads.push(sample("/heads"));
        if heads.len() % 4 == 0 {
            chain.push(sample("/chain/B/blocks"));
        }
    }
    let (status, took) = big.join().unwrap();
    stop.store(true, Ordering::SeqCst);
    for a in attackers {
        a.join().unwrap();
    }
    let hwm = vm_hwm(pid);
    println!("relay under attack (child process, 2-core machine; sizes: {mib} MiB upload, 16 MiB JSON bodies)");
    println!("GET /heads idle:                   {}", stats(idle_heads));
    println!("GET /heads under attack:           {}", stats(heads));
    println!("GET /chain/B/blocks idle:          {}", stats(idle_chain));
    println!("GET /chain/B/blocks under attack:  {}", stats(chain));
    println!(
        "{mib} MiB upload: answered {status} after {:.1} s ({:.0} MB/s)",
        took.as_secs_f64(),
        len as f64 / 1e6 / took.as_secs_f64()
    );
    println!(
        "meanwhile: {} gate evaluations, {} max-size JSON uploads, {} garbage uploads, {} slowloris connections cut",
        evals.load(Ordering::Relaxed),
        jsons.load(Ordering::Relaxed),
        garbage.load(Ordering::Relaxed),
        cut.load(Ordering::Relaxed)
    );
    println!(
        "relay peak memory (VmHWM): {:.1} MiB idle, {:.1} MiB after the attacks",
        hwm_idle as f64 / 1048576.0,
        hwm as f64 / 1048576.0
    );
    let _ = child.kill();
    let _ = child.wait();
}
