//! The acceptance hook: every new version of an existing slot passes a [`Gate`]
//! after validation and before it is stored. The default [`AcceptAll`] accepts
//! everything; the quality gate (relay/src/quality.rs) recomputes the claimed
//! loss and compares it with the incumbent's.
//!
//! A gate runs on a blocking thread with no lock held, at most
//! `--eval-concurrency` at once, on a snapshot of the slot heads taken when
//! the upload's header was checked; if the slot's head moves meanwhile the
//! upload gets 409 when it commits.
//!
//! Layer: foundation (base). May import: nothing of the crate (the base of the foundation, layer 0 of `scripts/relay_layers.py`).

use std::collections::BTreeMap;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::Path;

use web_node::chain::{Block, BlockHash};
use web_node::model::Config;
use web_node::net::api::{codes, ApiError};
use web_node::store::BlockStore;

/// Where the candidate's payload is: in memory, or in its staged upload file.
#[derive(Debug, Clone, Copy)]
pub enum PayloadRef<'a> {
    Memory(&'a [u8]),
    /// `len` bytes at `offset` of a file.
    File {
        path: &'a Path,
        offset: u64,
        len: u64,
    },
}

/// What a gate sees: the validated new block and its payload, the incumbent
/// head it replaces, the heads of the other slots of its model, and the store
/// (to read the heads' payloads).
pub struct GateContext<'a> {
    pub block: &'a Block,
    pub payload: PayloadRef<'a>,
    /// The slot's current head (the block this one replaces).
    pub head: BlockHash,
    /// The config of the block's meta block (None for chain-A blocks).
    pub config: Option<&'a Config>,
    /// Heads of every slot under the block's meta block, by slot name.
    pub slot_heads: &'a BTreeMap<String, BlockHash>,
    pub store: &'a dyn BlockStore,
}

impl GateContext<'_> {
    /// The candidate's payload in memory (a gate that evaluates needs it whole).
    pub fn payload(&self) -> Result<Vec<u8>, Rejection> {
        match self.payload {
            PayloadRef::Memory(p) => Ok(p.to_vec()),
            PayloadRef::File { path, offset, len } => {
                let read = || -> std::io::Result<Vec<u8>> {
                    let mut f = std::fs::File::open(path)?;
                    f.seek(SeekFrom::Start(offset))?;
                    let n = usize::try_from(len).map_err(std::io::Error::other)?;
                    let mut v = vec![0u8; n];
                    f.read_exact(&mut v)?;
                    Ok(v)
                };
                read().map_err(|e| Rejection::rejected(format!("reading the staged payload: {e}")))
            }
        }
    }

    /// The candidate payload's length.
    pub fn payload_len(&self) -> u64 {
        self.block.header.payload_len
    }
}

/// Why a gate refused a block (the message should carry the numbers).
/// What the gate measured for a block it accepted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Verdict {
    /// The recomputed public-eval loss with this block in its slot.
    pub loss: f64,
    /// The loss of the model it replaces (the slot heads before it).
    pub incumbent: f64,
}

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
/// thread with no lock held, so it may be slow (an eval run).
pub trait Gate: Send + Sync {
    fn check(&self, ctx: &GateContext<'_>) -> Result<(), Rejection>;

    /// Whether [`Gate::check`] does real work for this block (then it runs
    /// under the relay's evaluation concurrency limit and queue).
    fn evaluates(&self, block: &Block) -> bool {
        let _ = block;
        true
    }

    /// The losses behind an accepted block's verdict, taken once after the
    /// block is stored (usage keeps them as the version's quality).
    fn take_verdict(&self, block: &BlockHash) -> Option<Verdict> {
        let _ = block;
        None
    }
}

/// Accepts every valid block.
#[derive(Debug, Default, Clone, Copy)]
pub struct AcceptAll;

impl Gate for AcceptAll {
    fn check(&self, _ctx: &GateContext<'_>) -> Result<(), Rejection> {
        Ok(())
    }
    fn evaluates(&self, _block: &Block) -> bool {
        false
    }
}
