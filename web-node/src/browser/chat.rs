//! The chat form: one answer through [`generate_async`], the same loop as
//! every other caller, on the CPU engine or the WebGPU engine, with the
//! experts supplied by [`RestSupply`] as the router picks them.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use crate::gpu::GpuContext;
use crate::model::generate::{generate_async, prompt_ids, Generation};
use crate::model::sampler::{Sampler, SamplerConfig};
use crate::model::{ExpertId, RunOptions};

use super::dom::{input_value, next_frame, now_ms, set_attr, set_disabled, set_progress, set_text};
use super::fetch::RestSupply;
use super::render::fmt_bytes;
use super::{show_details, show_status, Node, NODE};

/// What the form asks for.
struct Ask {
    prompt: String,
    max_tokens: usize,
    temperature: f32,
    top_k: Option<usize>,
    gpu: bool,
}

/// One answer and what it took.
struct Answer {
    gen: Generation,
    /// "cpu" or "gpu".
    kind: &'static str,
    /// The engine as the stats line names it.
    engine: String,
    /// Experts routed in this answer (CPU engine; the GPU engine reports the
    /// ones it asked for).
    used: BTreeSet<ExpertId>,
    fetched: Vec<ExpertId>,
    fetched_bytes: u64,
}

fn list(ids: impl IntoIterator<Item = ExpertId>) -> String {
    join(ids, ",")
}

fn join(ids: impl IntoIterator<Item = ExpertId>, sep: &str) -> String {
    ids.into_iter()
        .map(|id| id.to_string())
        .collect::<Vec<_>>()
        .join(sep)
}

pub async fn run_chat() {
    let Some(mut node) = NODE.with(|c| c.borrow_mut().take()) else {
        set_text("chat-stats", "busy: an answer is being generated");
        return;
    };
    let ask = Ask {
        prompt: input_value("prompt"),
        max_tokens: input_value("max-tokens").parse().unwrap_or(32),
        temperature: input_value("temperature").parse().unwrap_or(0.0),
        top_k: input_value("top-k").parse().ok(),
        gpu: input_value("device") == "gpu",
    };
    set_disabled("send", true);
    set_attr("reply", "data-state", "running");
    set_text("reply", "");
    set_text("chat-stats", "generating…");
    next_frame().await;
    let t0 = now_ms();
    let result = answer(&mut node, &ask).await;
    let ms = now_ms() - t0;
    match result {
        Ok(a) => {
            set_text("reply", &a.gen.text);
            set_attr("reply", "data-tokens", &a.gen.tokens.len().to_string());
            set_attr("reply", "data-engine", a.kind);
            set_attr("reply", "data-experts-used", &list(a.used.iter().copied()));
            set_attr(
                "reply",
                "data-experts-fetched",
                &list(a.fetched.iter().copied()),
            );
            set_attr("reply", "data-state", "done");
            let s = &node.store.stats;
            set_text(
                "chat-stats",
                &format!(
                    "{engine}: {np} prompt + {n} generated tokens in {ms:.0} ms ({tps:.1} tokens/s), \
                     stop: {stop:?}. Experts used: {nu} ({used}); fetched for this answer: {nf} \
                     ({fb}). This session holds {held} of {all} experts and fetched {pb} of the \
                     model's {mb}.",
                    engine = a.engine,
                    np = a.gen.prompt_tokens.len(),
                    n = a.gen.tokens.len(),
                    tps = a.gen.tokens.len() as f64 * 1000.0 / ms.max(1.0),
                    stop = a.gen.stop,
                    nu = a.used.len(),
                    used = join(a.used.iter().copied(), ", "),
                    nf = a.fetched.len(),
                    fb = fmt_bytes(a.fetched_bytes),
                    held = s.experts.len(),
                    all = node.model.config.num_hidden_layers * node.model.config.num_local_experts,
                    pb = fmt_bytes(s.payload_bytes),
                    mb = fmt_bytes(node.model_bytes),
                ),
            );
        }
        Err(e) => {
            set_text("reply", &format!("error: {e}"));
            set_attr("reply", "data-state", "error");
            set_text("chat-stats", "");
        }
    }
    show_status(&node.store, &node.report, node.model_bytes, "done");
    show_details(&node.store, &node.report);
    set_progress("");
    NODE.with(|c| *c.borrow_mut() = Some(node));
    set_disabled("send", false);
}

async fn answer(node: &mut Node, ask: &Ask) -> Result<Answer, String> {
    let Node {
        store, model, gpu, ..
    } = node;
    let cfg = &model.config;
    let experts: HashMap<ExpertId, _> = (0..cfg.num_hidden_layers)
        .flat_map(|l| (0..cfg.num_local_experts).map(move |e| ExpertId::new(l, e)))
        .filter_map(|id| model.expert_block(id).map(|h| (id, h)))
        .collect();
    let ids = prompt_ids(&model.tokenizer, cfg, &ask.prompt).map_err(|e| e.to_string())?;
    let mut sampler = Sampler::new(SamplerConfig {
        temperature: ask.temperature,
        top_p: 1.0,
        seed: 0,
    })
    .map_err(|e| e.to_string())?;
    let opts = RunOptions {
        top_k: ask.top_k,
        use_moe: true,
    };
    let bytes_before = store.stats.payload_bytes;
    if ask.gpu && gpu.is_none() {
        set_progress("starting the WebGPU engine…");
        let (c, shared, routers) = model.engine_parts().map_err(|e| e.to_string())?;
        let ctx = GpuContext::new().await.map_err(|e| e.to_string())?;
        // The engine's API takes an Arc (shared with native threads); wasm has one thread.
        #[allow(clippy::arc_with_non_send_sync)]
        let ctx = Arc::new(ctx);
        *gpu =
            Some(crate::gpu::Engine::new(ctx, &c, &shared, &routers).map_err(|e| e.to_string())?);
    }
    let mut supply = RestSupply {
        store,
        config: &model.config,
        experts,
        fetched: Vec::new(),
        asked: Vec::new(),
    };
    let on_token = |_: u32, _: &str| true;
    let (gen, engine, used) = match gpu.as_mut().filter(|_| ask.gpu) {
        Some(engine) => {
            let info = &engine.context().info;
            let adapter = if info.name.is_empty() {
                format!("GPU ({} adapter)", info.backend)
            } else {
                format!("GPU ({}, {})", info.name, info.backend)
            };
            let g = generate_async(
                engine,
                &mut supply,
                &model.tokenizer,
                ids,
                ask.max_tokens,
                &mut sampler,
                &opts,
                on_token,
            )
            .await;
            (g, adapter, supply.asked.iter().copied().collect())
        }
        None => {
            model.engine.reset_stats();
            let g = generate_async(
                &mut model.engine,
                &mut supply,
                &model.tokenizer,
                ids,
                ask.max_tokens,
                &mut sampler,
                &opts,
                on_token,
            )
            .await;
            let used = model
                .engine
                .routing_stats()
                .routed()
                .into_iter()
                .map(|(l, e, _)| ExpertId::new(l, e))
                .collect();
            (g, "CPU (wasm)".to_string(), used)
        }
    };
    let gen = gen.map_err(|e| e.to_string())?;
    Ok(Answer {
        gen,
        kind: if ask.gpu { "gpu" } else { "cpu" },
        engine,
        used,
        fetched: supply.fetched,
        fetched_bytes: supply.store.stats.payload_bytes - bytes_before,
    })
}
