//! The relay as coordinator: `/ws` peers (login, registry, chunk routing,
//! remote expert computation) and the seed's `/p2p/*` endpoints.

use axum::Router;

use crate::server::SharedState;

/// Options of the peer layer.
#[derive(Debug, Clone)]
pub struct PeerOptions {
    /// WebSocket connections from one IP address.
    pub max_conns_per_ip: usize,
    /// WebSocket connections in total.
    pub max_conns: usize,
}

impl Default for PeerOptions {
    fn default() -> Self {
        Self {
            max_conns_per_ip: web_node::net::peer::limits::CONNS_PER_IP,
            max_conns: web_node::net::peer::limits::MAX_CONNS,
        }
    }
}

/// The peer registry and everything routed through it.
#[derive(Debug, Default)]
pub struct Peers {
    pub opts: PeerOptions,
}

impl Peers {
    pub fn new(opts: PeerOptions) -> Self {
        Self { opts }
    }
}

/// `/ws` and `/p2p/*`.
pub fn routes() -> Router<SharedState> {
    Router::new()
}
