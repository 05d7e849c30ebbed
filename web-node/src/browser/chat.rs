//! The chat form: one answer streamed into `#reply` token by token. The
//! generation loop is [`Generator`] driven step by step with [`run_step`]
//! (as [`crate::model::generate::generate_async`] does), on the CPU engine
//! or the WebGPU engine, with the experts supplied by [`ChainSupply`] as the
//! router picks them; after each token the page paints and the stop
//! button's click can run.

use std::cell::Cell;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use crate::chain::PayloadStatus;
use crate::gpu::GpuContext;
use crate::model::generate::{prompt_ids, Generation, Generator, StopReason};
use crate::model::sampler::{Sampler, SamplerConfig};
use crate::model::tokenizer::Tokenizer;
use crate::model::{run_step, Engine, ExpertId, ModelError, RunOptions, Supply};
use crate::net::usage::ReportEntry;

use super::dom::{
    input_value, next_frame, now_ms, on_click, set_attr, set_disabled, set_progress, set_text,
};
use super::fetch::ChainSupply;
use super::render::fmt_bytes;
use super::{panels, show_details, show_status, Node, NODE};

thread_local! {
    /// Set by the stop button; read after every token.
    static STOP: Cell<bool> = const { Cell::new(false) };
}

/// What the form asks for.
struct Ask {
    prompt: String,
    max_tokens: usize,
    temperature: f32,
    top_p: f32,
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

fn token_list(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

fn read_ask() -> Ask {
    let num = |id: &str| input_value(id).trim().parse::<f32>().ok();
    Ask {
        prompt: input_value("prompt"),
        max_tokens: input_value("max-tokens").trim().parse().unwrap_or(32),
        temperature: num("temperature").filter(|t| *t >= 0.0).unwrap_or(0.0),
        top_p: num("top-p")
            .filter(|p| *p > 0.0 && *p <= 1.0)
            .unwrap_or(1.0),
        top_k: input_value("top-k").trim().parse().ok().filter(|k| *k > 0),
        gpu: input_value("engine") == "gpu",
    }
}

pub async fn run_chat() {
    let Some(mut node) = NODE.with(|c| c.borrow_mut().take()) else {
        set_text("chat-stats", "busy: an answer is being generated");
        return;
    };
    on_click("stop", || STOP.with(|s| s.set(true)));
    STOP.with(|s| s.set(false));
    let ask = read_ask();
    set_disabled("send", true);
    set_disabled("stop", false);
    set_attr("reply", "data-state", "running");
    set_attr("reply", "data-tokens", "0");
    set_attr("reply", "data-token-ids", "");
    set_attr("reply", "data-engine", if ask.gpu { "gpu" } else { "cpu" });
    set_text("reply", "");
    set_text("chat-stats", "generating…");
    next_frame().await;
    let t0 = now_ms();
    let result = answer(&mut node, &ask).await;
    let ms = now_ms() - t0;
    set_disabled("stop", true);
    match result {
        Ok(a) => {
            set_text("reply", &a.gen.text);
            set_attr("reply", "data-tokens", &a.gen.tokens.len().to_string());
            set_attr("reply", "data-token-ids", &token_list(&a.gen.tokens));
            set_attr("reply", "data-engine", a.kind);
            set_attr("reply", "data-experts-used", &list(a.used.iter().copied()));
            set_attr(
                "reply",
                "data-experts-fetched",
                &list(a.fetched.iter().copied()),
            );
            let stopped = a.gen.stop == StopReason::Callback;
            set_attr(
                "reply",
                "data-state",
                if stopped { "stopped" } else { "done" },
            );
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
            let held: BTreeSet<_> = node
                .store
                .dag
                .iter()
                .filter(|e| e.payload == PayloadStatus::Verified)
                .map(|e| e.hash)
                .collect();
            panels::show_dag(&node.store.dag, &held, &a.used);
            super::show_cache(&node.store, "").await;
            // A signed usage report of this answer (the relay counts it only
            // for blocks it served this node). The CPU engine counts the
            // tokens routed to each expert; the GPU engine only which ones.
            let routed: Vec<(ExpertId, u64)> = if a.kind == "cpu" {
                node.model
                    .engine
                    .routing_stats()
                    .routed()
                    .into_iter()
                    .map(|(l, e, c)| (ExpertId::new(l, e), c))
                    .collect()
            } else {
                a.used.iter().map(|&id| (id, 0)).collect()
            };
            super::net::spawn_usage_report(
                routed
                    .into_iter()
                    .filter_map(|(id, tokens)| {
                        node.model.expert_block(id).map(|block| ReportEntry {
                            block,
                            calls: 1,
                            tokens,
                        })
                    })
                    .collect(),
            );
        }
        Err(e) => {
            // Keep what streamed so far; say what went wrong below it.
            set_attr("reply", "data-state", "error");
            set_text("chat-stats", &format!("error: {e}"));
            if super::dom::element("reply")
                .and_then(|r| r.text_content())
                .is_none_or(|t| t.is_empty())
            {
                set_text("reply", &format!("error: {e}"));
            }
        }
    }
    show_status(&node.store, &node.report, node.model_bytes, "done");
    show_details(&node.store, &node.report);
    set_progress("");
    NODE.with(|c| *c.borrow_mut() = Some(node));
    set_disabled("send", false);
}

/// The generation loop of [`crate::model::generate::generate_async`], with
/// the page in it: each token is shown as it comes, the browser paints, and
/// the stop button cancels.
#[allow(clippy::too_many_arguments)]
async fn stream<E: Engine + ?Sized, S: Supply + ?Sized>(
    engine: &mut E,
    supply: &mut S,
    tok: &Tokenizer,
    prompt_tokens: Vec<u32>,
    max_tokens: usize,
    sampler: &mut Sampler,
    opts: &RunOptions,
) -> Result<Generation, ModelError> {
    engine.reset();
    let mut g = Generator::new(prompt_tokens, max_tokens, engine.config())?;
    let want = Generator::want(sampler);
    let mut text = String::new();
    let mut ids: Vec<u32> = Vec::new();
    while let Some(input) = g.input() {
        let input = input.to_vec();
        let out = run_step(engine, supply, &input, opts, want).await?;
        if let Some((id, piece)) = g.push(out, sampler, tok)? {
            ids.push(id);
            text.push_str(&piece);
            set_text("reply", &text);
            set_attr("reply", "data-tokens", &ids.len().to_string());
            set_attr("reply", "data-token-ids", &token_list(&ids));
        }
        // Paint, and let a click on stop run.
        next_frame().await;
        if STOP.with(Cell::get) {
            g.cancel();
        }
    }
    g.finish(tok)
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
    let seed = if ask.temperature > 0.0 {
        (js_sys::Math::random() * u32::MAX as f64) as u64
    } else {
        0
    };
    let mut sampler = Sampler::new(SamplerConfig {
        temperature: ask.temperature,
        top_p: ask.top_p,
        seed,
    })
    .map_err(|e| e.to_string())?;
    let opts = RunOptions {
        top_k: ask.top_k.map(|k| k.min(cfg.num_local_experts)),
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
        set_progress("");
    }
    let mut supply = ChainSupply {
        chain: store,
        config: &model.config,
        experts,
        fetched: Vec::new(),
        asked: Vec::new(),
    };
    let (gen, engine, used) = match gpu.as_mut().filter(|_| ask.gpu) {
        Some(engine) => {
            let info = &engine.context().info;
            let adapter = if info.name.is_empty() {
                format!("GPU ({} adapter)", info.backend)
            } else {
                format!("GPU ({}, {})", info.name, info.backend)
            };
            let g = stream(
                engine,
                &mut supply,
                &model.tokenizer,
                ids,
                ask.max_tokens,
                &mut sampler,
                &opts,
            )
            .await;
            (g, adapter, supply.asked.iter().copied().collect())
        }
        None => {
            model.engine.reset_stats();
            let g = stream(
                &mut model.engine,
                &mut supply,
                &model.tokenizer,
                ids,
                ask.max_tokens,
                &mut sampler,
                &opts,
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
        fetched_bytes: supply.chain.stats.payload_bytes - bytes_before,
    })
}
