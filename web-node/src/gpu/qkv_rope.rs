//! `shaders/qkv_rope.wgsl`: fused RMSNorm + q/k/v projection + RoPE + KV-cache append.

use bytemuck::{Pod, Zeroable};

use super::context::{GpuContext, GpuError};
use super::kernel::{
    f32_bytes, matvec_ref, rmsnorm_ref, step_buffer, transpose, Kernel, Step, WeightFormat,
};

pub const SOURCE: &str = include_str!("../../../shaders/qkv_rope.wgsl");
pub const SOURCE_F16: &str = include_str!("../../../shaders/qkv_rope_f16.wgsl");

#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct Params {
    pub hidden: u32,
    pub n_heads: u32,
    pub n_kv: u32,
    pub head_dim: u32,
    pub max_seq: u32,
    pub eps: f32,
    pub _p0: u32,
    pub _p1: u32,
}

impl Params {
    /// Invocations per token.
    pub fn units(&self) -> u64 {
        let q = u64::from(self.n_heads * self.head_dim);
        let kv = u64::from(self.n_kv * self.head_dim);
        q / 2 + kv / 2 + kv
    }
}

#[derive(Debug)]
pub struct QkvRope(pub Kernel);

impl QkvRope {
    pub fn new(ctx: &GpuContext) -> Self {
        Self::with_format(ctx, WeightFormat::F32)
    }

    /// The variant reading `w` in `format`.
    pub fn with_format(ctx: &GpuContext, format: WeightFormat) -> Self {
        match format {
            WeightFormat::F32 => Self(Kernel::new(ctx, "qkv_rope", SOURCE, None)),
            WeightFormat::F16 => Self(Kernel::new(ctx, "qkv_rope_f16", SOURCE_F16, None)),
        }
    }
    /// Bindings: step, params, w, x, g, rope, q, k_cache, v_cache.
    pub fn bind(&self, ctx: &GpuContext, b: [&wgpu::Buffer; 9]) -> wgpu::BindGroup {
        self.0.bind(ctx, &b)
    }
    pub fn encode(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        bg: &wgpu::BindGroup,
        p: &Params,
        n_tok: u32,
    ) {
        self.0.dispatch(pass, bg, u64::from(n_tok) * p.units());
    }
}

/// RoPE table `[max_seq][head_dim/2][cos, sin]` with the Hugging Face
/// frequencies computed as the CPU reference does: f32 `1 / theta^(i / head_dim)`
/// for even `i`, f32 angle `pos * freq`, `sin_cos`.
pub fn rope_table(head_dim: usize, theta: f64, max_seq: usize) -> Vec<f32> {
    let theta = theta as f32;
    let inv: Vec<f32> = (0..head_dim)
        .step_by(2)
        .map(|i| 1f32 / theta.powf(i as f32 / head_dim as f32))
        .collect();
    let mut out = Vec::with_capacity(max_seq * inv.len() * 2);
    for pos in 0..max_seq {
        for f in &inv {
            let (s, c) = (pos as f32 * f).sin_cos();
            out.push(c);
            out.push(s);
        }
    }
    out
}

/// Rotate-half RoPE of one head in place at table position `pos`.
pub fn rope_ref(v: &mut [f32], pos: usize, table: &[f32]) {
    let half = v.len() / 2;
    for i in 0..half {
        let c = table[(pos * half + i) * 2];
        let s = table[(pos * half + i) * 2 + 1];
        let (a, b) = (v[i], v[i + half]);
        v[i] = a * c - b * s;
        v[i + half] = b * c + a * s;
    }
}

/// The weights and shape of one layer's attention input.
#[derive(Debug, Clone)]
pub struct QkvShape {
    pub hidden: usize,
    pub n_heads: usize,
    pub n_kv: usize,
    pub head_dim: usize,
    pub eps: f32,
}

/// `[Wq; Wk; Wv]` (`[rows][hidden]` each) transposed into the kernel layout.
pub fn pack_qkv(wq: &[f32], wk: &[f32], wv: &[f32], hidden: usize) -> Vec<f32> {
    let mut all = Vec::with_capacity(wq.len() + wk.len() + wv.len());
    all.extend_from_slice(wq);
    all.extend_from_slice(wk);
    all.extend_from_slice(wv);
    transpose(all.len() / hidden.max(1), hidden, &all)
}

/// CPU reference for `n` tokens at positions `pos0..`: returns `(q, k, v)`,
/// each `[n][dim]`, with RoPE applied to q and k.
#[allow(clippy::too_many_arguments)]
pub fn reference(
    s: &QkvShape,
    wq: &[f32],
    wk: &[f32],
    wv: &[f32],
    x: &[f32],
    g: &[f32],
    table: &[f32],
    pos0: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (qd, kvd, hd) = (s.n_heads * s.head_dim, s.n_kv * s.head_dim, s.head_dim);
    let (mut q, mut k, mut v) = (Vec::new(), Vec::new(), Vec::new());
    for (t, xt) in x.chunks(s.hidden).enumerate() {
        let xn = rmsnorm_ref(xt, g, s.eps);
        let mut qt = matvec_ref(wq, qd, s.hidden, &xn);
        let mut kt = matvec_ref(wk, kvd, s.hidden, &xn);
        for h in qt.chunks_mut(hd) {
            rope_ref(h, pos0 + t, table);
        }
        for h in kt.chunks_mut(hd) {
            rope_ref(h, pos0 + t, table);
        }
        q.extend(qt);
        k.extend(kt);
        v.extend(matvec_ref(wv, kvd, s.hidden, &xn));
    }
    (q, k, v)
}

/// One-shot GPU run (tests): returns `(q, k, v)` like [`reference()`], k and v
/// read back from the cache rows the kernel wrote.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    ctx: &GpuContext,
    s: &QkvShape,
    wq: &[f32],
    wk: &[f32],
    wv: &[f32],
    x: &[f32],
    g: &[f32],
    table: &[f32],
    pos0: usize,
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>), GpuError> {
    run_format(ctx, WeightFormat::F32, s, wq, wk, wv, x, g, table, pos0).await
}

/// [`run`] with the weights stored in `format`.
#[allow(clippy::too_many_arguments)]
pub async fn run_format(
    ctx: &GpuContext,
    format: WeightFormat,
    s: &QkvShape,
    wq: &[f32],
    wk: &[f32],
    wv: &[f32],
    x: &[f32],
    g: &[f32],
    table: &[f32],
    pos0: usize,
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>), GpuError> {
    let n = x.len() / s.hidden;
    let (qd, kvd) = (s.n_heads * s.head_dim, s.n_kv * s.head_dim);
    let max_seq = pos0 + n;
    if table.len() < max_seq * s.head_dim {
        return Err(GpuError::Input("rope table too short".into()));
    }
    let k = QkvRope::with_format(ctx, format);
    let p = Params {
        hidden: s.hidden as u32,
        n_heads: s.n_heads as u32,
        n_kv: s.n_kv as u32,
        head_dim: s.head_dim as u32,
        max_seq: max_seq as u32,
        eps: s.eps,
        _p0: 0,
        _p1: 0,
    };
    let step = step_buffer(
        ctx,
        Step {
            pos0: pos0 as u32,
            n_tok: n as u32,
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
    let qb = ctx.storage_zeroed("q", (n * qd * 4) as u64);
    let kc = ctx.storage_zeroed("k_cache", (max_seq * kvd * 4) as u64);
    let vc = ctx.storage_zeroed("v_cache", (max_seq * kvd * 4) as u64);
    let bg = k.bind(ctx, [&step, &pb, &wb, &xb, &gb, &rb, &qb, &kc, &vc]);
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    {
        let mut pass = enc.begin_compute_pass(&Default::default());
        k.encode(&mut pass, &bg, &p, n as u32);
    }
    ctx.queue.submit([enc.finish()]);
    let q = ctx.read_f32(&qb, n * qd).await?;
    let kt = ctx.read_f32(&kc, max_seq * kvd).await?;
    let vall = ctx.read_f32(&vc, max_seq * kvd).await?;
    let mut kk = Vec::with_capacity(n * kvd);
    for t in 0..n {
        for c in 0..kvd {
            kk.push(kt[c * max_seq + pos0 + t]);
        }
    }
    Ok((q, kk, vall[pos0 * kvd..].to_vec()))
}
