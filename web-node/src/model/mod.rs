//! The model: Hugging Face Mixtral config, chain slots and the tensors each
//! holds, checkpoint <-> blocks, tokenizer, and the CPU reference forward.

pub mod checkpoint;
pub mod engine;
pub mod family;
pub mod generate;
pub mod load;
pub mod quant;
pub mod quant_chain;
pub mod random;
pub mod reference;
pub mod sampler;
pub mod tokenizer;
pub mod weights;

pub use crate::spec::quant::QuantFormat;
pub use crate::spec::{config, slots, Config, Family, QkNorm, Slot, SpecError, TensorSpec};
pub use engine::{
    run_step, supply_experts, Engine, ExpertId, ExpertJob, Output, Step, Supply, Want,
};
pub use family::{AttentionExtras, SharedExpertWeights};
pub use weights::{
    check_expert, check_weights, ExpertSource, ExpertWeights, LayerAttention, Mat, RouterWeights,
    SharedWeights, Weight,
};

/// Per-request inference options, shared by every engine (CPU reference, GPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunOptions {
    /// Experts per token; `None` means the config's `num_experts_per_tok`.
    /// Must lie in `1..=num_local_experts`.
    pub top_k: Option<usize>,
    /// `false`: dense mixture baseline, every expert runs, weighted by the
    /// softmax over all experts (no top-k, no renormalisation).
    pub use_moe: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            top_k: None,
            use_moe: true,
        }
    }
}

impl RunOptions {
    /// The number of experts each token uses under these options, checked
    /// against the config.
    pub fn experts_per_token(&self, cfg: &Config) -> Result<usize, ModelError> {
        if !self.use_moe {
            return Ok(cfg.num_local_experts);
        }
        let k = self.top_k.unwrap_or(cfg.num_experts_per_tok);
        if k == 0 || k > cfg.num_local_experts {
            return Err(ModelError::Input(format!(
                "top_k {k} must be in 1..={}",
                cfg.num_local_experts
            )));
        }
        Ok(k)
    }

    /// Check one forward step of `tokens` at cache position `pos` against
    /// the config and a cache of `capacity` positions (`what` names that
    /// limit in the error); returns the experts per token.
    pub fn check_step(
        &self,
        cfg: &Config,
        pos: usize,
        tokens: &[u32],
        capacity: usize,
        what: &str,
    ) -> Result<usize, ModelError> {
        let k = self.experts_per_token(cfg)?;
        if tokens.is_empty() {
            return Err(ModelError::Input("no tokens".into()));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            return Err(ModelError::Input(format!(
                "token {bad} >= vocab_size {}",
                cfg.vocab_size
            )));
        }
        if pos + tokens.len() > capacity {
            return Err(ModelError::Input(format!(
                "context full: {pos} + {} tokens > {what} {capacity}",
                tokens.len()
            )));
        }
        Ok(k)
    }
}

/// A blocking model: an [`Engine`] with its expert source attached, so a
/// step never pauses (CLI, eval, tests).
pub trait Forward {
    /// Append `tokens` to the KV cache and return what `want` asks for.
    fn run(&mut self, tokens: &[u32], opts: &RunOptions, want: Want) -> Result<Output, ModelError>;
    /// Append `tokens` to the KV cache and return the logits (length
    /// `vocab_size`) of the LAST of them.
    fn forward(&mut self, tokens: &[u32], opts: &RunOptions) -> Result<Vec<f32>, ModelError> {
        match self.run(tokens, opts, Want::Logits)? {
            Output::Logits(l) => Ok(l),
            _ => Err(ModelError::Input("the engine gave no logits".into())),
        }
    }
    /// Empty the KV cache (position back to 0).
    fn reset(&mut self);
    /// Number of tokens in the KV cache.
    fn position(&self) -> usize;
    /// The model's config (EOS/BOS ids, context length, sizes).
    fn config(&self) -> &Config;
}

/// Errors of the model layer.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("invalid config.json: {0}")]
    Config(String),
    #[error("invalid slot name {0:?}: expected `shared`, `layerN.router`, `layerN.shared_expert` or `layerN.expertM`")]
    SlotName(String),
    #[error("slot {slot} is outside the spec: {reason}")]
    SlotOutOfRange { slot: String, reason: String },
    #[error("safetensors: {0}")]
    Safetensors(String),
    #[error("tensor {name}: {reason}")]
    Tensor { name: String, reason: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("expert source: {0}")]
    Source(String),
    #[error("io: {0}")]
    Io(String),
    #[error("invalid input: {0}")]
    Input(String),
    #[error("gpu: {0}")]
    Gpu(String),
}

impl From<SpecError> for ModelError {
    fn from(e: SpecError) -> Self {
        match e {
            SpecError::Config(m) => ModelError::Config(m),
            SpecError::SlotName(n) => ModelError::SlotName(n),
            SpecError::SlotOutOfRange { slot, reason } => {
                ModelError::SlotOutOfRange { slot, reason }
            }
        }
    }
}
