//! What every kernel wrapper shares: pipeline creation with the workgroup
//! size as a pipeline-overridable constant, bind groups from a buffer list,
//! 2-D dispatch splitting, and the per-step uniform.

use bytemuck::{Pod, Zeroable};

use super::context::GpuContext;

/// Per-step values every kernel reads from one small uniform buffer, written
/// once per engine step with `queue.write_buffer` (so one set of bind groups
/// serves every position and batch size).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Pod, Zeroable)]
pub struct Step {
    /// Position of the first token of this step in the sequence.
    pub pos0: u32,
    /// Tokens in this step (1 when decoding, up to the batch size when prefilling).
    pub n_tok: u32,
    /// Experts per token (all of them for the dense mixture).
    pub top_k: u32,
    /// 1: renormalise the chosen experts' weights to sum to 1 (top-k MoE);
    /// 0: keep the softmax over all experts (dense mixture).
    pub renorm: u32,
}

impl Step {
    pub fn bytes(&self) -> &[u8] {
        bytemuck::bytes_of(self)
    }
}

/// One compute pipeline built from one WGSL file.
#[derive(Debug)]
pub struct Kernel {
    pub name: &'static str,
    pub pipeline: wgpu::ComputePipeline,
    /// Invocations per workgroup this pipeline was built with.
    pub wg: u32,
    max_groups: u32,
}

impl Kernel {
    /// Build `source`; `overridable` shaders get `WG` set to the context's
    /// workgroup size, the others keep their fixed size `fixed_wg`.
    pub fn new(ctx: &GpuContext, name: &'static str, source: &str, fixed_wg: Option<u32>) -> Self {
        Self::build(ctx, name, source, fixed_wg, true)
    }

    /// [`Kernel::new`] for a shader that writes every element of its
    /// workgroup memory before reading it: the workgroup memory is not
    /// zeroed first (natively; WebGPU always zeroes it). Software adapters
    /// zero large workgroup arrays slowly, per invocation.
    pub fn new_uninit_workgroup(
        ctx: &GpuContext,
        name: &'static str,
        source: &str,
        fixed_wg: Option<u32>,
    ) -> Self {
        Self::build(ctx, name, source, fixed_wg, false)
    }

    /// [`Kernel::new_uninit_workgroup`] with `WG` set to
    /// [`GpuContext::barrier_workgroup_size`] (the barrier kernels).
    pub fn new_barrier(ctx: &GpuContext, name: &'static str, source: &str) -> Self {
        Self::new_uninit_workgroup_wg(ctx, name, source, ctx.barrier_workgroup_size)
    }

    /// [`Kernel::new_uninit_workgroup`] with `WG` set to `wg`.
    pub fn new_uninit_workgroup_wg(
        ctx: &GpuContext,
        name: &'static str,
        source: &str,
        wg: u32,
    ) -> Self {
        Self::build_wg(ctx, name, source, None, false, wg)
    }

    /// [`Kernel::new_uninit_workgroup_wg`] with the workgroup arrays sized
    /// for `shape` ([`sized_source`]).
    pub fn new_sized(
        ctx: &GpuContext,
        name: &'static str,
        source: &str,
        wg: u32,
        shape: &Shape,
    ) -> Self {
        Self::new_sized_with(ctx, name, source, wg, shape, &[])
    }

    /// [`Kernel::new_sized`] with more pipeline-overridable constants
    /// (`constants`, beside `WG`), each one the source declares.
    pub fn new_sized_with(
        ctx: &GpuContext,
        name: &'static str,
        source: &str,
        wg: u32,
        shape: &Shape,
        constants: &[(&str, f64)],
    ) -> Self {
        Self::build_with(
            ctx,
            name,
            &sized_source(source, shape, wg),
            None,
            false,
            wg,
            constants,
        )
    }

    fn build(
        ctx: &GpuContext,
        name: &'static str,
        source: &str,
        fixed_wg: Option<u32>,
        zero_workgroup_memory: bool,
    ) -> Self {
        Self::build_wg(
            ctx,
            name,
            source,
            fixed_wg,
            zero_workgroup_memory,
            ctx.workgroup_size,
        )
    }

    fn build_wg(
        ctx: &GpuContext,
        name: &'static str,
        source: &str,
        fixed_wg: Option<u32>,
        zero_workgroup_memory: bool,
        overridable_wg: u32,
    ) -> Self {
        Self::build_with(
            ctx,
            name,
            source,
            fixed_wg,
            zero_workgroup_memory,
            overridable_wg,
            &[],
        )
    }

    fn build_with(
        ctx: &GpuContext,
        name: &'static str,
        source: &str,
        fixed_wg: Option<u32>,
        zero_workgroup_memory: bool,
        overridable_wg: u32,
        extra: &[(&str, f64)],
    ) -> Self {
        let module = ctx
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(name),
                source: wgpu::ShaderSource::Wgsl(source.into()),
            });
        let wg = fixed_wg.unwrap_or(overridable_wg);
        let mut constants: Vec<(&str, f64)> = if fixed_wg.is_none() {
            vec![("WG", f64::from(wg))]
        } else {
            Vec::new()
        };
        constants.extend_from_slice(extra);
        let pipeline = ctx
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(name),
                layout: None,
                module: &module,
                entry_point: Some("main"),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants: &constants,
                    zero_initialize_workgroup_memory: zero_workgroup_memory,
                },
                cache: None,
            });
        Self {
            name,
            pipeline,
            wg,
            max_groups: ctx.limits.max_compute_workgroups_per_dimension,
        }
    }

    /// A bind group whose binding `i` is `buffers[i]` (whole buffer).
    pub fn bind(&self, ctx: &GpuContext, buffers: &[&wgpu::Buffer]) -> wgpu::BindGroup {
        let layout = self.pipeline.get_bind_group_layout(0);
        let entries: Vec<wgpu::BindGroupEntry> = buffers
            .iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupEntry {
                binding: i as u32,
                resource: b.as_entire_binding(),
            })
            .collect();
        ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(self.name),
            layout: &layout,
            entries: &entries,
        })
    }

    /// Dispatch enough workgroups for `invocations` invocations (the shader
    /// bounds-checks the tail).
    pub fn dispatch(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        bg: &wgpu::BindGroup,
        invocations: u64,
    ) {
        self.dispatch_groups(pass, bg, invocations.div_ceil(u64::from(self.wg)));
    }

    /// Dispatch `groups` workgroups, split over x and y when one dimension
    /// would exceed the adapter limit (the shader linearises `y * nx + x`).
    pub fn dispatch_groups(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        bg: &wgpu::BindGroup,
        groups: u64,
    ) {
        let groups = groups.max(1);
        let max = u64::from(self.max_groups.max(1));
        let (x, y) = if groups <= max {
            (groups, 1)
        } else {
            (max, groups.div_ceil(max))
        };
        pass.set_pipeline(&self.pipeline);
        pass.set_bind_group(0, bg, &[]);
        pass.dispatch_workgroups(x as u32, y as u32, 1);
    }

    /// Encode one dispatch in its own pass, submit, and wait (tests, benches).
    pub fn run_once(&self, ctx: &GpuContext, bg: &wgpu::BindGroup, invocations: u64) {
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            self.dispatch(&mut pass, bg, invocations);
        }
        ctx.queue.submit([enc.finish()]);
    }
}

/// `[rows][cols]` row-major -> `[cols][rows]` (the layout the kernels read:
/// neighbouring invocations own neighbouring rows and read neighbouring words).
pub fn transpose(rows: usize, cols: usize, data: &[f32]) -> Vec<f32> {
    let mut out = vec![0.0; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = data[r * cols + c];
        }
    }
    out
}

/// `f32` slice as bytes.
pub fn f32_bytes(v: &[f32]) -> &[u8] {
    bytemuck::cast_slice(v)
}

/// A uniform buffer for a step.
pub fn step_buffer(ctx: &GpuContext, step: Step) -> wgpu::Buffer {
    ctx.uniform_init("step", step.bytes())
}

/// Same as `rmsnorm` on the CPU (reference for the fused kernels).
pub fn rmsnorm_ref(x: &[f32], g: &[f32], eps: f32) -> Vec<f32> {
    let n = x.len().max(1) as f32;
    let ss: f32 = x.iter().map(|v| v * v).sum();
    let inv = 1.0 / (ss / n + eps).sqrt();
    x.iter().zip(g).map(|(v, w)| v * inv * w).collect()
}

/// `W x` with W `[rows][cols]` row-major (CPU reference).
pub fn matvec_ref(w: &[f32], rows: usize, cols: usize, x: &[f32]) -> Vec<f32> {
    (0..rows)
        .map(|r| {
            w[r * cols..(r + 1) * cols]
                .iter()
                .zip(x)
                .map(|(a, b)| a * b)
                .sum()
        })
        .collect()
}

/// How the large weight matrices are stored on the GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    /// f32, exact.
    #[default]
    F32,
    /// f16, two per `u32`, read with WGSL `unpack2x16float` (no `shader-f16`
    /// needed, so it runs on SwiftShader too): half the bytes per token.
    F16,
}

impl WeightFormat {
    /// Bytes a `[outer][rows]` matrix takes in this format (f16 pads rows to even).
    pub fn matrix_bytes(self, outer: usize, rows: usize) -> usize {
        match self {
            WeightFormat::F32 => outer * rows * 4,
            WeightFormat::F16 => outer * rows.div_ceil(2) * 4,
        }
    }

    /// Encode a `[outer][rows]` matrix (already in kernel layout) in this format.
    pub fn encode(self, data: &[f32], outer: usize, rows: usize) -> Vec<u8> {
        match self {
            WeightFormat::F32 => f32_bytes(data).to_vec(),
            WeightFormat::F16 => bytemuck::cast_slice(&pack_f16(data, outer, rows)).to_vec(),
        }
    }
}

/// `v` as the engine stores an f16 weight: rounded to the nearest half,
/// a subnormal result flushed to zero (sign kept) and an infinite one
/// saturated to the largest finite half (NaN stays NaN). Every stored
/// half is then zero or normal, which the software adapters' f16 decode
/// (`expert_up_f16_v4.wgsl`: the half's bits moved into an f32, no
/// rebias) needs to be exact; `|v| < 2^-14` is far below what a weight's
/// rounding to f16 moves it by anyway.
pub fn f16_weight(v: f32) -> half::f16 {
    let h = half::f16::from_f32(v);
    let sign = h.to_bits() & 0x8000;
    // Exponent bits 0 and a mantissa: subnormal.
    if h.to_bits() & 0x7c00 == 0 {
        half::f16::from_bits(sign)
    } else if h.is_infinite() {
        half::f16::from_bits(sign | half::f16::MAX.to_bits())
    } else {
        h
    }
}

/// Pack a `[outer][rows]` matrix as f16 pairs per `u32` (low half = even
/// row), each outer row padded to an even length; values as [`f16_weight`].
pub fn pack_f16(data: &[f32], outer: usize, rows: usize) -> Vec<u32> {
    let rp = rows.div_ceil(2);
    let mut out = vec![0u32; outer * rp];
    for o in 0..outer {
        for r in 0..rows {
            let bits = u32::from(f16_weight(data[o * rows + r]).to_bits());
            out[o * rp + r / 2] |= bits << (16 * (r % 2));
        }
    }
    out
}

/// Values rounded through f16 as the engine stores them ([`f16_weight`];
/// the CPU side of f16 comparisons).
pub fn round_f16(v: &[f32]) -> Vec<f32> {
    v.iter().map(|x| f16_weight(*x).to_f32()).collect()
}

/// The model's sizes that bound the barrier kernels' workgroup arrays
/// ([`sized_source`]); `0`: keep that group's default (largest) size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Shape {
    pub hidden: usize,
    pub n_experts: usize,
    pub head_dim: usize,
}

/// The largest sizes the barrier kernels' sources declare their workgroup
/// arrays for (`MAX_HIDDEN`, `MAX_EXPERTS`, `MAX_HEAD_DIM`, and 256 for the
/// per-invocation arrays).
const DEFAULT_HIDDEN: usize = 2048;
const DEFAULT_EXPERTS: usize = 256;
const DEFAULT_HEAD_DIM: usize = 256;
const DEFAULT_WG: usize = 256;

/// `source` (`expert_up*`, `attn_decode*`) with its workgroup arrays sized
/// for `shape` and `wg` invocations instead of the largest shape the
/// kernel supports. The browser's WebGPU zeroes a workgroup's memory before
/// it runs, and SwiftShader pays for it in every workgroup: `expert_up_v4`
/// at the default model's shape took 1.10 ms per dispatch with the default
/// arrays (13 KiB) and 0.58 ms sized (64 invocations; 0.34 ms at 16), the
/// same work. Each group of declarations (the staged row, `hidden`; the
/// router's, `n_experts`; the attention's, `head_dim`) is resized only when
/// every declaration of the group is there as written and the shape is
/// within the default, else left as it is (correct, only larger). The
/// kernels index these arrays below `MAX_HIDDEN` (`hidden` rounded up to a
/// multiple of 4), `MAX_EXPERTS` (`n_experts`), `MAX_HEAD_DIM`
/// (`head_dim`), `wg` (`r_red`), `max(n_experts, n_experts * (wg /
/// n_experts))` (`r_part`: the gate's partial sums) and `max(head_dim, head_dim
/// * (wg / head_dim))` per head (`RED`: `red_l`, `red_a`).
pub fn sized_source(source: &str, shape: &Shape, wg: u32) -> String {
    fn group(src: &mut String, reps: &[(&str, String)]) {
        if reps.iter().all(|(from, _)| src.contains(from)) {
            for (from, to) in reps {
                *src = src.replace(from, to);
            }
        }
    }
    let wg = (wg as usize).clamp(1, DEFAULT_WG);
    let mut s = source.to_string();
    let h = shape.hidden.div_ceil(4) * 4;
    if (1..=DEFAULT_HIDDEN).contains(&h) {
        let max = format!("const MAX_HIDDEN: u32 = {DEFAULT_HIDDEN}u;");
        let staged4 = format!(
            "var<workgroup> xs: array<vec4<f32>, {}>;",
            DEFAULT_HIDDEN / 4
        );
        let mut reps = vec![(max.as_str(), format!("const MAX_HIDDEN: u32 = {h}u;"))];
        if s.contains(&staged4) {
            reps.push((
                staged4.as_str(),
                format!("var<workgroup> xs: array<vec4<f32>, {}>;", h / 4),
            ));
        }
        group(&mut s, &reps);
    }
    let ne = shape.n_experts;
    if (1..=DEFAULT_EXPERTS).contains(&ne) {
        let part = ne.max(ne * (wg / ne));
        group(
            &mut s,
            &[
                (
                    &format!("const MAX_EXPERTS: u32 = {DEFAULT_EXPERTS}u;"),
                    format!("const MAX_EXPERTS: u32 = {ne}u;"),
                ),
                (
                    "var<workgroup> r_part: array<f32, MAX_EXPERTS>;",
                    format!("var<workgroup> r_part: array<f32, {part}>;"),
                ),
                (
                    &format!("var<workgroup> r_red: array<f32, {DEFAULT_WG}>;"),
                    format!("var<workgroup> r_red: array<f32, {wg}>;"),
                ),
            ],
        );
    }
    let hd = shape.head_dim;
    if (1..=DEFAULT_HEAD_DIM).contains(&hd) {
        let max_hd = format!("const MAX_HEAD_DIM: u32 = {DEFAULT_HEAD_DIM}u;");
        let mut reps = vec![(max_hd.as_str(), format!("const MAX_HEAD_DIM: u32 = {hd}u;"))];
        // The reductions' shares per head: max(1, min(WG, RED) / hd) of
        // one entry each in the attention kernels (RED = 256 as written),
        // so RED = max(hd, wg rounded down to a multiple of hd) holds them
        // all and keeps the kernel's share count...
        let red = hd.max(hd * (wg / hd));
        let red_scalar = format!("const RED: u32 = {DEFAULT_WG}u;");
        // ...or, in attn_decode_f16_v4, max(1, min(WG, RED) / (hd / 4))
        // shares of hd / 4 entries (RED = 64 as written), so RED = max(hd /
        // 4, min(wg, 64) rounded down to a multiple of hd / 4) holds them
        // all and keeps the kernel's share count.
        let red_const = "const RED: u32 = 64u;";
        if s.contains(&red_scalar) {
            reps.push((red_scalar.as_str(), format!("const RED: u32 = {red}u;")));
        } else if s.contains(red_const) {
            let hd4 = hd.div_ceil(4);
            let red4 = hd4.max(hd4 * (wg.min(64) / hd4));
            reps.push((red_const, format!("const RED: u32 = {red4}u;")));
        } else {
            // No reduction arrays: not a kernel this sizes.
            reps.clear();
        }
        group(&mut s, &reps);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_weights_are_zero_or_normal_and_finite() {
        let tiny = 2f32.powi(-20);
        assert_eq!(f16_weight(tiny).to_bits(), 0);
        assert_eq!(f16_weight(-tiny).to_bits(), 0x8000);
        assert_eq!(f16_weight(1e9), half::f16::MAX);
        assert_eq!(f16_weight(-1e9), -half::f16::MAX);
        assert!(f16_weight(f32::NAN).is_nan());
        // Normal halves and zero are kept as rounded.
        for v in [0.0, 1.0, -0.3, 2f32.powi(-14), 65504.0, 0.0123] {
            assert_eq!(f16_weight(v), half::f16::from_f32(v));
        }
        assert_eq!(round_f16(&[tiny, 0.5]), vec![0.0, 0.5]);
        let packed = pack_f16(&[tiny, 1e9, 1.0], 1, 3);
        assert_eq!(packed, vec![0x7bff << 16, 0x3c00]);
    }
}
