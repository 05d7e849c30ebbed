//! Remote expert computation as the chat engine sees it: run expert `block`
//! on `rows` hidden states somewhere else (a peer that holds it). The peer
//! layer ([`crate::peers`]) implements it; `/chat/distributed` uses it and
//! falls back to local computation.
//!
//! How `/chat/distributed` ([`crate::chat`]) calls it, which implementations
//! can rely on:
//!
//! * One call per [`ExpertJob`](web_node::model::ExpertJob) of the engine's
//!   [`Step::Compute`](web_node::model::Step::Compute): all jobs of one layer
//!   at once (concurrently, `join_all`), the next layer only after every job
//!   of this one is answered.
//! * `block` is the current head block of the expert's slot in the relay's
//!   chain; `input` is `rows × hidden` post-attention-normalised states.
//! * A [`ComputeFailure`] with an empty `failed` list (nobody was tried: no
//!   holder, or every holder out of compute credits) while other jobs of the
//!   same layer were answered is tried again once those are in; any other
//!   failure goes to the relay's own computation (or a 503 when the request
//!   turned `local_fallback` off). So an implementation should fail fast
//!   rather than queue when its holders are busy.
//! * The chat checks every [`ComputeAnswer::output`] (length `rows × hidden`,
//!   finite); a bad one is listed as that peer's failure and computed locally.
//!
//! Layer: foundation (base): the port that cuts chat → peers.
//! May import: nothing of the crate (the base of the foundation, layer 0 of `scripts/relay_layers.py`).

use std::future::Future;
use std::pin::Pin;

use web_node::chain::BlockHash;
use web_node::net::peer::PeerId;

/// A computation that a peer answered in time.
#[derive(Debug, Clone)]
pub struct ComputeAnswer {
    /// `rows × hidden` floats.
    pub output: Vec<f32>,
    /// The peer that computed it.
    pub peer: PeerId,
    /// Peers tried before it, with why each failed.
    pub failed: Vec<(PeerId, String)>,
}

/// No peer answered.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ComputeFailure {
    pub message: String,
    /// Peers tried, with why each failed (empty: no peer serves this block).
    pub failed: Vec<(PeerId, String)>,
}

pub type ComputeFuture<'a> =
    Pin<Box<dyn Future<Output = Result<ComputeAnswer, ComputeFailure>> + Send + 'a>>;

/// Somewhere expert computations can run.
pub trait ExpertCompute: Send + Sync {
    /// Run expert block `block` on `input` (`rows × hidden`, row-major),
    /// trying holders in order of preference, each within its timeout,
    /// avoiding peers in backoff.
    fn compute(&self, block: BlockHash, rows: u32, input: Vec<f32>) -> ComputeFuture<'_>;
    /// Logged-in peers that serve expert computations.
    fn compute_peers(&self) -> usize;
}
