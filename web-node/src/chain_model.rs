//! A runnable model built from a verified chain: the latest chain-A meta
//! block gives the config and tokenizer, the heads of its chain-B slots the
//! weights. Only the meta, shared and router payloads are needed to start;
//! an expert's payload is fetched (by the caller, from anywhere) when the
//! engine asks for it ([`crate::model::Step::Need`]) and checked against
//! the header-verified DAG before it is used.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::chain::{BlockHash, Dag, MetaPayload};
use crate::model::reference::CpuEngine;
use crate::model::tokenizer::Tokenizer;
use crate::model::{
    Config, ExpertId, ExpertWeights, ModelError, RouterWeights, SharedWeights, Slot,
};

/// Why a chain could not be turned into a model.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("the chain has no verified model (chain-A meta block)")]
    NoModel,
    #[error("the model's meta block carries no tokenizer.json")]
    NoTokenizer,
    #[error("slot {0} has no verified block")]
    MissingSlot(String),
    #[error("the payload of block {0} is not available")]
    MissingPayload(BlockHash),
    #[error("bad meta payload: {0}")]
    Meta(String),
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// The default model of a verified chain, ready to generate.
pub struct ChainModel {
    /// Hash and name of the chain-A meta block.
    pub meta: BlockHash,
    pub name: String,
    /// Chain-B head per slot name.
    pub heads: BTreeMap<String, BlockHash>,
    pub config: Config,
    pub tokenizer: Tokenizer,
    /// The CPU engine over the shared weights and routers; experts are
    /// supplied as they are routed.
    pub engine: CpuEngine,
    shared_payload: Arc<[u8]>,
    router_payloads: Vec<Arc<[u8]>>,
    /// Per layer, its `layerN.shared_expert` payload (None for a family
    /// without one).
    shared_expert_payloads: Vec<Option<Arc<[u8]>>>,
}

/// Every layer's router with its shared expert, from their payloads.
fn routers_from_payloads(
    cfg: &Config,
    routers: &[Arc<[u8]>],
    shared_experts: &[Option<Arc<[u8]>>],
) -> Result<Vec<RouterWeights>, ModelError> {
    routers
        .iter()
        .zip(shared_experts)
        .enumerate()
        .map(|(layer, (r, se))| RouterWeights::from_payloads(cfg, layer, r, se.as_deref()))
        .collect()
}

impl std::fmt::Debug for ChainModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChainModel")
            .field("meta", &self.meta)
            .field("name", &self.name)
            .field("heads", &self.heads.len())
            .finish()
    }
}

/// The blocks a node needs before it can start: the latest meta block, then
/// (once its payload gives the config) the shared block and every router
/// (with its layer's shared expert, for a family that has one).
pub fn startup_blocks(dag: &Dag) -> Result<Vec<BlockHash>, NodeError> {
    startup_blocks_of(dag, None)
}

/// The model `sel` names (a meta block hash or a model name, see
/// [`Dag::find_meta`]); `None`: the newest model.
pub fn select_meta<'a>(
    dag: &'a Dag,
    sel: Option<&str>,
) -> Result<&'a crate::chain::DagEntry, NodeError> {
    match sel {
        None => dag.latest_meta().ok_or(NodeError::NoModel),
        Some(s) => dag.find_meta(s).ok_or(NodeError::NoModel),
    }
}

/// [`startup_blocks`] of the model `sel` names (None: the newest).
pub fn startup_blocks_of(dag: &Dag, sel: Option<&str>) -> Result<Vec<BlockHash>, NodeError> {
    let meta = select_meta(dag, sel)?;
    let mut out = vec![meta.hash];
    let heads = dag.slot_heads(&meta.hash);
    if let Some(cfg) = &meta.config {
        for slot in Slot::always_needed(cfg) {
            let name = slot.to_string();
            out.push(*heads.get(&name).ok_or(NodeError::MissingSlot(name))?);
        }
    }
    Ok(out)
}

impl ChainModel {
    /// Build the latest model of `dag` (headers verified) from the verified
    /// payloads `payload` returns by block hash: the meta block, the shared
    /// block and the routers. Every expert slot must have a verified header;
    /// its payload is not needed yet.
    pub fn from_verified(
        dag: &Dag,
        payload: impl Fn(&BlockHash) -> Option<Arc<[u8]>>,
    ) -> Result<Self, NodeError> {
        Self::from_verified_meta(dag, None, payload)
    }

    /// [`ChainModel::from_verified`] for the model `meta` (a meta block's
    /// hash); `None` takes the newest model.
    pub fn from_verified_meta(
        dag: &Dag,
        meta: Option<BlockHash>,
        payload: impl Fn(&BlockHash) -> Option<Arc<[u8]>>,
    ) -> Result<Self, NodeError> {
        let meta = match meta {
            None => dag.latest_meta().ok_or(NodeError::NoModel)?,
            Some(h) => dag.find_meta(&h.to_hex()).ok_or(NodeError::NoModel)?,
        };
        let get = |h: &BlockHash| payload(h).ok_or(NodeError::MissingPayload(*h));
        let (spec, cfg): (MetaPayload, Config) =
            MetaPayload::parse(&get(&meta.hash)?).map_err(|e| NodeError::Meta(e.to_string()))?;
        let tok_json = spec.tokenizer.as_ref().ok_or(NodeError::NoTokenizer)?;
        let tok_bytes = serde_json::to_vec(tok_json).map_err(|e| NodeError::Meta(e.to_string()))?;
        let tokenizer = Tokenizer::from_bytes(&tok_bytes)?;

        let heads = dag.slot_heads(&meta.hash);
        for slot in Slot::all(&cfg) {
            let name = slot.to_string();
            if !heads.contains_key(&name) {
                return Err(NodeError::MissingSlot(name));
            }
        }
        let head = |slot: Slot| heads[&slot.to_string()];
        let shared_payload = get(&head(Slot::Shared))?;
        let shared = SharedWeights::from_safetensors(&cfg, &shared_payload)?;
        let router_payloads = (0..cfg.num_hidden_layers)
            .map(|layer| get(&head(Slot::Router { layer })))
            .collect::<Result<Vec<_>, NodeError>>()?;
        let shared_expert_payloads = if cfg.family().has_shared_expert() {
            (0..cfg.num_hidden_layers)
                .map(|layer| get(&head(Slot::SharedExpert { layer })).map(Some))
                .collect::<Result<Vec<_>, NodeError>>()?
        } else {
            vec![None; cfg.num_hidden_layers]
        };
        let routers = routers_from_payloads(&cfg, &router_payloads, &shared_expert_payloads)?;
        let engine = CpuEngine::new(cfg.clone(), shared, routers)?;
        Ok(Self {
            meta: meta.hash,
            name: meta.header.name.clone(),
            heads,
            config: cfg,
            tokenizer,
            engine,
            shared_payload,
            router_payloads,
            shared_expert_payloads,
        })
    }

    /// The head block of an expert slot (what to fetch when it is needed).
    pub fn expert_block(&self, id: ExpertId) -> Option<BlockHash> {
        let slot = Slot::Expert {
            layer: id.layer,
            expert: id.expert,
        };
        self.heads.get(&slot.to_string()).copied()
    }

    /// The head block of every expert slot that has one.
    pub fn expert_heads(&self) -> std::collections::HashMap<ExpertId, BlockHash> {
        (0..self.config.num_hidden_layers)
            .flat_map(|l| (0..self.config.num_local_experts).map(move |e| ExpertId::new(l, e)))
            .filter_map(|id| self.expert_block(id).map(|h| (id, h)))
            .collect()
    }

    /// Bytes of every expert payload (from the verified headers).
    pub fn all_expert_bytes(&self, dag: &Dag) -> u64 {
        Slot::all(&self.config)
            .into_iter()
            .filter(|s| matches!(s, Slot::Expert { .. }))
            .filter_map(|s| self.heads.get(&s.to_string()))
            .filter_map(|h| dag.get(h))
            .map(|e| e.header.payload_len)
            .sum()
    }

    /// An expert's weights from its verified payload.
    pub fn expert_weights(
        &self,
        id: ExpertId,
        payload: &[u8],
    ) -> Result<ExpertWeights, ModelError> {
        ExpertWeights::from_safetensors(&self.config, id.layer, id.expert, payload)
    }

    /// What another engine (the GPU one) needs: config, shared weights and
    /// routers, from the same verified payloads.
    pub fn engine_parts(&self) -> Result<(Config, SharedWeights, Vec<RouterWeights>), ModelError> {
        let cfg = self.config.clone();
        let shared = SharedWeights::from_safetensors(&cfg, &self.shared_payload)?;
        let routers =
            routers_from_payloads(&cfg, &self.router_payloads, &self.shared_expert_payloads)?;
        Ok((cfg, shared, routers))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use super::*;
    use crate::chain::{chunk_hashes, limits, Block, ChainError, PayloadAssembler, PayloadStatus};
    use crate::model::generate::{generate_async, generate_from_ids, prompt_ids};
    use crate::model::random::{tiny_config, RandomModel};
    use crate::model::reference::CpuModel;
    use crate::model::sampler::Sampler;
    use crate::model::{engine::now, RunOptions, Supply};
    use crate::test_chain::TinyChain;
    use crate::verify::{verify_chain_dag, FetchedBlock};

    /// A random tiny model as signed blocks: (block, payload) in chain order
    /// (the crate's one signed tiny-chain fixture, [`crate::test_chain`]).
    fn chain_of_random_model() -> (Vec<(Block, Vec<u8>)>, RandomModel) {
        let c = TinyChain::new(7);
        (c.blocks(), c.model)
    }

    /// Headers only, but for the payloads named in `with`.
    fn listing(blocks: &[(Block, Vec<u8>)], with: &HashSet<BlockHash>) -> Vec<FetchedBlock> {
        blocks
            .iter()
            .map(|(b, p)| FetchedBlock::of(b, with.contains(&b.hash).then(|| p.clone())))
            .collect()
    }

    /// Serves payload chunks from several sources (the first may lie), the
    /// way peers and the relay would, through [`PayloadAssembler`].
    struct Fetcher {
        blocks: HashMap<BlockHash, Block>,
        /// Each source: payloads by block hash.
        sources: Vec<HashMap<BlockHash, Vec<u8>>>,
        heads: BTreeMap<String, BlockHash>,
        config: Config,
        fetched: HashSet<BlockHash>,
        bytes: u64,
        rejected: Vec<ChainError>,
    }

    impl Fetcher {
        fn fetch(&mut self, hash: &BlockHash) -> Result<Vec<u8>, ChainError> {
            let block = &self.blocks[hash];
            let mut asm = PayloadAssembler::new(block);
            let honest = self.sources.last().unwrap()[hash].clone();
            asm.set_chunk_list(chunk_hashes(&honest, block.header.chunk_size))?;
            for i in asm.missing() {
                let r = asm.chunk_range(i).unwrap();
                for src in &self.sources {
                    let bytes = src[hash][r.start as usize..r.end as usize].to_vec();
                    self.bytes += bytes.len() as u64;
                    match asm.add_chunk(i, bytes) {
                        Ok(_) => break,
                        Err(e) => self.rejected.push(e),
                    }
                }
            }
            self.fetched.insert(*hash);
            Ok(asm.finish(Some(&self.config))?.bytes)
        }
    }

    impl Supply for Fetcher {
        async fn experts(
            &mut self,
            need: &[ExpertId],
        ) -> Result<Vec<(ExpertId, ExpertWeights)>, ModelError> {
            let mut out = Vec::new();
            for &id in need {
                let slot = Slot::Expert {
                    layer: id.layer,
                    expert: id.expert,
                };
                let h = self.heads[&slot.to_string()];
                let p = self
                    .fetch(&h)
                    .map_err(|e| ModelError::Source(e.to_string()))?;
                let w = ExpertWeights::from_safetensors(&self.config, id.layer, id.expert, &p)?;
                out.push((id, w));
            }
            Ok(out)
        }
    }

    #[test]
    fn lazy_node_verifies_from_headers_and_fetches_only_routed_experts() {
        let (blocks, m) = chain_of_random_model();
        // Step 1: every header, and the meta payload (it gives the config).
        let meta = blocks[0].0.hash;
        let (report, mut dag) = verify_chain_dag(&listing(&blocks, &HashSet::from([meta])));
        assert_eq!((report.verified, report.failed), (blocks.len(), 0));
        assert_eq!(
            report.blocks.iter().filter(|r| r.payload_verified).count(),
            1
        );
        // Step 2: the shared block and the routers, chunk by chunk.
        let start = startup_blocks(&dag).unwrap();
        assert_eq!(start.len(), 1 + 1 + tiny_config().num_hidden_layers);
        let payloads: HashMap<BlockHash, Vec<u8>> =
            blocks.iter().map(|(b, p)| (b.hash, p.clone())).collect();
        let heads = dag.slot_heads(&meta);
        let mut fetcher = Fetcher {
            blocks: blocks.iter().map(|(b, _)| (b.hash, b.clone())).collect(),
            sources: vec![payloads.clone()],
            heads,
            config: tiny_config(),
            fetched: HashSet::new(),
            bytes: 0,
            rejected: Vec::new(),
        };
        let mut have: HashMap<BlockHash, Arc<[u8]>> = HashMap::new();
        have.insert(meta, payloads[&meta].clone().into());
        for h in &start[1..] {
            have.insert(*h, fetcher.fetch(h).unwrap().into());
            dag.set_payload(h, PayloadStatus::Verified, None);
        }
        let mut cm = ChainModel::from_verified(&dag, |h| have.get(h).cloned()).unwrap();
        assert_eq!(cm.name, "tiny");
        assert_eq!(cm.heads.len(), 1 + 4 + 4 * 8);

        // The full model, loaded directly from the checkpoint.
        let mut full = CpuModel::from_safetensors(tiny_config(), m.safetensors.clone()).unwrap();
        let opts = RunOptions::default();
        fetcher.bytes = 0;
        let shared_bytes: u64 = start.iter().map(|h| payloads[h].len() as u64).sum();
        for prompt in ["hello", "ab", "the cat"] {
            let ids = prompt_ids(&cm.tokenizer, &cm.config, prompt).unwrap();
            let mut s = Sampler::greedy();
            let lazy = now(generate_async(
                &mut cm.engine,
                &mut fetcher,
                &cm.tokenizer,
                ids.clone(),
                10,
                &mut s,
                &opts,
                |_, _| true,
            ))
            .unwrap();
            let mut s = Sampler::greedy();
            let direct =
                generate_from_ids(&mut full, &cm.tokenizer, ids, 10, &mut s, &opts, |_, _| {
                    true
                })
                .unwrap();
            assert_eq!(lazy.tokens, direct.tokens, "prompt {prompt:?}");
            assert!(!lazy.tokens.is_empty());
        }
        // Only the routed experts were fetched, each once.
        let routed: HashSet<BlockHash> = cm
            .engine
            .routing_stats()
            .routed()
            .into_iter()
            .map(|(l, e, _)| cm.expert_block(ExpertId::new(l, e)).unwrap())
            .collect();
        assert_eq!(
            fetcher
                .fetched
                .difference(&start.iter().copied().collect())
                .count(),
            routed.len()
        );
        assert!(routed.iter().all(|h| fetcher.fetched.contains(h)));
        let all_experts = cm.all_expert_bytes(&dag);
        let whole: u64 = blocks.iter().map(|(b, _)| b.header.payload_len).sum();
        println!(
            "lazy node: fetched {} expert bytes of {all_experts} ({} of 32 experts); \
             with meta, shared and routers {} of the whole model's {whole} bytes",
            fetcher.bytes,
            routed.len(),
            fetcher.bytes + shared_bytes,
        );
        assert!(fetcher.bytes <= all_experts);
        assert!(fetcher.rejected.is_empty());
    }

    #[test]
    fn corrupt_chunk_is_rejected_by_name_and_another_source_completes_it() {
        let (blocks, _) = chain_of_random_model();
        let payloads: HashMap<BlockHash, Vec<u8>> =
            blocks.iter().map(|(b, p)| (b.hash, p.clone())).collect();
        let (shared, _) = &blocks[1];
        assert!(shared.header.payload_len > 2 * limits::MIN_CHUNK_SIZE as u64);
        // A lying source: one byte of chunk 1 of the shared block flipped.
        let mut liar = payloads.clone();
        let p = liar.get_mut(&shared.hash).unwrap();
        p[limits::MIN_CHUNK_SIZE as usize + 3] ^= 0x40;
        let mut fetcher = Fetcher {
            blocks: blocks.iter().map(|(b, _)| (b.hash, b.clone())).collect(),
            sources: vec![liar, payloads.clone()],
            heads: BTreeMap::new(),
            config: tiny_config(),
            fetched: HashSet::new(),
            bytes: 0,
            rejected: Vec::new(),
        };
        let got = fetcher.fetch(&shared.hash).unwrap();
        assert_eq!(got, payloads[&shared.hash]);
        assert_eq!(
            fetcher.rejected,
            vec![ChainError::ChunkHash {
                block: shared.hash,
                index: 1
            }]
        );
        let msg = fetcher.rejected[0].to_string();
        assert!(
            msg.contains(&shared.hash.to_hex()) && msg.contains("chunk 1"),
            "{msg}"
        );
    }

    #[test]
    fn bad_chunk_lists_and_chunks_are_refused_and_nothing_kept() {
        let (blocks, _) = chain_of_random_model();
        let (b, p) = &blocks[1];
        let mut asm = PayloadAssembler::new(b);
        let list = chunk_hashes(p, b.header.chunk_size);
        // A chunk before the list, a short list, a list with a wrong root.
        assert!(matches!(
            asm.add_chunk(0, p[..4096].to_vec()),
            Err(ChainError::ChunkList { .. })
        ));
        assert!(matches!(
            asm.set_chunk_list(list[1..].to_vec()),
            Err(ChainError::ChunkList { .. })
        ));
        let mut wrong = list.clone();
        wrong.swap(0, 1);
        assert!(matches!(
            asm.set_chunk_list(wrong),
            Err(ChainError::PayloadRoot { .. })
        ));
        asm.set_chunk_list(list.clone()).unwrap();
        // Out of range, wrong length, wrong bytes: refused, nothing counted.
        assert!(matches!(
            asm.add_chunk(list.len() as u64, vec![]),
            Err(ChainError::ChunkList { .. })
        ));
        assert!(matches!(
            asm.add_chunk(0, vec![0; 10]),
            Err(ChainError::ChunkHash { .. })
        ));
        assert!(matches!(
            asm.add_chunk(0, vec![0; 4096]),
            Err(ChainError::ChunkHash { .. })
        ));
        assert_eq!(asm.received(), 0);
        assert_eq!(asm.missing().len(), list.len());
        // An incomplete payload cannot be finished.
        asm.add_chunk(0, p[..4096].to_vec()).unwrap();
        assert!(matches!(
            asm.status(),
            PayloadStatus::Partial { chunks: 1, .. }
        ));
        assert!(asm.clone().finish(Some(&tiny_config())).is_err());
        for i in asm.missing() {
            let r = asm.chunk_range(i).unwrap();
            asm.add_chunk(i, p[r.start as usize..r.end as usize].to_vec())
                .unwrap();
        }
        assert_eq!(asm.finish(Some(&tiny_config())).unwrap().bytes, *p);
    }

    #[test]
    fn missing_slot_or_payload_is_an_error() {
        let (blocks, _) = chain_of_random_model();
        let payloads: HashMap<BlockHash, Arc<[u8]>> = blocks
            .iter()
            .map(|(b, p)| (b.hash, Arc::from(p.clone())))
            .collect();
        let all: HashSet<BlockHash> = blocks.iter().map(|(b, _)| b.hash).collect();
        // Drop one expert block: that slot has no verified head.
        let fewer: Vec<_> = blocks
            .iter()
            .filter(|(b, _)| b.hash != blocks[7].0.hash)
            .cloned()
            .collect();
        let (_, dag) = verify_chain_dag(&listing(&fewer, &all));
        let err = ChainModel::from_verified(&dag, |h| payloads.get(h).cloned()).unwrap_err();
        assert!(matches!(err, NodeError::MissingSlot(_)), "{err}");

        // The shared payload is not there.
        let (_, dag) = verify_chain_dag(&listing(&blocks, &all));
        let shared = blocks[1].0.hash;
        let err = ChainModel::from_verified(&dag, |h| {
            (h != &shared).then(|| payloads.get(h).cloned()).flatten()
        })
        .unwrap_err();
        assert!(
            matches!(err, NodeError::MissingPayload(h) if h == shared),
            "{err}"
        );

        assert!(matches!(
            ChainModel::from_verified(&Dag::new(), |h| payloads.get(h).cloned()).unwrap_err(),
            NodeError::NoModel
        ));
    }

    #[test]
    fn chain_b_headers_need_the_verified_meta_payload() {
        let (blocks, _) = chain_of_random_model();
        // No payload at all: the meta header verifies, chain B cannot.
        let (report, _) = verify_chain_dag(&listing(&blocks, &HashSet::new()));
        assert_eq!(report.verified, 1);
        let r = report.get(&blocks[1].0.hash).unwrap();
        assert!(
            r.error.as_deref().unwrap().contains("not verified yet"),
            "{r:?}"
        );
    }
}
