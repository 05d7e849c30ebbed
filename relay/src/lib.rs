//! AI-Block relay: stores the chain, serves the REST API and the web app.
//!
//! * [`store::FileStore`]: the embedded [`BlockStore`](web_node::store::BlockStore):
//!   content-addressed block files (`data/blocks/ab/<hash>`, envelope then
//!   payload, written temp + fsync + rename + fsync dir) and a redb index
//!   (order, headers, heads). Crash-safe; repaired on open.
//! * [`server`]: `fn app(state) -> Router` with the REST API and static files,
//!   [`serve`] (the accept loop with connection limits and timeouts), the
//!   upload pipeline, write rules and limits.
//! * [`gate`]: the acceptance hook every new version of an existing slot passes.
//! * [`quality`]: the quality gate (recomputed public-eval loss, rate limit per miner key).
//! * [`peers`]: `/ws` peers (login, registry, chunk routing, remote expert
//!   computation) and `/p2p/*`; [`compute`] is what chat needs of it.
//! * [`chat`]: `/chat` and `/chat/distributed`.
//! * [`genesis`]: the operator key and the genesis blocks of the default model.

pub mod backup;
pub mod chat;
pub mod cluster;
pub mod compute;
pub mod gate;
pub mod genesis;
pub mod metrics;
pub mod peers;
pub mod pg;
pub mod quality;
pub mod rewards;
pub mod server;
pub mod store;
pub mod usage;

pub use gate::{AcceptAll, Gate, GateContext, PayloadRef, Rejection, Verdict};
pub use server::{
    accept_block, app, open_relay, open_relay_with_blobs, serve, AppState, ChainState,
    RelayOptions, ServeOptions, SharedState,
};
pub use store::FileStore;

/// Errors of the relay library.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Store(#[from] web_node::store::StoreError),
    #[error("genesis: {0}")]
    Genesis(String),
    #[error("usage database: {0}")]
    Usage(String),
    #[error("operator key: {0}")]
    Key(String),
    #[error(transparent)]
    Pg(#[from] pg::PgError),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}
