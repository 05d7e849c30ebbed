//! `shaders/matvec.wgsl`: matrix-vector (and, over the tokens of a step,
//! matrix-matrix) product with optional fused RMSNorm and residual add.

use bytemuck::{Pod, Zeroable};

use super::context::{GpuContext, GpuError};
use super::kernel::{
    f32_bytes, matvec_ref, rmsnorm_ref, step_buffer, transpose, Kernel, Step, WeightFormat,
};

pub const SOURCE: &str = include_str!("../../../shaders/matvec.wgsl");
pub const SOURCE_F16: &str = include_str!("../../../shaders/matvec_f16.wgsl");
/// Four output rows per invocation, W read as vec4s (`rows % 4 == 0`).
pub const SOURCE_V4: &str = include_str!("../../../shaders/matvec_v4.wgsl");
pub const SOURCE_F16_V4: &str = include_str!("../../../shaders/matvec_f16_v4.wgsl");

/// Accumulate into `y` (residual add).
pub const ACCUMULATE: u32 = 1;
/// RMS-normalise each input row with the norm weight first.
pub const NORM: u32 = 2;
/// Only the last token of the step (logits of the last position).
pub const LAST_ONLY: u32 = 4;

#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct Params {
    pub rows: u32,
    pub cols: u32,
    pub flags: u32,
    pub eps: f32,
}

/// `lanes` output rows per invocation: 4 for the `_v4` kernels
/// ([`Matvec::for_rows`]), 1 otherwise.
#[derive(Debug)]
pub struct Matvec(pub Kernel, pub u32);

impl Matvec {
    pub fn new(ctx: &GpuContext) -> Self {
        Self::with_format(ctx, WeightFormat::F32)
    }

    /// The variant reading `w` in `format` (see [`WeightFormat::encode`]).
    pub fn with_format(ctx: &GpuContext, format: WeightFormat) -> Self {
        match format {
            WeightFormat::F32 => Self(Kernel::new(ctx, "matvec", SOURCE, None), 1),
            WeightFormat::F16 => Self(Kernel::new(ctx, "matvec_f16", SOURCE_F16, None), 1),
        }
    }

    /// The variant for a matrix of `rows` outputs only: the `_v4` kernels
    /// (four rows per invocation, a quarter of the loads; software adapters
    /// pay per load) when `rows % 4 == 0`, else [`Matvec::with_format`].
    /// One token's `rows / 4` invocations are spread over the CPU threads
    /// of a software adapter ([`GpuContext::spread_workgroup`]): the
    /// default model's lm_head (128 invocations) was one workgroup, so one
    /// thread; on SwiftShader, 2 threads, it took 0.46 ms per dispatch as
    /// one workgroup of 128, 0.30 as two of 64 (replayed in the page).
    pub fn for_rows(ctx: &GpuContext, format: WeightFormat, rows: usize) -> Self {
        if !rows.is_multiple_of(4) {
            return Self::with_format(ctx, format);
        }
        let wg = ctx.spread_workgroup(rows as u64 / 4);
        let (name, src) = match format {
            WeightFormat::F32 => ("matvec_v4", SOURCE_V4),
            WeightFormat::F16 => ("matvec_f16_v4", SOURCE_F16_V4),
        };
        // No workgroup memory.
        Self(Kernel::new_uninit_workgroup_wg(ctx, name, src, wg), 4)
    }

    /// Bindings: step, params, w (`[cols][rows]`), x (`[n][cols]`), g (`[cols]`), y.
    #[allow(clippy::too_many_arguments)]
    pub fn bind(
        &self,
        ctx: &GpuContext,
        step: &wgpu::Buffer,
        params: &wgpu::Buffer,
        w: &wgpu::Buffer,
        x: &wgpu::Buffer,
        g: &wgpu::Buffer,
        y: &wgpu::Buffer,
    ) -> wgpu::BindGroup {
        self.0.bind(ctx, &[step, params, w, x, g, y])
    }

    pub fn encode(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        bg: &wgpu::BindGroup,
        p: &Params,
        n_tok: u32,
    ) {
        let n = if p.flags & LAST_ONLY != 0 { 1 } else { n_tok };
        self.0
            .dispatch(pass, bg, u64::from(n) * u64::from(p.rows / self.1));
    }
}

/// CPU reference: for each of the `n` rows of `x`, `y = (acc ? y : 0) + W norm?(x)`.
#[allow(clippy::too_many_arguments)]
pub fn reference(
    w: &[f32],
    rows: usize,
    cols: usize,
    x: &[f32],
    n: usize,
    g: Option<&[f32]>,
    eps: f32,
    y0: Option<&[f32]>,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(n * rows);
    for t in 0..n {
        let xt = &x[t * cols..(t + 1) * cols];
        let xin = match g {
            Some(g) => rmsnorm_ref(xt, g, eps),
            None => xt.to_vec(),
        };
        let mut y = matvec_ref(w, rows, cols, &xin);
        if let Some(y0) = y0 {
            for (a, b) in y.iter_mut().zip(&y0[t * rows..(t + 1) * rows]) {
                *a += b;
            }
        }
        out.extend(y);
    }
    out
}

/// One-shot GPU run of [`reference()`]'s computation (tests).
#[allow(clippy::too_many_arguments)]
pub async fn run(
    ctx: &GpuContext,
    w: &[f32],
    rows: usize,
    cols: usize,
    x: &[f32],
    n: usize,
    g: Option<&[f32]>,
    eps: f32,
    y0: Option<&[f32]>,
) -> Result<Vec<f32>, GpuError> {
    run_format(ctx, WeightFormat::F32, w, rows, cols, x, n, g, eps, y0).await
}

/// [`run`] with the weights stored in `format`.
#[allow(clippy::too_many_arguments)]
pub async fn run_format(
    ctx: &GpuContext,
    format: WeightFormat,
    w: &[f32],
    rows: usize,
    cols: usize,
    x: &[f32],
    n: usize,
    g: Option<&[f32]>,
    eps: f32,
    y0: Option<&[f32]>,
) -> Result<Vec<f32>, GpuError> {
    if w.len() != rows * cols || x.len() != n * cols {
        return Err(GpuError::Input("matvec: shape mismatch".into()));
    }
    let k = Matvec::for_rows(ctx, format, rows);
    let flags = if g.is_some() { NORM } else { 0 } | if y0.is_some() { ACCUMULATE } else { 0 };
    let p = Params {
        rows: rows as u32,
        cols: cols as u32,
        flags,
        eps,
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
    let wb = ctx.storage_init("w", &format.encode(&transpose(rows, cols, w), cols, rows));
    let xb = ctx.storage_init("x", f32_bytes(x));
    let gb = ctx.storage_init("g", f32_bytes(g.unwrap_or(&[0.0])));
    let yb = match y0 {
        Some(y0) => ctx.storage_init("y", f32_bytes(y0)),
        None => ctx.storage_zeroed("y", (n * rows * 4) as u64),
    };
    let bg = k.bind(ctx, &step, &pb, &wb, &xb, &gb, &yb);
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    {
        let mut pass = enc.begin_compute_pass(&Default::default());
        k.encode(&mut pass, &bg, &p, n as u32);
    }
    ctx.queue.submit([enc.finish()]);
    ctx.read_f32(&yb, n * rows).await
}
