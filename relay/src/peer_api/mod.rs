//! The peer feature's handlers: `GET /ws` (`ws`: the upgrade and one actor
//! per connection, which decodes frames, calls the core of
//! [`crate::peers`] and executes its actions) and the seed's `/p2p/*`
//! endpoints with `GET /p2p/stats` ([`p2p`]); [`routes`] is what
//! `crate::server::app` merges. The feature's runtime ([`crate::peers::Peers`],
//! the chunk-dispatch core, the counters, the node registry) is
//! [`crate::peers`]; nothing there imports this module. The handlers run
//! on a [`PeerState`]: the core state and the peers' runtime.
//!
//! Layer: handlers, above [`crate::state`] and [`crate::peers`].
//! May import: `state`, `peers`, `http` (and the foundation).

pub mod p2p;
mod ws;

use std::sync::Arc;

use axum::routing::{delete, get, post};
use axum::Router;

use crate::peers::Peers;
use crate::state::{CoreState, SharedCore};

/// What the peer handlers run on: the core state (through `Deref`) and the
/// peers' runtime.
#[derive(Clone)]
pub struct PeerState {
    pub core: SharedCore,
    pub peers: Arc<Peers>,
}

impl std::ops::Deref for PeerState {
    type Target = CoreState;
    fn deref(&self) -> &CoreState {
        &self.core
    }
}

/// `/ws` and `/p2p/*`.
pub fn routes() -> Router<PeerState> {
    Router::new()
        .route("/ws", get(ws::upgrade))
        .route("/p2p/register", post(p2p::register))
        .route("/p2p/nodes", get(p2p::list))
        .route("/p2p/nodes/{id}", delete(p2p::remove))
        .route("/p2p/stats", get(p2p::stats))
}
