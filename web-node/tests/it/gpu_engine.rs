//! The GPU engine against the CPU reference on a tiny random Mixtral
//! checkpoint written to disk (config.json, model.safetensors, tokenizer.json):
//! the step API (Need / supply / resume / cancel), selective expert uploads,
//! and the expert pool under a budget smaller than the model.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::gpu_support as common;
use crate::gpu_support::shared_ctx;

use std::collections::HashMap;
use std::sync::Arc;

use common::ctx;
use web_node::gpu::kernel::round_f16;
use web_node::gpu::{
    expert_bytes, pool_expert_bytes, Attached, Engine, EngineOptions, GpuContext, PoolFormat,
    WeightFormat,
};
use web_node::model::load::{DirExpertSource, ModelDir};
use web_node::model::quant::{quantize_expert, QuantizingSource};
use web_node::model::random::{small_config, tiny_config, write_random_model, TOKENIZER_VOCAB};
use web_node::model::reference::CpuModel;
use web_node::model::sampler::argmax;
use web_node::model::{
    Engine as _, ExpertId, ExpertSource, ExpertWeights, Forward, ModelError, Output, RunOptions,
    Step, Want,
};
use web_node::spec::quant::QuantFormat;

fn model_dir(seed: u64) -> (tempfile::TempDir, ModelDir) {
    let dir = tempfile::tempdir().unwrap();
    write_random_model(dir.path(), &tiny_config(), seed).unwrap();
    let m = ModelDir::load(dir.path()).unwrap();
    (dir, m)
}

fn gpu_engine(c: &GpuContext, m: &ModelDir, opts: EngineOptions) -> Engine {
    Engine::with_options(shared_ctx(c), &m.config, &m.shared, &m.routers, opts).unwrap()
}

fn block<T>(f: impl std::future::Future<Output = T>) -> T {
    pollster::block_on(f)
}

/// Supply every expert `ids` names from `src`.
fn supply(gpu: &mut Engine, src: &mut DirExpertSource, ids: &[ExpertId]) {
    for &id in ids {
        gpu.supply_expert(id, src.load_expert(id.layer, id.expert).unwrap())
            .unwrap();
    }
}

/// Resume (supplying from `src`) until the step is done; returns the output
/// and how many times it paused.
fn finish(gpu: &mut Engine, src: &mut DirExpertSource, mut step: Step) -> (Output, usize) {
    let mut pauses = 0;
    loop {
        match step {
            Step::Done(out) => return (out, pauses),
            Step::Need(ids) => {
                assert!(!ids.is_empty());
                assert!(
                    ids.windows(2).all(|w| w[0] < w[1]),
                    "sorted, unique: {ids:?}"
                );
                assert!(gpu.is_paused());
                pauses += 1;
                supply(gpu, src, &ids);
                step = block(gpu.resume()).unwrap();
            }
            Step::Compute(_) => panic!("the GPU engine has no remote mode"),
        }
    }
}

/// Per position: max |gpu - cpu| <= 1e-4 * max |cpu|.
fn assert_logits_close(gpu: &[f32], cpu: &[f32], what: &str) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: vocab");
    let scale = cpu.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    let diff = gpu
        .iter()
        .zip(cpu)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        diff <= 1e-4 * scale,
        "{what}: max diff {diff} vs scale {scale} (rel {})",
        diff / scale
    );
    if what.ends_with("position 10") || what.ends_with("step 5") {
        eprintln!("{what}: max relative diff {:.2e}", diff / scale);
    }
}

fn prompt(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i * 37 + seed * 11 + 5) % 259)
        .collect()
}

#[test]
fn logits_match_cpu_reference_per_position() {
    let Some(c) = ctx() else { return };
    let (_d, m) = model_dir(7);
    for (opts, batch) in [
        (RunOptions::default(), 64),
        (RunOptions::default(), 3),
        (
            RunOptions {
                top_k: Some(1),
                use_moe: true,
            },
            64,
        ),
        (
            RunOptions {
                top_k: Some(3),
                use_moe: true,
            },
            5,
        ),
        (
            RunOptions {
                top_k: None,
                use_moe: false,
            },
            64,
        ),
    ] {
        let mut gpu = gpu_engine(
            c,
            &m,
            EngineOptions {
                max_seq: 256,
                max_batch: batch,
                ..Default::default()
            },
        );
        let mut src = m.expert_source().unwrap();
        let mut cpu = CpuModel::from_model_dir(&m).unwrap();
        let p = prompt(11, 1);
        let g = gpu.forward_all_logits(&mut src, &p, &opts).unwrap();
        let r = cpu.forward_all_logits_with(&p, &opts).unwrap();
        assert_eq!(g.len(), p.len());
        for (i, (a, b)) in g.iter().zip(&r).enumerate() {
            assert_logits_close(a, b, &format!("{opts:?} batch {batch} prompt position {i}"));
        }
        // Then decode one token at a time.
        for step in 0..6u32 {
            let t = [(step * 53 + 9) % 259];
            let a = gpu.forward(&mut src, &t, &opts).unwrap();
            let b = cpu.forward(&t, &opts).unwrap();
            assert_logits_close(&a, &b, &format!("{opts:?} decode step {step}"));
        }
        assert_eq!(gpu.position(), cpu.position());
        assert_eq!(gpu.stats().expert_evictions, 0);
    }
}

#[test]
fn greedy_tokens_identical_for_64_steps() {
    let Some(c) = ctx() else { return };
    let (_d, m) = model_dir(11);
    let opts = RunOptions::default();
    let mut gpu = gpu_engine(c, &m, EngineOptions::default());
    let mut src = m.expert_source().unwrap();
    let mut cpu = CpuModel::from_model_dir(&m).unwrap();
    let p = prompt(5, 3);
    let mut streamed = Vec::new();
    let g = gpu
        .generate_greedy(&mut src, &p, 64, &opts, |t| streamed.push(t))
        .unwrap();
    let mut r = Vec::new();
    let mut tok = argmax(&cpu.forward(&p, &opts).unwrap());
    for _ in 0..64 {
        r.push(tok);
        tok = argmax(&cpu.forward(&[tok], &opts).unwrap());
    }
    eprintln!("greedy tokens: {g:?}");
    assert_eq!(g, r);
    assert_eq!(streamed, g);
    assert_eq!(gpu.position(), p.len() + 63);
    // Decoding reads back the sampled id, and the routes of the layers
    // that lack experts (one token: 8 experts x (id, weight) each) with it,
    // in the token's one submission (one more for each pause).
    let s = gpu.stats().clone();
    assert!(
        s.readback_bytes <= s.readbacks * (4 + 4 * 8 * 2 * 4),
        "{s:?}"
    );
    assert_eq!(s.submissions, s.steps + s.pauses, "{s:?}");

    // The same through the blocking Forward adapter (engine + attached source).
    let mut att = Attached {
        engine: gpu_engine(c, &m, EngineOptions::default()),
        source: m.expert_source().unwrap(),
    };
    let mut tok = argmax(&att.forward(&p, &opts).unwrap());
    let mut a = Vec::new();
    for _ in 0..8 {
        a.push(tok);
        tok = argmax(&att.forward(&[tok], &opts).unwrap());
    }
    assert_eq!(a, r[..8]);
}

/// Counts every load, per (layer, expert).
struct Counting {
    inner: DirExpertSource,
    loads: HashMap<(usize, usize), usize>,
}

impl ExpertSource for Counting {
    fn load_expert(&mut self, layer: usize, expert: usize) -> Result<ExpertWeights, ModelError> {
        *self.loads.entry((layer, expert)).or_default() += 1;
        self.inner.load_expert(layer, expert)
    }
}

#[test]
fn only_routed_experts_are_asked_for_each_once() {
    let Some(c) = ctx() else { return };
    let (_d, m) = model_dir(5);
    let mut src = Counting {
        inner: m.expert_source().unwrap(),
        loads: HashMap::new(),
    };
    let mut gpu = Engine::new(shared_ctx(c), &m.config, &m.shared, &m.routers).unwrap();
    let mut cpu = CpuModel::from_model_dir(&m).unwrap();
    let opts = RunOptions::default();
    let p = prompt(2, 9);
    gpu.forward(&mut src, &p, &opts).unwrap();
    cpu.forward(&p, &opts).unwrap();
    for t in [17u32, 200, 17] {
        gpu.next_token(&mut src, &[t], &opts).unwrap();
        cpu.forward(&[t], &opts).unwrap();
    }
    let routed = &cpu.routing_stats().tokens_routed;
    let mut expected = 0;
    for (l, row) in routed.iter().enumerate() {
        for (e, &n) in row.iter().enumerate() {
            let got = src.loads.get(&(l, e)).copied().unwrap_or(0);
            assert_eq!(
                got,
                usize::from(n > 0),
                "layer {l} expert {e}: routed {n} times, asked for {got} times"
            );
            assert_eq!(gpu.is_expert_resident(l, e), n > 0);
            expected += usize::from(n > 0);
        }
    }
    let s = gpu.stats();
    assert_eq!(s.expert_uploads as usize, expected);
    assert_eq!(s.expert_evictions, 0);
    assert_eq!(gpu.resident_experts(), expected);
    assert_eq!(gpu.pool_slots(), 4 * 8, "default pool: every expert");
    // 5 tokens x top-2 cannot touch all 8 experts of every layer: some stay unloaded.
    assert!(expected < 4 * 8, "every expert was loaded");
}

#[test]
fn step_asks_for_the_routed_experts_then_matches_cpu() {
    let Some(c) = ctx() else { return };
    let (_d, m) = model_dir(17);
    let opts = RunOptions::default();
    let p = prompt(6, 2);
    let mut cpu = CpuModel::from_model_dir(&m).unwrap();
    let want = cpu.forward_all_logits_with(&p, &opts).unwrap();
    let layer0: Vec<ExpertId> = cpu.routing_stats().tokens_routed[0]
        .iter()
        .enumerate()
        .filter(|(_, &n)| n > 0)
        .map(|(e, _)| ExpertId::new(0, e))
        .collect();

    let mut gpu = gpu_engine(c, &m, EngineOptions::default());
    let mut src = m.expert_source().unwrap();
    let first = block(gpu.step(&p, &opts, Want::AllLogits)).unwrap();
    assert_eq!(
        first,
        Step::Need(layer0.clone()),
        "layer 0's routed experts"
    );
    assert_eq!(gpu.position(), 0, "a paused step does not advance");
    assert!(gpu.is_paused());
    // A second step while one is paused is refused, and the paused one survives.
    assert!(matches!(
        block(gpu.step(&[1], &opts, Want::Greedy)),
        Err(ModelError::Input(_))
    ));
    assert!(gpu.is_paused());

    // Supply layer 0, run on to the next pause (a later layer), cancel there:
    // layer 0 already wrote KV-cache rows, but the position is back at 0.
    supply(&mut gpu, &mut src, &layer0);
    match block(gpu.resume()).unwrap() {
        Step::Need(ids) => assert!(ids.iter().all(|id| id.layer > 0), "{ids:?}"),
        other => panic!("layers 1.. had no experts yet: {other:?}"),
    }
    gpu.cancel();
    assert_eq!(gpu.position(), 0);
    assert!(!gpu.is_paused());
    assert!(matches!(block(gpu.resume()), Err(ModelError::Input(_))));

    // The same step again: layer 0 is resident now, the rest is asked for.
    let s = block(gpu.step(&p, &opts, Want::AllLogits)).unwrap();
    let (out, pauses) = finish(&mut gpu, &mut src, s);
    assert!(pauses >= 1);
    let Output::AllLogits(got) = out else {
        panic!("asked for all logits")
    };
    assert_eq!(got.len(), p.len());
    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
        assert_logits_close(a, b, &format!("step API position {i}"));
    }
    assert_eq!(gpu.position(), p.len());

    // Greedy: only the token id comes back, and it is the CPU's argmax.
    let t = argmax(&want[p.len() - 1]);
    let s = block(gpu.step(&[t], &opts, Want::Greedy)).unwrap();
    let (out, _) = finish(&mut gpu, &mut src, s);
    let cpu_next = argmax(&cpu.forward(&[t], &opts).unwrap());
    assert_eq!(out, Output::Token(cpu_next));
    let s = block(gpu.step(&[cpu_next], &opts, Want::Logits)).unwrap();
    let (out, _) = finish(&mut gpu, &mut src, s);
    let Output::Logits(l) = out else {
        panic!("asked for logits")
    };
    assert_logits_close(&l, &cpu.forward(&[cpu_next], &opts).unwrap(), "step logits");

    // Dense: every missing expert of every layer, asked for up front; cancel
    // keeps the position.
    let dense = RunOptions {
        top_k: None,
        use_moe: false,
    };
    let pos = gpu.position();
    let Step::Need(ids) = block(gpu.step(&[3], &dense, Want::Logits)).unwrap() else {
        panic!("not every expert is resident yet")
    };
    let all: Vec<ExpertId> = (0..4)
        .flat_map(|l| (0..8).map(move |e| ExpertId::new(l, e)))
        .filter(|id| !gpu.is_expert_resident(id.layer, id.expert))
        .collect();
    assert_eq!(ids, all);
    gpu.cancel();
    assert_eq!(gpu.position(), pos);
    let s = block(gpu.step(&[3], &dense, Want::Logits)).unwrap();
    let (out, pauses) = finish(&mut gpu, &mut src, s);
    assert_eq!(pauses, 1, "dense asks once");
    let Output::Logits(l) = out else {
        panic!("asked for logits")
    };
    assert_logits_close(&l, &cpu.forward(&[3], &dense).unwrap(), "dense step");
    assert_eq!(gpu.position(), pos + 1);
}

/// The must-show: a pool smaller than the model gives the same greedy
/// tokens as all resident (and as the CPU), evicting on the way.
#[test]
fn small_pool_gives_the_same_greedy_tokens_and_evicts() {
    let Some(c) = ctx() else { return };
    let (_d, m) = model_dir(23);
    let opts = RunOptions::default();
    let p = prompt(5, 7);
    let steps = 32;
    let mut src = m.expert_source().unwrap();
    let mut full = gpu_engine(c, &m, EngineOptions::default());
    let resident = full
        .generate_greedy(&mut src, &p, steps, &opts, |_| {})
        .unwrap();
    assert_eq!(full.stats().expert_evictions, 0);

    let mut cpu = CpuModel::from_model_dir(&m).unwrap();
    let mut want = Vec::new();
    let mut tok = argmax(&cpu.forward(&p, &opts).unwrap());
    for _ in 0..steps {
        want.push(tok);
        tok = argmax(&cpu.forward(&[tok], &opts).unwrap());
    }
    assert_eq!(resident, want, "all resident vs CPU");

    let per = expert_bytes(&m.config, WeightFormat::F32);
    // 12 slots (3 per layer of 8), 8 (one layer's worth), and 3 (fewer than
    // a layer: chunks of 3 / top-2 = 1 token).
    for slots in [12u64, 8, 3] {
        let mut small = gpu_engine(
            c,
            &m,
            EngineOptions {
                expert_pool_bytes: Some(slots * per + per / 2),
                ..Default::default()
            },
        );
        assert_eq!(small.pool_slots(), slots as usize);
        let got = small
            .generate_greedy(&mut src, &p, steps, &opts, |_| {})
            .unwrap();
        let s = small.stats().clone();
        eprintln!(
            "pool of {slots} experts: {} uploads, {} evictions, {} pauses, {} submissions for {} tokens",
            s.expert_uploads, s.expert_evictions, s.pauses, s.submissions, s.tokens
        );
        assert_eq!(got, resident, "pool of {slots} vs all resident");
        assert!(s.expert_evictions > 0, "pool of {slots}: {s:?}");
        assert_eq!(s.expert_uploads - s.expert_evictions, slots, "{s:?}");
        assert!(small.resident_experts() <= slots as usize);
        // A pool step costs no submission of its own: each chunk is one
        // submission (its layers' routes read back with its output), plus
        // one for each pause or resumption from the host cache (the chunk
        // runs again from the layer that missed, its saved input row
        // restored).
        assert_eq!(
            s.submissions,
            s.steps + s.pauses + s.resumed_stops + s.host_resumes,
            "{s:?}"
        );
        assert_eq!(s.readbacks, s.submissions, "{s:?}");
        // The prompt in one chunk, or (pool of 3: chunks of one token) in
        // several, head and argmax only on a step's last chunk; then
        // one-token decode chunks; and for each pause, the part of a chunk
        // that runs again (at most a whole chunk).
        let prompt_chunks = s.steps - (steps as u64 - 1);
        let prompt_dispatches = if prompt_chunks == 1 {
            small.dispatches_per_chunk(p.len())
        } else {
            prompt_chunks * small.dispatches_per_chunk(1) - 2 * (prompt_chunks - 1)
        };
        let base = prompt_dispatches + (steps as u64 - 1) * small.dispatches_per_step();
        let most = small
            .dispatches_per_chunk(p.len())
            .max(small.dispatches_per_chunk(1));
        assert!(
            (base..=base + (s.pauses + s.host_resumes) * most).contains(&s.dispatches),
            "dispatches {} for {base} without pauses: {s:?}",
            s.dispatches
        );
        if slots == 12 {
            // Another prompt on the warm pool (3 per layer, every layer
            // lacks some): its chunk stops after each layer's expert_up to
            // read its routes before that layer's experts run (a pause
            // where one is missing), so no layer runs on a missing expert
            // and nothing runs twice: one submission per layer, plus one.
            small.reset();
            small.reset_stats();
            let p2 = prompt(9, 4);
            let g = small.forward(&mut src, &p2, &opts).unwrap();
            let s = small.stats().clone();
            assert_eq!(s.pauses + s.resumed_stops + s.host_resumes, 4, "{s:?}");
            assert_eq!(s.submissions, 4 + 1, "{s:?}");
            assert_eq!(s.steps, 1, "{s:?}");
            cpu.reset();
            assert_logits_close(
                &g,
                &cpu.forward(&p2, &opts).unwrap(),
                "second prompt, pool of 12",
            );
        }
    }

    // A prompt in several chunks under a 3-expert pool: logits still match.
    let mut small = gpu_engine(
        c,
        &m,
        EngineOptions {
            expert_pool_bytes: Some(3 * per),
            ..Default::default()
        },
    );
    let p = prompt(7, 1);
    let g = small.forward_all_logits(&mut src, &p, &opts).unwrap();
    cpu.reset();
    let r = cpu.forward_all_logits_with(&p, &opts).unwrap();
    for (i, (a, b)) in g.iter().zip(&r).enumerate() {
        assert_logits_close(a, b, &format!("3-slot pool position {i}"));
    }
    assert_eq!(small.stats().steps, p.len() as u64, "one token per chunk");
}

/// A pool that evicts keeps the evicted experts' encoded bytes on the host
/// (`host_cache_bytes`): an expert needed again is written back from there,
/// so the supply is asked for each expert once, the greedy tokens are those
/// of every expert resident, and steps that find all they lack there go on
/// without a pause. With the cache off, evicted experts are loaded again.
#[test]
fn host_cache_writes_evicted_experts_back_without_the_supply() {
    let Some(c) = ctx() else { return };
    let (_d, m) = model_dir(23);
    let opts = RunOptions::default();
    let cfg = &m.config;
    let per = expert_bytes(cfg, WeightFormat::F32);
    let all = (cfg.num_hidden_layers * cfg.num_local_experts) as u64;
    let prompts = [prompt(5, 7), prompt(9, 4), prompt(3, 11), prompt(5, 7)];
    let mut src = m.expert_source().unwrap();
    let mut full = gpu_engine(c, &m, EngineOptions::default());
    let want: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            full.reset();
            full.generate_greedy(&mut src, p, 12, &opts, |_| {})
                .unwrap()
        })
        .collect();
    for host in [Some(all * per), None, Some(0)] {
        let mut counting = Counting {
            inner: m.expert_source().unwrap(),
            loads: HashMap::new(),
        };
        let mut small = gpu_engine(
            c,
            &m,
            EngineOptions {
                expert_pool_bytes: Some(12 * per),
                host_cache_bytes: host,
                ..Default::default()
            },
        );
        for (p, w) in prompts.iter().zip(&want) {
            small.reset();
            let got = small
                .generate_greedy(&mut counting, p, 12, &opts, |_| {})
                .unwrap();
            assert_eq!(&got, w, "host cache {host:?}");
        }
        let s = small.stats().clone();
        eprintln!("host cache {host:?}: {s:?}");
        assert!(s.expert_evictions > 0, "{s:?}");
        assert_eq!(
            s.submissions,
            s.steps + s.pauses + s.resumed_stops + s.host_resumes,
            "{s:?}"
        );
        let loads: usize = counting.loads.values().sum();
        let most = counting.loads.values().copied().max().unwrap_or(0);
        assert_eq!(s.expert_uploads, loads as u64 + s.host_cache_hits, "{s:?}");
        match host {
            Some(0) => {
                assert_eq!((s.host_cache_hits, s.host_resumes), (0, 0), "{s:?}");
                assert!(most > 1, "no evicted expert was needed again: {s:?}");
            }
            // The whole model fits: no expert is loaded twice.
            Some(_) => {
                assert_eq!(most, 1, "{:?}", counting.loads);
                assert!(s.host_cache_hits > 0 && s.host_resumes > 0, "{s:?}");
            }
            // The default, the pool's own size: some come back from it.
            None => assert!(s.host_cache_hits > 0, "{s:?}"),
        }
    }
}

struct Failing;
impl ExpertSource for Failing {
    fn load_expert(&mut self, layer: usize, expert: usize) -> Result<ExpertWeights, ModelError> {
        Err(ModelError::Source(format!(
            "layer{layer}.expert{expert} unavailable"
        )))
    }
}

#[test]
fn bad_requests_are_errors_and_leave_the_cache() {
    let Some(c) = ctx() else { return };
    let (_d, m) = model_dir(3);
    let opts = RunOptions::default();
    let mut src = m.expert_source().unwrap();
    let mut gpu = gpu_engine(
        c,
        &m,
        EngineOptions {
            max_seq: 8,
            max_batch: 4,
            ..Default::default()
        },
    );
    gpu.forward(&mut src, &[1, 2], &opts).unwrap();
    let bad = |gpu: &mut Engine, src: &mut DirExpertSource, t: &[u32], o: RunOptions| {
        matches!(gpu.forward(src, t, &o), Err(ModelError::Input(_)))
    };
    assert!(bad(&mut gpu, &mut src, &[259], opts));
    assert!(bad(&mut gpu, &mut src, &[], opts));
    for top_k in [0, 9] {
        let o = RunOptions {
            top_k: Some(top_k),
            use_moe: true,
        };
        assert!(bad(&mut gpu, &mut src, &[1], o), "top_k {top_k}");
    }
    assert!(
        bad(&mut gpu, &mut src, &[1; 7], opts),
        "context of 8 overflows"
    );
    assert_eq!(gpu.position(), 2);

    // A source that fails: error, position unchanged, nothing paused, and the
    // engine still works after.
    let mut e = Engine::new(shared_ctx(c), &m.config, &m.shared, &m.routers).unwrap();
    assert!(matches!(
        e.forward(&mut Failing, &[1, 2, 3], &opts),
        Err(ModelError::Source(_))
    ));
    assert_eq!(e.position(), 0);
    assert!(!e.is_paused());
    let a = e.forward(&mut src, &[1, 2, 3], &opts).unwrap();
    let mut cpu = CpuModel::from_model_dir(&m).unwrap();
    assert_logits_close(
        &a,
        &cpu.forward(&[1, 2, 3], &opts).unwrap(),
        "after failed load",
    );

    // Supplying bad experts: wrong shapes, ids outside the spec.
    let good = src.load_expert(0, 0).unwrap();
    let mut short = good.clone();
    short.w2.as_f32_mut().unwrap().data.pop();
    assert!(matches!(
        e.supply_expert(ExpertId::new(0, 0), short),
        Err(ModelError::Tensor { .. })
    ));
    let mut wide = good.clone();
    wide.w1.as_f32_mut().unwrap().cols += 1;
    assert!(matches!(
        e.supply_expert(ExpertId::new(0, 0), wide),
        Err(ModelError::Tensor { .. })
    ));
    for id in [
        ExpertId::new(4, 0),
        ExpertId::new(0, 8),
        ExpertId::new(usize::MAX, 0),
    ] {
        assert!(
            e.supply_expert(id, good.clone()).is_err(),
            "{id} is outside the spec"
        );
    }
    // Nothing above changed a resident expert.
    let b = {
        e.reset();
        e.forward(&mut src, &[1, 2, 3], &opts).unwrap()
    };
    assert_eq!(a, b);
    assert!(matches!(block(e.resume()), Err(ModelError::Input(_))));

    // Pool limits: no room for one expert, top-k or dense larger than the pool,
    // and pinned experts are never evicted.
    let per = expert_bytes(&m.config, WeightFormat::F32);
    let pool = |bytes: u64| {
        Engine::with_options(
            shared_ctx(c),
            &m.config,
            &m.shared,
            &m.routers,
            EngineOptions {
                expert_pool_bytes: Some(bytes),
                ..Default::default()
            },
        )
    };
    assert!(matches!(pool(per - 1), Err(ModelError::Input(_))));
    let mut two = pool(2 * per).unwrap();
    assert_eq!(two.pool_slots(), 2);
    let top3 = RunOptions {
        top_k: Some(3),
        use_moe: true,
    };
    let dense = RunOptions {
        top_k: None,
        use_moe: false,
    };
    for o in [top3, dense] {
        assert!(matches!(
            block(two.step(&[1], &o, Want::Greedy)),
            Err(ModelError::Input(_))
        ));
    }
    let Step::Need(ids) = block(two.step(&[1, 2], &opts, Want::Greedy)).unwrap() else {
        panic!("empty pool")
    };
    assert_eq!(ids.len(), 2, "one token per chunk, top-2: {ids:?}");
    supply(&mut two, &mut src, &ids);
    let other = (0..8)
        .map(|e| ExpertId::new(1, e))
        .find(|id| !ids.contains(id))
        .unwrap();
    assert!(
        matches!(
            two.supply_expert(other, src.load_expert(1, other.expert).unwrap()),
            Err(ModelError::Input(_))
        ),
        "both slots hold experts the paused step needs"
    );
    let s = block(two.resume()).unwrap();
    let (out, _) = finish(&mut two, &mut src, s);
    let mut cpu = CpuModel::from_model_dir(&m).unwrap();
    assert_eq!(
        out,
        Output::Token(argmax(&cpu.forward(&[1, 2], &opts).unwrap()))
    );

    // Wrong shapes are refused at construction.
    let mut bad = m.shared.clone();
    bad.norm.pop();
    assert!(matches!(
        Engine::new(shared_ctx(c), &m.config, &bad, &m.routers),
        Err(ModelError::Tensor { .. })
    ));
    assert!(Engine::new(shared_ctx(c), &m.config, &m.shared, &m.routers[..3]).is_err());
}

#[test]
fn reset_replays_identically() {
    let Some(c) = ctx() else { return };
    let (_d, m) = model_dir(21);
    let opts = RunOptions::default();
    let mut src = m.expert_source().unwrap();
    let mut gpu = gpu_engine(c, &m, EngineOptions::default());
    let a = gpu.forward(&mut src, &prompt(6, 2), &opts).unwrap();
    gpu.forward(&mut src, &[4, 5, 6], &opts).unwrap();
    gpu.reset();
    assert_eq!(gpu.position(), 0);
    let b = gpu.forward(&mut src, &prompt(6, 2), &opts).unwrap();
    assert_eq!(a, b);
}

/// Rounds every expert through f16 (the CPU side of the f16 comparison).
struct Rounded(DirExpertSource);
impl ExpertSource for Rounded {
    fn load_expert(&mut self, layer: usize, expert: usize) -> Result<ExpertWeights, ModelError> {
        let mut w = self.0.load_expert(layer, expert)?;
        for m in [&mut w.w1, &mut w.w2, &mut w.w3] {
            let m = m.as_f32_mut().expect("f32 checkpoint");
            m.data = round_f16(&m.data);
        }
        Ok(w)
    }
}

#[test]
fn f16_weights_match_cpu_on_the_same_rounded_weights() {
    let Some(c) = ctx() else { return };
    let (_d, m) = model_dir(13);
    let mut src = m.expert_source().unwrap();
    let per = expert_bytes(&m.config, WeightFormat::F16);
    // A 10-expert pool: f16 slots, evicting.
    let mut gpu = gpu_engine(
        c,
        &m,
        EngineOptions {
            weights: WeightFormat::F16,
            expert_pool_bytes: Some(10 * per),
            ..Default::default()
        },
    );
    // The CPU model gets the same f16-rounded large matrices (norms, router and embedding stay f32).
    let mut shared = m.shared.clone();
    for la in &mut shared.layers {
        for mat in [
            &mut la.q_proj,
            &mut la.k_proj,
            &mut la.v_proj,
            &mut la.o_proj,
        ] {
            mat.data = round_f16(&mat.data);
        }
    }
    let head = shared
        .lm_head
        .as_mut()
        .expect("tiny config has an untied lm_head");
    head.data = round_f16(&head.data);
    let mut cpu = CpuModel::new(
        m.config.clone(),
        shared,
        m.routers.clone(),
        Rounded(m.expert_source().unwrap()),
    )
    .unwrap();
    let opts = RunOptions::default();
    let p = prompt(9, 4);
    let g = gpu.forward_all_logits(&mut src, &p, &opts).unwrap();
    let r = cpu.forward_all_logits_with(&p, &opts).unwrap();
    for (i, (a, b)) in g.iter().zip(&r).enumerate() {
        assert_logits_close(a, b, &format!("f16 position {i}"));
    }
    let mut tok = argmax(&g[g.len() - 1]);
    let mut gen = Vec::new();
    for _ in 0..32 {
        gen.push(tok);
        tok = gpu.next_token(&mut src, &[tok], &opts).unwrap();
    }
    let mut tok = argmax(&r[r.len() - 1]);
    let mut want = Vec::new();
    for _ in 0..32 {
        want.push(tok);
        tok = argmax(&cpu.forward(&[tok], &opts).unwrap());
    }
    assert_eq!(gen, want);
    assert!(gpu.stats().expert_evictions > 0);
    assert!(
        gpu.weight_bytes_per_token(2)
            < gpu_engine(c, &m, EngineOptions::default()).weight_bytes_per_token(2)
    );
}

/// A random Mixtral whose sizes fit the quantization groups (hidden 64,
/// expert intermediate 96: a multiple of 32, not of the workgroup).
fn quant_model_dir(seed: u64) -> (tempfile::TempDir, ModelDir) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_config(TOKENIZER_VOCAB, 64, 96, 3, 4, 2);
    write_random_model(dir.path(), &cfg, seed).unwrap();
    let m = ModelDir::load(dir.path()).unwrap();
    (dir, m)
}

fn quantizing(m: &ModelDir, format: QuantFormat) -> QuantizingSource<DirExpertSource> {
    QuantizingSource {
        inner: m.expert_source().unwrap(),
        format,
    }
}

/// CPU reference greedy tokens with the experts quantized as they load.
fn cpu_greedy_quant(
    m: &ModelDir,
    q: QuantFormat,
    p: &[u32],
    steps: usize,
) -> (Vec<u32>, Vec<Vec<f32>>) {
    let opts = RunOptions::default();
    let mut cpu = CpuModel::new(
        m.config.clone(),
        m.shared.clone(),
        m.routers.clone(),
        quantizing(m, q),
    )
    .unwrap();
    let all = cpu.forward_all_logits_with(p, &opts).unwrap();
    let mut tok = argmax(&all[all.len() - 1]);
    let mut want = Vec::new();
    for _ in 0..steps {
        want.push(tok);
        tok = argmax(&cpu.forward(&[tok], &opts).unwrap());
    }
    (want, all)
}

/// q8_0 and q4_0 experts read packed by the quantized kernels: the same
/// greedy tokens (and close logits) as the CPU engine with the same
/// quantized experts, with every expert resident and with a 5-expert pool
/// that evicts.
#[test]
fn quantized_experts_give_the_cpu_greedy_tokens_full_and_small_pool() {
    let Some(c) = ctx() else { return };
    let (_d, m) = quant_model_dir(31);
    let opts = RunOptions::default();
    let p = prompt(7, 3);
    let steps = 24;
    for q in QuantFormat::ALL {
        let (want, logits) = cpu_greedy_quant(&m, q, &p, steps);
        let per = pool_expert_bytes(&m.config, PoolFormat::Quant(q));
        for pool in [None, Some(5 * per + per / 2)] {
            let mut gpu = gpu_engine(
                c,
                &m,
                EngineOptions {
                    expert_quant: Some(q),
                    expert_pool_bytes: pool,
                    ..Default::default()
                },
            );
            assert_eq!(gpu.pool_format(), PoolFormat::Quant(q));
            assert_eq!(gpu.expert_bytes(), per);
            let mut src = quantizing(&m, q);
            let g = gpu.forward_all_logits(&mut src, &p, &opts).unwrap();
            for (i, (a, b)) in g.iter().zip(&logits).enumerate() {
                assert_logits_close(a, b, &format!("{q} pool {pool:?} position {i}"));
            }
            let mut tok = argmax(&g[g.len() - 1]);
            let mut got = Vec::new();
            for _ in 0..steps {
                got.push(tok);
                tok = gpu.next_token(&mut src, &[tok], &opts).unwrap();
            }
            assert_eq!(got, want, "{q}, pool {pool:?}: GPU vs CPU greedy tokens");
            let s = gpu.stats();
            eprintln!(
                "{q} pool of {} experts ({per} bytes each): {} uploads, {} evictions",
                gpu.pool_slots(),
                s.expert_uploads,
                s.expert_evictions
            );
            assert_eq!(s.expert_bytes_uploaded, s.expert_uploads * per);
            if pool.is_some() {
                assert_eq!(gpu.pool_slots(), 5);
                assert!(s.expert_evictions > 0, "{s:?}");
            } else {
                assert_eq!(s.expert_evictions, 0);
            }
        }
    }
    // Bytes per expert: q4_0 < q8_0 < f16 < f32.
    let b = |f| pool_expert_bytes(&m.config, f);
    assert!(b(PoolFormat::Quant(QuantFormat::Q4_0)) < b(PoolFormat::Quant(QuantFormat::Q8_0)));
    assert!(b(PoolFormat::Quant(QuantFormat::Q8_0)) < b(PoolFormat::Float(WeightFormat::F16)));
}

/// The committed default model (hidden 128, expert intermediate 256) with
/// q8_0 experts on the GPU: the CPU's greedy tokens for a few prompts.
#[test]
fn default_model_q8_0_on_the_gpu_matches_the_cpu() {
    let Some(c) = ctx() else { return };
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/default");
    let m = ModelDir::load(&path).unwrap();
    let q = QuantFormat::Q8_0;
    let opts = RunOptions::default();
    let mut gpu = gpu_engine(
        c,
        &m,
        EngineOptions {
            max_seq: 128,
            expert_quant: Some(q),
            ..Default::default()
        },
    );
    let mut src = quantizing(&m, q);
    let vocab = m.config.vocab_size as u32;
    for (n, seed) in [(5usize, 1u32), (12, 2), (3, 3)] {
        let p: Vec<u32> = (0..n as u32)
            .map(|i| (i * 53 + seed * 101 + 7) % vocab)
            .collect();
        let (want, _) = cpu_greedy_quant(&m, q, &p, 12);
        gpu.reset();
        let got = gpu
            .generate_greedy(&mut src, &p, 12, &opts, |_| {})
            .unwrap();
        assert_eq!(got, want, "prompt {p:?}");
    }
}

/// The pool's format is explicit: a supplied expert in another format is a
/// clear error (never a panic, never read as the wrong bytes), and a model
/// whose config says its experts are quantized gets a pool of that format.
#[test]
fn expert_pool_format_is_explicit_and_mismatches_are_errors() {
    let Some(c) = ctx() else { return };
    let (_d, m) = quant_model_dir(5);
    let id = ExpertId::new(1, 2);
    let float = m.expert_source().unwrap().load_expert(1, 2).unwrap();
    let q8 = quantize_expert(&float, QuantFormat::Q8_0).unwrap();
    let q4 = quantize_expert(&float, QuantFormat::Q4_0).unwrap();
    let opts = |q| EngineOptions {
        expert_quant: q,
        ..Default::default()
    };
    let mut e8 = gpu_engine(c, &m, opts(Some(QuantFormat::Q8_0)));
    for (w, what) in [(float.clone(), "float (f32)"), (q4.clone(), "q4_0")] {
        match e8.supply_expert(id, w) {
            Err(ModelError::Input(msg)) => {
                assert!(
                    msg.contains(what) && msg.contains("q8_0") && msg.contains("layer1.expert2"),
                    "{msg}"
                )
            }
            other => panic!("{what} into a q8_0 pool: {other:?}"),
        }
    }
    assert_eq!(e8.resident_experts(), 0);
    e8.supply_expert(id, q8.clone()).unwrap();
    assert!(e8.is_expert_resident(1, 2));
    let mut ef = gpu_engine(c, &m, opts(None));
    assert!(matches!(
        ef.supply_expert(id, q8),
        Err(ModelError::Input(_))
    ));
    assert_eq!(ef.resident_experts(), 0);

    // A quantized model on the chain: its config names the format.
    let mut cfg = m.config.clone();
    cfg.quantization_config = Some(serde_json::json!({
        "quant_method": "aiblock", "format": "q4_0", "group_size": 32
    }));
    let e = Engine::new(shared_ctx(c), &cfg, &m.shared, &m.routers).unwrap();
    assert_eq!(e.pool_format(), PoolFormat::Quant(QuantFormat::Q4_0));
    for q in [None, Some(QuantFormat::Q8_0)] {
        let err =
            Engine::with_options(shared_ctx(c), &cfg, &m.shared, &m.routers, opts(q)).unwrap_err();
        assert!(
            matches!(&err, ModelError::Config(msg) if msg.contains("q4_0")),
            "{err}"
        );
    }
    // Sizes that do not fit the groups (tiny_config: intermediate 48).
    let (_d2, t) = model_dir(1);
    let err = Engine::with_options(
        shared_ctx(c),
        &t.config,
        &t.shared,
        &t.routers,
        opts(Some(QuantFormat::Q8_0)),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("multiples of the group size"),
        "{err}"
    );
}

/// The fused decode with the fused attention (the default,
/// `3 * layers + 2` dispatches per greedy token, one submission), without
/// it (`5 * layers + 2`) and the unfused schedule (`fused: false`,
/// `6 * layers + 3`) give the CPU's greedy tokens, with every expert
/// resident and with a pool of 3 experts (chunks of one token, evicting).
#[test]
fn fused_and_unfused_decode_give_the_cpu_greedy_tokens() {
    let Some(c) = ctx() else { return };
    let (_d, m) = model_dir(31);
    let opts = RunOptions::default();
    let p = prompt(6, 3);
    let steps = 24;
    let mut cpu = CpuModel::from_model_dir(&m).unwrap();
    let mut want = Vec::new();
    let mut tok = argmax(&cpu.forward(&p, &opts).unwrap());
    for _ in 0..steps {
        want.push(tok);
        tok = argmax(&cpu.forward(&[tok], &opts).unwrap());
    }
    let nl = m.config.num_hidden_layers as u64;
    let per = expert_bytes(&m.config, WeightFormat::F32);
    for (fused, fused_attention) in [(true, true), (true, false), (false, false)] {
        for pool in [None, Some(3 * per)] {
            let mut src = m.expert_source().unwrap();
            let mut gpu = gpu_engine(
                c,
                &m,
                EngineOptions {
                    fused,
                    fused_attention,
                    expert_pool_bytes: pool,
                    ..Default::default()
                },
            );
            let got = gpu
                .generate_greedy(&mut src, &p, steps, &opts, |_| {})
                .unwrap();
            assert_eq!(got, want, "fused {fused}/{fused_attention}, pool {pool:?}");
            if pool.is_none() {
                // Steady state, every expert resident: one greedy token
                // after another, one submission, one readback.
                let ne = m.config.num_local_experts;
                let all: Vec<ExpertId> = (0..nl as usize)
                    .flat_map(|l| (0..ne).map(move |e| ExpertId::new(l, e)))
                    .filter(|id| !gpu.is_expert_resident(id.layer, id.expert))
                    .collect();
                supply(&mut gpu, &mut src, &all);
                gpu.reset_stats();
                gpu.next_token(&mut src, &[*got.last().unwrap()], &opts)
                    .unwrap();
                let s = gpu.stats();
                let expect = match (fused, fused_attention) {
                    (true, true) => 3 * nl + 2,
                    (true, false) => 5 * nl + 2,
                    _ => 6 * nl + 3,
                };
                assert_eq!(
                    s.dispatches, expect,
                    "fused {fused}/{fused_attention}: {s:?}"
                );
                assert_eq!(gpu.dispatches_per_step(), expect);
                assert_eq!((s.submissions, s.readbacks), (1, 1), "{s:?}");
            }
        }
    }
    // The barrier kernels (attn_decode, expert_up; their vec4 variants at
    // this shape) at the browser's small workgroup size and at an odd one,
    // whole pool and a small one; expert_up with a workgroup per unit of
    // rows (groups 0, a GPU's schedule) and with a few looping workgroups
    // per token (a software adapter's).
    let bwg16 = web_node::gpu::context::BROWSER_BARRIER_WORKGROUP;
    for (bwg, groups) in [(bwg16, 0), (bwg16, 2), (3, 1)] {
        let cx = Arc::new(GpuContext {
            barrier_workgroup_size: bwg,
            expert_up_groups: groups,
            ..c.clone()
        });
        for pool in [None, Some(3 * per)] {
            let mut src = m.expert_source().unwrap();
            let mut gpu = Engine::with_options(
                cx.clone(),
                &m.config,
                &m.shared,
                &m.routers,
                EngineOptions {
                    expert_pool_bytes: pool,
                    ..Default::default()
                },
            )
            .unwrap();
            let got = gpu
                .generate_greedy(&mut src, &p, steps, &opts, |_| {})
                .unwrap();
            assert_eq!(
                got, want,
                "barrier workgroup {bwg}, expert_up groups {groups}, pool {pool:?}"
            );
        }
    }
}
