//! `shaders/expert_up.wgsl` and `shaders/expert_down.wgsl`: the SwiGLU
//! experts of one layer, for the experts the router chose.
//! up: `act = silu(w1 xn) * (w3 xn)` with the post-attention RMSNorm fused;
//! down: `x += sum_k weight_k * w2_k act_k` (weighted sum and residual fused).
//!
//! The weights live in an expert pool: `w13` and `w2` hold `n_slots` experts
//! each, and a per-layer table `slots[expert]` says which slot holds which
//! expert, so evicting or uploading an expert rewrites one table word and
//! never a bind group.

use bytemuck::{Pod, Zeroable};

use super::context::{GpuContext, GpuError};
use super::kernel::{
    f32_bytes, matvec_ref, rmsnorm_ref, step_buffer, transpose, Kernel, Step, WeightFormat,
};

pub const SOURCE_UP: &str = include_str!("../../../shaders/expert_up.wgsl");
pub const SOURCE_DOWN: &str = include_str!("../../../shaders/expert_down.wgsl");
pub const SOURCE_UP_F16: &str = include_str!("../../../shaders/expert_up_f16.wgsl");
pub const SOURCE_DOWN_F16: &str = include_str!("../../../shaders/expert_down_f16.wgsl");

#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct Params {
    pub hidden: u32,
    pub inter: u32,
    pub n_experts: u32,
    pub eps: f32,
    /// Experts the pool buffers hold (slot indices are clamped below it).
    pub n_slots: u32,
    pub _p0: u32,
    pub _p1: u32,
    pub _p2: u32,
}

#[derive(Debug)]
pub struct ExpertUp(pub Kernel);
#[derive(Debug)]
pub struct ExpertDown(pub Kernel);

impl ExpertUp {
    pub fn new(ctx: &GpuContext) -> Self {
        Self::with_format(ctx, WeightFormat::F32)
    }

    /// The variant reading `w13` in `format`.
    pub fn with_format(ctx: &GpuContext, format: WeightFormat) -> Self {
        match format {
            WeightFormat::F32 => Self(Kernel::new(ctx, "expert_up", SOURCE_UP, None)),
            WeightFormat::F16 => Self(Kernel::new(ctx, "expert_up_f16", SOURCE_UP_F16, None)),
        }
    }
    /// Bindings: step, params, w13 (pool), x, g, route, act, slot table.
    pub fn bind(&self, ctx: &GpuContext, b: [&wgpu::Buffer; 8]) -> wgpu::BindGroup {
        self.0.bind(ctx, &b)
    }
    pub fn encode(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        bg: &wgpu::BindGroup,
        p: &Params,
        n_tok: u32,
        k: u32,
    ) {
        self.0.dispatch(
            pass,
            bg,
            u64::from(n_tok) * u64::from(k) * u64::from(p.inter),
        );
    }
}

impl ExpertDown {
    pub fn new(ctx: &GpuContext) -> Self {
        Self::with_format(ctx, WeightFormat::F32)
    }

    /// The variant reading `w2` in `format`.
    pub fn with_format(ctx: &GpuContext, format: WeightFormat) -> Self {
        match format {
            WeightFormat::F32 => Self(Kernel::new(ctx, "expert_down", SOURCE_DOWN, None)),
            WeightFormat::F16 => Self(Kernel::new(ctx, "expert_down_f16", SOURCE_DOWN_F16, None)),
        }
    }
    /// Bindings: step, params, w2 (pool), act, route, x, slot table.
    pub fn bind(&self, ctx: &GpuContext, b: [&wgpu::Buffer; 7]) -> wgpu::BindGroup {
        self.0.bind(ctx, &b)
    }
    pub fn encode(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        bg: &wgpu::BindGroup,
        p: &Params,
        n_tok: u32,
    ) {
        self.0
            .dispatch(pass, bg, u64::from(n_tok) * u64::from(p.hidden));
    }
}

/// One expert in checkpoint layout: w1, w3 `[inter][hidden]`, w2 `[hidden][inter]`.
#[derive(Debug, Clone)]
pub struct ExpertRef<'a> {
    pub w1: &'a [f32],
    pub w3: &'a [f32],
    pub w2: &'a [f32],
}

/// One expert's `w13` block in kernel layout: `[hidden][w1 row j .. | w3 row j ..]`.
pub fn pack_w13(w1: &[f32], w3: &[f32], inter: usize, hidden: usize) -> Vec<f32> {
    let mut out = vec![0.0; hidden * 2 * inter];
    for j in 0..inter {
        for c in 0..hidden {
            out[c * 2 * inter + j] = w1[j * hidden + c];
            out[c * 2 * inter + inter + j] = w3[j * hidden + c];
        }
    }
    out
}

/// One expert's `w2` block in kernel layout (`[inter][hidden]`).
pub fn pack_w2(w2: &[f32], inter: usize, hidden: usize) -> Vec<f32> {
    transpose(hidden, inter, w2)
}

fn silu(a: f32) -> f32 {
    a / (1.0 + (-a).exp())
}

/// CPU reference of one SwiGLU expert on an already normalised input.
pub fn expert_ref(e: &ExpertRef<'_>, inter: usize, hidden: usize, xn: &[f32]) -> Vec<f32> {
    let a = matvec_ref(e.w1, inter, hidden, xn);
    let b = matvec_ref(e.w3, inter, hidden, xn);
    let act: Vec<f32> = a.iter().zip(&b).map(|(a, b)| silu(*a) * b).collect();
    matvec_ref(e.w2, hidden, inter, &act)
}

/// CPU reference of the whole MoE block with residual:
/// `x + sum_k w_k expert_{e_k}(rmsnorm(x))`, per token.
pub fn reference(
    experts: &[ExpertRef<'_>],
    inter: usize,
    hidden: usize,
    x: &[f32],
    g: &[f32],
    eps: f32,
    route: &[Vec<(u32, f32)>],
) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for (xt, r) in x.chunks(hidden).zip(route) {
        let xn = rmsnorm_ref(xt, g, eps);
        let mut y = xt.to_vec();
        for &(e, w) in r {
            let o = expert_ref(&experts[e as usize], inter, hidden, &xn);
            for (a, b) in y.iter_mut().zip(o) {
                *a += w * b;
            }
        }
        out.extend(y);
    }
    out
}

/// One-shot GPU run of the up and down kernels (tests), same arguments as [`reference()`].
#[allow(clippy::too_many_arguments)]
pub async fn run(
    ctx: &GpuContext,
    experts: &[ExpertRef<'_>],
    inter: usize,
    hidden: usize,
    x: &[f32],
    g: &[f32],
    eps: f32,
    route: &[Vec<(u32, f32)>],
) -> Result<Vec<f32>, GpuError> {
    run_format(
        ctx,
        WeightFormat::F32,
        experts,
        inter,
        hidden,
        x,
        g,
        eps,
        route,
    )
    .await
}

/// [`run`] with the expert weights stored in `format`.
#[allow(clippy::too_many_arguments)]
pub async fn run_format(
    ctx: &GpuContext,
    format: WeightFormat,
    experts: &[ExpertRef<'_>],
    inter: usize,
    hidden: usize,
    x: &[f32],
    g: &[f32],
    eps: f32,
    route: &[Vec<(u32, f32)>],
) -> Result<Vec<f32>, GpuError> {
    let ne = experts.len();
    let n = x.len() / hidden;
    let k = route.first().map_or(0, |r| r.len());
    if route.len() != n
        || route
            .iter()
            .any(|r| r.len() != k || r.iter().any(|&(e, _)| e as usize >= ne))
        || k == 0
        || k > ne
    {
        return Err(GpuError::Input("expert: bad route".into()));
    }
    let up = ExpertUp::with_format(ctx, format);
    let down = ExpertDown::with_format(ctx, format);
    let p = Params {
        hidden: hidden as u32,
        inter: inter as u32,
        n_experts: ne as u32,
        eps,
        n_slots: ne as u32,
        _p0: 0,
        _p1: 0,
        _p2: 0,
    };
    let step = step_buffer(
        ctx,
        Step {
            pos0: 0,
            n_tok: n as u32,
            top_k: k as u32,
            renorm: 1,
        },
    );
    let pb = ctx.uniform_init("params", bytemuck::bytes_of(&p));
    // A pool of `ne` slots holding the experts in reverse order (the table
    // maps them back), so the test exercises the indirection.
    let mut w13 = Vec::new();
    let mut w2 = Vec::new();
    for e in experts.iter().rev() {
        w13.extend(format.encode(&pack_w13(e.w1, e.w3, inter, hidden), hidden, 2 * inter));
        w2.extend(format.encode(&pack_w2(e.w2, inter, hidden), inter, hidden));
    }
    let mut words = vec![0u32; n * ne * 2];
    for (t, r) in route.iter().enumerate() {
        for (s, &(e, w)) in r.iter().enumerate() {
            words[(t * ne + s) * 2] = e;
            words[(t * ne + s) * 2 + 1] = w.to_bits();
        }
    }
    let w13b = ctx.storage_init("w13", &w13);
    let w2b = ctx.storage_init("w2", &w2);
    let xb = ctx.storage_init("x", f32_bytes(x));
    let gb = ctx.storage_init("g", f32_bytes(g));
    let rb = ctx.storage_init("route", bytemuck::cast_slice(&words));
    let act = ctx.storage_zeroed("act", (n * ne * inter * 4) as u64);
    let table: Vec<u32> = (0..ne as u32).rev().collect();
    let tb = ctx.storage_init("slots", bytemuck::cast_slice(&table));
    let bg_up = up.bind(ctx, [&step, &pb, &w13b, &xb, &gb, &rb, &act, &tb]);
    let bg_down = down.bind(ctx, [&step, &pb, &w2b, &act, &rb, &xb, &tb]);
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    {
        let mut pass = enc.begin_compute_pass(&Default::default());
        up.encode(&mut pass, &bg_up, &p, n as u32, k as u32);
        down.encode(&mut pass, &bg_down, &p, n as u32);
    }
    ctx.queue.submit([enc.finish()]);
    ctx.read_f32(&xb, x.len()).await
}
