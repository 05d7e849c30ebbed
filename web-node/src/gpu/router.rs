//! `shaders/router.wgsl`: MoE router (fused RMSNorm, gate, softmax, top-k, renormalise).

use bytemuck::{Pod, Zeroable};

use super::context::{GpuContext, GpuError};
use super::kernel::{f32_bytes, matvec_ref, rmsnorm_ref, step_buffer, transpose, Kernel, Step};

pub const SOURCE: &str = include_str!("../../../shaders/router.wgsl");

#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct Params {
    pub hidden: u32,
    pub n_experts: u32,
    pub eps: f32,
    pub _p0: u32,
}

#[derive(Debug)]
pub struct Router(pub Kernel);

impl Router {
    pub fn new(ctx: &GpuContext) -> Self {
        Self(Kernel::new(ctx, "router", SOURCE, None))
    }
    /// Bindings: step, params, gate (`[hidden][n_experts]`), x, g, probs scratch, route.
    pub fn bind(&self, ctx: &GpuContext, b: [&wgpu::Buffer; 7]) -> wgpu::BindGroup {
        self.0.bind(ctx, &b)
    }
    /// One invocation per token.
    pub fn encode(&self, pass: &mut wgpu::ComputePass<'_>, bg: &wgpu::BindGroup, n_tok: u32) {
        self.0.dispatch(pass, bg, u64::from(n_tok));
    }
}

/// Softmax over the router logits, then the `k` largest (largest first, the
/// lower expert index on ties), their weights divided by their sum when
/// `renorm`.
pub fn select(logits: &[f32], k: usize, renorm: bool) -> Vec<(u32, f32)> {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = logits.iter().map(|l| (l - m).exp()).collect();
    let sum: f32 = e.iter().sum();
    let mut probs: Vec<f32> = e.iter().map(|v| v / sum).collect();
    let mut out = Vec::with_capacity(k);
    for _ in 0..k.min(probs.len()) {
        let mut bi = 0;
        let mut bv = -1.0;
        for (i, &p) in probs.iter().enumerate() {
            if p > bv {
                bv = p;
                bi = i;
            }
        }
        probs[bi] = -2.0;
        out.push((bi as u32, bv));
    }
    if renorm {
        let s: f32 = out.iter().map(|x| x.1).sum();
        for x in &mut out {
            x.1 /= s;
        }
    }
    out
}

/// CPU reference: per token, `k` `(expert, weight)` pairs.
#[allow(clippy::too_many_arguments)]
pub fn reference(
    gate: &[f32],
    n_experts: usize,
    hidden: usize,
    x: &[f32],
    g: &[f32],
    eps: f32,
    k: usize,
    renorm: bool,
) -> Vec<Vec<(u32, f32)>> {
    x.chunks(hidden)
        .map(|xt| {
            let xn = rmsnorm_ref(xt, g, eps);
            select(&matvec_ref(gate, n_experts, hidden, &xn), k, renorm)
        })
        .collect()
}

/// Decode the kernel's `route` words (`[n][n_experts][id, weight bits]`) for `k` slots.
pub fn decode_route(words: &[u32], n: usize, n_experts: usize, k: usize) -> Vec<Vec<(u32, f32)>> {
    (0..n)
        .map(|t| {
            (0..k)
                .map(|s| {
                    let i = (t * n_experts + s) * 2;
                    (words[i], f32::from_bits(words[i + 1]))
                })
                .collect()
        })
        .collect()
}

/// One-shot GPU run (tests).
#[allow(clippy::too_many_arguments)]
pub async fn run(
    ctx: &GpuContext,
    gate: &[f32],
    n_experts: usize,
    hidden: usize,
    x: &[f32],
    g: &[f32],
    eps: f32,
    k: usize,
    renorm: bool,
) -> Result<Vec<Vec<(u32, f32)>>, GpuError> {
    if gate.len() != n_experts * hidden
        || !x.len().is_multiple_of(hidden)
        || k == 0
        || k > n_experts
    {
        return Err(GpuError::Input("router: shape mismatch".into()));
    }
    let n = x.len() / hidden;
    let kern = Router::new(ctx);
    let p = Params {
        hidden: hidden as u32,
        n_experts: n_experts as u32,
        eps,
        _p0: 0,
    };
    let step = step_buffer(
        ctx,
        Step {
            pos0: 0,
            n_tok: n as u32,
            top_k: k as u32,
            renorm: u32::from(renorm),
        },
    );
    let pb = ctx.uniform_init("params", bytemuck::bytes_of(&p));
    let wb = ctx.storage_init("gate", f32_bytes(&transpose(n_experts, hidden, gate)));
    let xb = ctx.storage_init("x", f32_bytes(x));
    let gb = ctx.storage_init("g", f32_bytes(g));
    let probs = ctx.storage_zeroed("probs", (n * n_experts * 4) as u64);
    let route = ctx.storage_zeroed("route", (n * n_experts * 8) as u64);
    let bg = kern.bind(ctx, [&step, &pb, &wb, &xb, &gb, &probs, &route]);
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    {
        let mut pass = enc.begin_compute_pass(&Default::default());
        kern.encode(&mut pass, &bg, n as u32);
    }
    ctx.queue.submit([enc.finish()]);
    let words = ctx.read_u32(&route, n * n_experts * 2).await?;
    Ok(decode_route(&words, n, n_experts, k))
}
