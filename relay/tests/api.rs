//! REST API against a real relay on 127.0.0.1:0.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use common::*;
use web_node::chain::{chunk_hashes, Block, BlockHash, ChainId};
use web_node::model::Slot;
use web_node::net::api::{codes, BlockInfo, ChunkList, HeadInfo, SeedUpload};

struct Env {
    _tmp: tempfile::TempDir,
    data: std::path::PathBuf,
    relay: TestRelay,
}

fn env() -> Env {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir(tmp.path());
    let web = tmp.path().join("web");
    std::fs::create_dir_all(web.join("sub")).unwrap();
    std::fs::write(web.join("index.html"), "<h1>AI-Block</h1>").unwrap();
    std::fs::write(web.join("sub/app.js"), "console.log(1)").unwrap();
    std::fs::write(tmp.path().join("secret.txt"), "top secret").unwrap();
    let data = tmp.path().join("data");
    let relay = TestRelay::start(&data, Some(&model), Some(&web));
    Env {
        _tmp: tmp,
        data,
        relay,
    }
}

fn meta_hash(url: &str) -> BlockHash {
    list(url, "A")[0].hash
}

fn head_of(url: &str, name: &str) -> BlockHash {
    let heads: Vec<HeadInfo> = get(&format!("{url}/heads")).json();
    heads
        .into_iter()
        .find(|h| h.name == name && h.meta.is_some())
        .unwrap()
        .hash
}

#[test]
fn genesis_lists_every_slot_and_serves_blocks() {
    let e = env();
    let url = &e.relay.url;
    let cfg = test_config();
    let a = list(url, "A");
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].name, "model");
    assert!(a[0].is_head);
    let b = list(url, "B");
    assert_eq!(b.len(), Slot::all(&cfg).len());
    assert!(b
        .iter()
        .all(|i| i.is_head && i.meta == Some(a[0].hash) && i.address == "operator"));
    assert_eq!(list(url, "a").len(), 1, "chain ids are case-insensitive");
    get(&format!("{url}/chain/C/blocks")).error(404);

    // Info, envelope (query and Accept), payload, chunks.
    let info = &b[3];
    let got: BlockInfo = get(&format!("{url}/blocks/{}", info.hash)).json();
    assert_eq!(&got, info);
    let env1 = get(&format!("{url}/blocks/{}?format=bin", info.hash));
    assert_eq!(env1.content_type, "application/octet-stream");
    let block = Block::decode(&env1.body).unwrap();
    block.check_hash(&info.hash).unwrap();
    assert_eq!(got.to_block().unwrap(), block);
    let env2 = get_with(
        &format!("{url}/blocks/{}", info.hash),
        "accept",
        "application/octet-stream",
    );
    assert_eq!(env2.body, env1.body);
    let payload = get(&format!("{url}/blocks/{}/payload", info.hash)).body;
    assert_eq!(payload.len() as u64, info.payload_len);
    let chunks: ChunkList = get(&format!("{url}/blocks/{}/chunks", info.hash)).json();
    chunks.check().unwrap();
    assert_eq!(chunks.chunks, chunk_hashes(&payload, info.chunk_size));

    // The shared slot is the largest: check ranges on it.
    let shared = b.iter().find(|i| i.name == "shared").unwrap();
    let full = get(&format!("{url}/blocks/{}/payload", shared.hash)).body;
    let len = full.len();
    assert!(len > 1000);
    let p = format!("{url}/blocks/{}/payload", shared.hash);
    let r = get_with(&p, "range", "bytes=100-199");
    assert_eq!(r.status, 206);
    assert_eq!(r.body, full[100..200]);
    assert_eq!(
        r.content_range.as_deref(),
        Some(format!("bytes 100-199/{len}").as_str())
    );
    let r = get_with(&p, "range", &format!("bytes={}-", len - 10));
    assert_eq!((r.status, &r.body[..]), (206, &full[len - 10..]));
    let r = get_with(&p, "range", "bytes=-7");
    assert_eq!((r.status, &r.body[..]), (206, &full[len - 7..]));
    let r = get_with(&p, "range", &format!("bytes=5-{}", len * 2));
    assert_eq!((r.status, &r.body[..]), (206, &full[5..]));
    let r = get_with(&p, "range", &format!("bytes={len}-"));
    r.error(416);
    assert_eq!(
        r.content_range.as_deref(),
        Some(format!("bytes */{len}").as_str())
    );
    let r = get_with(&p, "range", "bytes=0-1,5-6");
    assert_eq!(
        (r.status, r.body.len()),
        (200, len),
        "multiple ranges: whole payload"
    );

    // Static files.
    let r = get(&format!("{url}/"));
    assert_eq!((r.status, &r.body[..]), (200, &b"<h1>AI-Block</h1>"[..]));
    assert!(r.content_type.starts_with("text/html"));
    let r = get(&format!("{url}/sub/app.js"));
    assert_eq!(r.status, 200);
    assert!(r.content_type.starts_with("text/javascript"));
    get(&format!("{url}/nope.html")).error(404);
}

#[test]
fn uploads_via_seed_json_and_binary_become_heads() {
    let e = env();
    let url = &e.relay.url;
    let cfg = test_config();
    let meta = meta_hash(url);
    let key = miner_key(1);
    let slot = Slot::Expert {
        layer: 1,
        expert: 3,
    };
    let old = head_of(url, "layer1.expert3");

    // Seed JSON body, meta_hash omitted: the relay uses its latest meta.
    let payload = slot_payload(&cfg, slot, 100);
    let (mut up, _) = upload(slot, &payload, vec![old], Some(meta), &key);
    up.meta_hash = None;
    let r = post_json(
        &format!("{url}/upload_moe_experts"),
        &serde_json::to_vec(&up).unwrap(),
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let info: BlockInfo = r.json();
    assert!(info.is_head);
    assert_eq!(info.meta, Some(meta));
    assert_eq!(info.candidate_loss, Some(1.25));
    assert_eq!(info.miner, hex::encode(key.verifying_key().to_bytes()));
    assert_eq!(head_of(url, "layer1.expert3"), info.hash);
    assert_eq!(
        get(&format!("{url}/blocks/{}/payload", info.hash)).body,
        payload
    );
    let b = list(url, "B");
    assert!(!b.iter().find(|i| i.hash == old).unwrap().is_head);
    assert_eq!(b.last().unwrap().hash, info.hash);

    // Binary upload of the next version.
    let payload2 = slot_payload(&cfg, slot, 101);
    let (_, block) = upload(slot, &payload2, vec![info.hash], Some(meta), &key);
    let r = post_bin(
        &format!("{url}/blocks"),
        &envelope_and_payload(&block, &payload2),
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let info2: BlockInfo = r.json();
    assert_eq!(info2.hash, block.hash);
    assert_eq!(head_of(url, "layer1.expert3"), block.hash);
    assert_eq!(
        get(&format!("{url}/blocks/{}/payload", block.hash)).body,
        payload2
    );
    assert_eq!(fetch_and_validate_all(url), 1 + Slot::all(&cfg).len() + 2);
    // Nothing left in staging.
    assert!(files(&e.data.join("tmp")).is_empty());
}

/// Every bad input: its JSON error and status, and nothing stored.
#[test]
fn bad_inputs_get_json_errors_and_store_nothing() {
    let e = env();
    let url = &e.relay.url;
    let cfg = test_config();
    let meta = meta_hash(url);
    let key = miner_key(1);
    let other = miner_key(2);
    let slot = Slot::Expert {
        layer: 0,
        expert: 5,
    };
    let head = head_of(url, "layer0.expert5");
    let payload = slot_payload(&cfg, slot, 200);
    let json_url = format!("{url}/upload_moe_experts");
    let bin_url = format!("{url}/blocks");
    let snapshot = || {
        (
            list(url, "A"),
            list(url, "B"),
            files(&e.data.join("blocks")),
        )
    };
    let before = snapshot();
    let post_up = |up: &SeedUpload| post_json(&json_url, &serde_json::to_vec(up).unwrap());
    let (good, good_block) = upload(slot, &payload, vec![head], Some(meta), &key);

    // Malformed JSON, missing fields, bad base64.
    assert_eq!(
        post_json(&json_url, b"{not json").error(400).code,
        codes::MALFORMED
    );
    assert_eq!(
        post_json(&json_url, br#"{"expert_name":"layer0.expert5"}"#)
            .error(400)
            .code,
        codes::MALFORMED
    );
    let mut up = good.clone();
    up.tensor_data_b64 = "!!!not base64".into();
    assert_eq!(post_up(&up).error(400).code, codes::MALFORMED);
    // Bad signature: signed by another key over the same header.
    let mut up = good.clone();
    let forged = Block::sign(good_block.header.clone(), &other);
    up.payload_sig = hex::encode(forged.signature);
    assert_eq!(post_up(&up).error(401).code, codes::BAD_SIGNATURE);
    // Wrong miner_pub: signed by `key`, claims `other`.
    let mut up = good.clone();
    up.miner_pub = hex::encode(other.verifying_key().to_bytes());
    assert_eq!(post_up(&up).error(401).code, codes::BAD_SIGNATURE);
    // A miner_pub that is no ed25519 point.
    let (mut up, _) = upload(slot, &payload, vec![head], Some(meta), &key);
    up.miner_pub = "ff".repeat(32);
    let st = post_up(&up).status;
    assert!(st == 401 || st == 403, "{st}");
    // Tampered candidate_loss after signing.
    let mut up = good.clone();
    up.candidate_loss = Some(0.01);
    assert_eq!(post_up(&up).error(401).code, codes::BAD_SIGNATURE);
    // Unknown meta, unknown parent, meta that is a chain-B block.
    let (up, _) = upload(slot, &payload, vec![head], Some(BlockHash([9; 32])), &key);
    assert!(post_up(&up).error(400).message.contains("unknown"));
    let (up, _) = upload(
        slot,
        &payload,
        vec![head, BlockHash([8; 32])],
        Some(meta),
        &key,
    );
    assert!(post_up(&up).error(400).message.contains("unknown"));
    let (up, _) = upload(slot, &payload, vec![head], Some(head), &key);
    post_up(&up).error(400);
    // Not building on the head: no parent, or a stale parent.
    let (up, _) = upload(slot, &payload, vec![], Some(meta), &key);
    assert_eq!(post_up(&up).error(409).code, codes::NOT_HEAD);
    // Slot out of spec (2 layers, 8 experts) and slot names the config lacks.
    let (up, _) = upload(
        Slot::Expert {
            layer: 2,
            expert: 0,
        },
        &payload,
        vec![],
        Some(meta),
        &key,
    );
    assert!(post_up(&up).error(400).message.contains("outside the spec"));
    let (up, _) = upload(
        Slot::Expert {
            layer: 0,
            expert: 8,
        },
        &payload,
        vec![],
        Some(meta),
        &key,
    );
    assert!(post_up(&up).error(400).message.contains("outside the spec"));
    // Wrong tensors: a router's payload in an expert slot; wrong shapes.
    let router = slot_payload(&cfg, Slot::Router { layer: 0 }, 1);
    let (up, _) = upload(slot, &router, vec![head], Some(meta), &key);
    assert!(post_up(&up).error(400).message.contains("tensors"));
    let other_cfg = web_node::model::random::small_config(259, 16, 32, 2, 2, 1);
    let (up, _) = upload(
        slot,
        &slot_payload(&other_cfg, slot, 1),
        vec![head],
        Some(meta),
        &key,
    );
    assert!(post_up(&up).error(400).message.contains("shape"));
    // Binary: garbage, truncated envelope, payload cut short, trailing bytes.
    assert_eq!(
        post_bin(&bin_url, b"garbage").error(400).code,
        codes::MALFORMED
    );
    let body = envelope_and_payload(&good_block, &payload);
    post_bin(&bin_url, &body[..20]).error(400);
    post_bin(&bin_url, &body[..body.len() - 1]).error(400);
    let mut extra = body.clone();
    extra.push(0);
    post_bin(&bin_url, &extra).error(400);
    // Flipped payload byte: root mismatch.
    let mut flipped = body.clone();
    let n = flipped.len();
    flipped[n - 5] ^= 1;
    post_bin(&bin_url, &flipped).error(400);
    // Oversize bodies: 413 before reading them.
    let big = format!(
        "POST /upload_moe_experts HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        65 * 1024 * 1024
    );
    let (st, text) = raw(&e.relay.addr(), big.as_bytes());
    assert_eq!(st, 413, "{text}");
    assert!(text.contains(codes::TOO_LARGE));
    let big = format!(
        "POST /blocks HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n",
        3u64 * 1024 * 1024 * 1024
    );
    let (st, text) = raw(&e.relay.addr(), big.as_bytes());
    assert_eq!(st, 413, "{text}");
    // Unknown hash and non-hash paths, including traversal in block paths.
    let unknown = BlockHash([7; 32]);
    for p in ["", "/payload", "/chunks"] {
        assert_eq!(
            get(&format!("{url}/blocks/{unknown}{p}")).error(404).code,
            codes::NOT_FOUND
        );
        get(&format!("{url}/blocks/xyz{p}")).error(400);
    }
    for path in [
        "/blocks/..%2F..%2Fetc%2Fpasswd",
        "/blocks/..%2F..%2FCargo.toml/payload",
        "/../Cargo.toml",
        "/%2e%2e/Cargo.toml",
        "/sub/..%2f..%2fsecret.txt",
        "/..%5csecret.txt",
        "/../secret.txt",
        "/sub/../../secret.txt",
    ] {
        let (st, text) = raw(
            &e.relay.addr(),
            format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        );
        assert!(st == 400 || st == 404, "{path}: {text}");
        assert!(text.contains("\"code\""), "{path}: {text}");
        assert!(
            !text.contains("top secret") && !text.contains("[package]"),
            "{path}: {text}"
        );
    }
    // Nothing above was stored.
    assert_eq!(snapshot(), before);
    assert!(files(&e.data.join("tmp")).is_empty());

    // The good upload passes once; a duplicate is refused, via both endpoints.
    assert_eq!(post_up(&good).status, 201);
    assert_eq!(post_up(&good).error(409).code, codes::DUPLICATE);
    assert_eq!(post_bin(&bin_url, &body).error(409).code, codes::DUPLICATE);
    // Now the old head is stale.
    let (up, _) = upload(
        slot,
        &slot_payload(&cfg, slot, 3),
        vec![head],
        Some(meta),
        &key,
    );
    assert_eq!(post_up(&up).error(409).code, codes::NOT_HEAD);
    let (a, b, _) = snapshot();
    assert_eq!((a.len(), b.len()), (before.0.len(), before.1.len() + 1));
}

#[test]
fn body_limits_are_enforced_while_streaming() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir(tmp.path());
    let data = tmp.path().join("data");
    let relay = TestRelay::start_with(&data, Some(&model), None, |mut s| {
        s.opts.max_json_body = 1000;
        s.opts.max_binary_body = 1000;
        s
    });
    let url = &relay.url;
    let cfg = test_config();
    let meta = meta_hash(url);
    let slot = Slot::Expert {
        layer: 0,
        expert: 0,
    };
    let head = head_of(url, "layer0.expert0");
    let payload = slot_payload(&cfg, slot, 5);
    let (up, block) = upload(slot, &payload, vec![head], Some(meta), &miner_key(1));
    let before = list(url, "B");
    assert_eq!(
        post_json(
            &format!("{url}/upload_moe_experts"),
            &serde_json::to_vec(&up).unwrap()
        )
        .error(413)
        .code,
        codes::TOO_LARGE
    );
    assert_eq!(
        post_bin(
            &format!("{url}/blocks"),
            &envelope_and_payload(&block, &payload)
        )
        .error(413)
        .code,
        codes::TOO_LARGE
    );
    // Chunked bodies (no Content-Length) are cut off as they stream.
    let r = ureq::post(&format!("{url}/blocks")).send(std::io::Cursor::new(vec![0u8; 5000]));
    match r {
        Err(ureq::Error::Status(413, _)) => {}
        Err(ureq::Error::Transport(_)) => {} // the server may close before the client finishes
        other => panic!("{other:?}"),
    }
    assert_eq!(list(url, "B"), before);
    assert!(files(&data.join("tmp")).is_empty());
}

struct RejectAll;
impl relay::Gate for RejectAll {
    fn check(&self, ctx: &relay::GateContext<'_>) -> Result<(), relay::Rejection> {
        let incumbent = ctx
            .store
            .payload(&ctx.head)
            .map_err(|e| relay::Rejection::rejected(e.to_string()))?;
        Err(relay::Rejection::rejected(format!(
            "no: {} bytes vs incumbent {} bytes",
            ctx.payload.len(),
            incumbent.len()
        )))
    }
}

#[test]
fn gate_sees_new_versions_only_and_can_reject() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir(tmp.path());
    let data = tmp.path().join("data");
    // Genesis passes (no incumbents), uploads of new versions hit the gate.
    let relay = TestRelay::start_with(&data, Some(&model), None, |s| {
        s.with_gate(Arc::new(RejectAll))
    });
    let url = &relay.url;
    let cfg = test_config();
    assert_eq!(list(url, "B").len(), Slot::all(&cfg).len());
    let meta = meta_hash(url);
    let slot = Slot::Router { layer: 1 };
    let head = head_of(url, "layer1.router");
    let payload = slot_payload(&cfg, slot, 9);
    let (up, _) = upload(slot, &payload, vec![head], Some(meta), &miner_key(3));
    let before = (list(url, "B"), files(&data.join("blocks")));
    let err = post_json(
        &format!("{url}/upload_moe_experts"),
        &serde_json::to_vec(&up).unwrap(),
    )
    .error(422);
    assert_eq!(err.code, codes::REJECTED);
    assert!(err.message.contains("incumbent"), "{}", err.message);
    assert_eq!((list(url, "B"), files(&data.join("blocks"))), before);
    assert_eq!(head_of(url, "layer1.router"), head);
}

#[test]
fn relay_without_genesis_model_accepts_a_meta_upload() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let relay = TestRelay::start(&data, Some(&tmp.path().join("missing")), None);
    let url = &relay.url;
    assert!(list(url, "A").is_empty());
    // Chain-B upload without any meta: refused.
    let cfg = test_config();
    let slot = Slot::Shared;
    let (mut up, _) = upload(
        slot,
        &slot_payload(&cfg, slot, 1),
        vec![],
        Some(BlockHash([1; 32])),
        &miner_key(1),
    );
    up.meta_hash = None;
    post_json(
        &format!("{url}/upload_moe_experts"),
        &serde_json::to_vec(&up).unwrap(),
    )
    .error(400);
    // A meta block via the seed body.
    let m = web_node::model::random::random_model_bytes(&cfg, 1).unwrap();
    let cfg_json: serde_json::Value = serde_json::from_slice(&m.config_json).unwrap();
    let meta = web_node::chain::MetaPayload::new("tiny", cfg_json, None).unwrap();
    let (up, block) = SeedUpload::build(
        web_node::chain::BlockKind::Meta,
        "tiny",
        &meta.to_json(),
        &Default::default(),
        &miner_key(4),
    )
    .unwrap();
    assert_eq!(
        post_json(
            &format!("{url}/upload_moe_experts"),
            &serde_json::to_vec(&up).unwrap()
        )
        .status,
        201
    );
    let a = list(url, "A");
    assert_eq!(
        (a.len(), a[0].hash, a[0].chain),
        (1, block.hash, ChainId::A)
    );
    // Now a chain-B block without meta_hash links to it.
    let (mut up, _) = upload(
        slot,
        &slot_payload(&cfg, slot, 1),
        vec![],
        Some(block.hash),
        &miner_key(1),
    );
    up.meta_hash = None;
    let r = post_json(
        &format!("{url}/upload_moe_experts"),
        &serde_json::to_vec(&up).unwrap(),
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json::<BlockInfo>().meta, Some(block.hash));
}
