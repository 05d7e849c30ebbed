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
}

/// How a remote computation ended.
#[derive(Debug, Clone, PartialEq)]
pub enum ComputeOutcome {
    Answered { peer: PeerId, output: Vec<f32> },
    Failed { peer: PeerId, reason: String },
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
}

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
        }
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

    /// Logged-in peers.
    pub fn online(&self) -> usize {
        self.peers.len()
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
        self.peers.insert(
            id,
            PeerEntry {
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
        Counters::inc(&self.counters.logins);
        Counters::inc(&self.counters.peers_online);
        Ok(out)
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
                Counters::dec(&self.counters.peers_online);
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
            if let Some(p) = self.peers.get_mut(&id) {
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
        if let Some(p) = self.peers.get_mut(&id) {
            for b in remove {
                p.have.remove(b);
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
        for b in added {
            self.holders.entry(b).or_default().insert(id);
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
            out.push(self.chunk_failed(conn, req, block, index, "credits"));
            return out;
        }
        p.gets += 1;
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
            },
        );
        self.dispatch(now, job, &mut out);
        out
    }

    /// Send job to the best holder not tried yet with a serve credit free;
    /// if every such holder is at its credits, wait for one (until the chunk
    /// timeout); with no holder left, the store.
    fn dispatch(&mut self, now: Instant, job: u64, out: &mut Vec<Action>) {
        let Some(j) = self.jobs.get(&job) else { return };
        let block = j.info.block;
        let holder_tries = j.tried.len().saturating_sub(1);
        let mut best: Option<(f64, PeerId)> = None;
        let mut busy = false;
        if holder_tries < self.cfg.max_holder_tries {
            for h in self.holders.get(&block).into_iter().flatten() {
                if j.tried.contains(h) || self.banned_until(h, now).is_some() {
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
        }
        let (index, info, parked) = (j.index, j.info.clone(), j.parked);
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
                out.push(Action::ReadStore { job, info, index });
            }
        }
    }

    /// A serve credit of `h` came free: the oldest job parked on a block
    /// it holds goes on.
    fn holder_freed(&mut self, now: Instant, h: PeerId, out: &mut Vec<Action>) {
        let Some(have) = self.peers.get(&h).map(|p| &p.have) else {
            return;
        };
        let block = self.parked.keys().find(|b| have.contains(b)).copied();
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
            if let Some(id) = self.conns.get(&j.requester) {
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
            let (block, index) = (j.info.block, j.index);
            tracing::warn!(peer = %hexid(&h), %block, index, "peer served a corrupt chunk");
            Counters::inc(&self.counters.bad_chunks);
            self.counters.peer(&h, |c| c.bad_chunks += 1);
            self.counters.usage(|u| u.record_bad_chunk(&h, &block));
            if let Some(p) = self.peers.get_mut(&h) {
                p.score = p.score.saturating_sub(SCORE_PENALTY);
            }
            let to_ban = self.cfg.bad_chunks_to_ban.max(1);
            let r = self.rep(&h, now);
            r.bad_chunks += 1;
            if r.bad_chunks >= to_ban {
                self.ban(now, h, &mut out);
            }
            self.dispatch(now, job, &mut out);
        }
        self.holder_freed(now, h, &mut out);
        out
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
                p.have.remove(&block);
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
                self.counters.peer(&h, |c| c.chunk_timeouts += 1);
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
}
