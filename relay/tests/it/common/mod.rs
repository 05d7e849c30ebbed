//! Helpers for relay integration tests: tiny model dirs, signed uploads,
//! streamed bodies. The relay itself (in process or the real binary) and
//! the blocking HTTP client come from `test_support` (re-exported here).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod ws;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
pub use test_support::http::*;
pub use test_support::relay::{ChildRelay, Launch, TestRelay};
use web_node::chain::{validate_block, Block, BlockHash, BlockKind, Dag};
use web_node::model::random::{
    random_tensors, safetensors_bytes, small_config, write_random_model,
};
use web_node::model::{Config, Slot};
use web_node::net::api::{SeedUpload, UploadOptions};

/// A small Mixtral: 2 layers, 8 experts, hidden 16, vocab 259.
pub fn test_config() -> Config {
    small_config(259, 16, 24, 2, 2, 1)
}

/// Write a random model dir (config.json, model.safetensors, tokenizer.json).
pub fn model_dir(dir: &Path) -> PathBuf {
    let m = dir.join("model");
    write_random_model(&m, &test_config(), 7).unwrap();
    m
}

/// A payload holding exactly `slot`'s tensors (F32), deterministic from `seed`.
pub fn slot_payload(cfg: &Config, slot: Slot, seed: u64) -> Vec<u8> {
    let want: Vec<String> = slot.tensors(cfg).into_iter().map(|t| t.name).collect();
    let t: Vec<_> = random_tensors(cfg, seed)
        .into_iter()
        .filter(|(n, _, _)| want.contains(n))
        .collect();
    safetensors_bytes(&t).unwrap()
}

pub fn miner_key(n: u8) -> SigningKey {
    SigningKey::from_bytes(&[n; 32])
}

/// A signed seed upload of a new version of `slot`.
pub fn upload(
    slot: Slot,
    payload: &[u8],
    parents: Vec<BlockHash>,
    meta: Option<BlockHash>,
    key: &SigningKey,
) -> (SeedUpload, Block) {
    let kind = BlockKind::of_slot(slot);
    let opts = UploadOptions {
        parents,
        candidate_loss: Some(1.25),
        address: "alice".into(),
        meta,
        timestamp_ms: 1_700_000_000_000,
        chunk_size: Some(4096),
    };
    SeedUpload::build(kind, &slot.to_string(), payload, &opts, key).unwrap()
}

/// Every file under `dir` (relative paths, sorted) with its length.
pub fn files(dir: &Path) -> Vec<(String, u64)> {
    fn walk(base: &Path, d: &Path, out: &mut Vec<(String, u64)>) {
        let Ok(rd) = std::fs::read_dir(d) else { return };
        for e in rd {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(base, &p, out);
            } else {
                let rel = p.strip_prefix(base).unwrap().to_string_lossy().into_owned();
                out.push((rel, p.metadata().unwrap().len()));
            }
        }
    }
    let mut v = Vec::new();
    walk(dir, dir, &mut v);
    v.sort();
    v
}

/// Fetch every block of both chains (envelope + payload) and validate them in
/// order against a fresh DAG, as a client would.
pub fn fetch_and_validate_all(url: &str) -> usize {
    let mut dag = Dag::new();
    let mut infos = list(url, "A");
    infos.extend(list(url, "B"));
    for info in &infos {
        let env = get(&format!("{url}/blocks/{}?format=bin", info.hash));
        assert_eq!(env.status, 200);
        let b = Block::decode(&env.body).unwrap();
        b.check_hash(&info.hash).unwrap();
        let p = get(&format!("{url}/blocks/{}/payload", info.hash));
        assert_eq!(p.status, 200);
        let v = validate_block(&b, &p.body, &dag).unwrap();
        dag.insert(&v);
    }
    infos.len()
}

/// The binary upload body: envelope then payload.
pub fn envelope_and_payload(b: &Block, payload: &[u8]) -> Vec<u8> {
    let mut v = b.encode();
    v.extend_from_slice(payload);
    v
}

/// A TCP connection to `addr` from a chosen loopback source address.
pub fn connect_from(src: std::net::Ipv4Addr, addr: &str) -> TcpStream {
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.bind(std::net::SocketAddr::from((src, 0))).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let t = rt
        .block_on(s.connect(addr.parse::<std::net::SocketAddr>().unwrap()))
        .unwrap();
    let std = t.into_std().unwrap();
    std.set_nonblocking(false).unwrap();
    std
}

/// The seed JSON body of a signed upload.
pub fn seed_json(up: &SeedUpload) -> Vec<u8> {
    serde_json::to_vec(up).unwrap()
}

/// A signed meta block for a config (`writers`: keys named for first slot versions).
pub fn meta_upload(
    name: &str,
    cfg: &Config,
    parents: Vec<BlockHash>,
    writers: &[&SigningKey],
    key: &SigningKey,
) -> (SeedUpload, Block, Vec<u8>) {
    let m = web_node::model::random::random_model_bytes(cfg, 1).unwrap();
    let cfg_json: serde_json::Value = serde_json::from_slice(&m.config_json).unwrap();
    let meta = web_node::chain::MetaPayload::new(name, cfg_json, None).unwrap();
    let mut v = serde_json::to_value(&meta).unwrap();
    if !writers.is_empty() {
        v["writers"] = writers
            .iter()
            .map(|k| hex::encode(k.verifying_key().to_bytes()))
            .collect();
    }
    let payload = serde_json::to_vec(&v).unwrap();
    let opts = UploadOptions {
        parents,
        timestamp_ms: 1_700_000_000_000,
        ..Default::default()
    };
    let (up, block) = SeedUpload::build(BlockKind::Meta, name, &payload, &opts, key).unwrap();
    (up, block, payload)
}

/// The relay operator's key of a data dir.
pub fn operator_key(data: &Path) -> SigningKey {
    let text = std::fs::read_to_string(data.join("operator.key")).unwrap();
    let mut k = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut k).unwrap();
    SigningKey::from_bytes(&k)
}

/// A model dir with config.json and tokenizer.json only: genesis is the meta
/// block alone, every slot waits for its first version.
pub fn meta_only_dir(dir: &Path, cfg: &Config) -> PathBuf {
    let m = dir.join("meta-only");
    std::fs::create_dir_all(&m).unwrap();
    std::fs::write(
        m.join("config.json"),
        web_node::model::random::config_json(cfg).unwrap(),
    )
    .unwrap();
    std::fs::write(
        m.join("tokenizer.json"),
        web_node::model::random::tokenizer_json().unwrap(),
    )
    .unwrap();
    m
}

/// A config whose `shared` slot is about `mib` MiB of f32 (embeddings and
/// lm_head dominate), one layer.
pub fn big_config(mib: u64) -> Config {
    let hidden = 512usize;
    let vocab = ((mib << 20) / (2 * hidden as u64 * 4)) as usize;
    small_config(vocab.max(300), hidden, 64, 1, 4, 2)
}

/// A block whose payload is streamed from a generator: a valid safetensors
/// header for the slot, then zeros. The root is bogus, so the relay reads
/// every byte and refuses it (400) only at the end.
pub struct Streamed {
    pub block: Block,
    pub prefix: Vec<u8>,
    pub len: u64,
}

pub fn streamed_slot(
    cfg: &Config,
    slot: Slot,
    meta: BlockHash,
    parents: Vec<BlockHash>,
    key: &SigningKey,
    tag: u64,
) -> Streamed {
    let (prefix, len) = web_node::model::random::slot_safetensors_prefix(cfg, slot);
    let block = web_node::chain::BlockBuilder::slot(meta, slot, web_node::chain::PayloadDtype::F32)
        .parents(parents)
        .candidate_loss(Some(1.0))
        .address("streamed")
        .timestamp_ms(tag)
        .sign_for(len, BlockHash([0xEE; 32]), key);
    Streamed { block, prefix, len }
}

/// POST a [`Streamed`] block (1 MiB writes, `pace` between them); returns
/// the reply's status line, or what happened if the relay closed first.
pub fn send_streamed(addr: &str, s: &Streamed, pace: std::time::Duration) -> String {
    let mut c = TcpStream::connect(addr).unwrap();
    let env = s.block.encode();
    write!(
        c,
        "POST /blocks HTTP/1.1\r\nhost: x\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        env.len() as u64 + s.len
    )
    .unwrap();
    c.write_all(&env).unwrap();
    c.write_all(&s.prefix).unwrap();
    let piece = vec![0u8; 1 << 20];
    let mut left = s.len - s.prefix.len() as u64;
    while left > 0 {
        let n = (piece.len() as u64).min(left) as usize;
        if let Err(e) = c.write_all(&piece[..n]) {
            return format!("write failed: {e}");
        }
        left -= n as u64;
        if !pace.is_zero() {
            std::thread::sleep(pace);
        }
    }
    let mut out = String::new();
    let _ = c.read_to_string(&mut out);
    out.lines().next().unwrap_or_default().to_string()
}

/// A copy of models/default (another session may retrain it meanwhile).
pub fn copy_default_model(to: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/default");
    let dst = to.join("model");
    std::fs::create_dir_all(&dst).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    dst
}
