//! `shaders/add.wgsl`: residual / elementwise add (the engine fuses its
//! residual adds into `matvec` and `expert_down`).

use bytemuck::{Pod, Zeroable};

use super::context::{GpuContext, GpuError};
use super::kernel::{f32_bytes, step_buffer, Kernel, Step};

pub const SOURCE: &str = include_str!("../../../shaders/add.wgsl");

#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct Params {
    pub cols: u32,
    pub _p0: u32,
    pub _p1: u32,
    pub _p2: u32,
}

/// CPU reference.
pub fn reference(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}

/// One-shot GPU run (tests).
pub async fn run(ctx: &GpuContext, a: &[f32], b: &[f32]) -> Result<Vec<f32>, GpuError> {
    if a.len() != b.len() {
        return Err(GpuError::Input("add: length mismatch".into()));
    }
    let k = Kernel::new(ctx, "add", SOURCE, None);
    let p = Params {
        cols: a.len() as u32,
        _p0: 0,
        _p1: 0,
        _p2: 0,
    };
    let step = step_buffer(
        ctx,
        Step {
            pos0: 0,
            n_tok: 1,
            top_k: 0,
            renorm: 0,
        },
    );
    let pb = ctx.uniform_init("params", bytemuck::bytes_of(&p));
    let ab = ctx.storage_init("a", f32_bytes(a));
    let bb = ctx.storage_init("b", f32_bytes(b));
    let yb = ctx.storage_zeroed("y", (a.len() * 4) as u64);
    let bg = k.bind(ctx, &[&step, &pb, &ab, &bb, &yb]);
    k.run_once(ctx, &bg, a.len() as u64);
    ctx.read_f32(&yb, a.len()).await
}
