//! The engine contract: a step either finishes or says what it lacks: the
//! weights of experts it does not hold, or (in remote mode) the outputs of
//! expert computations it wants run elsewhere. Engines never call out
//! (sans-IO, as str0m and quinn-proto do for networking): the caller
//! supplies what a step needs, from a file, a store, a cache or a peer, and
//! resumes. So the same engine runs under tokio, in wasm (whose futures are
//! not `Send`) and in tests.
//!
//! ```text
//! engine.step(tokens) ──► Done(output)
//!        │
//!        ├─► Need([(layer, expert), ..]) ─► caller fetches ─► supply_expert(..) ─► resume()
//!        │
//!        └─► Compute([job, ..]) ─► caller runs each expert on job.input
//!                                  (a peer, or locally) ─► supply_output(..) ─► resume()
//! ```
//!
//! [`run_step`] is that loop, once, for every caller; [`Supply`] is where the
//! weights and expert outputs come from (any synchronous [`ExpertSource`] is
//! one: it computes an output by loading the expert and running
//! [`expert_forward`](super::reference::expert_forward)).

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

/// One expert computation a paused step asks for (remote mode): run expert
/// `id` (SwiGLU, [`expert_forward`](super::reference::expert_forward)) on
/// `rows` hidden states and hand back its `rows × hidden` output with
/// [`Engine::supply_output`].
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertJob {
    pub id: ExpertId,
    /// Tokens routed to this expert in this step.
    pub rows: usize,
    /// `rows × hidden`, row-major: the post-attention-normalised hidden
    /// states of those tokens, in token order.
    pub input: Vec<f32>,
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
    /// The step is paused at one layer's experts (remote mode): supply the
    /// output of every job with [`Engine::supply_output`], then call
    /// [`Engine::resume`] (or [`Engine::cancel`]). Jobs are sorted by
    /// expert and all belong to one layer.
    Compute(Vec<ExpertJob>),
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
    /// Hand the engine the output of an [`ExpertJob`] it asked for with
    /// [`Step::Compute`] (checked: asked for, `rows × hidden` long, finite).
    /// Engines without a remote mode refuse.
    fn supply_output(&mut self, id: ExpertId, output: Vec<f32>) -> Result<(), ModelError> {
        drop(output);
        Err(ModelError::Input(format!(
            "{id}: this engine does not take expert outputs (no remote mode)"
        )))
    }
    /// Drop a paused step: the KV cache is as it was before it.
    fn cancel(&mut self);
    /// Empty the KV cache (position back to 0).
    fn reset(&mut self);
    /// Tokens in the KV cache.
    fn position(&self) -> usize;
    fn config(&self) -> &Config;
}

/// Where the weights a step lacks, and the expert outputs it asks for, come
/// from.
#[allow(async_fn_in_trait)]
pub trait Supply {
    async fn experts(
        &mut self,
        need: &[ExpertId],
    ) -> Result<Vec<(ExpertId, ExpertWeights)>, ModelError>;

    /// Run these expert computations ([`Step::Compute`]) and return one
    /// `rows × hidden` output per job. By default a supply computes nothing.
    async fn compute(
        &mut self,
        jobs: Vec<ExpertJob>,
    ) -> Result<Vec<(ExpertId, Vec<f32>)>, ModelError> {
        let ids: Vec<ExpertId> = jobs.iter().map(|j| j.id).collect();
        Err(ModelError::Source(format!(
            "this supply runs no expert computations (asked for {ids:?})"
        )))
    }
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

    /// Load each expert and run it here (what a peer holding it does).
    async fn compute(
        &mut self,
        jobs: Vec<ExpertJob>,
    ) -> Result<Vec<(ExpertId, Vec<f32>)>, ModelError> {
        let threads = super::reference::default_threads();
        jobs.into_iter()
            .map(|j| {
                let w = self.load_expert(j.id.layer, j.id.expert)?;
                Ok((
                    j.id,
                    super::reference::expert_forward(&w, &j.input, j.rows, threads),
                ))
            })
            .collect()
    }
}

/// Ask `supply` for the experts a paused step needs (`ids`) and hand each
/// to `engine`.
pub async fn supply_experts<E: Engine + ?Sized, S: Supply + ?Sized>(
    engine: &mut E,
    supply: &mut S,
    ids: &[ExpertId],
) -> Result<(), ModelError> {
    for (id, w) in supply.experts(ids).await? {
        engine.supply_expert(id, w)?;
    }
    Ok(())
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
        let supplied = match step {
            Ok(Step::Done(out)) => return Ok(out),
            Ok(Step::Need(ids)) => supply_experts(engine, supply, &ids).await,
            Ok(Step::Compute(jobs)) => {
                async {
                    let mut asked: Vec<ExpertId> = jobs.iter().map(|j| j.id).collect();
                    for (id, out) in supply.compute(jobs).await? {
                        engine.supply_output(id, out)?;
                        asked.retain(|&a| a != id);
                    }
                    // A supply that skips a job would make the engine ask
                    // again forever.
                    if !asked.is_empty() {
                        return Err(ModelError::Source(format!(
                            "the supply returned no output for {asked:?}"
                        )));
                    }
                    Ok::<(), ModelError>(())
                }
                .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = supplied {
            engine.cancel();
            return Err(e);
        }
        step = engine.resume().await;
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
