//! The forward pieces of the non-Mixtral families on the GPU (see
//! [`crate::model::family`] for the CPU side):
//! - `shaders/qkv_post.wgsl`: after the q/k/v projection (a [`super::matvec`]
//!   with the input RMSNorm fused), the biases (Qwen2-MoE), the q/k RMSNorm
//!   (OLMoE over the whole projection, Qwen3-MoE per head), RoPE and the
//!   KV-cache append;
//! - `shaders/shared_gate.wgsl`: the shared expert's sigmoid gate (Qwen2-MoE),
//!   written as the routing words of a one-expert layer, so the shared
//!   expert itself runs on the ordinary expert kernels.
//!
//! The top-k rule without renormalisation (`norm_topk_prob: false`) is the
//! router's `renorm = 0` (see `shaders/router.wgsl`).

use bytemuck::{Pod, Zeroable};

use super::context::{GpuContext, GpuError};
use super::kernel::{f32_bytes, step_buffer, Kernel, Step};
use super::qkv_rope::rope_ref;
use crate::model::QkNorm;

pub const SOURCE_QKV_POST: &str = include_str!("../../../shaders/qkv_post.wgsl");
pub const SOURCE_SHARED_GATE: &str = include_str!("../../../shaders/shared_gate.wgsl");

#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct QkvPostParams {
    pub n_heads: u32,
    pub n_kv: u32,
    pub head_dim: u32,
    pub max_seq: u32,
    pub eps: f32,
    /// 0: no q/k norm, 1: over the whole projection, 2: per head.
    pub norm_mode: u32,
    /// Values of the q norm weight (the k weight follows it in `qk_norm`).
    pub q_norm_len: u32,
    pub _p0: u32,
}

/// The `norm_mode` of a family's q/k norm.
pub fn norm_mode(n: QkNorm) -> u32 {
    match n {
        QkNorm::None => 0,
        QkNorm::Whole => 1,
        QkNorm::PerHead => 2,
    }
}

#[derive(Debug)]
pub struct QkvPost(pub Kernel);

impl QkvPost {
    pub fn new(ctx: &GpuContext) -> Self {
        Self(Kernel::new(ctx, "qkv_post", SOURCE_QKV_POST, None))
    }
    /// Bindings: step, params, raw, bias, qk_norm, rope, q, k_cache, v_cache.
    pub fn bind(&self, ctx: &GpuContext, b: [&wgpu::Buffer; 9]) -> wgpu::BindGroup {
        self.0.bind(ctx, &b)
    }
    pub fn encode(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        bg: &wgpu::BindGroup,
        p: &QkvPostParams,
        n_tok: u32,
    ) {
        let units = u64::from(p.n_heads + 2 * p.n_kv);
        self.0.dispatch(pass, bg, u64::from(n_tok) * units);
    }
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct SharedGateParams {
    pub hidden: u32,
    pub eps: f32,
    pub _p0: u32,
    pub _p1: u32,
}

#[derive(Debug)]
pub struct SharedGate(pub Kernel);

impl SharedGate {
    pub fn new(ctx: &GpuContext) -> Self {
        Self(Kernel::new(ctx, "shared_gate", SOURCE_SHARED_GATE, None))
    }
    /// Bindings: step, params, gate, x, g, route.
    pub fn bind(&self, ctx: &GpuContext, b: [&wgpu::Buffer; 6]) -> wgpu::BindGroup {
        self.0.bind(ctx, &b)
    }
    pub fn encode(&self, pass: &mut wgpu::ComputePass<'_>, bg: &wgpu::BindGroup, n_tok: u32) {
        self.0.dispatch(pass, bg, u64::from(n_tok));
    }
}

/// The shape of one layer's attention for [`qkv_post_reference`].
#[derive(Debug, Clone)]
pub struct QkvPostShape {
    pub n_heads: usize,
    pub n_kv: usize,
    pub head_dim: usize,
    pub eps: f32,
    pub norm: QkNorm,
}

fn rms(v: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let ss: f32 = v.iter().map(|a| a * a).sum();
    let inv = 1.0 / (ss / v.len().max(1) as f32 + eps).sqrt();
    v.iter().zip(w).map(|(a, g)| g * (a * inv)).collect()
}

/// CPU reference of `qkv_post` for `n` tokens at positions `pos0..`:
/// `(q, k, v)`, each `[n][dim]` (`raw` is `[n][q_dim + 2 kv_dim]`, `bias`
/// that wide, `q_norm`/`k_norm` as the family stores them).
pub fn qkv_post_reference(
    s: &QkvPostShape,
    raw: &[f32],
    bias: &[f32],
    q_norm: &[f32],
    k_norm: &[f32],
    table: &[f32],
    pos0: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (qd, kvd, hd) = (s.n_heads * s.head_dim, s.n_kv * s.head_dim, s.head_dim);
    let rows = qd + 2 * kvd;
    let (mut q, mut k, mut v) = (Vec::new(), Vec::new(), Vec::new());
    for (t, r) in raw.chunks_exact(rows).enumerate() {
        let b: Vec<f32> = r.iter().zip(bias).map(|(a, b)| a + b).collect();
        let (mut qt, mut kt) = (b[..qd].to_vec(), b[qd..qd + kvd].to_vec());
        match s.norm {
            QkNorm::None => {}
            QkNorm::Whole => {
                qt = rms(&qt, q_norm, s.eps);
                kt = rms(&kt, k_norm, s.eps);
            }
            QkNorm::PerHead => {
                qt = qt.chunks(hd).flat_map(|h| rms(h, q_norm, s.eps)).collect();
                kt = kt.chunks(hd).flat_map(|h| rms(h, k_norm, s.eps)).collect();
            }
        }
        for h in qt.chunks_mut(hd).chain(kt.chunks_mut(hd)) {
            rope_ref(h, pos0 + t, table);
        }
        q.extend(qt);
        k.extend(kt);
        v.extend_from_slice(&b[qd + kvd..]);
    }
    (q, k, v)
}

/// One-shot GPU run of `qkv_post` (tests), same arguments as
/// [`qkv_post_reference`]; a cache of `pos0 + n` positions.
#[allow(clippy::too_many_arguments)]
pub async fn qkv_post_run(
    ctx: &GpuContext,
    s: &QkvPostShape,
    raw: &[f32],
    bias: &[f32],
    q_norm: &[f32],
    k_norm: &[f32],
    table: &[f32],
    pos0: usize,
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>), GpuError> {
    let (qd, kvd, hd) = (s.n_heads * s.head_dim, s.n_kv * s.head_dim, s.head_dim);
    let rows = qd + 2 * kvd;
    let n = raw.len() / rows.max(1);
    let max_seq = pos0 + n;
    let (qn, kn) = match s.norm {
        QkNorm::None => (0, 0),
        QkNorm::Whole => (qd, kvd),
        QkNorm::PerHead => (hd, hd),
    };
    if hd == 0
        || !hd.is_multiple_of(2)
        || s.n_kv == 0
        || raw.len() != n * rows
        || bias.len() != rows
        || q_norm.len() != qn
        || k_norm.len() != kn
        || table.len() < max_seq * hd
    {
        return Err(GpuError::Input("qkv_post: bad sizes".into()));
    }
    let k = QkvPost::new(ctx);
    let p = QkvPostParams {
        n_heads: s.n_heads as u32,
        n_kv: s.n_kv as u32,
        head_dim: hd as u32,
        max_seq: max_seq as u32,
        eps: s.eps,
        norm_mode: norm_mode(s.norm),
        q_norm_len: qn as u32,
        _p0: 0,
    };
    let step = step_buffer(
        ctx,
        Step {
            pos0: pos0 as u32,
            n_tok: n as u32,
            top_k: 0,
            renorm: 0,
        },
    );
    let pb = ctx.uniform_init("params", bytemuck::bytes_of(&p));
    let norms: Vec<f32> = q_norm.iter().chain(k_norm).copied().collect();
    let rawb = ctx.storage_init("raw", f32_bytes(raw));
    let bb = ctx.storage_init("bias", f32_bytes(bias));
    let nb = ctx.storage_init("qk_norm", f32_bytes(&norms));
    let tb = ctx.storage_init("rope", f32_bytes(table));
    let qb = ctx.storage_zeroed("q", (n * qd * 4) as u64);
    let kc = ctx.storage_zeroed("k_cache", (max_seq * kvd * 4) as u64);
    let vc = ctx.storage_zeroed("v_cache", (max_seq * kvd * 4) as u64);
    let bg = k.bind(ctx, [&step, &pb, &rawb, &bb, &nb, &tb, &qb, &kc, &vc]);
    k.0.run_once(ctx, &bg, (n * (s.n_heads + 2 * s.n_kv)) as u64);
    let q = ctx.read_f32(&qb, n * qd).await?;
    let kt = ctx.read_f32(&kc, max_seq * kvd).await?;
    let vt = ctx.read_f32(&vc, max_seq * kvd).await?;
    // k_cache is [kv_dim][max_seq]; v_cache [max_seq][kv_dim].
    let mut kk = Vec::with_capacity(n * kvd);
    for t in 0..n {
        for c in 0..kvd {
            kk.push(kt[c * max_seq + pos0 + t]);
        }
    }
    let v = vt[pos0 * kvd..].to_vec();
    Ok((q, kk, v))
}

/// CPU reference of the shared gate: `sigmoid(gate . rmsnorm(x[t], g))` per token.
pub fn shared_gate_reference(gate: &[f32], x: &[f32], g: &[f32], eps: f32) -> Vec<f32> {
    x.chunks(gate.len().max(1))
        .map(|xt| {
            let xn = super::kernel::rmsnorm_ref(xt, g, eps);
            let z: f32 = gate.iter().zip(&xn).map(|(a, b)| a * b).sum();
            1.0 / (1.0 + (-z).exp())
        })
        .collect()
}

/// One-shot GPU run of `shared_gate` (tests): the gate per token.
pub async fn shared_gate_run(
    ctx: &GpuContext,
    gate: &[f32],
    x: &[f32],
    g: &[f32],
    eps: f32,
) -> Result<Vec<f32>, GpuError> {
    let h = gate.len();
    if h == 0 || g.len() != h || x.is_empty() || !x.len().is_multiple_of(h) {
        return Err(GpuError::Input("shared_gate: bad sizes".into()));
    }
    let n = x.len() / h;
    let k = SharedGate::new(ctx);
    let p = SharedGateParams {
        hidden: h as u32,
        eps,
        _p0: 0,
        _p1: 0,
    };
    let step = step_buffer(
        ctx,
        Step {
            pos0: 0,
            n_tok: n as u32,
            top_k: 1,
            renorm: 0,
        },
    );
    let pb = ctx.uniform_init("params", bytemuck::bytes_of(&p));
    let gateb = ctx.storage_init("gate", f32_bytes(gate));
    let xb = ctx.storage_init("x", f32_bytes(x));
    let gb = ctx.storage_init("g", f32_bytes(g));
    let rb = ctx.storage_zeroed("route", (n * 8) as u64);
    let bg = k.bind(ctx, [&step, &pb, &gateb, &xb, &gb, &rb]);
    k.0.run_once(ctx, &bg, n as u64);
    let words = ctx.read_f32(&rb, 2 * n).await?;
    Ok(words.chunks_exact(2).map(|w| w[1]).collect())
}
