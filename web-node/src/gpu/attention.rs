//! `shaders/attention.wgsl`: causal grouped-query attention over the KV cache.

use bytemuck::{Pod, Zeroable};

use super::context::{GpuContext, GpuError};
use super::kernel::{f32_bytes, step_buffer, transpose, Kernel, Step};

pub const SOURCE: &str = include_str!("../../../shaders/attention.wgsl");

#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct Params {
    pub n_heads: u32,
    pub n_kv: u32,
    pub head_dim: u32,
    pub max_seq: u32,
    pub scale: f32,
    pub _p0: u32,
    pub _p1: u32,
    pub _p2: u32,
}

#[derive(Debug)]
pub struct Attention(pub Kernel);

impl Attention {
    pub fn new(ctx: &GpuContext) -> Self {
        Self(Kernel::new(ctx, "attention", SOURCE, None))
    }
    /// Bindings: step, params, q, k_cache (`[kv_dim][max_seq]`), v_cache, scores, out.
    pub fn bind(&self, ctx: &GpuContext, b: [&wgpu::Buffer; 7]) -> wgpu::BindGroup {
        self.0.bind(ctx, &b)
    }
    /// One workgroup per (token, head).
    pub fn encode(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        bg: &wgpu::BindGroup,
        p: &Params,
        n_tok: u32,
    ) {
        self.0
            .dispatch_groups(pass, bg, u64::from(n_tok) * u64::from(p.n_heads));
    }
}

/// CPU reference. `k`, `v`: `[positions][kv_dim]` with at least
/// `pos0 + n` positions; `q`: `[n][n_heads * head_dim]`. Token `t` attends to
/// positions `0..=pos0 + t`.
pub fn reference(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    n_heads: usize,
    n_kv: usize,
    head_dim: usize,
    pos0: usize,
) -> Vec<f32> {
    let qd = n_heads * head_dim;
    let kvd = n_kv * head_dim;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let mut out = vec![0.0; q.len()];
    for (t, qt) in q.chunks(qd).enumerate() {
        let len = pos0 + t + 1;
        for h in 0..n_heads {
            let kvh = h / (n_heads / n_kv);
            let qh = &qt[h * head_dim..(h + 1) * head_dim];
            let scores: Vec<f32> = (0..len)
                .map(|j| {
                    let kj = &k[j * kvd + kvh * head_dim..j * kvd + (kvh + 1) * head_dim];
                    qh.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() * scale
                })
                .collect();
            let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = scores.iter().map(|s| (s - m).exp()).collect();
            let sum: f32 = e.iter().sum();
            for d in 0..head_dim {
                let acc: f32 = (0..len)
                    .map(|j| e[j] * v[j * kvd + kvh * head_dim + d])
                    .sum();
                out[t * qd + h * head_dim + d] = acc / sum;
            }
        }
    }
    out
}

/// One-shot GPU run (tests), same arguments as [`reference()`].
#[allow(clippy::too_many_arguments)]
pub async fn run(
    ctx: &GpuContext,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    n_heads: usize,
    n_kv: usize,
    head_dim: usize,
    pos0: usize,
) -> Result<Vec<f32>, GpuError> {
    let qd = n_heads * head_dim;
    let kvd = n_kv * head_dim;
    let n = q.len() / qd.max(1);
    let max_seq = pos0 + n;
    if qd == 0
        || !q.len().is_multiple_of(qd)
        || k.len() < max_seq * kvd
        || v.len() < max_seq * kvd
        || n_kv == 0
        || !n_heads.is_multiple_of(n_kv)
    {
        return Err(GpuError::Input("attention: shape mismatch".into()));
    }
    let kern = Attention::new(ctx);
    let p = Params {
        n_heads: n_heads as u32,
        n_kv: n_kv as u32,
        head_dim: head_dim as u32,
        max_seq: max_seq as u32,
        scale: 1.0 / (head_dim as f32).sqrt(),
        _p0: 0,
        _p1: 0,
        _p2: 0,
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
    let qb = ctx.storage_init("q", f32_bytes(q));
    let kb = ctx.storage_init(
        "k_cache",
        f32_bytes(&transpose(max_seq, kvd, &k[..max_seq * kvd])),
    );
    let vb = ctx.storage_init("v_cache", f32_bytes(&v[..max_seq * kvd]));
    let sb = ctx.storage_zeroed("scores", (n * n_heads * max_seq * 4) as u64);
    let ob = ctx.storage_zeroed("out", (q.len() * 4) as u64);
    let bg = kern.bind(ctx, [&step, &pb, &qb, &kb, &vb, &sb, &ob]);
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    {
        let mut pass = enc.begin_compute_pass(&Default::default());
        kern.encode(&mut pass, &bg, &p, n as u32);
    }
    ctx.queue.submit([enc.finish()]);
    ctx.read_f32(&ob, q.len()).await
}
