//! Chain verification throughput beside `openssl dgst -sha256` and
//! `sha256sum` on the same 64 MiB, plus ed25519 verifications per second.
//!
//! Run: `cargo bench -p web-node --bench chain_verify`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use web_node::chain::{check_payload_integrity, validate_block, Dag, MetaPayload};
use web_node::model::checkpoint::{Signer, SlotPayload};
use web_node::model::Slot;

const MIB: f64 = 1024.0 * 1024.0;

fn best_of<F: FnMut()>(n: usize, mut f: F) -> Duration {
    (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .min()
        .unwrap()
}

fn external(cmd: &str, args: &[&str], path: &std::path::Path) -> Option<Duration> {
    let mut best: Option<Duration> = None;
    for _ in 0..3 {
        let t = Instant::now();
        let out = Command::new(cmd).args(args).arg(path).output().ok()?;
        if !out.status.success() {
            return None;
        }
        let d = t.elapsed();
        best = Some(best.map_or(d, |b| b.min(d)));
    }
    best
}

fn main() {
    // An expert block of ~64 MiB: hidden 1024, intermediate 5461, F32.
    let cfg_json = serde_json::json!({
        "vocab_size": 32, "hidden_size": 1024, "intermediate_size": 5461, "num_hidden_layers": 1,
        "num_attention_heads": 8, "num_key_value_heads": 8, "num_experts_per_tok": 2,
        "num_local_experts": 2
    });
    let cfg = web_node::model::Config::from_value(&cfg_json).unwrap();
    let slot = Slot::Expert {
        layer: 0,
        expert: 0,
    };
    let datas: Vec<(String, Vec<usize>, Vec<u8>)> = slot
        .tensors(&cfg)
        .into_iter()
        .enumerate()
        .map(|(k, t)| {
            let n: usize = t.shape.iter().product();
            let mut x = 0x9e37_79b9_u32.wrapping_add(k as u32);
            let data = (0..n)
                .flat_map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    (x as f32 / u32::MAX as f32).to_le_bytes()
                })
                .collect();
            (t.name, t.shape, data)
        })
        .collect();
    let views: Vec<_> = datas
        .iter()
        .map(|(n, s, d)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, s.clone(), d).unwrap(),
            )
        })
        .collect();
    let payload = safetensors::serialize(views, &None).unwrap();
    drop(datas);
    let mb = payload.len() as f64 / MIB;

    let key = SigningKey::from_bytes(&[7; 32]);
    let signer = Signer {
        key: &key,
        address: "bench".into(),
        timestamp_ms: 0,
        chunk_size: 256 * 1024,
    };
    let mut dag = Dag::new();
    let (meta, mp) = signer
        .meta_block(&MetaPayload::new("bench", cfg_json, None).unwrap(), None)
        .unwrap();
    dag.insert(&validate_block(&meta, &mp, &dag).unwrap());
    let sp = SlotPayload {
        slot,
        dtype: web_node::chain::PayloadDtype::F32,
        tensors: vec![],
        bytes: payload,
    };
    let (block, payload) = signer.slot_block(meta.hash, &sp, vec![], Some(1.0));

    let chunks = best_of(5, || {
        check_payload_integrity(&block.header, &payload).unwrap()
    });
    let full = best_of(5, || {
        validate_block(&block, &payload, &dag).unwrap();
    });

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("payload.bin");
    std::fs::write(&path, &payload).unwrap();
    let openssl = external("openssl", &["dgst", "-sha256"], &path);
    let sha256sum = external("sha256sum", &[], &path);

    let n = 2000;
    let t = Instant::now();
    for _ in 0..n {
        block.verify_signature().unwrap();
    }
    let sig_rate = n as f64 / t.elapsed().as_secs_f64();

    let rate = |d: Duration| mb / d.as_secs_f64();
    println!("chain verification over a {mb:.1} MiB expert payload (best of runs, this machine):");
    println!(
        "  {:<58} {:>8.0} MiB/s",
        "chunk hashes + payload root (sha2 crate)",
        rate(chunks)
    );
    println!(
        "  {:<58} {:>8.0} MiB/s",
        "full validate_block (signature, DAG, chunks, tensors)",
        rate(full)
    );
    match openssl {
        Some(d) => println!(
            "  {:<58} {:>8.0} MiB/s",
            "openssl dgst -sha256, same bytes (incl. process start)",
            rate(d)
        ),
        None => println!("  openssl dgst -sha256: not available"),
    }
    match sha256sum {
        Some(d) => println!(
            "  {:<58} {:>8.0} MiB/s",
            "coreutils sha256sum, same bytes",
            rate(d)
        ),
        None => println!("  sha256sum: not available"),
    }
    println!(
        "  {:<58} {:>8.0} /s",
        "ed25519 signature verifications", sig_rate
    );
}
