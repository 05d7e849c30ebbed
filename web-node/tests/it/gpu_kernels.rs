//! Every kernel against its CPU reference on lavapipe (or whatever adapter
//! the environment picks), on proptest shapes: odd sizes, sizes that are not
//! a multiple of the workgroup, one row, one column.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::gpu_support as common;

use common::{assert_close, ctx};
use proptest::prelude::*;
use web_node::gpu::kernel::round_f16;
use web_node::gpu::{
    add, argmax, attention, embedding, expert, matvec, qkv_rope, rmsnorm, router, WeightFormat,
};

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
}
