//! AI-Block relay: stores the chain, serves the REST API and the web app.
//!
//! # Layers
//!
//! Each file imports only files of a lower layer (or, within its layer,
//! without a cycle); nothing imports `server` but `main`. The core state
//! ([`state`]: [`CoreState`], [`SharedCore`]) and the HTTP error type
//! ([`http`]) import no feature; every feature sits above them. A feature
//! is split into two top-level modules: its runtime ([`peers`], [`chat`])
//! and its handlers ([`peer_api`], [`chat_api`]); the handlers extract the
//! core and their own runtime ([`peer_api::PeerState`], the
//! [`chat_api::ChatHost`] port), never [`server`]. The composite
//! [`AppState`] (core + `peers` + `chat`) is assembled in `server`.
//! `scripts/relay_layers.py` checks both (its `LAYERS` table is this
//! picture); each module's doc says what it may import.
//!
//! ```text
//!  main (bin)            relay serve / backup / restore: flags, build, run
//!  ───────────────────────────────────────────────────────────────────────
//!  server                AppState (core + peers + chat), SharedState,
//!                        app(): the router from each feature's routes()
//!                        with its state; open_relay, conn, static files
//!  ───────────────────────────────────────────────────────────────────────
//!  handlers              server::{routes_read, upload, health}
//!                        peer_api (/ws, /p2p/*)   chat_api (/chat, remote)
//!                        rewards                  cluster::{presence, link, follow}
//!  ───────────────────────────────────────────────────────────────────────
//!  feature runtimes      peers (Peers, chunks core, stats, nodes,
//!                        cluster: the Cluster handle + ClusterIo port)
//!                        chat (runtime, model)
//!  ───────────────────────────────────────────────────────────────────────
//!  state                 CoreState, SharedCore, BlockListener, accept_block
//!  ───────────────────────────────────────────────────────────────────────
//!  chain_index           ChainState (the DAG index, order, signatures)
//!  ───────────────────────────────────────────────────────────────────────
//!  foundation            store, usage, http (HttpError, store_err), quality,
//!                        backup
//!                        limits, auth, gate, compute (chat → peers port),
//!                        genesis, metrics, pg
//! ```
//!
//! Top-level imports of the features (`server` imports every handler and
//! runtime, and builds [`AppState`]):
//!
//! ```text
//!  peer_api ──► state ◄── chat_api           rewards ──► peer_api, state
//!     │                     │  │             cluster ──► state, peers
//!     ▼                     ▼  └──► compute (the ExpertCompute port)
//!     peers                 chat       ▲
//!       └──────────────────────────────┘ (peers implements it)
//! ```
//!
//! This file declares every module and re-exports the main types.
//! May import: every module.
//!
//! Three ports cut what would be circles: [`compute::ExpertCompute`] (what
//! chat needs of peers), [`peers::ClusterIo`] (what peers needs of the
//! cluster; `cluster` implements it) and [`state::BlockListener`] (what the
//! core tells of stored blocks; `server` wires the peers to it). Everything
//! is built in order and passed to its constructor ([`AppState::new`]): the
//! store and usage, the chain lock, then [`peers::Peers::new`] with all
//! three, then the core with the peers as its listener. There is no late
//! step: on a shared database the listener is bound first (`relay serve`,
//! the test relays), then the cluster handle is built with the advertised
//! `/ws` URL ([`cluster::presence::configure`]) and given to
//! [`peers::Peers::new`] ([`AppState::with_cluster`]) before the state is
//! shared and the cluster's tasks start ([`cluster::start`]).
//!
//! # Modules
//!
//! * [`store::FileStore`]: the embedded [`BlockStore`](web_node::store::BlockStore):
//!   content-addressed block files (`data/blocks/ab/<hash>`, envelope then
//!   payload, written temp + fsync + rename + fsync dir) and a redb index
//!   (order, headers, heads). Crash-safe; repaired on open.
//! * [`server`]: `fn app(state) -> Router` with the REST API and static files,
//!   [`serve`] (the accept loop with connection limits and timeouts), the
//!   upload pipeline.
//! * [`state`], [`chain_index`], [`http`], [`limits`] (the server's and the
//!   cluster's limits), [`auth`] (write rules).
//! * [`gate`]: the acceptance hook every new version of an existing slot passes.
//! * [`quality`]: the quality gate (recomputed public-eval loss, rate limit per miner key).
//! * [`peers`]: the runtime of `/ws` peers (login, registry, chunk dispatch,
//!   remote expert computation) and of `/p2p/*`; [`peer_api`]: their
//!   handlers. [`compute`] is what chat needs of peers.
//! * [`chat`]: the runtime of `/chat` and `/chat/distributed` (limits, slots,
//!   model cache); [`chat_api`]: their handlers.
//! * [`cluster`]: several relays on one PostgreSQL database.
//! * [`rewards`]: usage reports and reward claims.
//! * [`genesis`]: the operator key and the genesis blocks of the default model.

pub mod auth;
pub mod backup;
pub mod chain_index;
pub mod chat;
pub mod chat_api;
pub mod cluster;
pub mod compute;
pub mod gate;
pub mod genesis;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod peer_api;
pub mod peers;
pub mod pg;
pub mod quality;
pub mod rewards;
pub mod server;
pub mod state;
pub mod store;
pub mod usage;

pub use gate::{AcceptAll, Gate, GateContext, PayloadRef, Rejection, Verdict};
pub use limits::{RelayOptions, ServeOptions};
pub use server::{app, open_relay, open_relay_with_blobs, serve};
pub use server::{AppState, SharedState};
pub use state::{accept_block, ChainState, CoreState, SharedCore};
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
