//! The peer feature's routes: `GET /ws` ([`super::ws`]) and `/p2p/*`
//! ([`super::p2p`]).
//!
//! Layer: handlers (above [`crate::state`]); `crate::server::app` merges
//! [`routes`]. Not re-exported by `peers` itself, so the peer core never
//! depends on its handlers.

use axum::routing::{delete, get, post};
use axum::Router;

use super::{p2p, ws};
use crate::state::SharedState;

/// `/ws` and `/p2p/*`.
pub fn routes() -> Router<SharedState> {
    Router::new()
        .route("/ws", get(ws::upgrade))
        .route("/p2p/register", post(p2p::register))
        .route("/p2p/nodes", get(p2p::list))
        .route("/p2p/nodes/{id}", delete(p2p::remove))
        .route("/p2p/stats", get(p2p::stats))
}
