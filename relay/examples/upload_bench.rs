//! Upload throughput of a large block through a real relay (in process, port
//! 0): binary `POST /blocks` of a new version of the `shared` slot, timed
//! from first byte to 201 (staging, full validation, durable store).
//! Printed beside baselines measured in the same run on the same bytes:
//! SHA-256 (sha2 crate) and write + fsync of a file.
//!
//! `cargo run -p relay --example upload_bench [-- MiB]`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::time::Instant;

use ed25519_dalek::SigningKey;
use sha2::Digest;
use test_support::relay::TestRelay;
use web_node::chain::BlockKind;
use web_node::model::random::{
    random_tensors, safetensors_bytes, small_config, write_random_model,
};
use web_node::model::Slot;
use web_node::net::api::{BlockInfo, SeedUpload, UploadOptions};

fn main() {
    let mib: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(64);
    // shared slot ~ 2 * vocab * hidden floats.
    let hidden = 512;
    let vocab = (mib * 1024 * 1024 / 4 / 2 / hidden).max(300);
    let cfg = small_config(vocab, hidden, 64, 1, 8, 2);
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    write_random_model(&model, &cfg, 1).unwrap();
    // `test_support`'s relay, in process, through the production accept
    // loop; genesis is most of its start.
    let t = Instant::now();
    let served = TestRelay::start_cfg(
        relay::server::ServeConfig {
            data_dir: tmp.path().join("data"),
            web_dir: None,
            model_dir: Some(model),
            database: None,
        },
        |s| s,
        relay::ServeOptions::default(),
    );
    let genesis_s = t.elapsed().as_secs_f64();
    let url = served.url.clone();

    let list: Vec<BlockInfo> = serde_json::from_reader(
        ureq::get(&format!("{url}/chain/B/blocks"))
            .call()
            .unwrap()
            .into_reader(),
    )
    .unwrap();
    let shared = list.iter().find(|b| b.name == "shared").unwrap();
    let want: Vec<String> = Slot::Shared
        .tensors(&cfg)
        .into_iter()
        .map(|t| t.name)
        .collect();
    let tensors: Vec<_> = random_tensors(&cfg, 2)
        .into_iter()
        .filter(|(n, _, _)| want.contains(n))
        .collect();
    let payload = safetensors_bytes(&tensors).unwrap();
    let opts = UploadOptions {
        parents: vec![shared.hash],
        meta: shared.meta,
        ..Default::default()
    };
    let (_, block) = SeedUpload::build(
        BlockKind::Shared,
        "shared",
        &payload,
        &opts,
        &SigningKey::from_bytes(&[1; 32]),
    )
    .unwrap();
    let mut body = block.encode();
    body.extend_from_slice(&payload);
    let mb = body.len() as f64 / 1e6;

    let t = Instant::now();
    let h = sha2::Sha256::digest(&body);
    let sha_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut f = std::fs::File::create(tmp.path().join("baseline.bin")).unwrap();
    f.write_all(&body).unwrap();
    f.sync_all().unwrap();
    let write_s = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let r = ureq::post(&format!("{url}/blocks"))
        .send_bytes(&body)
        .unwrap();
    let up_s = t.elapsed().as_secs_f64();
    assert_eq!(r.status(), 201);
    let t = Instant::now();
    let got = ureq::get(&format!("{url}/blocks/{}/payload", block.hash))
        .call()
        .unwrap();
    let mut back = Vec::new();
    std::io::Read::read_to_end(&mut got.into_reader(), &mut back).unwrap();
    let down_s = t.elapsed().as_secs_f64();
    assert_eq!(back, payload);

    println!(
        "block: shared slot, {mb:.1} MB (sha256 {})",
        hex::encode(&h[..4])
    );
    println!(
        "open + genesis ({} blocks: split, validate, store): {genesis_s:.2} s",
        list.len() + 1
    );
    println!(
        "POST /blocks (stage + validate + store): {:>8.1} MB/s  ({up_s:.3} s)",
        mb / up_s
    );
    println!(
        "GET payload:                              {:>8.1} MB/s  ({down_s:.3} s)",
        mb / down_s
    );
    println!(
        "baseline sha256 (sha2):                   {:>8.1} MB/s  ({sha_s:.3} s)",
        mb / sha_s
    );
    println!(
        "baseline write + fsync:                   {:>8.1} MB/s  ({write_s:.3} s)",
        mb / write_s
    );
}
