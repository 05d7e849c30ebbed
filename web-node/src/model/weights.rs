//! Weights as plain f32 row-major matrices, in Hugging Face layout
//! (`Linear` weight is `[out_features, in_features]`), and the
//! [`ExpertSource`] the engines ask for experts the router picks.

use super::ModelError;

/// A row-major matrix `[rows, cols]` (for a Linear layer: `[out, in]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Mat {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Mat {
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Result<Self, ModelError> {
        if rows.checked_mul(cols) != Some(data.len()) {
            return Err(ModelError::Tensor {
                name: "<matrix>".into(),
                reason: format!("{} values for shape [{rows}, {cols}]", data.len()),
            });
        }
        Ok(Self { rows, cols, data })
    }
}

/// Attention and norms of one layer (part of the `shared` slot).
#[derive(Debug, Clone, PartialEq)]
pub struct LayerAttention {
    pub input_layernorm: Vec<f32>,
    pub post_attention_layernorm: Vec<f32>,
    pub q_proj: Mat,
    pub k_proj: Mat,
    pub v_proj: Mat,
    pub o_proj: Mat,
}

/// The `shared` slot: embeddings, per-layer attention and norms, final norm, lm_head.
#[derive(Debug, Clone, PartialEq)]
pub struct SharedWeights {
    pub embed_tokens: Mat,
    pub layers: Vec<LayerAttention>,
    pub norm: Vec<f32>,
    /// `None` when `tie_word_embeddings` (then `embed_tokens` is the head).
    pub lm_head: Option<Mat>,
}

/// A `layerN.router` slot: the gate, `[num_experts, hidden]`.
#[derive(Debug, Clone, PartialEq)]
pub struct RouterWeights {
    pub gate: Mat,
}

/// A `layerN.expertM` slot: SwiGLU `w2(silu(w1 x) * w3 x)`.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertWeights {
    /// `[intermediate, hidden]`
    pub w1: Mat,
    /// `[hidden, intermediate]`
    pub w2: Mat,
    /// `[intermediate, hidden]`
    pub w3: Mat,
}

/// Where the engines get an expert the first time the router picks it: a
/// local directory, a block store, or peers through the relay. An expert
/// that is never routed is never asked for.
pub trait ExpertSource {
    fn load_expert(&mut self, layer: usize, expert: usize) -> Result<ExpertWeights, ModelError>;
}
