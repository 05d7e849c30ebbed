#![allow(clippy::unwrap_used, clippy::expect_used)]
//! CPU reference forward: against candle-transformers' Mixtral on a random
//! checkpoint written to a temp dir, KV cache, top-k / dense options,
//! selective expert loading, weight-loading errors and generation.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::mixtral;
use web_node::model::generate::{generate, generate_from_ids, Generator, StopReason};
use web_node::model::load::{BytesExpertSource, ModelDir};
use web_node::model::random::{random_model_bytes, tiny_config, write_random_model};
use web_node::model::reference::CpuModel;
use web_node::model::sampler::{argmax, Sampler, SamplerConfig};
use web_node::model::{
    Config, ExpertSource, ExpertWeights, Forward, ModelError, RouterWeights, RunOptions,
    SharedWeights,
};

fn candle_model(cfg: &Config, dir: &std::path::Path) -> mixtral::Model {
    let c: mixtral::Config = serde_json::from_value(serde_json::json!({
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_kv_heads(),
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta(),
        "sliding_window": cfg.max_position_embeddings,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "num_local_experts": cfg.num_local_experts,
        "use_flash_attn": false,
    }))
    .unwrap();
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let vb = VarBuilder::from_buffered_safetensors(bytes, DType::F32, &Device::Cpu).unwrap();
    mixtral::Model::new(&c, vb).unwrap()
}

fn candle_forward(m: &mut mixtral::Model, tokens: &[u32], offset: usize) -> Vec<f32> {
    let input = Tensor::new(tokens, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    m.forward(&input, offset)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn tiny_dir(seed: u64) -> (tempfile::TempDir, ModelDir) {
    let tmp = tempfile::tempdir().unwrap();
    write_random_model(tmp.path(), &tiny_config(), seed).unwrap();
    let dir = ModelDir::load(tmp.path()).unwrap();
    (tmp, dir)
}

const PROMPT: &[u32] = &[0, 75, 104, 111, 32, 100, 118, 50, 7, 200, 13, 255, 3];

#[test]
fn logits_match_candle_per_position() {
    let (tmp, dir) = tiny_dir(11);
    let cfg = dir.config.clone();
    let mut ours = CpuModel::from_model_dir(&dir).unwrap();
    let all = ours.forward_all_logits(PROMPT).unwrap();
    let mut theirs = candle_model(&cfg, tmp.path());
    for (i, &t) in PROMPT.iter().enumerate() {
        let c = candle_forward(&mut theirs, &[t], i);
        let e = rel_err(&all[i], &c);
        assert!(e < 1e-4, "position {i}: relative error {e}");
    }
    // Candle's batched prefill (masked attention) gives the same last logits.
    let mut theirs = candle_model(&cfg, tmp.path());
    let c = candle_forward(&mut theirs, PROMPT, 0);
    let e = rel_err(all.last().unwrap(), &c);
    assert!(e < 1e-4, "prefill: relative error {e}");
}

#[test]
fn greedy_tokens_match_candle_for_64_steps() {
    let (tmp, dir) = tiny_dir(5);
    let cfg = dir.config.clone();
    let mut theirs = candle_model(&cfg, tmp.path());
    let mut logits = candle_forward(&mut theirs, PROMPT, 0);
    let mut expect = Vec::new();
    for _ in 0..64 {
        let next = argmax(&logits);
        expect.push(next);
        logits = candle_forward(&mut theirs, &[next], PROMPT.len() + expect.len() - 1);
    }
    let mut ours = CpuModel::from_model_dir(&dir).unwrap();
    // No EOS in this comparison: it is a plain argmax chain.
    let mut got = Vec::new();
    let mut logits = ours.forward(PROMPT, &RunOptions::default()).unwrap();
    for _ in 0..64 {
        let next = argmax(&logits);
        got.push(next);
        logits = ours.forward(&[next], &RunOptions::default()).unwrap();
    }
    assert_eq!(got, expect);
    assert_eq!(ours.position(), PROMPT.len() + 64);
    // The tokens are not one repeated token: the comparison means something.
    let distinct: std::collections::BTreeSet<_> = got.iter().collect();
    assert!(distinct.len() > 3, "{got:?}");
}

#[test]
fn incremental_kv_cache_equals_full_sequence() {
    let (_tmp, dir) = tiny_dir(3);
    let mut full = CpuModel::from_model_dir(&dir).unwrap();
    let all = full.forward_all_logits(PROMPT).unwrap();
    let mut inc = CpuModel::from_model_dir(&dir).unwrap();
    let opts = RunOptions::default();
    // Split in uneven chunks: 5 + 1 + 7.
    let a = inc.forward(&PROMPT[..5], &opts).unwrap();
    assert!(rel_err(&a, &all[4]) < 1e-5);
    let b = inc.forward(&PROMPT[5..6], &opts).unwrap();
    assert!(rel_err(&b, &all[5]) < 1e-5);
    let c = inc.forward(&PROMPT[6..], &opts).unwrap();
    assert!(rel_err(&c, &all[PROMPT.len() - 1]) < 1e-5);
    assert_eq!(inc.position(), PROMPT.len());
    inc.reset();
    assert_eq!(inc.position(), 0);
    let again = inc.forward(PROMPT, &opts).unwrap();
    assert_eq!(again, *all.last().unwrap());
}

struct Counting<S> {
    inner: S,
    loads: Arc<Mutex<Vec<(usize, usize)>>>,
}

impl<S: ExpertSource> ExpertSource for Counting<S> {
    fn load_expert(&mut self, layer: usize, expert: usize) -> Result<ExpertWeights, ModelError> {
        self.loads.lock().unwrap().push((layer, expert));
        self.inner.load_expert(layer, expert)
    }
}

#[test]
fn only_routed_experts_load_each_once() {
    let (_tmp, dir) = tiny_dir(9);
    let cfg = dir.config.clone();
    let loads = Arc::new(Mutex::new(Vec::new()));
    let src = Counting {
        inner: dir.expert_source().unwrap(),
        loads: loads.clone(),
    };
    let mut m = CpuModel::new(cfg.clone(), dir.shared.clone(), dir.routers.clone(), src).unwrap();
    m.forward(&PROMPT[..1], &RunOptions::default()).unwrap();
    {
        let l = loads.lock().unwrap();
        // One token, top-2: exactly 2 experts per layer.
        assert_eq!(l.len(), 2 * cfg.num_hidden_layers, "{l:?}");
    }
    let mut next = 0;
    for _ in 0..20 {
        let logits = m.forward(&[next], &RunOptions::default()).unwrap();
        next = argmax(&logits);
    }
    m.forward(&PROMPT[1..], &RunOptions::default()).unwrap();
    let l = loads.lock().unwrap().clone();
    let mut sorted = l.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), l.len(), "an expert loaded twice: {l:?}");
    let stats = m.routing_stats();
    let routed: Vec<(usize, usize)> = stats.routed().iter().map(|&(a, b, _)| (a, b)).collect();
    assert_eq!(routed, sorted, "loaded set differs from the routed set");
    assert_eq!(stats.experts_loaded as usize, l.len());
    let per_layer_tokens: u64 = stats.tokens_routed[0].iter().sum();
    assert_eq!(per_layer_tokens, 2 * (1 + 20 + PROMPT.len() as u64 - 1));
    for layer in 0..cfg.num_hidden_layers {
        for e in 0..cfg.num_local_experts {
            assert_eq!(m.is_expert_loaded(layer, e), sorted.contains(&(layer, e)));
        }
    }
}

#[test]
fn top_k_override_and_dense_mode() {
    let (_tmp, dir) = tiny_dir(4);
    let cfg = dir.config.clone();
    let run = |opts: RunOptions| {
        let mut m = CpuModel::from_model_dir(&dir).unwrap();
        let l = m.forward(PROMPT, &opts).unwrap();
        (l, m.routing_stats().clone())
    };
    let (dense, ds) = run(RunOptions {
        top_k: None,
        use_moe: false,
    });
    let (all_k, _) = run(RunOptions {
        top_k: Some(cfg.num_local_experts),
        use_moe: true,
    });
    assert!(
        rel_err(&all_k, &dense) < 1e-5,
        "top_k = num_experts must equal dense"
    );
    assert!(ds
        .tokens_routed
        .iter()
        .flatten()
        .all(|&c| c == PROMPT.len() as u64));
    let (k2, s2) = run(RunOptions::default());
    let (k2b, _) = run(RunOptions {
        top_k: Some(2),
        use_moe: true,
    });
    assert_eq!(k2, k2b);
    assert!(rel_err(&k2, &dense) > 1e-3, "top-2 must differ from dense");
    let (k1, s1) = run(RunOptions {
        top_k: Some(1),
        use_moe: true,
    });
    assert!(rel_err(&k1, &k2) > 1e-3);
    let count = |s: &web_node::model::reference::RoutingStats| -> u64 {
        s.tokens_routed.iter().flatten().sum()
    };
    let n = (PROMPT.len() * cfg.num_hidden_layers) as u64;
    assert_eq!(count(&s1), n);
    assert_eq!(count(&s2), 2 * n);
    let mut m = CpuModel::from_model_dir(&dir).unwrap();
    for k in [0, cfg.num_local_experts + 1] {
        let r = m.forward(
            PROMPT,
            &RunOptions {
                top_k: Some(k),
                use_moe: true,
            },
        );
        assert!(matches!(r, Err(ModelError::Input(_))), "{k}");
    }
    assert_eq!(m.position(), 0);
}

#[test]
fn bad_inputs_are_errors_and_leave_the_cache_alone() {
    let (_tmp, dir) = tiny_dir(1);
    let mut m = CpuModel::from_model_dir(&dir).unwrap();
    let opts = RunOptions::default();
    m.forward(&[0, 5], &opts).unwrap();
    assert!(matches!(m.forward(&[], &opts), Err(ModelError::Input(_))));
    assert!(matches!(
        m.forward(&[3, 259], &opts),
        Err(ModelError::Input(_))
    ));
    assert_eq!(m.position(), 2);
    let long = vec![3u32; dir.config.max_position_embeddings];
    assert!(matches!(m.forward(&long, &opts), Err(ModelError::Input(_))));
    assert_eq!(m.position(), 2);
}

/// An expert source that fails, or hands out wrong shapes.
struct Broken(bool);
impl ExpertSource for Broken {
    fn load_expert(&mut self, _: usize, _: usize) -> Result<ExpertWeights, ModelError> {
        if self.0 {
            return Err(ModelError::Source("peer went away".into()));
        }
        let m = web_node::model::Mat::new(2, 2, vec![0.0; 4]).unwrap();
        Ok(ExpertWeights {
            w1: m.clone().into(),
            w2: m.clone().into(),
            w3: m.into(),
        })
    }
}

#[test]
fn failing_expert_source_is_an_error_and_rolls_back() {
    let (_tmp, dir) = tiny_dir(2);
    for fail in [true, false] {
        let mut m = CpuModel::new(
            dir.config.clone(),
            dir.shared.clone(),
            dir.routers.clone(),
            Broken(fail),
        )
        .unwrap();
        let r = m.forward(PROMPT, &RunOptions::default());
        assert!(matches!(r, Err(ModelError::Source(_))), "{r:?}");
        assert_eq!(m.position(), 0);
        // Once a working source is given, the same model runs and matches a fresh one.
        m.set_source(dir.expert_source().unwrap());
        let a = m.forward(PROMPT, &RunOptions::default()).unwrap();
        let b = CpuModel::from_model_dir(&dir)
            .unwrap()
            .forward(PROMPT, &RunOptions::default())
            .unwrap();
        assert_eq!(a, b);
    }
}

fn rewrite(bytes: &[u8], f: impl Fn(&str, &mut Vec<usize>, &mut Vec<u8>) -> bool) -> Vec<u8> {
    use safetensors::tensor::{Dtype, TensorView};
    let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
    let mut owned: Vec<(String, Vec<usize>, Vec<u8>, Dtype)> = Vec::new();
    for (name, view) in st.tensors() {
        let mut shape = view.shape().to_vec();
        let mut data = view.data().to_vec();
        if f(&name, &mut shape, &mut data) {
            owned.push((name, shape, data, view.dtype()));
        }
    }
    let views: Vec<(String, TensorView)> = owned
        .iter()
        .map(|(n, s, d, t)| (n.clone(), TensorView::new(*t, s.clone(), d).unwrap()))
        .collect();
    safetensors::tensor::serialize(views, &None).unwrap()
}

#[test]
fn weight_loading_errors_are_clear() {
    let cfg = tiny_config();
    let m = random_model_bytes(&cfg, 1).unwrap();
    let st = &m.safetensors;
    assert!(SharedWeights::from_safetensors(&cfg, st).is_ok());
    // Garbage and truncated bytes.
    for bad in [&b"not safetensors"[..], &st[..st.len() / 2], &[][..]] {
        assert!(matches!(
            SharedWeights::from_safetensors(&cfg, bad),
            Err(ModelError::Safetensors(_))
        ));
    }
    // Missing tensor.
    let q = "model.layers.1.self_attn.q_proj.weight";
    let missing = rewrite(st, |n, _, _| n != q);
    match SharedWeights::from_safetensors(&cfg, &missing) {
        Err(ModelError::Tensor { name, reason }) => {
            assert_eq!(name, q);
            assert!(reason.contains("missing"));
        }
        other => panic!("{other:?}"),
    }
    // Wrong shape (same number of bytes, transposed-looking shape).
    let w1 = "model.layers.0.block_sparse_moe.experts.3.w1.weight";
    let reshaped = rewrite(st, |n, s, _| {
        if n == w1 {
            s.reverse();
        }
        true
    });
    match ExpertWeights::from_safetensors(&cfg, 0, 3, &reshaped) {
        Err(ModelError::Tensor { name, reason }) => {
            assert_eq!(name, w1);
            assert!(reason.contains("shape"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert!(ExpertWeights::from_safetensors(&cfg, 0, 4, &reshaped).is_ok());
    // Out-of-spec slots.
    assert!(matches!(
        ExpertWeights::from_safetensors(&cfg, 0, 8, st),
        Err(ModelError::SlotOutOfRange { .. })
    ));
    assert!(matches!(
        RouterWeights::from_safetensors(&cfg, 4, st),
        Err(ModelError::SlotOutOfRange { .. })
    ));
    // Unsupported dtype.
    let gate = "model.layers.2.block_sparse_moe.gate.weight";
    let as_i32 = {
        use safetensors::tensor::{Dtype, TensorView};
        let src = safetensors::SafeTensors::deserialize(st).unwrap();
        let view = src.tensor(gate).unwrap();
        let data = view.data().to_vec();
        let v = TensorView::new(Dtype::I32, view.shape().to_vec(), &data).unwrap();
        safetensors::tensor::serialize([(gate.to_string(), v)], &None).unwrap()
    };
    match RouterWeights::from_safetensors(&cfg, 2, &as_i32) {
        Err(ModelError::Tensor { reason, .. }) => assert!(reason.contains("I32"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn single_slot_payloads_and_half_precision_load() {
    use safetensors::tensor::{Dtype, TensorView};
    let cfg = tiny_config();
    let m = random_model_bytes(&cfg, 6).unwrap();
    let full = ExpertWeights::from_safetensors(&cfg, 1, 2, &m.safetensors).unwrap();
    let src = safetensors::SafeTensors::deserialize(&m.safetensors).unwrap();
    let prefix = "model.layers.1.block_sparse_moe.experts.2.";
    let mut f32_parts = Vec::new();
    let mut f16_parts = Vec::new();
    let mut bf16_parts = Vec::new();
    for w in ["w1", "w2", "w3"] {
        let name = format!("{prefix}{w}.weight");
        let v = src.tensor(&name).unwrap();
        let vals: Vec<f32> = v
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let h: Vec<u8> = vals
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect();
        let b: Vec<u8> = vals
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect();
        f32_parts.push((name.clone(), v.shape().to_vec(), v.data().to_vec()));
        f16_parts.push((name.clone(), v.shape().to_vec(), h));
        bf16_parts.push((name, v.shape().to_vec(), b));
    }
    let ser = |parts: &[(String, Vec<usize>, Vec<u8>)], dt: Dtype| {
        let views: Vec<(String, TensorView)> = parts
            .iter()
            .map(|(n, s, d)| (n.clone(), TensorView::new(dt, s.clone(), d).unwrap()))
            .collect();
        safetensors::tensor::serialize(views, &None).unwrap()
    };
    let payload = ser(&f32_parts, Dtype::F32);
    assert_eq!(
        ExpertWeights::from_safetensors(&cfg, 1, 2, &payload).unwrap(),
        full
    );
    // A payload for expert 2 is not expert 3.
    assert!(matches!(
        ExpertWeights::from_safetensors(&cfg, 1, 3, &payload),
        Err(ModelError::Tensor { .. })
    ));
    for (dt, parts, tol) in [
        (Dtype::F16, &f16_parts, 1e-3),
        (Dtype::BF16, &bf16_parts, 1e-2),
    ] {
        let p = ser(parts, dt);
        let got = ExpertWeights::from_safetensors(&cfg, 1, 2, &p).unwrap();
        for (a, b) in got.w2.to_f32().data.iter().zip(&full.w2.to_f32().data) {
            assert!(
                (a - b).abs() <= tol * b.abs().max(1e-2),
                "{dt:?}: {a} vs {b}"
            );
        }
    }
}

#[test]
fn model_dir_errors() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(matches!(ModelDir::load(tmp.path()), Err(ModelError::Io(_))));
    write_random_model(tmp.path(), &tiny_config(), 1).unwrap();
    std::fs::write(tmp.path().join("config.json"), b"{\"vocab_size\": 3}").unwrap();
    assert!(matches!(
        ModelDir::load(tmp.path()),
        Err(ModelError::Config(_))
    ));
    write_random_model(tmp.path(), &tiny_config(), 1).unwrap();
    std::fs::write(tmp.path().join("tokenizer.json"), b"[]").unwrap();
    assert!(matches!(
        ModelDir::load(tmp.path()),
        Err(ModelError::Tokenizer(_))
    ));
    write_random_model(tmp.path(), &tiny_config(), 1).unwrap();
    let st = std::fs::read(tmp.path().join("model.safetensors")).unwrap();
    std::fs::write(tmp.path().join("model.safetensors"), &st[..st.len() - 10]).unwrap();
    assert!(matches!(
        ModelDir::load(tmp.path()),
        Err(ModelError::Safetensors(_))
    ));
    // A config whose hidden size disagrees with the weights.
    write_random_model(tmp.path(), &tiny_config(), 1).unwrap();
    let mut other = tiny_config();
    other.hidden_size = 64;
    std::fs::write(
        tmp.path().join("config.json"),
        web_node::model::random::config_json(&other).unwrap(),
    )
    .unwrap();
    assert!(matches!(
        ModelDir::load(tmp.path()),
        Err(ModelError::Tensor { .. })
    ));
    assert!(ModelDir::load(tmp.path().join("nope")).is_err());
}

#[test]
fn in_memory_model_matches_directory_model() {
    let cfg = tiny_config();
    let m = random_model_bytes(&cfg, 8).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    write_random_model(tmp.path(), &cfg, 8).unwrap();
    let dir = ModelDir::load(tmp.path()).unwrap();
    let mut a = CpuModel::from_safetensors(cfg.clone(), m.safetensors.clone()).unwrap();
    let mut b = CpuModel::from_model_dir(&dir).unwrap();
    let opts = RunOptions::default();
    assert_eq!(
        a.forward(PROMPT, &opts).unwrap(),
        b.forward(PROMPT, &opts).unwrap()
    );
    assert!(BytesExpertSource::new(cfg, b"junk".to_vec()).is_err());
}

#[test]
fn generate_streams_and_stops() {
    let (_tmp, dir) = tiny_dir(12);
    let mut m = CpuModel::from_model_dir(&dir).unwrap();
    let mut pieces = String::new();
    let mut count = 0;
    let g = generate(
        &mut m,
        &dir.tokenizer,
        "Hello there",
        10,
        &mut Sampler::greedy(),
        &RunOptions::default(),
        |_, p| {
            pieces.push_str(p);
            count += 1;
            true
        },
    )
    .unwrap();
    assert_eq!(
        g.prompt_tokens,
        dir.tokenizer.encode("Hello there").unwrap()
    );
    assert_eq!(g.prompt_tokens[0], 0);
    assert!(g.tokens.len() <= 10);
    if g.stop == StopReason::MaxTokens {
        assert_eq!(g.tokens.len(), 10);
    }
    assert_eq!(count, g.tokens.len());
    assert_eq!(pieces, g.text);
    // Same seed, same output; the callback can stop early.
    let cfg = SamplerConfig {
        temperature: 0.8,
        top_p: 0.9,
        seed: 77,
    };
    let run = |m: &mut CpuModel| {
        generate(
            m,
            &dir.tokenizer,
            "abc",
            12,
            &mut Sampler::new(cfg).unwrap(),
            &RunOptions::default(),
            |_, _| true,
        )
        .unwrap()
    };
    assert_eq!(run(&mut m), run(&mut m));
    let g = generate_from_ids(
        &mut m,
        &dir.tokenizer,
        vec![0, 70],
        50,
        &mut Sampler::greedy(),
        &RunOptions::default(),
        |_, _| false,
    )
    .unwrap();
    assert_eq!((g.tokens.len(), g.stop), (1, StopReason::Callback));
}

/// A model that always says EOS after two tokens.
struct Eosy {
    cfg: Config,
    pos: usize,
}
impl Forward for Eosy {
    fn run(
        &mut self,
        tokens: &[u32],
        _: &RunOptions,
        _: web_node::model::Want,
    ) -> Result<web_node::model::Output, ModelError> {
        self.pos += tokens.len();
        let mut l = vec![0.0; self.cfg.vocab_size];
        l[if self.pos >= 5 { 1 } else { 70 }] = 10.0;
        Ok(web_node::model::Output::Logits(l))
    }
    fn reset(&mut self) {
        self.pos = 0;
    }
    fn position(&self) -> usize {
        self.pos
    }
    fn config(&self) -> &Config {
        &self.cfg
    }
}

#[test]
fn generate_stops_at_eos() {
    let (_tmp, dir) = tiny_dir(1);
    let mut m = Eosy {
        cfg: tiny_config(),
        pos: 0,
    };
    let g = generate_from_ids(
        &mut m,
        &dir.tokenizer,
        vec![0, 1, 2],
        50,
        &mut Sampler::greedy(),
        &RunOptions::default(),
        |_, _| true,
    )
    .unwrap();
    assert_eq!(g.stop, StopReason::Eos);
    assert_eq!(g.tokens, vec![70, 70]);
    assert_eq!(g.text, "CC");
}

#[test]
fn fixed_length_generation_keeps_going_past_eos() {
    let (_tmp, dir) = tiny_dir(1);
    let mut m = Eosy {
        cfg: tiny_config(),
        pos: 0,
    };
    let mut s = Sampler::greedy();
    let mut g = Generator::new(vec![0, 1, 2], 6, &m.cfg)
        .unwrap()
        .ignore_eos(true);
    let mut seen = Vec::new();
    while let Some(input) = g.input() {
        let input = input.to_vec();
        let out = m
            .run(&input, &RunOptions::default(), Generator::want(&s))
            .unwrap();
        seen.extend(g.push(out, &mut s, &dir.tokenizer).unwrap().map(|p| p.0));
    }
    let g = g.finish(&dir.tokenizer).unwrap();
    assert_eq!(g.stop, StopReason::MaxTokens);
    assert_eq!(g.tokens, vec![70, 70, 1, 1, 1, 1]);
    assert_eq!(seen, g.tokens);
    assert_eq!(m.position(), 3 + 5);
}
