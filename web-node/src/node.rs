//! A runnable model assembled from a verified chain: the latest chain-A meta
//! block gives the config and tokenizer, the heads of its chain-B slots give
//! the weights. Used by the web page to chat with the chain it just verified
//! (CPU reference forward in wasm); plain Rust, covered by native tests.

use std::collections::HashMap;
use std::sync::Arc;

use crate::chain::{BlockHash, Dag, MetaPayload};
use crate::model::generate::{generate, Generation};
use crate::model::load::MapExpertSource;
use crate::model::reference::CpuModel;
use crate::model::sampler::{Sampler, SamplerConfig};
use crate::model::tokenizer::Tokenizer;
use crate::model::{Config, Forward, ModelError, RouterWeights, RunOptions, SharedWeights, Slot};

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
    /// Chain-B head per slot name, as used.
    pub heads: Vec<(String, BlockHash)>,
    pub tokenizer: Tokenizer,
    pub model: CpuModel,
    /// The verified payloads the model was built from, for other engines.
    shared_payload: Arc<[u8]>,
    router_payloads: Vec<Arc<[u8]>>,
    experts: MapExpertSource,
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

impl ChainModel {
    /// Build the latest model of `dag` (blocks already verified) from the
    /// payloads `payloads` holds by block hash. Experts are decoded lazily,
    /// the first time the router picks them.
    pub fn from_verified(
        dag: &Dag,
        payloads: &HashMap<BlockHash, Arc<[u8]>>,
    ) -> Result<Self, NodeError> {
        let meta = dag.latest_meta().ok_or(NodeError::NoModel)?;
        let payload = |h: &BlockHash| {
            payloads
                .get(h)
                .cloned()
                .ok_or(NodeError::MissingPayload(*h))
        };
        let (spec, cfg): (MetaPayload, Config) = MetaPayload::parse(&payload(&meta.hash)?)
            .map_err(|e| NodeError::Meta(e.to_string()))?;
        let tok_json = spec.tokenizer.as_ref().ok_or(NodeError::NoTokenizer)?;
        let tok_bytes = serde_json::to_vec(tok_json).map_err(|e| NodeError::Meta(e.to_string()))?;
        let tokenizer = Tokenizer::from_bytes(&tok_bytes)?;

        let heads = dag.slot_heads(&meta.hash);
        let head = |slot: Slot| {
            let name = slot.to_string();
            heads
                .get(&name)
                .copied()
                .ok_or(NodeError::MissingSlot(name))
        };
        let shared_payload = payload(&head(Slot::Shared)?)?;
        let shared = SharedWeights::from_safetensors(&cfg, &shared_payload)?;
        let router_payloads = (0..cfg.num_hidden_layers)
            .map(|layer| payload(&head(Slot::Router { layer })?))
            .collect::<Result<Vec<_>, NodeError>>()?;
        let routers = router_payloads
            .iter()
            .enumerate()
            .map(|(layer, p)| RouterWeights::from_safetensors(&cfg, layer, p))
            .collect::<Result<Vec<_>, ModelError>>()?;
        let mut source = MapExpertSource::new(cfg.clone());
        for layer in 0..cfg.num_hidden_layers {
            for expert in 0..cfg.num_local_experts {
                source.insert(
                    layer,
                    expert,
                    payload(&head(Slot::Expert { layer, expert })?)?,
                );
            }
        }
        let model = CpuModel::new(cfg, shared, routers, source.clone())?;
        Ok(Self {
            meta: meta.hash,
            name: meta.header.name.clone(),
            heads: heads.into_iter().collect(),
            tokenizer,
            model,
            shared_payload,
            router_payloads,
            experts: source,
        })
    }

    /// What another engine (the GPU one) needs: config, shared weights,
    /// routers, and an expert source over the same verified payloads.
    pub fn engine_parts(
        &self,
    ) -> Result<(Config, SharedWeights, Vec<RouterWeights>, MapExpertSource), ModelError> {
        let cfg = self.model.config().clone();
        let shared = SharedWeights::from_safetensors(&cfg, &self.shared_payload)?;
        let routers = self
            .router_payloads
            .iter()
            .enumerate()
            .map(|(layer, p)| RouterWeights::from_safetensors(&cfg, layer, p))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((cfg, shared, routers, self.experts.clone()))
    }

    /// Generate a reply to `prompt`; `on_token(id, text)` sees each piece.
    pub fn chat(
        &mut self,
        prompt: &str,
        max_tokens: usize,
        sampler: SamplerConfig,
        opts: &RunOptions,
        on_token: impl FnMut(u32, &str) -> bool,
    ) -> Result<Generation, ModelError> {
        let mut sampler = Sampler::new(sampler)?;
        generate(
            &mut self.model,
            &self.tokenizer,
            prompt,
            max_tokens,
            &mut sampler,
            opts,
            on_token,
        )
    }
}

/// The chat section of the page: a form when the chain holds a runnable
/// model, otherwise the reason there is none (never a form wired to nothing).
pub fn render_chat(model: Result<&ChainModel, &NodeError>) -> String {
    use crate::verify::escape_html;
    match model {
        Err(e) => format!(
            "<section id=\"chat\" data-state=\"unavailable\"><h2>Chat</h2>\
             <p class=\"muted\">No model to chat with: {}</p></section>",
            escape_html(&e.to_string())
        ),
        Ok(m) => {
            let cfg = m.model.config();
            format!(
                "<section id=\"chat\" data-state=\"ready\"><h2>Chat with {name}</h2>\
                 <p class=\"muted\">Runs in this browser (CPU, WebAssembly) on the verified heads of \
                 meta block <span class=\"hash\">{meta}</span>: {layers} layers × {experts} experts, \
                 top-{k}; an expert's weights are decoded the first time the router picks it.</p>\
                 <form id=\"chat-form\"><textarea id=\"prompt\" rows=\"2\" cols=\"60\" \
                 placeholder=\"Q: 38+45=? A:  (the default model answers prompts in this form)\"></textarea><br>\
                 <label>max tokens <input id=\"max-tokens\" type=\"number\" min=\"1\" max=\"512\" value=\"32\"></label> \
                 <label>temperature <input id=\"temperature\" type=\"number\" min=\"0\" step=\"0.1\" value=\"0\"></label> \
                 <label>experts per token <input id=\"top-k\" type=\"number\" min=\"1\" max=\"{experts}\" value=\"{k}\"></label> \
                 <label>engine <select id=\"device\"><option value=\"cpu\">CPU (wasm)</option>\
                 <option value=\"gpu\">GPU (WebGPU, greedy)</option></select></label> \
                 <button id=\"send\" type=\"submit\">Generate</button></form>\
                 <pre id=\"reply\" data-state=\"idle\"></pre><div id=\"chat-stats\" class=\"muted\"></div></section>",
                name = escape_html(&m.name),
                meta = m.meta.short(),
                layers = cfg.num_hidden_layers,
                experts = cfg.num_local_experts,
                k = cfg.num_experts_per_tok,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::{limits, validate_block};
    use crate::model::checkpoint::{split_checkpoint, Signer};
    use crate::model::random::{random_model_bytes, tiny_config};
    use crate::model::reference::CpuModel;
    use crate::verify::{verify_chain_dag, FetchedBlock};
    use ed25519_dalek::SigningKey;

    /// A random tiny model as the signed blocks a relay would serve.
    fn chain_of_random_model() -> (Vec<FetchedBlock>, crate::model::random::RandomModel) {
        let cfg = tiny_config();
        let m = random_model_bytes(&cfg, 7).unwrap();
        let key = SigningKey::from_bytes(&[5; 32]);
        let signer = Signer {
            key: &key,
            address: "op".into(),
            timestamp_ms: 1,
            chunk_size: limits::MIN_CHUNK_SIZE,
        };
        let config: serde_json::Value = serde_json::from_slice(&m.config_json).unwrap();
        let tok: serde_json::Value = serde_json::from_slice(&m.tokenizer_json).unwrap();
        let spec = MetaPayload::new("tiny", config, Some(tok)).unwrap();
        let (meta, meta_payload) = signer.meta_block(&spec, None).unwrap();
        let mut dag = Dag::new();
        let mut out = Vec::new();
        let mut push = |dag: &mut Dag, b: crate::chain::Block, p: Vec<u8>| {
            dag.insert(&validate_block(&b, &p, dag).unwrap());
            out.push(FetchedBlock {
                listed_hash: b.hash,
                listed_chain: b.header.chain,
                listed_head: None,
                envelope: Ok(b.encode()),
                payload: Ok(p),
            });
        };
        let mh = meta.hash;
        push(&mut dag, meta, meta_payload);
        for s in split_checkpoint(&cfg, &[&m.safetensors]).unwrap() {
            let (b, p) = signer.slot_block(mh, &s, vec![], None);
            push(&mut dag, b, p);
        }
        (out, m)
    }

    #[test]
    fn model_from_verified_chain_generates_like_the_checkpoint() {
        let (fetched, m) = chain_of_random_model();
        let (report, dag) = verify_chain_dag(&fetched);
        assert_eq!(report.failed, 0);
        let payloads = fetched
            .iter()
            .map(|f| (f.listed_hash, Arc::from(f.payload.clone().unwrap())))
            .collect();
        let mut cm = ChainModel::from_verified(&dag, &payloads).unwrap();
        assert_eq!(cm.name, "tiny");
        assert_eq!(cm.heads.len(), 1 + 4 + 4 * 8);
        let html = render_chat(Ok(&cm));
        assert!(html.contains("data-state=\"ready\"") && html.contains("id=\"prompt\""));

        let opts = RunOptions::default();
        let mut pieces = String::new();
        let g = cm
            .chat("hello", 12, SamplerConfig::greedy(), &opts, |_, t| {
                pieces.push_str(t);
                true
            })
            .unwrap();
        assert_eq!(pieces, g.text);

        // The same checkpoint loaded directly gives the same greedy tokens.
        let cfg = tiny_config();
        let mut direct = CpuModel::from_safetensors(cfg, m.safetensors.clone()).unwrap();
        let tok = Tokenizer::from_bytes(&m.tokenizer_json).unwrap();
        let mut s = Sampler::new(SamplerConfig::greedy()).unwrap();
        let g2 = generate(&mut direct, &tok, "hello", 12, &mut s, &opts, |_, _| true).unwrap();
        assert_eq!(g.tokens, g2.tokens);
        assert!(!g.tokens.is_empty());

        // The parts for other engines rebuild the same model.
        let (cfg, shared, routers, source) = cm.engine_parts().unwrap();
        let mut again = CpuModel::new(cfg, shared, routers, source).unwrap();
        let mut s = Sampler::new(SamplerConfig::greedy()).unwrap();
        let g3 = generate(
            &mut again,
            &cm.tokenizer,
            "hello",
            12,
            &mut s,
            &opts,
            |_, _| true,
        )
        .unwrap();
        assert_eq!(g3.tokens, g.tokens);
    }

    #[test]
    fn missing_slot_or_payload_is_an_error() {
        let (fetched, _) = chain_of_random_model();
        // Drop one expert block: that slot has no verified head.
        let fewer: Vec<_> = fetched
            .iter()
            .filter(|f| f.listed_hash != fetched[7].listed_hash)
            .cloned()
            .collect();
        let (_, dag) = verify_chain_dag(&fewer);
        let payloads: HashMap<_, _> = fewer
            .iter()
            .map(|f| (f.listed_hash, Arc::from(f.payload.clone().unwrap())))
            .collect();
        let err = ChainModel::from_verified(&dag, &payloads).unwrap_err();
        assert!(matches!(err, NodeError::MissingSlot(_)), "{err}");
        let html = render_chat(Err(&err));
        assert!(html.contains("data-state=\"unavailable\"") && !html.contains("<form"));

        let (_, dag) = verify_chain_dag(&fetched);
        let mut payloads: HashMap<_, _> = fetched
            .iter()
            .map(|f| (f.listed_hash, Arc::from(f.payload.clone().unwrap())))
            .collect();
        payloads.remove(&fetched[1].listed_hash);
        let err = ChainModel::from_verified(&dag, &payloads).unwrap_err();
        assert!(matches!(err, NodeError::MissingPayload(_)), "{err}");

        assert!(matches!(
            ChainModel::from_verified(&Dag::new(), &payloads).unwrap_err(),
            NodeError::NoModel
        ));
    }
}
