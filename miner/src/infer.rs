//! `aiblock chat` and `aiblock logits`: inference on a Hugging Face-style
//! model directory (config.json, model.safetensors, tokenizer.json).

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use web_node::gpu::engine::Attached;
use web_node::model::generate::generate;
use web_node::model::load::ModelDir;
use web_node::model::quant::QuantizingSource;
use web_node::model::reference::CpuModel;
use web_node::model::sampler::{Sampler, SamplerConfig};
use web_node::model::{ExpertSource, Forward, QuantFormat, RunOptions};

/// Which engine runs the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Device {
    /// The CPU reference forward.
    Cpu,
    /// The wgpu engine (Vulkan/Metal/DX12/GL natively).
    Gpu,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ChatArgs {
    /// Hugging Face-style model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Text to complete.
    #[arg(long)]
    pub prompt: String,
    /// Most tokens to generate (generation also stops at EOS or a full context).
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Experts per token (default: the config's num_experts_per_tok).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Nucleus sampling mass in (0, 1].
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Sampler seed (same seed, same text).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Dense mixture baseline: every expert runs, weighted by the router softmax.
    #[arg(long)]
    pub no_moe: bool,
    /// Engine that runs the model.
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    pub device: Device,
    /// CPU threads for large products (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Quantize the experts as they load (`q8_0` or `q4_0`; the bytes a
    /// quantized block of each expert would hold).
    #[arg(long, value_parser = parse_quant)]
    pub quant: Option<QuantFormat>,
}

/// Parse `--quant`.
pub fn parse_quant(s: &str) -> Result<QuantFormat, String> {
    QuantFormat::parse(s).ok_or_else(|| format!("unknown format {s:?}: use q8_0 or q4_0"))
}

#[derive(Debug, Clone, clap::Args)]
pub struct LogitsArgs {
    /// Hugging Face-style model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Comma-separated token ids, e.g. `1,2,3`.
    #[arg(long)]
    pub tokens: String,
    /// Experts per token (default: the config's num_experts_per_tok).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Dense mixture baseline: every expert runs, weighted by the router softmax.
    #[arg(long)]
    pub no_moe: bool,
    /// Engine that runs the model.
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    pub device: Device,
    /// Quantize the experts as they load (`q8_0` or `q4_0`).
    #[arg(long, value_parser = parse_quant)]
    pub quant: Option<QuantFormat>,
}

/// Parse `1,2,3` (spaces allowed) into token ids.
pub fn parse_tokens(s: &str) -> Result<Vec<u32>> {
    let ids = s
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<u32>()
                .with_context(|| format!("bad token id {t:?}"))
        })
        .collect::<Result<Vec<_>>>()?;
    if ids.is_empty() {
        bail!("--tokens is empty");
    }
    Ok(ids)
}

/// The model directory's experts, quantized as they load when `quant` is set.
pub fn expert_source(
    dir: &ModelDir,
    quant: Option<QuantFormat>,
) -> Result<Box<dyn ExpertSource + Send>> {
    let inner = dir.expert_source()?;
    Ok(match quant {
        None => Box::new(inner),
        Some(format) => Box::new(QuantizingSource { inner, format }),
    })
}

/// The engine for `device`, experts quantized on load when `quant` is set.
pub fn engine(
    dir: &ModelDir,
    device: Device,
    threads: Option<usize>,
    quant: Option<QuantFormat>,
) -> Result<Box<dyn Forward>> {
    if let Some(q) = quant {
        if let Some(e) = dir.config.expert_quant()? {
            bail!(
                "{} is already quantized ({e}); drop --quant {q}",
                dir.path.display()
            );
        }
    }
    match device {
        Device::Cpu => {
            let mut m = CpuModel::from_model_dir(dir)?;
            m.set_source(expert_source(dir, quant)?);
            if let Some(t) = threads {
                m.set_threads(t);
            }
            Ok(Box::new(m))
        }
        Device::Gpu => {
            let ctx = web_node::gpu::context::GpuContext::new_blocking()
                .map_err(|e| anyhow::anyhow!("no usable GPU adapter ({e}); use --device cpu"))?;
            // The pool holds the experts in the format they arrive in: the
            // model's own (a quantized model), or --quant's (quantized on load).
            let opts = web_node::gpu::EngineOptions {
                expert_quant: quant.or(dir.config.expert_quant()?),
                ..Default::default()
            };
            let engine = web_node::gpu::engine::Engine::with_options(
                std::sync::Arc::new(ctx),
                &dir.config,
                &dir.shared,
                &dir.routers,
                opts,
            )?;
            let source = expert_source(dir, quant)?;
            Ok(Box::new(Attached { engine, source }))
        }
    }
}

fn load(path: &std::path::Path) -> Result<ModelDir> {
    ModelDir::load(path).with_context(|| format!("loading model directory {}", path.display()))
}

/// `aiblock chat`: stream the completion of `--prompt` to stdout, stats to stderr.
pub fn chat(a: &ChatArgs) -> Result<()> {
    let dir = load(&a.model)?;
    let mut model = engine(&dir, a.device, a.threads, a.quant)?;
    let mut sampler = Sampler::new(SamplerConfig {
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
    })?;
    let opts = RunOptions {
        top_k: a.top_k,
        use_moe: !a.no_moe,
    };
    let start = Instant::now();
    let mut first: Option<f64> = None;
    let mut out = std::io::stdout().lock();
    let mut write_err = None;
    let g = generate(
        &mut *model,
        &dir.tokenizer,
        &a.prompt,
        a.max_tokens,
        &mut sampler,
        &opts,
        |_, piece| {
            first.get_or_insert_with(|| start.elapsed().as_secs_f64());
            match out.write_all(piece.as_bytes()).and_then(|_| out.flush()) {
                Ok(()) => true,
                Err(e) => {
                    write_err = Some(e);
                    false
                }
            }
        },
    )?;
    if let Some(e) = write_err {
        return Err(e).context("writing to stdout");
    }
    writeln!(out)?;
    let total = start.elapsed().as_secs_f64();
    let prefill = first.unwrap_or(total);
    let decode_n = g.tokens.len().saturating_sub(1);
    eprintln!(
        "[{} prompt tokens, {} generated, stop: {:?}; prefill+first token {:.1} ms, decode {:.1} tokens/s]",
        g.prompt_tokens.len(),
        g.tokens.len(),
        g.stop,
        prefill * 1e3,
        if total > prefill { decode_n as f64 / (total - prefill) } else { 0.0 },
    );
    Ok(())
}

/// `aiblock logits`: the last position's logits as a JSON array on stdout.
pub fn logits(a: &LogitsArgs) -> Result<()> {
    let tokens = parse_tokens(&a.tokens)?;
    let dir = load(&a.model)?;
    let mut model = engine(&dir, a.device, None, a.quant)?;
    let opts = RunOptions {
        top_k: a.top_k,
        use_moe: !a.no_moe,
    };
    let l = model.forward(&tokens, &opts)?;
    println!("{}", serde_json::to_string(&l)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_lists_parse() {
        assert_eq!(parse_tokens("1,2, 3").unwrap(), vec![1, 2, 3]);
        assert!(parse_tokens("").is_err());
        assert!(parse_tokens("1,x").is_err());
        assert!(parse_tokens("-1").is_err());
    }
}
