//! A signed tiny chain for web-node's own unit tests (`#[cfg(test)]`): the
//! tiny random model ([`tiny_config`], deterministic from a seed) as a
//! signed chain-A meta block (config and tokenizer) and one chain-B block
//! per slot, split from its checkpoint, each with its payload. Unit tests
//! cannot use the `test-support` crate (it depends on web-node: two copies
//! of every type); no test outside web-node needs this fixture.
#![allow(dead_code)]

use crate::chain::{limits, Block, MetaPayload};
use crate::model::checkpoint::{split_checkpoint, Signer};
use crate::model::random::{random_model_bytes, tiny_config, RandomModel};
use crate::model::Config;
use ed25519_dalek::SigningKey;

/// The key that signs a [`TinyChain`].
pub fn tiny_chain_key() -> SigningKey {
    SigningKey::from_bytes(&[5; 32])
}

/// See the module docs.
pub struct TinyChain {
    pub config: Config,
    /// The model the blocks were split from.
    pub model: RandomModel,
    /// The meta block and its JSON payload.
    pub meta: (Block, Vec<u8>),
    /// One block per slot (shared, routers, experts) with its payload, in
    /// checkpoint order.
    pub slots: Vec<(Block, Vec<u8>)>,
}

impl TinyChain {
    /// The tiny model with weights from `seed`, signed by [`tiny_chain_key`]
    /// with the smallest chunk size (so an expert spans several chunks).
    pub fn new(seed: u64) -> Self {
        Self::with_config(seed, tiny_config())
    }

    /// The same with another config (e.g. sizes that fit quantization groups).
    pub fn with_config(seed: u64, config: Config) -> Self {
        let model = match random_model_bytes(&config, seed) {
            Ok(m) => m,
            Err(e) => panic!("random tiny model: {e}"),
        };
        let key = tiny_chain_key();
        let signer = Signer {
            key: &key,
            address: "op".into(),
            timestamp_ms: 1,
            chunk_size: limits::MIN_CHUNK_SIZE,
        };
        let json = |b: &[u8]| -> serde_json::Value {
            serde_json::from_slice(b).unwrap_or_else(|e| panic!("tiny model JSON: {e}"))
        };
        let spec = match MetaPayload::new(
            "tiny",
            json(&model.config_json),
            Some(json(&model.tokenizer_json)),
        ) {
            Ok(s) => s,
            Err(e) => panic!("meta payload: {e}"),
        };
        let meta = match signer.meta_block(&spec, None) {
            Ok(m) => m,
            Err(e) => panic!("meta block: {e}"),
        };
        let slots = match split_checkpoint(&config, &[&model.safetensors]) {
            Ok(s) => s,
            Err(e) => panic!("split the tiny checkpoint: {e}"),
        };
        let slots = slots
            .iter()
            .map(|s| signer.slot_block(meta.0.hash, s, vec![], None))
            .collect();
        Self {
            config,
            model,
            meta,
            slots,
        }
    }

    /// Every block with its payload, meta first (chain order).
    pub fn blocks(&self) -> Vec<(Block, Vec<u8>)> {
        std::iter::once(self.meta.clone())
            .chain(self.slots.iter().cloned())
            .collect()
    }

    /// The expert blocks with their payloads.
    pub fn experts(&self) -> Vec<(Block, Vec<u8>)> {
        self.slots
            .iter()
            .filter(|(b, _)| b.header.name.contains("expert"))
            .cloned()
            .collect()
    }
}
