//! The client core every node drives: the page, `aiblock peer`, and every
//! CLI command that reads a relay (`export`, `improve --relay`,
//! `quantize --relay`, `verify-quant`, `relay backup --relay`).
//!
//! Sans-IO like [`crate::node`]: no socket, no clock, no task. Each part
//! says what to fetch next and takes the answer; the driver (ureq, tokio,
//! the browser's `fetch`) moves the bytes, so one policy runs in wasm,
//! natively and in tests that script the answers.
//!
//! - [`listing`]: the chain, paged, with its stop rule and bounds
//!   ([`Pager`]);
//! - [`sync`]: both chains listed, the chain-A payloads fetched, every
//!   header verified ([`ChainSync`] → [`Synced`]), the model and its heads
//!   picked ([`Synced::model`]);
//! - [`source`]: where a payload comes from (memory, cache, peers, REST),
//!   retries and failover, every answer verified ([`PayloadFetch`]);
//! - [`backoff`]: reconnecting ([`Backoff`], [`Reconnect`],
//!   [`relay_error_action`]);
//! - [`usage`]: usage self-reports, batched and signed ([`UsageBatch`]).

pub mod backoff;
pub mod listing;
pub mod source;
pub mod sync;
pub mod usage;

pub use backoff::{relay_error_action, Backoff, ErrorAction, Reconnect};
pub use listing::{chain_letter, link_has_next, ListError, PageRequest, Pager};
pub use source::{Answer, Next, Origin, PayloadFetch, SourceError, SourcePolicy};
pub use sync::{ChainSync, Model, ModelPick, Step, SyncError, Synced};
pub use usage::UsageBatch;
