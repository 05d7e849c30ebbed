//! Readers never wait on writers: while a slow gate evaluation and a large
//! binary upload are in progress, GET /heads and GET /chain/B/blocks answer
//! fast; two uploads racing for one slot end with one 201 and one 409.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use web_node::chain::BlockHash;
use web_node::model::Slot;
use web_node::net::api::{codes, SlotHead};

/// A gate that takes `delay` to decide (an eval run) and accepts.
struct SlowGate {
    delay: Duration,
    running: Arc<AtomicUsize>,
}

impl relay::Gate for SlowGate {
    fn check(&self, _ctx: &relay::GateContext<'_>) -> Result<(), relay::Rejection> {
        self.running.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(self.delay);
        self.running.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }
}

fn head_of(url: &str, name: &str) -> BlockHash {
    let heads: Vec<SlotHead> = get(&format!("{url}/heads")).json();
    heads.into_iter().find(|h| h.name == name).unwrap().hash
}

/// Size of the large upload streamed during the latency test. The benchmark
/// (relay/examples/attack_bench.rs) streams a full 1 GiB; 256 MiB keeps this
/// test to a few seconds on two cores.
const BIG_MIB: u64 = 256;

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]
}

#[test]
fn readers_answer_fast_during_slow_evaluation_and_large_upload() {
    let tmp = tempfile::tempdir().unwrap();
    // A model whose shared slot is BIG_MIB, genesis without weights.
    let cfg = big_config(BIG_MIB);
    let model = meta_only_dir(tmp.path(), &cfg);
    let data = tmp.path().join("data");
    let running = Arc::new(AtomicUsize::new(0));
    let r2 = running.clone();
    let relay = TestRelay::start_with(&data, Some(&model), None, move |s| {
        s.with_gate(Arc::new(SlowGate {
            delay: Duration::from_secs(4),
            running: r2,
        }))
        .with_options(|o| o.eval_concurrency = 2)
    });
    let url = relay.url.clone();
    let meta = list(&url, "A")[0].hash;
    let op = operator_key(&data);
    // A router's first version (the operator's), then a new version that the
    // slow gate evaluates.
    let slot = Slot::Router { layer: 0 };
    let (up, first) = upload(slot, &slot_payload(&cfg, slot, 1), vec![], Some(meta), &op);
    assert_eq!(
        post_json(&format!("{url}/upload_moe_experts"), &seed_json(&up)).status,
        201
    );
    let (up, _) = upload(
        slot,
        &slot_payload(&cfg, slot, 2),
        vec![first.hash],
        Some(meta),
        &miner_key(1),
    );
    let u2 = url.clone();
    let eval = std::thread::spawn(move || {
        post_json(&format!("{u2}/upload_moe_experts"), &seed_json(&up)).status
    });
    // The shared slot's first version streaming in.
    let big = streamed_slot(&cfg, Slot::Shared, meta, vec![], &op, 1);
    assert!(big.len >= BIG_MIB << 20);
    let addr = relay.addr();
    // Paced (1 MiB per 10 ms at most) so that it lasts the whole measurement.
    let upload_thread =
        std::thread::spawn(move || send_streamed(&addr, &big, Duration::from_millis(10)));
    let deadline = Instant::now() + Duration::from_secs(20);
    while running.load(Ordering::SeqCst) == 0
        || files(&data.join("tmp")).iter().map(|f| f.1).sum::<u64>() < 8 << 20
    {
        assert!(Instant::now() < deadline, "eval or upload never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    // 100 requests of each while both are in progress.
    let agent = ureq::AgentBuilder::new().build();
    let mut heads = Vec::new();
    let mut chain = Vec::new();
    for _ in 0..100 {
        let t = Instant::now();
        let r = agent.get(&format!("{url}/heads")).call().unwrap();
        let _ = r.into_string().unwrap();
        heads.push(t.elapsed());
        let t = Instant::now();
        let r = agent.get(&format!("{url}/chain/B/blocks")).call().unwrap();
        let _ = r.into_string().unwrap();
        chain.push(t.elapsed());
    }
    let busy_after = running.load(Ordering::SeqCst);
    let staged_after: u64 = files(&data.join("tmp")).iter().map(|f| f.1).sum();
    let (h99, c99) = (percentile(&mut heads, 0.99), percentile(&mut chain, 0.99));
    eprintln!(
        "during eval + {BIG_MIB} MiB upload: /heads p99 {h99:?}, /chain/B/blocks p99 {c99:?}"
    );
    assert_eq!(
        busy_after, 1,
        "the evaluation was still running while we measured"
    );
    assert!(
        staged_after > 0,
        "the upload was still streaming while we measured"
    );
    assert!(h99 < Duration::from_millis(50), "/heads p99 {h99:?}");
    assert!(
        c99 < Duration::from_millis(50),
        "/chain/B/blocks p99 {c99:?}"
    );
    let status = upload_thread.join().unwrap();
    assert!(
        status.contains("400"),
        "bogus root refused at the end: {status}"
    );
    assert_eq!(eval.join().unwrap(), 201);
    assert!(files(&data.join("tmp")).is_empty());
}

#[test]
fn two_uploads_racing_for_one_slot_one_wins_one_gets_409() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir(tmp.path());
    let data = tmp.path().join("data");
    let running = Arc::new(AtomicUsize::new(0));
    let r2 = running.clone();
    // Both are admitted on the same head before either finishes its gate.
    let relay = TestRelay::start_with(&data, Some(&model), None, move |s| {
        s.with_gate(Arc::new(SlowGate {
            delay: Duration::from_millis(500),
            running: r2,
        }))
        .with_options(|o| o.eval_concurrency = 2)
    });
    let url = relay.url.clone();
    let cfg = test_config();
    let meta = list(&url, "A")[0].hash;
    let slot = Slot::Expert {
        layer: 1,
        expert: 1,
    };
    let head = head_of(&url, "layer1.expert1");
    let mut threads = Vec::new();
    for (i, seed) in [(0u8, 11u64), (1, 12)] {
        let payload = slot_payload(&cfg, slot, seed);
        let (up, block) = upload(slot, &payload, vec![head], Some(meta), &miner_key(20 + i));
        let u = url.clone();
        threads.push(std::thread::spawn(move || {
            let r = if i == 0 {
                post_json(&format!("{u}/upload_moe_experts"), &seed_json(&up))
            } else {
                post_bin(
                    &format!("{u}/blocks"),
                    &envelope_and_payload(&block, &payload),
                )
            };
            (r.status, r.body, block.hash)
        }));
    }
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let won: Vec<_> = results.iter().filter(|r| r.0 == 201).collect();
    let lost: Vec<_> = results.iter().filter(|r| r.0 == 409).collect();
    assert_eq!((won.len(), lost.len()), (1, 1), "{results:?}");
    let err: web_node::net::api::ApiError = serde_json::from_slice(&lost[0].1).unwrap();
    assert_eq!(err.code, codes::NOT_HEAD, "{}", err.message);
    assert!(err.message.contains("moved"), "{}", err.message);
    // Heads agree everywhere and the loser left nothing behind.
    assert_eq!(head_of(&url, "layer1.expert1"), won[0].2);
    let b = list(&url, "B");
    assert!(b.iter().all(|i| i.hash != lost[0].2));
    let heads: Vec<SlotHead> = get(&format!("{url}/heads")).json();
    for i in &b {
        let is_head = heads.iter().any(|h| h.hash == i.hash);
        assert_eq!(i.is_head, is_head, "{}", i.name);
    }
    assert!(get(&format!("{url}/blocks/{}", lost[0].2)).status == 404);
    let on_disk = files(&data.join("blocks"));
    assert!(!on_disk
        .iter()
        .any(|(p, _)| p.ends_with(&lost[0].2.to_hex())));
    assert!(files(&data.join("tmp")).is_empty());
    assert_eq!(fetch_and_validate_all(&url), b.len() + 1);
}
