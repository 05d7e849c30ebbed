//! Chunk dispatch, the sans-IO core of the peer layer: the registry of logged-in peers, chunk
//! dispatch with the relay's own hash check, bans, and the bookkeeping of
//! remote computations. Events in (a login, a frame, a store read that
//! finished, the clock), [`Action`]s out (send this to that connection,
//! close that one, read this chunk from the store, this computation is
//! done, count this [`UsageEvent`]). No sockets, no tasks, no clock and no
//! counters of its own: every entry point that needs the time takes `now`,
//! and what is counted comes back as [`Action::Usage`]. The tokio actors in
//! `super::ws` and [`super::Peers`] drive it (they read the clock and apply
//! the actions); tests drive it directly.
//!
//! Chunk dispatch: a `GetChunk` is sent to a holder chosen by load, measured
//! latency and what it already has outstanding (parallel requests spread
//! over holders), never to the requester or a banned peer, within serve
//! credits. The answer is checked against the block's chunk list; a bad one
//! scores the holder down and, after [`ChunkConfig::bad_chunks_to_ban`],
//! bans it with a doubling backoff. A bad, missing or late answer sends the
//! request to the next holder, after [`ChunkConfig::max_holder_tries`] or
//! when none is left to the relay's store.
//!
//! Several relays on one database ([`Core::enable_cluster`]): what this
//! relay's peers hold is reported as [`Action::Presence`] (written to
//! `peer_presence` by [`crate::cluster::presence`]). When no local holder of
//! a block is free, the core asks which other relays' peers hold it
//! ([`Action::Lookup`], answered by [`Core::remote_holders`], kept for
//! [`ChunkConfig::remote_ttl`]) and forwards the request over a *link*: an
//! outbound `/ws` connection to that relay ([`Action::OpenLink`],
//! [`Core::link_up`]), logged in with this relay's key like any peer. A link
//! is a holder like a peer (credits, latency, score, bans), except that
//! its `ServeChunk` goes out as an ordinary `GetChunk` and its `ChunkData`
//! comes back through [`Core::link_chunk`], checked against the chunk list
//! like any chunk. Order: local peers, then links, then the store. Another
//! relay logged in here ([`ConnKind::Relay`]) is no peer: no presence, no
//! credit, not listed; its requests go to local peers only (never to a link,
//! so nothing loops, and never to the store, which it shares).
//!
//! Files: this one holds the core's state and what it answers without
//! changing; `actions` what goes in and out; `registry` logins, `Have`
//! and the registry of holders; `requests` chunk requests and answers
//! (one sequence for an answer of a peer or of a link:
//! `Core::holder_answered`), parking, timeouts; `reputation` scores,
//! latency and bans; `links` other relays; `compute` remote computations.
//!
//! Layer: feature runtime, a part of [`crate::peers`], sans-IO.
//! May import: nothing of the crate outside `peers::chunks` (its tests also
//! use `peers` and `peers::stats`).

mod actions;
mod compute;
mod direct;
mod links;
mod registry;
mod reputation;
mod requests;
#[cfg(test)]
mod tests;

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use web_node::chain::BlockHash;
use web_node::net::peer::PeerId;

pub use actions::{
    Action, ChunkConfig, ChunkInfo, ComputeOutcome, ConnId, ConnKind, LinkView, PeerView,
    PresenceChange, Refused, RemoteRelay, UsageEvent,
};
pub use direct::{NO_DIRECT_HOLDER, RECEIPT_BYTES_PER_PERIOD, TOO_MANY_SESSIONS};
pub use links::link_id;

/// Latency assumed for a holder never measured.
pub const DEFAULT_LATENCY_MS: f64 = 50.0;
/// Weight of a new latency sample in the moving average.
pub const LATENCY_EWMA_ALPHA: f64 = 0.2;
/// What a full load (1000 permille) adds to a holder's cost, in milliseconds
/// of latency: a busy peer is picked only when it is much faster.
pub const LOAD_WEIGHT_MS: f64 = 200.0;
/// What each point of negative score adds to a holder's cost (ms).
pub const SCORE_WEIGHT_MS: f64 = 20.0;
/// Score lost for a bad chunk, a timeout, a failed computation.
pub const SCORE_PENALTY: i64 = 10;
/// Reputation records (bad chunks, bans, compute backoff) kept at most;
/// past it the oldest record without an active ban goes.
pub const REPUTATION_CAPACITY: usize = 65_536;
/// The longest ban (the doubling stops here).
pub const MAX_BAN: Duration = Duration::from_secs(24 * 3600);
/// The longest compute backoff.
pub const MAX_COMPUTE_BACKOFF: Duration = Duration::from_secs(3600);
/// How long the answer of a presence lookup is used before the database is
/// asked again (a peer that just announced a block on another relay is
/// found at most this late).
pub const REMOTE_TTL: Duration = Duration::from_secs(5);
/// Blocks whose lookup answer is kept at most; past it expired answers go,
/// then all.
pub const REMOTE_CAPACITY: usize = 65_536;
/// Links (outbound connections to other relays) at most, open or not.
pub const MAX_LINKS: usize = 64;
/// First wait before a failed or lost link is opened again; doubles per
/// failure in a row up to [`LINK_BACKOFF_MAX`].
pub const LINK_BACKOFF_BASE: Duration = Duration::from_secs(1);
pub const LINK_BACKOFF_MAX: Duration = Duration::from_secs(60);
/// A link still connecting after this long counts as failed (its actor
/// gives up well before: connect and login time out).
pub const LINK_CONNECT_LIMIT: Duration = Duration::from_secs(30);

#[derive(Debug)]
struct PeerEntry {
    kind: ConnKind,
    conn: ConnId,
    agent: String,
    addr: SocketAddr,
    /// Logged in then.
    since: Instant,
    last_seen: Instant,
    load: u16,
    serve_compute: bool,
    have: HashSet<BlockHash>,
    latency_ms: Option<f64>,
    score: i64,
    /// Its own `GetChunk`s not answered yet.
    gets: u32,
    /// `ServeChunk`s sent to it not answered yet.
    serving: u32,
    /// `Compute`s sent to it not answered yet.
    computing: u32,
}

/// Survives reconnects: a liar cannot reset its count by logging in again.
#[derive(Debug, Clone, Default)]
struct Reputation {
    bad_chunks: u32,
    bans: u32,
    banned_until: Option<Instant>,
    compute_fails: u32,
    compute_backoff_until: Option<Instant>,
    touched: Option<Instant>,
}

#[derive(Debug)]
struct ChunkJob {
    requester: ConnId,
    req: u64,
    info: Arc<ChunkInfo>,
    index: u32,
    tried: Vec<PeerId>,
    /// The holder asked now: (peer, conn, sent at, deadline); None while the
    /// store reads it or while it waits for a holder's credit.
    at: Option<(PeerId, ConnId, Instant, Instant)>,
    /// Waiting for a holder's serve credit until then (then the store).
    parked: Option<Instant>,
    /// Asked by another relay: local peers only, no store.
    from_relay: bool,
}

/// The link to one other relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LinkState {
    /// Not open; may be opened from then on.
    Down {
        until: Instant,
    },
    Connecting {
        since: Instant,
    },
    Up {
        conn: ConnId,
    },
}

#[derive(Debug)]
struct LinkEntry {
    relay: RemoteRelay,
    state: LinkState,
    /// Failures in a row (the backoff doubles with each).
    fails: u32,
}

/// A lookup's answer: the links to relays whose peers hold a block.
#[derive(Debug)]
struct Remote {
    links: Vec<PeerId>,
    until: Instant,
}

#[derive(Debug)]
struct ComputeJob {
    peer: PeerId,
    block: BlockHash,
    conn: ConnId,
    sent: Instant,
    expected: usize,
}

/// The registry and chunk dispatcher. See the module docs.
#[derive(Debug)]
pub struct Core {
    cfg: ChunkConfig,
    peers: HashMap<PeerId, PeerEntry>,
    conns: HashMap<ConnId, PeerId>,
    holders: HashMap<BlockHash, HashSet<PeerId>>,
    reputation: HashMap<PeerId, Reputation>,
    jobs: HashMap<u64, ChunkJob>,
    deadlines: BTreeSet<(Instant, u64)>,
    /// Jobs waiting for a serve credit of one of their block's holders, per
    /// block, oldest first (bounded by the requesters' chunk credits).
    parked: HashMap<BlockHash, VecDeque<u64>>,
    computes: HashMap<u64, ComputeJob>,
    next_req: u64,
    /// Presence and links on (a relay on a shared database).
    cluster: bool,
    /// Other live relays exist (no lookups otherwise).
    others: bool,
    remote: HashMap<BlockHash, Remote>,
    /// Lookups asked and not answered yet (since when).
    lookups: HashMap<BlockHash, Instant>,
    links: HashMap<PeerId, LinkEntry>,
    /// Introductions, signalling sessions, receipts' credit ([`direct`]).
    direct: direct::DirectState,
}

/// `ChunkFailed` reason for a request of another relay that no local
/// peer can serve.
pub const NO_LOCAL_HOLDER: &str = "no peer of this relay holds the block";
/// `ChunkFailed` reason for a requester over its credits.
pub const CREDITS: &str = "credits";

fn hexid(id: &PeerId) -> String {
    hex::encode(&id[..8])
}

impl Core {
    pub fn new(cfg: ChunkConfig) -> Self {
        Self {
            cfg,
            peers: HashMap::new(),
            conns: HashMap::new(),
            holders: HashMap::new(),
            reputation: HashMap::new(),
            jobs: HashMap::new(),
            deadlines: BTreeSet::new(),
            parked: HashMap::new(),
            computes: HashMap::new(),
            next_req: 1,
            cluster: false,
            others: false,
            remote: HashMap::new(),
            lookups: HashMap::new(),
            links: HashMap::new(),
            direct: Default::default(),
        }
    }

    /// Report presence ([`Action::Presence`]) and forward over links to other
    /// relays from now on.
    pub fn enable_cluster(&mut self) {
        self.cluster = true;
    }

    pub fn config(&self) -> &ChunkConfig {
        &self.cfg
    }

    pub(super) fn req_id(&mut self) -> u64 {
        let r = self.next_req;
        self.next_req = self.next_req.wrapping_add(1).max(1);
        r
    }

    /// The peer logged in on `conn`.
    pub fn peer_of(&self, conn: ConnId) -> Option<PeerId> {
        self.conns.get(&conn).copied()
    }

    /// The connection `id` is logged in on.
    pub fn conn_of(&self, id: &PeerId) -> Option<ConnId> {
        self.peers.get(id).map(|p| p.conn)
    }

    /// Logged-in peers (not relays, not links).
    pub fn online(&self) -> usize {
        self.peers
            .values()
            .filter(|p| p.kind == ConnKind::Peer)
            .count()
    }

    /// What is logged in on `conn`.
    pub fn kind_of(&self, conn: ConnId) -> Option<ConnKind> {
        let id = self.conns.get(&conn)?;
        self.peers
            .get(id)
            .filter(|p| p.conn == conn)
            .map(|p| p.kind)
    }

    /// Does a logged-in peer announce `block`?
    pub fn holders_of(&self, block: &BlockHash) -> Vec<PeerId> {
        self.holders
            .get(block)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    }

    /// What this relay's peers hold (for a full rewrite of its presence).
    pub fn presence_snapshot(&self) -> Vec<(PeerId, Vec<BlockHash>)> {
        self.peers
            .iter()
            .filter(|(_, p)| p.kind == ConnKind::Peer && !p.have.is_empty())
            .map(|(id, p)| (*id, p.have.iter().copied().collect()))
            .collect()
    }

    /// Logged-in peers for `GET /p2p/nodes`.
    pub fn views(&self, now: Instant) -> Vec<PeerView> {
        let mut v: Vec<PeerView> = self
            .peers
            .iter()
            .filter(|(_, p)| p.kind == ConnKind::Peer)
            .map(|(id, p)| {
                let mut have: Vec<BlockHash> = p.have.iter().copied().collect();
                have.sort();
                PeerView {
                    id: *id,
                    agent: p.agent.clone(),
                    addr: p.addr,
                    connected_for: now.saturating_duration_since(p.since),
                    last_seen_ago: now.saturating_duration_since(p.last_seen),
                    load: p.load,
                    serve_compute: p.serve_compute,
                    have,
                    latency_ms: p.latency_ms,
                    score: p.score,
                    outstanding: p.gets + p.serving + p.computing,
                }
            })
            .collect();
        v.sort_by_key(|p| p.id);
        v
    }

    /// Chunk jobs in flight (bounded by peers × credits).
    pub fn jobs_in_flight(&self) -> usize {
        self.jobs.len()
    }
}
