//! A small trainable Mixtral in candle, with Hugging Face tensor names.
//!
//! candle-transformers' Mixtral picks experts through host-side `to_vec2`, so
//! no gradient reaches the router; this one keeps the routing weights in the
//! graph (softmax over all experts, top-k mask, renormalised) so the gate
//! trains, and adds Mixtral's load-balancing loss. Inference semantics are
//! the same as Hugging Face's `MixtralForCausalLM` (RMSNorm, RoPE with
//! rotate-half, GQA, top-k renormalised routing, SwiGLU experts).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use web_node::eval::corpus::Rng;
use web_node::eval::{EvalError, LogitsModel};
use web_node::model::{Config, Slot};

/// The model's parameters by Hugging Face name.
pub struct Mixtral {
    pub cfg: Config,
    pub vars: BTreeMap<String, Var>,
    cos: Tensor,
    sin: Tensor,
    device: Device,
}

fn randn(rng: &mut Rng, n: usize, std: f64) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        // Box-Muller.
        let u1 = rng.unit_f64().max(1e-12);
        let u2 = rng.unit_f64();
        let r = (-2.0 * u1.ln()).sqrt();
        v.push((r * (std::f64::consts::TAU * u2).cos() * std) as f32);
        if v.len() < n {
            v.push((r * (std::f64::consts::TAU * u2).sin() * std) as f32);
        }
    }
    v
}

/// All tensor names and shapes of a config, in slot order.
pub fn all_tensors(cfg: &Config) -> Vec<(String, Vec<usize>)> {
    Slot::all(cfg)
        .iter()
        .flat_map(|s| s.tensors(cfg))
        .map(|t| (t.name, t.shape))
        .collect()
}

impl Mixtral {
    /// Fresh weights from a seed: norms 1, matrices N(0, 1/sqrt(in)) (output
    /// projections scaled down by the depth), embeddings N(0, 1).
    pub fn init(cfg: &Config, seed: u64, device: &Device) -> Result<Self> {
        let mut rng = Rng::new(seed);
        let depth_scale = 1.0 / (2.0 * cfg.num_hidden_layers as f64).sqrt();
        let mut vars = BTreeMap::new();
        for (name, shape) in all_tensors(cfg) {
            let n: usize = shape.iter().product();
            let data = if shape.len() == 1 {
                vec![1f32; n]
            } else if name == "model.embed_tokens.weight" {
                randn(&mut rng, n, 1.0)
            } else {
                let fan_in = shape[1] as f64;
                let mut std = 1.0 / fan_in.sqrt();
                if name.ends_with("o_proj.weight") || name.ends_with("w2.weight") {
                    std *= depth_scale;
                }
                if name.ends_with("gate.weight") {
                    std *= 0.1;
                }
                randn(&mut rng, n, std)
            };
            let t = Tensor::from_vec(data, shape.as_slice(), device)?;
            vars.insert(name, Var::from_tensor(&t)?);
        }
        Self::with_vars(cfg.clone(), vars, device)
    }

    /// Load an HF safetensors checkpoint (any float dtype, kept as F32).
    pub fn load(cfg: &Config, safetensors: &Path, device: &Device) -> Result<Self> {
        let tensors = candle_core::safetensors::load(safetensors, device)
            .with_context(|| format!("reading {}", safetensors.display()))?;
        let mut vars = BTreeMap::new();
        for (name, shape) in all_tensors(cfg) {
            let t = tensors
                .get(&name)
                .with_context(|| format!("{}: missing tensor {name}", safetensors.display()))?;
            if t.dims() != shape.as_slice() {
                bail!(
                    "tensor {name}: shape {:?}, config implies {shape:?}",
                    t.dims()
                );
            }
            vars.insert(name, Var::from_tensor(&t.to_dtype(DType::F32)?)?);
        }
        Self::with_vars(cfg.clone(), vars, device)
    }

    fn with_vars(cfg: Config, vars: BTreeMap<String, Var>, device: &Device) -> Result<Self> {
        let hd = cfg.head_dim();
        let max = cfg.max_position_embeddings.min(512);
        let theta = cfg.rope_theta();
        let inv: Vec<f32> = (0..hd)
            .step_by(2)
            .map(|i| 1.0 / theta.powf(i as f64 / hd as f64) as f32)
            .collect();
        let mut freqs = Vec::with_capacity(max * hd);
        for p in 0..max {
            for _ in 0..2 {
                freqs.extend(inv.iter().map(|f| p as f32 * f));
            }
        }
        let freqs = Tensor::from_vec(freqs, (max, hd), device)?;
        Ok(Self {
            cfg,
            vars,
            cos: freqs.cos()?,
            sin: freqs.sin()?,
            device: device.clone(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    fn w(&self, name: &str) -> Result<&Tensor> {
        Ok(self
            .vars
            .get(name)
            .with_context(|| format!("no tensor {name}"))?
            .as_tensor())
    }

    /// The variables of one slot (for training a single expert).
    pub fn slot_vars(&self, slot: Slot) -> Vec<Var> {
        slot.tensors(&self.cfg)
            .iter()
            .filter_map(|t| self.vars.get(&t.name).cloned())
            .collect()
    }

    pub fn all_vars(&self) -> Vec<Var> {
        self.vars.values().cloned().collect()
    }

    fn rms(&self, x: &Tensor, w: &str) -> Result<Tensor> {
        let eps = self.cfg.rms_norm_eps;
        let norm = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?;
        Ok(x.broadcast_div(&norm)?.broadcast_mul(self.w(w)?)?)
    }

    fn linear(&self, x: &Tensor, w: &str) -> Result<Tensor> {
        // x: (N, in); W: (out, in)
        Ok(x.matmul(&self.w(w)?.t()?)?)
    }

    fn rope(&self, x: &Tensor, t: usize) -> Result<Tensor> {
        let hd = x.dim(D::Minus1)?;
        let cos = self.cos.narrow(0, 0, t)?;
        let sin = self.sin.narrow(0, 0, t)?;
        let x1 = x.narrow(D::Minus1, 0, hd / 2)?;
        let x2 = x.narrow(D::Minus1, hd / 2, hd / 2)?;
        let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        Ok((x.broadcast_mul(&cos)? + rot.broadcast_mul(&sin)?)?)
    }

    /// Logits `(B, T, vocab)` for token ids `(B, T)`, and the load-balancing
    /// loss (mean over layers).
    pub fn forward(&self, tokens: &Tensor) -> Result<(Tensor, Tensor)> {
        let cfg = &self.cfg;
        let (b, t) = tokens.dims2()?;
        let h = cfg.hidden_size;
        let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
        let groups = nh / nkv;
        let n = b * t;
        let mut x = self
            .w("model.embed_tokens.weight")?
            .index_select(&tokens.flatten_all()?, 0)?;
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { -1e9 }))
            .collect();
        let mask = Tensor::from_vec(mask, (t, t), &self.device)?;
        let mut aux = Tensor::zeros((), DType::F32, &self.device)?;
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let hs = self.rms(&x, &format!("{p}.input_layernorm.weight"))?;
            let q = self.linear(&hs, &format!("{p}.self_attn.q_proj.weight"))?;
            let k = self.linear(&hs, &format!("{p}.self_attn.k_proj.weight"))?;
            let v = self.linear(&hs, &format!("{p}.self_attn.v_proj.weight"))?;
            let q = q.reshape((b, t, nh, hd))?.transpose(1, 2)?.contiguous()?;
            let k = k.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
            let v = v.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
            let q = self.rope(&q, t)?;
            let k = self.rope(&k, t)?;
            let (k, v) = if groups > 1 {
                let rep = |x: &Tensor| -> Result<Tensor> {
                    Ok(Tensor::cat(&vec![x; groups], 2)?.reshape((b, nh, t, hd))?)
                };
                (rep(&k)?, rep(&v)?)
            } else {
                (k, v)
            };
            let scale = 1.0 / (hd as f64).sqrt();
            let att = (q.matmul(&k.t()?.contiguous()?)? * scale)?.broadcast_add(&mask)?;
            let att = candle_nn::ops::softmax_last_dim(&att)?;
            let o = att.matmul(&v)?.transpose(1, 2)?.reshape((n, nh * hd))?;
            let o = self.linear(&o, &format!("{p}.self_attn.o_proj.weight"))?;
            x = (x + o)?;

            let hs = self.rms(&x, &format!("{p}.post_attention_layernorm.weight"))?;
            let (moe, layer_aux) = self.moe(&hs, l)?;
            aux = (aux + layer_aux)?;
            x = (x + moe)?;
        }
        let x = self.rms(&x, "model.norm.weight")?;
        let head = if cfg.tie_word_embeddings {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        let logits = self.linear(&x, head)?.reshape((b, t, cfg.vocab_size))?;
        let _ = h;
        Ok((logits, (aux / cfg.num_hidden_layers as f64)?))
    }

    /// The sparse MoE block on `(N, H)` states: output and load-balancing loss.
    fn moe(&self, hs: &Tensor, l: usize) -> Result<(Tensor, Tensor)> {
        let cfg = &self.cfg;
        let e = cfg.num_local_experts;
        let k = cfg.num_experts_per_tok;
        let p = format!("model.layers.{l}.block_sparse_moe");
        let logits = self.linear(hs, &format!("{p}.gate.weight"))?;
        let probs = candle_nn::ops::softmax_last_dim(&logits)?;
        let host = probs.to_vec2::<f32>()?;
        let n = host.len();
        let mut mask = vec![0f32; n * e];
        let mut rows: Vec<Vec<u32>> = vec![Vec::new(); e];
        for (i, row) in host.iter().enumerate() {
            let mut idx: Vec<usize> = (0..e).collect();
            idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            for &j in idx.iter().take(k) {
                mask[i * e + j] = 1.0;
                rows[j].push(i as u32);
            }
        }
        let mask = Tensor::from_vec(mask, (n, e), &self.device)?;
        let sel = (&probs * &mask)?;
        let weights = sel.broadcast_div(&sel.sum_keepdim(1)?)?;
        // Load balancing (Switch/Mixtral): E * sum_e f_e * P_e, f from the mask.
        let f = (mask.mean(0)? / k as f64)?;
        let pm = probs.mean(0)?;
        let aux = ((f * pm)?.sum_all()? * e as f64)?;

        let mut out = hs.zeros_like()?;
        for (j, r) in rows.iter().enumerate() {
            if r.is_empty() {
                continue;
            }
            let idx = Tensor::new(r.as_slice(), &self.device)?;
            let xs = hs.index_select(&idx, 0)?;
            let q = format!("{p}.experts.{j}");
            let a = candle_nn::ops::silu(&self.linear(&xs, &format!("{q}.w1.weight"))?)?;
            let g = self.linear(&xs, &format!("{q}.w3.weight"))?;
            let y = self.linear(&(a * g)?, &format!("{q}.w2.weight"))?;
            let w = weights.index_select(&idx, 0)?.narrow(1, j, 1)?;
            out = out.index_add(&idx, &y.broadcast_mul(&w)?, 0)?;
        }
        Ok((out, aux))
    }

    /// Write all tensors as one F32 safetensors file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let map: std::collections::HashMap<String, Tensor> = self
            .vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        candle_core::safetensors::save(&map, path)?;
        Ok(())
    }
}

impl LogitsModel for Mixtral {
    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    fn logits_all(&mut self, tokens: &[u32]) -> Result<Vec<f32>, EvalError> {
        let run = || -> Result<Vec<f32>> {
            let t = Tensor::new(tokens, &self.device)?.unsqueeze(0)?;
            let (logits, _) = self.forward(&t)?;
            Ok(logits.flatten_all()?.to_vec1::<f32>()?)
        };
        run().map_err(|e| EvalError::Model(web_node::model::ModelError::Source(e.to_string())))
    }
}
