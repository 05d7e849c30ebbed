//! Random and mutated inputs never panic the relay, never get stored, and
//! always get a JSON 4xx error.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::OnceLock;

use common::*;
use proptest::prelude::*;
use web_node::chain::Block;
use web_node::model::Slot;
use web_node::net::api::{ApiError, SeedUpload};

struct Fixture {
    _tmp: tempfile::TempDir,
    relay: TestRelay,
    /// A valid (not yet uploaded) block: seed body and binary body.
    seed: SeedUpload,
    binary: Vec<u8>,
    count: usize,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let model = model_dir(tmp.path());
        let relay = TestRelay::start(&tmp.path().join("data"), Some(&model), None);
        let url = relay.url.clone();
        let meta = list(&url, "A")[0].hash;
        let b = list(&url, "B");
        let head = b.iter().find(|i| i.name == "layer1.router").unwrap().hash;
        let slot = Slot::Router { layer: 1 };
        let payload = slot_payload(&test_config(), slot, 3);
        let (seed, block): (SeedUpload, Block) =
            upload(slot, &payload, vec![head], Some(meta), &miner_key(1));
        let binary = envelope_and_payload(&block, &payload);
        Fixture {
            _tmp: tmp,
            relay,
            seed,
            binary,
            count: 1 + b.len(),
        }
    })
}

fn assert_refused(r: &Resp) {
    assert!(
        (400..500).contains(&r.status),
        "status {}: {}",
        r.status,
        String::from_utf8_lossy(&r.body)
    );
    let e: ApiError = r.json();
    assert_eq!(e.status(), r.status);
}

fn unchanged(f: &Fixture) {
    assert_eq!(
        list(&f.relay.url, "A").len() + list(&f.relay.url, "B").len(),
        f.count
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn random_binary_bodies_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let f = fixture();
        assert_refused(&post_bin(&format!("{}/blocks", f.relay.url), &bytes));
        unchanged(f);
    }

    #[test]
    fn mutated_binary_uploads_are_refused(pos in any::<prop::sample::Index>(), bit in 0u8..8) {
        let f = fixture();
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
        prop_assert!(st != 0 && st != 500, "{path}: {text}");
        prop_assert!(!text.contains("[package]"), "{path}");
    }
}
