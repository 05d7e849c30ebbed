//! `POST /chat` and `POST /chat/distributed`: the handlers of the CPU
//! reference engine run by the relay on its own verified chain. The
//! feature's runtime (options, slots, rate table, model cache) is
//! [`crate::chat`]; the handlers reach it through [`ChatHost`].
//!
//! * The model comes from the runtime's cache ([`crate::chat::LoadedModel`]);
//!   each request runs a [`fork`](web_node::model::reference::CpuEngine::fork)
//!   of the cached engine: shared weights, a fresh KV cache.
//! * Generation is the one loop of web-node
//!   ([`generate_async`](web_node::model::generate::generate_async)) on a
//!   blocking thread, never on the async runtime.
//! * `/chat/distributed` runs the engine in remote mode: every layer's
//!   expert computations go out in parallel to peers through
//!   [`ExpertCompute`](crate::compute::ExpertCompute), with local computation
//!   as the fallback (`remote`). The summation is the engine's own, so the
//!   greedy tokens equal `/chat`'s.
//! * Limits ([`ChatOptions`], each a named constant): concurrent generations
//!   (429 with Retry-After beyond), a per-IP token bucket, `max_tokens`,
//!   prompt length and body size. A client that goes away stops its
//!   generation at the next token.
//!
//! Layer: handlers, above [`crate::state`]. Remote computation goes through
//! [`crate::compute`], never `crate::peers`.
//! May import: `state`, `chat`, `compute`, `http`, `metrics`, `store`, `usage`.

mod remote;

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::header;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use futures_util::StreamExt as _;
use tokio::sync::mpsc;
use web_node::model::generate::{generate_async, prompt_ids, StopReason};
use web_node::model::reference::CpuEngine;
use web_node::model::sampler::{Sampler, SamplerConfig};
use web_node::model::{
    Config, Engine, ExpertId, ExpertWeights, ModelError, RunOptions, Step, Want,
};
use web_node::net::api::{codes, ApiError};
use web_node::net::chat::{
    ChatRequest, ChatResponse, ChatTimings, ExpertUse, TokenEvent, EVENT_DONE, EVENT_ERROR,
    EVENT_TOKEN,
};

use crate::chat::runtime::ChatRuntime;
use crate::chat::{ChatOptions, LoadedModel, BUSY_RETRY_AFTER};
use crate::compute::ExpertCompute;
use crate::http::HttpError;
use crate::state::CoreState;

/// What the chat handlers need of the relay (the port the server's state
/// implements): the core state, the chat runtime, and who computes experts
/// remotely.
pub trait ChatHost: Send + Sync + 'static {
    fn core(&self) -> &CoreState;
    fn chat(&self) -> &ChatRuntime;
    fn compute(&self) -> Arc<dyn ExpertCompute>;
}

/// What the chat handlers run on.
pub type ChatState = Arc<dyn ChatHost>;

/// `/chat` and `/chat/distributed`.
pub fn routes() -> axum::Router<ChatState> {
    Router::new()
        .route("/chat", post(chat_local))
        .route("/chat/distributed", post(chat_distributed))
}

async fn chat_local(State(state): State<ChatState>, req: Request) -> Response {
    counted(false, handle(state, req, false).await)
}

async fn chat_distributed(State(state): State<ChatState>, req: Request) -> Response {
    counted(true, handle(state, req, true).await)
}

/// Count a chat request's outcome ([`crate::metrics::chat_request`]).
fn counted(distributed: bool, r: Result<Response, HttpError>) -> Response {
    let outcome = r.as_ref().map(|_| ()).map_err(|e| e.error.code.as_str());
    crate::metrics::chat_request(distributed, outcome);
    r.unwrap_or_else(IntoResponse::into_response)
}

fn bad(message: impl Into<String>) -> HttpError {
    ApiError::malformed(message).into()
}

/// Read a JSON body of at most `max` bytes, each piece within `idle`.
async fn read_body(req: Request, max: usize, idle: Duration) -> Result<ChatRequest, HttpError> {
    let ct = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = ct.split(';').next().unwrap_or("").trim();
    if !mime.eq_ignore_ascii_case("application/json") {
        return Err(HttpError::unsupported_media(format!(
            "the chat body must be application/json, not {:?}",
            ct
        )));
    }
    let too_large = || {
        HttpError::from(ApiError::new(
            codes::TOO_LARGE,
            format!("the chat body exceeds {max} bytes"),
        ))
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    let mut stream = req.into_body().into_data_stream();
    loop {
        match tokio::time::timeout(idle, stream.next()).await {
            Err(_) => {
                return Err(HttpError::timeout(format!(
                    "the chat body sent nothing for {} s",
                    idle.as_secs()
                )))
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(bad(format!("reading the chat body: {e}"))),
            Ok(Some(Ok(piece))) => {
                if body.len() + piece.len() > max {
                    return Err(too_large());
                }
                body.extend_from_slice(&piece);
            }
        }
    }
    let v: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| bad(format!("chat body: {e}")))?;
    // serde would also read a struct from an array of its fields.
    if !v.is_object() {
        return Err(bad("the chat body must be a JSON object"));
    }
    serde_json::from_value(v).map_err(|e| bad(format!("chat body: {e}")))
}

/// A checked request.
struct Params {
    prompt: String,
    opts: RunOptions,
    sampler: SamplerConfig,
    max_tokens: usize,
    stream: bool,
    local_fallback: bool,
    model: Option<String>,
}

/// Longest `model` selector accepted (a hash is 64 hex digits).
const MAX_MODEL_SELECTOR: usize = 128;

fn check(req: ChatRequest, o: &ChatOptions, distributed: bool) -> Result<Params, HttpError> {
    if req.prompt.trim().is_empty() {
        return Err(bad("prompt is empty"));
    }
    let chars = req.prompt.chars().count();
    if chars > o.max_prompt_chars {
        return Err(ApiError::new(
            codes::TOO_LARGE,
            format!(
                "prompt has {chars} characters, at most {} are accepted",
                o.max_prompt_chars
            ),
        )
        .into());
    }
    let max_tokens = req.max_tokens.unwrap_or(o.default_max_tokens);
    if max_tokens == 0 || max_tokens > o.max_tokens_cap {
        return Err(bad(format!(
            "max_tokens {max_tokens} must be in 1..={}",
            o.max_tokens_cap
        )));
    }
    if req.top_k_experts == Some(0) {
        return Err(bad("top_k_experts must be at least 1"));
    }
    if !distributed && req.local_fallback.is_some() {
        return Err(bad("local_fallback applies to /chat/distributed only"));
    }
    if let Some(m) = &req.model {
        if m.is_empty() || m.len() > MAX_MODEL_SELECTOR {
            return Err(bad(format!(
                "model must be a meta block hash or a model name of 1..={MAX_MODEL_SELECTOR} bytes"
            )));
        }
    }
    let sampler = SamplerConfig {
        temperature: req.temperature.unwrap_or(0.0),
        top_p: req.top_p.unwrap_or(1.0),
        seed: req.seed.unwrap_or(0),
    };
    sampler.validate().map_err(|e| bad(e.to_string()))?;
    Ok(Params {
        prompt: req.prompt,
        opts: RunOptions {
            top_k: req.top_k_experts,
            use_moe: req.use_moe.unwrap_or(true),
        },
        sampler,
        max_tokens,
        stream: req.stream.unwrap_or(false),
        local_fallback: req.local_fallback.unwrap_or(true),
        model: req.model,
    })
}

/// `top_k_experts` against the model.
fn check_model(p: &Params, cfg: &Config) -> Result<usize, HttpError> {
    if let Some(k) = p.opts.top_k {
        if k > cfg.num_local_experts {
            return Err(bad(format!(
                "top_k_experts {k} must be in 1..={} (the model's experts per layer)",
                cfg.num_local_experts
            )));
        }
    }
    p.opts
        .experts_per_token(cfg)
        .map_err(|e| bad(e.to_string()))
}

async fn handle(state: ChatState, req: Request, distributed: bool) -> Result<Response, HttpError> {
    let ip = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let rt = state.chat();
    let core = state.core();
    rt.rates.take(&ip).map_err(|wait| {
        crate::metrics::refused(crate::metrics::Limit::ChatIpRate);
        HttpError::rate_limited(
            format!(
                "{ip} sends chat requests too fast: at most {} per minute (burst {}); retry in {wait} s",
                rt.opts.ip_rate.per_minute, rt.opts.ip_rate.burst
            ),
            wait,
        )
    })?;
    let body = read_body(req, rt.opts.max_body, rt.opts.body_idle_timeout).await?;
    let p = check(body, &rt.opts, distributed)?;
    let permit = rt.slots.clone().try_acquire_owned().map_err(|_| {
        crate::metrics::refused(crate::metrics::Limit::ChatBusy);
        HttpError::rate_limited(
            format!(
                "the relay is busy: {} generations are running; retry in {BUSY_RETRY_AFTER} s",
                rt.opts.max_concurrent
            ),
            BUSY_RETRY_AFTER,
        )
    })?;
    let t0 = Instant::now();
    let model = rt
        .model(&core.chain, &core.store, p.model.as_deref())
        .await?;
    let load_ms = ms(t0.elapsed());
    let per_token = check_model(&p, &model.chain.config)?;
    let remote = if distributed {
        let compute = state.compute();
        if !p.local_fallback && compute.compute_peers() == 0 {
            return Err(no_peer("no logged-in peer serves expert computations"));
        }
        Some(remote::Remote::new(compute, p.local_fallback))
    } else {
        None
    };
    let job = Job {
        model,
        store: core.store.clone(),
        prompt: p.prompt,
        opts: p.opts,
        sampler: p.sampler,
        max_tokens: p.max_tokens,
        per_token,
        remote,
        load_ms,
        cancel: Arc::new(AtomicBool::new(false)),
        usage: core.usage.clone(),
    };
    let handle = tokio::runtime::Handle::current();
    if p.stream {
        let (tx, rx) = mpsc::unbounded_channel::<Msg>();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let events = tx.clone();
            let r = handle.block_on(job.run(Some(events)));
            // The client may be gone; nothing to do then.
            let _ = tx.send(match r {
                Ok(resp) => Msg::Done(Box::new(resp)),
                Err(e) => Msg::Error(e.error),
            });
        });
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            let m = rx.recv().await?;
            Some((Ok::<Event, Infallible>(m.event()), rx))
        });
        return Ok(Sse::new(stream)
            .keep_alive(KeepAlive::default())
            .into_response());
    }
    // Dropped (client gone) before the answer: stop generating.
    let cancel = CancelOnDrop(job.cancel.clone());
    let r = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        handle.block_on(job.run(None))
    })
    .await
    .map_err(|e| HttpError::from(ApiError::internal(format!("generation task failed: {e}"))))?;
    drop(cancel);
    Ok(Json(r?).into_response())
}

/// 503 of `/chat/distributed` without local fallback.
fn no_peer(why: &str) -> HttpError {
    HttpError::with_status(
        ApiError::new(
            codes::UNAVAILABLE,
            format!(
                "no peer serves expert computation for this request ({why}) and \
                 local_fallback is false; retry later or allow the relay to compute"
            ),
        ),
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
    )
}

struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// What a streamed generation sends to its response.
enum Msg {
    Token(TokenEvent),
    Done(Box<ChatResponse>),
    Error(ApiError),
}

impl Msg {
    fn event(&self) -> Event {
        let (name, data) = match self {
            Msg::Token(t) => (EVENT_TOKEN, serde_json::to_string(t)),
            Msg::Done(r) => (EVENT_DONE, serde_json::to_string(r)),
            Msg::Error(e) => (EVENT_ERROR, serde_json::to_string(e)),
        };
        Event::default()
            .event(name)
            .data(data.unwrap_or_else(|e| format!("{{\"code\":\"internal\",\"message\":\"{e}\"}}")))
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// One generation, run on a blocking thread.
struct Job {
    model: Arc<LoadedModel>,
    store: Arc<dyn crate::store::RelayStore>,
    prompt: String,
    opts: RunOptions,
    sampler: SamplerConfig,
    max_tokens: usize,
    per_token: usize,
    remote: Option<remote::Remote>,
    load_ms: f64,
    cancel: Arc<AtomicBool>,
    /// Where the tokens routed to each expert version are counted.
    usage: Arc<crate::usage::Usage>,
}

impl Job {
    async fn run(
        self,
        events: Option<mpsc::UnboundedSender<Msg>>,
    ) -> Result<ChatResponse, HttpError> {
        let m = &self.model;
        let cfg = &m.chain.config;
        let ids = prompt_ids(&m.chain.tokenizer, cfg, &self.prompt).map_err(input_err)?;
        let prompt_tokens = ids.len();
        let mut engine = m.engine();
        let distributed = self.remote.is_some();
        engine.set_remote_experts(distributed);
        let mut sampler = Sampler::new(self.sampler).map_err(input_err)?;
        let mut supply = remote::ChatSupply::new(m.clone(), self.store.clone(), self.remote);
        let mut rec = Recording {
            engine: &mut engine,
            steps: Vec::new(),
        };
        let start = Instant::now();
        let mut first: Option<Duration> = None;
        let cancel = &self.cancel;
        let g = generate_async(
            &mut rec,
            &mut supply,
            &m.chain.tokenizer,
            ids,
            self.max_tokens,
            &mut sampler,
            &self.opts,
            |id, piece| {
                first.get_or_insert_with(|| start.elapsed());
                if cancel.load(Ordering::Relaxed) {
                    return false;
                }
                match &events {
                    Some(tx) => tx
                        .send(Msg::Token(TokenEvent {
                            id,
                            text: piece.to_string(),
                        }))
                        .is_ok(),
                    None => true,
                }
            },
        )
        .await;
        let steps = std::mem::take(&mut rec.steps);
        let g = match g {
            Ok(g) => g,
            Err(e) => return Err(supply.error_of(e)),
        };
        let total = start.elapsed();
        crate::metrics::chat_generated(distributed, g.tokens.len() as u64, total);
        let prefill = first.unwrap_or(total);
        let decode = total.saturating_sub(prefill);
        let decoded = g.tokens.len().saturating_sub(1);
        let experts = experts_used(&engine.routing_stats().tokens_routed);
        let (computed_by, failovers) = supply.report();
        // Usage: tokens routed to each expert version (its head block), with
        // the generation's mean step time as the call's latency.
        let step_us = (total.as_micros() as u64) / (decoded as u64 + 1);
        let routed = routed_versions(m, &engine.routing_stats().tokens_routed, step_us);
        self.usage.record_inference(&routed);
        Ok(ChatResponse {
            response: g.text,
            tokens: g.tokens,
            prompt_tokens,
            stop: match g.stop {
                StopReason::Eos => "eos",
                StopReason::MaxTokens => "max_tokens",
                StopReason::Callback => "cancelled",
                StopReason::ContextFull => "context_full",
            }
            .into(),
            experts,
            step_experts: steps,
            use_moe: self.opts.use_moe,
            experts_per_token: self.per_token,
            timings: ChatTimings {
                load_ms: self.load_ms,
                prefill_ms: ms(prefill),
                decode_ms: ms(decode),
                total_ms: self.load_ms + ms(total),
                decode_tokens_per_s: if decode.is_zero() {
                    0.0
                } else {
                    decoded as f64 / decode.as_secs_f64()
                },
            },
            model: m.chain.meta.to_hex(),
            model_name: m.chain.name.clone(),
            computed_by,
            failovers,
        })
    }
}

/// Bad input found by the engine (e.g. a prompt longer than the context).
fn input_err(e: ModelError) -> HttpError {
    match e {
        ModelError::Input(m) => bad(m),
        e => ApiError::internal(e.to_string()).into(),
    }
}

/// The engine as the generation loop sees it, noting per finished step the
/// experts each layer routed to.
struct Recording<'a> {
    engine: &'a mut CpuEngine,
    steps: Vec<Vec<Vec<usize>>>,
}

impl Recording<'_> {
    fn note(&mut self, s: &Result<Step, ModelError>) {
        if let Ok(Step::Done(_)) = s {
            self.steps.push(self.engine.last_step_experts().to_vec());
        }
    }
}

impl Engine for Recording<'_> {
    async fn step(
        &mut self,
        tokens: &[u32],
        opts: &RunOptions,
        want: Want,
    ) -> Result<Step, ModelError> {
        let s = self.engine.step_now(tokens, opts, want);
        self.note(&s);
        s
    }

    async fn resume(&mut self) -> Result<Step, ModelError> {
        let s = self.engine.resume_now();
        self.note(&s);
        s
    }

    fn supply_expert(&mut self, id: ExpertId, weights: ExpertWeights) -> Result<(), ModelError> {
        self.engine.insert_expert(id, weights)
    }

    fn supply_output(&mut self, id: ExpertId, output: Vec<f32>) -> Result<(), ModelError> {
        self.engine.supply_expert_output(id, output)
    }

    fn cancel(&mut self) {
        self.engine.cancel_step();
    }

    fn reset(&mut self) {
        Engine::reset(self.engine);
    }

    fn position(&self) -> usize {
        self.engine.position()
    }

    fn config(&self) -> &Config {
        Engine::config(self.engine)
    }
}

/// Per layer, the experts that got tokens and how many.
fn experts_used(tokens_routed: &[Vec<u64>]) -> Vec<Vec<ExpertUse>> {
    tokens_routed
        .iter()
        .map(|row| {
            row.iter()
                .enumerate()
                .filter(|(_, &c)| c > 0)
                .map(|(expert, &tokens)| ExpertUse { expert, tokens })
                .collect()
        })
        .collect()
}

/// Usage: tokens routed to each expert version (its head block in `m`),
/// each with `step_us` as the call's latency.
fn routed_versions(
    m: &LoadedModel,
    tokens_routed: &[Vec<u64>],
    step_us: u64,
) -> Vec<(web_node::chain::BlockHash, u64, u64)> {
    tokens_routed
        .iter()
        .enumerate()
        .flat_map(|(l, row)| {
            row.iter()
                .enumerate()
                .filter(|(_, &c)| c > 0)
                .filter_map(move |(e, &c)| {
                    m.chain
                        .heads
                        .get(&format!("layer{l}.expert{e}"))
                        .map(|b| (*b, c, step_us))
                })
        })
        .collect()
}
