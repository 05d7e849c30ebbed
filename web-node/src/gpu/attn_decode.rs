//! `shaders/attn_decode{,_f16}.wgsl`: one decoded token's RMSNorm + q/k/v
//! projection + RoPE + KV-cache append + attention + each head's share of
//! the output projection in one dispatch (one workgroup per kv head where
//! its workgroup memory holds the group's query heads, [`heads_per_group`];
//! else one per query head).
//! It replaces [`super::qkv_rope`], [`super::attention`] and the o_proj
//! matvec when a chunk is one token and the shape fits the kernel's
//! workgroup memory ([`fits`]); prompts keep the three kernels. The heads'
//! shares (`part`, `[n_heads][hidden]`) are summed into the residual by the
//! expert kernels that follow (`n_part` in [`super::expert::Params`]).
//!
//! On software adapters (lavapipe, SwiftShader) each invocation's memory
//! access costs tens of instructions, and a loop costs about as much in a
//! vector whose invocations idle as in a busy one: an attention phase where
//! only `head_dim` invocations looped over every position (and a barrier
//! inside the loop over position tiles) made the first version of this
//! kernel 2-4x slower per token than the three kernels it replaces. The
//! attention now spreads every phase over the whole workgroup (see the
//! shader), and the one-dispatch path is the engine's default.
//!
//! A workgroup takes `QPW` query heads of one kv head (written into the
//! source, [`AttnDecode::with_format`]): it computes their kv head's k and
//! v rows once, where a workgroup per query head computed them once per
//! head (the default model: 4 query heads on 2 kv heads, so half the k/v
//! projection and half the workgroups).

use bytemuck::{Pod, Zeroable};

use super::attention;
use super::context::{GpuContext, GpuError};
use super::kernel::{f32_bytes, step_buffer, transpose, Kernel, Shape, Step, WeightFormat};
use super::qkv_rope::{self, pack_qkv, QkvShape};

pub const SOURCE: &str = include_str!("../../../shaders/attn_decode.wgsl");
pub const SOURCE_F16: &str = include_str!("../../../shaders/attn_decode_f16.wgsl");
/// The kernels with weight loads four at a time ([`vec4_fits`]).
pub const SOURCE_V4: &str = include_str!("../../../shaders/attn_decode_v4.wgsl");
pub const SOURCE_F16_V4: &str = include_str!("../../../shaders/attn_decode_f16_v4.wgsl");

/// `MAX_HIDDEN` and `MAX_HEAD_DIM` of the shader (its workgroup arrays).
pub const MAX_HIDDEN: usize = 2048;
pub const MAX_HEAD_DIM: usize = 256;

#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct Params {
    pub hidden: u32,
    pub n_heads: u32,
    pub n_kv: u32,
    pub head_dim: u32,
    pub max_seq: u32,
    pub eps: f32,
    pub scale: f32,
    /// Row stride of Wo (`[q_dim][wo_stride]`): hidden, or hidden rounded
    /// up to even for f16 (see [`WeightFormat::matrix_bytes`]).
    pub wo_stride: u32,
}

/// `wo_stride` for `hidden` columns in `format`.
pub fn wo_stride(format: WeightFormat, hidden: usize) -> u32 {
    match format {
        WeightFormat::F32 => hidden as u32,
        WeightFormat::F16 => hidden.next_multiple_of(2) as u32,
    }
}

/// Whether the fused kernel can run this shape with workgroup size `wg`
/// (its workgroup arrays hold `head_dim` values, the scores go to the
/// tail of `part`, [`part_bytes`]; `hidden` is bounded by the expert kernels that add its
/// o_proj shares, which stage the row in workgroup memory).
pub fn fits(hidden: usize, head_dim: usize, wg: u32) -> bool {
    hidden <= MAX_HIDDEN
        && (2..=MAX_HEAD_DIM).contains(&head_dim)
        && head_dim.is_multiple_of(2)
        && wg <= 256
}

/// Bytes of the kernel's `part` buffer: the heads' o_proj shares
/// (`[n_heads][hidden]`), then each head's attention scores
/// (`[n_heads][max_seq]`, scratch).
pub fn part_bytes(n_heads: usize, hidden: usize, max_seq: usize) -> u64 {
    (n_heads * (hidden + max_seq) * 4) as u64
}

/// The kernel with its query heads per workgroup (`QPW`).
#[derive(Debug)]
pub struct AttnDecode {
    pub kernel: Kernel,
    /// Query heads per workgroup (divides `n_heads / n_kv`).
    pub heads_per_group: u32,
}

/// Bytes of workgroup memory the kernel declares for `qpw` heads per
/// workgroup at `head_dim` and `wg` invocations, its arrays sized as
/// [`super::kernel::sized_source`] sizes them (`qs`: `qpw * head_dim`;
/// `ks`, `vs`: `head_dim`; the reductions' shares and the maxima).
pub fn workgroup_bytes(f16_v4: bool, head_dim: usize, wg: u32, qpw: usize) -> usize {
    let wg = (wg as usize).clamp(1, 256);
    let red = if f16_v4 {
        // RED shares of four entries (red_l f32, red_a vec4).
        let hd4 = head_dim.div_ceil(4);
        5 * hd4.max(hd4 * (wg.min(64) / hd4))
    } else {
        2 * head_dim.max(head_dim * (wg / head_dim))
    };
    4 * (qpw * (head_dim + red + 1) + 2 * head_dim)
}

/// Query heads per workgroup for `n_heads` on `n_kv` kv heads: the most
/// (a divisor of `n_heads / n_kv`, at most `limit` unless it is 0) whose
/// arrays fit the device's workgroup memory, at least 1.
pub fn heads_per_group(
    ctx: &GpuContext,
    format: WeightFormat,
    hidden: usize,
    head_dim: usize,
    n_heads: usize,
    n_kv: usize,
) -> u32 {
    let group = if n_kv == 0 || !n_heads.is_multiple_of(n_kv) {
        1
    } else {
        n_heads / n_kv
    };
    let limit = match ctx.attn_heads_per_group {
        0 => group,
        l => (l as usize).min(group),
    };
    let f16_v4 = format == WeightFormat::F16 && vec4_fits(hidden, head_dim);
    let budget = ctx.limits.max_compute_workgroup_storage_size as usize;
    (1..=limit)
        .rev()
        .find(|&q| {
            group.is_multiple_of(q)
                && workgroup_bytes(f16_v4, head_dim, ctx.barrier_workgroup_size, q) <= budget
        })
        .unwrap_or(1) as u32
}

/// Whether the shape takes the `_v4` kernels (weights read four at a time:
/// four projection rows and four o_proj outputs per invocation), which need
/// `head_dim % 8 == 0` (four RoPE pairs) and `hidden % 4 == 0` (Wo's rows
/// in whole vec4s). Software adapters pay per load (SwiftShader: a quarter
/// of the loads, several times faster); hardware ones lose nothing.
pub fn vec4_fits(hidden: usize, head_dim: usize) -> bool {
    head_dim.is_multiple_of(8) && hidden.is_multiple_of(4)
}

impl AttnDecode {
    /// The variant reading `w` in `format` for a `hidden` x `head_dim`
    /// shape (the `_v4` kernels when [`vec4_fits`]), with
    /// [`heads_per_group`] query heads of `n_heads` on `n_kv` kv heads per
    /// workgroup.
    pub fn with_format(
        ctx: &GpuContext,
        format: WeightFormat,
        hidden: usize,
        head_dim: usize,
        n_heads: usize,
        n_kv: usize,
    ) -> Self {
        let qpw = heads_per_group(ctx, format, hidden, head_dim, n_heads, n_kv);
        let v4 = vec4_fits(hidden, head_dim);
        let (name, src) = match (format, v4) {
            (WeightFormat::F32, false) => ("attn_decode", SOURCE),
            (WeightFormat::F16, false) => ("attn_decode_f16", SOURCE_F16),
            (WeightFormat::F32, true) => ("attn_decode_v4", SOURCE_V4),
            (WeightFormat::F16, true) => ("attn_decode_f16_v4", SOURCE_F16_V4),
        };
        let src = src.replace("const QPW: u32 = 1u;", &format!("const QPW: u32 = {qpw}u;"));
        Self {
            kernel: Kernel::new_sized(
                ctx,
                name,
                &src,
                ctx.barrier_workgroup_size,
                &Shape {
                    hidden,
                    n_experts: 0,
                    head_dim,
                },
            ),
            heads_per_group: qpw,
        }
    }
    /// Bindings: step, params, w (q/k/v), x, g, rope, k_cache, v_cache, wo, part.
    pub fn bind(&self, ctx: &GpuContext, b: [&wgpu::Buffer; 10]) -> wgpu::BindGroup {
        self.kernel.bind(ctx, &b)
    }
    /// One workgroup per [`AttnDecode::heads_per_group`] query heads (the
    /// step must hold one token).
    pub fn encode(&self, pass: &mut wgpu::ComputePass<'_>, bg: &wgpu::BindGroup, p: &Params) {
        self.kernel.dispatch_groups(
            pass,
            bg,
            u64::from(p.n_heads.div_ceil(self.heads_per_group)),
        );
    }
}

/// CPU reference, the unfused path: [`qkv_rope::reference`] for the token at
/// `pos0`, then [`attention::reference`] over `k_prev`/`v_prev`
/// (`[pos0][kv_dim]`) and the new row, then each head's share of the
/// output projection `wo` (`[hidden][q_dim]`, the checkpoint's layout).
/// Returns `(part [n_heads][hidden], k, v)`.
#[allow(clippy::too_many_arguments)]
pub fn reference(
    s: &QkvShape,
    wq: &[f32],
    wk: &[f32],
    wv: &[f32],
    x: &[f32],
    g: &[f32],
    table: &[f32],
    k_prev: &[f32],
    v_prev: &[f32],
    wo: &[f32],
    pos0: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (q, k, v) = qkv_rope::reference(s, wq, wk, wv, x, g, table, pos0);
    let kvd = s.n_kv * s.head_dim;
    let mut kall = k_prev[..pos0 * kvd].to_vec();
    kall.extend_from_slice(&k);
    let mut vall = v_prev[..pos0 * kvd].to_vec();
    vall.extend_from_slice(&v);
    let out = attention::reference(&q, &kall, &vall, s.n_heads, s.n_kv, s.head_dim, pos0);
    let (qd, hd) = (s.n_heads * s.head_dim, s.head_dim);
    let mut part = Vec::with_capacity(s.n_heads * s.hidden);
    for h in 0..s.n_heads {
        for r in 0..s.hidden {
            part.push(
                (0..hd)
                    .map(|e| wo[r * qd + h * hd + e] * out[h * hd + e])
                    .sum(),
            );
        }
    }
    (part, k, v)
}

/// One-shot GPU run (tests), same arguments as [`reference()`]; k and v are
/// read back from the cache row the kernel wrote.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    ctx: &GpuContext,
    format: WeightFormat,
    s: &QkvShape,
    wq: &[f32],
    wk: &[f32],
    wv: &[f32],
    x: &[f32],
    g: &[f32],
    table: &[f32],
    k_prev: &[f32],
    v_prev: &[f32],
    wo: &[f32],
    pos0: usize,
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>), GpuError> {
    let (qd, kvd, hd) = (s.n_heads * s.head_dim, s.n_kv * s.head_dim, s.head_dim);
    let max_seq = pos0 + 1;
    if !fits(s.hidden, hd, ctx.barrier_workgroup_size)
        || x.len() != s.hidden
        || s.n_kv == 0
        || !s.n_heads.is_multiple_of(s.n_kv)
        || k_prev.len() < pos0 * kvd
        || v_prev.len() < pos0 * kvd
        || table.len() < max_seq * hd
        || wo.len() != s.hidden * qd
    {
        return Err(GpuError::Input("attn_decode: shape mismatch".into()));
    }
    let kern = AttnDecode::with_format(ctx, format, s.hidden, hd, s.n_heads, s.n_kv);
    let p = Params {
        hidden: s.hidden as u32,
        n_heads: s.n_heads as u32,
        n_kv: s.n_kv as u32,
        head_dim: hd as u32,
        max_seq: max_seq as u32,
        eps: s.eps,
        scale: 1.0 / (hd as f32).sqrt(),
        wo_stride: wo_stride(format, s.hidden),
    };
    let step = step_buffer(
        ctx,
        Step {
            pos0: pos0 as u32,
            n_tok: 1,
            top_k: 0,
            renorm: 0,
        },
    );
    let pb = ctx.uniform_init("params", bytemuck::bytes_of(&p));
    let wb = ctx.storage_init(
        "w",
        &format.encode(&pack_qkv(wq, wk, wv, s.hidden), s.hidden, qd + 2 * kvd),
    );
    let xb = ctx.storage_init("x", f32_bytes(x));
    let gb = ctx.storage_init("g", f32_bytes(g));
    let rb = ctx.storage_init("rope", f32_bytes(table));
    let mut kc = k_prev[..pos0 * kvd].to_vec();
    kc.extend(std::iter::repeat_n(0.0, kvd));
    let kc = ctx.storage_init("k_cache", f32_bytes(&transpose(max_seq, kvd, &kc)));
    let mut vc = v_prev[..pos0 * kvd].to_vec();
    vc.extend(std::iter::repeat_n(0.0, kvd));
    let vc = ctx.storage_init("v_cache", f32_bytes(&vc));
    let wob = ctx.storage_init(
        "wo",
        &format.encode(&transpose(s.hidden, qd, wo), qd, s.hidden),
    );
    let ob = ctx.storage_zeroed("part", part_bytes(s.n_heads, s.hidden, max_seq));
    let bg = kern.bind(ctx, [&step, &pb, &wb, &xb, &gb, &rb, &kc, &vc, &wob, &ob]);
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    {
        let mut pass = enc.begin_compute_pass(&Default::default());
        kern.encode(&mut pass, &bg, &p);
    }
    ctx.queue.submit([enc.finish()]);
    let out = ctx.read_f32(&ob, s.n_heads * s.hidden).await?;
    let kt = ctx.read_f32(&kc, max_seq * kvd).await?;
    let vall = ctx.read_f32(&vc, max_seq * kvd).await?;
    let k = (0..kvd).map(|c| kt[c * max_seq + pos0]).collect();
    Ok((out, k, vall[pos0 * kvd..].to_vec()))
}
