//! Chain-A payload: the seed-style spec plus the Hugging Face `config.json`
//! and `tokenizer.json` of a Mixtral-style model.

use serde::{Deserialize, Serialize};

use super::ChainError;
use crate::spec::Config;

/// The only architecture this chain carries.
pub const ARCHITECTURE: &str = "mixture-of-experts";

/// JSON payload of a chain-A meta block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetaPayload {
    pub model_name: String,
    pub architecture: String,
    pub num_layers: usize,
    pub num_experts: usize,
    /// `"top2"`: the default number of experts per token.
    pub routing_strategy: String,
    /// Hugging Face `config.json`, verbatim.
    pub config: serde_json::Value,
    /// Hugging Face `tokenizer.json`, verbatim (None when the model ships none).
    #[serde(default)]
    pub tokenizer: Option<serde_json::Value>,
}

impl MetaPayload {
    /// Build the spec from a config.json value (and optional tokenizer.json).
    pub fn new(
        model_name: &str,
        config: serde_json::Value,
        tokenizer: Option<serde_json::Value>,
    ) -> Result<Self, ChainError> {
        let cfg =
            Config::from_value(&config).map_err(|e| ChainError::MetaPayload(e.to_string()))?;
        Ok(Self {
            model_name: model_name.to_string(),
            architecture: ARCHITECTURE.into(),
            num_layers: cfg.num_hidden_layers,
            num_experts: cfg.num_local_experts,
            routing_strategy: format!("top{}", cfg.num_experts_per_tok),
            config,
            tokenizer,
        })
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parse and check a chain-A payload; returns it with its parsed config.
    pub fn parse(bytes: &[u8]) -> Result<(Self, Config), ChainError> {
        let m: MetaPayload = serde_json::from_slice(bytes)
            .map_err(|e| ChainError::MetaPayload(format!("not a meta spec: {e}")))?;
        let cfg = m.check()?;
        Ok((m, cfg))
    }

    /// Check the spec agrees with its config; returns the parsed config.
    pub fn check(&self) -> Result<Config, ChainError> {
        let bad = |s: String| Err(ChainError::MetaPayload(s));
        if self.architecture != ARCHITECTURE {
            return bad(format!(
                "architecture {:?} is not {ARCHITECTURE:?}",
                self.architecture
            ));
        }
        let cfg =
            Config::from_value(&self.config).map_err(|e| ChainError::MetaPayload(e.to_string()))?;
        if self.num_layers != cfg.num_hidden_layers {
            return bad(format!(
                "num_layers {} != config num_hidden_layers {}",
                self.num_layers, cfg.num_hidden_layers
            ));
        }
        if self.num_experts != cfg.num_local_experts {
            return bad(format!(
                "num_experts {} != config num_local_experts {}",
                self.num_experts, cfg.num_local_experts
            ));
        }
        let k = self.top_k().ok_or_else(|| {
            ChainError::MetaPayload(format!(
                "routing_strategy {:?} is not topK",
                self.routing_strategy
            ))
        })?;
        if k == 0 || k > cfg.num_local_experts {
            return bad(format!(
                "routing_strategy top{k} outside 1..={}",
                cfg.num_local_experts
            ));
        }
        if self.model_name.is_empty() || self.model_name.len() > super::limits::MAX_NAME_LEN {
            return bad("model_name must be 1..=64 bytes".into());
        }
        Ok(cfg)
    }

    /// k of `routing_strategy: "topK"`.
    pub fn top_k(&self) -> Option<usize> {
        self.routing_strategy.strip_prefix("top")?.parse().ok()
    }
}
