#![allow(clippy::unwrap_used, clippy::expect_used)]
//! CPU inference benchmark: our CPU reference vs candle-transformers' CPU
//! Mixtral on the same safetensors, a model of the default shape (4 layers,
//! 8 experts, top-2). Prints prefill and decode tokens/s, peak memory
//! (VmHWM of a separate child process per engine, so the numbers do not mix)
//! and the bytes of expert weights loaded and read per token.
//!
//! Model: `$AIBLOCK_BENCH_MODEL` (a directory, or `random`), else `models/default` if present, else a
//! random model (hidden 256, intermediate 512, vocab 2000, 8 heads, 4 KV heads).
//! Run: `cargo bench -p web-node --bench cpu_engine` (env `BENCH_PROMPT`,
//! `BENCH_DECODE`, `BENCH_REPS` change the sizes).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::mixtral;
use web_node::model::load::ModelDir;
use web_node::model::random::{small_config, write_random_model};
use web_node::model::reference::CpuModel;
use web_node::model::sampler::argmax;
use web_node::model::{Config, Forward, RunOptions};

const CHILD_ENV: &str = "AIBLOCK_BENCH_CHILD";

fn env_usize(k: &str, d: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn vm_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn prompt(cfg: &Config, n: usize) -> Vec<u32> {
    let mut rng = web_node::model::sampler::SplitMix64::new(99);
    let hi = cfg.vocab_size.clamp(4, 259) as u64;
    let mut v = vec![cfg.bos_token_id.unwrap_or(0)];
    v.extend((1..n).map(|_| 3 + (rng.next_u64() % (hi - 3)) as u32));
    v
}

struct Timing {
    prefill_s: f64,
    decode_s: f64,
    tokens: Vec<u32>,
}

fn candle_cfg(cfg: &Config) -> mixtral::Config {
    serde_json::from_value(serde_json::json!({
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
    .unwrap()
}

fn candle_step(m: &mut mixtral::Model, toks: &[u32], off: usize) -> Vec<f32> {
    let input = Tensor::new(toks, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    m.forward(&input, off)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

/// Runs one engine and prints one `key=value` result line.
fn child(engine: &str, dir: &Path) {
    let np = env_usize("BENCH_PROMPT", 64);
    let nd = env_usize("BENCH_DECODE", 64);
    let reps = env_usize("BENCH_REPS", 5);
    let base = vm_hwm_kib();
    let t0 = Instant::now();
    let mut best: Option<Timing> = None;
    let mut keep = |t: Timing| {
        if best
            .as_ref()
            .is_none_or(|b| t.prefill_s + t.decode_s < b.prefill_s + b.decode_s)
        {
            best = Some(t);
        }
    };
    let mut extra = String::new();
    let cfg;
    if let Some(rest) = engine.strip_prefix("ours") {
        let (threads, quant) = match rest.split_once(':') {
            Some((t, q)) => (t, web_node::model::QuantFormat::parse(q)),
            None => (rest, None),
        };
        let d = ModelDir::load(dir).unwrap();
        cfg = d.config.clone();
        let mut m = CpuModel::from_model_dir(&d).unwrap();
        if let Some(format) = quant {
            m.set_source(web_node::model::quant::QuantizingSource {
                inner: d.expert_source().unwrap(),
                format,
            });
        }
        m.set_threads(threads.parse().unwrap_or(1));
        let load_s = t0.elapsed().as_secs_f64();
        let p = prompt(&cfg, np);
        let opts = RunOptions::default();
        let mut first_run = None;
        for _ in 0..reps {
            m.reset();
            let t = Instant::now();
            let mut l = m.forward(&p, &opts).unwrap();
            let prefill_s = t.elapsed().as_secs_f64();
            let t = Instant::now();
            let mut toks = Vec::new();
            for _ in 0..nd {
                let n = argmax(&l);
                toks.push(n);
                l = m.forward(&[n], &opts).unwrap();
            }
            keep(Timing {
                prefill_s,
                decode_s: t.elapsed().as_secs_f64(),
                tokens: toks,
            });
            first_run.get_or_insert_with(|| m.routing_stats().clone());
        }
        // Experts load in the first run (cold cache); later runs reuse them.
        let s = first_run.unwrap();
        let per_tok_read = s.expert_bytes_read as f64 / s.tokens as f64;
        // Bytes read per decode token: every routed expert, once per token.
        let weights = 3 * cfg.hidden_size * cfg.intermediate_size;
        let expert_bytes = match quant {
            None => 4 * weights,
            Some(q) => q.matrix_bytes(1, weights),
        };
        extra = format!(
            " load_s={load_s:.3} bytes_per_expert={expert_bytes} experts_loaded={} expert_bytes_loaded={} expert_bytes_loaded_per_token={:.0} expert_bytes_read_per_token_avg={per_tok_read:.0} expert_bytes_read_per_decode_token={}",
            s.experts_loaded,
            s.expert_bytes_loaded,
            s.expert_bytes_loaded as f64 / s.tokens as f64,
            expert_bytes * cfg.num_experts_per_tok * cfg.num_hidden_layers,
        );
    } else {
        let d = ModelDir::load(dir).unwrap();
        cfg = d.config.clone();
        drop(d);
        let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
        let vb = VarBuilder::from_buffered_safetensors(bytes, DType::F32, &Device::Cpu).unwrap();
        let cc = candle_cfg(&cfg);
        let load_s = t0.elapsed().as_secs_f64();
        let p = prompt(&cfg, np);
        for _ in 0..reps {
            let mut m = mixtral::Model::new(&cc, vb.clone()).unwrap();
            let t = Instant::now();
            let mut l = candle_step(&mut m, &p, 0);
            let prefill_s = t.elapsed().as_secs_f64();
            let t = Instant::now();
            let mut toks = Vec::new();
            for i in 0..nd {
                let n = argmax(&l);
                toks.push(n);
                l = candle_step(&mut m, &[n], np + i);
            }
            keep(Timing {
                prefill_s,
                decode_s: t.elapsed().as_secs_f64(),
                tokens: toks,
            });
        }
        extra = format!(" load_s={load_s:.3}{extra}");
    }
    let b = best.unwrap();
    println!(
        "RESULT engine={engine} prefill_tok_s={:.1} decode_tok_s={:.1} decode_ms_per_tok={:.3} peak_rss_mib={:.1} base_rss_mib={:.1} tokens_hash={:016x}{extra}",
        np as f64 / b.prefill_s,
        nd as f64 / b.decode_s,
        b.decode_s * 1e3 / nd as f64,
        vm_hwm_kib() as f64 / 1024.0,
        base as f64 / 1024.0,
        b.tokens.iter().fold(0xcbf29ce484222325u64, |h, &t| (h ^ t as u64).wrapping_mul(0x100000001b3)),
    );
}

fn model_dir() -> (PathBuf, Option<tempfile::TempDir>) {
    let choice = std::env::var("AIBLOCK_BENCH_MODEL").unwrap_or_default();
    if !choice.is_empty() && choice != "random" {
        return (PathBuf::from(choice), None);
    }
    let default = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/default");
    if choice.is_empty() && default.join("model.safetensors").exists() {
        return (default, None);
    }
    let tmp = tempfile::tempdir().unwrap();
    write_random_model(tmp.path(), &small_config(2000, 256, 512, 4, 8, 4), 1).unwrap();
    (tmp.path().to_path_buf(), Some(tmp))
}

fn main() {
    if let Ok(engine) = std::env::var(CHILD_ENV) {
        let dir = std::env::args().nth(1).unwrap();
        child(&engine, Path::new(&dir));
        return;
    }
    let (dir, _tmp) = model_dir();
    let d = ModelDir::load(&dir).unwrap();
    let c = &d.config;
    let file_mib = std::fs::metadata(dir.join("model.safetensors"))
        .unwrap()
        .len() as f64
        / 1048576.0;
    println!(
        "model {}: {} layers, {} experts (top-{}), hidden {}, intermediate {}, vocab {}, heads {}/{} kv; model.safetensors {file_mib:.1} MiB",
        dir.display(),
        c.num_hidden_layers,
        c.num_local_experts,
        c.num_experts_per_tok,
        c.hidden_size,
        c.intermediate_size,
        c.vocab_size,
        c.num_attention_heads,
        c.num_kv_heads(),
    );
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!(
        "prompt {} tokens, decode {} tokens greedy, best of {} runs; {cores} cores; each engine in its own process",
        env_usize("BENCH_PROMPT", 64),
        env_usize("BENCH_DECODE", 64),
        env_usize("BENCH_REPS", 5)
    );
    drop(d);
    let exe = std::env::current_exe().unwrap();
    let mut engines = vec![
        "ours1".to_string(),
        "ours1:q8_0".to_string(),
        "ours1:q4_0".to_string(),
    ];
    if cores > 1 {
        engines.push(format!("ours{cores}"));
    }
    engines.push("candle".into());
    for e in engines {
        let out = Command::new(&exe)
            .env(CHILD_ENV, &e)
            .arg(&dir)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        match text.lines().find(|l| l.starts_with("RESULT")) {
            Some(l) => println!(
                "{}",
                l.replace("engine=ours", "engine=cpu-reference threads=")
                    .replace(":q8_0", " dtype=q8_0")
                    .replace(":q4_0", " dtype=q4_0")
            ),
            None => println!("{e}: failed: {}", String::from_utf8_lossy(&out.stderr)),
        }
    }
}
