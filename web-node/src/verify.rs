//! Verify a whole chain fetched from a relay, block by block, with the same
//! [`crate::chain`] rules the relay applies.
//!
//! This is everything the web page decides about the chain, as plain Rust
//! that native tests cover; the wasm facade in `browser` only fetches the
//! bytes and renders the [`ChainReport`] as HTML.
//!
//! For every block the relay lists: the envelope decodes, hashes to the hash
//! it was listed under, sits on the chain it was listed on, and then
//! [`validate_block`] runs every rule (signature, payload length and chunk
//! root, meta link, parents, slot in spec, tensors, head) against a [`Dag`]
//! built from the blocks already verified, in topological order. A block
//! whose meta block or parent failed fails too, naming it.

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use crate::chain::{
    validate_header, validate_payload, Block, BlockHash, BlockKind, ChainError, ChainId, ChainView,
    Dag, MetaPayload, ValidatedBlock,
};
use crate::net::api::BlockInfo;

/// One block as fetched from a relay: the hash and chain it was listed
/// under, its envelope and its payload (or why a fetch failed).
#[derive(Debug, Clone)]
pub struct FetchedBlock {
    /// Hash from `GET /chain/{A|B}/blocks`.
    pub listed_hash: BlockHash,
    /// Chain of the listing it came from.
    pub listed_chain: ChainId,
    /// Whether the relay's listing calls it its slot's head (None: not said).
    pub listed_head: Option<bool>,
    /// The signed block: `GET /blocks/{hash}?format=bin`, or the envelope
    /// rebuilt from the listing's header fields and signature
    /// ([`FetchedBlock::from_listing`]).
    pub envelope: Result<Vec<u8>, String>,
    /// `GET /blocks/{hash}/payload`.
    /// None: not fetched; the block is verified from its header alone and
    /// its payload is checked later, chunk by chunk, when it is needed.
    pub payload: Option<Result<Vec<u8>, String>>,
}

/// The verification result of one block, with what its header says.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VerifyReport {
    pub hash: BlockHash,
    pub chain: ChainId,
    /// Header fields (None when the envelope could not be decoded).
    pub kind: Option<BlockKind>,
    pub name: Option<String>,
    /// 1 for the first version of a slot, parent's version + 1 after (verified blocks only).
    pub version: Option<u32>,
    pub parents: Vec<BlockHash>,
    pub meta: Option<BlockHash>,
    pub payload_len: Option<u64>,
    pub candidate_loss: Option<f32>,
    pub miner: Option<String>,
    pub address: Option<String>,
    pub timestamp_ms: Option<u64>,
    /// Whether the block is its slot's head among the verified blocks.
    pub head: bool,
    /// What the relay's listing claimed about `head`, when it disagrees
    /// (a relay that misreports heads, or a chain that moved while listing).
    pub relay_head_disagrees: Option<bool>,
    /// Chain-A blocks: `"4 layers × 8 experts, top2"`.
    pub spec: Option<String>,
    /// Whether the payload was checked too (false: header verified, payload
    /// not fetched yet).
    pub payload_verified: bool,
    /// None: verified. Some: why it failed.
    pub error: Option<String>,
}

impl VerifyReport {
    pub fn verified(&self) -> bool {
        self.error.is_none()
    }

    fn failed(f: &FetchedBlock, block: Option<&Block>, error: String) -> Self {
        let h = block.map(|b| &b.header);
        Self {
            hash: f.listed_hash,
            chain: f.listed_chain,
            kind: h.map(|h| h.kind),
            name: h.map(|h| h.name.clone()),
            version: None,
            parents: h.map(|h| h.parents.clone()).unwrap_or_default(),
            meta: h.and_then(|h| h.meta),
            payload_len: h.map(|h| h.payload_len),
            candidate_loss: h.and_then(|h| h.candidate_loss),
            miner: h.map(|h| h.miner_hex()),
            address: h.map(|h| h.address.clone()),
            timestamp_ms: h.map(|h| h.timestamp_ms),
            head: false,
            relay_head_disagrees: None,
            spec: None,
            payload_verified: false,
            error: Some(error),
        }
    }
}

impl FetchedBlock {
    /// A block as its own signer lists it, with its payload when given.
    pub fn of(block: &Block, payload: Option<Vec<u8>>) -> Self {
        Self {
            listed_hash: block.hash,
            listed_chain: block.header.chain,
            listed_head: None,
            envelope: Ok(block.encode()),
            payload: payload.map(Ok),
        }
    }

    /// A block as a relay listed it (`GET /chain/{A|B}/blocks` carries every
    /// header field and the signature), with no payload: header-first.
    pub fn from_listing(info: &BlockInfo, chain: ChainId) -> Self {
        Self {
            listed_hash: info.hash,
            listed_chain: chain,
            listed_head: Some(info.is_head),
            envelope: info
                .to_block()
                .map(|b| b.encode())
                .map_err(|e| format!("bad listing entry: {}", e.message)),
            payload: None,
        }
    }
}

/// Every block's result: verified blocks first in the order they joined the
/// DAG (parents before children), then the failed ones in listing order.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ChainReport {
    pub blocks: Vec<VerifyReport>,
    pub verified: usize,
    pub failed: usize,
}

impl ChainReport {
    pub fn total(&self) -> usize {
        self.blocks.len()
    }
    pub fn get(&self, hash: &BlockHash) -> Option<&VerifyReport> {
        self.blocks.iter().find(|r| &r.hash == hash)
    }
}

struct Candidate<'a> {
    fetched: &'a FetchedBlock,
    block: Block,
    payload: Option<&'a [u8]>,
}

impl Candidate<'_> {
    /// Blocks that must be in the DAG before this one: meta link and parents.
    fn deps(&self) -> impl Iterator<Item = BlockHash> + '_ {
        self.block
            .header
            .meta
            .into_iter()
            .chain(self.block.header.parents.iter().copied())
    }
}

/// Verify every fetched block. Never panics; every problem is a failed report.
pub fn verify_chain(fetched: &[FetchedBlock]) -> ChainReport {
    verify_chain_dag(fetched).0
}

/// [`verify_chain`], also returning the DAG of the verified blocks.
pub fn verify_chain_dag(fetched: &[FetchedBlock]) -> (ChainReport, Dag) {
    ChainVerifier::new(fetched).finish()
}

/// [`verify_chain_dag`] in steps, for a caller that must not block for the
/// whole chain at once (the page yields to its event loop between steps):
/// the same checks in the same order, so the same report.
pub struct ChainVerifier<'a> {
    fetched: &'a [FetchedBlock],
    failed: Vec<(usize, VerifyReport)>,
    /// This pass's blocks still to look at, in listing order.
    pending: std::collections::VecDeque<(usize, Candidate<'a>)>,
    /// Blocks waiting on a dependency: the next pass.
    still: Vec<(usize, Candidate<'a>)>,
    /// Whether this pass verified or failed a block.
    progressed: bool,
    done: bool,
    dag: Dag,
    accepted: Vec<(BlockHash, Option<String>, Option<bool>)>,
    versions: HashMap<BlockHash, u32>,
    failed_hashes: HashSet<BlockHash>,
}

impl<'a> ChainVerifier<'a> {
    /// Decode every block and check its hash against the listing (cheap);
    /// the signatures and the rules run in [`ChainVerifier::step`].
    pub fn new(fetched: &'a [FetchedBlock]) -> Self {
        let mut failed: Vec<(usize, VerifyReport)> = Vec::new();
        let mut pending = std::collections::VecDeque::new();
        for (i, f) in fetched.iter().enumerate() {
            match first_checks(f) {
                Ok(c) => pending.push_back((i, c)),
                Err(r) => failed.push((i, *r)),
            }
        }
        let failed_hashes = failed.iter().map(|(_, r)| r.hash).collect();
        Self {
            fetched,
            failed,
            pending,
            still: Vec::new(),
            progressed: false,
            done: false,
            dag: Dag::new(),
            accepted: Vec::new(),
            versions: HashMap::new(),
            failed_hashes,
        }
    }

    /// Look at up to `max` more blocks (Kahn-style passes in listing order:
    /// a block is validated once its meta block and parents are verified;
    /// the passes stop when one makes no progress). True when every block
    /// has its verdict.
    pub fn step(&mut self, max: usize) -> bool {
        let mut looked = 0;
        while !self.done && looked < max.max(1) {
            let Some((i, c)) = self.pending.pop_front() else {
                // The end of a pass.
                if !self.progressed || self.still.is_empty() {
                    self.done = true;
                } else {
                    self.pending = std::mem::take(&mut self.still).into();
                    self.progressed = false;
                }
                continue;
            };
            looked += 1;
            if !c.deps().all(|d| self.dag.header(&d).is_some()) {
                self.still.push((i, c));
                continue;
            }
            self.progressed = true;
            let dag = &mut self.dag;
            match verify_one(&c, dag) {
                Ok(meta) => {
                    let h = &c.block.header;
                    let version = h
                        .parents
                        .iter()
                        .filter_map(|p| {
                            dag.get(p)
                                .filter(|e| e.header.name == h.name && e.header.meta == h.meta)
                        })
                        .filter_map(|e| self.versions.get(&e.hash))
                        .max()
                        .map_or(1, |v| v + 1);
                    self.versions.insert(c.block.hash, version);
                    let spec = meta.as_ref().map(|m| {
                        format!(
                            "{} layers × {} experts, {}",
                            m.num_layers, m.num_experts, m.routing_strategy
                        )
                    });
                    self.accepted
                        .push((c.block.hash, spec, c.fetched.listed_head));
                }
                Err(e) => {
                    self.failed_hashes.insert(c.block.hash);
                    self.failed.push((
                        i,
                        VerifyReport::failed(c.fetched, Some(&c.block), e.to_string()),
                    ));
                }
            }
        }
        self.done
    }

    /// Blocks handed in.
    pub fn total(&self) -> usize {
        self.fetched.len()
    }

    /// Run what is left and build the report.
    pub fn finish(mut self) -> (ChainReport, Dag) {
        while !self.step(usize::MAX) {}
        let Self {
            fetched,
            mut failed,
            pending,
            still,
            dag,
            accepted,
            versions,
            failed_hashes,
            ..
        } = self;
        let pending: Vec<(usize, Candidate<'_>)> = still.into_iter().chain(pending).collect();
        // What is left waits on a block that failed or that the relay did not list.
        for (i, c) in pending {
            let error = match c.deps().find(|d| failed_hashes.contains(d)) {
                Some(d) => format!("depends on block {} which failed verification", d.short()),
                None => match validate_header(&c.block, &dag) {
                    Err(e) => e.to_string(),
                    // Unreachable in practice (a missing dependency fails validation).
                    Ok(_) => "its dependencies were not verified".to_string(),
                },
            };
            failed.push((i, VerifyReport::failed(c.fetched, Some(&c.block), error)));
        }
        failed.sort_by_key(|(i, _)| *i);

        let mut blocks = Vec::with_capacity(fetched.len());
        for (hash, spec, listed_head) in accepted {
            let Some(e) = dag.get(&hash) else { continue };
            let h = &e.header;
            let head = dag.head(h.meta.as_ref(), &h.name) == Some(hash);
            blocks.push(VerifyReport {
                hash,
                chain: h.chain,
                kind: Some(h.kind),
                name: Some(h.name.clone()),
                version: versions.get(&hash).copied(),
                parents: h.parents.clone(),
                meta: h.meta,
                payload_len: Some(h.payload_len),
                candidate_loss: h.candidate_loss,
                miner: Some(h.miner_hex()),
                address: Some(h.address.clone()),
                timestamp_ms: Some(h.timestamp_ms),
                head,
                relay_head_disagrees: listed_head.filter(|l| *l != head),
                spec,
                payload_verified: e.payload.is_verified(),
                error: None,
            });
        }
        let verified = blocks.len();
        let nfailed = failed.len();
        blocks.extend(failed.into_iter().map(|(_, r)| r));
        let report = ChainReport {
            blocks,
            verified,
            failed: nfailed,
        };
        (report, dag)
    }
}

/// Phase one on the header and, when the payload was fetched, phase two;
/// the block joins the DAG only if all that ran passed. Returns the meta
/// spec of a chain-A block whose payload was checked.
fn verify_one(c: &Candidate<'_>, dag: &mut Dag) -> Result<Option<MetaPayload>, ChainError> {
    let config = validate_header(&c.block, dag)?;
    match c.payload {
        None => {
            dag.insert_header(c.block.hash, c.block.header.clone());
            Ok(None)
        }
        Some(p) => {
            let meta = validate_payload(&c.block.header, p, config.as_ref())?;
            let spec = meta.as_ref().map(|(m, _)| m.clone());
            dag.insert(&ValidatedBlock {
                block: c.block.clone(),
                meta,
            });
            Ok(spec)
        }
    }
}

/// Decode, hash and chain checks, and the fetches' own errors.
fn first_checks(f: &FetchedBlock) -> Result<Candidate<'_>, Box<VerifyReport>> {
    let fail = |block: Option<&Block>, e: String| Box::new(VerifyReport::failed(f, block, e));
    let env = f
        .envelope
        .as_ref()
        .map_err(|e| fail(None, format!("fetching the block failed: {e}")))?;
    let block = Block::decode(env).map_err(|e| fail(None, e.to_string()))?;
    if let Err(e) = block.check_hash(&f.listed_hash) {
        return Err(fail(Some(&block), e.to_string()));
    }
    if block.header.chain != f.listed_chain {
        let e = format!(
            "listed on chain {:?} but the header says chain {:?}",
            f.listed_chain, block.header.chain
        );
        return Err(fail(Some(&block), e));
    }
    let payload = match &f.payload {
        None => None,
        Some(Ok(p)) => Some(p.as_slice()),
        Some(Err(e)) => {
            return Err(fail(
                Some(&block),
                format!("fetching the payload failed: {e}"),
            ))
        }
    };
    Ok(Candidate {
        fetched: f,
        block,
        payload,
    })
}

/// Parse a `GET /chain/{A|B}/blocks` answer (a JSON array of
/// [`BlockInfo`]s). Only the hash and the relay's head claim are used: every
/// other field is read from the signed envelope itself.
pub fn parse_listing(body: &[u8]) -> Result<Vec<BlockInfo>, String> {
    serde_json::from_slice(body).map_err(|e| format!("not a block listing: {e}"))
}

/// What to fetch for one listing: `(hash, chain, relay's head claim)`.
pub fn listed(infos: &[BlockInfo], chain: ChainId) -> Vec<(BlockHash, ChainId, Option<bool>)> {
    infos
        .iter()
        .map(|i| (i.hash, chain, Some(i.is_head)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::{limits, BlockBuilder, MetaPayload, PayloadDtype};
    use crate::model::{Config, Slot};
    use ed25519_dalek::SigningKey;

    const CONFIG: &str = r#"{"architectures":["MixtralForCausalLM"],"model_type":"mixtral",
        "vocab_size":16,"hidden_size":8,"intermediate_size":12,"num_hidden_layers":2,
        "num_attention_heads":2,"num_key_value_heads":1,"rope_theta":10000.0,
        "num_experts_per_tok":2,"num_local_experts":3}"#;

    struct Chain {
        key: SigningKey,
        cfg: Config,
        blocks: Vec<(Block, Vec<u8>)>,
        t: u64,
    }

    impl Chain {
        /// Every block of these tests: small chunks, a hostile address.
        fn builder(&mut self, b: BlockBuilder) -> BlockBuilder {
            self.t += 1;
            b.chunk_size(limits::MIN_CHUNK_SIZE)
                .address("alice <script>")
                .timestamp_ms(1_700_000_000_000 + self.t)
        }

        /// Genesis meta block plus one block per slot; returns the chain.
        fn genesis() -> Self {
            let key = SigningKey::from_bytes(&[3; 32]);
            let config: serde_json::Value = serde_json::from_str(CONFIG).unwrap();
            let cfg = Config::from_value(&config).unwrap();
            let mut c = Chain {
                key,
                cfg,
                blocks: Vec::new(),
                t: 0,
            };
            let meta_payload = MetaPayload::new("tiny", config, None).unwrap().to_json();
            let meta = c
                .builder(BlockBuilder::meta("tiny"))
                .sign(&meta_payload, &c.key.clone());
            let mh = meta.hash;
            c.blocks.push((meta, meta_payload));
            let mut slots = vec![Slot::Shared];
            for layer in 0..c.cfg.num_hidden_layers {
                slots.push(Slot::Router { layer });
                for expert in 0..c.cfg.num_local_experts {
                    slots.push(Slot::Expert { layer, expert });
                }
            }
            for s in slots {
                c.push_slot(mh, s, vec![], 0.5);
            }
            c
        }

        fn payload(&self, slot: Slot, fill: f32) -> Vec<u8> {
            let specs = slot.tensors(&self.cfg);
            let data: Vec<(String, Vec<usize>, Vec<u8>)> = specs
                .iter()
                .map(|t| {
                    let n: usize = t.shape.iter().product();
                    let bytes = std::iter::repeat_n(fill, n)
                        .flat_map(f32::to_le_bytes)
                        .collect();
                    (t.name.clone(), t.shape.clone(), bytes)
                })
                .collect();
            let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
                .iter()
                .map(|(n, s, b)| {
                    (
                        n.clone(),
                        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                            .unwrap(),
                    )
                })
                .collect();
            safetensors::serialize(views, &None).unwrap()
        }

        fn push_slot(
            &mut self,
            meta: BlockHash,
            slot: Slot,
            parents: Vec<BlockHash>,
            fill: f32,
        ) -> BlockHash {
            let payload = self.payload(slot, fill);
            let b = self
                .builder(BlockBuilder::slot(meta, slot, PayloadDtype::F32).parents(parents))
                .sign(&payload, &self.key.clone());
            let hash = b.hash;
            self.blocks.push((b, payload));
            hash
        }

        fn meta(&self) -> BlockHash {
            self.blocks[0].0.hash
        }

        fn hash_of(&self, name: &str) -> BlockHash {
            self.blocks
                .iter()
                .rev()
                .find(|(b, _)| b.header.name == name)
                .unwrap()
                .0
                .hash
        }

        fn fetched(&self) -> Vec<FetchedBlock> {
            self.blocks
                .iter()
                .map(|(b, p)| FetchedBlock::of(b, Some(p.clone())))
                .collect()
        }
    }

    fn status(r: &ChainReport, h: &BlockHash) -> Option<String> {
        r.get(h).unwrap().error.clone()
    }

    #[test]
    fn honest_chain_verifies_in_any_listing_order() {
        let mut c = Chain::genesis();
        // A second and third version of one expert.
        let e = c.hash_of("layer1.expert2");
        let e2 = c.push_slot(
            c.meta(),
            Slot::Expert {
                layer: 1,
                expert: 2,
            },
            vec![e],
            0.25,
        );
        let e3 = c.push_slot(
            c.meta(),
            Slot::Expert {
                layer: 1,
                expert: 2,
            },
            vec![e2],
            0.125,
        );
        let n = c.blocks.len();
        assert_eq!(n, 1 + 1 + 2 * 4 + 2);

        let mut fetched = c.fetched();
        let r = verify_chain(&fetched);
        assert_eq!(
            (r.verified, r.failed, r.total()),
            (n, 0, n),
            "{:#?}",
            r.blocks
                .iter()
                .filter(|b| !b.verified())
                .collect::<Vec<_>>()
        );
        assert_eq!(r.get(&e).unwrap().version, Some(1));
        assert_eq!(r.get(&e2).unwrap().version, Some(2));
        assert_eq!(r.get(&e3).unwrap().version, Some(3));
        assert!(r.get(&e3).unwrap().head && !r.get(&e).unwrap().head);
        assert_eq!(
            r.get(&c.meta()).unwrap().spec.as_deref(),
            Some("2 layers × 3 experts, top2")
        );

        // Relays may list children before parents (and chain B before A).
        fetched.reverse();
        let r2 = verify_chain(&fetched);
        assert_eq!((r2.verified, r2.failed), (n, 0));
        assert_eq!(r2.get(&e3).unwrap().version, Some(3));
        // Verified blocks come in topological order: meta first, parents before children.
        assert_eq!(r2.blocks[0].hash, c.meta());
        let pos = |h: &BlockHash| r2.blocks.iter().position(|b| &b.hash == h).unwrap();
        assert!(pos(&e) < pos(&e2) && pos(&e2) < pos(&e3));
    }

    #[test]
    fn corrupted_payload_fails_that_block_only() {
        let c = Chain::genesis();
        let mut fetched = c.fetched();
        let target = c.hash_of("layer0.expert1");
        let f = fetched
            .iter_mut()
            .find(|f| f.listed_hash == target)
            .unwrap();
        if let Some(Ok(p)) = f.payload.as_mut() {
            let last = p.len() - 1;
            p[last] ^= 1;
        }
        let r = verify_chain(&fetched);
        assert_eq!((r.verified, r.failed), (c.blocks.len() - 1, 1));
        let e = status(&r, &target).unwrap();
        assert!(e.contains("payload root mismatch"), "{e}");
        // Truncated payload: a length error.
        let f = fetched
            .iter_mut()
            .find(|f| f.listed_hash == target)
            .unwrap();
        f.payload = Some(Ok(vec![1, 2, 3]));
        let e = status(&verify_chain(&fetched), &target).unwrap();
        assert!(e.contains("payload length mismatch"), "{e}");
    }

    #[test]
    fn tampered_envelope_and_wrong_listing_fail() {
        let c = Chain::genesis();
        let target = c.hash_of("layer1.router");

        // A header byte flipped: the hash no longer matches the listing.
        let mut fetched = c.fetched();
        let f = fetched
            .iter_mut()
            .find(|f| f.listed_hash == target)
            .unwrap();
        let mut env = f.envelope.clone().unwrap();
        let n = env.len();
        env[n - 70] ^= 0x01; // inside the header, before the signature
        f.envelope = Ok(env);
        let r = verify_chain(&fetched);
        assert_eq!(r.failed, 1);
        let e = status(&r, &target).unwrap();
        assert!(
            e.contains("hash mismatch") || e.contains("malformed"),
            "{e}"
        );

        // Same envelope but a forged signature, listed under its new hash: signature rule.
        let (b, _) = &c.blocks.iter().find(|(b, _)| b.hash == target).unwrap();
        let mut sig = b.signature;
        sig[0] ^= 1;
        let forged = Block::from_parts(b.header.clone(), sig);
        let mut fetched = c.fetched();
        let f = fetched
            .iter_mut()
            .find(|f| f.listed_hash == target)
            .unwrap();
        f.listed_hash = forged.hash;
        f.envelope = Ok(forged.encode());
        let r = verify_chain(&fetched);
        let e = status(&r, &forged.hash).unwrap();
        assert!(e.contains("bad signature"), "{e}");

        // Garbage bytes and a listing on the wrong chain.
        let mut fetched = c.fetched();
        fetched[3].envelope = Ok(b"not a block".to_vec());
        fetched[4].listed_chain = ChainId::A;
        fetched[5].payload = Some(Err("HTTP 500".into()));
        fetched[6].envelope = Err("HTTP 404".into());
        let r = verify_chain(&fetched);
        assert_eq!(r.failed, 4);
        let error = |i: usize| {
            r.get(&fetched[i].listed_hash)
                .unwrap()
                .error
                .clone()
                .unwrap()
        };
        assert!(error(3).contains("malformed"));
        assert!(error(4).contains("listed on chain A"));
        assert!(error(5).contains("HTTP 500"));
        assert!(error(6).contains("HTTP 404"));
    }

    #[test]
    fn failure_propagates_to_dependents() {
        let mut c = Chain::genesis();
        let e = c.hash_of("layer0.expert0");
        let e2 = c.push_slot(
            c.meta(),
            Slot::Expert {
                layer: 0,
                expert: 0,
            },
            vec![e],
            0.1,
        );
        let mut fetched = c.fetched();
        // Break the meta block: every chain-B block depends on it.
        fetched[0].payload = Some(Ok(b"{}".to_vec()));
        let r = verify_chain(&fetched);
        assert_eq!((r.verified, r.failed), (0, c.blocks.len()));
        assert!(status(&r, &e2).unwrap().contains("failed verification"));

        // Break only the first version: the second one fails, the rest verify.
        let mut fetched = c.fetched();
        let f = fetched.iter_mut().find(|f| f.listed_hash == e).unwrap();
        f.payload = Some(Ok(vec![0; 8]));
        let r = verify_chain(&fetched);
        assert_eq!(r.failed, 2);
        assert!(status(&r, &e2)
            .unwrap()
            .contains(&format!("depends on block {}", e.short())));
    }

    #[test]
    fn verifying_in_small_steps_gives_the_same_report() {
        let mut c = Chain::genesis();
        let e = c.hash_of("layer0.expert0");
        let e2 = c.push_slot(
            c.meta(),
            Slot::Expert {
                layer: 0,
                expert: 0,
            },
            vec![e],
            0.1,
        );
        let mut fetched = c.fetched();
        // Children listed before their parents (several passes), one
        // broken block and its dependent, one block whose parent is not listed.
        fetched.reverse();
        let f = fetched.iter_mut().find(|f| f.listed_hash == e).unwrap();
        f.payload = Some(Ok(vec![0; 8]));
        let lone = c.push_slot(
            c.meta(),
            Slot::Expert {
                layer: 1,
                expert: 1,
            },
            vec![BlockHash([9; 32])],
            0.2,
        );
        fetched.push(FetchedBlock::of(
            &c.blocks.last().unwrap().0,
            Some(c.blocks.last().unwrap().1.clone()),
        ));
        let (whole, dag) = verify_chain_dag(&fetched);
        assert!(whole.failed >= 3 && whole.verified > 0, "{whole:?}");
        assert!(status(&whole, &e2).unwrap().contains("depends on block"));
        assert!(status(&whole, &lone).is_some());
        for max in [1, 2, 5] {
            let mut v = ChainVerifier::new(&fetched);
            let mut steps = 1;
            while !v.step(max) {
                steps += 1;
            }
            assert!(steps >= fetched.len() / max, "{steps} steps of {max}");
            let (stepped, dag2) = v.finish();
            assert_eq!(stepped, whole);
            assert_eq!(dag2.len(), dag.len());
        }
    }

    #[test]
    fn missing_parent_fork_and_duplicate_are_reported() {
        let mut c = Chain::genesis();
        let e = c.hash_of("layer0.router");
        let v2 = c.push_slot(c.meta(), Slot::Router { layer: 0 }, vec![e], 0.1);
        // A fork: another child of v1 while v2 is the head.
        let fork = c.push_slot(c.meta(), Slot::Router { layer: 0 }, vec![e], 0.2);
        let fetched = c.fetched();
        let r = verify_chain(&fetched);
        assert!(r.get(&v2).unwrap().verified());
        let err = status(&r, &fork).unwrap();
        assert!(
            err.contains("old version") || err.contains("has head"),
            "{err}"
        );

        // Parent not listed by the relay at all.
        let fetched: Vec<_> = c
            .fetched()
            .into_iter()
            .filter(|f| f.listed_hash != e)
            .collect();
        let r = verify_chain(&fetched);
        let err = status(&r, &v2).unwrap();
        assert!(err.contains("unknown"), "{err}");

        // Listed twice.
        let mut fetched = c.fetched();
        fetched.truncate(3);
        fetched.push(fetched[2].clone());
        let r = verify_chain(&fetched);
        assert_eq!((r.verified, r.failed, r.total()), (3, 1, 4));
        assert!(r.blocks[3]
            .error
            .as_ref()
            .unwrap()
            .contains("already exists"));
    }

    #[test]
    fn out_of_spec_slot_fails() {
        let mut c = Chain::genesis();
        // Expert 3 of a 3-expert model: signed honestly, but outside the spec.
        let cfg = c.cfg.clone();
        let mut big = cfg.clone();
        big.num_local_experts = 4;
        c.cfg = big;
        let h = c.push_slot(
            c.meta(),
            Slot::Expert {
                layer: 0,
                expert: 3,
            },
            vec![],
            0.1,
        );
        c.cfg = cfg;
        let r = verify_chain(&c.fetched());
        assert_eq!(r.failed, 1);
        assert!(status(&r, &h).unwrap().contains("outside the spec"));
    }

    #[test]
    fn listing_parses_block_infos_and_rejects_garbage() {
        let c = Chain::genesis();
        let infos: Vec<BlockInfo> = c
            .blocks
            .iter()
            .take(3)
            .map(|(b, _)| BlockInfo::from(b).with_head(true))
            .collect();
        let body = serde_json::to_vec(&infos).unwrap();
        let parsed = parse_listing(&body).unwrap();
        assert_eq!(parsed, infos);
        let l = listed(&parsed, ChainId::B);
        assert_eq!(l[2], (c.blocks[2].0.hash, ChainId::B, Some(true)));
        assert_eq!(parse_listing(b"[]").unwrap(), vec![]);
        assert!(parse_listing(b"[{\"hash\":\"zz\"}]").is_err());
        assert!(parse_listing(b"{\"code\":\"x\",\"message\":\"y\"}").is_err());
        assert!(parse_listing(b"<html>").is_err());
    }

    #[test]
    fn relay_head_claims_are_checked() {
        let mut c = Chain::genesis();
        let e = c.hash_of("layer0.expert0");
        let e2 = c.push_slot(
            c.meta(),
            Slot::Expert {
                layer: 0,
                expert: 0,
            },
            vec![e],
            0.1,
        );
        let mut fetched = c.fetched();
        for f in &mut fetched {
            f.listed_head = Some(f.listed_hash != e);
        }
        let r = verify_chain(&fetched);
        assert_eq!(r.failed, 0);
        assert!(r.blocks.iter().all(|b| b.relay_head_disagrees.is_none()));
        // A relay that calls the old version the head (and the new one not).
        for f in &mut fetched {
            f.listed_head = Some(f.listed_hash != e2);
        }
        let r = verify_chain(&fetched);
        assert_eq!(
            r.failed, 0,
            "a wrong head claim does not make a block invalid"
        );
        assert_eq!(r.get(&e).unwrap().relay_head_disagrees, Some(true));
        assert_eq!(r.get(&e2).unwrap().relay_head_disagrees, Some(false));
    }

    #[test]
    fn empty_listing_is_empty_report() {
        let r = verify_chain(&[]);
        assert_eq!((r.verified, r.failed, r.total()), (0, 0, 0));
    }
}
