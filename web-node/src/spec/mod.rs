//! The model's shape, below both [`crate::chain`] and [`crate::model`]: the
//! Hugging Face Mixtral [`Config`], the chain-B [`Slot`]s and the exact
//! tensors ([`TensorSpec`]) each slot holds. Validation of blocks and the
//! engines both read it; it imports nothing above it.

pub mod config;
pub mod family;
pub mod quant;
pub mod slots;

pub use config::Config;
pub use family::{Family, FamilyFields, QkNorm};
pub use slots::{Slot, TensorSpec};

/// Why a config or slot name is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("invalid config.json: {0}")]
    Config(String),
    #[error("invalid slot name {0:?}: expected `shared`, `layerN.router`, `layerN.shared_expert` or `layerN.expertM`")]
    SlotName(String),
    #[error("slot {slot} is outside the spec: {reason}")]
    SlotOutOfRange { slot: String, reason: String },
}
