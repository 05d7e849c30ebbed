//! What goes in and out of the core: its settings, the chunk lists it
//! checks against, the [`Action`]s it returns (with the [`UsageEvent`]s the
//! driver counts) and the views it gives of itself.

use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use web_node::chain::BlockHash;
use web_node::net::peer::{limits, FromRelay, PeerId};

#[cfg(doc)]
use super::{Core, MAX_BAN};
use super::{LINK_BACKOFF_BASE, MAX_LINKS, REMOTE_TTL};

/// A WebSocket connection (a key may log in again on a new one).
pub type ConnId = u64;

/// What is logged in on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnKind {
    /// A peer (browser, native node): holds, serves, requests, earns.
    Peer,
    /// Another relay of the same database, logged in with its relay key:
    /// it requests chunks for its own peers and is nothing else here.
    Relay,
    /// This relay's own link to another relay (an outbound connection): a
    /// holder of what the database says that relay's peers hold.
    Link,
}

/// Another live relay on the database (a row of `relays`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteRelay {
    pub id: String,
    /// Its relay key (it logs in to other relays with it).
    pub key: PeerId,
    /// Where its `/ws` is reached.
    pub ws_url: String,
}

/// A change of what this relay's peers hold (rows of `peer_presence`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PresenceChange {
    Add {
        peer: PeerId,
        blocks: Vec<BlockHash>,
    },
    Remove {
        peer: PeerId,
        blocks: Vec<BlockHash>,
    },
    /// The peer left (logout, drop, ban): none of its rows stay.
    Gone { peer: PeerId },
}

/// The chunk list of a block the relay holds (header and payload).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkInfo {
    pub block: BlockHash,
    pub chunks: Arc<[BlockHash]>,
    pub chunk_size: u32,
    pub payload_len: u64,
}

impl ChunkInfo {
    /// Byte range of chunk `index` in the payload.
    pub fn range(&self, index: u32) -> Option<Range<u64>> {
        if (index as usize) >= self.chunks.len() {
            return None;
        }
        let cs = u64::from(self.chunk_size);
        let start = u64::from(index) * cs;
        Some(start..(start + cs).min(self.payload_len))
    }

    /// Do these bytes match chunk `index`?
    pub fn check(&self, index: u32, data: &[u8]) -> bool {
        match (self.range(index), self.chunks.get(index as usize)) {
            (Some(r), Some(h)) => data.len() as u64 == r.end - r.start && BlockHash::of(data) == *h,
            _ => false,
        }
    }
}

/// Settings of the chunk-dispatch core (from [`crate::peers::PeerOptions`]).
#[derive(Debug, Clone)]
pub struct ChunkConfig {
    pub chunk_credits: u32,
    pub serve_credits: u32,
    pub compute_credits: u32,
    pub chunk_timeout: Duration,
    /// Holders asked for one chunk before the store answers.
    pub max_holder_tries: usize,
    /// Bad chunks that get a peer banned.
    pub bad_chunks_to_ban: u32,
    /// The first ban; each further ban doubles it (up to [`MAX_BAN`]).
    pub ban_base: Duration,
    /// The first compute backoff after a failure; doubles per failure in a row.
    pub compute_backoff_base: Duration,
    /// A peer silent this long is dropped by [`Core::handle_timeout`] (its
    /// actor normally drops it first).
    pub idle_timeout: Duration,
    /// See [`REMOTE_TTL`], [`MAX_LINKS`], [`LINK_BACKOFF_BASE`].
    pub remote_ttl: Duration,
    pub max_links: usize,
    pub link_backoff_base: Duration,
}

impl Default for ChunkConfig {
    fn default() -> Self {
        Self {
            chunk_credits: limits::CHUNK_CREDITS,
            serve_credits: limits::SERVE_CREDITS,
            compute_credits: limits::COMPUTE_CREDITS,
            chunk_timeout: limits::CHUNK_TIMEOUT,
            max_holder_tries: 3,
            bad_chunks_to_ban: 2,
            ban_base: Duration::from_secs(60),
            compute_backoff_base: Duration::from_secs(5),
            idle_timeout: limits::IDLE_TIMEOUT,
            remote_ttl: REMOTE_TTL,
            max_links: MAX_LINKS,
            link_backoff_base: LINK_BACKOFF_BASE,
        }
    }
}

/// What the driver must do.
#[derive(Debug, PartialEq)]
pub enum Action {
    /// Queue a message on a connection (a full queue drops the peer).
    Send { conn: ConnId, msg: FromRelay },
    /// Send `Error{code, message}` and close the connection.
    Close {
        conn: ConnId,
        code: &'static str,
        message: String,
    },
    /// Read chunk `index` of `info.block` from the relay's store and call
    /// [`Core::store_read`] with `job`.
    ReadStore {
        job: u64,
        info: Arc<ChunkInfo>,
        index: u32,
    },
    /// A remote computation ended.
    ComputeDone { req: u64, outcome: ComputeOutcome },
    /// Record what this relay's peers hold (cluster mode only).
    Presence(PresenceChange),
    /// Ask the database which other relays' peers hold `block`; answer
    /// with [`Core::remote_holders`].
    Lookup { block: BlockHash },
    /// Open the link `link` to `relay`; then [`Core::link_up`] or
    /// [`Core::link_down`].
    OpenLink { link: PeerId, relay: RemoteRelay },
    /// Count this (counters, metrics, the usage store for rewards). The
    /// core pushes it before the message it goes with, and the driver
    /// counts it while it still holds the core, so the counters read the
    /// same as when the core bumped them itself.
    Usage(UsageEvent),
}

/// Something the core saw that is counted: by
/// [`Counters::record`](crate::peers::Counters::record)
/// into the counters of `GET /p2p/stats` and the metrics, and, for work the
/// relay verified (a chunk served, a bad chunk, a fetch, a computation),
/// into the usage store for rewards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UsageEvent {
    /// A login of a peer or of another relay.
    Login {
        kind: ConnKind,
    },
    /// A connection was closed for a second login with the same key.
    Replaced,
    /// A peer, relay or link left the registry.
    Logout {
        kind: ConnKind,
    },
    /// A request was answered `ChunkFailed`.
    ChunkFailed,
    /// Peer `peer` served `bytes` of `block`, checked and forwarded.
    ChunkServed {
        peer: PeerId,
        block: BlockHash,
        bytes: u64,
    },
    /// Another relay forwarded `bytes` over a link, checked here.
    ChunkFromLink {
        bytes: u64,
    },
    /// The relay's store answered `bytes`.
    ChunkFromStore {
        bytes: u64,
    },
    /// A chunk of `bytes` went to another relay's request.
    ChunkToRelay {
        bytes: u64,
    },
    /// Peer `peer` received a checked chunk of `block` (`bytes` long)
    /// from the relay (its store, a peer or a link).
    Fetch {
        peer: PeerId,
        block: BlockHash,
        bytes: u64,
    },
    /// A receipt of `receiver` credited `server` with `bytes` of `block`
    /// it served directly (capped; see the core's `receipt`).
    DirectServed {
        server: PeerId,
        receiver: PeerId,
        block: BlockHash,
        bytes: u64,
    },
    /// `holder` (a peer, or a link when `link`) answered bytes that do not
    /// match the chunk list of `block`.
    BadChunk {
        holder: PeerId,
        block: BlockHash,
        link: bool,
    },
    /// A holder did not answer in time; `peer` is it when it is a peer.
    ChunkTimeout {
        peer: Option<PeerId>,
    },
    /// A holder was banned.
    Ban,
    /// A presence lookup was asked of the database.
    Lookup,
    /// A link was opened (an attempt), came up, failed or was lost.
    LinkOpened,
    LinkUp,
    LinkFailure,
    /// A computation was sent to `peer`.
    ComputeSent {
        peer: PeerId,
    },
    /// `peer` answered a computation for `block` with a valid output.
    ComputeAnswered {
        peer: PeerId,
        block: BlockHash,
    },
    /// A computation at `peer` failed (refused, invalid, disconnected) or
    /// timed out.
    ComputeFailed {
        peer: PeerId,
        timed_out: bool,
    },
}

/// How a remote computation ended.
#[derive(Debug, Clone, PartialEq)]
pub enum ComputeOutcome {
    Answered { peer: PeerId, output: Vec<f32> },
    Failed { peer: PeerId, reason: String },
}

/// A link to another relay as `GET /p2p/stats` lists it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LinkView {
    /// The relay's id in the database.
    pub relay: String,
    pub ws_url: String,
    /// `up`, `connecting` or `down`.
    pub state: String,
    /// Failures in a row.
    pub fails: u32,
    /// When down: until it may be opened again.
    pub retry_in_ms: u64,
    /// Requests outstanding on it.
    pub in_flight: u32,
    pub latency_ms: Option<f64>,
    pub banned: bool,
}

/// A logged-in peer as listed by `GET /p2p/nodes`.
#[derive(Debug, Clone)]
pub struct PeerView {
    pub id: PeerId,
    pub agent: String,
    pub addr: SocketAddr,
    /// Since its login (the core keeps no wall clock).
    pub connected_for: Duration,
    pub last_seen_ago: Duration,
    pub load: u16,
    pub serve_compute: bool,
    pub have: Vec<BlockHash>,
    pub latency_ms: Option<f64>,
    pub score: i64,
    pub outstanding: u32,
}

/// Why a login was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub code: &'static str,
    pub message: String,
}
