//! Every kernel against its CPU reference on lavapipe (or whatever adapter
//! the environment picks), on proptest shapes: odd sizes, sizes that are not
//! a multiple of the workgroup, one row, one column.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::gpu_support as common;

use common::{assert_close, ctx};
use proptest::prelude::*;
use web_node::gpu::kernel::{rmsnorm_ref, round_f16};
use web_node::gpu::{
    add, argmax, attention, embedding, expert, family, matvec, qkv_rope, rmsnorm, router,
    GpuContext, PoolFormat, WeightFormat,
};
use web_node::model::quant::{qmatmul, quantize_expert, QMat};
use web_node::model::{ExpertWeights, Mat, QkNorm, Weight};
use web_node::spec::quant::QuantFormat;

const CASES: u32 = 16;

fn vals(n: usize, seed: u64) -> Vec<f32> {
    // Small deterministic pseudo-random values in [-1, 1).
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn block<T>(f: impl std::future::Future<Output = T>) -> T {
    pollster::block_on(f)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, ..ProptestConfig::default() })]

    #[test]
    fn matvec_matches_reference(rows in 1usize..150, cols in 1usize..150, n in 1usize..4, flags in 0u32..4, seed: u64) {
        let Some(c) = ctx() else { return Ok(()) };
        let w = vals(rows * cols, seed);
        let x = vals(n * cols, seed ^ 1);
        let g = vals(cols, seed ^ 2);
        let y0 = vals(n * rows, seed ^ 3);
        let gn = (flags & 2 != 0).then_some(&g[..]);
        let acc = (flags & 1 != 0).then_some(&y0[..]);
        let gpu = block(matvec::run(c, &w, rows, cols, &x, n, gn, 1e-5, acc)).unwrap();
        let cpu = matvec::reference(&w, rows, cols, &x, n, gn, 1e-5, acc);
        assert_close(&gpu, &cpu, 1e-5, "matvec");
    }

    #[test]
    fn rmsnorm_matches_reference(cols in 1usize..200, n in 1usize..4, seed: u64) {
        let Some(c) = ctx() else { return Ok(()) };
        let x = vals(n * cols, seed);
        let g = vals(cols, seed ^ 9);
        let gpu = block(rmsnorm::run(c, &x, cols, &g, 1e-6)).unwrap();
        assert_close(&gpu, &rmsnorm::reference(&x, cols, &g, 1e-6), 1e-5, "rmsnorm");
    }

    #[test]
    fn add_matches_reference(len in 1usize..500, seed: u64) {
        let Some(c) = ctx() else { return Ok(()) };
        let a = vals(len, seed);
        let b = vals(len, seed ^ 5);
        let gpu = block(add::run(c, &a, &b)).unwrap();
        assert_eq!(gpu, add::reference(&a, &b));
    }

    #[test]
    fn embedding_matches_reference(vocab in 1usize..70, hidden in 1usize..70, n in 1usize..6, seed: u64) {
        let Some(c) = ctx() else { return Ok(()) };
        let table = vals(vocab * hidden, seed);
        let tokens: Vec<u32> = (0..n).map(|i| ((seed as usize + i * 7) % vocab) as u32).collect();
        let gpu = block(embedding::run(c, &table, vocab, hidden, &tokens)).unwrap();
        assert_eq!(gpu, embedding::reference(&table, hidden, &tokens));
    }

    #[test]
    fn argmax_matches_reference(len in 1usize..3000, seed: u64, dup in any::<bool>()) {
        let Some(c) = ctx() else { return Ok(()) };
        let mut v = vals(len, seed);
        if dup && len > 2 {
            // A tie between two positions: the lower index must win.
            let m = v.iter().copied().fold(f32::MIN, f32::max);
            v[len / 2] = m;
            v[len - 1] = m;
        }
        let gpu = block(argmax::run(c, &v)).unwrap();
        assert_eq!(gpu, argmax::reference(&v));
    }

    #[test]
    fn qkv_rope_matches_reference(hidden in 1usize..40, half in 1usize..6, n_kv in 1usize..3, group in 1usize..3, n in 1usize..4, pos0 in 0usize..5, seed: u64) {
        let Some(c) = ctx() else { return Ok(()) };
        let s = qkv_rope::QkvShape { hidden, n_heads: n_kv * group, n_kv, head_dim: 2 * half, eps: 1e-5 };
        let qd = s.n_heads * s.head_dim;
        let kvd = n_kv * s.head_dim;
        let wq = vals(qd * hidden, seed);
        let wk = vals(kvd * hidden, seed ^ 1);
        let wv = vals(kvd * hidden, seed ^ 2);
        let x = vals(n * hidden, seed ^ 3);
        let g = vals(hidden, seed ^ 4);
        let table = qkv_rope::rope_table(s.head_dim, 10000.0, pos0 + n);
        let (q, k, v) = block(qkv_rope::run(c, &s, &wq, &wk, &wv, &x, &g, &table, pos0)).unwrap();
        let (rq, rk, rv) = qkv_rope::reference(&s, &wq, &wk, &wv, &x, &g, &table, pos0);
        assert_close(&q, &rq, 1e-5, "q");
        assert_close(&k, &rk, 1e-5, "k");
        assert_close(&v, &rv, 1e-5, "v");
    }

    #[test]
    fn attention_matches_reference(half in 1usize..9, n_kv in 1usize..3, group in 1usize..4, n in 1usize..4, pos0 in 0usize..80, seed: u64) {
        let Some(c) = ctx() else { return Ok(()) };
        let hd = 2 * half;
        let nh = n_kv * group;
        let total = pos0 + n;
        let q = vals(n * nh * hd, seed);
        let k = vals(total * n_kv * hd, seed ^ 1);
        let v = vals(total * n_kv * hd, seed ^ 2);
        let gpu = block(attention::run(c, &q, &k, &v, nh, n_kv, hd, pos0)).unwrap();
        let cpu = attention::reference(&q, &k, &v, nh, n_kv, hd, pos0);
        assert_close(&gpu, &cpu, 1e-5, "attention");
    }

    #[test]
    fn router_matches_reference(ne in 1usize..12, hidden in 1usize..60, n in 1usize..5, kk in 1usize..12, renorm in any::<bool>(), seed: u64) {
        let Some(c) = ctx() else { return Ok(()) };
        let k = kk.min(ne);
        let gate = vals(ne * hidden, seed);
        let x = vals(n * hidden, seed ^ 1);
        let g = vals(hidden, seed ^ 2);
        let gpu = block(router::run(c, &gate, ne, hidden, &x, &g, 1e-5, k, renorm)).unwrap();
        let cpu = router::reference(&gate, ne, hidden, &x, &g, 1e-5, k, renorm);
        for (a, b) in gpu.iter().zip(&cpu) {
            let ids_a: Vec<u32> = a.iter().map(|p| p.0).collect();
            let ids_b: Vec<u32> = b.iter().map(|p| p.0).collect();
            prop_assert_eq!(ids_a, ids_b);
            let wa: Vec<f32> = a.iter().map(|p| p.1).collect();
            let wb: Vec<f32> = b.iter().map(|p| p.1).collect();
            assert_close(&wa, &wb, 1e-5, "router weights");
        }
    }

    #[test]
    fn experts_match_reference(ne in 1usize..5, hidden in 1usize..40, inter in 1usize..70, n in 1usize..4, kk in 1usize..5, seed: u64) {
        let Some(c) = ctx() else { return Ok(()) };
        let k = kk.min(ne);
        let ws: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..ne as u64)
            .map(|e| (vals(inter * hidden, seed ^ (e * 3)), vals(inter * hidden, seed ^ (e * 3 + 1)), vals(hidden * inter, seed ^ (e * 3 + 2))))
            .collect();
        let experts: Vec<expert::ExpertRef> = ws.iter().map(|(a, b, c)| expert::ExpertRef { w1: a, w3: b, w2: c }).collect();
        let x = vals(n * hidden, seed ^ 77);
        let g = vals(hidden, seed ^ 78);
        let route: Vec<Vec<(u32, f32)>> = (0..n)
            .map(|t| (0..k).map(|s| (((t + s * 2 + seed as usize) % ne) as u32, 0.25 + s as f32 * 0.5)).collect())
            .collect();
        let gpu = block(expert::run(c, &experts, inter, hidden, &x, &g, 1e-5, &route)).unwrap();
        let cpu = expert::reference(&experts, inter, hidden, &x, &g, 1e-5, &route);
        assert_close(&gpu, &cpu, 1e-5, "experts");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, ..ProptestConfig::default() })]

    /// f16-packed weights (two per u32, unpack2x16float) against the CPU on the
    /// same f16-rounded weights, odd row counts included (padding).
    #[test]
    fn f16_kernels_match_reference(rows in 1usize..90, cols in 1usize..90, n in 1usize..3, half in 1usize..5, ne in 1usize..4, seed: u64) {
        let Some(c) = ctx() else { return Ok(()) };
        let f16 = WeightFormat::F16;
        let w = round_f16(&vals(rows * cols, seed));
        let x = vals(n * cols, seed ^ 1);
        let g = vals(cols, seed ^ 2);
        let y0 = vals(n * rows, seed ^ 3);
        let gpu = block(matvec::run_format(c, f16, &w, rows, cols, &x, n, Some(&g), 1e-5, Some(&y0))).unwrap();
        assert_close(&gpu, &matvec::reference(&w, rows, cols, &x, n, Some(&g), 1e-5, Some(&y0)), 1e-5, "matvec f16");

        let s = qkv_rope::QkvShape { hidden: cols, n_heads: 2, n_kv: 1, head_dim: 2 * half, eps: 1e-5 };
        let (qd, kvd) = (2 * s.head_dim, s.head_dim);
        let wq = round_f16(&vals(qd * cols, seed ^ 4));
        let wk = round_f16(&vals(kvd * cols, seed ^ 5));
        let wv = round_f16(&vals(kvd * cols, seed ^ 6));
        let table = qkv_rope::rope_table(s.head_dim, 1e4, 2 + n);
        let (q, k, v) = block(qkv_rope::run_format(c, f16, &s, &wq, &wk, &wv, &x, &g, &table, 2)).unwrap();
        let (rq, rk, rv) = qkv_rope::reference(&s, &wq, &wk, &wv, &x, &g, &table, 2);
        assert_close(&q, &rq, 1e-5, "q f16");
        assert_close(&k, &rk, 1e-5, "k f16");
        assert_close(&v, &rv, 1e-5, "v f16");

        // Experts: hidden = cols (odd or even), inter = rows.
        let ws: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..ne as u64)
            .map(|e| (round_f16(&vals(rows * cols, seed ^ (e * 3 + 10))), round_f16(&vals(rows * cols, seed ^ (e * 3 + 11))), round_f16(&vals(cols * rows, seed ^ (e * 3 + 12)))))
            .collect();
        let experts: Vec<expert::ExpertRef> = ws.iter().map(|(a, b, c)| expert::ExpertRef { w1: a, w3: b, w2: c }).collect();
        let route: Vec<Vec<(u32, f32)>> = (0..n).map(|t| vec![((t + seed as usize) % ne) as u32, ((t + 1 + seed as usize) % ne) as u32].into_iter().take(ne.min(2)).map(|e| (e, 0.5)).collect()).collect();
        let gpu = block(expert::run_format(c, f16, &experts, rows, cols, &x, &g, 1e-5, &route)).unwrap();
        assert_close(&gpu, &expert::reference(&experts, rows, cols, &x, &g, 1e-5, &route), 1e-5, "experts f16");
    }
}

/// Random experts of `inter x hidden` (multiples of 32), quantized in `q`.
pub(crate) fn qexperts(
    ne: usize,
    inter: usize,
    hidden: usize,
    q: QuantFormat,
    seed: u64,
) -> Vec<ExpertWeights> {
    let m = |r: usize, c: usize, s: u64| Weight::F32(Mat::new(r, c, vals(r * c, s)).unwrap());
    (0..ne as u64)
        .map(|e| {
            let w = ExpertWeights {
                w1: m(inter, hidden, seed ^ (e * 3 + 20)),
                w2: m(hidden, inter, seed ^ (e * 3 + 21)),
                w3: m(inter, hidden, seed ^ (e * 3 + 22)),
            };
            quantize_expert(&w, q).unwrap()
        })
        .collect()
}

fn qmat(w: &Weight) -> &QMat {
    match w {
        Weight::Q(q) => q,
        Weight::F32(_) => panic!("quantized expert expected"),
    }
}

/// The MoE block with quantized experts on the CPU, with the CPU engine's
/// quantized product (`qmatmul`, packed values read directly).
pub(crate) fn q_reference(
    experts: &[ExpertWeights],
    hidden: usize,
    x: &[f32],
    g: &[f32],
    eps: f32,
    route: &[Vec<(u32, f32)>],
) -> Vec<f32> {
    let mut out = Vec::new();
    for (xt, r) in x.chunks(hidden).zip(route) {
        let xn = rmsnorm_ref(xt, g, eps);
        let mut y = xt.to_vec();
        for &(e, w) in r {
            let ex = &experts[e as usize];
            let a = qmatmul(&xn, 1, qmat(&ex.w1), 1);
            let b = qmatmul(&xn, 1, qmat(&ex.w3), 1);
            let act: Vec<f32> = a
                .iter()
                .zip(&b)
                .map(|(a, b)| a / (1.0 + (-a).exp()) * b)
                .collect();
            for (yv, o) in y.iter_mut().zip(qmatmul(&act, 1, qmat(&ex.w2), 1)) {
                *yv += w * o;
            }
        }
        out.extend(y);
    }
    out
}

fn qroute(n: usize, ne: usize, k: usize, seed: u64) -> Vec<Vec<(u32, f32)>> {
    (0..n)
        .map(|t| {
            (0..k)
                .map(|s| {
                    (
                        ((t + s * 3 + seed as usize) % ne) as u32,
                        0.3 + s as f32 * 0.4,
                    )
                })
                .collect()
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, ..ProptestConfig::default() })]

    /// q8_0 / q4_0 expert kernels (packed values read as u32 words) against
    /// the CPU's quantized product, on sizes that are multiples of 32 but not
    /// of the workgroup (inter 32..224, hidden 32..128).
    #[test]
    fn quantized_experts_match_qmatmul(q4 in any::<bool>(), ne in 1usize..4, hg in 1usize..5, ig in 1usize..8, n in 1usize..4, kk in 1usize..4, seed: u64) {
        let Some(c) = ctx() else { return Ok(()) };
        let q = if q4 { QuantFormat::Q4_0 } else { QuantFormat::Q8_0 };
        let (hidden, inter, k) = (32 * hg, 32 * ig, kk.min(ne));
        let experts = qexperts(ne, inter, hidden, q, seed);
        let x = vals(n * hidden, seed ^ 77);
        let g = vals(hidden, seed ^ 78);
        let route = qroute(n, ne, k, seed);
        let gpu = block(expert::run_pool(c, PoolFormat::Quant(q), &experts, inter, hidden, &x, &g, 1e-5, &route)).unwrap();
        let cpu = q_reference(&experts, hidden, &x, &g, 1e-5, &route);
        assert_close(&gpu, &cpu, 2e-5, &format!("experts {q}"));
    }
}

/// The quantized kernels at the edges of what an adapter allows: one
/// invocation per workgroup, an odd workgroup size, the adapter's largest
/// workgroup, and a (pretended) tiny limit on workgroups per dimension, so
/// that the dispatch splits over x and y.
#[test]
fn quantized_experts_at_the_adapter_limits() {
    let Some(c) = ctx() else { return };
    let max_wg = c
        .limits
        .max_compute_workgroup_size_x
        .min(c.limits.max_compute_invocations_per_workgroup);
    let (ne, n, k, hidden, inter) = (3, 5, 2, 96, 160);
    for q in QuantFormat::ALL {
        let experts = qexperts(ne, inter, hidden, q, 9);
        let x = vals(n * hidden, 1);
        let g = vals(hidden, 2);
        let route = qroute(n, ne, k, 4);
        let cpu = q_reference(&experts, hidden, &x, &g, 1e-5, &route);
        for (wg, max_groups) in [(1, 65535), (7, 3), (max_wg, 65535), (64, 2)] {
            let mut limits = c.limits.clone();
            limits.max_compute_workgroups_per_dimension = max_groups;
            let cx = GpuContext {
                limits,
                workgroup_size: wg,
                barrier_workgroup_size: wg,
                ..c.clone()
            };
            let gpu = block(expert::run_pool(
                &cx,
                PoolFormat::Quant(q),
                &experts,
                inter,
                hidden,
                &x,
                &g,
                1e-5,
                &route,
            ))
            .unwrap();
            assert_close(
                &gpu,
                &cpu,
                2e-5,
                &format!("experts {q}, workgroup {wg}, {max_groups} groups per dimension"),
            );
        }
        // Float experts, or the other format, are refused (not read as garbage).
        let other = if q == QuantFormat::Q8_0 {
            QuantFormat::Q4_0
        } else {
            QuantFormat::Q8_0
        };
        let wrong = qexperts(ne, inter, hidden, other, 9);
        assert!(block(expert::run_pool(
            c,
            PoolFormat::Quant(q),
            &wrong,
            inter,
            hidden,
            &x,
            &g,
            1e-5,
            &route
        ))
        .is_err());
        let float: Vec<ExpertWeights> = experts
            .iter()
            .map(|e| ExpertWeights {
                w1: Weight::F32(e.w1.to_f32()),
                w2: Weight::F32(e.w2.to_f32()),
                w3: Weight::F32(e.w3.to_f32()),
            })
            .collect();
        assert!(block(expert::run_pool(
            c,
            PoolFormat::Quant(q),
            &float,
            inter,
            hidden,
            &x,
            &g,
            1e-5,
            &route
        ))
        .is_err());
        // The dequantized experts in an f32 pool give the same result.
        let gpu = block(expert::run_pool(
            c,
            PoolFormat::Float(WeightFormat::F32),
            &float,
            inter,
            hidden,
            &x,
            &g,
            1e-5,
            &route,
        ))
        .unwrap();
        assert_close(
            &gpu,
            &cpu,
            2e-5,
            &format!("dequantized {q} experts in an f32 pool"),
        );
    }
}

/// The pool layout of a quantized matrix: values word `(r, w)` at
/// `w * rows + r`, then the f16 scales two per word.
#[test]
fn quantized_pool_layout() {
    let m = Mat::new(3, 64, vals(3 * 64, 5)).unwrap();
    for q in QuantFormat::ALL {
        let qm = QMat::quantize(&m, q).unwrap();
        let words = expert::pack_qmat(&[&qm]).unwrap();
        let rb = q.row_bytes(64);
        assert_eq!(words.len() * 4, expert::qmat_pool_bytes(q, 3, 64));
        for r in 0..3 {
            for w in 0..rb / 4 {
                let b = &qm.values[r * rb + 4 * w..r * rb + 4 * w + 4];
                assert_eq!(
                    words[w * 3 + r],
                    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
                );
            }
            for gi in 0..2 {
                let word = words[3 * rb / 4 + gi * 2 + r / 2];
                assert_eq!((word >> (16 * (r % 2))) as u16, qm.scale_bits[r * 2 + gi]);
            }
        }
    }
    // Columns that are not a multiple of 32 never reach the kernels.
    let bad = QMat {
        rows: 1,
        cols: 48,
        format: QuantFormat::Q8_0,
        values: vec![0; 48],
        scale_bits: vec![0],
        scales: vec![0.0],
    };
    assert!(expert::pack_qmat(&[&bad]).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, ..ProptestConfig::default() })]

    /// The families' attention input after the projection: biases, q/k
    /// RMSNorm (none, whole projection, per head), RoPE, KV-cache append.
    #[test]
    fn qkv_post_matches_reference(mode in 0usize..3, half in 1usize..6, n_kv in 1usize..3, group in 1usize..3, n in 1usize..4, pos0 in 0usize..5, seed: u64) {
        let Some(c) = ctx() else { return Ok(()) };
        let norm = [QkNorm::None, QkNorm::Whole, QkNorm::PerHead][mode];
        let s = family::QkvPostShape { n_heads: n_kv * group, n_kv, head_dim: 2 * half, eps: 1e-6, norm };
        let (qd, kvd) = (s.n_heads * s.head_dim, n_kv * s.head_dim);
        let raw = vals(n * (qd + 2 * kvd), seed);
        let bias = vals(qd + 2 * kvd, seed ^ 1);
        let (qn, kn) = match norm {
            QkNorm::None => (0, 0),
            QkNorm::Whole => (qd, kvd),
            QkNorm::PerHead => (s.head_dim, s.head_dim),
        };
        let q_norm = vals(qn, seed ^ 2);
        let k_norm = vals(kn, seed ^ 3);
        let table = qkv_rope::rope_table(s.head_dim, 1e4, pos0 + n);
        let (q, k, v) = block(family::qkv_post_run(c, &s, &raw, &bias, &q_norm, &k_norm, &table, pos0)).unwrap();
        let (rq, rk, rv) = family::qkv_post_reference(&s, &raw, &bias, &q_norm, &k_norm, &table, pos0);
        assert_close(&q, &rq, 1e-5, "q");
        assert_close(&k, &rk, 1e-5, "k");
        assert_close(&v, &rv, 1e-5, "v");
    }

    /// The shared expert's sigmoid gate on the post-attention-normed input.
    #[test]
    fn shared_gate_matches_reference(hidden in 1usize..90, n in 1usize..5, seed: u64) {
        let Some(c) = ctx() else { return Ok(()) };
        let gate = vals(hidden, seed);
        let x = vals(n * hidden, seed ^ 1);
        let g = vals(hidden, seed ^ 2);
        let gpu = block(family::shared_gate_run(c, &gate, &x, &g, 1e-6)).unwrap();
        assert_close(&gpu, &family::shared_gate_reference(&gate, &x, &g, 1e-6), 1e-5, "shared gate");
    }
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let Some(c) = ctx() else { return };
    assert!(block(matvec::run(
        c, &[1.0; 6], 2, 3, &[1.0; 2], 1, None, 0.0, None
    ))
    .is_err());
    assert!(block(embedding::run(c, &[1.0; 6], 3, 2, &[3])).is_err());
    assert!(block(router::run(
        c, &[1.0; 4], 2, 2, &[1.0; 2], &[1.0; 2], 1e-5, 3, true
    ))
    .is_err());
    assert!(block(attention::run(
        c, &[1.0; 5], &[1.0; 8], &[1.0; 8], 2, 1, 2, 0
    ))
    .is_err());
    assert!(block(attention::run(
        c, &[1.0; 8], &[1.0; 2], &[1.0; 2], 2, 1, 2, 0
    ))
    .is_err());
    let s = family::QkvPostShape {
        n_heads: 2,
        n_kv: 1,
        head_dim: 4,
        eps: 1e-6,
        norm: QkNorm::Whole,
    };
    let table = qkv_rope::rope_table(4, 1e4, 2);
    // q norm of the wrong length, odd head_dim, a gate of the wrong width.
    assert!(block(family::qkv_post_run(
        c, &s, &[0.0; 16], &[0.0; 16], &[1.0; 4], &[1.0; 4], &table, 0
    ))
    .is_err());
    let odd = family::QkvPostShape { head_dim: 3, ..s };
    assert!(block(family::qkv_post_run(
        c, &odd, &[0.0; 12], &[0.0; 12], &[1.0; 6], &[1.0; 3], &table, 0
    ))
    .is_err());
    assert!(block(family::shared_gate_run(
        c, &[1.0; 3], &[1.0; 4], &[1.0; 3], 1e-6
    ))
    .is_err());
}
