//! CPU reference forward of an MoE model (Mixtral, OLMoE, Qwen2-MoE,
//! Qwen3-MoE): RMSNorm, RoPE (Hugging Face `rotate_half` convention),
//! grouped-query attention with a KV cache (plus the family's q/k/v biases
//! or q/k norms), router softmax, top-k (renormalised for Mixtral and by
//! `norm_topk_prob` otherwise), SwiGLU experts, the shared expert with its
//! sigmoid gate (Qwen2-MoE), final norm and lm_head. The family pieces are
//! in [`super::family`].
//!
//! [`CpuEngine`] implements [`Engine`]: a step that reaches experts it does
//! not hold pauses and names them; in remote mode
//! ([`CpuEngine::set_remote_experts`]) it instead pauses at every layer with
//! the expert computations it wants run elsewhere ([`Step::Compute`]) and
//! sums their outputs exactly as it sums its own, so the result is
//! bit-identical to local computation. [`CpuModel`] attaches an
//! [`ExpertSource`] for blocking callers. Routing statistics are kept per
//! expert. Weights are shared (`Arc`): [`CpuEngine::fork`] makes another
//! engine over the same weights with an empty KV cache, without copying them.
//!
//! Matrix products ([`matmul`], and the quantized prefill) are blocked: weight
//! rows in L2-sized blocks, input rows in L1-sized blocks, and micro-tiles of
//! 3 input rows × 2 weight rows whose 16-lane accumulators stay in registers
//! (pulp's vectors for the CPU's level natively, plain arrays in wasm).
//! Natively, products of `lanes::PACK_MIN_T` (4) rows or more take the lane
//! kernel instead (`lanes`: vectors across input rows, weights broadcast).
//! Every result is summed in [`dot`]'s order, so a token's row does not
//! depend on the batch it came in. Large products are split by rows into
//! pieces on a rayon pool natively (wasm runs single-threaded).
//!
//! `sliding_window` is not applied (attention is full causal); models here
//! are far shorter than any window.

use std::sync::Arc;

use super::engine::now;
use super::load::BytesExpertSource;
use super::{
    check_expert, check_weights, run_step, Config, Engine, ExpertId, ExpertJob, ExpertSource,
    ExpertWeights, Forward, Mat, ModelError, Output, RouterWeights, RunOptions, SharedWeights,
    Step, Want, Weight,
};

#[cfg(not(target_arch = "wasm32"))]
mod lanes;
#[cfg(not(target_arch = "wasm32"))]
pub(crate) use lanes::{packed_input, PackedRows};

/// Products with at least this many multiply-adds are split over threads.
#[cfg(not(target_arch = "wasm32"))]
const PAR_MIN_MACS: usize = 1 << 20;

/// Usage of the experts since the model was built (or [`CpuModel::reset_stats`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutingStats {
    /// `tokens_routed[layer][expert]`: token-expert evaluations (in dense
    /// mode every expert counts for every token).
    pub tokens_routed: Vec<Vec<u64>>,
    /// Experts asked from the source.
    pub experts_loaded: u64,
    /// Bytes (as f32) of the experts asked from the source.
    pub expert_bytes_loaded: u64,
    /// Bytes of expert weights read by the products (one read per expert per
    /// forward call that uses it).
    pub expert_bytes_read: u64,
    /// Tokens processed by forward calls.
    pub tokens: u64,
}

impl RoutingStats {
    fn new(cfg: &Config) -> Self {
        Self {
            tokens_routed: vec![vec![0; cfg.num_local_experts]; cfg.num_hidden_layers],
            ..Self::default()
        }
    }

    /// `(layer, expert, count)` of every expert routed at least once.
    pub fn routed(&self) -> Vec<(usize, usize, u64)> {
        let mut v = Vec::new();
        for (l, row) in self.tokens_routed.iter().enumerate() {
            for (e, &c) in row.iter().enumerate() {
                if c > 0 {
                    v.push((l, e, c));
                }
            }
        }
        v
    }
}

/// The CPU reference engine: implements [`Engine`]. A step that reaches
/// a layer whose routed experts are not held pauses with
/// [`Step::Need`]; it never fetches them itself. In remote mode it pauses
/// with [`Step::Compute`] at every layer instead.
pub struct CpuEngine {
    cfg: Config,
    shared: Arc<SharedWeights>,
    routers: Arc<[RouterWeights]>,
    experts: Vec<Vec<Option<Arc<ExpertWeights>>>>,
    /// Per layer, `[position][kv_head][head_dim]`.
    k_cache: Vec<Vec<f32>>,
    v_cache: Vec<Vec<f32>>,
    pos: usize,
    inv_freq: Vec<f32>,
    stats: RoutingStats,
    threads: usize,
    /// Remote mode: expert outputs are asked for ([`Step::Compute`]).
    remote: bool,
    /// Per layer, the experts the last finished step routed to.
    last_experts: Vec<Vec<usize>>,
    pending: Option<Pending>,
}

/// A step paused at a layer's experts.
struct Pending {
    tokens: Vec<u32>,
    k: usize,
    use_moe: bool,
    /// Remote mode, as set when the step began.
    remote: bool,
    want: Want,
    /// The layer being computed.
    layer: usize,
    /// Hidden states `[t, hidden]`; after the layer's attention when
    /// `attn_done`.
    x: Vec<f32>,
    /// The post-attention normalised states the experts take.
    xn: Vec<f32>,
    attn_done: bool,
    /// Remote mode: the layer's routing, once its jobs were asked for.
    assigned: Option<Vec<Vec<(usize, f32)>>>,
    /// Remote mode: per expert of the layer, its supplied output.
    outputs: Vec<Option<Vec<f32>>>,
    /// Per layer done so far, the experts routed to.
    used: Vec<Vec<usize>>,
}

impl std::fmt::Debug for CpuEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuEngine")
            .field("pos", &self.pos)
            .field("threads", &self.threads)
            .field("stats", &self.stats)
            .field("paused", &self.pending.is_some())
            .finish_non_exhaustive()
    }
}

/// The CPU engine with an attached expert source: the blocking convenience
/// for the CLI, eval and tests ([`Forward`]). Steps run through
/// [`run_step`], the same loop every caller uses.
pub struct CpuModel {
    pub engine: CpuEngine,
    pub source: Box<dyn ExpertSource + Send>,
}

impl std::fmt::Debug for CpuModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuModel")
            .field("engine", &self.engine)
            .finish_non_exhaustive()
    }
}

/// Threads for large products: the machine's parallelism (1 in wasm).
pub(crate) fn default_threads() -> usize {
    #[cfg(target_arch = "wasm32")]
    {
        1
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    }
}

#[inline(always)]
pub(crate) fn reduce16(acc: &[f32; 16]) -> f32 {
    let mut s8 = [0f32; 8];
    for i in 0..8 {
        s8[i] = acc[i] + acc[i + 8];
    }
    let s4 = [s8[0] + s8[4], s8[1] + s8[5], s8[2] + s8[6], s8[3] + s8[7]];
    (s4[0] + s4[2]) + (s4[1] + s4[3])
}

/// `a * b + c`, fused when `FMA` (only used where the CPU has FMA).
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Dot product with 16 independent accumulators (vectorises without
/// fast-math; the result does not depend on the SIMD width).
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot_k::<false>(a, b)
}

#[inline(always)]
pub(crate) fn dot_k<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let ca = a.chunks_exact(16);
    let cb = b.chunks_exact(16);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    let mut acc = [0f32; 16];
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] = madd::<FMA>(x[i], y[i], acc[i]);
        }
    }
    let mut s = reduce16(&acc);
    for (x, y) in ra.iter().zip(rb) {
        s = madd::<FMA>(*x, *y, s);
    }
    s
}

/// Input rows per micro-tile of a batched product. A tile keeps
/// `TILE_T × TILE_O` pairs of 16-lane accumulators in registers: natively
/// 3 × 2 pairs, twelve of the sixteen AVX2 registers; in wasm 4 × 1, the
/// shape of the product before the tiles.
#[cfg(not(target_arch = "wasm32"))]
const TILE_T: usize = 3;
#[cfg(target_arch = "wasm32")]
const TILE_T: usize = 4;
/// Weight rows per micro-tile of a batched product.
#[cfg(not(target_arch = "wasm32"))]
const TILE_O: usize = 2;
#[cfg(target_arch = "wasm32")]
const TILE_O: usize = 1;
/// Weight rows per tile of a one-row product (decode): eight independent
/// accumulators hide the multiply-add latency that one dot product's two
/// would expose.
const TILE_O_ONE: usize = 4;
/// Input rows are taken in blocks of about this many bytes, so a block
/// stays in L1 while the weight rows stream past it...
const X_BLOCK_BYTES: usize = 24 << 10;
/// ...and weight rows in blocks of about this many bytes, which stay in L2
/// while every input block passes them.
const W_BLOCK_BYTES: usize = 256 << 10;

/// A micro-kernel of the blocked product: `R` input rows (back to back in
/// `x`, each `n` wide) against `C` weight rows (back to back in `w`),
/// giving `[r][c]`. Every pair is summed in [`dot`]'s order (16 lanes over
/// `k`, [`reduce16`], then the tail), so each result is bit-identical to
/// `dot_k::<FMA>(w_row, x_row)` whatever the tile: the tile only decides
/// how often each vector is loaded.
pub(crate) trait Tiles: Copy {
    fn tile<const R: usize, const C: usize>(self, w: &[f32], x: &[f32], n: usize) -> [[f32; C]; R];

    /// The weight rows of `w` (each `n` wide, back to back) against packed
    /// input rows, into `out` (`[rows, t]`, out-major), each result as
    /// [`dot`] sums it: the lane product where the kernel has one
    /// (`lanes`), else the blocked product over the rows as given.
    #[cfg(not(target_arch = "wasm32"))]
    #[inline(always)]
    fn packed(self, w: &[f32], n: usize, px: &PackedRows<'_>, out: &mut [f32]) {
        block_product(self, w, n, px.x, px.t, out)
    }
}

/// The tiles in plain arrays that the compiler vectorises: the wasm
/// kernel (simd128), and natively the fallback where pulp offers no
/// vector level. At most 4 × 4.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PortableTiles<const FMA: bool>;

/// `acc[i] += w[i] * x[i]` over 16 lanes.
#[inline(always)]
fn madd16<const FMA: bool>(acc: &mut [f32; 16], w: &[f32], x: &[f32]) {
    let (w, x) = (&w[..16], &x[..16]);
    for i in 0..16 {
        acc[i] = madd::<FMA>(w[i], x[i], acc[i]);
    }
}

impl<const FMA: bool> Tiles for PortableTiles<FMA> {
    #[inline(always)]
    fn tile<const R: usize, const C: usize>(self, w: &[f32], x: &[f32], n: usize) -> [[f32; C]; R] {
        const { assert!(R <= 4 && C <= 4) };
        let (w, x) = (&w[..C * n], &x[..R * n]);
        let full = n - n % 16;
        let mut acc = [[[0f32; 16]; C]; R];
        let mut k = 0;
        while k < full {
            // Literal indices: the compiler keeps every accumulator in
            // registers (a loop over `r` left `acc` in memory).
            macro_rules! pair {
                ($r:literal, $c:literal) => {
                    if $r < R && $c < C {
                        madd16::<FMA>(&mut acc[$r][$c], &w[$c * n + k..], &x[$r * n + k..]);
                    }
                };
            }
            pair!(0, 0);
            pair!(0, 1);
            pair!(0, 2);
            pair!(0, 3);
            pair!(1, 0);
            pair!(1, 1);
            pair!(1, 2);
            pair!(1, 3);
            pair!(2, 0);
            pair!(2, 1);
            pair!(2, 2);
            pair!(2, 3);
            pair!(3, 0);
            pair!(3, 1);
            pair!(3, 2);
            pair!(3, 3);
            k += 16;
        }
        let mut out = [[0f32; C]; R];
        for (r, (o, a)) in out.iter_mut().zip(&acc).enumerate() {
            for (c, (o, a)) in o.iter_mut().zip(a).enumerate() {
                *o = finish::<FMA>(
                    reduce16(a),
                    &w[c * n + full..(c + 1) * n],
                    &x[r * n + full..],
                );
            }
        }
        out
    }
}

/// A reduced 16-lane sum plus the products of the tail (past the last
/// full 16), as [`dot`] adds them.
#[inline(always)]
fn finish<const FMA: bool>(mut s: f32, w: &[f32], x: &[f32]) -> f32 {
    for (a, b) in w.iter().zip(x) {
        s = madd::<FMA>(*a, *b, s);
    }
    s
}

/// The tiles in pulp's vectors for the level it dispatched to (AVX2 +
/// FMA on x86-64 v3, NEON): explicit vectors, so the accumulators stay
/// in registers whatever the tile shape.
#[cfg(not(target_arch = "wasm32"))]
#[derive(Clone, Copy, Debug)]
pub(crate) struct SimdTiles<S, const FMA: bool>(pub(crate) S);

#[cfg(not(target_arch = "wasm32"))]
impl<S: pulp::Simd, const FMA: bool> Tiles for SimdTiles<S, FMA> {
    #[inline(always)]
    fn tile<const R: usize, const C: usize>(self, w: &[f32], x: &[f32], n: usize) -> [[f32; C]; R] {
        // `V` vectors of `S::F32_LANES` make the 16 lanes.
        match S::F32_LANES {
            16 => simd_tile::<S, FMA, 1, R, C>(self.0, w, x, n),
            8 => simd_tile::<S, FMA, 2, R, C>(self.0, w, x, n),
            4 => simd_tile::<S, FMA, 4, R, C>(self.0, w, x, n),
            _ => PortableTiles::<FMA>.tile::<R, C>(w, x, n),
        }
    }

    #[inline(always)]
    fn packed(self, w: &[f32], n: usize, px: &PackedRows<'_>, out: &mut [f32]) {
        lanes::lanes_product::<S, FMA>(self.0, w, n, px, out)
    }
}

#[cfg(not(target_arch = "wasm32"))]
#[inline(always)]
fn simd_tile<S: pulp::Simd, const FMA: bool, const V: usize, const R: usize, const C: usize>(
    simd: S,
    w: &[f32],
    x: &[f32],
    n: usize,
) -> [[f32; C]; R] {
    let (w, x) = (&w[..C * n], &x[..R * n]);
    let full = n - n % 16;
    let mut acc = [[[simd.splat_f32s(0.0); V]; C]; R];
    let mut k = 0;
    while k < full {
        let wv: [&[S::f32s]; C] =
            std::array::from_fn(|c| S::as_simd_f32s(&w[c * n + k..c * n + k + 16]).0);
        let xv: [&[S::f32s]; R] =
            std::array::from_fn(|r| S::as_simd_f32s(&x[r * n + k..r * n + k + 16]).0);
        for v in 0..V {
            for r in 0..R {
                for c in 0..C {
                    let (a, b) = (wv[c][v], xv[r][v]);
                    acc[r][c][v] = if FMA {
                        simd.mul_add_e_f32s(a, b, acc[r][c][v])
                    } else {
                        simd.add_f32s(simd.mul_f32s(a, b), acc[r][c][v])
                    };
                }
            }
        }
        k += 16;
    }
    let mut out = [[0f32; C]; R];
    for (r, (o, a)) in out.iter_mut().zip(&acc).enumerate() {
        for (c, (o, a)) in o.iter_mut().zip(a).enumerate() {
            let mut lanes = [0f32; 16];
            lanes.copy_from_slice(bytemuck::cast_slice(a));
            *o = finish::<FMA>(
                reduce16(&lanes),
                &w[c * n + full..(c + 1) * n],
                &x[r * n + full..],
            );
        }
    }
    out
}

/// The operands of one blocked product: weight rows `w` (back to back,
/// each `n` wide) against the `t` rows of `x`, into `out` (`[rows, t]`,
/// out-major).
struct Operands<'a, K> {
    k: K,
    w: &'a [f32],
    n: usize,
    x: &'a [f32],
    t: usize,
}

impl<K: Tiles> Operands<'_, K> {
    /// Weight rows `o..o + C` against input rows `t0..t1`.
    #[inline(always)]
    fn columns<const C: usize>(&self, o: usize, t0: usize, t1: usize, out: &mut [f32]) {
        let (n, t) = (self.n, self.t);
        let wc = &self.w[o * n..(o + C) * n];
        let mut ti = t0;
        while ti + TILE_T <= t1 {
            let y = self.k.tile::<TILE_T, C>(wc, &self.x[ti * n..], n);
            for (r, yr) in y.iter().enumerate() {
                for (c, &v) in yr.iter().enumerate() {
                    out[(o + c) * t + ti + r] = v;
                }
            }
            ti += TILE_T;
        }
        while ti < t1 {
            let y = self.k.tile::<1, C>(wc, &self.x[ti * n..], n);
            for (c, &v) in y[0].iter().enumerate() {
                out[(o + c) * t + ti] = v;
            }
            ti += 1;
        }
    }
}

/// The blocked product behind [`matmul`] and the quantized prefill: the
/// `out.len() / t` weight rows of `w` (each `n` wide, back to back)
/// against the `t` rows of `x`, into `out` (`[rows, t]`, out-major).
/// Weight rows go in L2-sized blocks, input rows in L1-sized blocks;
/// within them micro-tiles of `TILE_T × TILE_O` keep their accumulators in
/// registers, so each vector loaded feeds several multiply-adds. One input
/// row (decode) goes through tiles of `TILE_O_ONE` weight rows. Each
/// result is bit-identical to [`dot`] of its two rows (fused when the
/// kernel is), so it depends neither on the batch, nor on the blocks, nor
/// on the thread split.
#[inline(always)]
pub(crate) fn block_product<K: Tiles>(
    k: K,
    w: &[f32],
    n: usize,
    x: &[f32],
    t: usize,
    out: &mut [f32],
) {
    if t == 0 || out.is_empty() {
        return;
    }
    let rows = out.len() / t;
    if t == 1 {
        let mut o = 0;
        // Weights past L2 come from memory, where one row at a time (one
        // stream for the prefetchers) measured up to twice the bandwidth
        // of four rows at once; weights in cache go four at a time.
        let tile = if rows * n * 4 > W_BLOCK_BYTES {
            1
        } else {
            TILE_O_ONE
        };
        while tile > 1 && o + TILE_O_ONE <= rows {
            let y = k.tile::<1, TILE_O_ONE>(&w[o * n..], x, n);
            out[o..o + TILE_O_ONE].copy_from_slice(&y[0]);
            o += TILE_O_ONE;
        }
        while o < rows {
            out[o] = k.tile::<1, 1>(&w[o * n..], x, n)[0][0];
            o += 1;
        }
        return;
    }
    let row_bytes = 4 * n.max(1);
    let t_block = (X_BLOCK_BYTES / row_bytes).max(TILE_T) / TILE_T * TILE_T;
    let o_block = (W_BLOCK_BYTES / row_bytes).max(TILE_O) / TILE_O * TILE_O;
    let ops = Operands { k, w, n, x, t };
    let mut o0 = 0;
    while o0 < rows {
        let o1 = (o0 + o_block).min(rows);
        let mut t0 = 0;
        while t0 < t {
            let t1 = (t0 + t_block).min(t);
            let mut o = o0;
            while o + TILE_O <= o1 {
                ops.columns::<TILE_O>(o, t0, t1, out);
                o += TILE_O;
            }
            while o < o1 {
                ops.columns::<1>(o, t0, t1, out);
                o += 1;
            }
            t0 = t1;
        }
        o0 = o1;
    }
}

/// One thread's share of a product: rows `o0..` of `w` into `chunk`.
struct RowsOp<'a> {
    w: &'a Mat,
    x: &'a [f32],
    /// `x` packed for the lane product (several rows, natively).
    #[cfg(not(target_arch = "wasm32"))]
    packed: Option<&'a PackedRows<'a>>,
    t: usize,
    o0: usize,
    chunk: &'a mut [f32],
}

impl RowsOp<'_> {
    #[inline(always)]
    fn kernel<K: Tiles>(self, k: K) {
        let n = self.w.cols;
        #[cfg(not(target_arch = "wasm32"))]
        if let Some(px) = self.packed {
            return k.packed(&self.w.data[self.o0 * n..], n, px, self.chunk);
        }
        block_product(
            k,
            &self.w.data[self.o0 * n..],
            n,
            self.x,
            self.t,
            self.chunk,
        )
    }

    fn run(self) {
        #[cfg(not(target_arch = "wasm32"))]
        {
            pulp::Arch::new().dispatch(self)
        }
        #[cfg(target_arch = "wasm32")]
        {
            self.kernel(PortableTiles::<false>)
        }
    }
}

#[cfg(not(target_arch = "wasm32"))]
impl pulp::WithSimd for RowsOp<'_> {
    type Output = ();
    // Inlined into pulp's `#[target_feature]` entry point, so the loops
    // below are compiled for the dispatched level (AVX2 + FMA on x86-64
    // v3); `FMA` is on exactly when that level is.
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) {
        if fma_level() {
            self.kernel(SimdTiles::<S, true>(simd))
        } else {
            self.kernel(SimdTiles::<S, false>(simd))
        }
    }
}

/// Whether pulp dispatches to x86-64 v3 (AVX2 + FMA) here. Products then
/// use fused multiply-adds, so their last bits differ from a CPU without
/// them (well within the engines' tolerances).
#[cfg(not(target_arch = "wasm32"))]
#[inline(always)]
pub(crate) fn fma_level() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        pulp::x86::V3::try_new().is_some()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `y[t, o] = sum_i w[o, i] * x[t, i]` for `t` rows of `x` (`[t, w.cols]`),
/// giving `[t, w.rows]`: the blocked product ([`block_product`]) over
/// [`par_rows`]' thread split.
pub fn matmul(x: &[f32], t: usize, w: &Mat, threads: usize) -> Vec<f32> {
    #[cfg(not(target_arch = "wasm32"))]
    let packed = packed_input(x, t, w.cols);
    par_rows(w.rows, w.cols, t, threads, |o0, chunk| {
        RowsOp {
            w,
            x,
            #[cfg(not(target_arch = "wasm32"))]
            packed: packed.as_ref(),
            t,
            o0,
            chunk,
        }
        .run()
    })
}

/// A product of `out` weight rows (each `inn` wide) against `t` input rows,
/// giving `[t, out]`: `rows(o0, chunk)` fills rows `o0..` out-major
/// (`[rows, t]`). Large products are split by rows into pieces (about four
/// per thread, multiples of 24 rows: every lane tile's) that a rayon pool
/// of `threads` threads runs ([`pool`]; one thread in wasm): a thread
/// that other work on the machine holds up delays one piece, not a fixed
/// share. Each row's result does not depend on the split. Every weight
/// format's product ([`matmul`], the quantized one) runs through it.
pub(crate) fn par_rows(
    out: usize,
    inn: usize,
    t: usize,
    threads: usize,
    rows: impl Fn(usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    let mut yt = vec![0f32; out * t];
    if out == 0 || t == 0 {
        return yt;
    }
    #[cfg(not(target_arch = "wasm32"))]
    split_rows(out, inn, t, threads, &mut yt, &rows);
    #[cfg(target_arch = "wasm32")]
    {
        let _ = (inn, threads);
        rows(0, &mut yt);
    }
    if t == 1 {
        return yt;
    }
    // `[out, t]` to `[t, out]` in blocks of 16 outputs: each input row's
    // 16 results go to one cache line (a loop over every output would
    // write with a stride of a whole row, which for rows of a power of two
    // bytes lands every store in the same L1 set).
    let mut y = vec![0f32; out * t];
    for o0 in (0..out).step_by(16) {
        let o1 = (o0 + 16).min(out);
        for ti in 0..t {
            for (o, v) in (o0..o1).zip(&mut y[ti * out + o0..ti * out + o1]) {
                *v = yt[o * t + ti];
            }
        }
    }
    y
}

/// [`par_rows`]' split: pieces of rows (about four per thread, multiples
/// of 24 rows) in the pool of `threads` threads, or all on this thread
/// for a small product.
#[cfg(not(target_arch = "wasm32"))]
fn split_rows(
    out: usize,
    inn: usize,
    t: usize,
    threads: usize,
    yt: &mut [f32],
    rows: &(impl Fn(usize, &mut [f32]) + Sync),
) {
    let n = threads.min(out);
    let pool = if n > 1 && out * inn * t >= PAR_MIN_MACS {
        pool(n)
    } else {
        None
    };
    let Some(pool) = pool else {
        return rows(0, yt);
    };
    use rayon::prelude::*;
    let rows_per = out
        .div_ceil(4 * n)
        .next_multiple_of(24)
        .min(out.div_ceil(n));
    pool.install(|| {
        yt.par_chunks_mut(rows_per * t)
            .enumerate()
            .for_each(|(i, c)| rows(i * rows_per, c))
    });
}

/// The rayon pool of `threads` threads for products (one per thread count
/// asked for, built on first use and kept); `None` if it cannot be built
/// (the product then runs on the calling thread).
#[cfg(not(target_arch = "wasm32"))]
fn pool(threads: usize) -> Option<Arc<rayon::ThreadPool>> {
    use std::sync::{Mutex, PoisonError};
    static POOLS: Mutex<Vec<(usize, Arc<rayon::ThreadPool>)>> = Mutex::new(Vec::new());
    let mut pools = POOLS.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((_, p)) = pools.iter().find(|(n, _)| *n == threads) {
        return Some(Arc::clone(p));
    }
    let p = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("cpu-product-{i}"))
        .build()
        .ok()?;
    let p = Arc::new(p);
    pools.push((threads, Arc::clone(&p)));
    Some(p)
}

/// RMSNorm of each `w.len()`-wide row of `x`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let h = w.len();
    let mut out = vec![0f32; x.len()];
    for (xr, or) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
        let ms = dot(xr, xr) / h as f32;
        let r = 1.0 / (ms + eps).sqrt();
        for ((o, &v), &g) in or.iter_mut().zip(xr).zip(w) {
            *o = g * (v * r);
        }
    }
    out
}

#[inline]
fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// In-place softmax.
pub fn softmax(v: &mut [f32]) {
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for x in v.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    let inv = 1.0 / sum;
    for x in v.iter_mut() {
        *x *= inv;
    }
}

/// The `k` largest of `probs` (ties: lower index first), as `(index, weight)`
/// with weights renormalised to sum to one (Hugging Face Mixtral; the
/// other families' rule is [`super::family::top_k_weights`]).
pub fn top_k(probs: &[f32], k: usize) -> Vec<(usize, f32)> {
    super::family::top_k_weights(probs, k, true)
}

/// SwiGLU expert on `t` rows of `x` (`[t, hidden]`): `w2(silu(w1 x) * w3 x)`.
pub fn expert_forward(w: &ExpertWeights, x: &[f32], t: usize, threads: usize) -> Vec<f32> {
    let mut a = weight_matmul(x, t, &w.w1, threads);
    let b = weight_matmul(x, t, &w.w3, threads);
    for (a, b) in a.iter_mut().zip(&b) {
        *a = silu(*a) * b;
    }
    weight_matmul(&a, t, &w.w2, threads)
}

/// [`matmul`] for an expert matrix in any format: f32, or quantized (read
/// packed, one row expanded at a time).
pub fn weight_matmul(x: &[f32], t: usize, w: &Weight, threads: usize) -> Vec<f32> {
    match w {
        Weight::F32(m) => matmul(x, t, m, threads),
        Weight::Q(q) => super::quant::qmatmul(x, t, q, threads),
    }
}

impl CpuEngine {
    /// An engine from its shared weights and routers; it holds no expert
    /// until one is supplied.
    pub fn new(
        cfg: Config,
        shared: SharedWeights,
        routers: Vec<RouterWeights>,
    ) -> Result<Self, ModelError> {
        Self::from_shared(cfg, Arc::new(shared), routers.into())
    }

    /// [`CpuEngine::new`] over weights shared with other engines.
    pub fn from_shared(
        cfg: Config,
        shared: Arc<SharedWeights>,
        routers: Arc<[RouterWeights]>,
    ) -> Result<Self, ModelError> {
        check_weights(&cfg, &shared, &routers)?;
        let hd = cfg.head_dim();
        let theta = cfg.rope_theta() as f32;
        let inv_freq = (0..hd)
            .step_by(2)
            .map(|i| 1f32 / theta.powf(i as f32 / hd as f32))
            .collect();
        let layers = cfg.num_hidden_layers;
        Ok(Self {
            experts: (0..layers)
                .map(|_| vec![None; cfg.num_local_experts])
                .collect(),
            stats: RoutingStats::new(&cfg),
            cfg,
            shared,
            routers,
            k_cache: vec![Vec::new(); layers],
            v_cache: vec![Vec::new(); layers],
            pos: 0,
            inv_freq,
            threads: default_threads(),
            remote: false,
            last_experts: Vec::new(),
            pending: None,
        })
    }

    /// Another engine over the same weights (shared, not copied), holding
    /// the same experts, with the same threads and mode, an empty KV cache
    /// and fresh statistics.
    pub fn fork(&self) -> Self {
        let layers = self.cfg.num_hidden_layers;
        Self {
            cfg: self.cfg.clone(),
            shared: Arc::clone(&self.shared),
            routers: Arc::clone(&self.routers),
            experts: self.experts.clone(),
            k_cache: vec![Vec::new(); layers],
            v_cache: vec![Vec::new(); layers],
            pos: 0,
            inv_freq: self.inv_freq.clone(),
            stats: RoutingStats::new(&self.cfg),
            threads: self.threads,
            remote: self.remote,
            last_experts: Vec::new(),
            pending: None,
        }
    }

    /// Remote mode: a step no longer runs experts itself but pauses at each
    /// layer with [`Step::Compute`], one [`ExpertJob`] per routed expert
    /// (held or not), and resumes with their outputs
    /// ([`Engine::supply_output`]). The outputs are summed exactly as local
    /// outputs are, so outputs computed by
    /// [`expert_forward`] elsewhere give bit-identical results. A paused
    /// step keeps the mode it began with.
    pub fn set_remote_experts(&mut self, remote: bool) {
        self.remote = remote;
    }

    pub fn remote_experts(&self) -> bool {
        self.remote
    }

    /// Per layer, the experts (ascending) the last finished step routed at
    /// least one token to.
    pub fn last_step_experts(&self) -> &[Vec<usize>] {
        &self.last_experts
    }

    /// Threads for large products (1 in wasm).
    pub fn set_threads(&mut self, n: usize) {
        self.threads = if cfg!(target_arch = "wasm32") {
            1
        } else {
            n.max(1)
        };
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    pub fn routing_stats(&self) -> &RoutingStats {
        &self.stats
    }

    pub fn reset_stats(&mut self) {
        self.stats = RoutingStats::new(&self.cfg);
    }

    pub fn is_expert_loaded(&self, layer: usize, expert: usize) -> bool {
        matches!(
            self.experts.get(layer).and_then(|l| l.get(expert)),
            Some(Some(_))
        )
    }

    /// Drop a held expert (e.g. to bound memory); the next step that routes
    /// to it asks for it again.
    pub fn evict_expert(&mut self, id: ExpertId) -> bool {
        self.experts
            .get_mut(id.layer)
            .and_then(|l| l.get_mut(id.expert))
            .and_then(Option::take)
            .is_some()
    }

    /// Hold an expert (checked against the config); replaces a held one.
    pub fn insert_expert(&mut self, id: ExpertId, w: ExpertWeights) -> Result<(), ModelError> {
        self.insert_shared_expert(id, Arc::new(w))
    }

    /// [`CpuEngine::insert_expert`] of weights shared with other engines.
    pub fn insert_shared_expert(
        &mut self,
        id: ExpertId,
        w: Arc<ExpertWeights>,
    ) -> Result<(), ModelError> {
        super::Slot::Expert {
            layer: id.layer,
            expert: id.expert,
        }
        .check_in_spec(&self.cfg)?;
        check_expert(&self.cfg, &w).map_err(|e| ModelError::Source(format!("{id}: {e}")))?;
        self.stats.experts_loaded += 1;
        self.stats.expert_bytes_loaded += w.stored_bytes() as u64;
        self.experts[id.layer][id.expert] = Some(w);
        Ok(())
    }

    /// Start a step appending `tokens` (see [`Engine::step`]).
    pub fn step_now(
        &mut self,
        tokens: &[u32],
        opts: &RunOptions,
        want: Want,
    ) -> Result<Step, ModelError> {
        if self.pending.is_some() {
            return Err(ModelError::Input(
                "a step is paused for experts: resume or cancel it first".into(),
            ));
        }
        let k = opts.check_step(
            &self.cfg,
            self.pos,
            tokens,
            self.cfg.max_position_embeddings,
            "max_position_embeddings",
        )?;
        let h = self.cfg.hidden_size;
        let mut x = Vec::with_capacity(tokens.len() * h);
        for &tok in tokens {
            let r = tok as usize;
            x.extend_from_slice(&self.shared.embed_tokens.data[r * h..(r + 1) * h]);
        }
        self.pending = Some(Pending {
            tokens: tokens.to_vec(),
            k,
            use_moe: opts.use_moe,
            remote: self.remote,
            want,
            layer: 0,
            x,
            xn: Vec::new(),
            attn_done: false,
            assigned: None,
            outputs: Vec::new(),
            used: Vec::with_capacity(self.cfg.num_hidden_layers),
        });
        self.advance()
    }

    /// Continue a paused step (see [`Engine::resume`]).
    pub fn resume_now(&mut self) -> Result<Step, ModelError> {
        if self.pending.is_none() {
            return Err(ModelError::Input("no step is paused".into()));
        }
        self.advance()
    }

    /// Drop a paused step; the cache goes back to where the step began.
    pub fn cancel_step(&mut self) {
        if self.pending.take().is_some() {
            let kvd = self.cfg.kv_dim();
            for c in self.k_cache.iter_mut().chain(self.v_cache.iter_mut()) {
                c.truncate(self.pos * kvd);
            }
        }
    }

    fn advance(&mut self) -> Result<Step, ModelError> {
        let r = self.advance_pooled();
        if r.is_err() {
            self.cancel_step();
        }
        r
    }

    /// [`CpuEngine::advance_inner`]; natively, a step of several tokens
    /// with several threads runs inside the products' pool, so the
    /// thread that runs it takes part in every product (rayon's work
    /// stealing): a pool thread that other work on the machine holds up
    /// delays at most the piece it took, and the step's thread is not
    /// woken after every product. Decode steps stay on the calling thread.
    fn advance_pooled(&mut self) -> Result<Step, ModelError> {
        #[cfg(not(target_arch = "wasm32"))]
        if self.threads > 1 && self.pending.as_ref().is_some_and(|p| p.tokens.len() > 1) {
            if let Some(pool) = pool(self.threads) {
                return pool.install(|| self.advance_inner());
            }
        }
        self.advance_inner()
    }

    fn advance_inner(&mut self) -> Result<Step, ModelError> {
        let Some(mut p) = self.pending.take() else {
            return Err(ModelError::Input("no step is paused".into()));
        };
        let t = p.tokens.len();
        let eps = self.cfg.rms_norm_eps as f32;
        while p.layer < self.cfg.num_hidden_layers {
            let l = p.layer;
            if !p.attn_done {
                let xn = rms_norm(&p.x, &self.shared.layers[l].input_layernorm, eps);
                let attn = self.attention(l, &xn, t);
                for (a, b) in p.x.iter_mut().zip(&attn) {
                    *a += b;
                }
                p.xn = rms_norm(&p.x, &self.shared.layers[l].post_attention_layernorm, eps);
                p.attn_done = true;
            }
            let mut y = if p.remote {
                let assigned = match p.assigned.take() {
                    Some(a) => a,
                    None => self.route(l, &p.xn, t, p.k, p.use_moe),
                };
                let jobs = self.jobs_missing(l, &p.xn, &assigned, &p.outputs);
                if !jobs.is_empty() {
                    if p.outputs.is_empty() {
                        p.outputs = vec![None; assigned.len()];
                    }
                    p.assigned = Some(assigned);
                    self.pending = Some(p);
                    return Ok(Step::Compute(jobs));
                }
                let outputs = std::mem::take(&mut p.outputs);
                p.used.push(used_experts(&assigned));
                self.moe_remote(l, t, &assigned, outputs)?
            } else {
                let assigned = self.route(l, &p.xn, t, p.k, p.use_moe);
                let need: Vec<ExpertId> = assigned
                    .iter()
                    .enumerate()
                    .filter(|(e, toks)| !toks.is_empty() && self.experts[l][*e].is_none())
                    .map(|(e, _)| ExpertId::new(l, e))
                    .collect();
                if !need.is_empty() {
                    self.pending = Some(p);
                    return Ok(Step::Need(need));
                }
                p.used.push(used_experts(&assigned));
                self.moe(l, &p.xn, t, &assigned)?
            };
            if let Some(se) = &self.routers[l].shared_expert {
                super::family::add_shared_expert(se, &p.xn, t, self.threads, &mut y);
            }
            for (a, b) in p.x.iter_mut().zip(&y) {
                *a += b;
            }
            p.layer += 1;
            p.attn_done = false;
        }
        self.pos += t;
        self.stats.tokens += t as u64;
        self.last_experts = p.used;
        let h = self.cfg.hidden_size;
        Ok(Step::Done(match p.want {
            Want::AllLogits => {
                let v = self.cfg.vocab_size;
                let logits = self.head(&p.x, t);
                Output::AllLogits(logits.chunks_exact(v).map(<[f32]>::to_vec).collect())
            }
            Want::Logits | Want::Greedy => Output::Logits(self.head(&p.x[(t - 1) * h..], 1)),
        }))
    }

    fn head(&self, x: &[f32], t: usize) -> Vec<f32> {
        let xn = rms_norm(x, &self.shared.norm, self.cfg.rms_norm_eps as f32);
        let head = self
            .shared
            .lm_head
            .as_ref()
            .unwrap_or(&self.shared.embed_tokens);
        matmul(&xn, t, head, self.threads)
    }

    fn rope(&self, v: &mut [f32], heads: usize, pos: usize) {
        let hd = self.cfg.head_dim();
        let half = hd / 2;
        for (i, &f) in self.inv_freq.iter().enumerate() {
            let ang = pos as f32 * f;
            let (s, c) = ang.sin_cos();
            for hh in 0..heads {
                let base = hh * hd;
                let x1 = v[base + i];
                let x2 = v[base + i + half];
                v[base + i] = x1 * c - x2 * s;
                v[base + i + half] = x2 * c + x1 * s;
            }
        }
    }

    fn attention(&mut self, l: usize, xn: &[f32], t: usize) -> Vec<f32> {
        let cfg = &self.cfg;
        let la = &self.shared.layers[l];
        let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
        let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
        let mut q = matmul(xn, t, &la.q_proj, self.threads);
        let mut kk = matmul(xn, t, &la.k_proj, self.threads);
        let mut vv = matmul(xn, t, &la.v_proj, self.threads);
        super::family::prepare_qkv(cfg, &la.extras, &mut q, &mut kk, &mut vv);
        for ti in 0..t {
            let p = self.pos + ti;
            self.rope(&mut q[ti * qd..(ti + 1) * qd], nh, p);
            self.rope(&mut kk[ti * kvd..(ti + 1) * kvd], nkv, p);
        }
        self.k_cache[l].extend_from_slice(&kk);
        self.v_cache[l].extend_from_slice(&vv);
        let (kc, vc) = (&self.k_cache[l], &self.v_cache[l]);
        let group = nh / nkv;
        let scale = 1.0 / (hd as f32).sqrt();
        let mut out = vec![0f32; t * qd];
        let mut scores = Vec::with_capacity(self.pos + t);
        for ti in 0..t {
            let n = self.pos + ti + 1;
            for hh in 0..nh {
                let kvh = hh / group;
                let qv = &q[ti * qd + hh * hd..ti * qd + (hh + 1) * hd];
                scores.clear();
                for j in 0..n {
                    let kj = &kc[j * kvd + kvh * hd..j * kvd + (kvh + 1) * hd];
                    scores.push(dot(qv, kj) * scale);
                }
                softmax(&mut scores);
                let o = &mut out[ti * qd + hh * hd..ti * qd + (hh + 1) * hd];
                for (j, &p) in scores.iter().enumerate() {
                    let vj = &vc[j * kvd + kvh * hd..j * kvd + (kvh + 1) * hd];
                    for (a, &b) in o.iter_mut().zip(vj) {
                        *a += p * b;
                    }
                }
            }
        }
        matmul(&out, t, &la.o_proj, self.threads)
    }

    /// Router of layer `l`: per expert, the `(token, weight)` pairs it serves.
    fn route(
        &self,
        l: usize,
        xn: &[f32],
        t: usize,
        k: usize,
        use_moe: bool,
    ) -> Vec<Vec<(usize, f32)>> {
        let ne = self.cfg.num_local_experts;
        let mut probs = matmul(xn, t, &self.routers[l].gate, self.threads);
        let mut assigned: Vec<Vec<(usize, f32)>> = vec![Vec::new(); ne];
        let renormalize = self.cfg.renormalize_top_k();
        for (ti, row) in probs.chunks_exact_mut(ne).enumerate() {
            softmax(row);
            if use_moe {
                for (e, w) in super::family::top_k_weights(row, k, renormalize) {
                    assigned[e].push((ti, w));
                }
            } else {
                for (e, &w) in row.iter().enumerate() {
                    assigned[e].push((ti, w));
                }
            }
        }
        assigned
    }

    /// The weighted sum of the routed experts' outputs (all of them held).
    fn moe(
        &mut self,
        l: usize,
        xn: &[f32],
        t: usize,
        assigned: &[Vec<(usize, f32)>],
    ) -> Result<Vec<f32>, ModelError> {
        let h = self.cfg.hidden_size;
        let mut y = vec![0f32; t * h];
        for (e, toks) in assigned.iter().enumerate() {
            if toks.is_empty() {
                continue;
            }
            let Some(w) = self.experts[l][e].as_ref() else {
                return Err(ModelError::Source(format!(
                    "layer{l}.expert{e} is not held"
                )));
            };
            self.stats.tokens_routed[l][e] += toks.len() as u64;
            self.stats.expert_bytes_read += w.stored_bytes() as u64;
            let xs = gather(xn, h, toks);
            let out = expert_forward(w, &xs, toks.len(), self.threads);
            accumulate(&mut y, h, toks, &out);
        }
        Ok(y)
    }

    /// Remote mode: one job per routed expert of layer `l` whose output is
    /// not in yet.
    fn jobs_missing(
        &self,
        l: usize,
        xn: &[f32],
        assigned: &[Vec<(usize, f32)>],
        outputs: &[Option<Vec<f32>>],
    ) -> Vec<ExpertJob> {
        let h = self.cfg.hidden_size;
        assigned
            .iter()
            .enumerate()
            .filter(|(e, toks)| !toks.is_empty() && outputs.get(*e).is_none_or(Option::is_none))
            .map(|(e, toks)| ExpertJob {
                id: ExpertId::new(l, e),
                rows: toks.len(),
                input: gather(xn, h, toks),
            })
            .collect()
    }

    /// [`CpuEngine::moe`] over supplied outputs: the same sum, in the same order.
    fn moe_remote(
        &mut self,
        l: usize,
        t: usize,
        assigned: &[Vec<(usize, f32)>],
        outputs: Vec<Option<Vec<f32>>>,
    ) -> Result<Vec<f32>, ModelError> {
        let h = self.cfg.hidden_size;
        let mut y = vec![0f32; t * h];
        for ((e, toks), out) in assigned.iter().enumerate().zip(outputs) {
            if toks.is_empty() {
                continue;
            }
            let Some(out) = out else {
                return Err(ModelError::Source(format!(
                    "layer{l}.expert{e}: no output supplied"
                )));
            };
            self.stats.tokens_routed[l][e] += toks.len() as u64;
            accumulate(&mut y, h, toks, &out);
        }
        Ok(y)
    }

    /// Take the output of a job of the paused step (see
    /// [`Engine::supply_output`]).
    pub fn supply_expert_output(
        &mut self,
        id: ExpertId,
        output: Vec<f32>,
    ) -> Result<(), ModelError> {
        let h = self.cfg.hidden_size;
        let Some(p) = self.pending.as_mut() else {
            return Err(ModelError::Input(format!(
                "{id}: no step is paused for expert outputs"
            )));
        };
        let rows = match &p.assigned {
            Some(a) if id.layer == p.layer => a.get(id.expert).map_or(0, Vec::len),
            _ => 0,
        };
        if rows == 0 {
            return Err(ModelError::Input(format!("{id} was not asked for")));
        }
        if output.len() != rows * h {
            return Err(ModelError::Source(format!(
                "{id}: output has {} values, expected {rows} rows × {h}",
                output.len()
            )));
        }
        if let Some(i) = output.iter().position(|v| !v.is_finite()) {
            return Err(ModelError::Source(format!(
                "{id}: output value {i} is {}",
                output[i]
            )));
        }
        p.outputs[id.expert] = Some(output);
        Ok(())
    }
}

/// The rows of `xn` (`h` wide) of the tokens in `toks`, back to back.
fn gather(xn: &[f32], h: usize, toks: &[(usize, f32)]) -> Vec<f32> {
    let mut xs = Vec::with_capacity(toks.len() * h);
    for &(ti, _) in toks {
        xs.extend_from_slice(&xn[ti * h..(ti + 1) * h]);
    }
    xs
}

/// `y[token] += weight * out[row]` for each routed `(token, weight)`: the
/// one accumulation local and remote experts share.
fn accumulate(y: &mut [f32], h: usize, toks: &[(usize, f32)], out: &[f32]) {
    for (r, &(ti, wt)) in toks.iter().enumerate() {
        for (a, &b) in y[ti * h..(ti + 1) * h]
            .iter_mut()
            .zip(&out[r * h..(r + 1) * h])
        {
            *a += wt * b;
        }
    }
}

/// The experts (ascending) with at least one routed token.
fn used_experts(assigned: &[Vec<(usize, f32)>]) -> Vec<usize> {
    assigned
        .iter()
        .enumerate()
        .filter(|(_, toks)| !toks.is_empty())
        .map(|(e, _)| e)
        .collect()
}

impl Engine for CpuEngine {
    async fn step(
        &mut self,
        tokens: &[u32],
        opts: &RunOptions,
        want: Want,
    ) -> Result<Step, ModelError> {
        self.step_now(tokens, opts, want)
    }

    async fn resume(&mut self) -> Result<Step, ModelError> {
        self.resume_now()
    }

    fn supply_expert(&mut self, id: ExpertId, weights: ExpertWeights) -> Result<(), ModelError> {
        self.insert_expert(id, weights)
    }

    fn supply_output(&mut self, id: ExpertId, output: Vec<f32>) -> Result<(), ModelError> {
        self.supply_expert_output(id, output)
    }

    fn cancel(&mut self) {
        self.cancel_step();
    }

    fn reset(&mut self) {
        self.cancel_step();
        for c in self.k_cache.iter_mut().chain(self.v_cache.iter_mut()) {
            c.clear();
        }
        self.pos = 0;
    }

    fn position(&self) -> usize {
        self.pos
    }

    fn config(&self) -> &Config {
        &self.cfg
    }
}

impl CpuModel {
    /// A model from its shared weights and routers; experts come from `source`.
    pub fn new(
        cfg: Config,
        shared: SharedWeights,
        routers: Vec<RouterWeights>,
        source: impl ExpertSource + Send + 'static,
    ) -> Result<Self, ModelError> {
        Ok(Self {
            engine: CpuEngine::new(cfg, shared, routers)?,
            source: Box::new(source),
        })
    }

    /// A model over an in-memory whole checkpoint (works in wasm); experts
    /// are still converted only when first routed.
    pub fn from_safetensors(cfg: Config, bytes: impl Into<Arc<[u8]>>) -> Result<Self, ModelError> {
        let bytes: Arc<[u8]> = bytes.into();
        let shared = SharedWeights::from_safetensors(&cfg, &bytes)?;
        let routers = super::load::routers_from_safetensors(&cfg, &bytes)?;
        let source = BytesExpertSource::new(cfg.clone(), bytes)?;
        Self::new(cfg, shared, routers, source)
    }

    /// A model over a Hugging Face directory, experts read lazily from its file.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn from_model_dir(dir: &super::load::ModelDir) -> Result<Self, ModelError> {
        Self::new(
            dir.config.clone(),
            dir.shared.clone(),
            dir.routers.clone(),
            dir.expert_source()?,
        )
    }

    pub fn set_threads(&mut self, n: usize) {
        self.engine.set_threads(n);
    }

    pub fn threads(&self) -> usize {
        self.engine.threads()
    }

    pub fn routing_stats(&self) -> &RoutingStats {
        self.engine.routing_stats()
    }

    pub fn reset_stats(&mut self) {
        self.engine.reset_stats();
    }

    pub fn is_expert_loaded(&self, layer: usize, expert: usize) -> bool {
        self.engine.is_expert_loaded(layer, expert)
    }

    /// Put an expert in the cache (e.g. a new version), checking its shapes.
    pub fn insert_expert(
        &mut self,
        layer: usize,
        expert: usize,
        w: ExpertWeights,
    ) -> Result<(), ModelError> {
        self.engine.insert_expert(ExpertId::new(layer, expert), w)
    }

    /// Replace the expert source (held experts stay).
    pub fn set_source(&mut self, source: impl ExpertSource + Send + 'static) {
        self.source = Box::new(source);
    }

    /// Append `tokens` and return the logits of every one of them.
    pub fn forward_all_logits(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>, ModelError> {
        self.forward_all_logits_with(tokens, &RunOptions::default())
    }

    pub fn forward_all_logits_with(
        &mut self,
        tokens: &[u32],
        opts: &RunOptions,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        match self.run(tokens, opts, Want::AllLogits)? {
            Output::AllLogits(all) => Ok(all),
            _ => Err(ModelError::Input(
                "the engine gave no per-position logits".into(),
            )),
        }
    }
}

impl Forward for CpuModel {
    /// One step through [`run_step`], experts from the attached source.
    fn run(&mut self, tokens: &[u32], opts: &RunOptions, want: Want) -> Result<Output, ModelError> {
        now(run_step(
            &mut self.engine,
            &mut self.source,
            tokens,
            opts,
            want,
        ))
    }

    fn reset(&mut self) {
        Engine::reset(&mut self.engine);
    }

    fn position(&self) -> usize {
        self.engine.position()
    }

    fn config(&self) -> &Config {
        self.engine.config()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matmul_matches_naive_on_odd_shapes() {
        let mut rng = crate::model::sampler::SplitMix64::new(3);
        // Sizes around every block of the product: input widths that are
        // not a multiple of 16 (or shorter), batches that are not a
        // multiple of the tile's rows (or of the L1 block: 6 rows of 1000),
        // weight rows that are not a multiple of the tile's (or of the L2
        // block: 64 rows of 1000), one row either side.
        for &(out, inn, t) in &[
            (1, 1, 1),
            (7, 33, 3),
            (600, 517, 2),
            (5, 16, 1),
            (9, 40, 9),
            (1100, 1000, 5),
            (1, 300, 1),
            (300, 1, 1),
            (1, 37, 8),
            (3, 15, 4),
            (13, 24, 7),
            (131, 1000, 17),
            (6, 64, 6),
        ] {
            let w = Mat::new(
                out,
                inn,
                (0..out * inn).map(|_| rng.uniform_pm1()).collect(),
            )
            .unwrap();
            let x: Vec<f32> = (0..inn * t).map(|_| rng.uniform_pm1()).collect();
            for threads in [1, 2, 3] {
                let y = matmul(&x, t, &w, threads);
                for ti in 0..t {
                    for o in 0..out {
                        let naive: f64 = (0..inn)
                            .map(|i| w.data[o * inn + i] as f64 * x[ti * inn + i] as f64)
                            .sum();
                        assert!(
                            (y[ti * out + o] as f64 - naive).abs() < 1e-4,
                            "{out} {inn} {t}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn every_tile_shape_sums_as_dot_does_bitwise() {
        // The portable kernel (wasm's) without FMA sums each pair exactly
        // as `dot`; natively the vector kernel must agree with it too when
        // FMA is off, and within rounding when it is on.
        let mut rng = crate::model::sampler::SplitMix64::new(9);
        for &(out, inn, t) in &[(7, 45, 5), (2, 16, 3), (9, 3, 4), (5, 130, 1), (4, 0, 2)] {
            let w: Vec<f32> = (0..out * inn).map(|_| rng.uniform_pm1()).collect();
            let x: Vec<f32> = (0..inn * t).map(|_| rng.uniform_pm1()).collect();
            let mut got = vec![f32::NAN; out * t];
            block_product(PortableTiles::<false>, &w, inn, &x, t, &mut got);
            for o in 0..out {
                for ti in 0..t {
                    let d = dot(&w[o * inn..(o + 1) * inn], &x[ti * inn..(ti + 1) * inn]);
                    assert_eq!(got[o * t + ti].to_bits(), d.to_bits(), "{out} {inn} {t}");
                }
            }
            #[cfg(not(target_arch = "wasm32"))]
            {
                struct Both<'a>(&'a [f32], usize, &'a [f32], usize, &'a [f32]);
                impl pulp::WithSimd for Both<'_> {
                    type Output = ();
                    fn with_simd<S: pulp::Simd>(self, simd: S) {
                        let Both(w, inn, x, t, want) = self;
                        let mut y = vec![f32::NAN; want.len()];
                        block_product(SimdTiles::<S, false>(simd), w, inn, x, t, &mut y);
                        assert_eq!(y, want);
                        block_product(SimdTiles::<S, true>(simd), w, inn, x, t, &mut y);
                        for (a, b) in y.iter().zip(want) {
                            assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} {b}");
                        }
                    }
                }
                pulp::Arch::new().dispatch(Both(&w, inn, &x, t, &got));
            }
        }
    }

    #[test]
    fn batched_products_equal_one_row_at_a_time_bitwise() {
        let mut rng = crate::model::sampler::SplitMix64::new(5);
        let (out, inn, t) = (1030, 1037, 7);
        let w = Mat::new(
            out,
            inn,
            (0..out * inn).map(|_| rng.uniform_pm1()).collect(),
        )
        .unwrap();
        let x: Vec<f32> = (0..inn * t).map(|_| rng.uniform_pm1()).collect();
        let all = matmul(&x, t, &w, 1);
        assert_eq!(all, matmul(&x, t, &w, 3));
        for ti in 0..t {
            let one = matmul(&x[ti * inn..(ti + 1) * inn], 1, &w, 1);
            assert_eq!(one[..], all[ti * out..(ti + 1) * out]);
        }
    }

    use crate::model::generate::generate_async;
    use crate::model::load::BytesExpertSource;
    use crate::model::random::{random_model_bytes, tiny_config};
    use crate::model::sampler::Sampler;
    use crate::model::tokenizer::Tokenizer;
    use crate::model::Supply;

    /// Computes expert outputs "elsewhere": its own copy of the weights,
    /// one thread (the engine uses several), counting the jobs it ran.
    struct Elsewhere {
        source: BytesExpertSource,
        jobs: Vec<(ExpertId, usize)>,
    }

    impl Supply for Elsewhere {
        async fn experts(
            &mut self,
            need: &[ExpertId],
        ) -> Result<Vec<(ExpertId, ExpertWeights)>, ModelError> {
            Err(ModelError::Source(format!(
                "remote mode asked for weights {need:?}"
            )))
        }
        async fn compute(
            &mut self,
            jobs: Vec<ExpertJob>,
        ) -> Result<Vec<(ExpertId, Vec<f32>)>, ModelError> {
            let mut out = Vec::new();
            for j in jobs {
                self.jobs.push((j.id, j.rows));
                let w = self.source.load_expert(j.id.layer, j.id.expert)?;
                out.push((j.id, expert_forward(&w, &j.input, j.rows, 1)));
            }
            Ok(out)
        }
    }

    fn tiny() -> (CpuModel, Elsewhere, Tokenizer) {
        let m = random_model_bytes(&tiny_config(), 11).unwrap();
        let model = CpuModel::from_safetensors(tiny_config(), m.safetensors.clone()).unwrap();
        let source = BytesExpertSource::new(tiny_config(), m.safetensors).unwrap();
        let tok = Tokenizer::from_bytes(&m.tokenizer_json).unwrap();
        (
            model,
            Elsewhere {
                source,
                jobs: Vec::new(),
            },
            tok,
        )
    }

    #[test]
    fn remote_expert_outputs_equal_local_computation_bitwise() {
        let (mut local, mut elsewhere, tok) = tiny();
        let mut remote = local.engine.fork();
        remote.set_remote_experts(true);
        assert!(remote.remote_experts() && !local.engine.remote_experts());
        let prompt: Vec<u32> = vec![3, 17, 42, 5, 99, 7];
        for opts in [
            RunOptions::default(),
            RunOptions {
                top_k: Some(3),
                use_moe: true,
            },
            RunOptions {
                top_k: None,
                use_moe: false,
            },
        ] {
            // Every position's logits, then a greedy generation.
            local.reset();
            Engine::reset(&mut remote);
            let a = local.forward_all_logits_with(&prompt, &opts).unwrap();
            let b = now(run_step(
                &mut remote,
                &mut elsewhere,
                &prompt,
                &opts,
                Want::AllLogits,
            ))
            .unwrap();
            assert_eq!(Output::AllLogits(a), b, "{opts:?}");
            assert_eq!(
                local.engine.last_step_experts(),
                remote.last_step_experts(),
                "{opts:?}"
            );
            assert_eq!(
                remote.last_step_experts().len(),
                tiny_config().num_hidden_layers
            );

            let mut s = Sampler::greedy();
            let want = crate::model::generate::generate_from_ids(
                &mut local,
                &tok,
                prompt.clone(),
                12,
                &mut s,
                &opts,
                |_, _| true,
            )
            .unwrap();
            elsewhere.jobs.clear();
            let mut s = Sampler::greedy();
            let got = now(generate_async(
                &mut remote,
                &mut elsewhere,
                &tok,
                prompt.clone(),
                12,
                &mut s,
                &opts,
                |_, _| true,
            ))
            .unwrap();
            assert!(!want.tokens.is_empty());
            assert_eq!(got.tokens, want.tokens, "{opts:?}");
            // One job per routed expert per layer per step; none held here.
            assert!(!elsewhere.jobs.is_empty());
            let per_tok = opts.experts_per_token(&tiny_config()).unwrap();
            let rows: usize = elsewhere.jobs.iter().map(|j| j.1).sum();
            let layers = tiny_config().num_hidden_layers;
            assert_eq!(
                rows,
                (prompt.len() + got.tokens.len() - 1) * layers * per_tok,
                "{opts:?}"
            );
        }
        assert_eq!(remote.routing_stats().experts_loaded, 0);
    }

    #[test]
    fn expert_outputs_are_checked_and_cancel_keeps_the_cache() {
        // The source's own compute (the default of an ExpertSource).
        let (local, elsewhere, _) = tiny();
        let src = &mut elsewhere.source.clone();
        let mut e = local.engine.fork();
        e.set_remote_experts(true);
        let h = tiny_config().hidden_size;
        let opts = RunOptions::default();
        now(run_step(&mut e, src, &[1, 2], &opts, Want::Logits)).unwrap();
        assert_eq!(e.position(), 2);

        let Step::Compute(jobs) = e.step_now(&[4, 5, 6], &opts, Want::Logits).unwrap() else {
            panic!("remote mode must ask for outputs");
        };
        assert!(jobs
            .iter()
            .all(|j| j.id.layer == 0 && j.input.len() == j.rows * h));
        assert!(jobs.windows(2).all(|w| w[0].id < w[1].id));
        let j = &jobs[0];
        let not_routed = (0..tiny_config().num_local_experts)
            .find(|x| jobs.iter().all(|j| j.id.expert != *x))
            .unwrap();
        for (id, out) in [
            (j.id, vec![0.0; j.rows * h + 1]),
            (j.id, {
                let mut v = vec![0.0; j.rows * h];
                v[3] = f32::NAN;
                v
            }),
            (ExpertId::new(0, not_routed), vec![0.0; h]),
            (ExpertId::new(1, j.id.expert), vec![0.0; j.rows * h]),
        ] {
            assert!(e.supply_output(id, out).is_err(), "{id}");
        }
        // Only some outputs: resume asks again for the rest.
        e.supply_output(j.id, vec![0.5; j.rows * h]).unwrap();
        match e.resume_now().unwrap() {
            Step::Compute(again) => {
                assert_eq!(again, jobs[1..].to_vec());
            }
            other => panic!("{other:?}"),
        }
        e.cancel();
        assert_eq!(e.position(), 2);
        assert!(e.supply_output(j.id, vec![0.5; j.rows * h]).is_err());

        // The same tokens again, computed properly, equal a local run.
        let mut l = local.engine.fork();
        now(run_step(&mut l, src, &[1, 2], &opts, Want::Logits)).unwrap();
        let a = now(run_step(&mut l, src, &[4, 5, 6], &opts, Want::Logits)).unwrap();
        let b = now(run_step(&mut e, src, &[4, 5, 6], &opts, Want::Logits)).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn a_supply_that_skips_a_job_or_computes_nothing_fails_the_step() {
        struct Skips;
        impl Supply for Skips {
            async fn experts(
                &mut self,
                _: &[ExpertId],
            ) -> Result<Vec<(ExpertId, ExpertWeights)>, ModelError> {
                Ok(Vec::new())
            }
            async fn compute(
                &mut self,
                _: Vec<ExpertJob>,
            ) -> Result<Vec<(ExpertId, Vec<f32>)>, ModelError> {
                Ok(Vec::new())
            }
        }
        struct Default_;
        impl Supply for Default_ {
            async fn experts(
                &mut self,
                _: &[ExpertId],
            ) -> Result<Vec<(ExpertId, ExpertWeights)>, ModelError> {
                Ok(Vec::new())
            }
        }
        let (local, _, _) = tiny();
        let mut e = local.engine.fork();
        e.set_remote_experts(true);
        let opts = RunOptions::default();
        let err = now(run_step(&mut e, &mut Skips, &[1, 2], &opts, Want::Logits)).unwrap_err();
        assert!(err.to_string().contains("no output for"), "{err}");
        assert_eq!((e.position(), e.pending.is_some()), (0, false));
        let err = now(run_step(
            &mut e,
            &mut Default_,
            &[1, 2],
            &opts,
            Want::Logits,
        ))
        .unwrap_err();
        assert!(
            err.to_string().contains("runs no expert computations"),
            "{err}"
        );
        assert_eq!((e.position(), e.pending.is_some()), (0, false));
    }

    #[test]
    fn fork_shares_weights_and_starts_empty() {
        let (mut local, _, _) = tiny();
        local.forward(&[1, 2, 3], &RunOptions::default()).unwrap();
        let f = local.engine.fork();
        assert_eq!(f.position(), 0);
        assert!(Arc::ptr_eq(&f.shared, &local.engine.shared));
        assert_eq!(f.routing_stats().tokens, 0);
        let held = local.engine.routing_stats().routed();
        assert!(!held.is_empty());
        for (l, x, _) in held {
            assert!(f.is_expert_loaded(l, x));
            let (a, b) = (&f.experts[l][x], &local.engine.experts[l][x]);
            assert!(Arc::ptr_eq(a.as_ref().unwrap(), b.as_ref().unwrap()));
        }
    }

    #[test]
    fn top_k_renormalises_and_breaks_ties_low_first() {
        let got = top_k(&[0.1, 0.3, 0.3, 0.2, 0.1], 2);
        assert_eq!(got.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2]);
        assert!((got[0].1 - 0.5).abs() < 1e-6);
    }
}
