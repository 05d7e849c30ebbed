//! GPU engine benchmark (`cargo bench -p web-node --bench gpu_engine`).
//!
//! In one run, on the adapter the environment picks (lavapipe here) and on
//! the CPU reference with the same weights: prefill and decode tokens/s,
//! dispatches and weight bytes per decoded token, the best plain matvec
//! bandwidth this adapter reaches and its per-dispatch cost (measured here),
//! and the decode time per token those imply.
//!
//! Every expert format side by side on the same model: f32, f16 (attention
//! and head in f16 too), q8_0 and q4_0 (experts quantized on load as with
//! `--quant`, read packed by the quantized kernels; attention and head f32),
//! with bytes per expert, decode ms/token and the bandwidth roofline.
//!
//! Model: `models/default` if present, else a random Mixtral of the default
//! shape (4 layers, 8 experts, top-2) and realistic small size.
//! Also decode with a small expert pool (`BENCH_POOL` experts per layer's
//! worth, default 3, of the model's experts): tokens/s, uploads and
//! evictions against all experts resident.
//! Env: `BENCH_DECODE` (default 32), `BENCH_PROMPT` (default 64),
//! `AIBLOCK_BENCH_MODEL=random` (or `BENCH_MODEL=random`: use the random
//! model even if `models/default` exists).

use std::sync::Arc;
use std::time::Instant;

use web_node::gpu::kernel::{f32_bytes, step_buffer, Step};
use web_node::gpu::matvec::{self, Matvec};
use web_node::gpu::{Engine, EngineOptions, GpuContext, PoolFormat, WeightFormat};
use web_node::model::load::ModelDir;
use web_node::model::quant::QuantizingSource;
use web_node::model::random::{small_config, write_random_model};
use web_node::model::reference::CpuModel;
use web_node::model::sampler::argmax;
use web_node::model::{ExpertId, ExpertSource, Forward, QuantFormat, RunOptions};

fn env(name: &str, d: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// (seconds per dispatch, GB/s) of `reps` matvec dispatches of `[rows][cols]`
/// in one encoder.
fn matvec_time(ctx: &GpuContext, rows: usize, cols: usize, reps: usize) -> (f64, f64) {
    let k = Matvec::new(ctx);
    let p = matvec::Params {
        rows: rows as u32,
        cols: cols as u32,
        flags: 0,
        eps: 0.0,
    };
    let step = step_buffer(
        ctx,
        Step {
            pos0: 0,
            n_tok: 1,
            top_k: 0,
            renorm: 0,
        },
    );
    let pb = ctx.uniform_init("p", bytemuck::bytes_of(&p));
    let w: Vec<f32> = (0..rows * cols).map(|i| (i % 7) as f32 * 0.01).collect();
    let wb = ctx.storage_init("w", f32_bytes(&w));
    let xb = ctx.storage_init("x", f32_bytes(&vec![0.5f32; cols]));
    let gb = ctx.storage_init("g", f32_bytes(&[1.0]));
    let yb = ctx.storage_zeroed("y", (rows * 4) as u64);
    let bg = k.bind(ctx, &step, &pb, &wb, &xb, &gb, &yb);
    let run = |n: usize| {
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            for _ in 0..n {
                k.encode(&mut pass, &bg, &p, 1);
            }
        }
        ctx.queue.submit([enc.finish()]);
        let _ = ctx.device.poll(wgpu::PollType::wait_indefinitely());
    };
    run(2);
    let t = Instant::now();
    run(reps);
    let per = t.elapsed().as_secs_f64() / reps as f64;
    (per, (rows * cols * 4) as f64 / per / 1e9)
}

fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let default = root.join("models/default");
    let _tmp;
    let dir = if default.join("config.json").exists()
        && std::env::var("BENCH_MODEL").as_deref() != Ok("random")
        && std::env::var("AIBLOCK_BENCH_MODEL").as_deref() != Ok("random")
    {
        default
    } else {
        let t = tempfile::tempdir()?;
        // Realistic small Mixtral of the default shape.
        let cfg = small_config(4096, 256, 512, 4, 8, 4);
        write_random_model(t.path(), &cfg, 1)?;
        let p = t.path().to_path_buf();
        _tmp = t;
        p
    };
    let m = ModelDir::load(&dir)?;
    let cfg = m.config.clone();
    let opts = RunOptions::default();
    let k = opts.experts_per_token(&cfg)?;
    let n_prompt = env("BENCH_PROMPT", 64);
    let n_decode = env("BENCH_DECODE", 32);
    let prompt: Vec<u32> = (0..n_prompt as u32)
        .map(|i| (i * 37 + 5) % cfg.vocab_size as u32)
        .collect();
    println!(
        "model: {} (vocab {}, hidden {}, inter {}, layers {}, heads {}/{}, experts {} top-{k})",
        dir.display(),
        cfg.vocab_size,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        cfg.num_kv_heads(),
        cfg.num_local_experts
    );

    // CPU reference, same weights.
    let mut cpu = CpuModel::from_model_dir(&m)?;
    cpu.forward(&prompt, &opts)?; // load the routed experts
    Forward::reset(&mut cpu);
    let t = Instant::now();
    let mut tok = argmax(&cpu.forward(&prompt, &opts)?);
    let cpu_prefill = n_prompt as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut cpu_tokens = Vec::new();
    for _ in 0..n_decode {
        cpu_tokens.push(tok);
        tok = argmax(&cpu.forward(&[tok], &opts)?);
    }
    let cpu_decode = n_decode as f64 / t.elapsed().as_secs_f64();
    println!(
        "cpu reference ({} threads): prefill {cpu_prefill:.1} tok/s, decode {cpu_decode:.1} tok/s",
        cpu.threads()
    );

    let ctx = match GpuContext::new_blocking() {
        Ok(c) => Arc::new(c),
        Err(e) => {
            println!("gpu: no adapter ({e}); GPU numbers skipped");
            return Ok(());
        }
    };
    println!(
        "adapter: {} ({:?}, {:?}), workgroup {}",
        ctx.info.name, ctx.info.backend, ctx.info.device_type, ctx.workgroup_size
    );
    let mut results = Vec::new();
    let (nl, ne) = (cfg.num_hidden_layers, cfg.num_local_experts);
    let formats = [
        PoolFormat::Float(WeightFormat::F32),
        PoolFormat::Float(WeightFormat::F16),
        PoolFormat::Quant(QuantFormat::Q8_0),
        PoolFormat::Quant(QuantFormat::Q4_0),
    ];
    for pool_fmt in formats {
        let (fmt, quant) = match pool_fmt {
            PoolFormat::Float(f) => (f, None),
            PoolFormat::Quant(q) => (WeightFormat::F32, Some(q)),
        };
        let source = || -> anyhow::Result<Box<dyn ExpertSource + Send>> {
            let inner = m.expert_source()?;
            Ok(match quant {
                None => Box::new(inner),
                Some(format) => Box::new(QuantizingSource { inner, format }),
            })
        };
        let mut src = source()?;
        // The CPU reference with the same experts (quantized ones for q8_0/q4_0).
        let cpu_tokens = match quant {
            None => cpu_tokens.clone(),
            Some(_) => {
                let mut cq =
                    CpuModel::new(cfg.clone(), m.shared.clone(), m.routers.clone(), source()?)?;
                let mut tok = argmax(&cq.forward(&prompt, &opts)?);
                let mut v = Vec::new();
                for _ in 0..n_decode {
                    v.push(tok);
                    tok = argmax(&cq.forward(&[tok], &opts)?);
                }
                v
            }
        };
        let engine = |pool: Option<u64>| {
            Engine::with_options(
                ctx.clone(),
                &cfg,
                &m.shared,
                &m.routers,
                EngineOptions {
                    max_seq: 1024,
                    max_batch: 64,
                    weights: fmt,
                    expert_quant: quant,
                    expert_pool_bytes: pool,
                },
            )
        };
        let mut gpu = engine(None)?;
        // Warm-up: uploads every expert the measured run routes to.
        let warm = gpu.generate_greedy(&mut src, &prompt, n_decode, &opts, |_| {})?;
        gpu.reset();
        gpu.reset_stats();
        let t = Instant::now();
        let first = gpu.next_token(&mut src, &prompt, &opts)?;
        let gpu_prefill = n_prompt as f64 / t.elapsed().as_secs_f64();
        let prefill_stats = gpu.stats().clone();
        gpu.reset_stats();
        let t = Instant::now();
        let mut gpu_tokens = vec![first];
        let mut tok = first;
        for _ in 1..n_decode {
            tok = gpu.next_token(&mut src, &[tok], &opts)?;
            gpu_tokens.push(tok);
        }
        let selective_s = t.elapsed().as_secs_f64() / (n_decode - 1).max(1) as f64;
        let sel = gpu.stats().clone();
        println!(
            "gpu engine {pool_fmt}, experts supplied on demand ({} of {} resident): decode {:.1} tok/s, {:.1} submissions and {} readback bytes per token (routed ids read back while a layer has missing experts)",
            gpu.resident_experts(),
            nl * ne,
            1.0 / selective_s,
            sel.submissions as f64 / sel.tokens.max(1) as f64,
            sel.readback_bytes / sel.tokens.max(1)
        );
        // Steady state: every expert resident, so decoding reads back only the token id.
        for l in 0..nl {
            for e in 0..ne {
                if !gpu.is_expert_resident(l, e) {
                    gpu.supply_expert(ExpertId::new(l, e), src.load_expert(l, e)?)?;
                }
            }
        }
        gpu.reset();
        gpu.next_token(&mut src, &prompt, &opts)?;
        gpu.reset_stats();
        let t = Instant::now();
        let mut tok = first;
        for _ in 1..n_decode {
            tok = gpu.next_token(&mut src, &[tok], &opts)?;
        }
        let decode_s = t.elapsed().as_secs_f64() / (n_decode - 1).max(1) as f64;
        let s = gpu.stats().clone();
        let dispatches = s.dispatches as f64 / s.tokens.max(1) as f64;
        let bytes = gpu.weight_bytes_per_token(k);
        println!(
            "gpu engine {pool_fmt}: prefill {gpu_prefill:.1} tok/s ({} dispatches for {n_prompt} tokens); all experts resident: decode {:.1} tok/s ({:.2} ms/token)",
            prefill_stats.dispatches,
            1.0 / decode_s,
            decode_s * 1e3
        );
        println!(
            "  per decoded token: {dispatches:.1} dispatches, {:.1} submissions, {} readback bytes, {:.2} MB weights read ({k} of {ne} experts per layer)",
            s.submissions as f64 / s.tokens.max(1) as f64,
            s.readback_bytes / s.tokens.max(1),
            bytes as f64 / 1e6,
        );
        println!(
            "  greedy tokens equal to the CPU reference: {} (warm-up run: {}){}",
            gpu_tokens == cpu_tokens,
            warm == cpu_tokens,
            if pool_fmt == PoolFormat::Float(WeightFormat::F16) {
                " (f16 weights may legitimately differ)"
            } else {
                ""
            }
        );

        // A small pool: `per_layer` experts per layer's worth, evicting.
        let per_layer = env("BENCH_POOL", 3);
        let slots = (per_layer * nl) as u64;
        let per_expert = gpu.expert_bytes();
        let mut small = engine(Some(slots * per_expert))?;
        let first = small.next_token(&mut src, &prompt, &opts)?;
        small.reset_stats();
        let t = Instant::now();
        let mut pool_tokens = vec![first];
        let mut tok = first;
        for _ in 1..n_decode {
            tok = small.next_token(&mut src, &[tok], &opts)?;
            pool_tokens.push(tok);
        }
        let pool_s = t.elapsed().as_secs_f64() / (n_decode - 1).max(1) as f64;
        let ps = small.stats().clone();
        let per_tok = |v: u64| v as f64 / ps.tokens.max(1) as f64;
        println!(
            "gpu engine {pool_fmt}, pool of {} experts ({per_layer} per layer, {:.1} MB of {:.1} MB): decode {:.1} tok/s vs {:.1} all resident ({:.2}x); per token {:.2} uploads, {:.2} evictions, {:.2} pauses, {:.1} submissions; tokens equal to all resident: {}",
            small.pool_slots(),
            (slots * per_expert) as f64 / 1e6,
            (nl * ne) as f64 * per_expert as f64 / 1e6,
            1.0 / pool_s,
            1.0 / decode_s,
            decode_s / pool_s,
            per_tok(ps.expert_uploads),
            per_tok(ps.expert_evictions),
            per_tok(ps.pauses),
            per_tok(ps.submissions),
            pool_tokens == gpu_tokens
        );
        results.push((pool_fmt, decode_s, dispatches, bytes, per_expert));
    }

    // Plain matvec on this adapter: per-dispatch cost and best bandwidth.
    let (tiny, _) = matvec_time(&ctx, 1, 1, 200);
    let mut best = (0.0f64, 0usize, 0usize);
    let max_elems = (ctx.max_binding() / 4) as usize;
    for (r, c) in [(1024, 1024), (4096, 1024), (2048, 2048), (4096, 4096)] {
        if r * c > max_elems {
            continue;
        }
        let (_, bw) = matvec_time(&ctx, r, c, 10);
        println!("matvec [{r} x {c}] f32: {bw:.2} GB/s");
        if bw > best.0 {
            best = (bw, r, c);
        }
    }
    println!(
        "best matvec {:.2} GB/s ([{} x {}]); dispatch overhead {:.0} us (1x1 matvec)",
        best.0,
        best.1,
        best.2,
        tiny * 1e6
    );
    println!(
        "decode, all experts resident, {} ({:?}):",
        ctx.info.name, ctx.info.backend
    );
    println!(
        "  {:<6} {:>14} {:>16} {:>16} {:>14} {:>24}",
        "format",
        "bytes/expert",
        "weight MB/token",
        "measured ms/tok",
        "ideal ms/tok",
        "ideal+dispatch ms/tok"
    );
    for (fmt, decode_s, dispatches, bytes, per_expert) in results {
        let ideal = bytes as f64 / (best.0 * 1e9);
        println!(
            "  {:<6} {per_expert:>14} {:>16.3} {:>16.2} {:>14.3} {:>24.2}",
            fmt.to_string(),
            bytes as f64 / 1e6,
            decode_s * 1e3,
            ideal * 1e3,
            (ideal + dispatches * tiny) * 1e3,
        );
    }
    println!(
        "  (ideal: weight bytes per token / best matvec bandwidth; + dispatches x {:.0} us per dispatch)",
        tiny * 1e6
    );
    println!("peak RSS {:.0} MiB", peak_rss_mib());
    Ok(())
}
