//! `shaders/rmsnorm.wgsl`: standalone RMSNorm (the engine fuses it into the
//! kernels that consume the normalised vector).

use bytemuck::{Pod, Zeroable};

use super::context::{GpuContext, GpuError};
use super::kernel::{f32_bytes, rmsnorm_ref, step_buffer, Kernel, Step};

pub const SOURCE: &str = include_str!("../../../shaders/rmsnorm.wgsl");

#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct Params {
    pub cols: u32,
    pub eps: f32,
    pub _p0: u32,
    pub _p1: u32,
}

/// CPU reference over `n` rows of `cols`.
pub fn reference(x: &[f32], cols: usize, g: &[f32], eps: f32) -> Vec<f32> {
    x.chunks(cols.max(1))
        .flat_map(|row| rmsnorm_ref(row, g, eps))
        .collect()
}

/// One-shot GPU run (tests).
pub async fn run(
    ctx: &GpuContext,
    x: &[f32],
    cols: usize,
    g: &[f32],
    eps: f32,
) -> Result<Vec<f32>, GpuError> {
    if cols == 0 || !x.len().is_multiple_of(cols) || g.len() != cols {
        return Err(GpuError::Input("rmsnorm: shape mismatch".into()));
    }
    let n = x.len() / cols;
    let k = Kernel::new(ctx, "rmsnorm", SOURCE, None);
    let p = Params {
        cols: cols as u32,
        eps,
        _p0: 0,
        _p1: 0,
    };
    let step = step_buffer(
        ctx,
        Step {
            pos0: 0,
            n_tok: n as u32,
            top_k: 0,
            renorm: 0,
        },
    );
    let pb = ctx.uniform_init("params", bytemuck::bytes_of(&p));
    let xb = ctx.storage_init("x", f32_bytes(x));
    let gb = ctx.storage_init("g", f32_bytes(g));
    let yb = ctx.storage_zeroed("y", (x.len() * 4) as u64);
    let bg = k.bind(ctx, &[&step, &pb, &xb, &gb, &yb]);
    k.run_once(ctx, &bg, x.len() as u64);
    ctx.read_f32(&yb, x.len()).await
}
