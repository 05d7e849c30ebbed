#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The non-Mixtral families (OLMoE, Qwen2-MoE, Qwen3-MoE) on the CPU
//! reference engine:
//! - against candle-transformers' `qwen2_moe` and `qwen3_moe` on tiny random
//!   checkpoints (logits per position, 16 greedy tokens);
//! - against Hugging Face transformers through committed fixtures
//!   (`tests/fixtures/families/*`, made by `scripts/make_family_fixtures.py`):
//!   the last position's logits and 16 greedy tokens;
//! - config refusals that name the field, slot names and tensors per family,
//!   chain validation of a shared-expert block, and a model built from a
//!   verified chain of Qwen2-MoE blocks.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::{qwen2_moe, qwen3_moe};
use ed25519_dalek::SigningKey;
use web_node::chain::{check_tensor_header, limits, MetaPayload};
use web_node::chain_model::{startup_blocks, ChainModel};
use web_node::model::checkpoint::{split_checkpoint, Signer};
use web_node::model::engine::now;
use web_node::model::load::BytesExpertSource;
use web_node::model::random::{random_model_bytes, tiny_family_config, write_random_model};
use web_node::model::reference::CpuModel;
use web_node::model::sampler::argmax;
use web_node::model::{run_step, Config, Family, Forward, Output, RunOptions, Slot, Want};
use web_node::verify::{verify_chain_dag, FetchedBlock};

type JsonMap = serde_json::Map<String, serde_json::Value>;
type ConfigEdit = Box<dyn FnOnce(&mut JsonMap)>;
type Blocks = Vec<(web_node::chain::Block, Vec<u8>)>;
type Rename<'a> = &'a dyn Fn(&str, &[usize]) -> (String, Vec<usize>);

const PROMPT: &[u32] = &[0, 75, 104, 111, 32, 100, 118, 50, 7, 200, 13, 255, 3];

fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// A candle causal LM of either Qwen family.
enum Candle {
    Qwen2(qwen2_moe::Model),
    Qwen3(qwen3_moe::ModelForCausalLM),
}

impl Candle {
    fn new(cfg: &Config, dir: &Path) -> Self {
        let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
        let vb = VarBuilder::from_buffered_safetensors(bytes, DType::F32, &Device::Cpu).unwrap();
        let ff = &cfg.family_fields;
        let mut j = serde_json::json!({
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_kv_heads(),
            "max_position_embeddings": cfg.max_position_embeddings,
            "sliding_window": cfg.max_position_embeddings,
            "max_window_layers": cfg.num_hidden_layers,
            "tie_word_embeddings": cfg.tie_word_embeddings,
            "rope_theta": cfg.rope_theta(),
            "rms_norm_eps": cfg.rms_norm_eps,
            "use_sliding_window": false,
            "hidden_act": "silu",
            "decoder_sparse_step": 1,
            "moe_intermediate_size": ff.moe_intermediate_size.unwrap(),
            "num_experts_per_tok": cfg.num_experts_per_tok,
            "num_experts": cfg.num_local_experts,
            "norm_topk_prob": ff.norm_topk_prob.unwrap_or(false),
        });
        match cfg.family() {
            Family::Qwen2Moe => {
                j["shared_expert_intermediate_size"] =
                    ff.shared_expert_intermediate_size.unwrap().into();
                let c: qwen2_moe::Config = serde_json::from_value(j).unwrap();
                Candle::Qwen2(qwen2_moe::Model::new(&c, vb).unwrap())
            }
            Family::Qwen3Moe => {
                j["head_dim"] = cfg.head_dim().into();
                j["attention_bias"] = false.into();
                let c: qwen3_moe::Config = serde_json::from_value(j).unwrap();
                Candle::Qwen3(qwen3_moe::ModelForCausalLM::new(&c, vb).unwrap())
            }
            f => panic!("candle has no {f:?}"),
        }
    }

    fn forward(&mut self, tokens: &[u32], offset: usize) -> Vec<f32> {
        let input = Tensor::new(tokens, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let out = match self {
            Candle::Qwen2(m) => m.forward(&input, offset),
            Candle::Qwen3(m) => m.forward(&input, offset),
        };
        out.unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    }
}

fn random_dir(family: Family, seed: u64) -> (tempfile::TempDir, Config) {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny_family_config(family);
    write_random_model(tmp.path(), &cfg, seed).unwrap();
    (tmp, cfg)
}

fn model_of_dir(dir: &Path) -> CpuModel {
    let cfg = Config::from_json(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    CpuModel::from_safetensors(cfg, bytes).unwrap()
}

fn candle_matches(family: Family, seed: u64) -> f32 {
    let (tmp, cfg) = random_dir(family, seed);
    let mut ours = model_of_dir(tmp.path());
    let all = ours.forward_all_logits(PROMPT).unwrap();
    let mut worst = 0f32;
    // Position by position through candle's KV cache.
    let mut theirs = Candle::new(&cfg, tmp.path());
    for (i, &t) in PROMPT.iter().enumerate() {
        let c = theirs.forward(&[t], i);
        let e = rel_err(&all[i], &c);
        assert!(e <= 1e-4, "{family:?} position {i}: relative error {e}");
        assert_eq!(argmax(&all[i]), argmax(&c), "{family:?} position {i}");
        worst = worst.max(e);
    }
    // Batched prefill (masked attention) and 16 greedy tokens.
    let mut theirs = Candle::new(&cfg, tmp.path());
    let mut logits = theirs.forward(PROMPT, 0);
    let e = rel_err(all.last().unwrap(), &logits);
    assert!(e <= 1e-4, "{family:?} prefill: relative error {e}");
    worst = worst.max(e);
    let mut expect = Vec::new();
    for _ in 0..16 {
        let next = argmax(&logits);
        expect.push(next);
        logits = theirs.forward(&[next], PROMPT.len() + expect.len() - 1);
    }
    ours.reset();
    let opts = RunOptions::default();
    let mut got = Vec::new();
    let mut logits = ours.forward(PROMPT, &opts).unwrap();
    for _ in 0..16 {
        let next = argmax(&logits);
        got.push(next);
        logits = ours.forward(&[next], &opts).unwrap();
    }
    assert_eq!(got, expect, "{family:?}");
    let distinct: HashSet<_> = got.iter().collect();
    assert!(distinct.len() > 3, "{family:?}: {got:?}");
    eprintln!("{family:?} vs candle: max relative error {worst:e}");
    worst
}

#[test]
fn qwen2_moe_matches_candle() {
    candle_matches(Family::Qwen2Moe, 21);
}

#[test]
fn qwen3_moe_matches_candle() {
    candle_matches(Family::Qwen3Moe, 22);
}

fn fixtures() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/families");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("reference.json").exists())
        .collect();
    v.sort();
    v
}

#[test]
fn every_family_matches_transformers_fixtures() {
    let dirs = fixtures();
    let families: HashSet<Family> = dirs
        .iter()
        .map(|d| model_of_dir(d).config().family())
        .collect();
    assert_eq!(
        families,
        HashSet::from([Family::Olmoe, Family::Qwen2Moe, Family::Qwen3Moe])
    );
    for dir in dirs {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let r: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
        let ids: Vec<u32> = serde_json::from_value(r["input_ids"].clone()).unwrap();
        let want: Vec<f32> = serde_json::from_value(r["last_logits"].clone()).unwrap();
        let greedy: Vec<u32> = serde_json::from_value(r["greedy_tokens"].clone()).unwrap();
        assert_eq!(greedy.len(), 16);
        let mut m = model_of_dir(&dir);
        assert_eq!(r["model_type"], m.config().family().model_type());
        // The checkpoint splits into exactly the family's slots.
        let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
        let slots = split_checkpoint(m.config(), &[&bytes]).unwrap();
        assert_eq!(
            slots.iter().map(|s| s.slot).collect::<Vec<_>>(),
            Slot::all(m.config())
        );

        let opts = RunOptions::default();
        let got = m.forward(&ids, &opts).unwrap();
        let e = rel_err(&got, &want);
        eprintln!("{name} vs transformers: max relative error {e:e}");
        assert!(e <= 1e-3, "{name}: relative error {e}");
        assert_eq!(argmax(&got), argmax(&want), "{name}");
        let mut tokens = Vec::new();
        let mut logits = got;
        for _ in 0..16 {
            let next = argmax(&logits);
            tokens.push(next);
            logits = m.forward(&[next], &opts).unwrap();
        }
        assert_eq!(tokens, greedy, "{name}");
    }
}

#[test]
fn norm_topk_prob_changes_the_output() {
    // The same Qwen3-MoE weights with and without renormalised top-k.
    let cfg = tiny_family_config(Family::Qwen3Moe);
    let m = random_model_bytes(&cfg, 4).unwrap();
    let mut off = cfg.clone();
    off.family_fields.norm_topk_prob = Some(false);
    assert!(cfg.renormalize_top_k() && !off.renormalize_top_k());
    let a = CpuModel::from_safetensors(cfg, m.safetensors.clone())
        .unwrap()
        .forward(PROMPT, &RunOptions::default())
        .unwrap();
    let b = CpuModel::from_safetensors(off, m.safetensors)
        .unwrap()
        .forward(PROMPT, &RunOptions::default())
        .unwrap();
    assert!(rel_err(&a, &b) > 1e-3);
}

fn config_err(edit: impl FnOnce(&mut JsonMap)) -> String {
    let m = random_model_bytes(&tiny_family_config(Family::Qwen2Moe), 1).unwrap();
    let mut v: serde_json::Value = serde_json::from_slice(&m.config_json).unwrap();
    edit(v.as_object_mut().unwrap());
    Config::from_value(&v).unwrap_err().to_string()
}

#[test]
fn unsupported_configs_are_refused_naming_the_field() {
    use serde_json::json;
    let cases: Vec<(&str, ConfigEdit)> = vec![
        (
            "model_type",
            Box::new(|m| {
                m.insert("model_type".into(), json!("deepseek_v3"));
            }),
        ),
        (
            "decoder_sparse_step",
            Box::new(|m| {
                m.insert("decoder_sparse_step".into(), json!(2));
            }),
        ),
        (
            "mlp_only_layers",
            Box::new(|m| {
                m.insert("mlp_only_layers".into(), json!([1]));
            }),
        ),
        (
            "moe_intermediate_size",
            Box::new(|m| {
                m.remove("moe_intermediate_size");
            }),
        ),
        (
            "shared_expert_intermediate_size",
            Box::new(|m| {
                m.remove("shared_expert_intermediate_size");
            }),
        ),
        (
            "num_experts",
            Box::new(|m| {
                m.insert("num_experts".into(), json!(6));
            }),
        ),
        (
            "hidden_act",
            Box::new(|m| {
                m.insert("hidden_act".into(), json!("gelu"));
            }),
        ),
        (
            "rope_type",
            Box::new(|m| {
                m.insert(
                    "rope_parameters".into(),
                    json!({"rope_theta": 10000.0, "rope_type": "yarn", "factor": 4.0}),
                );
            }),
        ),
        (
            "use_sliding_window",
            Box::new(|m| {
                m.insert("use_sliding_window".into(), json!(true));
            }),
        ),
    ];
    for (field, edit) in cases {
        let e = config_err(edit);
        assert!(e.contains(field), "{field}: {e}");
    }
    // OLMoE's clip_qkv and attention bias.
    let olmoe = random_model_bytes(&tiny_family_config(Family::Olmoe), 1).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&olmoe.config_json).unwrap();
    for (field, val) in [("clip_qkv", json!(8.0)), ("attention_bias", json!(true))] {
        let mut bad = v.clone();
        bad[field] = val;
        let e = Config::from_value(&bad).unwrap_err().to_string();
        assert!(e.contains(field), "{field}: {e}");
    }
    // mlp_only_layers past the last layer changes nothing in transformers.
    let mut ok = serde_json::from_slice::<serde_json::Value>(
        &random_model_bytes(&tiny_family_config(Family::Qwen3Moe), 1)
            .unwrap()
            .config_json,
    )
    .unwrap();
    ok["mlp_only_layers"] = json!([5]);
    Config::from_value(&ok).unwrap();
}

#[test]
fn slots_and_tensor_names_per_family() {
    let q2 = tiny_family_config(Family::Qwen2Moe);
    let all = Slot::all(&q2);
    assert_eq!(
        &all[..4],
        &[
            Slot::Shared,
            Slot::Router { layer: 0 },
            Slot::SharedExpert { layer: 0 },
            Slot::Expert {
                layer: 0,
                expert: 0
            }
        ]
    );
    assert_eq!(all.len(), 1 + 2 * (2 + 8));
    let se = Slot::SharedExpert { layer: 1 };
    assert_eq!(Slot::parse(&se.to_string()).unwrap(), se);
    let names: Vec<String> = se.tensors(&q2).into_iter().map(|t| t.name).collect();
    assert_eq!(
        names,
        [
            "model.layers.1.mlp.shared_expert.gate_proj.weight",
            "model.layers.1.mlp.shared_expert.down_proj.weight",
            "model.layers.1.mlp.shared_expert.up_proj.weight",
            "model.layers.1.mlp.shared_expert_gate.weight",
        ]
    );
    for t in se.tensors(&q2) {
        assert_eq!(Slot::of_tensor(&t.name), Some(se));
    }
    // Only Qwen2-MoE has a shared-expert slot.
    for f in [Family::Mixtral, Family::Olmoe, Family::Qwen3Moe] {
        let c = tiny_family_config(f);
        assert!(se.check_in_spec(&c).is_err(), "{f:?}");
        assert!(!Slot::all(&c).contains(&se));
    }
    se.check_in_spec(&q2).unwrap();
    // Routed experts: `mlp.experts.E.*_proj`, moe_intermediate_size wide.
    let q3 = tiny_family_config(Family::Qwen3Moe);
    let e = Slot::Expert {
        layer: 1,
        expert: 7,
    }
    .tensors(&q3);
    assert_eq!(e[0].name, "model.layers.1.mlp.experts.7.gate_proj.weight");
    assert_eq!(e[0].shape, vec![24, 32]);
    assert_eq!(e[1].name, "model.layers.1.mlp.experts.7.down_proj.weight");
    assert_eq!(e[1].shape, vec![32, 24]);
    // Attention extras in the shared slot.
    let shared = |c: &Config| -> Vec<(String, Vec<usize>)> {
        Slot::Shared
            .tensors(c)
            .into_iter()
            .filter(|t| {
                t.name.starts_with("model.layers.0.self_attn.") && !t.name.ends_with("proj.weight")
            })
            .map(|t| (t.name, t.shape))
            .collect()
    };
    assert_eq!(
        shared(&q3),
        [
            ("model.layers.0.self_attn.q_norm.weight".into(), vec![16]),
            ("model.layers.0.self_attn.k_norm.weight".into(), vec![16]),
        ]
    );
    assert_eq!(
        shared(&tiny_family_config(Family::Olmoe)),
        [
            ("model.layers.0.self_attn.q_norm.weight".into(), vec![32]),
            ("model.layers.0.self_attn.k_norm.weight".into(), vec![16]),
        ]
    );
    assert_eq!(
        shared(&q2),
        [
            ("model.layers.0.self_attn.q_proj.bias".into(), vec![32]),
            ("model.layers.0.self_attn.k_proj.bias".into(), vec![16]),
            ("model.layers.0.self_attn.v_proj.bias".into(), vec![16]),
        ]
    );
    assert!(shared(&tiny_family_config(Family::Mixtral)).is_empty());
}

/// A Qwen2-MoE random model as signed blocks: (block, payload), meta first.
fn qwen2_chain(seed: u64) -> (Config, Vec<u8>, Blocks) {
    let cfg = tiny_family_config(Family::Qwen2Moe);
    let m = random_model_bytes(&cfg, seed).unwrap();
    let key = SigningKey::from_bytes(&[9; 32]);
    let signer = Signer {
        key: &key,
        address: "op".into(),
        timestamp_ms: 1,
        chunk_size: limits::MIN_CHUNK_SIZE,
    };
    let json = |b: &[u8]| serde_json::from_slice::<serde_json::Value>(b).unwrap();
    let spec =
        MetaPayload::new("qwen2", json(&m.config_json), Some(json(&m.tokenizer_json))).unwrap();
    let meta = signer.meta_block(&spec, None).unwrap();
    let mut blocks = vec![meta.clone()];
    for s in split_checkpoint(&cfg, &[&m.safetensors]).unwrap() {
        blocks.push(signer.slot_block(meta.0.hash, &s, vec![], None));
    }
    (cfg, m.safetensors, blocks)
}

#[test]
fn shared_expert_blocks_are_checked_against_the_family() {
    let (cfg, _, blocks) = qwen2_chain(3);
    let (block, payload) = blocks
        .iter()
        .find(|(b, _)| b.header.name == "layer1.shared_expert")
        .unwrap();
    check_tensor_header(&block.header, payload, &cfg).unwrap();
    assert_eq!(block.header.kind.as_str(), "router");
    // Same slot, one tensor wrongly shaped, then one wrongly named.
    let st = safetensors::SafeTensors::deserialize(payload).unwrap();
    let rebuild = |f: Rename<'_>| {
        let mut owned = Vec::new();
        for (n, v) in st.tensors() {
            let (name, shape) = f(&n, v.shape());
            let data = v.data()[..shape.iter().product::<usize>() * 4].to_vec();
            owned.push((name, shape, data));
        }
        let views: Vec<_> = owned
            .iter()
            .map(|(n, s, d)| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d)
                        .unwrap(),
                )
            })
            .collect();
        safetensors::serialize(views, &None).unwrap()
    };
    let key = SigningKey::from_bytes(&[9; 32]);
    let signer = Signer {
        key: &key,
        address: "op".into(),
        timestamp_ms: 1,
        chunk_size: limits::MIN_CHUNK_SIZE,
    };
    let slot = split_checkpoint(&cfg, &[&random_model_bytes(&cfg, 3).unwrap().safetensors])
        .unwrap()
        .into_iter()
        .find(|s| s.slot == Slot::SharedExpert { layer: 1 })
        .unwrap();
    let shaped = rebuild(&|n, s| {
        if n.ends_with("shared_expert_gate.weight") {
            (n.into(), vec![1, s[1] - 1])
        } else {
            (n.into(), s.to_vec())
        }
    });
    let named = rebuild(&|n, s| {
        (
            n.replace("shared_expert.up_proj", "shared_expert.w3"),
            s.to_vec(),
        )
    });
    for (bytes, what) in [
        (
            shaped,
            "model.layers.1.mlp.shared_expert_gate.weight: shape [1, 31]",
        ),
        (
            named,
            "missing tensor model.layers.1.mlp.shared_expert.up_proj.weight",
        ),
    ] {
        let mut bad = slot.clone();
        bad.bytes = bytes;
        let (b, p) = signer.slot_block(blocks[0].0.hash, &bad, vec![], None);
        let e = check_tensor_header(&b.header, &p, &cfg)
            .unwrap_err()
            .to_string();
        assert!(e.contains(what), "{e}");
        // The whole chain check refuses it too.
        let mut listing: Vec<FetchedBlock> = blocks
            .iter()
            .filter(|(x, _)| x.header.name != "layer1.shared_expert")
            .map(|(x, p)| FetchedBlock::of(x, Some(p.clone())))
            .collect();
        listing.push(FetchedBlock::of(&b, Some(p)));
        let (report, _) = verify_chain_dag(&listing);
        assert_eq!(report.failed, 1, "{what}");
    }
}

#[test]
fn a_qwen2_chain_runs_with_shared_experts_fetched_with_the_routers() {
    let (cfg, checkpoint, blocks) = qwen2_chain(5);
    let listing: Vec<FetchedBlock> = blocks
        .iter()
        .map(|(b, p)| FetchedBlock::of(b, Some(p.clone())))
        .collect();
    let (report, dag) = verify_chain_dag(&listing);
    assert_eq!((report.verified, report.failed), (blocks.len(), 0));
    let start = startup_blocks(&dag).unwrap();
    let name = |h| {
        blocks
            .iter()
            .find(|(b, _)| b.hash == h)
            .unwrap()
            .0
            .header
            .name
            .clone()
    };
    let names: Vec<String> = start.iter().map(|&h| name(h)).collect();
    assert_eq!(
        names[1..],
        [
            "shared",
            "layer0.router",
            "layer0.shared_expert",
            "layer1.router",
            "layer1.shared_expert"
        ]
    );
    let payloads: std::collections::HashMap<_, _> = blocks
        .iter()
        .filter(|(b, _)| start.contains(&b.hash))
        .map(|(b, p)| (b.hash, std::sync::Arc::<[u8]>::from(p.as_slice())))
        .collect();
    let mut cm = ChainModel::from_verified(&dag, |h| payloads.get(h).cloned()).unwrap();
    // Without the shared-expert payloads the model cannot be built.
    let no_se = ChainModel::from_verified(&dag, |h| {
        payloads
            .get(h)
            .filter(|_| !name(*h).contains("shared_expert"))
            .cloned()
    });
    assert!(no_se.is_err());
    let mut src = BytesExpertSource::new(cfg.clone(), checkpoint.clone()).unwrap();
    let opts = RunOptions::default();
    let got = now(run_step(
        &mut cm.engine,
        &mut src,
        PROMPT,
        &opts,
        Want::Logits,
    ))
    .unwrap();
    let want = CpuModel::from_safetensors(cfg, checkpoint)
        .unwrap()
        .forward(PROMPT, &opts)
        .unwrap();
    assert_eq!(got, Output::Logits(want));
}

/// Per position `max |a - b| <= 1e-4 * max |b|` (f32 on both engines).
fn assert_positions_close(gpu: &[Vec<f32>], cpu: &[Vec<f32>], what: &str) {
    assert_eq!(gpu.len(), cpu.len(), "{what}");
    for (i, (a, b)) in gpu.iter().zip(cpu).enumerate() {
        let e = rel_err(a, b);
        assert!(e <= 1e-4, "{what} position {i}: relative error {e}");
    }
}

/// The GPU engine runs OLMoE (q/k norm over the projection), Qwen2-MoE
/// (q/k/v biases, shared expert with its sigmoid gate) and Qwen3-MoE (q/k
/// norm per head), with and without renormalised top-k: on every
/// transformers fixture, the CPU engine's logits per position and its (and
/// transformers') 16 greedy tokens, with every expert resident and with a
/// pool of top_k + 1 experts that evicts (one token per chunk); and with q8_0 experts,
/// the CPU's greedy tokens on the same quantized experts.
#[test]
fn the_gpu_engine_runs_every_family_like_the_cpu() {
    use web_node::gpu::{pool_expert_bytes, Engine, EngineOptions, PoolFormat};
    use web_node::model::quant::QuantizingSource;
    use web_node::model::{ExpertSource, QuantFormat};
    let Some(c) = crate::gpu_support::ctx() else {
        return;
    };
    let ctx = || crate::gpu_support::shared_ctx(c);
    let opts = RunOptions::default();
    let mut seen = HashSet::new();
    for dir in fixtures() {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let cfg = Config::from_json(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
        seen.insert(cfg.family());
        let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
        let r: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
        let ids: Vec<u32> = serde_json::from_value(r["input_ids"].clone()).unwrap();
        let greedy: Vec<u32> = serde_json::from_value(r["greedy_tokens"].clone()).unwrap();
        let shared = web_node::model::SharedWeights::from_safetensors(&cfg, &bytes).unwrap();
        let routers = web_node::model::load::routers_from_safetensors(&cfg, &bytes).unwrap();
        let source = || BytesExpertSource::new(cfg.clone(), bytes.clone()).unwrap();

        let mut cpu = CpuModel::from_safetensors(cfg.clone(), bytes.clone()).unwrap();
        let cpu_all = cpu.forward_all_logits(&ids).unwrap();
        let mut cpu_tokens = Vec::new();
        let mut logits = cpu_all.last().unwrap().clone();
        for _ in 0..16 {
            let next = argmax(&logits);
            cpu_tokens.push(next);
            logits = cpu.forward(&[next], &opts).unwrap();
        }
        assert_eq!(cpu_tokens, greedy, "{name}: CPU vs transformers");

        let per = pool_expert_bytes(&cfg, PoolFormat::default());
        // A pool of top_k + 1 experts (fewer than one layer's).
        let small = (cfg.num_experts_per_tok as u64 + 1) * per;
        for pool in [None, Some(small)] {
            let mut gpu = Engine::with_options(
                ctx(),
                &cfg,
                &shared,
                &routers,
                EngineOptions {
                    max_seq: 128,
                    expert_pool_bytes: pool,
                    ..Default::default()
                },
            )
            .unwrap();
            let mut src = source();
            let all = gpu.forward_all_logits(&mut src, &ids, &opts).unwrap();
            assert_positions_close(&all, &cpu_all, &format!("{name} pool {pool:?}"));
            let mut tokens = Vec::new();
            let mut next = argmax(all.last().unwrap());
            for _ in 0..16 {
                tokens.push(next);
                next = gpu.next_token(&mut src, &[next], &opts).unwrap();
            }
            assert_eq!(
                tokens, greedy,
                "{name}, pool {pool:?}: GPU vs transformers and CPU"
            );
            let s = gpu.stats();
            if pool.is_some() {
                assert!(s.expert_evictions > 0, "{name}: {s:?}");
            }
            // One decoded token: the family's dispatches, nothing else; for
            // each pause (a layer routed to a missing expert) or resumption
            // from the host cache one more submission that runs the token
            // again from that layer.
            gpu.reset_stats();
            gpu.next_token(&mut src, &[next], &opts).unwrap();
            let s = gpu.stats();
            let per = gpu.dispatches_per_step();
            let again = s.pauses + s.host_resumes;
            assert!(
                (per..=per * (1 + again)).contains(&s.dispatches),
                "{name}: {s:?}"
            );
            assert_eq!(s.submissions, 1 + again, "{name}: {s:?}");
        }

        // The dense mixture (softmax over every expert) and a top_k override.
        for o in [
            RunOptions {
                top_k: None,
                use_moe: false,
            },
            RunOptions {
                top_k: Some(1),
                use_moe: true,
            },
        ] {
            let mut gpu = Engine::with_options(
                ctx(),
                &cfg,
                &shared,
                &routers,
                EngineOptions {
                    max_seq: 128,
                    ..Default::default()
                },
            )
            .unwrap();
            let g = gpu.forward(&mut source(), &ids, &o).unwrap();
            let mut cpu = CpuModel::from_safetensors(cfg.clone(), bytes.clone()).unwrap();
            let want = cpu.forward(&ids, &o).unwrap();
            let e = rel_err(&g, &want);
            assert!(e <= 1e-4, "{name} {o:?}: relative error {e}");
        }

        // q8_0 experts (the shared expert stays float): the CPU's greedy
        // tokens on the same quantized experts.
        let q = QuantFormat::Q8_0;
        let mut cpu_q = CpuModel::new(
            cfg.clone(),
            shared.clone(),
            routers.clone(),
            QuantizingSource {
                inner: source(),
                format: q,
            },
        )
        .unwrap();
        let mut want = Vec::new();
        let mut logits = cpu_q.forward(&ids, &opts).unwrap();
        for _ in 0..16 {
            let next = argmax(&logits);
            want.push(next);
            logits = cpu_q.forward(&[next], &opts).unwrap();
        }
        let mut gpu = Engine::with_options(
            ctx(),
            &cfg,
            &shared,
            &routers,
            EngineOptions {
                max_seq: 128,
                expert_quant: Some(q),
                ..Default::default()
            },
        )
        .unwrap();
        let mut src = QuantizingSource {
            inner: source(),
            format: q,
        };
        let got = gpu
            .generate_greedy(&mut src, &ids, 16, &opts, |_| {})
            .unwrap();
        assert_eq!(got, want, "{name} q8_0: GPU vs CPU");
        // A float expert is refused by the q8_0 pool, naming both formats.
        let e = gpu
            .supply_expert(
                web_node::model::ExpertId::new(0, 0),
                source().load_expert(0, 0).unwrap(),
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("q8_0") && e.contains("f32"), "{e}");
        eprintln!("{name}: GPU greedy tokens = CPU = transformers; q8_0 GPU = CPU");
    }
    assert_eq!(
        seen,
        HashSet::from([Family::Olmoe, Family::Qwen2Moe, Family::Qwen3Moe])
    );
}

/// Quantized experts against the f32 transformers logits of every fixture:
/// q8_0 within 3e-2 of the largest logit with the same argmax, q4_0 within
/// 1.5e-1; the GPU engine's quantized kernels are checked against this CPU
/// product in the GPU tests.
#[test]
fn quantized_experts_stay_near_transformers() {
    use web_node::model::quant::QuantizingSource;
    use web_node::model::QuantFormat;
    for dir in fixtures() {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let r: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
        let ids: Vec<u32> = serde_json::from_value(r["input_ids"].clone()).unwrap();
        let want: Vec<f32> = serde_json::from_value(r["last_logits"].clone()).unwrap();
        let cfg = Config::from_json(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
        let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
        for (format, bound, same_argmax) in [
            (QuantFormat::Q8_0, 3e-2, true),
            (QuantFormat::Q4_0, 1.5e-1, false),
        ] {
            let mut m = CpuModel::from_safetensors(cfg.clone(), bytes.clone()).unwrap();
            m.set_source(QuantizingSource {
                inner: BytesExpertSource::new(cfg.clone(), bytes.clone()).unwrap(),
                format,
            });
            let got = m.forward(&ids, &RunOptions::default()).unwrap();
            let e = rel_err(&got, &want);
            eprintln!("{name} {format} vs transformers f32: max relative error {e:e}");
            assert!(e <= bound, "{name} {format}: relative error {e} > {bound}");
            assert!(e > 0.0, "{name} {format}: the experts were not quantized");
            if same_argmax {
                assert_eq!(argmax(&got), argmax(&want), "{name} {format}");
            }
        }
    }
}
