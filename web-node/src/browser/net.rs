//! The page's peer node: [`crate::node::PeerNode`] driven over a browser
//! WebSocket to the relay's `/ws`. The state machine does all the protocol
//! work (login, credits, chunk checks, serving); this file only moves bytes
//! between the socket and the machine, keeps the key, and wakes waiters.

use crate::chain::BlockHash;
use crate::node::NodeStats;

/// The connection as the page shows it.
#[derive(Debug, Clone, PartialEq)]
pub enum NetState {
    /// Opening the socket or logging in.
    Connecting,
    /// Logged in: fetches go to peers through the relay.
    Online,
    /// The socket closed or could not open; the node retries after
    /// `retry_in_ms` and meanwhile fetches over REST.
    Offline { reason: String, retry_in_ms: u64 },
    /// The relay refused this node for good (a ban, a refused login): REST only.
    Refused(String),
}

/// What the network panel shows.
#[derive(Debug, Clone)]
pub struct NetView {
    pub state: NetState,
    /// `ws://host/ws` of the relay.
    pub relay_url: String,
    /// This browser's node key (public, hex).
    pub peer_id: String,
    /// Chunk bytes received per source, served, bad chunks, ...
    pub stats: NodeStats,
    /// Payloads this node holds and serves.
    pub held: usize,
    /// Fetches in progress: (block, chunks verified, chunks in all).
    pub fetching: Vec<(BlockHash, u64, u64)>,
    /// The last error the relay sent, if any.
    pub last_error: Option<String>,
}
