//! The chat form: one answer streamed into `#reply` token by token. The
//! generation loop is [`Generator`] driven step by step with [`run_step`]
//! (as [`crate::model::generate::generate_async`] does), on the CPU engine
//! or the WebGPU engine, with the experts supplied by [`ChainSupply`] as the
//! router picks them; after each token the page paints and the stop
//! button's click can run.

use std::cell::Cell;
use std::collections::BTreeSet;
use std::sync::Arc;

use crate::gpu::GpuContext;
use crate::model::generate::{prompt_ids, Generation, Generator, StopReason};
use crate::model::sampler::{Sampler, SamplerConfig};
use crate::model::tokenizer::Tokenizer;
use crate::model::{Engine, ExpertId, ModelError, Output, RunOptions, Step, Supply as _, Want};
use crate::view::budget::ByteLru;

use super::dom::{
    input_value, next_frame, now_ms, on_click, set_attr, set_disabled, set_progress, set_text,
};
use super::fetch::ChainSupply;
use super::{panels, show_details, show_status, Node, NODE};
use crate::view::fmt_bytes;

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
    /// Asks a prefetch had already started or finished.
    prefetch_hits: u64,
    /// Decoded experts evicted during the answer.
    evicted: u64,
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
    // Downloads still waiting for their cache write, in one transaction.
    node.store.flush_cache().await;
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
                     stop: {stop:?}. Experts used: {nu} (per layer: {used}); fetched for this \
                     answer: {nf} ({fb}; {ph} prefetched ahead); {ev} decoded experts evicted \
                     to stay within the budget. This page holds {held} of {all} experts \
                     (cache and memory) and fetched {pb} of the model's {mb}.",
                    engine = a.engine,
                    np = a.gen.prompt_tokens.len(),
                    n = a.gen.tokens.len(),
                    tps = a.gen.tokens.len() as f64 * 1000.0 / ms.max(1.0),
                    stop = a.gen.stop,
                    nu = a.used.len(),
                    used = crate::view::page::per_layer_counts(a.used.iter().copied()),
                    ph = a.prefetch_hits,
                    ev = a.evicted,
                    nf = a.fetched.len(),
                    fb = fmt_bytes(a.fetched_bytes),
                    held = node.store.held_experts().len(),
                    all = node.model.config.num_hidden_layers * node.model.config.num_local_experts,
                    pb = fmt_bytes(s.payload_bytes),
                    mb = fmt_bytes(node.model_bytes),
                ),
            );
            let held = node.store.held_blocks();
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
            // Summed with what earlier reports left pending in the core's
            // batcher, which signs, splits and numbers the reports.
            let model = &node.model;
            super::net::report_usage(
                routed
                    .into_iter()
                    .filter_map(|(id, tokens)| model.expert_block(id).map(|b| (b, tokens))),
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
    super::show_memory_of(&node.store, &node.decoded);
    super::net::refresh_now();
    set_progress("");
    NODE.with(|c| *c.borrow_mut() = Some(node));
    set_disabled("send", false);
}

/// An engine whose decoded experts the page bounds: the CPU engine holds
/// every expert it was given until one is evicted; the GPU engine keeps its
/// own pool (sized from the budget) and holds no CPU copy.
#[allow(async_fn_in_trait)]
pub trait Bounded {
    /// Drop a held expert; false when the engine keeps no decoded copies.
    fn evict(&mut self, id: ExpertId) -> bool;
    /// Whether supplied experts stay in CPU memory.
    fn holds_decoded(&self) -> bool;
    /// Per layer, the experts the last finished step routed to.
    fn last_routed(&self) -> Vec<Vec<usize>>;
    /// Up to `n` greedy tokens after `first` (the token the last greedy
    /// step returned), each shown to `keep` (false stops), pipelined on
    /// the engine where it can run them so (the GPU engine with every
    /// expert resident, or a pool whose misses it supplies from `supply`
    /// mid-pipeline, [`crate::gpu::Engine::can_pipeline`]): `None` where it
    /// cannot, and the caller steps token by token.
    async fn decode_pipelined(
        &mut self,
        _supply: &mut ChainSupply<'_>,
        _first: u32,
        _n: usize,
        _opts: &RunOptions,
        _keep: &mut dyn FnMut(u32) -> bool,
    ) -> Option<Result<Vec<u32>, ModelError>> {
        None
    }
}

impl Bounded for crate::model::reference::CpuEngine {
    fn evict(&mut self, id: ExpertId) -> bool {
        self.evict_expert(id)
    }
    fn holds_decoded(&self) -> bool {
        true
    }
    fn last_routed(&self) -> Vec<Vec<usize>> {
        self.last_step_experts().to_vec()
    }
}

impl Bounded for crate::gpu::Engine {
    fn evict(&mut self, _: ExpertId) -> bool {
        false
    }
    fn holds_decoded(&self) -> bool {
        false
    }
    fn last_routed(&self) -> Vec<Vec<usize>> {
        Vec::new()
    }
    async fn decode_pipelined(
        &mut self,
        supply: &mut ChainSupply<'_>,
        first: u32,
        n: usize,
        opts: &RunOptions,
        keep: &mut dyn FnMut(u32) -> bool,
    ) -> Option<Result<Vec<u32>, ModelError>> {
        // A token that misses an expert gets it from `supply` mid-pipeline.
        if !self.can_pipeline(first) {
            return None;
        }
        Some(self.decode_greedy(supply, first, n, opts, keep).await)
    }
}

/// The decoded experts an engine holds, within `cap` bytes.
pub struct Decoded<'a> {
    pub lru: &'a mut ByteLru<ExpertId>,
    pub cap: u64,
    /// Experts dropped to stay within `cap` (this answer).
    pub evicted: u64,
}

/// One step to its end (as [`crate::model::run_step`]), with the page's
/// memory in it: the experts of a layer's need are fetched together, the
/// experts the last step routed to in the next two layers are prefetched
/// beside them when the engine no longer holds them, and decoded experts
/// beyond the budget are evicted, least recently used first (never one of
/// the layer being computed).
async fn bounded_step<E: Engine + Bounded + ?Sized>(
    engine: &mut E,
    supply: &mut ChainSupply<'_>,
    decoded: &mut Decoded<'_>,
    tokens: &[u32],
    opts: &RunOptions,
    want: Want,
) -> Result<Output, ModelError> {
    let n_exp = engine.config().num_local_experts;
    let last = engine.last_routed();
    let mut step = engine.step(tokens, opts, want).await;
    loop {
        let ids = match step {
            Ok(Step::Done(out)) => {
                for (l, es) in engine.last_routed().iter().enumerate() {
                    for &e in es {
                        decoded.lru.touch(&ExpertId::new(l, e));
                    }
                }
                return Ok(out);
            }
            Ok(Step::Need(ids)) => ids,
            Ok(Step::Compute(jobs)) => {
                engine.cancel();
                return Err(ModelError::Source(format!(
                    "the page runs every expert itself (asked to compute {} jobs)",
                    jobs.len()
                )));
            }
            Err(e) => return Err(e),
        };
        let layer = ids.first().map_or(0, |id| id.layer);
        supply.prefetch = likely_next(layer, &last, decoded.lru);
        let supplied = async {
            for (id, w) in supply.experts(&ids).await? {
                let bytes = w.stored_bytes() as u64;
                engine.supply_expert(id, w)?;
                if engine.holds_decoded() {
                    decoded.lru.insert(id, bytes, false);
                }
            }
            Ok::<(), ModelError>(())
        }
        .await;
        if let Err(e) = supplied {
            engine.cancel();
            return Err(e);
        }
        let keep: Vec<ExpertId> = (0..n_exp).map(|e| ExpertId::new(layer, e)).collect();
        for id in decoded.lru.evict_for(0, decoded.cap, &keep) {
            engine.evict(id);
            decoded.lru.remove(&id);
            decoded.evicted += 1;
        }
        step = engine.resume().await;
    }
}

/// Layers ahead of the one being computed whose experts are prefetched.
const AHEAD_LAYERS: usize = 3;

/// The experts of the next [`AHEAD_LAYERS`] layers worth fetching while
/// `layer` waits for its own, nearest layer first: the ones the last step
/// routed to (a token often routes like the one before) that the engine no
/// longer holds. Nothing is fetched on speculation beyond that: every
/// other expert of those layers (measured: 1.8× the bytes and a slower
/// first answer on the 16 × 64 model, the page being CPU-bound).
/// [`super::fetch::VerifiedChain::prefetch`] skips what is cached or on its
/// way, and stops at its share of the budget.
fn likely_next(layer: usize, last: &[Vec<usize>], decoded: &ByteLru<ExpertId>) -> Vec<ExpertId> {
    (layer + 1..(layer + 1 + AHEAD_LAYERS).min(last.len()))
        .flat_map(|l| last[l].iter().map(move |&e| ExpertId::new(l, e)))
        .filter(|id| !decoded.contains(id))
        .collect()
}

/// The generation loop of [`crate::model::generate::generate_async`], with
/// the page in it: each token is shown as it comes, the browser paints, and
/// the stop button cancels.
#[allow(clippy::too_many_arguments)]
async fn stream<E: Engine + Bounded + ?Sized>(
    engine: &mut E,
    supply: &mut ChainSupply<'_>,
    decoded: &mut Decoded<'_>,
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
    // Tokens decoded with the next one already submitted (shown to tests).
    let mut pipelined = 0usize;
    set_attr("reply", "data-pipelined", "0");
    while let Some(input) = g.input() {
        let input = input.to_vec();
        let out = bounded_step(engine, supply, decoded, &input, opts, want).await?;
        if let Some((id, piece)) = g.push(out, sampler, tok)? {
            ids.push(id);
            text.push_str(&piece);
            set_text("reply", &text);
            set_attr("reply", "data-tokens", &ids.len().to_string());
            set_attr("reply", "data-token-ids", &token_list(&ids));
        }
        super::show_memory_of(supply.chain, decoded.lru);
        // Paint, and let a click on stop run.
        next_frame().await;
        if STOP.with(Cell::get) {
            g.cancel();
        }
        // Greedy, and the engine can pipeline (the GPU engine): the rest of
        // the answer with token t + 1 submitted before t is read back, each
        // token shown as it comes (the page paints while a readback is
        // awaited), within the context.
        let (Some(&first), Some(_), Want::Greedy) = (ids.last(), g.input(), want) else {
            continue;
        };
        let room = engine
            .config()
            .max_position_embeddings
            .saturating_sub(engine.position());
        let n = max_tokens.saturating_sub(ids.len()).min(room);
        if n == 0 {
            continue;
        }
        let mut failed = None;
        let mut keep = |id: u32| match g.push(Output::Token(id), sampler, tok) {
            Ok(Some((id, piece))) => {
                ids.push(id);
                text.push_str(&piece);
                set_text("reply", &text);
                set_attr("reply", "data-tokens", &ids.len().to_string());
                set_attr("reply", "data-token-ids", &token_list(&ids));
                if STOP.with(Cell::get) {
                    g.cancel();
                }
                g.input().is_some()
            }
            Ok(None) => false,
            Err(e) => {
                failed = Some(e);
                false
            }
        };
        if let Some(r) = engine
            .decode_pipelined(supply, first, n, opts, &mut keep)
            .await
        {
            pipelined += r?.len();
            set_attr("reply", "data-pipelined", &pipelined.to_string());
            if let Some(e) = failed {
                return Err(e);
            }
            super::show_memory_of(supply.chain, decoded.lru);
            next_frame().await;
        }
    }
    g.finish(tok)
}

async fn answer(node: &mut Node, ask: &Ask) -> Result<Answer, String> {
    let Node {
        store,
        model,
        gpu,
        decoded,
        ..
    } = node;
    let cfg = &model.config;
    let experts = model.expert_heads();
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
    let hits_before = store.stats.prefetch_hits;
    if ask.gpu && gpu.is_none() {
        set_progress("starting the WebGPU engine…");
        let (c, shared, routers) = model.engine_parts().map_err(|e| e.to_string())?;
        let ctx = GpuContext::new().await.map_err(|e| e.to_string())?;
        // The engine's API takes an Arc (shared with native threads); wasm has one thread.
        #[allow(clippy::arc_with_non_send_sync)]
        let ctx = Arc::new(ctx);
        // The GPU pool gets half the budget (at least one layer's experts).
        let one = model
            .expert_block(ExpertId::new(0, 0))
            .and_then(|h| store.dag.get(&h))
            .map_or(0, |e| e.header.payload_len);
        let opts = crate::gpu::EngineOptions {
            expert_quant: c.expert_quant().map_err(|e| e.to_string())?,
            expert_pool_bytes: Some((store.budget / 2).max(one * c.num_local_experts as u64)),
            // No host copies of evicted experts: the page's memory is the
            // user's budget (the store keeps the verified blocks).
            host_cache_bytes: Some(0),
            ..Default::default()
        };
        *gpu = Some(
            crate::gpu::Engine::with_options(ctx, &c, &shared, &routers, opts)
                .map_err(|e| e.to_string())?,
        );
        set_progress("");
    }
    let cap = store.budget / 2;
    let mut supply = ChainSupply::new(store, &model.config, experts);
    let mut decoded = Decoded {
        lru: decoded,
        cap,
        evicted: 0,
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
                &mut decoded,
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
                &mut decoded,
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
        prefetch_hits: supply.chain.stats.prefetch_hits - hits_before,
        evicted: decoded.evicted,
    })
}
