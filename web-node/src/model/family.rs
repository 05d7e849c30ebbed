//! The forward pieces that differ between families (see
//! [`crate::spec::family`]), shared by the engines: q/k/v biases, q/k
//! RMSNorm (whole projection or per head), the top-k weight rule, and the
//! shared expert with its sigmoid gate. A routed expert and the shared
//! expert are both [`ExpertWeights`] (gate = `w1`, down = `w2`, up = `w3`),
//! so whatever represents or computes experts applies to every family.

use super::reference::{dot, expert_forward, rms_norm};
use super::{Config, ExpertWeights, ModelError, QkNorm};

/// A layer's attention tensors beyond Mixtral's (part of the `shared` slot).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AttentionExtras {
    /// `self_attn.q_norm.weight`: `[q_dim]` (OLMoE) or `[head_dim]` (Qwen3-MoE).
    pub q_norm: Option<Vec<f32>>,
    /// `self_attn.k_norm.weight`: `[kv_dim]` (OLMoE) or `[head_dim]` (Qwen3-MoE).
    pub k_norm: Option<Vec<f32>>,
    /// `self_attn.{q,k,v}_proj.bias` (Qwen2-MoE).
    pub q_bias: Option<Vec<f32>>,
    pub k_bias: Option<Vec<f32>>,
    pub v_bias: Option<Vec<f32>>,
}

impl AttentionExtras {
    /// Store the tensor `name` (as [`crate::spec::family::attention_extras`]
    /// names it).
    pub fn set(&mut self, name: &str, v: Vec<f32>) -> Result<(), ModelError> {
        let slot = match name {
            "q_norm.weight" => &mut self.q_norm,
            "k_norm.weight" => &mut self.k_norm,
            "q_proj.bias" => &mut self.q_bias,
            "k_proj.bias" => &mut self.k_bias,
            "v_proj.bias" => &mut self.v_bias,
            other => {
                return Err(ModelError::Tensor {
                    name: other.into(),
                    reason: "not an attention tensor of any family".into(),
                })
            }
        };
        *slot = Some(v);
        Ok(())
    }

    fn get(&self, name: &str) -> Option<&Vec<f32>> {
        match name {
            "q_norm.weight" => self.q_norm.as_ref(),
            "k_norm.weight" => self.k_norm.as_ref(),
            "q_proj.bias" => self.q_bias.as_ref(),
            "k_proj.bias" => self.k_bias.as_ref(),
            "v_proj.bias" => self.v_bias.as_ref(),
            _ => None,
        }
    }

    fn count(&self) -> usize {
        [
            &self.q_norm,
            &self.k_norm,
            &self.q_bias,
            &self.k_bias,
            &self.v_bias,
        ]
        .iter()
        .filter(|x| x.is_some())
        .count()
    }
}

/// A layer's shared expert (Qwen2-MoE): runs for every token, its output
/// scaled by `sigmoid(gate · x)`. The `layerN.shared_expert` slot.
#[derive(Debug, Clone, PartialEq)]
pub struct SharedExpertWeights {
    /// `shared_expert.{gate_proj, down_proj, up_proj}` as `w1, w2, w3`.
    pub expert: ExpertWeights,
    /// `shared_expert_gate.weight` (`[1, hidden]`), as a vector.
    pub gate: Vec<f32>,
}

impl SharedExpertWeights {
    pub fn f32_bytes(&self) -> usize {
        self.expert.stored_bytes() + 4 * self.gate.len()
    }
}

fn tensor_err(name: String, reason: String) -> ModelError {
    ModelError::Tensor { name, reason }
}

/// Check a layer's attention extras against the config's family: exactly
/// the tensors it implies, each of its length.
pub fn check_attention_extras(
    cfg: &Config,
    layer: usize,
    ex: &AttentionExtras,
) -> Result<(), ModelError> {
    let want = crate::spec::family::attention_extras(cfg);
    for &(name, n) in &want {
        let full = format!("model.layers.{layer}.self_attn.{name}");
        match ex.get(name) {
            None => return Err(tensor_err(full, "missing".into())),
            Some(v) if v.len() != n => {
                return Err(tensor_err(
                    full,
                    format!("length {}, expected {n}", v.len()),
                ))
            }
            Some(_) => {}
        }
    }
    if ex.count() != want.len() {
        return Err(tensor_err(
            format!("model.layers.{layer}.self_attn"),
            format!(
                "holds tensors model_type {} does not have",
                cfg.family().model_type()
            ),
        ));
    }
    Ok(())
}

/// Check a layer's shared expert: present with the right shapes exactly
/// when the family has one.
pub fn check_shared_expert(
    cfg: &Config,
    layer: usize,
    se: Option<&SharedExpertWeights>,
) -> Result<(), ModelError> {
    let name = format!("layer{layer}.shared_expert");
    match (cfg.shared_expert_intermediate_size(), se) {
        (None, None) => Ok(()),
        (None, Some(_)) => Err(tensor_err(
            name,
            format!(
                "model_type {} has no shared expert",
                cfg.family().model_type()
            ),
        )),
        (Some(_), None) => Err(tensor_err(
            name,
            "missing (load the layer's shared_expert slot with its router)".into(),
        )),
        (Some(i), Some(w)) => {
            let h = cfg.hidden_size;
            let ok = |m: &super::Weight, r: usize, c: usize| match m {
                super::Weight::F32(m) => m.rows == r && m.cols == c && m.data.len() == r * c,
                super::Weight::Q(q) => q.rows == r && q.cols == c,
            };
            if !(ok(&w.expert.w1, i, h) && ok(&w.expert.w2, h, i) && ok(&w.expert.w3, i, h)) {
                return Err(tensor_err(
                    name,
                    format!("expert shapes do not match shared_expert_intermediate_size {i}"),
                ));
            }
            if w.gate.len() != h {
                return Err(tensor_err(
                    name,
                    format!("gate has {} values, expected {h}", w.gate.len()),
                ));
            }
            Ok(())
        }
    }
}

fn add_bias(x: &mut [f32], b: &[f32]) {
    for row in x.chunks_exact_mut(b.len().max(1)) {
        for (a, &c) in row.iter_mut().zip(b) {
            *a += c;
        }
    }
}

/// The family's changes to the `t` rows of the q/k/v projection outputs,
/// before RoPE: biases, then q/k RMSNorm (OLMoE over the whole row,
/// Qwen3-MoE per head).
pub fn prepare_qkv(
    cfg: &Config,
    ex: &AttentionExtras,
    q: &mut Vec<f32>,
    k: &mut Vec<f32>,
    v: &mut [f32],
) {
    if let Some(b) = &ex.q_bias {
        add_bias(q, b);
    }
    if let Some(b) = &ex.k_bias {
        add_bias(k, b);
    }
    if let Some(b) = &ex.v_bias {
        add_bias(v, b);
    }
    let eps = cfg.rms_norm_eps as f32;
    match cfg.family().qk_norm() {
        QkNorm::None => {}
        // rms_norm normalises each `w.len()`-wide row: the whole projection
        // (OLMoE) or one head (Qwen3-MoE), by the weight's length.
        QkNorm::Whole | QkNorm::PerHead => {
            if let Some(w) = &ex.q_norm {
                *q = rms_norm(q, w, eps);
            }
            if let Some(w) = &ex.k_norm {
                *k = rms_norm(k, w, eps);
            }
        }
    }
}

/// The `k` largest of `probs` (ties: lower index first) as `(index,
/// weight)`; weights renormalised to sum to one when `renormalize`
/// (Mixtral always, the others by `norm_topk_prob`), else the softmax
/// probabilities themselves.
pub fn top_k_weights(probs: &[f32], k: usize, renormalize: bool) -> Vec<(usize, f32)> {
    let mut idx: Vec<usize> = (0..probs.len()).collect();
    idx.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
    idx.truncate(k);
    if !renormalize {
        return idx.into_iter().map(|i| (i, probs[i])).collect();
    }
    let sum: f32 = idx.iter().map(|&i| probs[i]).sum();
    idx.into_iter().map(|i| (i, probs[i] / sum)).collect()
}

#[inline]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `y[t] += sigmoid(gate · xn[t]) * shared_expert(xn[t])` for the `t` rows
/// of `xn` (`[t, hidden]`).
pub fn add_shared_expert(
    w: &SharedExpertWeights,
    xn: &[f32],
    t: usize,
    threads: usize,
    y: &mut [f32],
) {
    let h = w.gate.len();
    let out = expert_forward(&w.expert, xn, t, threads);
    for ti in 0..t {
        let g = sigmoid(dot(&w.gate, &xn[ti * h..(ti + 1) * h]));
        for (a, &b) in y[ti * h..(ti + 1) * h]
            .iter_mut()
            .zip(&out[ti * h..(ti + 1) * h])
        {
            *a += g * b;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_without_renormalisation_keeps_probabilities() {
        let p = [0.1, 0.3, 0.3, 0.2, 0.1];
        let got = top_k_weights(&p, 2, false);
        assert_eq!(got, vec![(1, 0.3), (2, 0.3)]);
        let got = top_k_weights(&p, 2, true);
        assert!((got[0].1 - 0.5).abs() < 1e-6);
    }

    #[test]
    fn per_head_and_whole_qk_norm_differ_as_they_should() {
        // Two heads of 2: per-head norm normalises each head on its own.
        let x = vec![3.0, 4.0, 0.0, 10.0];
        let per_head = rms_norm(&x, &[1.0, 1.0], 0.0);
        let whole = rms_norm(&x, &[1.0; 4], 0.0);
        let r = |a: f32, b: f32| (a * a + b * b) / 2.0;
        assert!((per_head[0] - 3.0 / r(3.0, 4.0).sqrt()).abs() < 1e-6);
        assert!((per_head[3] - 10.0 / r(0.0, 10.0).sqrt()).abs() < 1e-6);
        let ms = (9.0 + 16.0 + 100.0) / 4.0f32;
        assert!((whole[3] - 10.0 / ms.sqrt()).abs() < 1e-6);
    }
}
