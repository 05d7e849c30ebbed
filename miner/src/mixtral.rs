//! A small trainable Mixtral in candle, with Hugging Face tensor names.
//!
//! candle-transformers' Mixtral picks experts through host-side `to_vec2`, so
//! no gradient reaches the router; this one keeps the routing weights in the
//! graph (softmax over all experts, top-k mask, renormalised; candle's
//! differentiable `softmax`, since the fused `softmax_last_dim` has no
//! backward pass) so the gate
//! trains, and adds Mixtral's load-balancing loss and a routing objective
//! (the mutual information between sequence and expert, as in Mod-Squad,
//! see [`Routed::mi`]); both are training-only. Inference semantics are
//! the same as Hugging Face's `MixtralForCausalLM` (RMSNorm, RoPE with
//! rotate-half, GQA, top-k renormalised routing, SwiGLU experts).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use web_node::eval::corpus::Rng;
use web_node::eval::{EvalError, LogitsModel};
use web_node::model::{Config, Slot};

/// One forward pass: logits and the routing terms (each a mean over layers).
pub struct Routed {
    /// `(B, T, vocab)`.
    pub logits: Tensor,
    /// Mixtral's load-balancing loss over the batch's real tokens: `E *
    /// sum_e f_e * P_e` (1 when balanced).
    pub aux: Tensor,
    /// Mutual information between sequence and expert (Mod-Squad), in nats:
    /// `H(p(e)) - mean_seq H(p(e|seq))`, where `p(e|seq)` is the router
    /// softmax averaged over one sequence's real tokens and `p(e)` the mean
    /// of those over the batch. High when each sequence uses few experts
    /// (low per-sequence entropy) while the batch uses them all (high
    /// batch entropy); at most `ln E`.
    pub mi: Tensor,
    /// Mean over real tokens of `ln` of the router probability on their
    /// sequence's `k` likeliest experts (by `p(e|seq)`), at most 0: near 0
    /// when every token's top-k lies within its sequence's top-k, so a
    /// prompt needs only k experts per layer. The MI alone concentrates
    /// `p(e|seq)` on one expert and leaves each token's second pick to
    /// chance.
    pub cover: Tensor,
    /// The same three terms of each layer, in layer order (their means are
    /// `aux`, `mi` and `cover`), for weights that differ by layer.
    pub layers: Vec<LayerTerms>,
    /// `picks[layer][expert]`: how many real tokens picked the expert
    /// (among their top-k) in each layer.
    pub picks: Vec<Vec<usize>>,
}

/// One layer's routing terms (see [`Routed`]).
pub struct LayerTerms {
    pub aux: Tensor,
    pub mi: Tensor,
    pub cover: Tensor,
    /// Mean over sequences of `sum_e max_t p(e|x_t)` over the sequence's
    /// real tokens: a soft count of the experts a sequence needs (1 when
    /// every token puts all its weight on one and the same expert).
    pub union: Tensor,
}

/// Entropy in nats of probability rows along the last dimension.
fn entropy(p: &Tensor) -> Result<Tensor> {
    Ok((p * (p + 1e-9)?.log()?)?.sum(D::Minus1)?.neg()?)
}

/// The model's parameters by Hugging Face name.
pub struct Mixtral {
    pub cfg: Config,
    pub vars: BTreeMap<String, Var>,
    /// Layers whose sequence cover aims at a balanced assignment of the
    /// batch's sequences to experts ([`balanced_experts`]) instead of each
    /// sequence's own likeliest `k` (training only; empty by default).
    pub balanced_cover: Vec<usize>,
    /// `(layer, m)`: in that layer the sequence cover first gives every
    /// expert the `m` sequences of the batch that lean to it most
    /// ([`floored_experts`]); training only, empty by default.
    pub cover_floor: Vec<(usize, usize)>,
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

/// Training runs the Mixtral layout only: other families are refused.
fn check_mixtral(cfg: &Config) -> Result<()> {
    let f = cfg.family();
    if f != web_node::model::Family::Mixtral {
        bail!(
            "model_type {} is not supported for training (only mixtral); inference (chat, logits) and import/export support it",
            f.model_type()
        );
    }
    Ok(())
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
        Self::init_with_router_scale(cfg, seed, 0.1, device)
    }

    /// [`Mixtral::init`] with the routers' std scaled by `router_scale` (the
    /// routing objective's gradient vanishes at uniform routing, so it needs
    /// routers that start off uniform).
    pub fn init_with_router_scale(
        cfg: &Config,
        seed: u64,
        router_scale: f64,
        device: &Device,
    ) -> Result<Self> {
        check_mixtral(cfg)?;
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
                    std *= router_scale;
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
        check_mixtral(cfg)?;
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
            balanced_cover: Vec::new(),
            cover_floor: Vec::new(),
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
    /// loss (mean over layers), every position a real token.
    pub fn forward(&self, tokens: &Tensor) -> Result<(Tensor, Tensor)> {
        let r = self.forward_routed(tokens, None)?;
        Ok((r.logits, r.aux))
    }

    /// Logits and routing terms for token ids `(B, T)`; `valid` `(B * T,)`
    /// is 1 on real tokens and 0 on padding (None: all real). Padding is
    /// left out of the routing terms (it never changes real positions: the
    /// attention is causal and padding comes last).
    pub fn forward_routed(&self, tokens: &Tensor, valid: Option<&Tensor>) -> Result<Routed> {
        let cfg = &self.cfg;
        let (b, t) = tokens.dims2()?;
        let valid = match valid {
            Some(v) => v.reshape((b * t,))?,
            None => Tensor::ones((b * t,), DType::F32, &self.device)?,
        };
        let routing = RoutingMask::new(&valid, b, t)?;
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
        let mut mi = Tensor::zeros((), DType::F32, &self.device)?;
        let mut cover = Tensor::zeros((), DType::F32, &self.device)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        let mut picks = Vec::with_capacity(cfg.num_hidden_layers);
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
            // `softmax`, not the fused `softmax_last_dim`: that one has no
            // backward pass (candle 0.9 applies it with `apply_op1_no_bwd`),
            // so queries, keys and routers would never train.
            let att = candle_nn::ops::softmax(&att, D::Minus1)?;
            let o = att.matmul(&v)?.transpose(1, 2)?.reshape((n, nh * hd))?;
            let o = self.linear(&o, &format!("{p}.self_attn.o_proj.weight"))?;
            x = (x + o)?;

            let hs = self.rms(&x, &format!("{p}.post_attention_layernorm.weight"))?;
            let (moe, terms, layer_picks) = self.moe(&hs, l, &routing)?;
            cover = (cover + &terms.cover)?;
            aux = (aux + &terms.aux)?;
            mi = (mi + &terms.mi)?;
            layers.push(terms);
            picks.push(layer_picks);
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
        let n_layers = cfg.num_hidden_layers as f64;
        Ok(Routed {
            logits,
            aux: (aux / n_layers)?,
            mi: (mi / n_layers)?,
            cover: (cover / n_layers)?,
            layers,
            picks,
        })
    }

    /// The sparse MoE block on `(N, H)` states: output, the layer's routing
    /// terms and how many real tokens picked each expert.
    fn moe(
        &self,
        hs: &Tensor,
        l: usize,
        r: &RoutingMask,
    ) -> Result<(Tensor, LayerTerms, Vec<usize>)> {
        let cfg = &self.cfg;
        let e = cfg.num_local_experts;
        let k = cfg.num_experts_per_tok;
        let p = format!("model.layers.{l}.block_sparse_moe");
        let logits = self.linear(hs, &format!("{p}.gate.weight"))?;
        let probs = candle_nn::ops::softmax(&logits, D::Minus1)?;
        let host = probs.to_vec2::<f32>()?;
        let n = host.len();
        let mut mask = vec![0f32; n * e];
        let mut rows: Vec<Vec<u32>> = vec![Vec::new(); e];
        let mut picks = vec![0usize; e];
        for (i, row) in host.iter().enumerate() {
            for j in likeliest(row, k) {
                mask[i * e + j] = 1.0;
                rows[j].push(i as u32);
                if r.valid_host[i] {
                    picks[j] += 1;
                }
            }
        }
        let mask = Tensor::from_vec(mask, (n, e), &self.device)?;
        let sel = (&probs * &mask)?;
        let weights = sel.broadcast_div(&sel.sum_keepdim(1)?)?;
        // Load balancing (Switch/Mixtral) over the batch's real tokens:
        // E * sum_e f_e * P_e, f from the mask.
        let vprobs = probs.broadcast_mul(&r.valid)?;
        let f = (mask.broadcast_mul(&r.valid)?.sum(0)? / (r.n_valid * k as f64))?;
        let pm = (vprobs.sum(0)? / r.n_valid)?;
        let aux = ((f * pm)?.sum_all()? * e as f64)?;
        let mi = sequence_expert_mi(&vprobs, r)?;
        let union = vprobs.reshape((r.b, r.t, e))?.max(1)?.sum(1)?.mean_all()?;
        let floor = self
            .cover_floor
            .iter()
            .filter(|(fl, _)| *fl == l)
            .map(|(_, m)| *m)
            .max()
            .unwrap_or(0);
        let cover = sequence_cover(
            &probs,
            &vprobs,
            r,
            k,
            self.balanced_cover.contains(&l),
            floor,
        )?;

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
        Ok((
            out,
            LayerTerms {
                aux,
                mi,
                cover,
                union,
            },
            picks,
        ))
    }

    /// Make expert `to` of layer `l` a copy of expert `from` (w1, w2, w3)
    /// and give it `from`'s router row plus Gaussian noise of `noise` times
    /// that row's RMS, so the two start as one expert split in two and the
    /// routing objective can send different sequences to each (used to
    /// revive an expert that no token picks any more).
    pub fn split_expert(
        &self,
        l: usize,
        from: usize,
        to: usize,
        noise: f64,
        rng: &mut Rng,
    ) -> Result<()> {
        let e = self.cfg.num_local_experts;
        if from >= e || to >= e || from == to {
            bail!("cannot split expert {from} into {to} of a layer with {e} experts");
        }
        let p = format!("model.layers.{l}.block_sparse_moe");
        for w in ["w1", "w2", "w3"] {
            let src = self.w(&format!("{p}.experts.{from}.{w}.weight"))?.copy()?;
            let dst = self
                .vars
                .get(&format!("{p}.experts.{to}.{w}.weight"))
                .with_context(|| format!("no tensor {p}.experts.{to}.{w}.weight"))?;
            dst.set(&src)?;
        }
        let gate_name = format!("{p}.gate.weight");
        let gate = self
            .vars
            .get(&gate_name)
            .with_context(|| format!("no tensor {gate_name}"))?;
        let mut rows = gate.as_tensor().to_vec2::<f32>()?;
        let src = rows[from].clone();
        let rms =
            (src.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / src.len().max(1) as f64).sqrt();
        let eps = randn(rng, src.len(), noise * rms);
        rows[to] = src.iter().zip(&eps).map(|(a, b)| a + b).collect();
        let h = rows[0].len();
        let flat: Vec<f32> = rows.into_iter().flatten().collect();
        gate.set(&Tensor::from_vec(flat, (e, h), &self.device)?)?;
        Ok(())
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

/// Mutual information between sequence and expert (Mod-Squad) from router
/// probabilities `(B * T, E)` already zeroed on padding: `H(p(e)) -
/// mean_seq H(p(e|seq))` with `p(e|seq)` the mean over the sequence's real
/// tokens and `p(e)` the mean of those over the sequences.
fn sequence_expert_mi(vprobs: &Tensor, r: &RoutingMask) -> Result<Tensor> {
    let e = vprobs.dim(1)?;
    let p_seq = vprobs
        .reshape((r.b, r.t, e))?
        .sum(1)?
        .broadcast_div(&r.per_seq)?;
    let p_all = p_seq.mean(0)?;
    Ok((entropy(&p_all)? - entropy(&p_seq)?.mean_all()?)?)
}

/// Mean over real tokens of `ln` of the probability `probs` `(B * T, E)`
/// puts on the `k` experts its sequence routes to most (by `vprobs`, the
/// same zeroed on padding; the choice is a constant, the gradient goes
/// through the probabilities).
fn sequence_cover(
    probs: &Tensor,
    vprobs: &Tensor,
    r: &RoutingMask,
    k: usize,
    balanced: bool,
    floor: usize,
) -> Result<Tensor> {
    let e = probs.dim(1)?;
    let per_seq = vprobs.reshape((r.b, r.t, e))?.sum(1)?.to_vec2::<f32>()?;
    let chosen = if balanced {
        balanced_experts(&per_seq, k)
    } else if floor > 0 {
        floored_experts(&per_seq, k, floor)
    } else {
        per_seq.iter().map(|row| likeliest(row, k)).collect()
    };
    let mut mask = vec![0f32; r.b * r.t * e];
    for (b, experts) in chosen.iter().enumerate() {
        for &j in experts {
            for t in 0..r.t {
                mask[(b * r.t + t) * e + j] = 1.0;
            }
        }
    }
    let mask = Tensor::from_vec(mask, (r.b * r.t, e), probs.device())?;
    let covered = (probs * mask)?.sum_keepdim(1)?;
    let logc = (covered + 1e-6)?.log()?;
    Ok((logc.broadcast_mul(&r.valid)?.sum_all()? / r.n_valid)?)
}

/// The indices of the `k` largest entries of `row`, largest first (ties to
/// the lower index): the top-k of routing.
fn likeliest(row: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// `k` experts for each sequence (rows: its summed router probabilities)
/// such that no expert serves more than `ceil(B * k / E)` sequences: pairs
/// are taken greedily, likeliest first (BASE layers' balanced assignment, at
/// the level of sequences), and a sequence left short takes its likeliest
/// experts not yet its own. Every expert then has sequences to learn from,
/// while each sequence still keeps to `k` experts.
pub fn balanced_experts(per_seq: &[Vec<f32>], k: usize) -> Vec<Vec<usize>> {
    let b = per_seq.len();
    let e = per_seq.first().map_or(0, |r| r.len());
    let k = k.min(e);
    if e == 0 {
        return vec![Vec::new(); b];
    }
    let cap = (b * k).div_ceil(e);
    let mut pairs: Vec<(usize, usize)> = (0..b).flat_map(|s| (0..e).map(move |j| (s, j))).collect();
    pairs.sort_by(|&(s1, j1), &(s2, j2)| {
        per_seq[s2][j2]
            .total_cmp(&per_seq[s1][j1])
            .then(s1.cmp(&s2))
            .then(j1.cmp(&j2))
    });
    let mut load = vec![0usize; e];
    let mut out: Vec<Vec<usize>> = vec![Vec::with_capacity(k); b];
    for (s, j) in pairs {
        if out[s].len() < k && load[j] < cap {
            out[s].push(j);
            load[j] += 1;
        }
    }
    fill_with_likeliest(per_seq, &mut out, k);
    out
}

/// Each sequence's experts filled up to `k` with its own likeliest ones
/// that it does not have yet.
fn fill_with_likeliest(per_seq: &[Vec<f32>], out: &mut [Vec<usize>], k: usize) {
    for (row, experts) in per_seq.iter().zip(out.iter_mut()) {
        if experts.len() < k {
            let more: Vec<usize> = likeliest(row, row.len())
                .into_iter()
                .filter(|j| !experts.contains(j))
                .take(k - experts.len())
                .collect();
            experts.extend(more);
        }
    }
}

/// `k` experts for each sequence (rows: its summed router probabilities)
/// such that every expert has at least `m` sequences (when the batch has
/// room): in `m` rounds each expert in turn takes the sequence with room
/// left that gives it the largest share of its probability, and then every
/// sequence fills up with its own likeliest experts. Unlike
/// [`balanced_experts`] a busy expert keeps every sequence that wants it;
/// a rarely picked one gets the few sequences closest to it, so it keeps
/// learning without spreading every prompt over more experts.
pub fn floored_experts(per_seq: &[Vec<f32>], k: usize, m: usize) -> Vec<Vec<usize>> {
    let b = per_seq.len();
    let e = per_seq.first().map_or(0, |r| r.len());
    let k = k.min(e);
    let share: Vec<Vec<f32>> = per_seq
        .iter()
        .map(|row| {
            let t: f32 = row.iter().sum();
            row.iter()
                .map(|p| if t > 0.0 { p / t } else { 0.0 })
                .collect()
        })
        .collect();
    let mut out: Vec<Vec<usize>> = vec![Vec::with_capacity(k); b];
    for _ in 0..m {
        // `j` is the expert being served, pushed as well as indexed.
        #[allow(clippy::needless_range_loop)]
        for j in 0..e {
            let best = (0..b)
                .filter(|&s| out[s].len() < k && !out[s].contains(&j))
                .max_by(|&s1, &s2| share[s1][j].total_cmp(&share[s2][j]).then(s2.cmp(&s1)));
            if let Some(s) = best {
                out[s].push(j);
            }
        }
    }
    fill_with_likeliest(per_seq, &mut out, k);
    out
}

/// Which positions of a `(B, T)` batch are real tokens, for the routing terms.
struct RoutingMask {
    /// `(B * T, 1)`, 1 on real tokens.
    valid: Tensor,
    /// The same on the host.
    valid_host: Vec<bool>,
    /// Real tokens per sequence, `(B, 1)`, at least 1.
    per_seq: Tensor,
    /// Real tokens in the batch, at least 1.
    n_valid: f64,
    b: usize,
    t: usize,
}

impl RoutingMask {
    /// From `valid` `(B * T,)`.
    fn new(valid: &Tensor, b: usize, t: usize) -> Result<Self> {
        Ok(Self {
            valid_host: valid.to_vec1::<f32>()?.iter().map(|v| *v > 0.0).collect(),
            valid: valid.unsqueeze(1)?,
            per_seq: valid
                .reshape((b, t))?
                .sum_keepdim(1)?
                .clamp(1f32, f32::MAX)?,
            n_valid: (valid.sum_all()?.to_scalar::<f32>()? as f64).max(1.0),
            b,
            t,
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routers_and_attention_get_gradients() {
        let cfg = Config::from_value(&serde_json::json!({
            "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
            "vocab_size": 16, "hidden_size": 8, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
            "max_position_embeddings": 16, "rms_norm_eps": 1e-5, "num_experts_per_tok": 2,
            "num_local_experts": 4,
        }))
        .unwrap();
        let m = Mixtral::init_with_router_scale(&cfg, 7, 1.0, &Device::Cpu).unwrap();
        let tokens = Tensor::new(&[[1u32, 5, 3, 2], [4, 4, 9, 0]], &Device::Cpu).unwrap();
        let valid = Tensor::new(&[1f32, 1., 1., 1., 1., 1., 1., 0.], &Device::Cpu).unwrap();
        let r = m.forward_routed(&tokens, Some(&valid)).unwrap();
        let loss = ((r.logits.sqr().unwrap().mean_all().unwrap() + r.aux).unwrap() - r.mi).unwrap();
        let grads = loss.backward().unwrap();
        for name in [
            "model.layers.0.block_sparse_moe.gate.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.self_attn.k_proj.weight",
        ] {
            let g = grads.get(m.vars[name].as_tensor()).expect(name);
            let n = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(n > 0.0, "{name}: zero gradient");
        }
    }

    /// MI of router probabilities `rows` (B * T rows of E) with a mask.
    fn mi(rows: &[[f32; 4]], valid: &[f32], b: usize) -> f64 {
        let d = Device::Cpu;
        let t = rows.len() / b;
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        let p = Tensor::from_vec(flat, (rows.len(), 4), &d).unwrap();
        let v = Tensor::new(valid, &d).unwrap();
        let r = RoutingMask::new(&v, b, t).unwrap();
        let vp = p.broadcast_mul(&r.valid).unwrap();
        sequence_expert_mi(&vp, &r)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64
    }

    const ONE0: [f32; 4] = [1.0, 0.0, 0.0, 0.0];
    const ONE1: [f32; 4] = [0.0, 1.0, 0.0, 0.0];
    const HALF: [f32; 4] = [0.5, 0.5, 0.0, 0.0];
    const FLAT: [f32; 4] = [0.25; 4];

    #[test]
    fn mi_is_high_when_each_sequence_keeps_to_its_own_experts() {
        let ln2 = std::f64::consts::LN_2;
        // Two sequences of two tokens, each on its own expert: MI = ln 2.
        assert!((mi(&[ONE0, ONE0, ONE1, ONE1], &[1.0; 4], 2) - ln2).abs() < 1e-4);
        // Both on the same experts: nothing to tell them apart.
        assert!(mi(&[HALF, HALF, HALF, HALF], &[1.0; 4], 2).abs() < 1e-4);
        assert!(mi(&[FLAT, FLAT, FLAT, FLAT], &[1.0; 4], 2).abs() < 1e-4);
        // Tokens of one sequence spread over two experts: p(e|seq) is flat
        // over them and equals p(e), so MI = 0 although every token is sure.
        assert!(mi(&[ONE0, ONE1, ONE0, ONE1], &[1.0; 4], 2).abs() < 1e-4);
    }

    #[test]
    fn cover_is_zero_only_when_tokens_keep_to_their_sequences_top_k() {
        let d = Device::Cpu;
        let cover = |rows: &[[f32; 4]]| {
            let flat: Vec<f32> = rows.iter().flatten().copied().collect();
            let p = Tensor::from_vec(flat, (rows.len(), 4), &d).unwrap();
            let r = RoutingMask::new(&Tensor::new(&[1f32; 4], &d).unwrap(), 2, 2).unwrap();
            let vp = p.broadcast_mul(&r.valid).unwrap();
            sequence_cover(&p, &vp, &r, 2, false, 0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        };
        // Sequence 0 uses experts 0 and 1, sequence 1 experts 2 and 3.
        let a = [[0.6, 0.4, 0.0, 0.0], [0.3, 0.7, 0.0, 0.0]];
        let b = [[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.9, 0.1]];
        assert!(cover(&[a[0], a[1], b[0], b[1]]).abs() < 1e-4);
        // A token of sequence 1 straying to expert 0 costs ln(coverage).
        let stray = [0.5, 0.0, 0.5, 0.0];
        let c = cover(&[a[0], a[1], b[0], stray]);
        assert!(c < -0.1 && c > -0.5, "{c}");
    }

    #[test]
    fn mi_ignores_padding() {
        let ln2 = std::f64::consts::LN_2;
        // The padding rows (flat) would pull p(e|seq) towards uniform.
        let rows = [ONE0, FLAT, ONE1, ONE1];
        assert!((mi(&rows, &[1.0, 0.0, 1.0, 1.0], 2) - ln2).abs() < 1e-4);
        assert!(mi(&rows, &[1.0; 4], 2) < ln2 - 0.1);
    }

    #[test]
    fn floored_experts_give_every_expert_its_closest_sequences() {
        // Six sequences that all lean to experts 0 and 1; expert 2 is
        // nobody's choice but sequence 4 leans to it a little more.
        let mut rows = vec![vec![0.6, 0.35, 0.05]; 6];
        rows[4] = vec![0.5, 0.3, 0.2];
        let out = floored_experts(&rows, 2, 1);
        assert_eq!(out.len(), 6);
        for (s, ex) in out.iter().enumerate() {
            assert_eq!(ex.len(), 2, "sequence {s}: {ex:?}");
            let mut d = ex.clone();
            d.dedup();
            assert_eq!(d.len(), 2);
        }
        // Expert 2 got exactly the sequence closest to it, which keeps its
        // likeliest expert; every other sequence keeps its own two.
        let with2: Vec<usize> = (0..6).filter(|&s| out[s].contains(&2)).collect();
        assert_eq!(with2, vec![4]);
        assert!(out[4].contains(&0));
        for s in [0, 1, 2, 3, 5] {
            assert!(
                out[s].contains(&0) && out[s].contains(&1),
                "{s}: {:?}",
                out[s]
            );
        }
        // No floor is the plain top-k; an empty batch is fine.
        let plain = floored_experts(&rows, 2, 0);
        assert!(plain.iter().zip(&rows).all(|(o, r)| *o == likeliest(r, 2)));
        assert_eq!(floored_experts(&[], 2, 3), Vec::<Vec<usize>>::new());
    }

    #[test]
    fn balanced_experts_spread_sequences_and_keep_k_each() {
        // Six sequences that all prefer experts 0 and 1: with 4 experts and
        // k = 2 each expert may serve ceil(12 / 4) = 3 of them.
        let rows: Vec<Vec<f32>> = (0..6)
            .map(|s| vec![0.5 - 0.01 * s as f32, 0.4, 0.05 + 0.001 * s as f32, 0.05])
            .collect();
        let out = balanced_experts(&rows, 2);
        let mut load = [0usize; 4];
        for (s, ex) in out.iter().enumerate() {
            assert_eq!(ex.len(), 2, "sequence {s}: {ex:?}");
            assert_ne!(ex[0], ex[1]);
            for &j in ex {
                load[j] += 1;
            }
        }
        assert_eq!(load, [3, 3, 3, 3]);
        // The likeliest sequences keep their own choice.
        assert_eq!(out[0], vec![0, 1]);
        // Unbalanced input that fits the capacity is left as it is.
        let rows = vec![vec![0.6, 0.3, 0.05, 0.05], vec![0.05, 0.05, 0.3, 0.6]];
        let out = balanced_experts(&rows, 2);
        assert_eq!(out, vec![vec![0, 1], vec![3, 2]]);
        assert_eq!(balanced_experts(&[], 2), Vec::<Vec<usize>>::new());
    }
}
