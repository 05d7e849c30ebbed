#![allow(clippy::unwrap_used, clippy::expect_used)]
//! CPU inference benchmark: our CPU reference engine (f32, and its experts
//! quantized to q8_0 and q4_0) against candle-transformers' CPU Mixtral (f32)
//! on the same safetensors, each in its own process (so peak memory, VmHWM,
//! does not mix).
//!
//! Models: `models/default` (when present) and a random model with hidden
//! 512 (intermediate 1024, vocab 2000, 4 layers, 8 heads / 4 KV heads, 8
//! experts, top-2); `AIBLOCK_BENCH_MODEL` (a directory, or `random` for the
//! hidden-512 one) runs one model instead.
//!
//! Phases: prefill of `BENCH_PROMPT` tokens (64), then a fixed-length decode
//! of `BENCH_DECODE` tokens (64), greedy with EOS ignored, so every engine
//! decodes exactly as many tokens. Best of `BENCH_REPS` (5) per process, and
//! of `BENCH_ROUNDS` (2) rounds that alternate the engines, so a burst of
//! load elsewhere hits both.
//!
//! Threads: `BENCH_THREADS` (default `1,2`, capped at the cores); candle gets
//! the same count through `RAYON_NUM_THREADS` (its gemm and rayon pools).
//!
//! Output, one line per engine, dtype, model, threads and phase:
//! `RESULT cpu engine=aiblock dtype=f32 model=default threads=1 phase=prefill
//! tok_per_s=… baseline_candle_tok_per_s=… ratio=…` (the baseline is candle
//! f32 with the same threads, measured in the same run), and
//! `tok_per_cpu_s=… baseline_candle_tok_per_cpu_s=… ratio_cpu_s=…`, the same
//! rates per second of process CPU time, which other work on a shared
//! machine disturbs far less than the wall clock. Then `detail` lines (memory,
//! expert bytes loaded and read, token hashes).
//!
//! Run: `cargo bench -p web-node --bench cpu_engine`.

use std::collections::BTreeMap;
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
use web_node::model::{Config, Forward, QuantFormat, RunOptions};

const CHILD_ENV: &str = "AIBLOCK_BENCH_CHILD";
/// The rates a child reports (tokens per wall second, per CPU second).
const RATES: [&str; 4] = [
    "prefill_tok_s",
    "decode_tok_s",
    "prefill_tok_cpu_s",
    "decode_tok_cpu_s",
];

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

/// CPU time of this process (all its threads, ended ones included), in
/// seconds.
fn cpu_s() -> f64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}

/// Wall and CPU seconds of a phase.
#[derive(Clone, Copy)]
struct Span {
    wall: f64,
    cpu: f64,
}

impl Span {
    fn time<T>(f: impl FnOnce() -> T) -> (T, Span) {
        let (c, t) = (cpu_s(), Instant::now());
        let out = f();
        let span = Span {
            wall: t.elapsed().as_secs_f64(),
            cpu: cpu_s() - c,
        };
        (out, span)
    }
}

/// The best prefill and the best decode over the repetitions (each phase
/// and each clock on its own), and the decoded tokens.
struct Best {
    prefill: Span,
    decode: Span,
    tokens: Vec<u32>,
}

impl Best {
    fn new() -> Self {
        let inf = Span {
            wall: f64::INFINITY,
            cpu: f64::INFINITY,
        };
        Self {
            prefill: inf,
            decode: inf,
            tokens: Vec::new(),
        }
    }

    fn keep(&mut self, prefill: Span, decode: Span, tokens: Vec<u32>) {
        for (b, s) in [(&mut self.prefill, prefill), (&mut self.decode, decode)] {
            b.wall = b.wall.min(s.wall);
            b.cpu = b.cpu.min(s.cpu);
        }
        self.tokens = tokens;
    }
}

/// One engine (`aiblock:<dtype>:<threads>` or `candle:f32:<threads>`) in
/// this process: prints one `CHILD key=value…` line.
fn child(engine: &str, dir: &Path) {
    let np = env_usize("BENCH_PROMPT", 64);
    let nd = env_usize("BENCH_DECODE", 64);
    let reps = env_usize("BENCH_REPS", 5).max(1);
    let mut parts = engine.split(':');
    let (kind, dtype, threads) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or("f32"),
        parts.next().and_then(|t| t.parse().ok()).unwrap_or(1usize),
    );
    let base = vm_hwm_kib();
    let t0 = Instant::now();
    let d = ModelDir::load(dir).unwrap();
    let cfg = d.config.clone();
    let p = prompt(&cfg, np);
    let mut best = Best::new();
    let extra;
    if kind == "aiblock" {
        let quant = QuantFormat::parse(dtype);
        let mut m = CpuModel::from_model_dir(&d).unwrap();
        if let Some(format) = quant {
            m.set_source(web_node::model::quant::QuantizingSource {
                inner: d.expert_source().unwrap(),
                format,
            });
        }
        m.set_threads(threads);
        let load_s = t0.elapsed().as_secs_f64();
        let opts = RunOptions::default();
        let mut first_run = None;
        for _ in 0..reps {
            m.reset();
            let (mut l, prefill) = Span::time(|| m.forward(&p, &opts).unwrap());
            let mut toks = Vec::with_capacity(nd);
            // Fixed length: EOS is not looked for.
            let ((), decode) = Span::time(|| {
                for _ in 0..nd {
                    let n = argmax(&l);
                    toks.push(n);
                    l = m.forward(&[n], &opts).unwrap();
                }
            });
            best.keep(prefill, decode, toks);
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
            " load_s={load_s:.3} bytes_per_expert={expert_bytes} experts_loaded={} expert_bytes_loaded={} expert_bytes_read_per_token_avg={per_tok_read:.0} expert_bytes_read_per_decode_token={}",
            s.experts_loaded,
            s.expert_bytes_loaded,
            expert_bytes * cfg.num_experts_per_tok * cfg.num_hidden_layers,
        );
    } else {
        drop(d);
        let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
        let vb = VarBuilder::from_buffered_safetensors(bytes, DType::F32, &Device::Cpu).unwrap();
        let cc = candle_cfg(&cfg);
        let load_s = t0.elapsed().as_secs_f64();
        for _ in 0..reps {
            let mut m = mixtral::Model::new(&cc, vb.clone()).unwrap();
            let (mut l, prefill) = Span::time(|| candle_step(&mut m, &p, 0));
            let mut toks = Vec::with_capacity(nd);
            let ((), decode) = Span::time(|| {
                for i in 0..nd {
                    let n = argmax(&l);
                    toks.push(n);
                    l = candle_step(&mut m, &[n], np + i);
                }
            });
            best.keep(prefill, decode, toks);
        }
        extra = format!(" load_s={load_s:.3}");
    }
    println!(
        "CHILD prefill_tok_s={:.1} decode_tok_s={:.1} prefill_tok_cpu_s={:.1} decode_tok_cpu_s={:.1} decode_ms_per_tok={:.3} peak_rss_mib={:.1} base_rss_mib={:.1} tokens_hash={:016x}{extra}",
        np as f64 / best.prefill.wall,
        nd as f64 / best.decode.wall,
        np as f64 / best.prefill.cpu,
        nd as f64 / best.decode.cpu,
        best.decode.wall * 1e3 / nd.max(1) as f64,
        vm_hwm_kib() as f64 / 1024.0,
        base as f64 / 1024.0,
        best.tokens
            .iter()
            .fold(0xcbf29ce484222325u64, |h, &t| (h ^ t as u64).wrapping_mul(0x100000001b3)),
    );
}

/// `key=value` fields of a child's line.
fn fields(line: &str) -> BTreeMap<String, String> {
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The models to run: `(name, directory)`; the temporary directory of a
/// random model lives as long as the returned guard.
fn models() -> (Vec<(String, PathBuf)>, Option<tempfile::TempDir>) {
    let choice = std::env::var("AIBLOCK_BENCH_MODEL").unwrap_or_default();
    if !choice.is_empty() && choice != "random" {
        return (vec![("custom".into(), PathBuf::from(choice))], None);
    }
    let mut v = Vec::new();
    let default = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/default");
    if choice.is_empty() && default.join("model.safetensors").exists() {
        v.push(("default".to_string(), default));
    }
    let tmp = tempfile::tempdir().unwrap();
    let h512 = tmp.path().join("hidden512");
    write_random_model(&h512, &small_config(2000, 512, 1024, 4, 8, 4), 1).unwrap();
    v.push(("hidden512".to_string(), h512));
    (v, Some(tmp))
}

fn describe(name: &str, dir: &Path) {
    let d = ModelDir::load(dir).unwrap();
    let c = &d.config;
    let file_mib = std::fs::metadata(dir.join("model.safetensors"))
        .unwrap()
        .len() as f64
        / 1048576.0;
    println!(
        "model {name} ({}): {} layers, {} experts (top-{}), hidden {}, intermediate {}, vocab {}, heads {}/{} kv; model.safetensors {file_mib:.1} MiB",
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
}

fn main() {
    if let Ok(engine) = std::env::var(CHILD_ENV) {
        let dir = std::env::args().nth(1).unwrap();
        child(&engine, Path::new(&dir));
        return;
    }
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut threads: Vec<usize> = std::env::var("BENCH_THREADS")
        .unwrap_or_else(|_| "1,2".into())
        .split(',')
        .filter_map(|t| t.trim().parse().ok())
        .filter(|&t| t >= 1 && t <= cores)
        .collect();
    threads.dedup();
    if threads.is_empty() {
        threads.push(1);
    }
    let (np, nd) = (env_usize("BENCH_PROMPT", 64), env_usize("BENCH_DECODE", 64));
    let (reps, rounds) = (
        env_usize("BENCH_REPS", 5),
        env_usize("BENCH_ROUNDS", 2).max(1),
    );
    println!(
        "prompt {np} tokens, fixed-length decode of {nd} tokens (greedy, EOS ignored); best of {reps} runs × {rounds} alternating rounds; threads {threads:?} of {cores} cores (candle: RAYON_NUM_THREADS); each engine in its own process"
    );
    let (models, _tmp) = models();
    let exe = std::env::current_exe().unwrap();
    for (name, dir) in &models {
        describe(name, dir);
        for &th in &threads {
            let engines: Vec<String> =
                ["aiblock:f32", "aiblock:q8_0", "aiblock:q4_0", "candle:f32"]
                    .iter()
                    .map(|e| format!("{e}:{th}"))
                    .collect();
            // Per engine, the best of the rounds' lines.
            let mut best: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
            for _ in 0..rounds {
                for e in &engines {
                    let out = Command::new(&exe)
                        .env(CHILD_ENV, e)
                        .env("RAYON_NUM_THREADS", th.to_string())
                        .arg(dir)
                        .output()
                        .unwrap();
                    let text = String::from_utf8_lossy(&out.stdout);
                    let Some(line) = text.lines().find(|l| l.starts_with("CHILD")) else {
                        println!("{e}: failed: {}", String::from_utf8_lossy(&out.stderr));
                        continue;
                    };
                    let f = fields(line);
                    let b = best.entry(e.clone()).or_insert_with(|| f.clone());
                    for k in RATES {
                        let num = |m: &BTreeMap<String, String>| {
                            m.get(k).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
                        };
                        if num(&f) > num(b) {
                            b.insert(k.to_string(), f[k].clone());
                        }
                    }
                }
            }
            let candle = best.get(&format!("candle:f32:{th}")).cloned();
            for e in &engines {
                let Some(f) = best.get(e) else { continue };
                let mut parts = e.split(':');
                let (engine, dtype) = (parts.next().unwrap(), parts.next().unwrap());
                for phase in ["prefill", "decode"] {
                    let rate = |m: &BTreeMap<String, String>, clock: &str| {
                        m.get(&format!("{phase}_tok_{clock}"))
                            .and_then(|v| v.parse::<f64>().ok())
                    };
                    let mut line = format!(
                        "RESULT cpu engine={engine} dtype={dtype} model={name} threads={th} phase={phase}"
                    );
                    // Wall clock, and CPU time, which a machine shared with
                    // other work disturbs far less (with threads > 1 it
                    // counts every thread's time, waiting spins included).
                    let clocks: &[(&str, &str)] = &[("s", "s"), ("cpu_s", "cpu_s")];
                    for &(clock, sfx) in clocks {
                        let ours = rate(f, clock).unwrap_or(0.0);
                        line += &format!(" tok_per_{sfx}={ours:.1}");
                        if let Some(b) = candle.as_ref().and_then(|c| rate(c, clock)) {
                            if engine != "candle" {
                                let r = if sfx == "s" {
                                    "ratio".to_string()
                                } else {
                                    format!("ratio_{sfx}")
                                };
                                line += &format!(
                                    " baseline_candle_tok_per_{sfx}={b:.1} {r}={:.3}",
                                    ours / b
                                );
                            }
                        }
                    }
                    println!("{line}");
                }
                let same = candle
                    .as_ref()
                    .map(|c| c.get("tokens_hash") == f.get("tokens_hash"));
                let skip = RATES;
                let rest: Vec<String> = f
                    .iter()
                    .filter(|(k, _)| !skip.contains(&k.as_str()))
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                println!(
                    "detail engine={engine} dtype={dtype} model={name} threads={th} same_tokens_as_candle={} {}",
                    same.map_or("n/a".to_string(), |s| s.to_string()),
                    rest.join(" ")
                );
            }
        }
    }
}
