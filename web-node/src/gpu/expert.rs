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
    f32_bytes, matvec_ref, rmsnorm_ref, step_buffer, transpose, Kernel, Shape, Step, WeightFormat,
};
use crate::model::quant::QMat;
use crate::model::{ExpertWeights, Weight};
use crate::spec::quant::{QuantFormat, GROUP};

pub const SOURCE_UP: &str = include_str!("../../../shaders/expert_up.wgsl");
pub const SOURCE_DOWN: &str = include_str!("../../../shaders/expert_down.wgsl");
pub const SOURCE_UP_F16: &str = include_str!("../../../shaders/expert_up_f16.wgsl");
pub const SOURCE_DOWN_F16: &str = include_str!("../../../shaders/expert_down_f16.wgsl");
/// `expert_down` for q8_0 pools, four outputs per invocation (quantized
/// pools always have `hidden % 32 == 0`: `w13`'s rows are `hidden` wide, a
/// multiple of the 32-weight group; so no one-output variant).
pub const SOURCE_DOWN_Q8_V4: &str = include_str!("../../../shaders/expert_down_q8_v4.wgsl");
/// `expert_up` with four intermediate rows per invocation (f32 weights read
/// as vec4s), for `inter % 4 == 0`.
pub const SOURCE_UP_V4: &str = include_str!("../../../shaders/expert_up_v4.wgsl");
/// `expert_down` with four outputs per invocation (f32 weights read as
/// vec4s), for `hidden % 4 == 0`.
pub const SOURCE_DOWN_V4: &str = include_str!("../../../shaders/expert_down_v4.wgsl");
/// `expert_down_f16` with four outputs per invocation.
pub const SOURCE_DOWN_F16_V4: &str = include_str!("../../../shaders/expert_down_f16_v4.wgsl");
/// `expert_up` for q8_0 pools, four intermediate rows per invocation
/// (quantized pools always have `inter % 32 == 0`, so no one-row variant).
pub const SOURCE_UP_Q8_V4: &str = include_str!("../../../shaders/expert_up_q8_v4.wgsl");
/// `expert_up` for q4_0 pools, four intermediate rows per invocation.
pub const SOURCE_UP_Q4_V4: &str = include_str!("../../../shaders/expert_up_q4_v4.wgsl");
/// `expert_up_f16` with four intermediate rows per invocation.
pub const SOURCE_UP_F16_V4: &str = include_str!("../../../shaders/expert_up_f16_v4.wgsl");
/// `expert_down` for q4_0 pools, four outputs per invocation.
pub const SOURCE_DOWN_Q4_V4: &str = include_str!("../../../shaders/expert_down_q4_v4.wgsl");

/// Most experts per layer the router fused into `expert_up` handles (its
/// workgroup arrays); more, and the engine runs `router.wgsl` before it.
pub const MAX_FUSED_ROUTER_EXPERTS: usize = 256;

/// Largest hidden size `expert_up` stages in workgroup memory (and so the
/// largest with o_proj shares, `n_part > 0`).
pub const MAX_STAGED_HIDDEN: usize = 2048;

/// How the expert pool stores its experts. Every format uses the same pool
/// (slots, per-layer expert -> slot table, bind groups); only the bytes per
/// expert and the kernels that read them differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolFormat {
    /// Float experts, stored (transposed) in this format.
    Float(WeightFormat),
    /// Quantized experts, read packed (`q8_0`/`q4_0`, see [`pack_qmat`]).
    Quant(QuantFormat),
}

impl Default for PoolFormat {
    fn default() -> Self {
        PoolFormat::Float(WeightFormat::F32)
    }
}

impl std::fmt::Display for PoolFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PoolFormat::Float(WeightFormat::F32) => f.write_str("f32"),
            PoolFormat::Float(WeightFormat::F16) => f.write_str("f16"),
            PoolFormat::Quant(q) => f.write_str(q.as_str()),
        }
    }
}

impl PoolFormat {
    /// Bytes of one expert's `w1/w3` block.
    pub fn w13_bytes(self, hidden: usize, inter: usize) -> usize {
        match self {
            PoolFormat::Float(f) => f.matrix_bytes(hidden, 2 * inter),
            PoolFormat::Quant(q) => qmat_pool_bytes(q, 2 * inter, hidden),
        }
    }

    /// Bytes of one expert's `w2` block.
    pub fn w2_bytes(self, hidden: usize, inter: usize) -> usize {
        match self {
            PoolFormat::Float(f) => f.matrix_bytes(inter, hidden),
            PoolFormat::Quant(q) => qmat_pool_bytes(q, hidden, inter),
        }
    }

    /// One expert's (`w13`, `w2`) blocks in this format. An expert in
    /// another format (float into a quantized pool, `q4_0` into a `q8_0`
    /// one, quantized into a float one) is an error naming both formats.
    pub fn encode_expert(
        self,
        w: &ExpertWeights,
        hidden: usize,
        inter: usize,
    ) -> Result<(Vec<u8>, Vec<u8>), String> {
        let got = w.quant();
        let sizes = [
            ("w1", &w.w1, inter, hidden),
            ("w3", &w.w3, inter, hidden),
            ("w2", &w.w2, hidden, inter),
        ];
        for (name, m, rows, cols) in sizes {
            if m.quant() != got {
                return Err(format!(
                    "{name}: an expert's matrices must share one format"
                ));
            }
            if m.rows() != rows || m.cols() != cols {
                return Err(format!(
                    "{name}: [{}, {}], expected [{rows}, {cols}]",
                    m.rows(),
                    m.cols()
                ));
            }
        }
        match (self, &w.w1, &w.w3, &w.w2) {
            (PoolFormat::Float(f), Weight::F32(w1), Weight::F32(w3), Weight::F32(w2)) => Ok((
                f.encode(
                    &pack_w13(&w1.data, &w3.data, inter, hidden),
                    hidden,
                    2 * inter,
                ),
                f.encode(&pack_w2(&w2.data, inter, hidden), inter, hidden),
            )),
            (PoolFormat::Quant(q), Weight::Q(w1), Weight::Q(w3), Weight::Q(w2))
                if w1.format == q && w3.format == q && w2.format == q =>
            {
                let w13 = pack_qmat(&[w1, w3])?;
                let w2 = pack_qmat(&[w2])?;
                Ok((
                    bytemuck::cast_slice(&w13).to_vec(),
                    bytemuck::cast_slice(&w2).to_vec(),
                ))
            }
            _ => Err(format!(
                "the expert is {}, the engine's expert pool holds {self} experts",
                got.map_or("float (f32)", |q| q.as_str())
            )),
        }
    }
}

/// Bytes a quantized `[rows, cols]` matrix takes in the pool: the packed
/// values (`cols` a multiple of 32) and its f16 scales two per word (rows
/// rounded up to even).
pub fn qmat_pool_bytes(format: QuantFormat, rows: usize, cols: usize) -> usize {
    rows * format.row_bytes(cols) + cols / GROUP * rows.div_ceil(2) * 4
}

/// Quantized matrices stacked row-wise (same format and columns) in the
/// pool layout the quantized kernels read, as `u32` words:
/// - values: word `(r, w)` (bytes `4w..4w+3` of row `r`, little-endian, as
///   stored) at `w * rows + r`, so neighbouring rows are neighbouring words;
/// - then scales: the f16 scale of group `gi` of row `r` in the low (`r`
///   even) or high (`r` odd) half of word `gi * ceil(rows / 2) + r / 2`.
pub fn pack_qmat(mats: &[&QMat]) -> Result<Vec<u32>, String> {
    let Some(first) = mats.first() else {
        return Ok(Vec::new());
    };
    let (format, cols) = (first.format, first.cols);
    if cols == 0 || !cols.is_multiple_of(GROUP) {
        return Err(format!(
            "{cols} columns are not a multiple of the group size {GROUP}"
        ));
    }
    let rb = format.row_bytes(cols);
    let gpr = cols / GROUP;
    for m in mats {
        if m.format != format || m.cols != cols {
            return Err("stacked matrices must share format and columns".into());
        }
        if m.values.len() != m.rows * rb || m.scale_bits.len() != m.rows * gpr {
            return Err(format!(
                "{} [{}, {}]: {} value bytes and {} scales",
                m.format,
                m.rows,
                m.cols,
                m.values.len(),
                m.scale_bits.len()
            ));
        }
    }
    let rows: usize = mats.iter().map(|m| m.rows).sum();
    let vw = rb / 4;
    let rh = rows.div_ceil(2);
    let mut out = vec![0u32; rows * vw + gpr * rh];
    let (vals, scales) = out.split_at_mut(rows * vw);
    let mut r = 0;
    for m in mats {
        for mr in 0..m.rows {
            let row = &m.values[mr * rb..(mr + 1) * rb];
            for (w, b) in row.chunks_exact(4).enumerate() {
                vals[w * rows + r] = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
            for gi in 0..gpr {
                let bits = u32::from(m.scale_bits[mr * gpr + gi]);
                scales[gi * rh + r / 2] |= bits << (16 * (r % 2));
            }
            r += 1;
        }
    }
    Ok(out)
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct Params {
    pub hidden: u32,
    pub inter: u32,
    pub n_experts: u32,
    pub eps: f32,
    /// Experts the pool buffers hold (slot indices are clamped below it).
    pub n_slots: u32,
    /// 1: `expert_up` routes each token itself (the router fused, reading
    /// the gate it is bound to, writing `route`); 0: it reads `route`;
    /// 2: it only routes (and saves the input rows when `save_x`), one
    /// workgroup per token ([`ExpertUp::encode_routes`]): no expert runs.
    pub route_in: u32,
    /// Heads' o_proj shares (`part`, `[n_part][hidden]`, from the fused
    /// decode attention) added to the token's input (up) and to the
    /// residual (down); 0 when the o_proj ran as a matvec. Only for
    /// one-token steps and `hidden <= ` [`MAX_STAGED_HIDDEN`].
    pub n_part: u32,
    /// Non-zero: `expert_up` also writes each token's input row (x plus
    /// the o_proj shares) into `route` from this word on (`[n_tok][hidden]`),
    /// so that the engine can run the layer's experts again from there
    /// after a pool miss; 0: not kept.
    pub save_x: u32,
}

/// `expert_up`: `lanes` intermediate rows per invocation (4: the vec4
/// variant, for float pools when `inter % 4 == 0`; 1 otherwise).
#[derive(Debug)]
pub struct ExpertUp {
    pub kernel: Kernel,
    pub lanes: u32,
    /// At most this many workgroups per token (the vec4 kernels' `GROUPS`;
    /// [`GpuContext::expert_up_groups`]), each invocation looping over
    /// units of `lanes` rows; 0: one unit per invocation.
    pub groups: u32,
}
/// `expert_down`: `lanes` outputs per invocation (4: the vec4 variant, for
/// f32 pools when `hidden % 4 == 0`; 8 for f16 ones when `hidden % 8 == 0`;
/// 1 otherwise).
#[derive(Debug)]
pub struct ExpertDown {
    pub kernel: Kernel,
    pub lanes: u32,
}

impl ExpertUp {
    /// The variant reading f32 `w13` with `inter` intermediate rows.
    pub fn new(ctx: &GpuContext, hidden: usize, inter: usize) -> Self {
        Self::with_format(ctx, WeightFormat::F32, hidden, inter)
    }

    /// The variant reading `w13` in `format`.
    pub fn with_format(
        ctx: &GpuContext,
        format: WeightFormat,
        hidden: usize,
        inter: usize,
    ) -> Self {
        Self::for_pool(ctx, PoolFormat::Float(format), hidden, inter, 0)
    }

    /// The variant reading a pool of `format` with `inter` intermediate rows
    /// per expert of `hidden` columns: four rows per invocation (vec4 loads)
    /// for float pools when `inter % 4 == 0` and `hidden % 4 == 0`, one
    /// otherwise; always for quantized pools (their `w2` rows are `inter`
    /// wide, a multiple of the 32-weight group, so `inter % 4 == 0`). Software adapters pay per load
    /// (SwiftShader ~3.5x faster with vec4s), hardware ones lose nothing.
    ///
    /// `n_experts`: the experts the fused router picks from (the layer's;
    /// 1 for a shared expert): with `hidden`, what the workgroup arrays are
    /// sized for ([`super::kernel::sized_source`]).
    pub fn for_pool(
        ctx: &GpuContext,
        format: PoolFormat,
        hidden: usize,
        inter: usize,
        n_experts: usize,
    ) -> Self {
        let v4 = inter.is_multiple_of(4) && hidden.is_multiple_of(4);
        let (name, src, lanes) = match format {
            PoolFormat::Float(WeightFormat::F32) if v4 => ("expert_up_v4", SOURCE_UP_V4, 4),
            PoolFormat::Float(WeightFormat::F16) if v4 => ("expert_up_f16_v4", SOURCE_UP_F16_V4, 4),
            PoolFormat::Quant(QuantFormat::Q8_0) => ("expert_up_q8_v4", SOURCE_UP_Q8_V4, 4),
            PoolFormat::Quant(QuantFormat::Q4_0) => ("expert_up_q4_v4", SOURCE_UP_Q4_V4, 4),
            PoolFormat::Float(WeightFormat::F32) => ("expert_up", SOURCE_UP, 1),
            PoolFormat::Float(WeightFormat::F16) => ("expert_up_f16", SOURCE_UP_F16, 1),
        };
        // The vec4 kernels loop over their units, at most `groups`
        // workgroups per token (the one-row ones keep one row per invocation).
        let groups = if lanes == 4 { ctx.expert_up_groups } else { 0 };
        let constants: &[(&str, f64)] = if lanes == 4 {
            &[("GROUPS", f64::from(groups))]
        } else {
            &[]
        };
        // Every workgroup array element it reads, it wrote first.
        Self {
            kernel: Kernel::new_sized_with(
                ctx,
                name,
                src,
                ctx.expert_up_workgroup_size(),
                &Shape {
                    hidden,
                    n_experts,
                    head_dim: 0,
                },
                constants,
            ),
            lanes,
            groups,
        }
    }
    /// Bindings: step, params, w13 (pool), x, g, route, act, slot table,
    /// router gate (`[hidden][n_experts]`, read when `route_in`; any other
    /// read-only buffer otherwise), o_proj shares `part` (read when
    /// `n_part > 0`; any other read-only buffer otherwise).
    pub fn bind(&self, ctx: &GpuContext, b: [&wgpu::Buffer; 10]) -> wgpu::BindGroup {
        self.kernel.bind(ctx, &b)
    }
    /// Workgroups of one token each: `ceil(k * inter / lanes / wg)` per
    /// token, at most [`ExpertUp::groups`] (when not 0).
    pub fn encode(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        bg: &wgpu::BindGroup,
        p: &Params,
        n_tok: u32,
        k: u32,
    ) {
        let mut per_tok =
            (u64::from(k) * u64::from(p.inter / self.lanes)).div_ceil(u64::from(self.kernel.wg));
        if self.groups > 0 {
            per_tok = per_tok.min(u64::from(self.groups));
        }
        self.kernel
            .dispatch_groups(pass, bg, u64::from(n_tok) * per_tok);
    }

    /// The routes only (bound with `route_in = 2`): one workgroup per token.
    pub fn encode_routes(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        bg: &wgpu::BindGroup,
        n_tok: u32,
    ) {
        self.kernel.dispatch_groups(pass, bg, u64::from(n_tok));
    }
}

impl ExpertDown {
    /// The variant reading f32 `w2` for `hidden` outputs.
    pub fn new(ctx: &GpuContext, hidden: usize) -> Self {
        Self::with_format(ctx, WeightFormat::F32, hidden)
    }

    /// The variant reading `w2` in `format`.
    pub fn with_format(ctx: &GpuContext, format: WeightFormat, hidden: usize) -> Self {
        Self::for_pool(ctx, PoolFormat::Float(format), hidden)
    }

    /// The variant reading a pool of `format` for `hidden` outputs: four
    /// outputs per invocation (vec4 loads) for f32 pools when
    /// `hidden % 4 == 0`, eight (a vec4<u32> of halves per load) for f16
    /// ones when `hidden % 8 == 0`, one otherwise (as [`ExpertUp::for_pool`]);
    /// always four for quantized pools (`hidden % 32 == 0`: four rows' words
    /// as one `vec4<u32>`, the token's `act` as vec4s; SwiftShader pays per
    /// load).
    pub fn for_pool(ctx: &GpuContext, format: PoolFormat, hidden: usize) -> Self {
        let v4 = hidden.is_multiple_of(4);
        let (name, src, lanes) = match format {
            PoolFormat::Float(WeightFormat::F32) if v4 => ("expert_down_v4", SOURCE_DOWN_V4, 4),
            // Eight outputs per invocation (one vec4<u32> of halves per load).
            PoolFormat::Float(WeightFormat::F16) if hidden.is_multiple_of(8) => {
                ("expert_down_f16_v4", SOURCE_DOWN_F16_V4, 8)
            }
            PoolFormat::Float(WeightFormat::F32) => ("expert_down", SOURCE_DOWN, 1),
            PoolFormat::Float(WeightFormat::F16) => ("expert_down_f16", SOURCE_DOWN_F16, 1),
            PoolFormat::Quant(QuantFormat::Q8_0) => ("expert_down_q8_v4", SOURCE_DOWN_Q8_V4, 4),
            PoolFormat::Quant(QuantFormat::Q4_0) => ("expert_down_q4_v4", SOURCE_DOWN_Q4_V4, 4),
        };
        // A decoded token's outputs over the CPU threads of a software adapter.
        let wg = ctx.spread_workgroup((hidden as u64).div_ceil(u64::from(lanes)));
        Self {
            // No workgroup memory.
            kernel: Kernel::new_uninit_workgroup_wg(ctx, name, src, wg),
            lanes,
        }
    }
    /// Bindings: step, params, w2 (pool), act, route, x, slot table, o_proj
    /// shares `part` (as for [`ExpertUp::bind`]).
    pub fn bind(&self, ctx: &GpuContext, b: [&wgpu::Buffer; 8]) -> wgpu::BindGroup {
        self.kernel.bind(ctx, &b)
    }
    /// `n_tok * hidden / lanes` invocations.
    pub fn encode(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        bg: &wgpu::BindGroup,
        p: &Params,
        n_tok: u32,
    ) {
        self.kernel.dispatch(
            pass,
            bg,
            u64::from(n_tok) * u64::from(p.hidden / self.lanes),
        );
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
    let blocks: Vec<(Vec<u8>, Vec<u8>)> = experts
        .iter()
        .map(|e| {
            (
                format.encode(&pack_w13(e.w1, e.w3, inter, hidden), hidden, 2 * inter),
                format.encode(&pack_w2(e.w2, inter, hidden), inter, hidden),
            )
        })
        .collect();
    run_blocks(
        ctx,
        PoolFormat::Float(format),
        &blocks,
        inter,
        hidden,
        x,
        g,
        eps,
        route,
    )
    .await
}

/// [`run`] with whole experts (f32 or quantized) in a pool of `format`
/// (encoded with [`PoolFormat::encode_expert`], as the engine does).
#[allow(clippy::too_many_arguments)]
pub async fn run_pool(
    ctx: &GpuContext,
    format: PoolFormat,
    experts: &[ExpertWeights],
    inter: usize,
    hidden: usize,
    x: &[f32],
    g: &[f32],
    eps: f32,
    route: &[Vec<(u32, f32)>],
) -> Result<Vec<f32>, GpuError> {
    let blocks = experts
        .iter()
        .map(|e| format.encode_expert(e, hidden, inter))
        .collect::<Result<Vec<_>, _>>()
        .map_err(GpuError::Input)?;
    run_blocks(ctx, format, &blocks, inter, hidden, x, g, eps, route).await
}

#[allow(clippy::too_many_arguments)]
async fn run_blocks(
    ctx: &GpuContext,
    format: PoolFormat,
    blocks: &[(Vec<u8>, Vec<u8>)],
    inter: usize,
    hidden: usize,
    x: &[f32],
    g: &[f32],
    eps: f32,
    route: &[Vec<(u32, f32)>],
) -> Result<Vec<f32>, GpuError> {
    let ne = blocks.len();
    let n = x.len() / hidden.max(1);
    let k = route.first().map_or(0, |r| r.len());
    if route.len() != n
        || route
            .iter()
            .any(|r| r.len() != k || r.iter().any(|&(e, _)| e as usize >= ne))
        || k == 0
        || k > ne
        || hidden == 0
        || x.len() != n * hidden
        || g.len() != hidden
    {
        return Err(GpuError::Input("expert: bad route or sizes".into()));
    }
    let up = ExpertUp::for_pool(ctx, format, hidden, inter, ne);
    let down = ExpertDown::for_pool(ctx, format, hidden);
    let p = Params {
        hidden: hidden as u32,
        inter: inter as u32,
        n_experts: ne as u32,
        eps,
        n_slots: ne as u32,
        route_in: 0,
        n_part: 0,
        save_x: 0,
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
    for (a, b) in blocks.iter().rev() {
        w13.extend_from_slice(a);
        w2.extend_from_slice(b);
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
    let dummy = ctx.storage_zeroed("none", 4);
    let bg_up = up.bind(
        ctx,
        [&step, &pb, &w13b, &xb, &gb, &rb, &act, &tb, &dummy, &dummy],
    );
    let bg_down = down.bind(ctx, [&step, &pb, &w2b, &act, &rb, &xb, &tb, &dummy]);
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    {
        let mut pass = enc.begin_compute_pass(&Default::default());
        up.encode(&mut pass, &bg_up, &p, n as u32, k as u32);
        down.encode(&mut pass, &bg_down, &p, n as u32);
    }
    ctx.queue.submit([enc.finish()]);
    ctx.read_f32(&xb, x.len()).await
}

/// One-shot GPU run of the router fused into `expert_up` (tests): every
/// token routed by the up kernel (RMSNorm, `gate` `[n_experts][hidden]`,
/// softmax, top-`k`, renormalised when `renorm`), then `expert_down`.
/// `part` (`[heads][hidden]`, one token only; empty for none): o_proj
/// shares added to `x` first, as after the fused decode attention.
/// Returns the new `x` and the route the kernel wrote, as
/// [`super::router::run`] does. First the same kernel runs for the routes
/// only (`route_in = 2`, one workgroup per token, as where a prompt's chunk
/// stops): [`Routed::routes_only`] is what it wrote, and
/// [`Routed::act_untouched`] whether it left the activations alone.
#[allow(clippy::too_many_arguments)]
pub async fn run_routed(
    ctx: &GpuContext,
    format: PoolFormat,
    experts: &[ExpertWeights],
    gate: &[f32],
    inter: usize,
    hidden: usize,
    x: &[f32],
    g: &[f32],
    eps: f32,
    k: usize,
    renorm: bool,
    part: &[f32],
) -> Result<Routed, GpuError> {
    let ne = experts.len();
    let n = x.len() / hidden.max(1);
    let n_part = part.len() / hidden.max(1);
    if n_part > 0 && (n != 1 || part.len() != n_part * hidden || hidden > MAX_STAGED_HIDDEN) {
        return Err(GpuError::Input(
            "expert (routed): o_proj shares need one token and [heads][hidden]".into(),
        ));
    }
    if ne == 0
        || ne > MAX_FUSED_ROUTER_EXPERTS
        || k == 0
        || k > ne
        || hidden == 0
        || x.len() != n * hidden
        || g.len() != hidden
        || gate.len() != ne * hidden
    {
        return Err(GpuError::Input("expert (routed): bad sizes".into()));
    }
    let blocks = experts
        .iter()
        .map(|e| format.encode_expert(e, hidden, inter))
        .collect::<Result<Vec<_>, _>>()
        .map_err(GpuError::Input)?;
    let up = ExpertUp::for_pool(ctx, format, hidden, inter, ne);
    let down = ExpertDown::for_pool(ctx, format, hidden);
    let p = Params {
        hidden: hidden as u32,
        inter: inter as u32,
        n_experts: ne as u32,
        eps,
        n_slots: ne as u32,
        route_in: 1,
        n_part: n_part as u32,
        save_x: 0,
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
    let (w13, w2): (Vec<u8>, Vec<u8>) =
        blocks
            .iter()
            .fold((Vec::new(), Vec::new()), |(mut a, mut b), (x13, x2)| {
                a.extend_from_slice(x13);
                b.extend_from_slice(x2);
                (a, b)
            });
    let w13b = ctx.storage_init("w13", &w13);
    let w2b = ctx.storage_init("w2", &w2);
    let xb = ctx.storage_init("x", f32_bytes(x));
    let gb = ctx.storage_init("g", f32_bytes(g));
    // Stale words where the kernel must write (a route it failed to write shows).
    let rb = ctx.storage_init("route", bytemuck::cast_slice(&vec![u32::MAX; n * ne * 2]));
    let act = ctx.storage_zeroed("act", (n * ne * inter * 4) as u64);
    let table: Vec<u32> = (0..ne as u32).collect();
    let tb = ctx.storage_init("slots", bytemuck::cast_slice(&table));
    let gate_t = ctx.storage_init("gate", f32_bytes(&transpose(ne, hidden, gate)));
    let part_b = if part.is_empty() {
        ctx.storage_zeroed("part", 4)
    } else {
        ctx.storage_init("part", f32_bytes(part))
    };
    let bg_up = up.bind(
        ctx,
        [
            &step, &pb, &w13b, &xb, &gb, &rb, &act, &tb, &gate_t, &part_b,
        ],
    );
    let bg_down = down.bind(ctx, [&step, &pb, &w2b, &act, &rb, &xb, &tb, &part_b]);
    // Routes only, into the stale route words; `act` stays zero.
    let pb_routes = ctx.uniform_init(
        "params_routes",
        bytemuck::bytes_of(&Params { route_in: 2, ..p }),
    );
    let bg_routes = up.bind(
        ctx,
        [
            &step, &pb_routes, &w13b, &xb, &gb, &rb, &act, &tb, &gate_t, &part_b,
        ],
    );
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    {
        let mut pass = enc.begin_compute_pass(&Default::default());
        up.encode_routes(&mut pass, &bg_routes, n as u32);
    }
    ctx.queue.submit([enc.finish()]);
    let words = ctx.read_u32(&rb, n * ne * 2).await?;
    let routes_only = super::router::decode_route(&words, n, ne, k);
    let act_untouched = ctx
        .read_f32(&act, n * ne * inter)
        .await?
        .iter()
        .all(|&v| v.to_bits() == 0);
    ctx.queue
        .write_buffer(&rb, 0, bytemuck::cast_slice(&vec![u32::MAX; n * ne * 2]));
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    {
        let mut pass = enc.begin_compute_pass(&Default::default());
        up.encode(&mut pass, &bg_up, &p, n as u32, k as u32);
        down.encode(&mut pass, &bg_down, &p, n as u32);
    }
    ctx.queue.submit([enc.finish()]);
    let words = ctx.read_u32(&rb, n * ne * 2).await?;
    let route = super::router::decode_route(&words, n, ne, k);
    Ok(Routed {
        x: ctx.read_f32(&xb, x.len()).await?,
        route,
        routes_only,
        act_untouched,
    })
}

/// What [`run_routed`] returns.
#[derive(Debug, Clone)]
pub struct Routed {
    /// `x` after the experts.
    pub x: Vec<f32>,
    /// The routes the full `expert_up` wrote.
    pub route: Vec<Vec<(u32, f32)>>,
    /// The routes the routes-only run wrote.
    pub routes_only: Vec<Vec<(u32, f32)>>,
    /// Whether the routes-only run left `act` as it was (zero).
    pub act_untouched: bool,
}
