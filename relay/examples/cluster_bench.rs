//! Several relays on PostgreSQL beside the embedded store, in one run on
//! loopback (a throwaway PostgreSQL 15 with its default durability, started
//! from the machine's packages):
//!
//! * upload throughput: binary `POST /blocks` of new expert versions, one
//!   after another, to 201 (staging, validation, durable store, index);
//! * chain listing: `GET /chain/B/blocks` pages, requests per second;
//! * relay start: opening the store and loading the chain with every block;
//! * propagation: from relay 1's 201 to the block being served by relay 2
//!   on the same database (LISTEN/NOTIFY, catch-up, validation).
//!
//! `cargo run --release -p relay --example cluster_bench [-- UPLOADS [KiB]]`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use relay::server::ServeConfig;
use test_support::pg::TestPg;
use test_support::relay::TestRelay;
use web_node::chain::{BlockHash, BlockKind};
use web_node::model::random::{
    random_tensors, safetensors_bytes, small_config, write_random_model,
};
use web_node::model::{Config, Slot};
use web_node::net::api::{BlockInfo, SeedUpload, SlotHead, UploadOptions};

/// A relay in this process (`test_support`'s, through the production
/// accept loop, on a runtime of its own) and how long it took to open its
/// store and start listening.
fn serve(cfg: ServeConfig) -> (TestRelay, f64) {
    let t = Instant::now();
    let served = TestRelay::start_cfg(cfg, |s| s, relay::ServeOptions::default());
    (served, t.elapsed().as_secs_f64())
}

fn heads(url: &str) -> Vec<SlotHead> {
    serde_json::from_reader(
        ureq::get(&format!("{url}/heads"))
            .call()
            .unwrap()
            .into_reader(),
    )
    .unwrap()
}

fn meta_of(url: &str) -> BlockHash {
    let a: Vec<BlockInfo> = serde_json::from_reader(
        ureq::get(&format!("{url}/chain/A/blocks"))
            .call()
            .unwrap()
            .into_reader(),
    )
    .unwrap();
    a[0].hash
}

/// A new version of expert `i % experts` on top of its head at `url`:
/// (binary body, hash, payload bytes).
fn next_version(url: &str, cfg: &Config, i: u64, key: &SigningKey) -> (Vec<u8>, BlockHash, usize) {
    let slot = Slot::Expert {
        layer: (i / 8 % 2) as usize,
        expert: (i % 8) as usize,
    };
    let name = slot.to_string();
    let head = heads(url)
        .into_iter()
        .find(|h| h.name == name)
        .unwrap()
        .hash;
    let want: Vec<String> = slot.tensors(cfg).into_iter().map(|t| t.name).collect();
    let t: Vec<_> = random_tensors(cfg, 1000 + i)
        .into_iter()
        .filter(|(n, _, _)| want.contains(n))
        .collect();
    let payload = safetensors_bytes(&t).unwrap();
    let opts = UploadOptions {
        parents: vec![head],
        meta: Some(meta_of(url)),
        timestamp_ms: 1_700_000_000_000 + i,
        ..Default::default()
    };
    let (_, b) = SeedUpload::build(BlockKind::of_slot(slot), &name, &payload, &opts, key).unwrap();
    let mut body = b.encode();
    body.extend_from_slice(&payload);
    (body, b.hash, payload.len())
}

fn post(url: &str, body: &[u8]) {
    let r = ureq::post(&format!("{url}/blocks"))
        .set("content-type", "application/octet-stream")
        .send_bytes(body)
        .unwrap();
    assert_eq!(r.status(), 201);
}

struct Run {
    upload_blocks_s: f64,
    upload_mib_s: f64,
    list_req_s: f64,
    reopen_s: f64,
}

fn run_backend(model: &std::path::Path, cfg: &Config, db: Option<String>, uploads: u64) -> Run {
    let data = tempfile::tempdir().unwrap();
    let mk = |database: Option<String>| ServeConfig {
        data_dir: data.path().to_path_buf(),
        web_dir: None,
        model_dir: Some(model.to_path_buf()),
        database,
    };
    let (r, _) = serve(mk(db.clone()));
    let key = SigningKey::from_bytes(&[7; 32]);
    // Bodies built before the clock starts.
    let mut bytes = 0usize;
    let mut total = Duration::ZERO;
    for i in 0..uploads {
        let (body, _, n) = next_version(&r.url, cfg, i, &key);
        let t = Instant::now();
        post(&r.url, &body);
        total += t.elapsed();
        bytes += n;
    }
    let t = Instant::now();
    let mut n = 0u64;
    while t.elapsed() < Duration::from_secs(2) {
        let v: Vec<BlockInfo> = serde_json::from_reader(
            ureq::get(&format!("{}/chain/B/blocks?limit=1000", r.url))
                .call()
                .unwrap()
                .into_reader(),
        )
        .unwrap();
        assert!(v.len() as u64 >= uploads);
        n += 1;
    }
    let list_req_s = n as f64 / t.elapsed().as_secs_f64();
    // A second relay opening the store: time the open + load. The embedded
    // store is locked by the running relay: open a copy of its data dir.
    let copy = tempfile::tempdir().unwrap();
    let cfg2 = match db {
        Some(_) => mk(db),
        None => {
            let st = std::process::Command::new("cp")
                .arg("-a")
                .arg(format!("{}/.", data.path().display()))
                .arg(copy.path())
                .status()
                .unwrap();
            assert!(st.success());
            ServeConfig {
                data_dir: copy.path().to_path_buf(),
                ..mk(None)
            }
        }
    };
    let t = Instant::now();
    let again = relay::open_relay(&cfg2).unwrap();
    let reopen_s = t.elapsed().as_secs_f64();
    assert!(again.chain.try_read().unwrap().len() as u64 > uploads);
    Run {
        upload_blocks_s: uploads as f64 / total.as_secs_f64(),
        upload_mib_s: bytes as f64 / 1048576.0 / total.as_secs_f64(),
        list_req_s,
        reopen_s,
    }
}

fn main() {
    let uploads: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(64);
    let kib: usize = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    // Expert payload ~ 3 * hidden * intermediate floats.
    let hidden = 128;
    let inter = (kib * 1024 / 4 / 3 / hidden).max(8);
    let cfg = small_config(300, hidden, inter, 2, 8, 2);
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    write_random_model(&model, &cfg, 1).unwrap();
    let Some(pg) = TestPg::start_durable() else {
        println!("PostgreSQL is not installed: nothing to compare");
        return;
    };
    println!(
        "{} on loopback; {} uploads of ~{kib} KiB expert versions",
        pg.version(),
        uploads
    );
    let file = run_backend(&model, &cfg, None, uploads);
    let db = pg.create_db();
    let post_ = run_backend(&model, &cfg, Some(db), uploads);
    println!("| What | embedded (redb + files) | PostgreSQL |");
    println!("|---|---|---|");
    println!(
        "| Upload, blocks/s (sequential) | {:.1} | {:.1} |",
        file.upload_blocks_s, post_.upload_blocks_s
    );
    println!(
        "| Upload, MiB/s | {:.1} | {:.1} |",
        file.upload_mib_s, post_.upload_mib_s
    );
    println!(
        "| GET /chain/B/blocks (all {}+ blocks), req/s | {:.0} | {:.0} |",
        uploads, file.list_req_s, post_.list_req_s
    );
    println!(
        "| Open the store + load the chain, s | {:.3} | {:.3} |",
        file.reopen_s, post_.reopen_s
    );

    // Propagation between two relays on one database.
    let db = pg.create_db();
    let d1 = tempfile::tempdir().unwrap();
    let d2 = tempfile::tempdir().unwrap();
    let mk = |d: &std::path::Path| ServeConfig {
        data_dir: d.to_path_buf(),
        web_dir: None,
        model_dir: Some(model.clone()),
        database: Some(db.clone()),
    };
    let (r1, _) = serve(mk(d1.path()));
    let (r2, _) = serve(mk(d2.path()));
    let key = SigningKey::from_bytes(&[8; 32]);
    let mut lat: Vec<Duration> = Vec::new();
    for i in 0..uploads.min(32) {
        let (body, hash, _) = next_version(&r1.url, &cfg, i, &key);
        post(&r1.url, &body);
        let t = Instant::now();
        loop {
            let s = ureq::get(&format!("{}/blocks/{hash}", r2.url))
                .call()
                .map(|r| r.status())
                .unwrap_or(404);
            if s == 200 {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "relay 2 never listed {hash}"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        lat.push(t.elapsed());
    }
    lat.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let p = |q: f64| lat[((lat.len() - 1) as f64 * q).round() as usize];
    println!();
    println!(
        "Accepted on relay 1 -> served by relay 2 ({} blocks): median {:.1} ms, p95 {:.1} ms, max {:.1} ms",
        lat.len(),
        ms(p(0.5)),
        ms(p(0.95)),
        ms(*lat.last().unwrap())
    );
}
