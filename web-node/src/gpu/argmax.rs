//! `shaders/argmax.wgsl`: greedy sampling on the GPU (only the id is read back).

use bytemuck::{Pod, Zeroable};

use super::context::{GpuContext, GpuError};
use super::kernel::{f32_bytes, Kernel};

pub const SOURCE: &str = include_str!("../../../shaders/argmax.wgsl");
/// Fixed workgroup size of the reduction (64 fits every adapter).
pub const WG: u32 = 64;

#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct Params {
    pub n: u32,
    pub _p0: u32,
    pub _p1: u32,
    pub _p2: u32,
}

#[derive(Debug)]
pub struct Argmax(pub Kernel);

impl Argmax {
    pub fn new(ctx: &GpuContext) -> Self {
        Self(Kernel::new(ctx, "argmax", SOURCE, Some(WG)))
    }
    /// Bindings: params, values, out (`u32`).
    pub fn bind(
        &self,
        ctx: &GpuContext,
        params: &wgpu::Buffer,
        v: &wgpu::Buffer,
        out: &wgpu::Buffer,
    ) -> wgpu::BindGroup {
        self.0.bind(ctx, &[params, v, out])
    }
    pub fn encode(&self, pass: &mut wgpu::ComputePass<'_>, bg: &wgpu::BindGroup) {
        self.0.dispatch_groups(pass, bg, 1);
    }
}

/// CPU reference: first index of the maximum, NaN ignored, 0 when empty or all NaN.
pub fn reference(v: &[f32]) -> u32 {
    let mut best: Option<(usize, f32)> = None;
    for (i, &x) in v.iter().enumerate() {
        if x.is_nan() {
            continue;
        }
        if best.is_none_or(|(_, b)| x > b) {
            best = Some((i, x));
        }
    }
    best.map_or(0, |(i, _)| i as u32)
}

/// One-shot GPU run (tests).
pub async fn run(ctx: &GpuContext, v: &[f32]) -> Result<u32, GpuError> {
    let k = Argmax::new(ctx);
    let pb = ctx.uniform_init(
        "params",
        bytemuck::bytes_of(&Params {
            n: v.len() as u32,
            _p0: 0,
            _p1: 0,
            _p2: 0,
        }),
    );
    let vb = ctx.storage_init("v", f32_bytes(v));
    let ob = ctx.storage_zeroed("out", 4);
    let bg = k.bind(ctx, &pb, &vb, &ob);
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    {
        let mut pass = enc.begin_compute_pass(&Default::default());
        k.encode(&mut pass, &bg);
    }
    ctx.queue.submit([enc.finish()]);
    Ok(ctx.read_u32(&ob, 1).await?[0])
}

pub const SOURCE_EMBED: &str = include_str!("../../../shaders/argmax_embed.wgsl");

/// `shaders/argmax_embed.wgsl`: [`Argmax`] that also writes the sampled
/// token's embedding row into `x` (the next decode step's input), so a
/// greedy decode step needs no embedding dispatch.
#[derive(Debug)]
pub struct ArgmaxEmbed(pub Kernel);

/// Parameters of [`ArgmaxEmbed`]: `n` values (the vocabulary), `hidden` columns.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct EmbedParams {
    pub n: u32,
    pub hidden: u32,
    pub _p1: u32,
    pub _p2: u32,
}

impl ArgmaxEmbed {
    pub fn new(ctx: &GpuContext) -> Self {
        // A power of two up to 64 (its tree reduction): the barrier
        // kernels' size rounded down (SwiftShader: 16, 4 barriers instead of 6).
        let wg = ctx.barrier_workgroup_size.clamp(1, WG);
        let wg = 1 << (31 - wg.leading_zeros());
        // It writes every workgroup array element it reads first.
        Self(Kernel::new_uninit_workgroup_wg(
            ctx,
            "argmax_embed",
            SOURCE_EMBED,
            wg,
        ))
    }
    /// Bindings: params, values, out (`u32`), table (`[hidden][n]`), x.
    pub fn bind(&self, ctx: &GpuContext, b: [&wgpu::Buffer; 5]) -> wgpu::BindGroup {
        self.0.bind(ctx, &b)
    }
    pub fn encode(&self, pass: &mut wgpu::ComputePass<'_>, bg: &wgpu::BindGroup) {
        self.0.dispatch_groups(pass, bg, 1);
    }
}

/// One-shot GPU run of [`ArgmaxEmbed`] (tests): the index and the row `x`
/// it wrote; `table` is `[vocab][hidden]` row-major (as the checkpoint).
pub async fn run_embed(
    ctx: &GpuContext,
    v: &[f32],
    table: &[f32],
    hidden: usize,
) -> Result<(u32, Vec<f32>), GpuError> {
    if v.is_empty() || table.len() != v.len() * hidden {
        return Err(GpuError::Input(
            "argmax_embed: table is not [vocab][hidden]".into(),
        ));
    }
    let k = ArgmaxEmbed::new(ctx);
    let pb = ctx.uniform_init(
        "params",
        bytemuck::bytes_of(&EmbedParams {
            n: v.len() as u32,
            hidden: hidden as u32,
            _p1: 0,
            _p2: 0,
        }),
    );
    let vb = ctx.storage_init("v", f32_bytes(v));
    let ob = ctx.storage_zeroed("out", 4);
    let tb = ctx.storage_init(
        "table",
        f32_bytes(&super::kernel::transpose(v.len(), hidden, table)),
    );
    let xb = ctx.storage_init("x", f32_bytes(&vec![f32::NAN; hidden.max(1)]));
    let bg = k.bind(ctx, [&pb, &vb, &ob, &tb, &xb]);
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    {
        let mut pass = enc.begin_compute_pass(&Default::default());
        k.encode(&mut pass, &bg);
    }
    ctx.queue.submit([enc.finish()]);
    let id = ctx.read_u32(&ob, 1).await?[0];
    let x = ctx.read_f32(&xb, hidden).await?;
    Ok((id, x))
}
