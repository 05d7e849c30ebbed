//! The engine contract: a step either finishes or says which experts it
//! lacks. Engines never call out for weights (sans-IO, as str0m and
//! quinn-proto do for networking): the caller supplies what a step needs,
//! from a file, a store, a cache or a peer, and resumes. So the same engine
//! runs under tokio, in wasm (whose futures are not `Send`) and in tests.
//!
//! ```text
//! engine.step(tokens) ──► Done(output)
//!        │
//!        └─► Need([(layer, expert), ..]) ─► caller fetches ─► supply_expert(..) ─► resume()
//! ```
//!
//! [`run_step`] is that loop, once, for every caller; [`Supply`] is where the
//! weights come from (any synchronous [`ExpertSource`] is one).

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use super::{Config, ExpertSource, ExpertWeights, ModelError, RunOptions};

/// One expert of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExpertId {
    pub layer: usize,
    pub expert: usize,
}

impl ExpertId {
    pub fn new(layer: usize, expert: usize) -> Self {
        Self { layer, expert }
    }
}

impl std::fmt::Display for ExpertId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "layer{}.expert{}", self.layer, self.expert)
    }
}

/// What a step should produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// The logits of the last position.
    Logits,
    /// The logits of every position (eval loss, tests).
    AllLogits,
    /// The greedy next token; an engine may pick it itself (the GPU reads
    /// back only its id) or return [`Output::Logits`].
    Greedy,
}

/// What a finished step produced.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    Logits(Vec<f32>),
    AllLogits(Vec<Vec<f32>>),
    Token(u32),
}

/// The answer of [`Engine::step`] and [`Engine::resume`].
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// The step finished; its tokens are in the KV cache.
    Done(Output),
    /// The step is paused: supply these experts with
    /// [`Engine::supply_expert`], then call [`Engine::resume`] (or
    /// [`Engine::cancel`]).
    Need(Vec<ExpertId>),
}

/// An inference engine (the CPU reference, the GPU engine).
///
/// Futures here are not `Send` (wasm's are not), so the trait uses plain
/// `async fn`.
#[allow(async_fn_in_trait)]
pub trait Engine {
    /// Start a step that appends `tokens` to the KV cache.
    async fn step(
        &mut self,
        tokens: &[u32],
        opts: &RunOptions,
        want: Want,
    ) -> Result<Step, ModelError>;
    /// Continue a paused step after its experts were supplied.
    async fn resume(&mut self) -> Result<Step, ModelError>;
    /// Hand the engine an expert's weights (checked against the config).
    fn supply_expert(&mut self, id: ExpertId, weights: ExpertWeights) -> Result<(), ModelError>;
    /// Drop a paused step: the KV cache is as it was before it.
    fn cancel(&mut self);
    /// Empty the KV cache (position back to 0).
    fn reset(&mut self);
    /// Tokens in the KV cache.
    fn position(&self) -> usize;
    fn config(&self) -> &Config;
}

/// Where the weights a step lacks come from.
#[allow(async_fn_in_trait)]
pub trait Supply {
    async fn experts(
        &mut self,
        need: &[ExpertId],
    ) -> Result<Vec<(ExpertId, ExpertWeights)>, ModelError>;
}

impl<S: ExpertSource + ?Sized> Supply for S {
    async fn experts(
        &mut self,
        need: &[ExpertId],
    ) -> Result<Vec<(ExpertId, ExpertWeights)>, ModelError> {
        need.iter()
            .map(|&id| Ok((id, self.load_expert(id.layer, id.expert)?)))
            .collect()
    }
}

/// Run one step to its end: supply whatever it asks for, resume, repeat.
/// On any error the paused step is cancelled, so the cache stays consistent.
pub async fn run_step<E: Engine + ?Sized, S: Supply + ?Sized>(
    engine: &mut E,
    supply: &mut S,
    tokens: &[u32],
    opts: &RunOptions,
    want: Want,
) -> Result<Output, ModelError> {
    let mut step = engine.step(tokens, opts, want).await;
    loop {
        match step {
            Ok(Step::Done(out)) => return Ok(out),
            Ok(Step::Need(ids)) => {
                let supplied = async {
                    for (id, w) in supply.experts(&ids).await? {
                        engine.supply_expert(id, w)?;
                    }
                    Ok::<(), ModelError>(())
                }
                .await;
                if let Err(e) = supplied {
                    engine.cancel();
                    return Err(e);
                }
                step = engine.resume().await;
            }
            Err(e) => {
                engine.cancel();
                return Err(e);
            }
        }
    }
}

/// Poll a future that is ready at once (a CPU engine with a synchronous
/// source); anything that would wait is an error, not a hang.
pub fn now<T>(fut: impl Future<Output = Result<T, ModelError>>) -> Result<T, ModelError> {
    let mut fut = pin!(fut);
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(r) => r,
        Poll::Pending => Err(ModelError::Source(
            "a synchronous call would have to wait (use the async API)".into(),
        )),
    }
}
