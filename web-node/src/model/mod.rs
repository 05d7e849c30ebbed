//! The model: Hugging Face Mixtral config, chain slots and the tensors each
//! holds, checkpoint <-> blocks, tokenizer, and the CPU reference forward.

pub mod checkpoint;
pub mod config;
pub mod slots;
pub mod weights;

pub use config::Config;
pub use slots::{Slot, TensorSpec};
pub use weights::{ExpertSource, ExpertWeights, LayerAttention, Mat, RouterWeights, SharedWeights};

/// Errors of the model layer.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("invalid config.json: {0}")]
    Config(String),
    #[error("invalid slot name {0:?}: expected `shared`, `layerN.router` or `layerN.expertM`")]
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
}
