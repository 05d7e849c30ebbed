//! The acceptance hook: every new version of an existing slot passes a [`Gate`]
//! after validation and before it is stored. The default [`AcceptAll`] accepts
//! everything; the quality gate (relay/src/quality.rs) recomputes the claimed
//! loss and compares it with the incumbent's.

use web_node::chain::{Block, BlockHash, Dag};
use web_node::model::Config;
use web_node::net::api::{codes, ApiError};
use web_node::store::BlockStore;

/// What a gate sees: the validated new block and its payload, the incumbent
/// head it replaces, and read access to the chain and the store (to read the
/// current heads' payloads).
pub struct GateContext<'a> {
    pub block: &'a Block,
    pub payload: &'a [u8],
    /// The slot's current head (the block this one replaces).
    pub head: BlockHash,
    /// The config of the block's meta block (None for chain-A blocks).
    pub config: Option<&'a Config>,
    pub dag: &'a Dag,
    pub store: &'a dyn BlockStore,
}

/// Why a gate refused a block (the message should carry the numbers).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct Rejection {
    /// [`codes::REJECTED`] (422) or [`codes::RATE_LIMITED`] (429).
    pub code: &'static str,
    pub message: String,
}

impl Rejection {
    pub fn rejected(message: impl Into<String>) -> Self {
        Self {
            code: codes::REJECTED,
            message: message.into(),
        }
    }
    pub fn rate_limited(message: impl Into<String>) -> Self {
        Self {
            code: codes::RATE_LIMITED,
            message: message.into(),
        }
    }
}

impl From<Rejection> for ApiError {
    fn from(r: Rejection) -> Self {
        ApiError::new(r.code, r.message)
    }
}

/// Acceptance hook for new versions of existing slots. Runs on a blocking
/// thread under the chain's write lock, so it may be slow (an eval run).
pub trait Gate: Send + Sync {
    fn check(&self, ctx: &GateContext<'_>) -> Result<(), Rejection>;
}

/// Accepts every valid block.
#[derive(Debug, Default, Clone, Copy)]
pub struct AcceptAll;

impl Gate for AcceptAll {
    fn check(&self, _ctx: &GateContext<'_>) -> Result<(), Rejection> {
        Ok(())
    }
}
