//! REST API against a real relay on 127.0.0.1:0: one test per behaviour.
//! Every refused input checks its status, its JSON error code, and that
//! nothing was stored (listings, block files and staging dir unchanged).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use crate::common::*;
use web_node::chain::{chunk_hashes, Block, BlockHash, ChainId};
use web_node::model::Slot;
use web_node::net::api::{codes, BlockInfo, ChunkList, SeedUpload, SlotHead};

struct Env {
    _tmp: tempfile::TempDir,
    data: std::path::PathBuf,
    relay: TestRelay,
}

impl Env {
    fn url(&self) -> &str {
        &self.relay.url
    }

    /// Listings, block files and the staging dir.
    fn snapshot(&self) -> Snapshot {
        Snapshot {
            a: list(self.url(), "A"),
            b: list(self.url(), "B"),
            blocks: files(&self.data.join("blocks")),
            staged: files(&self.data.join("tmp")),
        }
    }

    fn post_up(&self, up: &SeedUpload) -> Resp {
        post_json(
            &format!("{}/upload_moe_experts", self.url()),
            &seed_json(up),
        )
    }

    fn post_block(&self, body: &[u8]) -> Resp {
        post_bin(&format!("{}/blocks", self.url()), body)
    }
}

#[derive(Debug, PartialEq)]
struct Snapshot {
    a: Vec<BlockInfo>,
    b: Vec<BlockInfo>,
    blocks: Vec<(String, u64)>,
    staged: Vec<(String, u64)>,
}

fn env() -> Env {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir(tmp.path());
    let web = tmp.path().join("web");
    std::fs::create_dir_all(web.join("sub")).unwrap();
    std::fs::write(web.join("index.html"), "<h1>AI-Block</h1>").unwrap();
    std::fs::write(web.join("sub/app.js"), "console.log(1)").unwrap();
    std::fs::write(web.join("big.js"), "console.log('x');\n".repeat(2000)).unwrap();
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
    let heads: Vec<SlotHead> = get(&format!("{url}/heads")).json();
    heads
        .into_iter()
        .find(|h| h.name == name && h.meta.is_some())
        .unwrap()
        .hash
}

const SLOT: Slot = Slot::Expert {
    layer: 0,
    expert: 5,
};

/// A valid new version of layer0.expert5 (not uploaded): seed body, block, payload.
fn good_upload(e: &Env) -> (SeedUpload, Block, Vec<u8>) {
    let payload = slot_payload(&test_config(), SLOT, 200);
    let head = head_of(e.url(), "layer0.expert5");
    let (up, block) = upload(
        SLOT,
        &payload,
        vec![head],
        Some(meta_hash(e.url())),
        &miner_key(1),
    );
    (up, block, payload)
}

#[test]
fn genesis_lists_every_slot() {
    let e = env();
    let url = e.url();
    let a = list(url, "A");
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].name, "model");
    assert!(a[0].is_head);
    let b = list(url, "B");
    assert_eq!(b.len(), Slot::all(&test_config()).len());
    assert!(b
        .iter()
        .all(|i| i.is_head && i.meta == Some(a[0].hash) && i.address == "operator"));
    let lower: Vec<web_node::net::api::BlockInfo> = get(&format!("{url}/chain/a/blocks")).json();
    assert_eq!(lower, a, "chain ids are case-insensitive");
    assert_eq!(
        get(&format!("{url}/chain/C/blocks")).error(404).code,
        codes::NOT_FOUND
    );
}

#[test]
fn listings_page_with_after_and_limit() {
    let e = env();
    let url = e.url();
    let all = list(url, "B");
    let r = get(&format!("{url}/chain/B/blocks?limit=5"));
    assert_eq!(r.status, 200);
    let page: Vec<BlockInfo> = r.json();
    assert_eq!(page, all[..5]);
    let link = r.link.clone().expect("a Link header to the next page");
    assert!(
        link.contains(&format!("after={}", all[4].hash)) && link.contains("rel=\"next\""),
        "{link}"
    );
    // Walk every page: the concatenation is the unpaged listing.
    let mut walked = page;
    loop {
        let after = walked.last().unwrap().hash;
        let r = get(&format!("{url}/chain/B/blocks?after={after}&limit=5"));
        let p: Vec<BlockInfo> = r.json();
        walked.extend(p);
        if r.link.is_none() {
            break;
        }
    }
    assert_eq!(walked, all);
    // The last page has no Link; bad parameters are JSON 400s.
    assert!(get(&format!("{url}/chain/B/blocks")).link.is_none());
    for q in [
        "limit=0",
        "limit=100000",
        "limit=x",
        "after=xyz",
        &format!("after={}", BlockHash([3; 32])),
    ] {
        assert_eq!(
            get(&format!("{url}/chain/B/blocks?{q}")).error(400).code,
            codes::MALFORMED,
            "{q}"
        );
    }
}

#[test]
fn blocks_are_served_as_info_envelope_and_chunks() {
    let e = env();
    let url = e.url();
    let info = &list(url, "B")[3];
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
}

#[test]
fn payload_ranges() {
    let e = env();
    let url = e.url();
    let shared = list(url, "B")
        .into_iter()
        .find(|i| i.name == "shared")
        .unwrap();
    let p = format!("{url}/blocks/{}/payload", shared.hash);
    let full = get(&p).body;
    let len = full.len();
    assert!(len > 1000);
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
    assert_eq!(r.error(416).code, codes::RANGE_NOT_SATISFIABLE);
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
}

#[test]
fn static_files_are_served_compressed() {
    let e = env();
    let url = e.url();
    let r = get(&format!("{url}/"));
    assert_eq!((r.status, &r.body[..]), (200, &b"<h1>AI-Block</h1>"[..]));
    assert!(r.content_type.starts_with("text/html"));
    let r = get(&format!("{url}/sub/app.js"));
    assert_eq!((r.status, &r.body[..]), (200, &b"console.log(1)"[..]));
    assert!(r.content_type.contains("javascript"), "{}", r.content_type);
    assert_eq!(
        get(&format!("{url}/nope.html")).error(404).code,
        codes::NOT_FOUND
    );
    // Compressed on request (raw: ureq does not decode).
    for enc in ["gzip", "br"] {
        let (st, text) = raw(
            &e.relay.addr(),
            format!(
                "GET /big.js HTTP/1.1\r\nhost: x\r\naccept-encoding: {enc}\r\nconnection: close\r\n\r\n"
            )
            .as_bytes(),
        );
        assert_eq!(st, 200, "{text}");
        assert!(
            text.to_ascii_lowercase()
                .contains(&format!("content-encoding: {enc}")),
            "{enc}: {}",
            &text[..text.len().min(400)]
        );
        assert!(text.len() < 36_000 / 4, "{enc}: {} bytes", text.len());
    }
}

#[test]
fn uploads_via_seed_json_and_binary_become_heads() {
    let e = env();
    let url = e.url();
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
    let r = e.post_up(&up);
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
    let r = e.post_block(&envelope_and_payload(&block, &payload2));
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let info2: BlockInfo = r.json();
    assert_eq!(info2.hash, block.hash);
    assert_eq!(head_of(url, "layer1.expert3"), block.hash);
    assert_eq!(
        get(&format!("{url}/blocks/{}/payload", block.hash)).body,
        payload2
    );
    // The chunk list stored at acceptance.
    let chunks: ChunkList = get(&format!("{url}/blocks/{}/chunks", block.hash)).json();
    assert_eq!(
        chunks.chunks,
        chunk_hashes(&payload2, block.header.chunk_size)
    );
    assert_eq!(fetch_and_validate_all(url), 1 + Slot::all(&cfg).len() + 2);
    assert!(
        files(&e.data.join("tmp")).is_empty(),
        "nothing left in staging"
    );
}

#[test]
fn malformed_json_bodies_are_refused() {
    let e = env();
    let before = e.snapshot();
    let json_url = format!("{}/upload_moe_experts", e.url());
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
    let (good, _, _) = good_upload(&e);
    let mut up = good.clone();
    up.tensor_data_b64 = "!!!not base64".into();
    assert_eq!(e.post_up(&up).error(400).code, codes::MALFORMED);
    let mut up = good;
    up.payload_sig = "abc".into();
    assert_eq!(e.post_up(&up).error(400).code, codes::MALFORMED);
    assert_eq!(e.snapshot(), before);
}

#[test]
fn upload_routes_check_the_content_type() {
    let e = env();
    let before = e.snapshot();
    let (good, block, payload) = good_upload(&e);
    let body = envelope_and_payload(&block, &payload);
    // What a web page may send cross-origin without a preflight.
    for ct in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
    ] {
        let r = to_resp(
            ureq::post(&format!("{}/upload_moe_experts", e.url()))
                .set("content-type", ct)
                .send_bytes(&seed_json(&good)),
        );
        assert_eq!(r.status, 415, "{ct}");
        assert_eq!(
            r.json::<web_node::net::api::ApiError>().code,
            "unsupported_media_type"
        );
        let r = to_resp(
            ureq::post(&format!("{}/blocks", e.url()))
                .set("content-type", ct)
                .send_bytes(&body),
        );
        assert_eq!(r.status, 415, "{ct}");
    }
    // Swapped: JSON to the binary route and the reverse; and none at all.
    assert_eq!(post_json(&format!("{}/blocks", e.url()), &body).status, 415);
    assert_eq!(
        post_bin(
            &format!("{}/upload_moe_experts", e.url()),
            &seed_json(&good)
        )
        .status,
        415
    );
    assert_eq!(
        to_resp(ureq::post(&format!("{}/blocks", e.url())).send_bytes(&body)).status,
        415
    );
    assert_eq!(e.snapshot(), before);
}

#[test]
fn bad_signatures_are_refused() {
    let e = env();
    let before = e.snapshot();
    let (good, block, _) = good_upload(&e);
    let other = miner_key(2);
    // Signed by another key over the same header.
    let mut up = good.clone();
    up.payload_sig = hex::encode(Block::sign(block.header.clone(), &other).signature);
    assert_eq!(e.post_up(&up).error(401).code, codes::BAD_SIGNATURE);
    // Signed by `key`, claims `other`.
    let mut up = good.clone();
    up.miner_pub = hex::encode(other.verifying_key().to_bytes());
    assert_eq!(e.post_up(&up).error(401).code, codes::BAD_SIGNATURE);
    // A miner_pub that is no ed25519 point.
    let mut up = good.clone();
    up.miner_pub = "ff".repeat(32);
    let st = e.post_up(&up).status;
    assert!(st == 401 || st == 403, "{st}");
    // Tampered candidate_loss after signing.
    let mut up = good;
    up.candidate_loss = Some(0.01);
    assert_eq!(e.post_up(&up).error(401).code, codes::BAD_SIGNATURE);
    assert_eq!(e.snapshot(), before);
}

#[test]
fn unknown_meta_and_parents_are_refused() {
    let e = env();
    let before = e.snapshot();
    let payload = slot_payload(&test_config(), SLOT, 200);
    let head = head_of(e.url(), "layer0.expert5");
    let meta = meta_hash(e.url());
    let key = miner_key(1);
    let (up, _) = upload(SLOT, &payload, vec![head], Some(BlockHash([9; 32])), &key);
    let err = e.post_up(&up).error(400);
    assert_eq!(err.code, codes::INVALID_BLOCK);
    assert!(err.message.contains("unknown"), "{}", err.message);
    let (up, _) = upload(
        SLOT,
        &payload,
        vec![head, BlockHash([8; 32])],
        Some(meta),
        &key,
    );
    assert!(e.post_up(&up).error(400).message.contains("unknown"));
    // A meta link that is a chain-B block.
    let (up, _) = upload(SLOT, &payload, vec![head], Some(head), &key);
    assert_eq!(e.post_up(&up).error(400).code, codes::INVALID_BLOCK);
    assert_eq!(e.snapshot(), before);
}

#[test]
fn not_building_on_the_head_is_refused() {
    let e = env();
    let before = e.snapshot();
    let payload = slot_payload(&test_config(), SLOT, 200);
    let (up, _) = upload(
        SLOT,
        &payload,
        vec![],
        Some(meta_hash(e.url())),
        &miner_key(1),
    );
    assert_eq!(e.post_up(&up).error(409).code, codes::NOT_HEAD);
    assert_eq!(e.snapshot(), before);
}

#[test]
fn slots_outside_the_spec_are_refused() {
    let e = env();
    let before = e.snapshot();
    let payload = slot_payload(&test_config(), SLOT, 200);
    let meta = meta_hash(e.url());
    for slot in [
        Slot::Expert {
            layer: 2,
            expert: 0,
        },
        Slot::Expert {
            layer: 0,
            expert: 8,
        },
    ] {
        let (up, _) = upload(slot, &payload, vec![], Some(meta), &miner_key(1));
        let err = e.post_up(&up).error(400);
        assert!(err.message.contains("outside the spec"), "{}", err.message);
    }
    assert_eq!(e.snapshot(), before);
}

#[test]
fn wrong_tensors_are_refused() {
    let e = env();
    let before = e.snapshot();
    let cfg = test_config();
    let head = head_of(e.url(), "layer0.expert5");
    let meta = meta_hash(e.url());
    let router = slot_payload(&cfg, Slot::Router { layer: 0 }, 1);
    let (up, block) = upload(SLOT, &router, vec![head], Some(meta), &miner_key(1));
    assert!(e.post_up(&up).error(400).message.contains("tensors"));
    let r = e.post_block(&envelope_and_payload(&block, &router));
    assert!(r.error(400).message.contains("tensors"));
    let other_cfg = web_node::model::random::small_config(259, 16, 32, 2, 2, 1);
    let (up, _) = upload(
        SLOT,
        &slot_payload(&other_cfg, SLOT, 1),
        vec![head],
        Some(meta),
        &miner_key(1),
    );
    assert!(e.post_up(&up).error(400).message.contains("shape"));
    assert_eq!(e.snapshot(), before);
}

#[test]
fn wrong_tensors_are_refused_from_the_safetensors_header_before_the_rest() {
    let e = env();
    let before = e.snapshot();
    let head = head_of(e.url(), "layer0.expert5");
    let router = slot_payload(&test_config(), Slot::Router { layer: 0 }, 1);
    let (_, block) = upload(
        SLOT,
        &router,
        vec![head],
        Some(meta_hash(e.url())),
        &miner_key(1),
    );
    let n = u64::from_le_bytes(router[..8].try_into().unwrap()) as usize;
    assert!(8 + n < router.len());
    // Envelope and the safetensors header only; the rest is never sent.
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(e.relay.addr()).unwrap();
    let env = block.encode();
    write!(
        s,
        "POST /blocks HTTP/1.1\r\nhost: x\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\n\r\n",
        env.len() + router.len()
    )
    .unwrap();
    s.write_all(&env).unwrap();
    s.write_all(&router[..8 + n]).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.contains("tensors"), "{text}");
    assert_eq!(e.snapshot(), before);
}

#[test]
fn binary_garbage_truncation_and_tampering_are_refused() {
    let e = env();
    let before = e.snapshot();
    let (_, block, payload) = good_upload(&e);
    assert_eq!(e.post_block(b"garbage").error(400).code, codes::MALFORMED);
    assert_eq!(e.post_block(b"").error(400).code, codes::MALFORMED);
    let body = envelope_and_payload(&block, &payload);
    assert_eq!(e.post_block(&body[..20]).error(400).code, codes::MALFORMED);
    let r = e.post_block(&body[..body.len() - 1]);
    assert_eq!(r.error(400).code, codes::MALFORMED, "Content-Length short");
    let mut extra = body.clone();
    extra.push(0);
    assert_eq!(e.post_block(&extra).error(400).code, codes::MALFORMED);
    // A header length past the limit is refused from the first 8 bytes.
    let mut huge = body.clone();
    huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(e.post_block(&huge).error(413).code, codes::TOO_LARGE);
    // Flipped payload byte: root mismatch.
    let mut flipped = body;
    let n = flipped.len();
    flipped[n - 5] ^= 1;
    let err = e.post_block(&flipped).error(400);
    assert!(err.message.contains("root"), "{}", err.message);
    assert_eq!(e.snapshot(), before);
}

#[test]
fn oversize_bodies_get_413_before_they_are_read() {
    let e = env();
    let before = e.snapshot();
    let big = format!(
        "POST /upload_moe_experts HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        65 * 1024 * 1024
    );
    let (st, text) = raw(&e.relay.addr(), big.as_bytes());
    assert_eq!(st, 413, "{text}");
    assert!(text.contains(codes::TOO_LARGE));
    let big = format!(
        "POST /blocks HTTP/1.1\r\nhost: x\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\n\r\n",
        3u64 * 1024 * 1024 * 1024
    );
    let (st, text) = raw(&e.relay.addr(), big.as_bytes());
    assert_eq!(st, 413, "{text}");
    assert_eq!(e.snapshot(), before);
}

#[test]
fn body_limits_are_enforced_while_streaming() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir(tmp.path());
    let data = tmp.path().join("data");
    let relay = TestRelay::start_with(&data, Some(&model), None, |s| {
        s.with_options(|o| {
            o.max_json_body = 1000;
            o.max_binary_body = 1000;
        })
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
        post_json(&format!("{url}/upload_moe_experts"), &seed_json(&up))
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
    // Chunked bodies (no Content-Length): the envelope's payload length is
    // checked against the limit as soon as the header is in.
    let r = ureq::post(&format!("{url}/blocks"))
        .set("content-type", "application/octet-stream")
        .send(std::io::Cursor::new(envelope_and_payload(&block, &payload)));
    match r {
        Err(ureq::Error::Status(413, _)) => {}
        Err(ureq::Error::Transport(_)) => {} // the server may close before the client finishes
        other => panic!("{other:?}"),
    }
    let r = ureq::post(&format!("{url}/upload_moe_experts"))
        .set("content-type", "application/json")
        .send(std::io::Cursor::new(vec![b' '; 5000]));
    match r {
        Err(ureq::Error::Status(413, _)) => {}
        Err(ureq::Error::Transport(_)) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(list(url, "B"), before);
    assert!(files(&data.join("tmp")).is_empty());
}

#[test]
fn unknown_hashes_and_traversal_get_json_errors() {
    let e = env();
    let url = e.url();
    let unknown = BlockHash([7; 32]);
    for p in ["", "/payload", "/chunks"] {
        assert_eq!(
            get(&format!("{url}/blocks/{unknown}{p}")).error(404).code,
            codes::NOT_FOUND
        );
        assert_eq!(
            get(&format!("{url}/blocks/xyz{p}")).error(400).code,
            codes::MALFORMED
        );
    }
    let r = get(&format!("{url}/blocks"));
    assert_eq!(r.status, 405);
    assert_eq!(
        r.json::<web_node::net::api::ApiError>().code,
        "method_not_allowed"
    );
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
}

#[test]
fn duplicates_and_stale_parents_get_409() {
    let e = env();
    let (good, block, payload) = good_upload(&e);
    let head = head_of(e.url(), "layer0.expert5");
    let before = e.snapshot();
    assert_eq!(e.post_up(&good).status, 201);
    assert_eq!(e.post_up(&good).error(409).code, codes::DUPLICATE);
    let body = envelope_and_payload(&block, &payload);
    assert_eq!(e.post_block(&body).error(409).code, codes::DUPLICATE);
    // Now the old head is stale.
    let (up, _) = upload(
        SLOT,
        &slot_payload(&test_config(), SLOT, 3),
        vec![head],
        Some(meta_hash(e.url())),
        &miner_key(1),
    );
    assert_eq!(e.post_up(&up).error(409).code, codes::NOT_HEAD);
    let after = e.snapshot();
    assert_eq!(
        (after.a.len(), after.b.len()),
        (before.a.len(), before.b.len() + 1)
    );
    assert!(after.staged.is_empty());
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
            ctx.payload()?.len(),
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
    let (up, block) = upload(slot, &payload, vec![head], Some(meta), &miner_key(3));
    let before = (list(url, "B"), files(&data.join("blocks")));
    let err = post_json(&format!("{url}/upload_moe_experts"), &seed_json(&up)).error(422);
    assert_eq!(err.code, codes::REJECTED);
    assert!(err.message.contains("incumbent"), "{}", err.message);
    let err = post_bin(
        &format!("{url}/blocks"),
        &envelope_and_payload(&block, &payload),
    )
    .error(422);
    assert!(
        err.message.contains(&format!("{} bytes vs", payload.len())),
        "the gate reads the staged payload: {}",
        err.message
    );
    assert_eq!((list(url, "B"), files(&data.join("blocks"))), before);
    assert!(files(&data.join("tmp")).is_empty());
    assert_eq!(head_of(url, "layer1.router"), head);
}

#[test]
fn relay_without_genesis_model_accepts_a_listed_keys_meta_upload() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let publisher = miner_key(4);
    let relay = TestRelay::start_with(&data, Some(&tmp.path().join("missing")), None, |s| {
        s.with_meta_keys([publisher.verifying_key().to_bytes()])
    });
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
        &publisher,
    );
    up.meta_hash = None;
    post_json(&format!("{url}/upload_moe_experts"), &seed_json(&up)).error(400);
    // A meta block via the seed body, from the listed key.
    let (up, block, _) = meta_upload("tiny", &cfg, vec![], &[], &publisher);
    let r = post_json(&format!("{url}/upload_moe_experts"), &seed_json(&up));
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
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
        &publisher,
    );
    up.meta_hash = None;
    let r = post_json(&format!("{url}/upload_moe_experts"), &seed_json(&up));
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json::<BlockInfo>().meta, Some(block.hash));
}
