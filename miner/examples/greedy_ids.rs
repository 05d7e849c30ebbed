//! Native greedy decoding with the generated token ids and timings as JSON,
//! for the browser tests (tests/e2e/node.mjs compares the page's
//! `data-token-ids` with these) and the browser benchmark
//! (scripts/bench-browser.sh: native CPU and wgpu/lavapipe tokens/s).
//!
//! ```text
//! cargo run -p miner --example greedy_ids -- --model models/default \
//!     --prompt 'Q: 23+45=? A:' --max-tokens 16 [--device gpu] [--threads 1]
//! ```
//!
//! stdout: `{"ids":[..],"text":"..","prompt_tokens":N,"stop":"..",
//! "first_token_ms":F,"decode_tokens_per_s":F,"device":".."}`.
//!
//! Fixed length (issue 21: the browser decode benchmark's native side,
//! tests/e2e/decode_bench.mjs): `--fixed N [--dtype f32|f16|q8_0|q4_0]`
//! generates exactly N greedy tokens, EOS ignored. On `--device gpu` it runs
//! `web_node::gpu::bench::bench_decode` (every expert resident in `dtype`,
//! one warm-up, the best of `--runs`), the loop the page's `bench_decode`
//! runs (`--variant fused|unfused`: another engine schedule):
//! `{"ids":[..],"prompt_tokens":N,"prefill_ms":F,"ms_per_token":F,
//! "dispatches_per_token":F,"submissions_per_token":F,"rounds":R,
//! "device":"gpu","dtype":"..","variant":"..","adapter":".."}`.
//! On `--device cpu` the CPU reference (`f32`, or experts quantized on
//! load) with `Generator::ignore_eos`: `{"ids":[..],"prompt_tokens":N,
//! "ms_per_token":F,"device":"cpu","dtype":".."}`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use clap::Parser;
use web_node::gpu::engine::Attached;
use web_node::gpu::{bench, Engine, PoolFormat, WeightFormat};
use web_node::model::generate::{generate, prompt_ids, Generator};
use web_node::model::load::ModelDir;
use web_node::model::quant::QuantizingSource;
use web_node::model::reference::CpuModel;
use web_node::model::sampler::{Sampler, SamplerConfig};
use web_node::model::{ExpertId, ExpertSource, Forward, RunOptions};

#[derive(Parser)]
struct Args {
    /// Hugging Face-style model directory.
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value_t = 16)]
    max_tokens: usize,
    /// cpu (the reference forward) or gpu (the wgpu engine).
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "gpu"])]
    device: String,
    /// CPU threads (cpu only; default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Generate this many times and report the best decode speed (the
    /// first run warms up shader compilation and caches).
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Generate exactly this many tokens, EOS ignored (replaces
    /// --max-tokens; see the module docs).
    #[arg(long)]
    fixed: Option<usize>,
    /// With --fixed: the weight format, f32, f16 (gpu only), q8_0 or q4_0
    /// (experts quantized on load).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// With --fixed --device gpu: the engine's schedule, fused_attn (the
    /// default), fused or unfused (as the gpu_engine bench names them).
    #[arg(long, default_value = "fused_attn")]
    variant: String,
}

fn main() -> Result<()> {
    let a = Args::parse();
    let dir = ModelDir::load(&a.model)
        .with_context(|| format!("loading model directory {}", a.model.display()))?;
    if let Some(n) = a.fixed {
        let out = fixed(&a, &dir, n)?;
        println!("{out}");
        return Ok(());
    }
    let mut model: Box<dyn Forward> = if a.device == "gpu" {
        let ctx = web_node::gpu::context::GpuContext::new_blocking()
            .map_err(|e| anyhow!("no usable GPU adapter: {e}"))?;
        let engine = web_node::gpu::engine::Engine::new(
            Arc::new(ctx),
            &dir.config,
            &dir.shared,
            &dir.routers,
        )?;
        let source = dir.expert_source()?;
        Box::new(Attached { engine, source })
    } else {
        let mut m = CpuModel::from_model_dir(&dir)?;
        if let Some(t) = a.threads {
            m.set_threads(t);
        }
        Box::new(m)
    };
    let opts = RunOptions {
        top_k: None,
        use_moe: true,
    };
    let mut best: Option<serde_json::Value> = None;
    let mut best_tps = -1.0f64;
    for _ in 0..a.runs.max(1) {
        let mut sampler = Sampler::new(SamplerConfig {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        })?;
        let start = Instant::now();
        let mut first: Option<f64> = None;
        let g = generate(
            &mut *model,
            &dir.tokenizer,
            &a.prompt,
            a.max_tokens,
            &mut sampler,
            &opts,
            |_, _| {
                first.get_or_insert_with(|| start.elapsed().as_secs_f64());
                true
            },
        )?;
        let total = start.elapsed().as_secs_f64();
        let prefill = first.unwrap_or(total);
        let decode_n = g.tokens.len().saturating_sub(1);
        let tps = if total > prefill {
            decode_n as f64 / (total - prefill)
        } else {
            0.0
        };
        if tps > best_tps {
            best_tps = tps;
            best = Some(serde_json::json!({
                "ids": g.tokens,
                "text": g.text,
                "prompt_tokens": g.prompt_tokens.len(),
                "stop": format!("{:?}", g.stop),
                "first_token_ms": prefill * 1e3,
                "decode_tokens_per_s": tps,
                "device": a.device,
            }));
        }
    }
    println!("{}", best.unwrap_or_default());
    Ok(())
}

/// `--fixed N`: exactly `n` greedy tokens, EOS ignored.
fn fixed(a: &Args, dir: &ModelDir, n: usize) -> Result<serde_json::Value> {
    let fmt = bench::parse_format(&a.dtype)?;
    let prompt = prompt_ids(&dir.tokenizer, &dir.config, &a.prompt)?;
    let opts = RunOptions {
        top_k: None,
        use_moe: true,
    };
    if a.device == "gpu" {
        let ctx = web_node::gpu::context::GpuContext::new_blocking()
            .map_err(|e| anyhow!("no usable GPU adapter: {e}"))?;
        let adapter = format!("{} ({})", ctx.info.name, ctx.info.backend);
        let mut options = bench::all_resident_options(fmt);
        bench::apply_variant(&mut options, &a.variant)?;
        let mut engine = Engine::with_options(
            Arc::new(ctx),
            &dir.config,
            &dir.shared,
            &dir.routers,
            options,
        )?;
        let mut src = dir.expert_source()?;
        let cfg = &dir.config;
        let mut all = Vec::new();
        for l in 0..cfg.num_hidden_layers {
            for e in 0..cfg.num_local_experts {
                all.push((ExpertId::new(l, e), src.load_expert(l, e)?));
            }
        }
        bench::supply_all(&mut engine, all)?;
        let r = bench::bench_decode_blocking(
            &mut engine,
            &mut bench::Resident,
            &prompt,
            n,
            &opts,
            a.runs,
        )?;
        let mut v = serde_json::to_value(&r)?;
        if let Some(o) = v.as_object_mut() {
            let ids = o.remove("tokens").unwrap_or_default();
            o.insert("ids".into(), ids);
            o.insert("device".into(), "gpu".into());
            o.insert("dtype".into(), fmt.to_string().into());
            o.insert("variant".into(), a.variant.clone().into());
            o.insert("adapter".into(), adapter.into());
        }
        return Ok(v);
    }
    let quant = match fmt {
        PoolFormat::Float(WeightFormat::F32) => None,
        PoolFormat::Quant(q) => Some(q),
        PoolFormat::Float(_) => {
            return Err(anyhow!(
                "the CPU reference runs f32 or quantized experts, not {fmt}"
            ))
        }
    };
    let inner = dir.expert_source()?;
    let source: Box<dyn ExpertSource + Send> = match quant {
        None => Box::new(inner),
        Some(format) => Box::new(QuantizingSource { inner, format }),
    };
    let mut model = CpuModel::new(
        dir.config.clone(),
        dir.shared.clone(),
        dir.routers.clone(),
        source,
    )?;
    if let Some(t) = a.threads {
        model.set_threads(t);
    }
    let mut sampler = Sampler::new(SamplerConfig {
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
    })?;
    Forward::reset(&mut model);
    let mut g = Generator::new(prompt.clone(), n, &dir.config)?.ignore_eos(true);
    let mut first = None;
    while let Some(input) = g.input() {
        let input = input.to_vec();
        let out = model.run(&input, &opts, Generator::want(&sampler))?;
        g.push(out, &mut sampler, &dir.tokenizer)?;
        first.get_or_insert_with(Instant::now);
    }
    let end = Instant::now();
    let gen = g.finish(&dir.tokenizer)?;
    if gen.tokens.len() != n {
        return Err(anyhow!(
            "{} of {n} tokens (stop: {:?}): the context is too short",
            gen.tokens.len(),
            gen.stop
        ));
    }
    let decode_ms = first.map_or(0.0, |f| (end - f).as_secs_f64() * 1e3);
    Ok(serde_json::json!({
        "ids": gen.tokens,
        "prompt_tokens": prompt.len(),
        "ms_per_token": decode_ms / (n.saturating_sub(1).max(1)) as f64,
        "device": "cpu",
        "dtype": fmt.to_string(),
    }))
}
