//! `shaders/embedding.wgsl`: embedding lookup from the transposed table.

use bytemuck::{Pod, Zeroable};

use super::context::{GpuContext, GpuError};
use super::kernel::{f32_bytes, step_buffer, transpose, Kernel, Step};

pub const SOURCE: &str = include_str!("../../../shaders/embedding.wgsl");

#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct Params {
    pub hidden: u32,
    pub vocab: u32,
    pub _p0: u32,
    pub _p1: u32,
}

/// CPU reference: rows of the `[vocab][hidden]` table.
pub fn reference(table: &[f32], hidden: usize, tokens: &[u32]) -> Vec<f32> {
    tokens
        .iter()
        .flat_map(|&t| {
            table[t as usize * hidden..(t as usize + 1) * hidden]
                .iter()
                .copied()
        })
        .collect()
}

/// One-shot GPU run (tests). `table` is `[vocab][hidden]` as in the checkpoint.
pub async fn run(
    ctx: &GpuContext,
    table: &[f32],
    vocab: usize,
    hidden: usize,
    tokens: &[u32],
) -> Result<Vec<f32>, GpuError> {
    if table.len() != vocab * hidden || tokens.iter().any(|&t| t as usize >= vocab) {
        return Err(GpuError::Input("embedding: bad shape or token id".into()));
    }
    let k = Kernel::new(ctx, "embedding", SOURCE, None);
    let p = Params {
        hidden: hidden as u32,
        vocab: vocab as u32,
        _p0: 0,
        _p1: 0,
    };
    let step = step_buffer(
        ctx,
        Step {
            pos0: 0,
            n_tok: tokens.len() as u32,
            top_k: 0,
            renorm: 0,
        },
    );
    let pb = ctx.uniform_init("params", bytemuck::bytes_of(&p));
    let tb = ctx.storage_init("table", f32_bytes(&transpose(vocab, hidden, table)));
    let ids = ctx.storage_init("tokens", bytemuck::cast_slice(tokens));
    let xb = ctx.storage_zeroed("x", (tokens.len() * hidden * 4) as u64);
    let bg = k.bind(ctx, &[&step, &pb, &tb, &ids, &xb]);
    k.run_once(ctx, &bg, (tokens.len() * hidden) as u64);
    ctx.read_f32(&xb, tokens.len() * hidden).await
}
