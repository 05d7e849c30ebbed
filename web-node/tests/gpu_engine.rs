//! The GPU engine against the CPU reference on a tiny random Mixtral
//! checkpoint written to disk (config.json, model.safetensors, tokenizer.json),
//! and selective expert loading.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "gpu_support/mod.rs"]
mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use common::ctx;
use web_node::gpu::kernel::round_f16;
use web_node::gpu::{Engine, EngineOptions, GpuContext, WeightFormat};
use web_node::model::load::ModelDir;
use web_node::model::random::{tiny_config, write_random_model};
use web_node::model::reference::CpuModel;
use web_node::model::sampler::argmax;
use web_node::model::{ExpertSource, ExpertWeights, Forward, ModelError, RunOptions};

fn model_dir(seed: u64) -> (tempfile::TempDir, ModelDir) {
    let dir = tempfile::tempdir().unwrap();
    write_random_model(dir.path(), &tiny_config(), seed).unwrap();
    let m = ModelDir::load(dir.path()).unwrap();
    (dir, m)
}

fn shared_ctx(c: &GpuContext) -> Arc<GpuContext> {
    // The tests share one device; wrap a second context handle around it.
    Arc::new(GpuContext {
        device: c.device.clone(),
        queue: c.queue.clone(),
        info: c.info.clone(),
        limits: c.limits.clone(),
        workgroup_size: c.workgroup_size,
    })
}

fn gpu_engine(c: &GpuContext, m: &ModelDir, opts: EngineOptions) -> Engine {
    Engine::with_options(
        shared_ctx(c),
        &m.config,
        &m.shared,
        &m.routers,
        Box::new(m.expert_source().unwrap()),
        opts,
    )
    .unwrap()
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
        let mut cpu = CpuModel::from_model_dir(&m).unwrap();
        let p = prompt(11, 1);
        let g = gpu.forward_all_logits(&p, &opts).unwrap();
        let r = cpu.forward_all_logits_with(&p, &opts).unwrap();
        assert_eq!(g.len(), p.len());
        for (i, (a, b)) in g.iter().zip(&r).enumerate() {
            assert_logits_close(a, b, &format!("{opts:?} batch {batch} prompt position {i}"));
        }
        // Then decode one token at a time through Forward.
        for step in 0..6u32 {
            let t = [(step * 53 + 9) % 259];
            let a = Forward::forward(&mut gpu, &t, &opts).unwrap();
            let b = cpu.forward(&t, &opts).unwrap();
            assert_logits_close(&a, &b, &format!("{opts:?} decode step {step}"));
        }
        assert_eq!(gpu.position(), cpu.position());
    }
}

#[test]
fn greedy_tokens_identical_for_64_steps() {
    let Some(c) = ctx() else { return };
    let (_d, m) = model_dir(11);
    let opts = RunOptions::default();
    let mut gpu = gpu_engine(c, &m, EngineOptions::default());
    let mut cpu = CpuModel::from_model_dir(&m).unwrap();
    let p = prompt(5, 3);
    let mut streamed = Vec::new();
    let g = gpu
        .generate_greedy(&p, 64, &opts, |t| streamed.push(t))
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
    // Decoding reads back only the sampled id once every expert it routes to is resident.
    let s = gpu.stats().clone();
    assert!(
        s.readback_bytes < s.readbacks * 4 + s.readbacks * 8 * 2 * 8,
        "{s:?}"
    );
}

/// Counts every load, per (layer, expert).
#[derive(Clone, Default)]
struct Counting {
    inner: Arc<Mutex<Option<web_node::model::load::DirExpertSource>>>,
    loads: Arc<Mutex<HashMap<(usize, usize), usize>>>,
}

impl ExpertSource for Counting {
    fn load_expert(&mut self, layer: usize, expert: usize) -> Result<ExpertWeights, ModelError> {
        *self
            .loads
            .lock()
            .unwrap()
            .entry((layer, expert))
            .or_default() += 1;
        self.inner
            .lock()
            .unwrap()
            .as_mut()
            .unwrap()
            .load_expert(layer, expert)
    }
}

#[test]
fn only_routed_experts_load_each_once() {
    let Some(c) = ctx() else { return };
    let (_d, m) = model_dir(5);
    let src = Counting {
        inner: Arc::new(Mutex::new(Some(m.expert_source().unwrap()))),
        ..Default::default()
    };
    let loads = src.loads.clone();
    let mut gpu = Engine::new(
        shared_ctx(c),
        &m.config,
        &m.shared,
        &m.routers,
        Box::new(src),
    )
    .unwrap();
    let mut cpu = CpuModel::from_model_dir(&m).unwrap();
    let opts = RunOptions::default();
    let p = prompt(2, 9);
    gpu.forward(&p, &opts).unwrap();
    cpu.forward(&p, &opts).unwrap();
    for t in [17u32, 200, 17] {
        gpu.next_token(&[t], &opts).unwrap();
        cpu.forward(&[t], &opts).unwrap();
    }
    let loads = loads.lock().unwrap().clone();
    let routed = &cpu.routing_stats().tokens_routed;
    let mut expected = 0;
    for (l, row) in routed.iter().enumerate() {
        for (e, &n) in row.iter().enumerate() {
            let got = loads.get(&(l, e)).copied().unwrap_or(0);
            assert_eq!(
                got,
                usize::from(n > 0),
                "layer {l} expert {e}: routed {n} times, loaded {got} times"
            );
            assert_eq!(gpu.is_expert_resident(l, e), n > 0);
            expected += usize::from(n > 0);
        }
    }
    assert_eq!(gpu.stats().experts_loaded as usize, expected);
    // 5 tokens x top-2 cannot touch all 8 experts of every layer: some stay unloaded.
    assert!(expected < 4 * 8, "every expert was loaded");
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
    let mut gpu = gpu_engine(
        c,
        &m,
        EngineOptions {
            max_seq: 8,
            max_batch: 4,
            ..Default::default()
        },
    );
    gpu.forward(&[1, 2], &opts).unwrap();
    assert!(matches!(
        gpu.forward(&[259], &opts),
        Err(ModelError::Input(_))
    ));
    assert!(matches!(gpu.forward(&[], &opts), Err(ModelError::Input(_))));
    assert!(matches!(
        gpu.forward(
            &[1],
            &RunOptions {
                top_k: Some(0),
                use_moe: true
            }
        ),
        Err(ModelError::Input(_))
    ));
    assert!(matches!(
        gpu.forward(
            &[1],
            &RunOptions {
                top_k: Some(9),
                use_moe: true
            }
        ),
        Err(ModelError::Input(_))
    ));
    assert!(
        matches!(gpu.forward(&[1; 7], &opts), Err(ModelError::Input(_))),
        "context of 8 overflows"
    );
    assert_eq!(gpu.position(), 2);

    // A source that fails: error, position unchanged, and the engine still works after.
    let mut e = Engine::new(
        shared_ctx(c),
        &m.config,
        &m.shared,
        &m.routers,
        Box::new(Failing),
    )
    .unwrap();
    assert!(matches!(
        e.forward(&[1, 2, 3], &opts),
        Err(ModelError::Source(_))
    ));
    assert_eq!(e.position(), 0);
    e.set_source(Box::new(m.expert_source().unwrap()));
    let a = e.forward(&[1, 2, 3], &opts).unwrap();
    let mut cpu = CpuModel::from_model_dir(&m).unwrap();
    assert_logits_close(
        &a,
        &cpu.forward(&[1, 2, 3], &opts).unwrap(),
        "after failed load",
    );

    // Wrong shapes are refused at construction.
    let mut bad = m.shared.clone();
    bad.norm.pop();
    assert!(matches!(
        Engine::new(
            shared_ctx(c),
            &m.config,
            &bad,
            &m.routers,
            Box::new(Failing)
        ),
        Err(ModelError::Tensor { .. })
    ));
    assert!(Engine::new(
        shared_ctx(c),
        &m.config,
        &m.shared,
        &m.routers[..3],
        Box::new(Failing)
    )
    .is_err());
}

#[test]
fn reset_replays_identically() {
    let Some(c) = ctx() else { return };
    let (_d, m) = model_dir(21);
    let opts = RunOptions::default();
    let mut gpu = gpu_engine(c, &m, EngineOptions::default());
    let a = gpu.forward(&prompt(6, 2), &opts).unwrap();
    gpu.forward(&[4, 5, 6], &opts).unwrap();
    Forward::reset(&mut gpu);
    assert_eq!(gpu.position(), 0);
    let b = gpu.forward(&prompt(6, 2), &opts).unwrap();
    assert_eq!(a, b);
}

/// Rounds every expert through f16 (the CPU side of the f16 comparison).
struct Rounded(web_node::model::load::DirExpertSource);
impl ExpertSource for Rounded {
    fn load_expert(&mut self, layer: usize, expert: usize) -> Result<ExpertWeights, ModelError> {
        let mut w = self.0.load_expert(layer, expert)?;
        for m in [&mut w.w1, &mut w.w2, &mut w.w3] {
            m.data = round_f16(&m.data);
        }
        Ok(w)
    }
}

#[test]
fn f16_weights_match_cpu_on_the_same_rounded_weights() {
    let Some(c) = ctx() else { return };
    let (_d, m) = model_dir(13);
    let mut gpu = gpu_engine(
        c,
        &m,
        EngineOptions {
            weights: WeightFormat::F16,
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
    let g = gpu.forward_all_logits(&p, &opts).unwrap();
    let r = cpu.forward_all_logits_with(&p, &opts).unwrap();
    for (i, (a, b)) in g.iter().zip(&r).enumerate() {
        assert_logits_close(a, b, &format!("f16 position {i}"));
    }
    let mut tok = argmax(&g[g.len() - 1]);
    let mut gen = Vec::new();
    for _ in 0..32 {
        gen.push(tok);
        tok = gpu.next_token(&[tok], &opts).unwrap();
    }
    let mut tok = argmax(&r[r.len() - 1]);
    let mut want = Vec::new();
    for _ in 0..32 {
        want.push(tok);
        tok = argmax(&cpu.forward(&[tok], &opts).unwrap());
    }
    assert_eq!(gen, want);
    assert!(
        gpu.weight_bytes_per_token(2)
            < gpu_engine(c, &m, EngineOptions::default()).weight_bytes_per_token(2)
    );
}
