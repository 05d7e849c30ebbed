//! The fused decode kernels against the unfused CPU reference (the
//! reference of the kernels they replace), on random inputs: proptest
//! shapes with sizes that are not multiples of the workgroup (hidden, head
//! dimension and cache length past it), and the kernel's own limits.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::gpu_support as common;

use crate::gpu_kernels::{q_reference, qexperts};
use common::{assert_close, ctx};
use proptest::prelude::*;
use web_node::gpu::expert::{self, ExpertRef};
use web_node::gpu::kernel::{matvec_ref, rmsnorm_ref, round_f16};
use web_node::gpu::qkv_rope::{rope_table, QkvShape};
use web_node::gpu::{argmax, attn_decode, router, GpuContext, PoolFormat, WeightFormat};
use web_node::model::{ExpertWeights, Mat, Weight};
use web_node::spec::quant::QuantFormat;

fn vals(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed ^ 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// One fused decode step against qkv_rope + attention + o_proj on the CPU; f16
/// weights are rounded through f16 on the CPU side.
fn check_attn_decode(c: &GpuContext, fmt: WeightFormat, s: &QkvShape, pos0: usize, seed: u64) {
    let (qd, kvd) = (s.n_heads * s.head_dim, s.n_kv * s.head_dim);
    let w = |n: usize, sd: u64| {
        // Scaled so the scores stay in a range where the softmax matters.
        let v: Vec<f32> = vals(n, sd).iter().map(|v| v * 0.3).collect();
        match fmt {
            WeightFormat::F32 => v,
            WeightFormat::F16 => round_f16(&v),
        }
    };
    let (wq, wk, wv) = (
        w(qd * s.hidden, seed),
        w(kvd * s.hidden, seed ^ 1),
        w(kvd * s.hidden, seed ^ 2),
    );
    let x = vals(s.hidden, seed ^ 3);
    let g = vals(s.hidden, seed ^ 4);
    let k_prev = vals(pos0 * kvd, seed ^ 5);
    let v_prev = vals(pos0 * kvd, seed ^ 6);
    let wo = w(s.hidden * qd, seed ^ 7);
    let table = rope_table(s.head_dim, 10000.0, pos0 + 1);
    // The schedule the engine takes: all of a kv head's query heads per
    // workgroup where they fit (or one per workgroup, `attn_heads_per_group`).
    let qpw = attn_decode::heads_per_group(c, fmt, s.hidden, s.head_dim, s.n_heads, s.n_kv);
    assert!(qpw >= 1 && (s.n_heads / s.n_kv).is_multiple_of(qpw as usize));
    let (out, k, v) = pollster::block_on(attn_decode::run(
        c, fmt, s, &wq, &wk, &wv, &x, &g, &table, &k_prev, &v_prev, &wo, pos0,
    ))
    .unwrap();
    let (ro, rk, rv) = attn_decode::reference(
        s, &wq, &wk, &wv, &x, &g, &table, &k_prev, &v_prev, &wo, pos0,
    );
    let what = format!(
        "{fmt:?} {s:?} pos0 {pos0}, {qpw} heads per workgroup of {}",
        c.barrier_workgroup_size
    );
    assert_close(&k, &rk, 2e-5, &format!("k, {what}"));
    assert_close(&v, &rv, 2e-5, &format!("v, {what}"));
    assert_close(&out, &ro, 2e-5, &format!("o_proj shares per head, {what}"));
}

/// `attn_decode`'s schedules: the adapter's workgroup size or the
/// browser's (16) or an odd one (5), with all of a kv head's query heads per
/// workgroup (0: as many as fit) or one per query head (1, the kernel's
/// first schedule) or at most 2.
fn attn_schedule(c: &GpuContext, wg: usize, per_group: u32) -> GpuContext {
    GpuContext {
        barrier_workgroup_size: match wg {
            0 => c.barrier_workgroup_size,
            1 => web_node::gpu::context::BROWSER_BARRIER_WORKGROUP,
            _ => 5,
        },
        attn_heads_per_group: per_group,
        ..c.clone()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    /// Query heads per kv head 1-4 (n_heads / n_kv), sizes past and short of
    /// the workgroup.
    #[test]
    fn attn_decode_matches_unfused_reference(hidden in 1usize..300, half in 1usize..80, n_kv in 1usize..3, group in 1usize..5, pos0 in 0usize..160, f16: bool, wg in 0usize..3, per_group in 0u32..3, seed: u64) {
        let Some(c) = ctx() else { return Ok(()) };
        let c = &attn_schedule(c, wg, per_group);
        let s = QkvShape { hidden, n_heads: n_kv * group, n_kv, head_dim: 2 * half, eps: 1e-5 };
        let fmt = if f16 { WeightFormat::F16 } else { WeightFormat::F32 };
        check_attn_decode(c, fmt, &s, pos0, seed);
    }

    /// Shapes that take the `_v4` kernels (hidden % 4, head_dim % 8), which
    /// the random shapes above rarely hit.
    #[test]
    fn attn_decode_v4_matches_unfused_reference(hidden4 in 1usize..75, hd8 in 1usize..20, n_kv in 1usize..3, group in 1usize..5, pos0 in 0usize..160, f16: bool, wg in 0usize..3, per_group in 0u32..3, seed: u64) {
        let Some(c) = ctx() else { return Ok(()) };
        let c = &attn_schedule(c, wg, per_group);
        let s = QkvShape { hidden: 4 * hidden4, n_heads: n_kv * group, n_kv, head_dim: 8 * hd8, eps: 1e-5 };
        prop_assert!(attn_decode::vec4_fits(s.hidden, s.head_dim));
        let fmt = if f16 { WeightFormat::F16 } else { WeightFormat::F32 };
        check_attn_decode(c, fmt, &s, pos0, seed);
    }
}

/// The kernel's limits: the largest hidden size and head dimension its
/// workgroup memory holds, a cache longer than the workgroup; and a shape
/// past them is refused (the engine keeps the unfused kernels for it).
#[test]
fn attn_decode_at_its_limits() {
    let Some(c) = ctx() else { return };
    let wg = c.workgroup_size as usize;
    let s = QkvShape {
        hidden: attn_decode::MAX_HIDDEN,
        n_heads: 2,
        n_kv: 1,
        head_dim: attn_decode::MAX_HEAD_DIM,
        eps: 1e-6,
    };
    for fmt in [WeightFormat::F32, WeightFormat::F16] {
        check_attn_decode(c, fmt, &s, 2 * wg + 3, 7);
    }
    // Four query heads per kv head at the largest head dimension, all in
    // one workgroup where the device's workgroup memory holds them; with
    // less memory, fewer heads per workgroup (2, then 1), the same result.
    let s4 = QkvShape {
        hidden: 256,
        n_heads: 4,
        n_kv: 1,
        ..s
    };
    let f16_v4 = attn_decode::vec4_fits(s4.hidden, s4.head_dim);
    let bwg = c.barrier_workgroup_size;
    for qpw in [4, 2, 1] {
        let mut limits = c.limits.clone();
        limits.max_compute_workgroup_storage_size =
            attn_decode::workgroup_bytes(f16_v4, s4.head_dim, bwg, qpw) as u32;
        if limits.max_compute_workgroup_storage_size > c.limits.max_compute_workgroup_storage_size {
            continue;
        }
        let cq = GpuContext {
            limits,
            ..c.clone()
        };
        for fmt in [WeightFormat::F32, WeightFormat::F16] {
            let got = attn_decode::heads_per_group(&cq, fmt, s4.hidden, s4.head_dim, 4, 1);
            if fmt == WeightFormat::F16 || !f16_v4 {
                assert_eq!(got, qpw as u32, "{fmt:?}");
            }
            check_attn_decode(&cq, fmt, &s4, wg + 5, 9);
        }
    }
    assert!(!attn_decode::fits(
        attn_decode::MAX_HIDDEN + 1,
        64,
        c.workgroup_size
    ));
    assert!(!attn_decode::fits(
        64,
        attn_decode::MAX_HEAD_DIM + 2,
        c.workgroup_size
    ));
    assert!(!attn_decode::fits(64, 7, c.workgroup_size));
    let big = QkvShape {
        hidden: attn_decode::MAX_HIDDEN + 1,
        ..s
    };
    let x = vec![0.0; big.hidden];
    let err = pollster::block_on(attn_decode::run(
        c,
        WeightFormat::F32,
        &big,
        &[],
        &[],
        &[],
        &x,
        &x,
        &[],
        &[],
        &[],
        &[],
        0,
    ));
    assert!(err.is_err());
}

/// Whether every token's top `k` (of the CPU's router logits) is clear of
/// ties, so that both sides must pick the same experts.
fn clear_top_k(gate: &[f32], ne: usize, hidden: usize, x: &[f32], g: &[f32], k: usize) -> bool {
    x.chunks(hidden).all(|xt| {
        let xn = rmsnorm_ref(xt, g, 1e-5);
        // In logit space (the softmax saturates for large hidden sizes).
        let mut l = matvec_ref(gate, ne, hidden, &xn);
        l.sort_by(|a, b| b.total_cmp(a));
        l.windows(2)
            .take(k)
            .all(|w| w[0] - w[1] > 1e-3 * w[0].abs().max(1.0))
    })
}

/// The router fused into `expert_up` (then `expert_down`) against the
/// unfused CPU reference: router, then the experts on its route; with
/// `heads` o_proj shares (one token) added to the input first, as after the
/// fused decode attention. Returns false (checking nothing) when the CPU's
/// top k is too close to a tie.
#[allow(clippy::too_many_arguments)]
fn check_routed(
    c: &GpuContext,
    fmt: PoolFormat,
    ne: usize,
    inter: usize,
    hidden: usize,
    n: usize,
    k: usize,
    renorm: bool,
    heads: usize,
    seed: u64,
) -> bool {
    let gate = vals(ne * hidden, seed ^ 40);
    let x0 = vals(n * hidden, seed ^ 41);
    let part = vals(heads * hidden, seed ^ 43);
    // The unfused input: the residual plus every head's share.
    let mut x = x0.clone();
    for h in 0..heads {
        for (xv, p) in x.iter_mut().zip(&part[h * hidden..(h + 1) * hidden]) {
            *xv += p;
        }
    }
    let g = vals(hidden, seed ^ 42);
    if !clear_top_k(&gate, ne, hidden, &x, &g, k) {
        return false;
    }
    let route = router::reference(&gate, ne, hidden, &x, &g, 1e-5, k, renorm);
    let (experts, cpu) = match fmt {
        PoolFormat::Float(f) => {
            let r = |v: Vec<f32>| {
                if f == WeightFormat::F16 {
                    round_f16(&v)
                } else {
                    v
                }
            };
            let ws: Vec<[Vec<f32>; 3]> = (0..ne as u64)
                .map(|e| {
                    [
                        r(vals(inter * hidden, seed ^ (e * 3 + 50))),
                        r(vals(inter * hidden, seed ^ (e * 3 + 51))),
                        r(vals(hidden * inter, seed ^ (e * 3 + 52))),
                    ]
                })
                .collect();
            let refs: Vec<ExpertRef<'_>> = ws
                .iter()
                .map(|[w1, w3, w2]| ExpertRef { w1, w3, w2 })
                .collect();
            let cpu = expert::reference(&refs, inter, hidden, &x, &g, 1e-5, &route);
            let m =
                |r: usize, c: usize, v: &[f32]| Weight::F32(Mat::new(r, c, v.to_vec()).unwrap());
            let experts: Vec<ExpertWeights> = ws
                .iter()
                .map(|[w1, w3, w2]| ExpertWeights {
                    w1: m(inter, hidden, w1),
                    w2: m(hidden, inter, w2),
                    w3: m(inter, hidden, w3),
                })
                .collect();
            (experts, cpu)
        }
        PoolFormat::Quant(q) => {
            let experts = qexperts(ne, inter, hidden, q, seed);
            let cpu = q_reference(&experts, hidden, &x, &g, 1e-5, &route);
            (experts, cpu)
        }
    };
    let r = pollster::block_on(expert::run_routed(
        c, fmt, &experts, &gate, inter, hidden, &x0, &g, 1e-5, k, renorm, &part,
    ))
    .unwrap();
    let what = format!(
        "{fmt} ne {ne} inter {inter} hidden {hidden} n {n} k {k} renorm {renorm} heads {heads}"
    );
    // The routes-only run (where a prompt's chunk stops): the same routes,
    // bit for bit, and no expert ran.
    assert_eq!(r.routes_only, r.route, "routes only vs full, {what}");
    assert!(
        r.act_untouched,
        "the routes-only run wrote activations, {what}"
    );
    let (gpu, got_route) = (r.x, r.route);
    for (t, (a, b)) in got_route.iter().zip(&route).enumerate() {
        let ids = |r: &[(u32, f32)]| r.iter().map(|p| p.0).collect::<Vec<_>>();
        assert_eq!(ids(a), ids(b), "token {t} experts, {what}");
        let wa: Vec<f32> = a.iter().map(|p| p.1).collect();
        let wb: Vec<f32> = b.iter().map(|p| p.1).collect();
        assert_close(&wa, &wb, 1e-5, &format!("token {t} weights, {what}"));
    }
    assert_close(&gpu, &cpu, 2e-5, &format!("output, {what}"));
    true
}

/// The barrier kernels' schedules: the adapter's own, and small workgroups (so
/// that a token spans several) with one per unit of rows (a GPU's, groups
/// 0) or a few looping ones per token (a software adapter's, 1 or 2).
fn schedule(c: &GpuContext, which: usize) -> GpuContext {
    let (bwg, groups) = match which {
        0 => return c.clone(),
        1 => (16, 0),
        2 => (16, 2),
        _ => (5, 1),
    };
    GpuContext {
        barrier_workgroup_size: bwg,
        expert_up_groups: groups,
        ..c.clone()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// Float pools: any hidden and intermediate size (k * inter past and
    /// short of a workgroup), experts up to past the workgroup size.
    #[test]
    fn fused_router_expert_up_matches_unfused_reference(f16: bool, ne in 1usize..12, inter in 1usize..150, hidden in 1usize..200, n in 1usize..4, kk in 1usize..4, renorm: bool, heads in 0usize..5, sched in 0usize..4, seed: u64) {
        let Some(c) = ctx() else { return Ok(()) };
        let c = &schedule(c, sched);
        let fmt = PoolFormat::Float(if f16 { WeightFormat::F16 } else { WeightFormat::F32 });
        // o_proj shares only with one token (decode).
        let heads = if n == 1 { heads } else { 0 };
        check_routed(c, fmt, ne, inter, hidden, n, kk.min(ne), renorm, heads, seed);
    }

    /// Quantized pools (sizes multiples of 32).
    #[test]
    fn fused_router_quantized_matches_unfused_reference(q4: bool, ne in 1usize..9, ig in 1usize..6, hg in 1usize..4, n in 1usize..3, kk in 1usize..3, heads in 0usize..3, sched in 0usize..4, seed: u64) {
        let Some(c) = ctx() else { return Ok(()) };
        let c = &schedule(c, sched);
        let q = if q4 { QuantFormat::Q4_0 } else { QuantFormat::Q8_0 };
        let heads = if n == 1 { heads } else { 0 };
        check_routed(c, PoolFormat::Quant(q), ne, 32 * ig, 32 * hg, n, kk.min(ne), true, heads, seed);
    }
}

/// The fused router at its limits: as many experts as its workgroup arrays
/// hold (past the workgroup size), the dense mixture (k = all experts, no
/// renormalisation), and more experts than it holds refused.
#[test]
fn fused_router_at_its_limits() {
    let Some(c) = ctx() else { return };
    let f32p = PoolFormat::Float(WeightFormat::F32);
    let max = expert::MAX_FUSED_ROUTER_EXPERTS;
    assert!(
        check_routed(c, f32p, max, 3, 67, 2, 8, true, 0, 3),
        "tie: pick another seed"
    );
    assert!(
        check_routed(c, f32p, 8, 33, 45, 3, 8, false, 0, 4),
        "tie: pick another seed"
    );
    // The largest staged hidden size, with o_proj shares.
    let big = expert::MAX_STAGED_HIDDEN;
    assert!(
        check_routed(c, f32p, 8, 5, big, 1, 2, true, 4, 5),
        "tie: pick another seed"
    );
    let e = ExpertWeights {
        w1: Weight::F32(Mat::new(1, 1, vec![0.0]).unwrap()),
        w2: Weight::F32(Mat::new(1, 1, vec![0.0]).unwrap()),
        w3: Weight::F32(Mat::new(1, 1, vec![0.0]).unwrap()),
    };
    let many = vec![e; max + 1];
    let gate = vec![0.0; max + 1];
    let r = pollster::block_on(expert::run_routed(
        c,
        f32p,
        &many,
        &gate,
        1,
        1,
        &[1.0],
        &[1.0],
        1e-5,
        1,
        true,
        &[],
    ));
    assert!(r.is_err());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// Greedy sampling fused with the next token's embedding lookup against
    /// argmax and the table row, vocabularies and hidden sizes past its
    /// 64-invocation workgroup, with ties (values rounded to a few levels).
    #[test]
    fn argmax_embed_matches_argmax_and_the_table_row(vocab in 1usize..300, hidden in 1usize..200, levels in 1u32..50, sched in 0usize..4, seed: u64) {
        let Some(c) = ctx() else { return Ok(()) };
        // Its workgroup follows the barrier kernels' (64, 16, 4 here).
        let c = &schedule(c, sched);
        let v: Vec<f32> = vals(vocab, seed).iter().map(|x| (x * levels as f32).round()).collect();
        let table = vals(vocab * hidden, seed ^ 9);
        let (id, x) = pollster::block_on(argmax::run_embed(c, &v, &table, hidden)).unwrap();
        let want = argmax::reference(&v);
        prop_assert_eq!(id, want);
        let w = want as usize;
        prop_assert_eq!(&x[..], &table[w * hidden..(w + 1) * hidden]);
    }
}
