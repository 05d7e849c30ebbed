//! Weights as plain f32 row-major matrices, in Hugging Face layout
//! (`Linear` weight is `[out_features, in_features]`), and the
//! [`ExpertSource`] the engines ask for experts the router picks.

use super::family::{check_attention_extras, check_shared_expert};
use super::{AttentionExtras, Config, ModelError, SharedExpertWeights};

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
    /// The family's q/k norms or q/k/v biases (empty for Mixtral).
    pub extras: AttentionExtras,
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

/// A `layerN.router` slot: the gate, `[num_experts, hidden]`; for a family
/// with a shared expert also the layer's `layerN.shared_expert` slot, which
/// is held (and fetched) with the router.
#[derive(Debug, Clone, PartialEq)]
pub struct RouterWeights {
    pub gate: Mat,
    pub shared_expert: Option<SharedExpertWeights>,
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

fn check_mat(name: &str, m: &Mat, rows: usize, cols: usize) -> Result<(), ModelError> {
    if m.rows != rows || m.cols != cols || m.data.len() != rows * cols {
        return Err(ModelError::Tensor {
            name: name.into(),
            reason: format!("shape [{}, {}], expected [{rows}, {cols}]", m.rows, m.cols),
        });
    }
    Ok(())
}

fn check_vec(name: &str, v: &[f32], n: usize) -> Result<(), ModelError> {
    if v.len() != n {
        return Err(ModelError::Tensor {
            name: name.into(),
            reason: format!("length {}, expected {n}", v.len()),
        });
    }
    Ok(())
}

/// Check an expert's shapes against the config (every engine, one rule).
pub fn check_expert(cfg: &Config, w: &ExpertWeights) -> Result<(), ModelError> {
    let (h, i) = (cfg.hidden_size, cfg.expert_intermediate_size());
    check_mat("w1", &w.w1, i, h)?;
    check_mat("w2", &w.w2, h, i)?;
    check_mat("w3", &w.w3, i, h)
}

/// Check the config and the shapes of the shared weights and routers an
/// engine is built from (every engine, one rule).
pub fn check_weights(
    cfg: &Config,
    shared: &SharedWeights,
    routers: &[RouterWeights],
) -> Result<(), ModelError> {
    cfg.validate()?;
    let (h, v) = (cfg.hidden_size, cfg.vocab_size);
    check_mat("model.embed_tokens.weight", &shared.embed_tokens, v, h)?;
    if shared.layers.len() != cfg.num_hidden_layers {
        return Err(ModelError::Tensor {
            name: "model.layers".into(),
            reason: format!(
                "{} layers, expected {}",
                shared.layers.len(),
                cfg.num_hidden_layers
            ),
        });
    }
    for (l, la) in shared.layers.iter().enumerate() {
        let p = format!("model.layers.{l}");
        check_vec(
            &format!("{p}.input_layernorm.weight"),
            &la.input_layernorm,
            h,
        )?;
        check_vec(
            &format!("{p}.post_attention_layernorm.weight"),
            &la.post_attention_layernorm,
            h,
        )?;
        check_mat(
            &format!("{p}.self_attn.q_proj.weight"),
            &la.q_proj,
            cfg.q_dim(),
            h,
        )?;
        check_mat(
            &format!("{p}.self_attn.k_proj.weight"),
            &la.k_proj,
            cfg.kv_dim(),
            h,
        )?;
        check_mat(
            &format!("{p}.self_attn.v_proj.weight"),
            &la.v_proj,
            cfg.kv_dim(),
            h,
        )?;
        check_mat(
            &format!("{p}.self_attn.o_proj.weight"),
            &la.o_proj,
            h,
            cfg.q_dim(),
        )?;
        check_attention_extras(cfg, l, &la.extras)?;
    }
    check_vec("model.norm.weight", &shared.norm, h)?;
    match (&shared.lm_head, cfg.tie_word_embeddings) {
        (Some(m), _) => check_mat("lm_head.weight", m, v, h)?,
        (None, true) => {}
        (None, false) => {
            return Err(ModelError::Tensor {
                name: "lm_head.weight".into(),
                reason: "missing and tie_word_embeddings is false".into(),
            })
        }
    }
    if routers.len() != cfg.num_hidden_layers {
        return Err(ModelError::Tensor {
            name: "block_sparse_moe.gate".into(),
            reason: format!(
                "{} routers, expected {}",
                routers.len(),
                cfg.num_hidden_layers
            ),
        });
    }
    for (l, r) in routers.iter().enumerate() {
        check_mat(
            &format!("model.layers.{l}.block_sparse_moe.gate.weight"),
            &r.gate,
            cfg.num_local_experts,
            h,
        )?;
        check_shared_expert(cfg, l, r.shared_expert.as_ref())?;
    }
    Ok(())
}
