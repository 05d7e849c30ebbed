#![allow(clippy::unwrap_used, clippy::expect_used)]

//! One test per validation rule: feed the bad block, get that rule's error,
//! and see the DAG (the store) unchanged.

use ed25519_dalek::SigningKey;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use test_support::chain::signer;
use web_node::chain::{
    chunk_hashes, limits, payload_root, validate_block, verify_chunk, Block, BlockHash,
    BlockHeader, BlockKind, ChainError, ChainId, ChainView, Dag, MetaPayload, PayloadDtype,
};
use web_node::model::checkpoint::{split_checkpoint, SlotPayload};
use web_node::model::{Config, Slot};

fn cfg_json() -> serde_json::Value {
    serde_json::json!({
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "vocab_size": 200, "hidden_size": 8, "intermediate_size": 6, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "num_experts_per_tok": 2,
        "num_local_experts": 4, "rope_theta": 10000.0, "rms_norm_eps": 1e-5
    })
}

fn tensor_bytes(n: usize, seed: u32) -> Vec<u8> {
    (0..n as u32)
        .flat_map(|i| ((i ^ seed) as f32 * 1e-3).to_le_bytes())
        .collect()
}

fn safetensors_of(tensors: &[(String, Vec<usize>, Dtype)]) -> Vec<u8> {
    let datas: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, s, d)| {
            let n: usize = s.iter().product();
            let w = if *d == Dtype::F32 { 4 } else { 2 };
            tensor_bytes(n * w / 4 + 1, 7)[..n * w].to_vec()
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .zip(&datas)
        .map(|((n, s, d), data)| (n.clone(), TensorView::new(*d, s.clone(), data).unwrap()))
        .collect();
    safetensors::serialize(views, &None).unwrap()
}

fn checkpoint(cfg: &Config) -> Vec<u8> {
    let specs: Vec<(String, Vec<usize>, Dtype)> = Slot::all(cfg)
        .iter()
        .flat_map(|s| s.tensors(cfg))
        .map(|t| (t.name, t.shape, Dtype::F32))
        .collect();
    safetensors_of(&specs)
}

struct Fixture {
    key: SigningKey,
    dag: Dag,
    meta: Block,
    cfg: Config,
    slots: Vec<SlotPayload>,
}

impl Fixture {
    fn new() -> Self {
        let key = SigningKey::from_bytes(&[42; 32]);
        let cfg = Config::from_value(&cfg_json()).unwrap();
        let mut dag = Dag::new();
        let signer = signer(&key);
        let (meta, payload) = signer
            .meta_block(&MetaPayload::new("tiny", cfg_json(), None).unwrap(), None)
            .unwrap();
        dag.insert(&validate_block(&meta, &payload, &dag).unwrap());
        let slots = split_checkpoint(&cfg, &[&checkpoint(&cfg)]).unwrap();
        Self {
            key,
            dag,
            meta,
            cfg,
            slots,
        }
    }

    fn slot(&self, name: &str) -> &SlotPayload {
        self.slots
            .iter()
            .find(|s| s.slot.to_string() == name)
            .unwrap()
    }

    /// A valid block for a slot, with the given parents.
    fn block(&self, name: &str, parents: Vec<BlockHash>) -> (Block, Vec<u8>) {
        signer(&self.key).slot_block(self.meta.hash, self.slot(name), parents, Some(1.0))
    }

    /// Re-sign a modified header of a valid block for `name`.
    fn forged(&self, name: &str, edit: impl FnOnce(&mut BlockHeader)) -> (Block, Vec<u8>) {
        let (b, p) = self.block(name, vec![]);
        let mut h = b.header.clone();
        edit(&mut h);
        (Block::sign(h, &self.key), p)
    }

    fn accept(&mut self, b: &Block, p: &[u8]) {
        let v = validate_block(b, p, &self.dag).unwrap();
        self.dag.insert(&v);
    }

    /// Validate; on error the DAG must be unchanged. Returns the error.
    fn reject(&mut self, b: &Block, p: &[u8]) -> ChainError {
        let before_len = self.dag.len();
        let before_heads: Vec<_> = self.dag.heads().map(|(k, v)| (k.clone(), *v)).collect();
        let err = match validate_block(b, p, &self.dag) {
            Ok(v) => {
                self.dag.insert(&v);
                panic!("block {} was accepted", b.header.name)
            }
            Err(e) => e,
        };
        assert_eq!(self.dag.len(), before_len);
        let after_heads: Vec<_> = self.dag.heads().map(|(k, v)| (k.clone(), *v)).collect();
        assert_eq!(before_heads, after_heads);
        if !matches!(err, ChainError::Duplicate(_)) {
            assert!(self.dag.get(&b.hash).is_none());
        }
        err
    }
}

#[test]
fn valid_blocks_are_accepted_and_become_heads() {
    let mut f = Fixture::new();
    let (b, p) = f.block("layer1.expert3", vec![]);
    f.accept(&b, &p);
    assert_eq!(
        f.dag.head(Some(&f.meta.hash), "layer1.expert3"),
        Some(b.hash)
    );
    let (b2, p2) = signer(&f.key).slot_block(
        f.meta.hash,
        f.slot("layer1.expert3"),
        vec![b.hash],
        Some(0.5),
    );
    f.accept(&b2, &p2);
    assert_eq!(
        f.dag.head(Some(&f.meta.hash), "layer1.expert3"),
        Some(b2.hash)
    );
}

#[test]
fn rule_signature() {
    let mut f = Fixture::new();
    let (b, p) = f.block("shared", vec![]);
    let mut h = b.header.clone();
    h.candidate_loss = Some(0.01);
    let forged = Block::from_parts(h, b.signature);
    assert!(matches!(f.reject(&forged, &p), ChainError::BadSignature(_)));
    // Signed by another key than the header names.
    let other = SigningKey::from_bytes(&[1; 32]);
    let stolen = Block::from_parts(
        b.header.clone(),
        Block::sign(b.header.clone(), &other).signature,
    );
    assert!(matches!(f.reject(&stolen, &p), ChainError::BadSignature(_)));
}

#[test]
fn rule_public_key_is_a_curve_point() {
    let mut f = Fixture::new();
    let (b, p) = f.block("shared", vec![]);
    // Find an encoding that does not decompress to a curve point.
    let bad = (0u8..=255)
        .map(|i| {
            let mut k = [i; 32];
            k[31] &= 0x7f;
            k
        })
        .find(|k| ed25519_dalek::VerifyingKey::from_bytes(k).is_err())
        .unwrap();
    let mut h = b.header.clone();
    h.miner = bad;
    let forged = Block::from_parts(h, b.signature);
    assert!(matches!(f.reject(&forged, &p), ChainError::BadPublicKey(_)));
}

#[test]
fn rule_hash() {
    let f = Fixture::new();
    let (b, _) = f.block("shared", vec![]);
    let (c, _) = f.block("layer0.router", vec![]);
    assert_eq!(
        b.check_hash(&c.hash),
        Err(ChainError::HashMismatch {
            expected: c.hash,
            actual: b.hash
        })
    );
    b.check_hash(&b.hash).unwrap();
    // The hash covers the signature: flipping a signature bit changes it.
    let mut sig = b.signature;
    sig[0] ^= 1;
    assert_ne!(Block::from_parts(b.header.clone(), sig).hash, b.hash);
}

#[test]
fn rule_payload_length() {
    let mut f = Fixture::new();
    let (b, p) = f.block("layer0.expert0", vec![]);
    let e = f.reject(&b, &p[..p.len() - 1]);
    assert_eq!(
        e,
        ChainError::PayloadLength {
            header: p.len() as u64,
            actual: p.len() as u64 - 1
        }
    );
    let mut longer = p.clone();
    longer.push(0);
    assert!(matches!(
        f.reject(&b, &longer),
        ChainError::PayloadLength { .. }
    ));
}

#[test]
fn rule_chunk_hashes_and_root() {
    let mut f = Fixture::new();
    let (b, p) = f.block("shared", vec![]);
    assert!(p.len() > 4096, "shared payload spans several chunks");
    let mut bad = p.clone();
    let last = bad.len() - 1;
    bad[last] ^= 0xff;
    assert!(matches!(f.reject(&b, &bad), ChainError::PayloadRoot { .. }));
    // Per chunk, as a node checks chunks from peers.
    let hashes = chunk_hashes(&p, b.header.chunk_size);
    assert_eq!(payload_root(&hashes), b.header.payload_root);
    let n = hashes.len() as u64 - 1;
    let start = (n * 4096) as usize;
    verify_chunk(&b.hash, &hashes, n, &p[start..]).unwrap();
    assert_eq!(
        verify_chunk(&b.hash, &hashes, n, &bad[start..]),
        Err(ChainError::ChunkHash {
            block: b.hash,
            index: n
        })
    );
}

#[test]
fn rule_chain_kind_consistency() {
    let mut f = Fixture::new();
    let (b, p) = f.forged("layer0.expert1", |h| h.chain = ChainId::A);
    assert_eq!(
        f.reject(&b, &p),
        ChainError::ChainKind {
            chain: ChainId::A,
            kind: BlockKind::Expert
        }
    );
    let (b, p) = f.forged("layer0.expert1", |h| h.kind = BlockKind::Meta);
    assert!(matches!(f.reject(&b, &p), ChainError::ChainKind { .. }));
    // Kind and dtype must agree too.
    let (b, p) = f.forged("layer0.expert1", |h| h.dtype = PayloadDtype::Json);
    assert!(matches!(f.reject(&b, &p), ChainError::Field(_)));
}

#[test]
fn rule_meta_link_exists_and_is_chain_a() {
    let mut f = Fixture::new();
    let (b, p) = f.forged("layer0.expert1", |h| h.meta = None);
    assert!(matches!(f.reject(&b, &p), ChainError::MetaLink(_)));
    let unknown = BlockHash([9; 32]);
    let (b, p) = f.forged("layer0.expert1", |h| h.meta = Some(unknown));
    assert_eq!(f.reject(&b, &p), ChainError::UnknownMeta(unknown));
    let (router, rp) = f.block("layer0.router", vec![]);
    f.accept(&router, &rp);
    let (b, p) = f.forged("layer0.expert1", |h| h.meta = Some(router.hash));
    assert_eq!(f.reject(&b, &p), ChainError::MetaNotChainA(router.hash));
    // A chain-A block must not carry a meta link.
    let meta = MetaPayload::new("other", cfg_json(), None).unwrap();
    let (mb, mp) = signer(&f.key).meta_block(&meta, None).unwrap();
    let mut h = mb.header.clone();
    h.meta = Some(f.meta.hash);
    let mb = Block::sign(h, &f.key);
    assert!(matches!(f.reject(&mb, &mp), ChainError::MetaLink(_)));
}

#[test]
fn rule_parents_known() {
    let mut f = Fixture::new();
    let ghost = BlockHash([5; 32]);
    let (b, p) = f.block("layer0.expert1", vec![ghost]);
    assert_eq!(f.reject(&b, &p), ChainError::UnknownParent(ghost));
}

#[test]
fn rule_no_self_or_duplicate_dependency() {
    let mut f = Fixture::new();
    // A block cannot name its own hash (the hash covers the parents), so forge one.
    let (mut b, p) = f.block("layer0.expert1", vec![BlockHash([1; 32])]);
    b.hash = BlockHash([1; 32]);
    assert_eq!(f.reject(&b, &p), ChainError::SelfParent);
    let (r, rp) = f.block("layer0.router", vec![]);
    f.accept(&r, &rp);
    let (b, p) = f.block("layer0.expert1", vec![r.hash, r.hash]);
    assert_eq!(f.reject(&b, &p), ChainError::DuplicateParent(r.hash));
}

/// A view that lies: it reports a parent whose own parents include the new block.
struct Forged<'a> {
    dag: &'a Dag,
    extra: Vec<(BlockHash, BlockHeader)>,
}
impl ChainView for Forged<'_> {
    fn header(&self, hash: &BlockHash) -> Option<BlockHeader> {
        self.extra
            .iter()
            .find(|(h, _)| h == hash)
            .map(|(_, x)| x.clone())
            .or_else(|| self.dag.header(hash))
    }
    fn config(&self, meta: &BlockHash) -> Option<Config> {
        self.dag.config(meta)
    }
    fn head(&self, meta: Option<&BlockHash>, name: &str) -> Option<BlockHash> {
        self.dag.head(meta, name)
    }
}

#[test]
fn rule_no_cycles_with_forged_parent_sets() {
    let f = Fixture::new();
    let p1 = BlockHash([0x11; 32]);
    let p2 = BlockHash([0x22; 32]);
    let (b, p) = f.block("layer0.expert1", vec![p1]);
    // p1 -> p2 -> b : b would be its own ancestor.
    let (template, _) = f.block("layer0.router", vec![]);
    let mut h1 = template.header.clone();
    h1.parents = vec![p2];
    let mut h2 = template.header.clone();
    h2.name = "layer1.router".into();
    h2.parents = vec![b.hash];
    let view = Forged {
        dag: &f.dag,
        extra: vec![(p1, h1), (p2, h2)],
    };
    assert_eq!(
        validate_block(&b, &p, &view).unwrap_err(),
        ChainError::Cycle(b.hash)
    );
    assert!(f.dag.get(&b.hash).is_none());
    // A diamond (two paths to the same ancestor) is not a cycle.
    let mut d1 = template.header.clone();
    d1.parents = vec![f.meta.hash];
    let mut d2 = template.header.clone();
    d2.name = "layer1.router".into();
    d2.parents = vec![f.meta.hash];
    let (b, p) = f.block("layer0.expert1", vec![p1, p2]);
    let view = Forged {
        dag: &f.dag,
        extra: vec![(p1, d1), (p2, d2)],
    };
    validate_block(&b, &p, &view).unwrap();
}

#[test]
fn rule_slot_name_fits_kind() {
    let mut f = Fixture::new();
    let (b, p) = f.forged("layer0.expert1", |h| h.kind = BlockKind::Router);
    assert!(matches!(f.reject(&b, &p), ChainError::SlotName(_)));
    let (b, p) = f.forged("layer0.expert1", |h| h.name = "layer0.expert01".into());
    assert!(matches!(f.reject(&b, &p), ChainError::SlotName(_)));
    let (b, p) = f.forged("layer0.expert1", |h| h.name = "../../etc/passwd".into());
    assert!(matches!(f.reject(&b, &p), ChainError::SlotName(_)));
}

#[test]
fn rule_slot_within_spec() {
    let mut f = Fixture::new();
    let (b, p) = f.forged("layer0.expert1", |h| h.name = "layer2.expert1".into());
    assert!(matches!(f.reject(&b, &p), ChainError::SlotOutOfSpec(_)));
    let (b, p) = f.forged("layer0.expert1", |h| h.name = "layer0.expert4".into());
    assert!(matches!(f.reject(&b, &p), ChainError::SlotOutOfSpec(_)));
}

fn retensor(
    f: &Fixture,
    name: &str,
    tensors: &[(String, Vec<usize>, Dtype)],
    dtype: PayloadDtype,
) -> (Block, Vec<u8>) {
    let bytes = safetensors_of(tensors);
    let slot = SlotPayload {
        slot: Slot::parse(name).unwrap(),
        dtype,
        tensors: vec![],
        bytes,
    };
    signer(&f.key).slot_block(f.meta.hash, &slot, vec![], None)
}

#[test]
fn rule_tensors_exactly_as_config_implies() {
    let mut f = Fixture::new();
    let spec = |f: &Fixture| -> Vec<(String, Vec<usize>, Dtype)> {
        Slot::parse("layer1.expert2")
            .unwrap()
            .tensors(&f.cfg)
            .into_iter()
            .map(|t| (t.name, t.shape, Dtype::F32))
            .collect()
    };
    // Missing w3.
    let mut t = spec(&f);
    t.pop();
    let (b, p) = retensor(&f, "layer1.expert2", &t, PayloadDtype::F32);
    assert!(matches!(f.reject(&b, &p), ChainError::Tensors(_)));
    // Extra tensor.
    let mut t = spec(&f);
    t.push((
        "model.layers.1.block_sparse_moe.experts.2.w4.weight".into(),
        vec![2],
        Dtype::F32,
    ));
    let (b, p) = retensor(&f, "layer1.expert2", &t, PayloadDtype::F32);
    assert!(matches!(f.reject(&b, &p), ChainError::Tensors(_)));
    // Wrong shape.
    let mut t = spec(&f);
    t[0].1[0] += 1;
    let (b, p) = retensor(&f, "layer1.expert2", &t, PayloadDtype::F32);
    assert!(matches!(f.reject(&b, &p), ChainError::Tensors(_)));
    // Another expert's tensors under this slot's name.
    let t: Vec<_> = spec(&f)
        .into_iter()
        .map(|(n, s, d)| (n.replace("experts.2", "experts.1"), s, d))
        .collect();
    let (b, p) = retensor(&f, "layer1.expert2", &t, PayloadDtype::F32);
    assert!(matches!(f.reject(&b, &p), ChainError::Tensors(_)));
    // dtype differs from the header's.
    let t: Vec<_> = spec(&f)
        .into_iter()
        .map(|(n, s, _)| (n, s, Dtype::F16))
        .collect();
    let (b, p) = retensor(&f, "layer1.expert2", &t, PayloadDtype::F32);
    assert!(matches!(f.reject(&b, &p), ChainError::Tensors(_)));
    // Same tensors in F16 with an F16 header are fine.
    let (b, p) = retensor(&f, "layer1.expert2", &t, PayloadDtype::F16);
    f.accept(&b, &p);
    // Not safetensors at all.
    let slot = SlotPayload {
        slot: Slot::parse("layer0.router").unwrap(),
        dtype: PayloadDtype::F32,
        tensors: vec![],
        bytes: [&16u64.to_le_bytes()[..], b"not json at all!"].concat(),
    };
    let (b, p) = signer(&f.key).slot_block(f.meta.hash, &slot, vec![], None);
    assert!(matches!(f.reject(&b, &p), ChainError::Tensors(_)));
    // A safetensors header length pointing past any limit.
    let mut bytes = (u64::MAX / 2).to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    let slot = SlotPayload { bytes, ..slot };
    let (b, p) = signer(&f.key).slot_block(f.meta.hash, &slot, vec![], None);
    assert!(matches!(f.reject(&b, &p), ChainError::TooLarge { .. }));
}

#[test]
fn rule_meta_payload() {
    let mut f = Fixture::new();
    let sign_meta = |f: &Fixture, name: &str, payload: Vec<u8>| {
        let slot = SlotPayload {
            slot: Slot::Shared,
            dtype: PayloadDtype::Json,
            tensors: vec![],
            bytes: payload,
        };
        let (b, p) = signer(&f.key).slot_block(f.meta.hash, &slot, vec![], None);
        let mut h = b.header.clone();
        h.chain = ChainId::A;
        h.kind = BlockKind::Meta;
        h.meta = None;
        h.name = name.into();
        (Block::sign(h, &f.key), p)
    };
    let (b, p) = sign_meta(&f, "m", b"{not json".to_vec());
    assert!(matches!(f.reject(&b, &p), ChainError::MetaPayload(_)));
    let mut m = MetaPayload::new("m", cfg_json(), None).unwrap();
    m.architecture = "dense".into();
    let (b, p) = sign_meta(&f, "m", serde_json::to_vec(&m).unwrap());
    assert!(matches!(f.reject(&b, &p), ChainError::MetaPayload(_)));
    let mut m = MetaPayload::new("m", cfg_json(), None).unwrap();
    m.num_layers = 3;
    let (b, p) = sign_meta(&f, "m", serde_json::to_vec(&m).unwrap());
    assert!(matches!(f.reject(&b, &p), ChainError::MetaPayload(_)));
    let mut m = MetaPayload::new("m", cfg_json(), None).unwrap();
    m.routing_strategy = "top9".into();
    let (b, p) = sign_meta(&f, "m", serde_json::to_vec(&m).unwrap());
    assert!(matches!(f.reject(&b, &p), ChainError::MetaPayload(_)));
    let m = MetaPayload::new("m", cfg_json(), None).unwrap();
    let (b, p) = sign_meta(&f, "not-m", serde_json::to_vec(&m).unwrap());
    assert!(matches!(f.reject(&b, &p), ChainError::MetaPayload(_)));
    let (b, p) = sign_meta(&f, "m", serde_json::to_vec(&m).unwrap());
    f.accept(&b, &p);
}

#[test]
fn rule_size_limits() {
    let mut f = Fixture::new();
    let (b, p) = f.forged("layer0.expert1", |h| {
        h.payload_len = limits::MAX_PAYLOAD_LEN + 1
    });
    assert!(matches!(
        f.reject(&b, &p),
        ChainError::TooLarge {
            what: "payload",
            ..
        }
    ));
    let (b, p) = f.forged("layer0.expert1", |h| {
        h.parents = (0..=limits::MAX_PARENTS as u8)
            .map(|i| BlockHash([i; 32]))
            .collect()
    });
    assert!(matches!(
        f.reject(&b, &p),
        ChainError::TooLarge {
            what: "parent list",
            ..
        }
    ));
    let (b, p) = f.forged("layer0.expert1", |h| {
        h.address = "a".repeat(limits::MAX_ADDRESS_LEN + 1)
    });
    assert!(matches!(
        f.reject(&b, &p),
        ChainError::TooLarge {
            what: "address",
            ..
        }
    ));
    let (b, p) = f.forged("layer0.expert1", |h| {
        h.chunk_size = limits::MAX_CHUNK_SIZE + 1
    });
    assert!(matches!(f.reject(&b, &p), ChainError::Field(_)));
    let (b, p) = f.forged("layer0.expert1", |h| h.chunk_size = 0);
    assert!(matches!(f.reject(&b, &p), ChainError::Field(_)));
    let (b, p) = f.forged("layer0.expert1", |h| h.candidate_loss = Some(f32::NAN));
    assert!(matches!(f.reject(&b, &p), ChainError::Field(_)));
    let (b, p) = f.forged("layer0.expert1", |h| h.version = 2);
    assert_eq!(f.reject(&b, &p), ChainError::UnsupportedVersion(2));
    // Oversized header refused by the decoder before parsing.
    let mut env = b.encode();
    env[4..8].copy_from_slice(&((limits::MAX_HEADER_LEN + 1) as u32).to_le_bytes());
    assert!(matches!(
        Block::decode_prefix(&env),
        Err(ChainError::TooLarge { what: "header", .. })
    ));
}

#[test]
fn rule_parent_is_current_head() {
    let mut f = Fixture::new();
    let (v1, p1) = f.block("layer0.expert2", vec![]);
    f.accept(&v1, &p1);
    // A second "first version" ignores the head.
    let (other, po) =
        signer(&f.key).slot_block(f.meta.hash, f.slot("layer0.expert2"), vec![], Some(0.7));
    assert_eq!(
        f.reject(&other, &po),
        ChainError::NotHead {
            slot: "layer0.expert2".into(),
            head: v1.hash
        }
    );
    let (v2, p2) = signer(&f.key).slot_block(
        f.meta.hash,
        f.slot("layer0.expert2"),
        vec![v1.hash],
        Some(0.6),
    );
    f.accept(&v2, &p2);
    // Building on v1 again (a fork) is refused.
    let (fork, pf) = signer(&f.key).slot_block(
        f.meta.hash,
        f.slot("layer0.expert2"),
        vec![v1.hash],
        Some(0.5),
    );
    assert_eq!(
        f.reject(&fork, &pf),
        ChainError::StaleParent {
            slot: "layer0.expert2".into(),
            parent: v1.hash,
            head: v2.hash
        }
    );
}

#[test]
fn rule_duplicate() {
    let mut f = Fixture::new();
    let (b, p) = f.block("layer0.router", vec![]);
    f.accept(&b, &p);
    assert_eq!(f.reject(&b, &p), ChainError::Duplicate(b.hash));
    let meta = f.meta.clone();
    let payload = MetaPayload::new("tiny", cfg_json(), None)
        .unwrap()
        .to_json();
    assert_eq!(f.reject(&meta, &payload), ChainError::Duplicate(meta.hash));
}

#[test]
fn envelope_round_trip_preserves_validity() {
    let mut f = Fixture::new();
    let (b, p) = f.block("layer1.router", vec![]);
    let mut wire = b.encode();
    wire.extend_from_slice(&p);
    let (d, used) = Block::decode_prefix(&wire).unwrap();
    assert_eq!(d.hash, b.hash);
    f.accept(&d, &wire[used..]);
}

#[test]
fn sha256_matches_openssl() {
    let data: Vec<u8> = (0..1_000_003u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data.bin");
    std::fs::write(&path, &data).unwrap();
    let out = std::process::Command::new("openssl")
        .args(["dgst", "-sha256", "-r"])
        .arg(&path)
        .output()
        .expect("openssl must be installed (ground truth for hashing)");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let openssl_hex = text.split_whitespace().next().unwrap();
    assert_eq!(BlockHash::of(&data).to_hex(), openssl_hex);
    // The payload root is SHA-256 over the concatenated chunk hashes.
    let hashes = chunk_hashes(&data, 65536);
    let concat: Vec<u8> = hashes.iter().flat_map(|h| h.0).collect();
    std::fs::write(&path, &concat).unwrap();
    let out = std::process::Command::new("openssl")
        .args(["dgst", "-sha256", "-r"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        payload_root(&hashes).to_hex(),
        text.split_whitespace().next().unwrap()
    );
}
