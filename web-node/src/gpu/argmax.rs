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
