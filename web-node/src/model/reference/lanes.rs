//! The native product of several input rows (prefill): vectors run across
//! input rows, not along `k`, so no result needs a horizontal sum, and each
//! weight is broadcast once for every input row of a tile.
//!
//! Every result is still summed exactly in [`super::dot`]'s order: 16
//! partial sums, partial `l` over `k = l, l + 16, l + 32, …` (one multiply-add
//! after another), combined by [`super::reduce16`]'s tree, then the products
//! of the tail (`k` past the last full 16) one after another. So a row's
//! result is bit-identical whether it comes from here, from the one-row
//! (decode) product or from the wasm kernel without FMA, and it depends
//! neither on the batch nor on the blocks nor on the thread split.
//!
//! To keep that order the tile runs 16 *passes*, pass `l` over the `k`
//! of lane `l`, each from its own accumulators; the 16 partials meet in the
//! tree at the end (vertically, for a whole vector of input rows at once).
//!
//! Layout: the input rows are packed once per product ([`PackedRows`]) in
//! blocks of [`BLOCK_T`] rows: within a block, for pass `l`, the rows'
//! values at `k = 16 kk + l` for `kk = 0, 1, …`, [`BLOCK_T`] floats (one per
//! row) each, so a pass reads its inputs as consecutive vectors; then the
//! tail, `BLOCK_T` floats per `k`. A tile is `TV` vectors of input rows
//! (a block's first `TV × lanes` rows) × `TO` weight rows, `TV × TO`
//! accumulators in registers; the weights are read in place (one broadcast
//! per weight row and step), in `k`-blocks that stay in L1 through the 16
//! passes, the partials of unfinished passes kept on the stack between
//! `k`-blocks.

use super::{block_product, W_BLOCK_BYTES};

/// Input rows per packed block: the widest tile (one AVX-512 vector, two
/// AVX2 vectors, four NEON vectors).
pub(crate) const BLOCK_T: usize = 16;

/// Batches of fewer input rows take the dot-product tiles (a vector across
/// input rows would be mostly empty).
pub(crate) const PACK_MIN_T: usize = 4;

/// Bytes of a tile's weight rows within one `k`-block: they are read 16
/// times (once per pass), so they must stay in L1.
const W_TILE_BYTES: usize = 16 << 10;

/// Input rows packed for the lane product (see the module docs); keeps the
/// rows as given too, for kernels without a lane product.
pub(crate) struct PackedRows<'a> {
    pub(crate) x: &'a [f32],
    pub(crate) t: usize,
    n: usize,
    data: Vec<f32>,
}

impl<'a> PackedRows<'a> {
    /// Pack the `t` rows of `x` (each `n` wide).
    pub(crate) fn new(x: &'a [f32], t: usize, n: usize) -> Self {
        let full = n - n % 16;
        let nk = full / 16;
        let blocks = t.div_ceil(BLOCK_T);
        let mut data = vec![0f32; blocks * BLOCK_T * n];
        for (b, block) in data.chunks_exact_mut((BLOCK_T * n).max(1)).enumerate() {
            let rows = (t - b * BLOCK_T).min(BLOCK_T);
            for r in 0..rows {
                let row = &x[(b * BLOCK_T + r) * n..][..n];
                for (kk, c) in row[..full].chunks_exact(16).enumerate() {
                    for (l, &v) in c.iter().enumerate() {
                        block[(l * nk + kk) * BLOCK_T + r] = v;
                    }
                }
                for (kt, &v) in row[full..].iter().enumerate() {
                    block[(full + kt) * BLOCK_T + r] = v;
                }
            }
        }
        Self { x, t, n, data }
    }

    fn block(&self, b: usize) -> &[f32] {
        let len = BLOCK_T * self.n;
        &self.data[b * len..(b + 1) * len]
    }
}

/// The packed input for a product of `t` rows (each `n` wide), when the
/// lane product takes it: natively on a vector level of 4, 8 or 16 lanes,
/// at least [`PACK_MIN_T`] rows.
pub(crate) fn packed_input(x: &[f32], t: usize, n: usize) -> Option<PackedRows<'_>> {
    struct Lanes;
    impl pulp::WithSimd for Lanes {
        type Output = bool;
        #[inline(always)]
        fn with_simd<S: pulp::Simd>(self, _: S) -> bool {
            has_lanes::<S>()
        }
    }
    (t >= PACK_MIN_T && pulp::Arch::new().dispatch(Lanes)).then(|| PackedRows::new(x, t, n))
}

/// Whether [`lanes_product`] runs on this vector level.
#[inline(always)]
pub(crate) fn has_lanes<S: pulp::Simd>() -> bool {
    matches!(S::F32_LANES, 4 | 8 | 16)
}

/// `a * b + c`, fused when `FMA`, lane by lane.
#[inline(always)]
fn madd<S: pulp::Simd, const FMA: bool>(simd: S, a: S::f32s, b: S::f32s, c: S::f32s) -> S::f32s {
    if FMA {
        simd.mul_add_e_f32s(a, b, c)
    } else {
        simd.add_f32s(simd.mul_f32s(a, b), c)
    }
}

/// The weight rows of `w` (each `n` wide, back to back) against the packed
/// rows, into `out` (`[w rows, t]`, out-major). Falls back to the
/// dot-product tiles on a level without lanes.
#[inline(always)]
pub(crate) fn lanes_product<S: pulp::Simd, const FMA: bool>(
    simd: S,
    w: &[f32],
    n: usize,
    px: &PackedRows<'_>,
    out: &mut [f32],
) {
    let t = px.t;
    if t == 0 || out.is_empty() {
        return;
    }
    if !has_lanes::<S>() || n != px.n {
        block_product(super::SimdTiles::<S, FMA>(simd), w, n, px.x, t, out);
        return;
    }
    let rows = out.len() / t;
    // Weight rows in L2-sized blocks (a multiple of every tile's rows),
    // each passed by every block of input rows.
    let o_block = (W_BLOCK_BYTES / (4 * n.max(1)) / 24 * 24).max(24);
    let mut o0 = 0;
    while o0 < rows {
        let o1 = (o0 + o_block).min(rows);
        for b in 0..t.div_ceil(BLOCK_T) {
            let valid = (t - b * BLOCK_T).min(BLOCK_T);
            let tv = valid.div_ceil(S::F32_LANES);
            let blk = Block {
                w,
                n,
                xb: px.block(b),
                t,
                t0: b * BLOCK_T,
                valid,
            };
            match (S::F32_LANES, tv) {
                // AVX2: 16 registers.
                (8, 1) => blk.rows::<S, FMA, 1, 12>(simd, o0, o1, out),
                (8, _) => blk.rows::<S, FMA, 2, 6>(simd, o0, o1, out),
                // AVX-512: 32 registers.
                (16, _) => blk.rows::<S, FMA, 1, 12>(simd, o0, o1, out),
                // NEON: 32 registers.
                (4, 1) => blk.rows::<S, FMA, 1, 12>(simd, o0, o1, out),
                (4, 2) => blk.rows::<S, FMA, 2, 8>(simd, o0, o1, out),
                _ => blk.rows::<S, FMA, 4, 6>(simd, o0, o1, out),
            }
        }
        o0 = o1;
    }
}

/// One packed block of input rows against weight rows.
struct Block<'a> {
    w: &'a [f32],
    n: usize,
    /// The packed block ([`PackedRows::block`]).
    xb: &'a [f32],
    t: usize,
    /// Its first input row, and how many of its rows are real.
    t0: usize,
    valid: usize,
}

impl Block<'_> {
    /// Weight rows `o0..o1`: tiles of `TO` rows, the rest in tiles of 4,
    /// 2 and 1 (fewer accumulators hide less of the multiply-add latency).
    #[inline(always)]
    fn rows<S: pulp::Simd, const FMA: bool, const TV: usize, const TO: usize>(
        &self,
        simd: S,
        o0: usize,
        o1: usize,
        out: &mut [f32],
    ) {
        let mut o = o0;
        while o + TO <= o1 {
            let r = self.tile::<S, FMA, TV, TO>(simd, o);
            self.store(&r, o, out);
            o += TO;
        }
        while o + 4 <= o1 {
            let r = self.tile::<S, FMA, TV, 4>(simd, o);
            self.store(&r, o, out);
            o += 4;
        }
        while o + 2 <= o1 {
            let r = self.tile::<S, FMA, TV, 2>(simd, o);
            self.store(&r, o, out);
            o += 2;
        }
        if o < o1 {
            let r = self.tile::<S, FMA, TV, 1>(simd, o);
            self.store(&r, o, out);
        }
    }

    /// The real lanes of a tile's results into `out` (`[rows, t]`).
    #[inline(always)]
    fn store<V: bytemuck::Pod, const TV: usize, const TO: usize>(
        &self,
        r: &[[V; TV]; TO],
        o: usize,
        out: &mut [f32],
    ) {
        let t = self.t;
        for (j, rj) in r.iter().enumerate() {
            let lanes: &[f32] = bytemuck::cast_slice(rj);
            let dst = &mut out[(o + j) * t + self.t0..][..self.valid.min(lanes.len())];
            dst.copy_from_slice(&lanes[..dst.len()]);
        }
    }

    /// Weight rows `o..o + TO` against the block's first `TV` vectors of
    /// input rows, summed in [`super::dot`]'s order (module docs).
    #[inline(always)]
    fn tile<S: pulp::Simd, const FMA: bool, const TV: usize, const TO: usize>(
        &self,
        simd: S,
        o: usize,
    ) -> [[S::f32s; TV]; TO] {
        let n = self.n;
        let full = n - n % 16;
        let nk = full / 16;
        // Vectors per packed row of the block.
        let vpr = BLOCK_T / S::F32_LANES;
        let xs = S::as_simd_f32s(self.xb).0;
        let w: [&[f32]; TO] = std::array::from_fn(|j| &self.w[(o + j) * n..][..n]);
        let zero = simd.splat_f32s(0.0);
        let mut part = [[[zero; TV]; TO]; 16];
        // Steps (of 16 `k`) per `k`-block: its weights stay in L1.
        let kb = (W_TILE_BYTES / (TO * 64)).max(1);
        let mut k0 = 0;
        while k0 < nk {
            let k1 = (k0 + kb).min(nk);
            for (l, p) in part.iter_mut().enumerate() {
                let mut acc = *p;
                let xl = &xs[(l * nk + k0) * vpr..(l * nk + k1) * vpr];
                for (i, xr) in xl.chunks_exact(vpr).enumerate() {
                    let k = (k0 + i) * 16 + l;
                    for j in 0..TO {
                        let b = simd.splat_f32s(w[j][k]);
                        for v in 0..TV {
                            acc[j][v] = madd::<S, FMA>(simd, b, xr[v], acc[j][v]);
                        }
                    }
                }
                *p = acc;
            }
            k0 = k1;
        }
        // The 16 partials meet as in `super::reduce16`, then the tail.
        let add = |a, b| simd.add_f32s(a, b);
        let mut r = [[zero; TV]; TO];
        for j in 0..TO {
            for v in 0..TV {
                let s8: [S::f32s; 8] =
                    std::array::from_fn(|i| add(part[i][j][v], part[i + 8][j][v]));
                let s4: [S::f32s; 4] = std::array::from_fn(|i| add(s8[i], s8[i + 4]));
                r[j][v] = add(add(s4[0], s4[2]), add(s4[1], s4[3]));
            }
        }
        let tail = &xs[full * vpr..];
        for (kt, xr) in tail.chunks_exact(vpr).take(n - full).enumerate() {
            for j in 0..TO {
                let b = simd.splat_f32s(w[j][full + kt]);
                for v in 0..TV {
                    r[j][v] = madd::<S, FMA>(simd, b, xr[v], r[j][v]);
                }
            }
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::super::{dot_k, matmul, Mat, SimdTiles, Tiles};
    use super::*;
    use proptest::prelude::*;

    /// The lane product of every vector level pulp dispatches to here, with
    /// and without FMA, against `dot_k` of each pair (bitwise) and against
    /// an f64 sum.
    fn check(out: usize, n: usize, t: usize, seed: u64) {
        struct Run<'a>(&'a [f32], usize, &'a PackedRows<'a>, usize);
        impl pulp::WithSimd for Run<'_> {
            type Output = (bool, Vec<f32>, Vec<f32>);
            fn with_simd<S: pulp::Simd>(self, simd: S) -> Self::Output {
                let Run(w, n, px, out) = self;
                let mut plain = vec![f32::NAN; out * px.t];
                let mut fused = vec![f32::NAN; out * px.t];
                SimdTiles::<S, false>(simd).packed(w, n, px, &mut plain);
                SimdTiles::<S, true>(simd).packed(w, n, px, &mut fused);
                (has_lanes::<S>(), plain, fused)
            }
        }
        let mut rng = crate::model::sampler::SplitMix64::new(seed);
        let w: Vec<f32> = (0..out * n).map(|_| rng.uniform_pm1()).collect();
        let x: Vec<f32> = (0..n * t).map(|_| rng.uniform_pm1()).collect();
        let px = PackedRows::new(&x, t, n);
        let (lanes, plain, fused) = pulp::Arch::new().dispatch(Run(&w, n, &px, out));
        for o in 0..out {
            let wr = &w[o * n..(o + 1) * n];
            for ti in 0..t {
                let xr = &x[ti * n..(ti + 1) * n];
                let at = o * t + ti;
                let shape = format!("out {out} n {n} t {t} (o {o}, t {ti}, lanes {lanes})");
                assert_eq!(
                    plain[at].to_bits(),
                    dot_k::<false>(wr, xr).to_bits(),
                    "{shape}"
                );
                assert_eq!(
                    fused[at].to_bits(),
                    dot_k::<true>(wr, xr).to_bits(),
                    "{shape}"
                );
                let exact: f64 = wr.iter().zip(xr).map(|(a, b)| *a as f64 * *b as f64).sum();
                assert!((plain[at] as f64 - exact).abs() < 1e-4, "{shape}");
            }
        }
    }

    #[test]
    fn lane_product_sums_as_dot_on_edge_shapes() {
        // Widths below, at and past 16 and the `k`-blocks of every tile
        // (12 rows: 21 steps of 16); rows around every tile (12, 6, 4, 2,
        // 1) and the L2 block; batches around a vector (8), a block (16)
        // and several blocks.
        for (i, &(out, n, t)) in [
            (1, 1, 4),
            (13, 15, 5),
            (12, 16, 8),
            (7, 17, 9),
            (25, 350, 16),
            (6, 700, 17),
            (31, 33, 33),
            (3, 0, 6),
            (600, 520, 7),
        ]
        .iter()
        .enumerate()
        {
            check(out, n, t, i as u64);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn lane_product_sums_as_dot(out in 1usize..40, n in 0usize..90, t in 1usize..40, seed in any::<u64>()) {
            check(out, n, t, seed);
        }

        /// Through `matmul` (packing, thread split, transposition): every
        /// row equals its one-row product bitwise.
        #[test]
        fn matmul_rows_equal_one_row_products(out in 1usize..30, n in 1usize..70, t in 1usize..24, threads in 1usize..4, seed in any::<u64>()) {
            let mut rng = crate::model::sampler::SplitMix64::new(seed);
            let w = Mat::new(out, n, (0..out * n).map(|_| rng.uniform_pm1()).collect()).unwrap();
            let x: Vec<f32> = (0..n * t).map(|_| rng.uniform_pm1()).collect();
            let all = matmul(&x, t, &w, threads);
            for ti in 0..t {
                let one = matmul(&x[ti * n..(ti + 1) * n], 1, &w, 1);
                prop_assert_eq!(&one[..], &all[ti * out..(ti + 1) * out]);
            }
        }
    }
}
