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

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use clap::Parser;
use web_node::gpu::engine::Attached;
use web_node::model::generate::generate;
use web_node::model::load::ModelDir;
use web_node::model::reference::CpuModel;
use web_node::model::sampler::{Sampler, SamplerConfig};
use web_node::model::{Forward, RunOptions};

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
}

fn main() -> Result<()> {
    let a = Args::parse();
    let dir = ModelDir::load(&a.model)
        .with_context(|| format!("loading model directory {}", a.model.display()))?;
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
