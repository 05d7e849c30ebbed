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

/// An expert matrix: f32, or quantized (`q8_0`/`q4_0`, read packed).
#[derive(Debug, Clone, PartialEq)]
pub enum Weight {
    F32(Mat),
    Q(super::quant::QMat),
}

impl Weight {
    pub fn rows(&self) -> usize {
        match self {
            Weight::F32(m) => m.rows,
            Weight::Q(q) => q.rows,
        }
    }
    pub fn cols(&self) -> usize {
        match self {
            Weight::F32(m) => m.cols,
            Weight::Q(q) => q.cols,
        }
    }
    /// The quantized format (None for f32).
    pub fn quant(&self) -> Option<crate::spec::quant::QuantFormat> {
        match self {
            Weight::F32(_) => None,
            Weight::Q(q) => Some(q.format),
        }
    }
    /// The f32 matrix, if it is one.
    pub fn as_f32(&self) -> Option<&Mat> {
        match self {
            Weight::F32(m) => Some(m),
            Weight::Q(_) => None,
        }
    }
    /// Mutable f32 matrix, if it is one.
    pub fn as_f32_mut(&mut self) -> Option<&mut Mat> {
        match self {
            Weight::F32(m) => Some(m),
            Weight::Q(_) => None,
        }
    }
    /// The matrix as f32 (a copy for quantized weights: export and tests).
    pub fn to_f32(&self) -> Mat {
        match self {
            Weight::F32(m) => m.clone(),
            Weight::Q(q) => q.dequantize(),
        }
    }
    /// Bytes as held in memory (f32: 4 per weight; quantized: as stored).
    pub fn stored_bytes(&self) -> usize {
        match self {
            Weight::F32(m) => 4 * m.data.len(),
            Weight::Q(q) => q.stored_bytes(),
        }
    }
}

impl From<Mat> for Weight {
    fn from(m: Mat) -> Self {
        Weight::F32(m)
    }
}

/// A `layerN.expertM` slot: SwiGLU `w2(silu(w1 x) * w3 x)`.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertWeights {
    /// `[intermediate, hidden]`
    pub w1: Weight,
    /// `[hidden, intermediate]`
    pub w2: Weight,
    /// `[intermediate, hidden]`
    pub w3: Weight,
}

impl ExpertWeights {
    /// The quantized format of its matrices (None for f32).
    pub fn quant(&self) -> Option<crate::spec::quant::QuantFormat> {
        self.w1.quant()
    }
    /// Bytes its matrices take in memory.
    pub fn stored_bytes(&self) -> usize {
        self.w1.stored_bytes() + self.w2.stored_bytes() + self.w3.stored_bytes()
    }
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
    let q = w.quant();
    for (name, m, rows, cols) in [
        ("w1", &w.w1, i, h),
        ("w2", &w.w2, h, i),
        ("w3", &w.w3, i, h),
    ] {
        match m {
            Weight::F32(m) => check_mat(name, m, rows, cols)?,
            Weight::Q(qm) => {
                if qm.rows != rows
                    || qm.cols != cols
                    || qm.values.len() != rows * qm.format.row_bytes(cols)
                    || qm.scales.len() * crate::spec::quant::GROUP != rows * cols
                {
                    return Err(ModelError::Tensor {
                        name: name.into(),
                        reason: format!(
                            "{} [{}, {}] with {} value bytes, expected [{rows}, {cols}]",
                            qm.format,
                            qm.rows,
                            qm.cols,
                            qm.values.len()
                        ),
                    });
                }
            }
        }
        if m.quant() != q {
            return Err(ModelError::Tensor {
                name: name.into(),
                reason: "an expert's matrices must share one format".into(),
            });
        }
    }
    Ok(())
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
