//! Who may write: meta blocks only from the operator or listed keys; first
//! versions of slots only from the meta block's signer or keys it names;
//! every upload rate-limited per IP and per key before expensive work.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common::*;
use ed25519_dalek::SigningKey;
use relay::server::limits::Rate;
use web_node::chain::{BlockHash, ChainId};
use web_node::model::Slot;
use web_node::net::api::{codes, BlockInfo, SlotHead};

/// A model dir with config.json and tokenizer.json only: genesis is the meta
/// block alone, so every slot still waits for its first version.
fn meta_only(dir: &std::path::Path) -> std::path::PathBuf {
    let m = model_dir(dir);
    std::fs::remove_file(m.join("model.safetensors")).unwrap();
    m
}

struct Env {
    _tmp: tempfile::TempDir,
    data: std::path::PathBuf,
    relay: TestRelay,
}

fn env(model_has_weights: bool, listed: &[&SigningKey]) -> Env {
    let tmp = tempfile::tempdir().unwrap();
    let model = if model_has_weights {
        model_dir(tmp.path())
    } else {
        meta_only(tmp.path())
    };
    let data = tmp.path().join("data");
    let keys: Vec<[u8; 32]> = listed
        .iter()
        .map(|k| k.verifying_key().to_bytes())
        .collect();
    let relay = TestRelay::start_with(&data, Some(&model), None, |s| s.with_meta_keys(keys));
    Env {
        _tmp: tmp,
        data,
        relay,
    }
}

impl Env {
    fn url(&self) -> &str {
        &self.relay.url
    }
    fn stored(&self) -> (Vec<BlockInfo>, Vec<BlockInfo>, Vec<(String, u64)>) {
        (
            list(self.url(), "A"),
            list(self.url(), "B"),
            files(&self.data.join("blocks")),
        )
    }
    fn post_json(&self, body: &[u8]) -> Resp {
        post_json(&format!("{}/upload_moe_experts", self.url()), body)
    }
    fn post_bin(&self, body: &[u8]) -> Resp {
        post_bin(&format!("{}/blocks", self.url()), body)
    }
}

fn stranger() -> SigningKey {
    SigningKey::generate(&mut rand_core::OsRng)
}

#[test]
fn meta_blocks_from_unlisted_keys_get_403_and_nothing_is_stored() {
    let e = env(true, &[]);
    let before = e.stored();
    let genesis_meta = before.0[0].hash;
    let evil = stranger();
    // A new model...
    let (up, block, payload) = meta_upload("evil", &test_config(), vec![], &[], &evil);
    let err = e.post_json(&seed_json(&up)).error(403);
    assert_eq!(err.code, codes::FORBIDDEN);
    assert!(err.message.contains("--meta-keys"), "{}", err.message);
    assert_eq!(
        e.post_bin(&envelope_and_payload(&block, &payload))
            .error(403)
            .code,
        codes::FORBIDDEN
    );
    // ...and a new version of the page's model ("model", the genesis meta).
    let (up, block, payload) = meta_upload("model", &test_config(), vec![genesis_meta], &[], &evil);
    assert_eq!(
        e.post_json(&seed_json(&up)).error(403).code,
        codes::FORBIDDEN
    );
    assert_eq!(
        e.post_bin(&envelope_and_payload(&block, &payload))
            .error(403)
            .code,
        codes::FORBIDDEN
    );
    assert_eq!(e.stored(), before);
    assert!(files(&e.data.join("tmp")).is_empty());
}

#[test]
fn first_slot_versions_from_unlisted_keys_get_403_and_nothing_is_stored() {
    let e = env(false, &[]);
    let before = e.stored();
    assert!(before.1.is_empty(), "meta-only genesis");
    let meta = before.0[0].hash;
    let cfg = test_config();
    let evil = stranger();
    for slot in [
        Slot::Shared,
        Slot::Router { layer: 0 },
        Slot::Expert {
            layer: 1,
            expert: 2,
        },
    ] {
        let payload = slot_payload(&cfg, slot, 1);
        let (up, block) = upload(slot, &payload, vec![], Some(meta), &evil);
        let err = e.post_json(&seed_json(&up)).error(403);
        assert!(err.message.contains("first version"), "{}", err.message);
        let r = e.post_bin(&envelope_and_payload(&block, &payload));
        assert_eq!(r.error(403).code, codes::FORBIDDEN);
    }
    assert_eq!(e.stored(), before);
    // The operator (the meta block's signer) may.
    let op = operator_key(&e.data);
    let payload = slot_payload(&cfg, Slot::Shared, 1);
    let (up, _) = upload(Slot::Shared, &payload, vec![], Some(meta), &op);
    assert_eq!(e.post_json(&seed_json(&up)).status, 201);
}

#[test]
fn listed_keys_publish_models_and_their_named_writers_fill_the_slots() {
    let publisher = miner_key(40);
    let writer = miner_key(41);
    let other = miner_key(42);
    let e = env(true, &[&publisher]);
    let cfg = test_config();
    let (up, meta, _) = meta_upload("tiny", &cfg, vec![], &[&writer], &publisher);
    let r = e.post_json(&seed_json(&up));
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    // The publisher and the named writer may write first versions; others not.
    let s1 = Slot::Router { layer: 0 };
    let (up, _) = upload(
        s1,
        &slot_payload(&cfg, s1, 1),
        vec![],
        Some(meta.hash),
        &publisher,
    );
    assert_eq!(e.post_json(&seed_json(&up)).status, 201);
    let s2 = Slot::Router { layer: 1 };
    let p2 = slot_payload(&cfg, s2, 2);
    let (_, b2) = upload(s2, &p2, vec![], Some(meta.hash), &writer);
    assert_eq!(e.post_bin(&envelope_and_payload(&b2, &p2)).status, 201);
    let s3 = Slot::Shared;
    let before = e.stored();
    let (up, _) = upload(
        s3,
        &slot_payload(&cfg, s3, 3),
        vec![],
        Some(meta.hash),
        &other,
    );
    assert_eq!(
        e.post_json(&seed_json(&up)).error(403).code,
        codes::FORBIDDEN
    );
    assert_eq!(e.stored(), before);
    // A new version of an existing slot is open to anyone (the gate judges it).
    let (up, _) = upload(
        s2,
        &slot_payload(&cfg, s2, 4),
        vec![b2.hash],
        Some(meta.hash),
        &other,
    );
    assert_eq!(e.post_json(&seed_json(&up)).status, 201);
    let heads: Vec<SlotHead> = get(&format!("{}/heads", e.url())).json();
    assert!(heads.iter().any(|h| h.meta.is_none() && h.name == "tiny"));
    assert_eq!(list(e.url(), "A")[1].chain, ChainId::A);
}

#[test]
fn uploads_are_rate_limited_per_ip_before_the_body_and_per_key() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir(tmp.path());
    let data = tmp.path().join("data");
    // Limits of this test: 3 uploads per IP, then 2 per key (no refill).
    let relay = TestRelay::start_with(&data, Some(&model), None, |s| {
        s.with_options(|o| {
            o.ip_rate = Rate {
                burst: 3,
                per_minute: 0,
            };
            o.key_rate = Rate {
                burst: 2,
                per_minute: 0,
            };
        })
    });
    let url = &relay.url;
    let bin = format!("{url}/blocks");
    let key = miner_key(7);
    let (up, _, _) = meta_upload("m", &test_config(), vec![], &[], &key);
    // Key limit: two tokens, then 429 (403 while tokens last: key not listed).
    assert_eq!(
        post_json(&format!("{url}/upload_moe_experts"), &seed_json(&up)).status,
        403
    );
    assert_eq!(
        post_json(&format!("{url}/upload_moe_experts"), &seed_json(&up)).status,
        403
    );
    let r = post_json(&format!("{url}/upload_moe_experts"), &seed_json(&up));
    assert_eq!(r.error(429).code, codes::RATE_LIMITED);
    assert!(r.retry_after.is_some());
    // IP limit: the fourth request from 127.0.0.1 is refused before its body
    // (a 2 GiB Content-Length with no body sent gets its answer at once).
    let (st, text) = raw(
        &relay.addr(),
        b"POST /blocks HTTP/1.1\r\nhost: x\r\ncontent-type: application/octet-stream\r\ncontent-length: 2000000000\r\n\r\n",
    );
    assert_eq!(st, 429, "{text}");
    assert!(text.to_ascii_lowercase().contains("retry-after"), "{text}");
    assert_eq!(post_bin(&bin, b"AIBK").error(429).code, codes::RATE_LIMITED);
    // Another address has its own bucket.
    let mut s = connect_from("127.0.0.9".parse().unwrap(), &relay.addr());
    use std::io::{Read, Write};
    s.write_all(b"POST /blocks HTTP/1.1\r\nhost: x\r\ncontent-type: application/octet-stream\r\ncontent-length: 4\r\nconnection: close\r\n\r\nxxxx")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(list(url, "A").len() == 1 && files(&data.join("tmp")).is_empty());
    let _ = BlockHash::default();
}

#[test]
fn rate_tables_stay_bounded_through_1000_fresh_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir(tmp.path());
    let data = tmp.path().join("data");
    // Limit of this test: each rate table holds at most 256 entries.
    const CAPACITY: usize = 256;
    let relay = TestRelay::start_with(&data, Some(&model), None, |s| {
        s.with_options(|o| o.rate_table_capacity = CAPACITY)
    });
    let url = relay.url.clone();
    let before = (list(&url, "A"), list(&url, "B"));
    let mut agent = ureq::AgentBuilder::new().build();
    for i in 0..1000u32 {
        let mut seed = [0u8; 32];
        seed[..4].copy_from_slice(&i.to_le_bytes());
        seed[31] = 0xA5;
        let key = SigningKey::from_bytes(&seed);
        let (up, _, _) = meta_upload("flood", &test_config(), vec![], &[], &key);
        let r = to_resp(
            agent
                .post(&format!("{url}/upload_moe_experts"))
                .set("content-type", "application/json")
                .send_bytes(&seed_json(&up)),
        );
        assert_eq!(r.status, 403, "key {i}");
        let (ips, keys) = relay.state.rate_table_sizes();
        assert!(keys <= CAPACITY && ips <= CAPACITY, "{keys} {ips}");
        if i % 100 == 99 {
            agent = ureq::AgentBuilder::new().build();
        }
    }
    assert_eq!((list(&url, "A"), list(&url, "B")), before);
}
