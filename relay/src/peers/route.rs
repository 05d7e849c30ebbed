//! The sans-IO core of the peer layer: the registry of logged-in peers, chunk
//! routing with the relay's own hash check, bans, and the bookkeeping of
//! remote computations. Events in (a login, a frame, a store read that
//! finished, the clock), [`Action`]s out (send this to that connection,
//! close that one, read this chunk from the store, this computation is
//! done). No sockets, no tasks, no clock of its own: the tokio actors in
//! [`super::ws`] drive it and tests drive it directly.
//!
//! Chunk routing: a `GetChunk` is sent to a holder chosen by load, measured
//! latency and what it already has outstanding (parallel requests spread
//! over holders), never to the requester or a banned peer, within serve
//! credits. The answer is checked against the block's chunk list; a bad one
//! scores the holder down and, after [`RouteConfig::bad_chunks_to_ban`],
//! bans it with a doubling backoff. A bad, missing or late answer sends the
//! request to the next holder, after [`RouteConfig::max_holder_tries`] or
//! when none is left to the relay's store.
//!
//! Several relays on one database ([`Core::enable_cluster`]): what this
//! relay's peers hold is reported as [`Action::Presence`] (written to
//! `peer_presence` by [`crate::cluster::presence`]). When no local holder of
//! a block is free, the core asks which other relays' peers hold it
//! ([`Action::Lookup`], answered by [`Core::remote_holders`], kept for
//! [`RouteConfig::remote_ttl`]) and routes the request over a *link*: an
//! outbound `/ws` connection to that relay ([`Action::OpenLink`],
//! [`Core::link_up`]), logged in with this relay's key like any peer. A link
//! is a holder like a peer (credits, latency, score, bans), except that
//! its `ServeChunk` goes out as an ordinary `GetChunk` and its `ChunkData`
//! comes back through [`Core::link_chunk`], checked against the chunk list
//! like any chunk. Order: local peers, then links, then the store. Another
//! relay logged in here ([`ConnKind::Relay`]) is no peer: no presence, no
//! credit, not listed; its requests go to local peers only (never to a link,
//! so nothing loops, and never to the store, which it shares).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use web_node::chain::BlockHash;
use web_node::net::peer::{codes, limits, ChunkSource, FromRelay, PeerId};

use super::stats::Counters;

/// A WebSocket connection (a key may log in again on a new one).
pub type ConnId = u64;

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
/// Domain of a link's id in the registry ([`link_id`]).
const LINK_ID_DOMAIN: &[u8] = b"aiblock/relay-link/v1";

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

/// The registry id of the link to the relay with key `key`: derived from
/// the key (so a link's reputation survives reconnects and relay restarts)
/// and never equal to a key that logs in.
pub fn link_id(key: &PeerId) -> PeerId {
    let mut m = LINK_ID_DOMAIN.to_vec();
    m.extend_from_slice(key);
    BlockHash::of(&m).0
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

/// Settings of the core (from [`super::PeerOptions`]).
#[derive(Debug, Clone)]
pub struct RouteConfig {
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

impl Default for RouteConfig {
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

/// `base` doubled `fails` times, at most [`LINK_BACKOFF_MAX`].
fn backoff(base: Duration, fails: u32) -> Duration {
    base.saturating_mul(1u32 << fails.min(20))
        .min(LINK_BACKOFF_MAX)
}

/// A logged-in peer as listed by `GET /p2p/nodes`.
#[derive(Debug, Clone)]
pub struct PeerView {
    pub id: PeerId,
    pub agent: String,
    pub addr: SocketAddr,
    pub connected_since: SystemTime,
    pub last_seen_ago: Duration,
    pub load: u16,
    pub serve_compute: bool,
    pub have: Vec<BlockHash>,
    pub latency_ms: Option<f64>,
    pub score: i64,
    pub outstanding: u32,
}

#[derive(Debug)]
struct PeerEntry {
    kind: ConnKind,
    conn: ConnId,
    agent: String,
    addr: SocketAddr,
    since: SystemTime,
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

impl PeerEntry {
    fn sample_latency(&mut self, ms: f64) {
        self.latency_ms = Some(match self.latency_ms {
            None => ms,
            Some(old) => old + LATENCY_EWMA_ALPHA * (ms - old),
        });
    }

    /// Lower is better.
    fn cost(&self, outstanding: u32) -> f64 {
        let lat = self.latency_ms.unwrap_or(DEFAULT_LATENCY_MS).max(0.1);
        let penalty = if self.score < 0 {
            (-self.score) as f64 * SCORE_WEIGHT_MS
        } else {
            0.0
        };
        lat * f64::from(1 + outstanding)
            + f64::from(self.load.min(1000)) / 1000.0 * LOAD_WEIGHT_MS
            + penalty
    }
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
    conn: ConnId,
    sent: Instant,
    expected: usize,
}

/// Why a login was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub code: &'static str,
    pub message: String,
}

/// The registry and router. See the module docs.
#[derive(Debug)]
pub struct Core {
    cfg: RouteConfig,
    counters: Arc<Counters>,
    peers: HashMap<PeerId, PeerEntry>,
    conns: HashMap<ConnId, PeerId>,
    holders: HashMap<BlockHash, HashSet<PeerId>>,
    reputation: HashMap<PeerId, Reputation>,
    jobs: HashMap<u64, ChunkJob>,
    deadlines: BTreeSet<(Instant, u64)>,
    /// Jobs waiting for a serve credit of one of their block's holders, per
    /// block, oldest first (bounded by the requesters' chunk credits).
    parked: HashMap<BlockHash, std::collections::VecDeque<u64>>,
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
    pub fn new(cfg: RouteConfig, counters: Arc<Counters>) -> Self {
        Self {
            cfg,
            counters,
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
        }
    }

    /// Report presence ([`Action::Presence`]) and route over links to other
    /// relays from now on.
    pub fn enable_cluster(&mut self) {
        self.cluster = true;
    }

    pub fn config(&self) -> &RouteConfig {
        &self.cfg
    }

    fn req_id(&mut self) -> u64 {
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

    /// Until when `id` is banned, if it is.
    pub fn banned_until(&self, id: &PeerId, now: Instant) -> Option<Instant> {
        self.reputation
            .get(id)
            .and_then(|r| r.banned_until)
            .filter(|u| *u > now)
    }

    fn rep(&mut self, id: &PeerId, now: Instant) -> &mut Reputation {
        if !self.reputation.contains_key(id) && self.reputation.len() >= REPUTATION_CAPACITY {
            // Drop the least recently touched record that holds no active ban.
            let victim = self
                .reputation
                .iter()
                .filter(|(_, r)| r.banned_until.is_none_or(|u| u <= now))
                .min_by_key(|(_, r)| r.touched)
                .map(|(k, _)| *k);
            if let Some(v) = victim {
                self.reputation.remove(&v);
            }
        }
        let r = self.reputation.entry(*id).or_default();
        r.touched = Some(now);
        r
    }

    /// A peer proved its key on `conn`. Refused while banned; a previous
    /// connection with the same key is closed (`replaced`).
    pub fn login(
        &mut self,
        now: Instant,
        conn: ConnId,
        id: PeerId,
        agent: String,
        addr: SocketAddr,
    ) -> Result<Vec<Action>, Refused> {
        self.login_as(now, conn, id, agent, addr, ConnKind::Peer)
    }

    /// [`Core::login`] of a peer or of another relay ([`ConnKind::Relay`]).
    pub fn login_as(
        &mut self,
        now: Instant,
        conn: ConnId,
        id: PeerId,
        agent: String,
        addr: SocketAddr,
        kind: ConnKind,
    ) -> Result<Vec<Action>, Refused> {
        if let Some(until) = self.banned_until(&id, now) {
            return Err(Refused {
                code: codes::BANNED,
                message: format!(
                    "peer {} is banned for serving corrupt chunks; retry in {} s",
                    hexid(&id),
                    until.saturating_duration_since(now).as_secs().max(1)
                ),
            });
        }
        let mut out = Vec::new();
        if let Some(old) = self.peers.get(&id).map(|p| p.conn) {
            if old != conn {
                Counters::inc(&self.counters.replaced);
                out.push(Action::Close {
                    conn: old,
                    code: codes::REPLACED,
                    message: "another connection logged in with this key".into(),
                });
                self.remove_conn(now, old, &mut out);
            }
        }
        self.insert_entry(now, conn, id, agent, addr, kind);
        match kind {
            ConnKind::Relay => {
                Counters::inc(&self.counters.relay_logins);
                Counters::inc(&self.counters.relays_online);
            }
            _ => {
                Counters::inc(&self.counters.logins);
                Counters::inc(&self.counters.peers_online);
                crate::metrics::ws_peer(true);
            }
        }
        Ok(out)
    }

    fn insert_entry(
        &mut self,
        now: Instant,
        conn: ConnId,
        id: PeerId,
        agent: String,
        addr: SocketAddr,
        kind: ConnKind,
    ) {
        self.peers.insert(
            id,
            PeerEntry {
                kind,
                conn,
                agent,
                addr,
                since: SystemTime::now(),
                last_seen: now,
                load: 0,
                serve_compute: false,
                have: HashSet::new(),
                latency_ms: None,
                score: 0,
                gets: 0,
                serving: 0,
                computing: 0,
            },
        );
        self.conns.insert(conn, id);
    }

    /// The connection ended (closed, dropped, replaced).
    pub fn logout(&mut self, now: Instant, conn: ConnId) -> Vec<Action> {
        let mut out = Vec::new();
        self.remove_conn(now, conn, &mut out);
        out
    }

    fn remove_conn(&mut self, now: Instant, conn: ConnId, out: &mut Vec<Action>) {
        let Some(id) = self.conns.remove(&conn) else {
            return;
        };
        if self.peers.get(&id).is_some_and(|p| p.conn == conn) {
            if let Some(p) = self.peers.remove(&id) {
                match p.kind {
                    ConnKind::Peer => {
                        Counters::dec(&self.counters.peers_online);
                        crate::metrics::ws_peer(false);
                    }
                    ConnKind::Relay => Counters::dec(&self.counters.relays_online),
                    ConnKind::Link => {
                        Counters::dec(&self.counters.links_up);
                        self.link_lost(now, &id, conn);
                    }
                }
                if self.cluster && p.kind == ConnKind::Peer && !p.have.is_empty() {
                    out.push(Action::Presence(PresenceChange::Gone { peer: id }));
                }
                for b in &p.have {
                    self.unhold(b, &id);
                    // Jobs waiting for its credits look again now.
                    if let Some(q) = self.parked.remove(b) {
                        for job in q {
                            self.dispatch(now, job, out);
                        }
                    }
                }
            }
        }
        // Chunk jobs at this holder go elsewhere now; its own requests
        // are dropped when answered (the requester is gone).
        let at_it: Vec<u64> = self
            .jobs
            .iter()
            .filter(|(_, j)| j.at.is_some_and(|a| a.1 == conn))
            .map(|(k, _)| *k)
            .collect();
        for job in at_it {
            self.retry(now, job, out);
        }
        // Computations at it fail at once.
        let comp: Vec<u64> = self
            .computes
            .iter()
            .filter(|(_, c)| c.conn == conn)
            .map(|(k, _)| *k)
            .collect();
        for req in comp {
            self.compute_fail(now, req, "the peer disconnected".into(), false, out);
        }
    }

    fn unhold(&mut self, b: &BlockHash, id: &PeerId) {
        if let Some(s) = self.holders.get_mut(b) {
            s.remove(id);
            if s.is_empty() {
                self.holders.remove(b);
            }
        }
    }

    fn touch(&mut self, now: Instant, conn: ConnId) -> Option<PeerId> {
        let id = self.conns.get(&conn).copied()?;
        let p = self.peers.get_mut(&id)?;
        (p.conn == conn).then(|| {
            p.last_seen = now;
            id
        })
    }

    /// Any frame (ping, pong, message) from `conn`.
    pub fn heartbeat(&mut self, now: Instant, conn: ConnId) {
        self.touch(now, conn);
    }

    /// `Status{load, serve_compute}`.
    pub fn status(&mut self, now: Instant, conn: ConnId, load: u16, serve_compute: bool) {
        if let Some(id) = self.touch(now, conn) {
            if let Some(p) = self.peers.get_mut(&id).filter(|p| p.kind == ConnKind::Peer) {
                p.load = load.min(1000);
                p.serve_compute = serve_compute;
            }
        }
    }

    /// `Have{add, remove}`; `known` says whether the relay holds a block
    /// (header and payload). Unknown hashes are ignored; what cannot be
    /// taken (unknown, over [`limits::MAX_HAVE`]) is reported in one
    /// non-fatal `Error{protocol}`.
    pub fn have(
        &mut self,
        now: Instant,
        conn: ConnId,
        add: &[BlockHash],
        remove: &[BlockHash],
        known: impl Fn(&BlockHash) -> bool,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        let Some(id) = self.touch(now, conn) else {
            return out;
        };
        if self
            .peers
            .get(&id)
            .is_some_and(|p| p.kind != ConnKind::Peer)
        {
            out.push(Action::Send {
                conn,
                msg: FromRelay::error(
                    codes::PROTOCOL,
                    "Have from a relay: relays hold nothing here; ignored",
                ),
            });
            return out;
        }
        if add.len() + remove.len() > limits::MAX_HAVE_PER_MSG {
            out.push(Action::Send {
                conn,
                msg: FromRelay::error(
                    codes::PROTOCOL,
                    format!(
                        "Have carries {} hashes, at most {} per message: ignored",
                        add.len() + remove.len(),
                        limits::MAX_HAVE_PER_MSG
                    ),
                ),
            });
            return out;
        }
        let (mut unknown, mut over) = (0usize, 0usize);
        let mut added = Vec::new();
        let mut removed = Vec::new();
        if let Some(p) = self.peers.get_mut(&id) {
            for b in remove {
                if p.have.remove(b) {
                    removed.push(*b);
                }
            }
            for b in add {
                if !known(b) {
                    unknown += 1;
                } else if p.have.contains(b) {
                } else if p.have.len() >= limits::MAX_HAVE {
                    over += 1;
                } else {
                    p.have.insert(*b);
                    added.push(*b);
                }
            }
        }
        for b in remove {
            self.unhold(b, &id);
        }
        for b in &added {
            self.holders.entry(*b).or_default().insert(id);
        }
        if self.cluster {
            if !removed.is_empty() {
                out.push(Action::Presence(PresenceChange::Remove {
                    peer: id,
                    blocks: removed,
                }));
            }
            if !added.is_empty() {
                out.push(Action::Presence(PresenceChange::Add {
                    peer: id,
                    blocks: added,
                }));
            }
        }
        if unknown + over > 0 {
            out.push(Action::Send {
                conn,
                msg: FromRelay::error(
                    codes::PROTOCOL,
                    format!(
                        "Have: {unknown} hashes are not blocks this relay holds and {over} are over \
                         the limit of {} blocks per peer; they were ignored",
                        limits::MAX_HAVE
                    ),
                ),
            });
        }
        out
    }

    /// Does a logged-in peer announce `block`?
    pub fn holders_of(&self, block: &BlockHash) -> Vec<PeerId> {
        self.holders
            .get(block)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    }

    fn chunk_failed(
        &mut self,
        conn: ConnId,
        req: u64,
        block: BlockHash,
        index: u32,
        reason: &str,
    ) -> Action {
        Counters::inc(&self.counters.chunks_failed);
        Action::Send {
            conn,
            msg: FromRelay::ChunkFailed {
                req,
                block,
                index,
                reason: reason.into(),
            },
        }
    }

    /// `GetChunk{req, block, index}`; `info` is the block's chunk list if the
    /// relay holds the block (header and payload), else None.
    pub fn get_chunk(
        &mut self,
        now: Instant,
        conn: ConnId,
        req: u64,
        block: BlockHash,
        index: u32,
        info: Option<Arc<ChunkInfo>>,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        let Some(id) = self.touch(now, conn) else {
            return out;
        };
        let Some(info) = info else {
            out.push(self.chunk_failed(
                conn,
                req,
                block,
                index,
                "unknown block: the relay holds no such block",
            ));
            return out;
        };
        if info.range(index).is_none() {
            let n = info.chunks.len();
            out.push(self.chunk_failed(
                conn,
                req,
                block,
                index,
                &format!("index {index} out of range: the block has {n} chunks"),
            ));
            return out;
        }
        let credits = self.cfg.chunk_credits;
        let Some(p) = self.peers.get_mut(&id) else {
            return out;
        };
        if p.gets >= credits {
            out.push(self.chunk_failed(conn, req, block, index, CREDITS));
            return out;
        }
        p.gets += 1;
        let from_relay = p.kind == ConnKind::Relay;
        let job = self.req_id();
        self.jobs.insert(
            job,
            ChunkJob {
                requester: conn,
                req,
                info,
                index,
                tried: vec![id],
                at: None,
                parked: None,
                from_relay,
            },
        );
        self.dispatch(now, job, &mut out);
        out
    }

    /// Send job to the best holder not tried yet with a serve credit free:
    /// a local peer, else (cluster mode) a link to a relay whose peers hold
    /// the block; if every such holder is busy (at its credits, a link
    /// connecting, a lookup pending), wait for one (until the chunk
    /// timeout); with no holder left, the store (or, for a request of
    /// another relay, a failure: it reads the same store itself).
    fn dispatch(&mut self, now: Instant, job: u64, out: &mut Vec<Action>) {
        let Some(j) = self.jobs.get(&job) else { return };
        let block = j.info.block;
        let tried = j.tried.clone();
        let (index, info, parked, from_relay) = (j.index, j.info.clone(), j.parked, j.from_relay);
        let holder_tries = tried.len().saturating_sub(1);
        let mut best: Option<(f64, PeerId)> = None;
        let mut busy = false;
        if holder_tries < self.cfg.max_holder_tries {
            for h in self.holders.get(&block).into_iter().flatten() {
                if tried.contains(h) || self.banned_until(h, now).is_some() {
                    continue;
                }
                let Some(p) = self.peers.get(h) else { continue };
                if p.serving >= self.cfg.serve_credits {
                    busy = true;
                    continue;
                }
                let c = p.cost(p.serving);
                if best.is_none_or(|(b, _)| c < b) {
                    best = Some((c, *h));
                }
            }
            if best.is_none() && !from_relay && self.cluster && self.others {
                let (b, waiting) = self.link_choice(now, block, &tried, out);
                best = b;
                busy |= waiting;
            }
        }
        match best.and_then(|(_, h)| self.peers.get_mut(&h).map(|p| (h, p))) {
            Some((h, p)) => {
                p.serving += 1;
                let hconn = p.conn;
                let deadline = now + self.cfg.chunk_timeout;
                if let Some(until) = parked {
                    self.deadlines.remove(&(until, job));
                }
                if let Some(j) = self.jobs.get_mut(&job) {
                    j.tried.push(h);
                    j.at = Some((h, hconn, now, deadline));
                    j.parked = None;
                }
                self.deadlines.insert((deadline, job));
                out.push(Action::Send {
                    conn: hconn,
                    msg: FromRelay::ServeChunk {
                        req: job,
                        block,
                        index,
                    },
                });
            }
            None if busy && parked.is_none_or(|u| u > now) => {
                // Peers first: wait for a credit (holder_freed) rather than
                // read the store at once.
                let until = parked.unwrap_or(now + self.cfg.chunk_timeout);
                if let Some(j) = self.jobs.get_mut(&job) {
                    j.at = None;
                    j.parked = Some(until);
                }
                if parked.is_none() {
                    self.deadlines.insert((until, job));
                }
                self.parked.entry(block).or_default().push_back(job);
            }
            None => {
                if let Some(until) = parked {
                    self.deadlines.remove(&(until, job));
                }
                if let Some(j) = self.jobs.get_mut(&job) {
                    j.at = None;
                    j.parked = None;
                }
                if from_relay {
                    self.fail_job(job, NO_LOCAL_HOLDER, out);
                } else {
                    out.push(Action::ReadStore { job, info, index });
                }
            }
        }
    }

    /// The best link for `block` not in `tried` with a credit free, and
    /// whether one is worth waiting for (a lookup pending, a link
    /// connecting or at its credits). Asks the lookup, opens links.
    fn link_choice(
        &mut self,
        now: Instant,
        block: BlockHash,
        tried: &[PeerId],
        out: &mut Vec<Action>,
    ) -> (Option<(f64, PeerId)>, bool) {
        let fresh = self
            .remote
            .get(&block)
            .filter(|r| r.until > now)
            .map(|r| r.links.clone());
        let Some(links) = fresh else {
            let pending = self
                .lookups
                .get(&block)
                .is_some_and(|t| now.saturating_duration_since(*t) < self.cfg.chunk_timeout);
            if !pending {
                self.lookups.insert(block, now);
                Counters::inc(&self.counters.presence_lookups);
                out.push(Action::Lookup { block });
            }
            return (None, true);
        };
        let mut best: Option<(f64, PeerId)> = None;
        let mut busy = false;
        for l in links {
            if tried.contains(&l) || self.banned_until(&l, now).is_some() {
                continue;
            }
            match self.links.get(&l).map(|e| e.state) {
                Some(LinkState::Up { .. }) => {
                    let Some(p) = self.peers.get(&l) else {
                        continue;
                    };
                    // The other relay gives each requester CHUNK_CREDITS.
                    if p.serving >= self.cfg.chunk_credits {
                        busy = true;
                        continue;
                    }
                    let c = p.cost(p.serving);
                    if best.is_none_or(|(b, _)| c < b) {
                        best = Some((c, l));
                    }
                }
                Some(LinkState::Connecting { since })
                    if now.saturating_duration_since(since) < LINK_CONNECT_LIMIT =>
                {
                    busy = true;
                }
                Some(LinkState::Down { until }) if until <= now => {
                    busy |= self.open_link(now, l, out);
                }
                _ => {}
            }
        }
        (best, busy)
    }

    /// Open link `l` if it is down and its backoff is over.
    fn open_link(&mut self, now: Instant, l: PeerId, out: &mut Vec<Action>) -> bool {
        if self.banned_until(&l, now).is_some() {
            return false;
        }
        let Some(e) = self.links.get_mut(&l) else {
            return false;
        };
        match e.state {
            LinkState::Down { until } if until <= now => {
                e.state = LinkState::Connecting { since: now };
                Counters::inc(&self.counters.links_opened);
                out.push(Action::OpenLink {
                    link: l,
                    relay: e.relay.clone(),
                });
                true
            }
            _ => false,
        }
    }

    /// Can `h` serve `block` (a peer that announced it, a link whose relay
    /// holds it)?
    fn can_serve(&self, h: &PeerId, block: &BlockHash) -> bool {
        match self.peers.get(h) {
            Some(p) if p.kind == ConnKind::Link => {
                self.remote.get(block).is_some_and(|r| r.links.contains(h))
            }
            Some(p) => p.have.contains(block),
            None => false,
        }
    }

    /// Every job parked on `block` looks again.
    fn wake(&mut self, now: Instant, block: &BlockHash, out: &mut Vec<Action>) {
        if let Some(q) = self.parked.remove(block) {
            for job in q {
                self.dispatch(now, job, out);
            }
        }
    }

    /// Jobs parked on blocks that link `l` may serve look again.
    fn wake_link(&mut self, now: Instant, l: &PeerId, out: &mut Vec<Action>) {
        let blocks: Vec<BlockHash> = self
            .parked
            .keys()
            .filter(|b| self.remote.get(b).is_some_and(|r| r.links.contains(l)))
            .copied()
            .collect();
        for b in blocks {
            self.wake(now, &b, out);
        }
    }

    /// A serve credit of `h` came free: the oldest job parked on a block
    /// it holds goes on.
    fn holder_freed(&mut self, now: Instant, h: PeerId, out: &mut Vec<Action>) {
        let block = self.parked.keys().find(|b| self.can_serve(&h, b)).copied();
        let Some(block) = block else { return };
        let job = self.parked.get_mut(&block).and_then(|q| q.pop_front());
        if self.parked.get(&block).is_some_and(|q| q.is_empty()) {
            self.parked.remove(&block);
        }
        if let Some(job) = job {
            self.dispatch(now, job, out);
        }
    }

    fn unpark(&mut self, job: u64, block: &BlockHash) {
        if let Some(q) = self.parked.get_mut(block) {
            q.retain(|j| *j != job);
            if q.is_empty() {
                self.parked.remove(block);
            }
        }
    }

    /// The job's holder failed (bad chunk, NoChunk, timeout, gone): free
    /// its credit and ask the next one.
    fn retry(&mut self, now: Instant, job: u64, out: &mut Vec<Action>) {
        let mut freed = None;
        if let Some(j) = self.jobs.get_mut(&job) {
            if let Some((h, hconn, _, deadline)) = j.at.take() {
                self.deadlines.remove(&(deadline, job));
                if let Some(p) = self.peers.get_mut(&h).filter(|p| p.conn == hconn) {
                    p.serving = p.serving.saturating_sub(1);
                    freed = Some(h);
                }
            }
        }
        self.dispatch(now, job, out);
        if let Some(h) = freed {
            self.holder_freed(now, h, out);
        }
    }

    /// Take a job answered by `conn` (it must be the holder asked).
    fn take_answer(&mut self, conn: ConnId, job: u64) -> Option<(PeerId, Instant)> {
        let j = self.jobs.get(&job)?;
        let (h, hconn, sent, deadline) = j.at?;
        if hconn != conn {
            return None;
        }
        self.deadlines.remove(&(deadline, job));
        if let Some(p) = self.peers.get_mut(&h).filter(|p| p.conn == conn) {
            p.serving = p.serving.saturating_sub(1);
        }
        if let Some(j) = self.jobs.get_mut(&job) {
            j.at = None;
        }
        Some((h, sent))
    }

    /// Deliver a checked chunk and close the job.
    fn deliver(&mut self, job: u64, data: Vec<u8>, from: ChunkSource, out: &mut Vec<Action>) {
        let Some(j) = self.jobs.remove(&job) else {
            return;
        };
        if let Some(p) = self
            .conns
            .get(&j.requester)
            .and_then(|id| self.peers.get_mut(id))
            .filter(|p| p.conn == j.requester)
        {
            p.gets = p.gets.saturating_sub(1);
            if p.kind == ConnKind::Relay {
                // The other relay delivers it to its peer and records that.
                Counters::inc(&self.counters.chunks_to_relays);
                Counters::add(&self.counters.bytes_to_relays, data.len() as u64);
            } else if let Some(id) = self.conns.get(&j.requester) {
                let block = j.info.block;
                self.counters.usage(|u| u.record_fetch(id, &block));
            }
            out.push(Action::Send {
                conn: j.requester,
                msg: FromRelay::ChunkData {
                    req: j.req,
                    block: j.info.block,
                    index: j.index,
                    data,
                    from,
                },
            });
        }
    }

    fn fail_job(&mut self, job: u64, reason: &str, out: &mut Vec<Action>) {
        let Some(j) = self.jobs.remove(&job) else {
            return;
        };
        let alive = self
            .conns
            .get(&j.requester)
            .and_then(|id| self.peers.get_mut(id))
            .filter(|p| p.conn == j.requester)
            .map(|p| p.gets = p.gets.saturating_sub(1))
            .is_some();
        if alive {
            out.push(self.chunk_failed(j.requester, j.req, j.info.block, j.index, reason));
        }
    }

    /// `Chunk{req, data}` from a holder: checked against the chunk list.
    pub fn chunk(&mut self, now: Instant, conn: ConnId, job: u64, data: Vec<u8>) -> Vec<Action> {
        let mut out = Vec::new();
        self.touch(now, conn);
        let Some((h, sent)) = self.take_answer(conn, job) else {
            // Late (after a timeout) or never asked: nothing to do.
            return out;
        };
        let Some(j) = self.jobs.get(&job) else {
            return out;
        };
        if j.info.check(j.index, &data) {
            let n = data.len() as u64;
            Counters::inc(&self.counters.chunks_from_peers);
            Counters::add(&self.counters.bytes_from_peers, n);
            crate::metrics::chunk_bytes(crate::metrics::ChunkPath::Peer, n);
            self.counters.peer(&h, |c| {
                c.chunks_served += 1;
                c.bytes_served += n;
            });
            let block = j.info.block;
            self.counters
                .usage(|u| u.record_chunk_served(&h, &block, n));
            if let Some(p) = self.peers.get_mut(&h) {
                p.sample_latency(now.saturating_duration_since(sent).as_secs_f64() * 1e3);
                p.score = p.score.saturating_add(1);
            }
            self.deliver(job, data, ChunkSource::Peer(h), &mut out);
        } else {
            self.bad_chunk(now, h, job, false, &mut out);
        }
        self.holder_freed(now, h, &mut out);
        out
    }

    /// Holder `h` (a peer, or a link) answered `job` with bytes that do not
    /// match: score it down, ban it after repeats, ask the next holder.
    fn bad_chunk(&mut self, now: Instant, h: PeerId, job: u64, link: bool, out: &mut Vec<Action>) {
        let Some(j) = self.jobs.get(&job) else {
            return;
        };
        let (block, index) = (j.info.block, j.index);
        Counters::inc(&self.counters.bad_chunks);
        crate::metrics::bad_chunk(link);
        if link {
            tracing::warn!(link = %hexid(&h), %block, index, "another relay forwarded a corrupt chunk");
            Counters::inc(&self.counters.bad_chunks_from_relays);
        } else {
            tracing::warn!(peer = %hexid(&h), %block, index, "peer served a corrupt chunk");
            self.counters.peer(&h, |c| c.bad_chunks += 1);
            self.counters.usage(|u| u.record_bad_chunk(&h, &block));
        }
        if let Some(p) = self.peers.get_mut(&h) {
            p.score = p.score.saturating_sub(SCORE_PENALTY);
        }
        let to_ban = self.cfg.bad_chunks_to_ban.max(1);
        let r = self.rep(&h, now);
        r.bad_chunks += 1;
        if r.bad_chunks >= to_ban {
            self.ban(now, h, out);
        }
        self.dispatch(now, job, out);
    }

    fn ban(&mut self, now: Instant, id: PeerId, out: &mut Vec<Action>) {
        let base = self.cfg.ban_base;
        let r = self.rep(&id, now);
        r.bans += 1;
        r.bad_chunks = 0;
        let d = base
            .saturating_mul(1u32 << (r.bans - 1).min(20))
            .min(MAX_BAN);
        r.banned_until = Some(now + d);
        Counters::inc(&self.counters.bans);
        crate::metrics::ban();
        tracing::warn!(peer = %hexid(&id), secs = d.as_secs(), "peer banned for corrupt chunks");
        if let Some(conn) = self.peers.get(&id).map(|p| p.conn) {
            out.push(Action::Close {
                conn,
                code: codes::BANNED,
                message: format!(
                    "banned for {} s: served chunks that do not match their hashes",
                    d.as_secs()
                ),
            });
            self.remove_conn(now, conn, out);
        }
    }

    /// `NoChunk{req}`: the holder cannot serve it after all; it no longer
    /// counts as holding the block.
    pub fn no_chunk(&mut self, now: Instant, conn: ConnId, job: u64) -> Vec<Action> {
        let mut out = Vec::new();
        self.touch(now, conn);
        let Some((h, _)) = self.take_answer(conn, job) else {
            return out;
        };
        if let Some(block) = self.jobs.get(&job).map(|j| j.info.block) {
            if let Some(p) = self.peers.get_mut(&h) {
                if p.have.remove(&block) && self.cluster && p.kind == ConnKind::Peer {
                    out.push(Action::Presence(PresenceChange::Remove {
                        peer: h,
                        blocks: vec![block],
                    }));
                }
            }
            self.unhold(&block, &h);
        }
        self.dispatch(now, job, &mut out);
        self.holder_freed(now, h, &mut out);
        out
    }

    /// The store read of [`Action::ReadStore`] finished.
    pub fn store_read(&mut self, job: u64, data: Result<Vec<u8>, String>) -> Vec<Action> {
        let mut out = Vec::new();
        let Some(j) = self.jobs.get(&job) else {
            return out;
        };
        match data {
            Ok(d) if j.info.check(j.index, &d) => {
                Counters::inc(&self.counters.chunks_from_store);
                Counters::add(&self.counters.bytes_from_store, d.len() as u64);
                crate::metrics::chunk_bytes(crate::metrics::ChunkPath::Store, d.len() as u64);
                self.deliver(job, d, ChunkSource::Relay, &mut out);
            }
            Ok(_) => self.fail_job(
                job,
                "no source left: the relay's copy does not match",
                &mut out,
            ),
            Err(e) => self.fail_job(job, &format!("no source left: {e}"), &mut out),
        }
        out
    }

    /// The earliest chunk deadline.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.first().map(|(t, _)| *t)
    }

    /// Chunk requests past their deadline go to the next holder; peers
    /// silent past the idle timeout are closed.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        while let Some(&(t, job)) = self.deadlines.first() {
            if t > now {
                break;
            }
            self.deadlines.remove(&(t, job));
            if let Some((h, _, _, _)) = self.jobs.get(&job).and_then(|j| j.at) {
                Counters::inc(&self.counters.chunk_timeouts);
                if self.peers.get(&h).is_some_and(|p| p.kind == ConnKind::Peer) {
                    self.counters.peer(&h, |c| c.chunk_timeouts += 1);
                }
                let timeout_ms = self.cfg.chunk_timeout.as_secs_f64() * 1e3;
                if let Some(p) = self.peers.get_mut(&h) {
                    p.sample_latency(timeout_ms);
                    p.score = p.score.saturating_sub(SCORE_PENALTY);
                }
                self.retry(now, job, &mut out);
            } else if let Some(block) = self
                .jobs
                .get(&job)
                .filter(|j| j.parked == Some(t))
                .map(|j| j.info.block)
            {
                // Waited for a holder's credit long enough: the store.
                self.unpark(job, &block);
                self.dispatch(now, job, &mut out);
            }
        }
        if !self.lookups.is_empty() {
            let limit = self.cfg.chunk_timeout;
            self.lookups
                .retain(|_, t| now.saturating_duration_since(*t) < limit);
        }
        let idle = self.cfg.idle_timeout;
        let dead: Vec<ConnId> = self
            .peers
            .values()
            .filter(|p| now.saturating_duration_since(p.last_seen) > idle)
            .map(|p| p.conn)
            .collect();
        for conn in dead {
            out.push(Action::Close {
                conn,
                code: codes::PROTOCOL,
                message: "silent too long".into(),
            });
            self.remove_conn(now, conn, &mut out);
        }
        out
    }

    // ---- other relays: presence lookups and links ----

    /// Other live relays of the database (every heartbeat). Links to relays
    /// no longer listed are closed and forgotten; with none listed, no
    /// lookups are made.
    pub fn relays_alive(&mut self, now: Instant, relays: Vec<RemoteRelay>) -> Vec<Action> {
        let mut out = Vec::new();
        self.others = !relays.is_empty();
        let alive: HashMap<PeerId, RemoteRelay> =
            relays.into_iter().map(|r| (link_id(&r.key), r)).collect();
        let gone: Vec<PeerId> = self
            .links
            .keys()
            .filter(|l| !alive.contains_key(*l))
            .copied()
            .collect();
        for l in gone {
            if let Some(e) = self.links.remove(&l) {
                tracing::info!(relay = %e.relay.id, "relay no longer alive: link closed");
                if let LinkState::Up { conn } = e.state {
                    out.push(Action::Close {
                        conn,
                        code: codes::UNAVAILABLE,
                        message: "the relay is no longer alive in the database".into(),
                    });
                    self.remove_conn(now, conn, &mut out);
                }
            }
            self.wake_link(now, &l, &mut out);
        }
        for (l, r) in alive {
            if let Some(e) = self.links.get_mut(&l) {
                e.relay = r;
            }
        }
        out
    }

    /// The answer to [`Action::Lookup`]: the other relays whose peers hold
    /// `block` (empty: none, or the lookup failed). Jobs waiting for it go on.
    pub fn remote_holders(
        &mut self,
        now: Instant,
        block: BlockHash,
        relays: Vec<RemoteRelay>,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        self.lookups.remove(&block);
        let mut ids = Vec::new();
        for r in relays {
            let l = link_id(&r.key);
            if ids.contains(&l) {
                continue;
            }
            if let Some(e) = self.links.get_mut(&l) {
                if !matches!(e.state, LinkState::Up { .. }) {
                    e.relay = r;
                }
                ids.push(l);
            } else if self.links.len() < self.cfg.max_links {
                self.links.insert(
                    l,
                    LinkEntry {
                        relay: r,
                        state: LinkState::Down { until: now },
                        fails: 0,
                    },
                );
                ids.push(l);
            }
        }
        if self.remote.len() >= REMOTE_CAPACITY && !self.remote.contains_key(&block) {
            self.remote.retain(|_, r| r.until > now);
            if self.remote.len() >= REMOTE_CAPACITY {
                self.remote.clear();
            }
        }
        self.remote.insert(
            block,
            Remote {
                links: ids,
                until: now + self.cfg.remote_ttl,
            },
        );
        self.wake(now, &block, &mut out);
        out
    }

    /// Link `l` logged in to its relay on `conn`: it serves from now on.
    /// None if it is not wanted any more (the driver closes it).
    pub fn link_up(&mut self, now: Instant, l: PeerId, conn: ConnId) -> Option<Vec<Action>> {
        let e = self.links.get_mut(&l)?;
        if !matches!(e.state, LinkState::Connecting { .. }) {
            return None;
        }
        // `fails` is reset by the first good chunk, not here: a relay that
        // accepts the login and then drops the link still backs off.
        e.state = LinkState::Up { conn };
        let agent = format!("link to {}", e.relay.ws_url);
        tracing::info!(relay = %e.relay.id, url = %e.relay.ws_url, "link to another relay up");
        let addr = SocketAddr::from(([0, 0, 0, 0], 0));
        self.insert_entry(now, conn, l, agent, addr, ConnKind::Link);
        Counters::inc(&self.counters.links_up);
        let mut out = Vec::new();
        self.wake_link(now, &l, &mut out);
        Some(out)
    }

    /// Link `l` could not be opened (`conn` None) or its connection ended:
    /// down, opened again after a backoff. Its jobs go elsewhere.
    pub fn link_down(&mut self, now: Instant, l: PeerId, conn: Option<ConnId>) -> Vec<Action> {
        let mut out = Vec::new();
        match conn {
            Some(c) => self.remove_conn(now, c, &mut out),
            None => {
                if let Some(e) = self.links.get_mut(&l) {
                    if matches!(e.state, LinkState::Connecting { .. }) {
                        Counters::inc(&self.counters.link_failures);
                        let d = backoff(self.cfg.link_backoff_base, e.fails);
                        e.fails = e.fails.saturating_add(1);
                        e.state = LinkState::Down { until: now + d };
                    }
                }
            }
        }
        self.wake_link(now, &l, &mut out);
        out
    }

    /// The link entry of `l` loses its connection `conn` (from remove_conn).
    fn link_lost(&mut self, now: Instant, l: &PeerId, conn: ConnId) {
        if let Some(e) = self.links.get_mut(l) {
            if e.state == (LinkState::Up { conn }) {
                Counters::inc(&self.counters.link_failures);
                let d = backoff(self.cfg.link_backoff_base, e.fails);
                e.fails = e.fails.saturating_add(1);
                e.state = LinkState::Down { until: now + d };
                tracing::info!(relay = %e.relay.id, retry_in_ms = d.as_millis() as u64, "link to another relay down");
            }
        }
    }

    /// `ChunkData` on link `conn` for its `GetChunk` `job`: checked against
    /// the chunk list like a peer's chunk. Bytes forwarded by another relay
    /// earn the link nothing (that relay credited its peer).
    #[allow(clippy::too_many_arguments)]
    pub fn link_chunk(
        &mut self,
        now: Instant,
        conn: ConnId,
        job: u64,
        block: BlockHash,
        index: u32,
        data: Vec<u8>,
        from: ChunkSource,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        self.touch(now, conn);
        let Some((h, sent)) = self.take_answer(conn, job) else {
            return out;
        };
        let Some(j) = self.jobs.get(&job) else {
            return out;
        };
        if j.info.block == block && j.index == index && j.info.check(index, &data) {
            let n = data.len() as u64;
            Counters::inc(&self.counters.chunks_from_relays);
            Counters::add(&self.counters.bytes_from_relays, n);
            crate::metrics::chunk_bytes(crate::metrics::ChunkPath::Link, n);
            if let Some(p) = self.peers.get_mut(&h) {
                p.sample_latency(now.saturating_duration_since(sent).as_secs_f64() * 1e3);
                p.score = p.score.saturating_add(1);
            }
            if let Some(e) = self.links.get_mut(&h) {
                e.fails = 0;
            }
            let from = match from {
                ChunkSource::Peer(x) => ChunkSource::Peer(x),
                _ => ChunkSource::Relay,
            };
            self.deliver(job, data, from, &mut out);
        } else {
            self.bad_chunk(now, h, job, true, &mut out);
        }
        self.holder_freed(now, h, &mut out);
        out
    }

    /// `ChunkFailed` on link `conn` for `job`: the next holder. Unless it
    /// was only out of credits, that relay no longer counts as holding the
    /// block (until the next lookup).
    pub fn link_failed(
        &mut self,
        now: Instant,
        conn: ConnId,
        job: u64,
        reason: &str,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        self.touch(now, conn);
        let Some((h, _)) = self.take_answer(conn, job) else {
            return out;
        };
        if reason != CREDITS {
            if let Some(block) = self.jobs.get(&job).map(|j| j.info.block) {
                if let Some(r) = self.remote.get_mut(&block) {
                    r.links.retain(|l| *l != h);
                }
            }
        }
        self.dispatch(now, job, &mut out);
        self.holder_freed(now, h, &mut out);
        out
    }

    /// What this relay's peers hold (for a full rewrite of its presence).
    pub fn presence_snapshot(&self) -> Vec<(PeerId, Vec<BlockHash>)> {
        self.peers
            .iter()
            .filter(|(_, p)| p.kind == ConnKind::Peer && !p.have.is_empty())
            .map(|(id, p)| (*id, p.have.iter().copied().collect()))
            .collect()
    }

    /// Links and their state, for `GET /p2p/stats`.
    pub fn link_views(&self, now: Instant) -> Vec<LinkView> {
        let mut v: Vec<LinkView> = self
            .links
            .iter()
            .map(|(l, e)| {
                let p = self.peers.get(l).filter(|p| p.kind == ConnKind::Link);
                LinkView {
                    relay: e.relay.id.clone(),
                    ws_url: e.relay.ws_url.clone(),
                    state: match e.state {
                        LinkState::Up { .. } => "up",
                        LinkState::Connecting { .. } => "connecting",
                        LinkState::Down { .. } => "down",
                    }
                    .to_string(),
                    fails: e.fails,
                    retry_in_ms: match e.state {
                        LinkState::Down { until } => {
                            until.saturating_duration_since(now).as_millis() as u64
                        }
                        _ => 0,
                    },
                    in_flight: p.map_or(0, |p| p.serving),
                    latency_ms: p.and_then(|p| p.latency_ms),
                    banned: self.banned_until(l, now).is_some(),
                }
            })
            .collect();
        v.sort_by(|a, b| a.relay.cmp(&b.relay));
        v
    }

    // ---- remote computation ----

    /// Pick a compute peer for `block` not in `tried` (serve_compute, holds
    /// it, not banned, not in backoff, within compute credits), register the
    /// request and return it with the `Compute` message to send.
    pub fn compute_start(
        &mut self,
        now: Instant,
        block: BlockHash,
        rows: u32,
        input: Vec<f32>,
        tried: &[PeerId],
    ) -> Option<(u64, PeerId, Action)> {
        let mut best: Option<(f64, PeerId)> = None;
        for h in self.holders.get(&block).into_iter().flatten() {
            if tried.contains(h) || self.banned_until(h, now).is_some() {
                continue;
            }
            if self
                .reputation
                .get(h)
                .and_then(|r| r.compute_backoff_until)
                .is_some_and(|u| u > now)
            {
                continue;
            }
            let Some(p) = self.peers.get(h) else { continue };
            if !p.serve_compute || p.computing >= self.cfg.compute_credits {
                continue;
            }
            let c = p.cost(p.computing);
            if best.is_none_or(|(b, _)| c < b) {
                best = Some((c, *h));
            }
        }
        let (_, h) = best?;
        let req = self.req_id();
        let p = self.peers.get_mut(&h)?;
        p.computing += 1;
        let conn = p.conn;
        self.computes.insert(
            req,
            ComputeJob {
                peer: h,
                conn,
                sent: now,
                expected: input.len(),
            },
        );
        Counters::inc(&self.counters.compute_sent);
        self.counters.peer(&h, |c| c.compute_sent += 1);
        Some((
            req,
            h,
            Action::Send {
                conn,
                msg: FromRelay::Compute {
                    req,
                    block,
                    rows,
                    input,
                },
            },
        ))
    }

    /// Logged-in peers that serve computations.
    pub fn compute_peers(&self) -> usize {
        self.peers.values().filter(|p| p.serve_compute).count()
    }

    fn compute_fail(
        &mut self,
        now: Instant,
        req: u64,
        reason: String,
        timed_out: bool,
        out: &mut Vec<Action>,
    ) {
        let Some(c) = self.computes.remove(&req) else {
            return;
        };
        if let Some(p) = self.peers.get_mut(&c.peer).filter(|p| p.conn == c.conn) {
            p.computing = p.computing.saturating_sub(1);
            p.score = p.score.saturating_sub(SCORE_PENALTY);
        }
        if timed_out {
            Counters::inc(&self.counters.compute_timed_out);
            self.counters.peer(&c.peer, |x| x.compute_timed_out += 1);
        } else {
            Counters::inc(&self.counters.compute_failed);
            self.counters.peer(&c.peer, |x| x.compute_failed += 1);
        }
        let base = self.cfg.compute_backoff_base;
        let r = self.rep(&c.peer, now);
        r.compute_fails += 1;
        let d = base
            .saturating_mul(1u32 << (r.compute_fails - 1).min(20))
            .min(MAX_COMPUTE_BACKOFF);
        r.compute_backoff_until = Some(now + d);
        out.push(Action::ComputeDone {
            req,
            outcome: ComputeOutcome::Failed {
                peer: c.peer,
                reason,
            },
        });
    }

    /// `ComputeResult{req, output}`: checked (one float per input float, all
    /// finite) before it counts.
    pub fn compute_result(
        &mut self,
        now: Instant,
        conn: ConnId,
        req: u64,
        output: Vec<f32>,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        self.touch(now, conn);
        let Some(c) = self.computes.get(&req).filter(|c| c.conn == conn) else {
            return out;
        };
        if output.len() != c.expected {
            let why = format!(
                "returned {} floats for an input of {}",
                output.len(),
                c.expected
            );
            self.compute_fail(now, req, why, false, &mut out);
            return out;
        }
        if output.iter().any(|v| !v.is_finite()) {
            self.compute_fail(
                now,
                req,
                "returned non-finite values".into(),
                false,
                &mut out,
            );
            return out;
        }
        let Some(c) = self.computes.remove(&req) else {
            return out;
        };
        if let Some(p) = self.peers.get_mut(&c.peer).filter(|p| p.conn == conn) {
            p.computing = p.computing.saturating_sub(1);
            p.score = p.score.saturating_add(1);
            p.sample_latency(now.saturating_duration_since(c.sent).as_secs_f64() * 1e3);
        }
        if let Some(r) = self.reputation.get_mut(&c.peer) {
            r.compute_fails = 0;
            r.compute_backoff_until = None;
        }
        Counters::inc(&self.counters.compute_answered);
        self.counters.peer(&c.peer, |x| x.compute_answered += 1);
        out.push(Action::ComputeDone {
            req,
            outcome: ComputeOutcome::Answered {
                peer: c.peer,
                output,
            },
        });
        out
    }

    /// `ComputeFailed{req, reason}`.
    pub fn compute_refused(
        &mut self,
        now: Instant,
        conn: ConnId,
        req: u64,
        reason: String,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        self.touch(now, conn);
        if self.computes.get(&req).is_some_and(|c| c.conn == conn) {
            let mut reason = reason;
            web_node::net::peer::truncate_text(&mut reason);
            self.compute_fail(now, req, format!("refused: {reason}"), false, &mut out);
        }
        out
    }

    /// The driver gave up waiting for `req` (its timeout), or could not
    /// queue it (`timed_out` false).
    pub fn compute_abandon(
        &mut self,
        now: Instant,
        req: u64,
        reason: String,
        timed_out: bool,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        self.compute_fail(now, req, reason, timed_out, &mut out);
        out
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
                    connected_since: p.since,
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn addr() -> SocketAddr {
        "127.0.0.1:1".parse().unwrap()
    }

    fn info(chunks: &[&[u8]]) -> Arc<ChunkInfo> {
        let len: usize = chunks.iter().map(|c| c.len()).sum();
        Arc::new(ChunkInfo {
            block: BlockHash([9; 32]),
            chunks: chunks.iter().map(|c| BlockHash::of(c)).collect(),
            chunk_size: chunks[0].len() as u32,
            payload_len: len as u64,
        })
    }

    struct T {
        core: Core,
        now: Instant,
        counters: Arc<Counters>,
    }

    impl T {
        fn new() -> Self {
            let counters = Arc::new(Counters::default());
            Self {
                core: Core::new(RouteConfig::default(), counters.clone()),
                now: Instant::now(),
                counters,
            }
        }
        fn login(&mut self, conn: ConnId, id: u8) -> Vec<Action> {
            self.core
                .login(self.now, conn, [id; 32], "t".into(), addr())
                .unwrap()
        }
        fn have(&mut self, conn: ConnId, b: BlockHash) {
            let a = self.core.have(self.now, conn, &[b], &[], |_| true);
            assert!(a.is_empty(), "{a:?}");
        }
    }

    fn serve_to(a: &[Action]) -> (ConnId, u64) {
        match a {
            [Action::Send {
                conn,
                msg: FromRelay::ServeChunk { req, .. },
            }] => (*conn, *req),
            other => panic!("expected one ServeChunk, got {other:?}"),
        }
    }

    fn data_to(a: &[Action]) -> (ConnId, Vec<u8>, ChunkSource) {
        let found = a.iter().find_map(|x| match x {
            Action::Send {
                conn,
                msg: FromRelay::ChunkData { data, from, .. },
            } => Some((*conn, data.clone(), *from)),
            _ => None,
        });
        found.unwrap_or_else(|| panic!("no ChunkData in {a:?}"))
    }

    #[test]
    fn chunk_goes_to_a_holder_and_is_checked() {
        let mut t = T::new();
        let i = info(&[b"aaaa", b"bb"]);
        t.login(1, 1);
        t.login(2, 2);
        t.have(1, i.block);
        let a = t.core.get_chunk(t.now, 2, 77, i.block, 1, Some(i.clone()));
        let (conn, job) = serve_to(&a);
        assert_eq!(conn, 1);
        let a = t.core.chunk(t.now, 1, job, b"bb".to_vec());
        let (to, data, from) = data_to(&a);
        assert_eq!(
            (to, data, from),
            (2, b"bb".to_vec(), ChunkSource::Peer([1; 32]))
        );
        let s = t.counters.snapshot();
        assert_eq!(
            (s.chunks_from_peers, s.bytes_from_peers, s.chunks_from_store),
            (1, 2, 0)
        );
        assert_eq!(s.peer(&[1; 32]).bytes_served, 2);
    }

    #[test]
    fn the_requester_is_never_its_own_holder_and_the_store_is_the_fallback() {
        let mut t = T::new();
        let i = info(&[b"aaaa"]);
        t.login(1, 1);
        t.have(1, i.block);
        let a = t.core.get_chunk(t.now, 1, 5, i.block, 0, Some(i.clone()));
        let job = match &a[..] {
            [Action::ReadStore { job, index: 0, .. }] => *job,
            o => panic!("{o:?}"),
        };
        let a = t.core.store_read(job, Ok(b"aaaa".to_vec()));
        assert_eq!(data_to(&a).2, ChunkSource::Relay);
        assert_eq!(t.counters.snapshot().chunks_from_store, 1);
    }

    #[test]
    fn a_liar_is_caught_banned_after_repeats_and_the_chunk_comes_from_elsewhere() {
        let mut t = T::new();
        let i = info(&[b"good"]);
        t.login(1, 1); // liar
        t.login(2, 2); // requester
        t.have(1, i.block);
        for round in 0..2 {
            let a = t
                .core
                .get_chunk(t.now, 2, round, i.block, 0, Some(i.clone()));
            let (conn, job) = serve_to(&a);
            assert_eq!(conn, 1);
            let a = t.core.chunk(t.now, 1, job, b"evil".to_vec());
            // Not forwarded; the store reads it instead.
            assert!(a.iter().all(|x| !matches!(
                x,
                Action::Send {
                    msg: FromRelay::ChunkData { .. },
                    ..
                }
            )));
            let job2 = a
                .iter()
                .find_map(|x| match x {
                    Action::ReadStore { job, .. } => Some(*job),
                    _ => None,
                })
                .expect("store fallback");
            assert_eq!(job2, job);
            let banned = a.iter().any(
                |x| matches!(x, Action::Close { conn: 1, code, .. } if *code == codes::BANNED),
            );
            assert_eq!(banned, round == 1, "banned on the second bad chunk");
            let d = t.core.store_read(job, Ok(b"good".to_vec()));
            assert_eq!(data_to(&d).1, b"good".to_vec());
        }
        assert_eq!(t.core.online(), 1);
        assert!(t.core.holders_of(&i.block).is_empty());
        let r = t.core.login(t.now, 3, [1; 32], "again".into(), addr());
        assert_eq!(r.unwrap_err().code, codes::BANNED);
        // After the ban, logging in works; the next ban is twice as long.
        let later = t.now + Duration::from_secs(61);
        t.core.login(later, 4, [1; 32], "t".into(), addr()).unwrap();
        t.core.have(later, 4, &[i.block], &[], |_| true);
        for round in 0..2 {
            let a = t
                .core
                .get_chunk(later, 2, 10 + round, i.block, 0, Some(i.clone()));
            let (_, job) = serve_to(&a);
            t.core.chunk(later, 4, job, b"evil".to_vec());
        }
        let until = t.core.banned_until(&[1; 32], later).unwrap();
        assert_eq!(until - later, Duration::from_secs(120));
        let s = t.counters.snapshot();
        assert_eq!((s.bad_chunks, s.bans), (4, 2));
    }

    #[test]
    fn timeouts_and_no_chunk_move_on_to_the_next_holder() {
        let mut t = T::new();
        let i = info(&[b"abc"]);
        for c in 1..=3 {
            t.login(c, c as u8);
        }
        t.have(1, i.block);
        t.have(2, i.block);
        let a = t.core.get_chunk(t.now, 3, 1, i.block, 0, Some(i.clone()));
        let (first, job) = serve_to(&a);
        // Timeout: the other holder is asked.
        let later = t.now + t.core.config().chunk_timeout + Duration::from_millis(1);
        let a = t.core.handle_timeout(later);
        let (second, job2) = serve_to(&a);
        assert_ne!(first, second);
        assert_eq!(job, job2);
        // The late answer of the first holder is ignored.
        assert!(t.core.chunk(later, first, job, b"abc".to_vec()).is_empty());
        // NoChunk from the second: no holder left, the store.
        let a = t.core.no_chunk(later, second, job);
        assert!(matches!(&a[..], [Action::ReadStore { .. }]), "{a:?}");
        assert_eq!(t.counters.snapshot().chunk_timeouts, 1);
        assert_eq!(t.core.holders_of(&i.block), vec![[first as u8; 32]]);
    }

    #[test]
    fn parallel_requests_spread_over_holders_and_respect_serve_credits() {
        let mut t = T::new();
        let i = info(&[b"a", b"b", b"c", b"d"]);
        for c in 1..=3 {
            t.login(c, c as u8);
        }
        t.have(1, i.block);
        t.have(2, i.block);
        let mut at = HashMap::new();
        for k in 0..4u32 {
            let a = t
                .core
                .get_chunk(t.now, 3, u64::from(k), i.block, k, Some(i.clone()));
            *at.entry(serve_to(&a).0).or_insert(0) += 1;
        }
        assert_eq!(at.get(&1), Some(&2));
        assert_eq!(at.get(&2), Some(&2));
        // Credits: past SERVE_CREDITS at the only holder, requests wait for
        // a credit (peers first), and go to the store after the chunk timeout.
        let mut t = T::new();
        let chunks: Vec<&[u8]> = vec![b"x"; 20];
        let i = info(&chunks);
        t.login(1, 1);
        t.login(2, 2);
        t.have(1, i.block);
        let mut served = Vec::new();
        for k in 0..12u32 {
            let a = t
                .core
                .get_chunk(t.now, 2, u64::from(k), i.block, k, Some(i.clone()));
            if a.is_empty() {
                continue; // parked
            }
            served.push(serve_to(&a).1);
        }
        assert_eq!(served.len(), limits::SERVE_CREDITS as usize);
        // One answer frees a credit: a parked request goes to the holder.
        let a = t.core.chunk(t.now, 1, served[0], b"x".to_vec());
        assert_eq!(data_to(&a).2, ChunkSource::Peer([1; 32]));
        assert!(a.iter().any(|x| matches!(
            x,
            Action::Send {
                conn: 1,
                msg: FromRelay::ServeChunk { .. }
            }
        )));
        // At the chunk timeout the 8 unanswered requests go to the store (no
        // other holder) and their freed credits take the 3 still parked.
        let later = t.now + t.core.config().chunk_timeout + Duration::from_millis(1);
        let a = t.core.handle_timeout(later);
        let count = |f: &dyn Fn(&Action) -> bool| a.iter().filter(|x| f(x)).count();
        assert_eq!(count(&|x| matches!(x, Action::ReadStore { .. })), 8);
        assert_eq!(
            count(&|x| matches!(
                x,
                Action::Send {
                    conn: 1,
                    msg: FromRelay::ServeChunk { .. }
                }
            )),
            3
        );
        assert_eq!(t.core.jobs_in_flight(), 11);
    }

    #[test]
    fn requester_credits_unknown_blocks_and_bad_indexes_fail_at_once() {
        let mut t = T::new();
        let blocks: Vec<&[u8]> = vec![b"x"; 40];
        let i = info(&blocks);
        t.login(1, 1);
        let reason = |a: &[Action]| match a {
            [Action::Send {
                msg: FromRelay::ChunkFailed { reason, .. },
                ..
            }] => reason.clone(),
            o => panic!("{o:?}"),
        };
        assert!(reason(&t.core.get_chunk(t.now, 1, 1, i.block, 0, None)).contains("unknown block"));
        assert!(
            reason(&t.core.get_chunk(t.now, 1, 1, i.block, 40, Some(i.clone())))
                .contains("out of range")
        );
        for k in 0..limits::CHUNK_CREDITS {
            let a = t
                .core
                .get_chunk(t.now, 1, u64::from(k), i.block, k, Some(i.clone()));
            assert!(matches!(&a[..], [Action::ReadStore { .. }]));
        }
        assert_eq!(
            reason(&t.core.get_chunk(t.now, 1, 99, i.block, 0, Some(i.clone()))),
            "credits"
        );
    }

    #[test]
    fn second_login_replaces_the_first_and_a_holder_leaving_reroutes_its_jobs() {
        let mut t = T::new();
        let i = info(&[b"q"]);
        t.login(1, 1);
        t.login(2, 2);
        t.have(1, i.block);
        let a = t.core.get_chunk(t.now, 2, 1, i.block, 0, Some(i.clone()));
        let (_, job) = serve_to(&a);
        let a = t.login(5, 1);
        assert!(a
            .iter()
            .any(|x| matches!(x, Action::Close { conn: 1, code, .. } if *code == codes::REPLACED)));
        assert!(a
            .iter()
            .any(|x| matches!(x, Action::ReadStore { job: j, .. } if *j == job)));
        assert_eq!(t.core.peer_of(5), Some([1; 32]));
        assert_eq!(t.core.peer_of(1), None);
        // The replaced connection's late logout changes nothing.
        assert!(t.core.logout(t.now, 1).is_empty());
        assert_eq!(t.core.online(), 2);
    }

    #[test]
    fn have_ignores_unknown_blocks_and_is_bounded_per_message() {
        let mut t = T::new();
        t.login(1, 1);
        let known = BlockHash([1; 32]);
        let a = t
            .core
            .have(t.now, 1, &[known, BlockHash([2; 32])], &[], |b| *b == known);
        assert!(
            matches!(&a[..], [Action::Send { msg: FromRelay::Error { code, .. }, .. }] if code == codes::PROTOCOL)
        );
        assert_eq!(t.core.holders_of(&known), vec![[1; 32]]);
        assert!(t.core.holders_of(&BlockHash([2; 32])).is_empty());
        let many = vec![known; limits::MAX_HAVE_PER_MSG + 1];
        assert_eq!(t.core.have(t.now, 1, &many, &[], |_| true).len(), 1);
        t.core.have(t.now, 1, &[], &[known], |_| true);
        assert!(t.core.holders_of(&known).is_empty());
    }

    #[test]
    fn compute_checks_output_backs_off_failures_and_fails_on_disconnect() {
        let mut t = T::new();
        let b = BlockHash([3; 32]);
        for c in 1..=2 {
            t.login(c, c as u8);
            t.core.status(t.now, c, 0, true);
            t.have(c, b);
        }
        let (req, p1, _) = t
            .core
            .compute_start(t.now, b, 1, vec![1.0; 4], &[])
            .unwrap();
        let conn1 = if p1 == [1; 32] { 1 } else { 2 };
        // Garbage (wrong length) fails and backs the peer off.
        let a = t.core.compute_result(t.now, conn1, req, vec![0.0; 3]);
        assert!(matches!(
            &a[..],
            [Action::ComputeDone {
                outcome: ComputeOutcome::Failed { .. },
                ..
            }]
        ));
        let (req2, p2, _) = t
            .core
            .compute_start(t.now, b, 1, vec![1.0; 4], &[p1])
            .unwrap();
        assert_ne!(p1, p2);
        // p1 is in backoff: not picked even when nothing else is left.
        assert!(t
            .core
            .compute_start(t.now, b, 1, vec![1.0; 4], &[p2])
            .is_none());
        // A disconnect fails the pending request at once.
        let conn2 = 3 - conn1;
        let a = t.core.logout(t.now, conn2);
        assert!(
            matches!(&a[..], [Action::ComputeDone { req, outcome: ComputeOutcome::Failed { .. } }] if *req == req2)
        );
        // NaN output fails; a good answer counts.
        let later = t.now + Duration::from_secs(6);
        let (r3, _, _) = t
            .core
            .compute_start(later, b, 1, vec![1.0; 2], &[])
            .unwrap();
        let a = t.core.compute_result(later, conn1, r3, vec![f32::NAN, 0.0]);
        assert!(matches!(
            &a[..],
            [Action::ComputeDone {
                outcome: ComputeOutcome::Failed { .. },
                ..
            }]
        ));
        let much_later = later + Duration::from_secs(60);
        let (r4, _, _) = t
            .core
            .compute_start(much_later, b, 1, vec![1.0; 2], &[])
            .unwrap();
        let a = t.core.compute_result(much_later, conn1, r4, vec![0.5, 0.5]);
        assert!(matches!(
            &a[..],
            [Action::ComputeDone {
                outcome: ComputeOutcome::Answered { .. },
                ..
            }]
        ));
        let s = t.counters.snapshot();
        assert_eq!(
            (s.compute_sent, s.compute_answered, s.compute_failed),
            (4, 1, 3)
        );
    }

    #[test]
    fn silent_peers_expire() {
        let mut t = T::new();
        t.login(1, 1);
        let a = t
            .core
            .handle_timeout(t.now + t.core.config().idle_timeout + Duration::from_secs(1));
        assert!(matches!(&a[..], [Action::Close { conn: 1, .. }]));
        assert_eq!(t.core.online(), 0);
    }

    // ---- several relays: presence, lookups, links ----

    fn remote(n: u8) -> RemoteRelay {
        RemoteRelay {
            id: format!("relay{n}"),
            key: [n; 32],
            ws_url: format!("ws://127.0.0.{n}:1/ws"),
        }
    }

    fn cluster() -> T {
        let mut t = T::new();
        t.core.enable_cluster();
        t
    }

    /// (conn, job, index) of every ServeChunk in `a`.
    fn serves(a: &[Action]) -> Vec<(ConnId, u64, u32)> {
        a.iter()
            .filter_map(|x| match x {
                Action::Send {
                    conn,
                    msg: FromRelay::ServeChunk { req, index, .. },
                } => Some((*conn, *req, *index)),
                _ => None,
            })
            .collect()
    }

    fn store_jobs(a: &[Action]) -> Vec<u64> {
        a.iter()
            .filter_map(|x| match x {
                Action::ReadStore { job, .. } => Some(*job),
                _ => None,
            })
            .collect()
    }

    /// A link to `r` up on `conn` after a lookup for `i` named it.
    fn link_up_for(t: &mut T, i: &Arc<ChunkInfo>, r: &RemoteRelay, conn: ConnId) -> Vec<Action> {
        let a = t.core.remote_holders(t.now, i.block, vec![r.clone()]);
        let l = link_id(&r.key);
        assert!(
            a.contains(&Action::OpenLink {
                link: l,
                relay: r.clone()
            }),
            "{a:?}"
        );
        t.core.link_up(t.now, l, conn).expect("wanted")
    }

    #[test]
    fn a_chunk_no_local_peer_holds_goes_over_a_link_and_is_checked_again() {
        let mut t = cluster();
        let i = info(&[b"aaaa", b"bb"]);
        let r = remote(7);
        t.login(2, 2);
        assert!(t.core.relays_alive(t.now, vec![r.clone()]).is_empty());
        let a = t.core.get_chunk(t.now, 2, 77, i.block, 1, Some(i.clone()));
        assert_eq!(a, vec![Action::Lookup { block: i.block }]);
        // A second request for the block waits for the same lookup.
        let a = t.core.get_chunk(t.now, 2, 78, i.block, 0, Some(i.clone()));
        assert!(a.is_empty(), "{a:?}");
        let a = link_up_for(&mut t, &i, &r, 100);
        let s = serves(&a);
        assert_eq!(s.len(), 2, "both go over the link: {a:?}");
        assert!(s.iter().all(|x| x.0 == 100));
        let job = |k: u32| s.iter().find(|x| x.2 == k).map(|x| x.1).unwrap();
        let a = t.core.link_chunk(
            t.now,
            100,
            job(1),
            i.block,
            1,
            b"bb".to_vec(),
            ChunkSource::Peer([5; 32]),
        );
        assert_eq!(data_to(&a), (2, b"bb".to_vec(), ChunkSource::Peer([5; 32])));
        // A lying answer is not delivered: the store answers instead.
        let a = t.core.link_chunk(
            t.now,
            100,
            job(0),
            i.block,
            0,
            b"evil".to_vec(),
            ChunkSource::Peer([5; 32]),
        );
        assert_eq!(store_jobs(&a), vec![job(0)]);
        let st = t.counters.snapshot();
        assert_eq!(
            (
                st.chunks_from_relays,
                st.bytes_from_relays,
                st.chunks_from_peers
            ),
            (1, 2, 0)
        );
        assert_eq!((st.bad_chunks, st.bad_chunks_from_relays), (1, 1));
        // Neither the link nor the relay's peer earn anything here.
        assert_eq!(
            st.peer(&link_id(&r.key)),
            crate::peers::PeerCounters::default()
        );
        assert_eq!(st.peer(&[5; 32]), crate::peers::PeerCounters::default());
        assert_eq!(
            (st.links_up, st.links_opened, st.presence_lookups),
            (1, 1, 1)
        );
        // The link is no peer.
        assert_eq!(t.core.online(), 1);
        assert_eq!(t.core.views(t.now).len(), 1);
        assert_eq!(t.core.link_views(t.now)[0].state, "up");
    }

    #[test]
    fn local_peers_come_first_and_a_lying_link_is_banned_like_a_peer() {
        let mut t = cluster();
        let i = info(&[b"x", b"y", b"z"]);
        let r = remote(7);
        t.login(1, 1);
        t.login(2, 2);
        t.core.relays_alive(t.now, vec![r.clone()]);
        t.core.have(t.now, 1, &[i.block], &[], |_| true);
        let a = t.core.get_chunk(t.now, 2, 1, i.block, 0, Some(i.clone()));
        assert_eq!(serve_to(&a).0, 1, "the local holder, no lookup");
        assert_eq!(t.counters.snapshot().presence_lookups, 0);
        // The holder leaves: its job looks for another (a lookup), and a
        // new request waits for the same lookup.
        let a = t.core.logout(t.now, 1);
        assert_eq!(
            a,
            vec![
                Action::Presence(PresenceChange::Gone { peer: [1; 32] }),
                Action::Lookup { block: i.block }
            ]
        );
        assert!(t
            .core
            .get_chunk(t.now, 2, 2, i.block, 1, Some(i.clone()))
            .is_empty());
        let a = link_up_for(&mut t, &i, &r, 100);
        let s = serves(&a);
        assert_eq!(s.len(), 2, "{a:?}");
        for (n, (_, job, index)) in s.into_iter().enumerate() {
            let a = t.core.link_chunk(
                t.now,
                100,
                job,
                i.block,
                index,
                b"?".to_vec(),
                ChunkSource::Relay,
            );
            assert_eq!(store_jobs(&a), vec![job]);
            let banned = a.iter().any(
                |x| matches!(x, Action::Close { conn: 100, code, .. } if *code == codes::BANNED),
            );
            assert_eq!(banned, n == 1, "banned on the second bad chunk");
        }
        let l = link_id(&r.key);
        assert!(t.core.banned_until(&l, t.now).is_some());
        // While banned it is neither used nor opened again.
        let a = t.core.get_chunk(t.now, 2, 4, i.block, 0, Some(i.clone()));
        assert_eq!(store_jobs(&a).len(), 1, "{a:?}");
        let later = t.now + Duration::from_secs(5);
        let a = t.core.remote_holders(later, i.block, vec![r.clone()]);
        assert!(a.is_empty(), "{a:?}");
        let a = t.core.get_chunk(later, 2, 5, i.block, 0, Some(i.clone()));
        assert_eq!(store_jobs(&a).len(), 1, "{a:?}");
    }

    #[test]
    fn requests_of_another_relay_stay_with_local_peers_and_earn_it_nothing() {
        let mut t = cluster();
        let i = info(&[b"abc"]);
        t.core.relays_alive(t.now, vec![remote(7)]);
        t.core
            .login_as(t.now, 3, [7; 32], "relay".into(), addr(), ConnKind::Relay)
            .unwrap();
        // No local holder: failed at once (no lookup, no link, no store).
        let a = t.core.get_chunk(t.now, 3, 1, i.block, 0, Some(i.clone()));
        assert!(
            matches!(&a[..], [Action::Send { conn: 3, msg: FromRelay::ChunkFailed { reason, .. } }] if reason == NO_LOCAL_HOLDER),
            "{a:?}"
        );
        // A relay holds nothing and serves no computation.
        let a = t.core.have(t.now, 3, &[i.block], &[], |_| true);
        assert!(matches!(
            &a[..],
            [Action::Send {
                conn: 3,
                msg: FromRelay::Error { .. }
            }]
        ));
        t.core.status(t.now, 3, 0, true);
        assert_eq!(t.core.compute_peers(), 0);
        assert!(t.core.holders_of(&i.block).is_empty());
        // A local holder serves it; the holder earns, the relay is no peer.
        t.login(1, 1);
        t.core.have(t.now, 1, &[i.block], &[], |_| true);
        let a = t.core.get_chunk(t.now, 3, 2, i.block, 0, Some(i.clone()));
        let (_, job) = serve_to(&a);
        let a = t.core.chunk(t.now, 1, job, b"abc".to_vec());
        assert_eq!(
            data_to(&a),
            (3, b"abc".to_vec(), ChunkSource::Peer([1; 32]))
        );
        let s = t.counters.snapshot();
        assert_eq!((s.chunks_to_relays, s.bytes_to_relays), (1, 3));
        assert_eq!(s.peer(&[1; 32]).bytes_served, 3);
        assert_eq!((s.relays_online, s.peers_online, s.logins), (1, 1, 1));
        assert_eq!(t.core.online(), 1);
        assert!(t.core.views(t.now).iter().all(|v| v.id != [7; 32]));
        assert!(
            t.core.logout(t.now, 3).is_empty(),
            "no presence for a relay"
        );
        assert_eq!(t.counters.snapshot().relays_online, 0);
    }

    #[test]
    fn presence_follows_have_no_chunk_and_logout_in_cluster_mode_only() {
        let i = info(&[b"q"]);
        let other = BlockHash([3; 32]);
        let mut plain = T::new();
        plain.login(1, 1);
        plain.have(1, i.block); // no Presence without the cluster
        let mut t = cluster();
        t.login(1, 1);
        t.login(2, 2);
        let a = t.core.have(t.now, 1, &[i.block, other], &[], |_| true);
        assert_eq!(
            a,
            vec![Action::Presence(PresenceChange::Add {
                peer: [1; 32],
                blocks: vec![i.block, other]
            })]
        );
        let a = t
            .core
            .have(t.now, 1, &[], &[other, BlockHash([4; 32])], |_| true);
        assert_eq!(
            a,
            vec![Action::Presence(PresenceChange::Remove {
                peer: [1; 32],
                blocks: vec![other]
            })]
        );
        assert_eq!(t.core.presence_snapshot(), vec![([1; 32], vec![i.block])]);
        let a = t.core.get_chunk(t.now, 2, 1, i.block, 0, Some(i.clone()));
        let (_, job) = serve_to(&a);
        let a = t.core.no_chunk(t.now, 1, job);
        assert!(a.contains(&Action::Presence(PresenceChange::Remove {
            peer: [1; 32],
            blocks: vec![i.block]
        })));
        t.core.have(t.now, 1, &[i.block], &[], |_| true);
        let a = t.core.logout(t.now, 1);
        assert_eq!(
            a,
            vec![Action::Presence(PresenceChange::Gone { peer: [1; 32] })]
        );
        // A peer that held nothing leaves no trace.
        assert!(t.core.logout(t.now, 2).is_empty());
    }

    #[test]
    fn a_failed_or_lost_link_backs_off_and_its_jobs_go_to_the_store() {
        let mut t = cluster();
        let i = info(&[b"a", b"b", b"c"]);
        let r = remote(7);
        let l = link_id(&r.key);
        t.login(2, 2);
        t.core.relays_alive(t.now, vec![r.clone()]);
        t.core.get_chunk(t.now, 2, 1, i.block, 0, Some(i.clone()));
        let a = t.core.remote_holders(t.now, i.block, vec![r.clone()]);
        assert!(matches!(&a[..], [Action::OpenLink { .. }]), "{a:?}");
        // Connecting failed: the waiting job goes to the store.
        let a = t.core.link_down(t.now, l, None);
        assert_eq!(store_jobs(&a).len(), 1, "{a:?}");
        // Within the backoff: straight to the store, nothing opened.
        let a = t.core.get_chunk(t.now, 2, 2, i.block, 1, Some(i.clone()));
        assert_eq!(store_jobs(&a).len(), 1, "{a:?}");
        // After it: opened again, up, used.
        let later = t.now + LINK_BACKOFF_BASE + Duration::from_millis(1);
        let a = t.core.get_chunk(later, 2, 3, i.block, 2, Some(i.clone()));
        assert!(matches!(&a[..], [Action::OpenLink { .. }]), "{a:?}");
        let a = t.core.link_up(later, l, 100).unwrap();
        let (conn, job, _) = serves(&a)[0];
        assert_eq!(conn, 100);
        // Lost while asked: the job is asked elsewhere (the store).
        let a = t.core.link_down(later, l, Some(100));
        assert_eq!(store_jobs(&a), vec![job]);
        assert_eq!(t.core.link_views(later)[0].state, "down");
        let s = t.counters.snapshot();
        assert_eq!((s.links_up, s.link_failures, s.links_opened), (0, 2, 2));
        // A late answer on the closed link changes nothing.
        assert!(t
            .core
            .link_chunk(
                later,
                100,
                job,
                i.block,
                2,
                b"c".to_vec(),
                ChunkSource::Relay
            )
            .is_empty());
    }

    #[test]
    fn a_relay_that_says_it_has_no_holder_is_skipped_and_dead_relays_lose_their_links() {
        let mut t = cluster();
        let i = info(&[b"a", b"b"]);
        let r = remote(7);
        t.login(2, 2);
        t.core.relays_alive(t.now, vec![r.clone()]);
        t.core.get_chunk(t.now, 2, 1, i.block, 0, Some(i.clone()));
        let a = link_up_for(&mut t, &i, &r, 100);
        let (_, job, _) = serves(&a)[0];
        // Out of credits only: asked again later, the relay still counts.
        let a = t.core.link_failed(t.now, 100, job, CREDITS);
        assert_eq!(store_jobs(&a), vec![job]);
        let a = t.core.get_chunk(t.now, 2, 2, i.block, 1, Some(i.clone()));
        let (_, job, _) = serves(&a)[0];
        // No holder there: the relay no longer counts for the block.
        let a = t.core.link_failed(t.now, 100, job, NO_LOCAL_HOLDER);
        assert_eq!(store_jobs(&a), vec![job]);
        let a = t.core.get_chunk(t.now, 2, 3, i.block, 1, Some(i.clone()));
        assert_eq!(store_jobs(&a).len(), 1, "{a:?}");
        // The relay is no longer alive: its link is closed; no lookups
        // without other relays.
        let a = t.core.relays_alive(t.now, vec![]);
        assert!(a
            .iter()
            .any(|x| matches!(x, Action::Close { conn: 100, .. })));
        assert!(t.core.link_views(t.now).is_empty());
        let j = BlockHash([1; 32]);
        let i2 = Arc::new(ChunkInfo {
            block: j,
            ..(*i).clone()
        });
        let a = t.core.get_chunk(t.now, 2, 4, j, 0, Some(i2));
        assert_eq!(store_jobs(&a).len(), 1, "{a:?}");
    }

    #[test]
    fn link_credits_bound_the_requests_in_flight_on_a_link() {
        let mut t = cluster();
        let chunks: Vec<&[u8]> = vec![b"x"; 40];
        let i = info(&chunks);
        let r = remote(7);
        t.login(2, 2);
        t.login(3, 3);
        t.core.relays_alive(t.now, vec![r.clone()]);
        t.core.get_chunk(t.now, 2, 0, i.block, 0, Some(i.clone()));
        let mut sent = serves(&link_up_for(&mut t, &i, &r, 100)).len();
        for k in 1..limits::CHUNK_CREDITS * 2 {
            let conn = if k % 2 == 0 { 2 } else { 3 };
            let a = t
                .core
                .get_chunk(t.now, conn, u64::from(k), i.block, k, Some(i.clone()));
            sent += serves(&a).len();
        }
        assert_eq!(sent, limits::CHUNK_CREDITS as usize);
        assert_eq!(t.core.link_views(t.now)[0].in_flight, limits::CHUNK_CREDITS);
    }
}
