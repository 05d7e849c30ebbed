//! Random and mutated inputs never panic the relay, never get stored, and
//! always get a JSON 4xx error whose code matches its status. After each
//! case the listings, the block files and the staging dir are unchanged.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Mutex, MutexGuard, OnceLock};

use crate::common::*;
use proptest::prelude::*;
use web_node::chain::Block;
use web_node::model::Slot;
use web_node::net::api::{ApiError, SeedUpload};

struct Fixture {
    _tmp: tempfile::TempDir,
    data: std::path::PathBuf,
    relay: TestRelay,
    /// Listings and block files before any case.
    before: (
        Vec<web_node::net::api::BlockInfo>,
        Vec<web_node::net::api::BlockInfo>,
        Vec<(String, u64)>,
    ),
    /// Cases run one at a time (the staging dir is checked after each).
    lock: Mutex<()>,
    /// A valid (not yet uploaded) block: seed body and binary body.
    seed: SeedUpload,
    binary: Vec<u8>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let model = model_dir(tmp.path());
        let data = tmp.path().join("data");
        let relay = TestRelay::start(&data, Some(&model), None);
        let url = relay.url.clone();
        let meta = list(&url, "A")[0].hash;
        let b = list(&url, "B");
        let head = b.iter().find(|i| i.name == "layer1.router").unwrap().hash;
        let slot = Slot::Router { layer: 1 };
        let payload = slot_payload(&test_config(), slot, 3);
        let (seed, block): (SeedUpload, Block) =
            upload(slot, &payload, vec![head], Some(meta), &miner_key(1));
        let binary = envelope_and_payload(&block, &payload);
        let before = (list(&url, "A"), b, files(&data.join("blocks")));
        Fixture {
            _tmp: tmp,
            data,
            relay,
            before,
            lock: Mutex::new(()),
            seed,
            binary,
        }
    })
}

fn serial(f: &Fixture) -> MutexGuard<'_, ()> {
    f.lock.lock().unwrap_or_else(|e| e.into_inner())
}

/// A JSON 4xx error with a known code for its status.
fn assert_refused(r: &Resp) {
    assert!(
        (400..500).contains(&r.status),
        "status {}: {}",
        r.status,
        String::from_utf8_lossy(&r.body)
    );
    assert!(
        r.content_type.starts_with("application/json"),
        "{}",
        r.content_type
    );
    let e: ApiError = r.json();
    assert_eq!(e.status(), r.status, "{e:?}");
    assert!(!e.message.is_empty());
}

/// Nothing stored: listings, block files and the staging dir as before.
fn unchanged(f: &Fixture) {
    let url = &f.relay.url;
    assert_eq!(list(url, "A"), f.before.0);
    assert_eq!(list(url, "B"), f.before.1);
    assert_eq!(files(&f.data.join("blocks")), f.before.2);
    assert!(files(&f.data.join("tmp")).is_empty());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn random_binary_bodies_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let f = fixture();
        let _one = serial(f);
        assert_refused(&post_bin(&format!("{}/blocks", f.relay.url), &bytes));
        unchanged(f);
    }

    #[test]
    fn mutated_binary_uploads_are_refused(pos in any::<prop::sample::Index>(), bit in 0u8..8) {
        let f = fixture();
        let _one = serial(f);
        let mut body = f.binary.clone();
        let i = pos.index(body.len());
        body[i] ^= 1 << bit;
        assert_refused(&post_bin(&format!("{}/blocks", f.relay.url), &body));
        unchanged(f);
    }

    #[test]
    fn mutated_seed_fields_are_refused(
        which in 0usize..8,
        s in "[ -~]{0,80}",
        loss in proptest::num::f32::ANY,
    ) {
        let f = fixture();
        let _one = serial(f);
        let mut up = f.seed.clone();
        match which {
            0 => up.expert_name = s,
            1 => up.block_type = s,
            2 => up.depends_on = vec![s],
            3 => up.tensor_data_b64 = s,
            4 => up.miner_pub = s,
            5 => up.payload_sig = s,
            6 => up.meta_hash = Some(s),
            _ => up.candidate_loss = Some(if loss == 1.25 { 0.0 } else { loss }),
        }
        prop_assume!(up != f.seed);
        let r = post_json(&format!("{}/upload_moe_experts", f.relay.url), &serde_json::to_vec(&up).unwrap());
        assert_refused(&r);
        unchanged(f);
    }

    #[test]
    fn random_paths_never_escape(path in "/[a-zA-Z0-9%./_-]{0,60}") {
        let f = fixture();
        let (st, text) = raw(&f.relay.addr(), format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes());
        prop_assert!(st == 200 || (400..500).contains(&st), "{path}: {text}");
        if st != 200 {
            prop_assert!(text.contains("\"code\":") && text.contains("application/json"), "{path}: {text}");
        }
        prop_assert!(!text.contains("[package]"), "{path}");
    }
}
