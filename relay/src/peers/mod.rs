//! The relay as coordinator: `/ws` peers (login, registry, chunk dispatch,
//! remote expert computation) and the seed's `/p2p/*` registry: the
//! feature's runtime, which [`crate::server::AppState`] holds. Its handlers
//! (`GET /ws` with one actor per connection, `/p2p/*`) are
//! [`crate::peer_api`].
//!
//! * [`chunks`]: the sans-IO chunk-dispatch core (registry, chunk dispatch
//!   with the relay's own hash check, bans, compute bookkeeping): events and
//!   the time in, [`Action`]s out, what to count among them
//!   ([`Action::Usage`], counted by [`Counters::record`]).
//! * [`stats`]: the counters ([`Peers::stats`]).
//! * [`cluster`]: what the peer layer needs of the cluster (several relays
//!   on one database): the [`Cluster`] handle (identity, live relays, the
//!   presence and lookup queues) and the [`ClusterIo`] port. On a shared
//!   database (a handle given to [`Peers::new`]) the core's presence changes,
//!   lookups and links are carried out through it by `crate::cluster`: a
//!   request no local peer can serve is forwarded to another relay whose
//!   peer holds the block.
//! * [`nodes`]: the `/p2p/register` registry.
//!
//! Layer: feature runtime, above [`crate::state`] (which imports no feature);
//! [`crate::server::AppState`] holds a [`Peers`] and wires it to the core as
//! its [`crate::state::BlockListener`].
//! Nothing here imports `crate::state`, a handler module (`peer_api`,
//! `cluster`, ...) or `crate::server`.
//! May import: the foundation (`store`, `usage`, `compute`, `limits`,
//! `metrics`, ...) and `chain_index`.
//!
//! [`Peers`] ties them together: the core behind a mutex (never held across
//! an await), each connection's bounded outbound queue, the connection caps,
//! a timer task for chunk deadlines, and [`ExpertCompute`] for `/chat/distributed`.

pub mod chunks;
pub mod cluster;
pub mod nodes;
pub mod stats;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch, Notify};
use web_node::chain::{Block, BlockHash};
use web_node::net::peer::{codes, limits, FromRelay, PeerId};

use crate::chain_index::ChainState;
use crate::compute::{ComputeAnswer, ComputeFailure, ComputeFuture, ExpertCompute};
use crate::store::RelayStore;
use crate::usage::Usage;

pub use cluster::{Cluster, ClusterIo};

pub use chunks::{
    Action, ChunkConfig, ChunkInfo, ComputeOutcome, ConnId, ConnKind, Core, LinkView, PeerView,
    PresenceChange, RemoteRelay, UsageEvent,
};
pub use stats::{Counters, PeerCounters, PeerStats};

/// How often the timer task checks chunk deadlines and silent peers.
pub const TIMER_TICK: Duration = Duration::from_millis(50);
/// Chunk-hash entries kept in the chunk-list cache (32 bytes each: 32 MiB);
/// past it the cache is emptied and refilled from the store.
pub const CHUNK_CACHE_HASHES: usize = 1 << 20;
/// How long closing a connection may spend writing its last error and
/// close frame.
pub const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// The WebSocket read buffer of one connection (a frame larger than it is
/// read into a buffer of its own size, up to the message limit): small, so
/// an idle peer costs little memory.
pub const READ_BUFFER: usize = 8 * 1024;
/// Protocol version sent in `Challenge`.
pub const PROTOCOL_VERSION: u16 = 1;

/// Options of the peer layer (defaults: [`limits`] and the chunk core's
/// [`ChunkConfig`]); changed with the setters ([`PeerOptions::with`],
/// [`PeerOptions::chunk_timeout`] ...).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PeerOptions {
    /// WebSocket connections from one IP address.
    pub max_conns_per_ip: usize,
    /// WebSocket connections in total.
    pub max_conns: usize,
    /// Time from upgrade to a valid `Login`.
    pub login_timeout: Duration,
    /// WebSocket ping interval.
    pub ping_interval: Duration,
    /// A connection silent this long (no frame, no pong) is dropped.
    pub idle_timeout: Duration,
    /// One frame's write may take this long; then the peer is dropped.
    pub write_timeout: Duration,
    /// Time a holder has to answer `ServeChunk`.
    pub chunk_timeout: Duration,
    /// Time a compute peer has to answer `Compute`.
    pub compute_timeout: Duration,
    /// Messages per second per connection, sustained (token bucket).
    pub msgs_per_sec: u32,
    /// Messages per connection in a burst (the bucket's size).
    pub msgs_burst: u32,
    /// Bad chunks that get a peer banned.
    pub bad_chunks_to_ban: u32,
    /// The first ban; each further ban doubles it.
    pub ban_base: Duration,
    /// The first compute backoff of a failing peer (doubling).
    pub compute_backoff_base: Duration,
    /// Holders asked for one chunk before the relay's store answers.
    pub max_holder_tries: usize,
    /// STUN/TURN server URLs handed to peers for direct connections
    /// (`relay serve --ice-server`; none by default, so peers contact no
    /// server outside the operator's list).
    pub ice_servers: Vec<String>,
}

impl Default for PeerOptions {
    fn default() -> Self {
        let r = ChunkConfig::default();
        Self {
            max_conns_per_ip: limits::CONNS_PER_IP,
            max_conns: limits::MAX_CONNS,
            login_timeout: limits::LOGIN_TIMEOUT,
            ping_interval: limits::PING_INTERVAL,
            idle_timeout: limits::IDLE_TIMEOUT,
            write_timeout: limits::WRITE_TIMEOUT,
            chunk_timeout: limits::CHUNK_TIMEOUT,
            compute_timeout: limits::COMPUTE_TIMEOUT,
            msgs_per_sec: limits::PEER_MSGS_PER_SEC,
            msgs_burst: limits::PEER_MSGS_BURST,
            bad_chunks_to_ban: r.bad_chunks_to_ban,
            ban_base: r.ban_base,
            compute_backoff_base: r.compute_backoff_base,
            max_holder_tries: r.max_holder_tries,
            ice_servers: Vec::new(),
        }
    }
}

crate::limits::option_setters!(PeerOptions {
    max_conns_per_ip: usize,
    max_conns: usize,
    login_timeout: Duration,
    ping_interval: Duration,
    idle_timeout: Duration,
    write_timeout: Duration,
    chunk_timeout: Duration,
    compute_timeout: Duration,
    msgs_per_sec: u32,
    msgs_burst: u32,
    bad_chunks_to_ban: u32,
    ban_base: Duration,
    compute_backoff_base: Duration,
    max_holder_tries: usize,
    ice_servers: Vec<String>,
});

impl PeerOptions {
    fn chunk_config(&self) -> ChunkConfig {
        ChunkConfig {
            chunk_timeout: self.chunk_timeout,
            max_holder_tries: self.max_holder_tries,
            bad_chunks_to_ban: self.bad_chunks_to_ban,
            ban_base: self.ban_base,
            compute_backoff_base: self.compute_backoff_base,
            // The actor drops a silent peer first; the core's sweep is a backstop.
            idle_timeout: self.idle_timeout.saturating_mul(2),
            ..ChunkConfig::default()
        }
    }
}

/// Tells a connection's actor to close (with an error for the peer).
#[derive(Debug, Default)]
pub(crate) struct Kill {
    pub(crate) notify: Notify,
    reason: Mutex<Option<(&'static str, String)>>,
}

impl Kill {
    fn fire(&self, code: &'static str, message: String) {
        if let Ok(mut r) = self.reason.lock() {
            r.get_or_insert((code, message));
        }
        self.notify.notify_one();
    }

    pub(crate) fn take(&self) -> Option<(&'static str, String)> {
        self.reason.lock().ok().and_then(|mut r| r.take())
    }
}

#[derive(Debug, Clone)]
pub(crate) struct ConnHandle {
    pub(crate) tx: mpsc::Sender<FromRelay>,
    pub(crate) kill: Arc<Kill>,
    /// This relay's link to another relay (gets no `BlockAdded`).
    pub(crate) link: bool,
}

/// A link's place in the registry while its connection is up
/// ([`Peers::link_connected`]): its id, the messages the core forwards to it
/// (`ServeChunk`, to send on as `GetChunk`), its kill switch.
pub(crate) struct LinkSession {
    pub conn: ConnId,
    pub rx: mpsc::Receiver<FromRelay>,
    kill: Arc<Kill>,
}

impl LinkSession {
    /// Its kill switch, to wait on beside `rx`.
    pub fn kill_signal(&self) -> KillSignal {
        KillSignal(self.kill.clone())
    }
}

/// See [`LinkSession::kill_signal`].
pub(crate) struct KillSignal(Arc<Kill>);

impl KillSignal {
    /// Resolves when the registry closes the link (banned, relay gone,
    /// queue full), with why.
    pub async fn fired(&self) -> String {
        self.0.notify.notified().await;
        self.0
            .take()
            .map(|(c, m)| format!("{c}: {m}"))
            .unwrap_or_else(|| "closed by this relay".into())
    }
}

#[derive(Debug, Default)]
struct ConnTable {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// Holds one WebSocket connection's place under the caps.
#[derive(Debug)]
pub struct ConnGuard {
    peers: Weak<Peers>,
    ip: IpAddr,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if let Some(p) = self.peers.upgrade() {
            if let Ok(mut t) = p.conns.lock() {
                t.total = t.total.saturating_sub(1);
                if let Some(n) = t.per_ip.get_mut(&self.ip) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        t.per_ip.remove(&self.ip);
                    }
                }
            }
            Counters::dec(&p.counters.connections_open);
            crate::metrics::ws_connection(false);
        }
    }
}

#[derive(Default)]
struct ChunkCache {
    map: HashMap<BlockHash, Arc<ChunkInfo>>,
    hashes: usize,
}

/// The peer registry and everything dispatched through it.
pub struct Peers {
    pub opts: PeerOptions,
    pub(crate) counters: Arc<Counters>,
    core: Mutex<Core>,
    pub(crate) handles: Mutex<HashMap<ConnId, ConnHandle>>,
    waiters: Mutex<HashMap<u64, oneshot::Sender<ComputeOutcome>>>,
    conns: Mutex<ConnTable>,
    cache: Mutex<ChunkCache>,
    /// Where chunks no peer serves are read from.
    store: Arc<dyn RelayStore>,
    /// The relay's chain index (the same lock as [`crate::CoreState::chain`]):
    /// chunk lists of the blocks it holds.
    chain: Arc<tokio::sync::RwLock<ChainState>>,
    next_conn: AtomicU64,
    pub(crate) shutdown: watch::Sender<bool>,
    /// Started with the first connection (inside the runtime).
    timer: OnceLock<()>,
    /// This registry's own `Arc` (from [`Arc::new_cyclic`]), for the tasks
    /// it spawns.
    this: Weak<Peers>,
    /// `POST /p2p/register` entries.
    pub(crate) registry: nodes::Registry,
    /// Several relays on one database: presence, lookups, links (None: a
    /// relay alone, or on a shared database without an advertised `/ws`
    /// URL).
    cluster: Option<Arc<Cluster>>,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers")
            .field("opts", &self.opts)
            .field("stats", &self.counters.snapshot())
            .finish_non_exhaustive()
    }
}

impl Peers {
    /// The registry over the relay's store and chain index; verified work
    /// is also recorded in `usage` (for rewards). With `cluster` it takes
    /// part in a cluster of relays on one database (the handle from
    /// `crate::cluster::presence::configure`, built once the listener is
    /// bound: it carries the advertised `/ws` URL).
    pub fn new(
        opts: PeerOptions,
        store: Arc<dyn RelayStore>,
        chain: Arc<tokio::sync::RwLock<ChainState>>,
        usage: Arc<Usage>,
        cluster: Option<Arc<Cluster>>,
    ) -> Arc<Self> {
        let mut core = Core::new(opts.chunk_config());
        if cluster.is_some() {
            core.enable_cluster();
        }
        Arc::new_cyclic(|this| Self {
            core: Mutex::new(core),
            counters: Arc::new(Counters::with_usage(usage)),
            handles: Mutex::new(HashMap::new()),
            waiters: Mutex::new(HashMap::new()),
            conns: Mutex::new(ConnTable::default()),
            cache: Mutex::new(ChunkCache::default()),
            store,
            chain,
            next_conn: AtomicU64::new(1),
            shutdown: watch::channel(false).0,
            timer: OnceLock::new(),
            this: this.clone(),
            registry: nodes::Registry::default(),
            cluster,
            opts,
        })
    }

    /// The cluster side, if this relay is on a shared database.
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.as_ref()
    }

    /// Is this login another relay of the cluster ([`Cluster::login_kind`]),
    /// or a peer?
    pub async fn login_kind(&self, key: &PeerId, agent: &str) -> ConnKind {
        match self.cluster.as_ref() {
            Some(c) => c.login_kind(key, agent).await,
            None => ConnKind::Peer,
        }
    }

    /// This registry's own `Arc`.
    fn me(&self) -> Option<Arc<Peers>> {
        self.this.upgrade()
    }

    /// Links to other relays and their state.
    pub fn links(&self) -> Vec<LinkView> {
        self.core().link_views(Instant::now())
    }

    /// The other live relays (from the heartbeat): links to relays not
    /// listed close.
    pub fn relays_alive(&self, relays: Vec<RemoteRelay>) {
        self.drive(|core| core.relays_alive(Instant::now(), relays));
    }

    /// The answer of a presence lookup.
    pub fn remote_holders(&self, block: BlockHash, relays: Vec<RemoteRelay>) {
        self.drive(|core| core.remote_holders(Instant::now(), block, relays));
    }

    /// What this relay's peers hold, per peer.
    pub fn presence_snapshot(&self) -> Vec<(PeerId, Vec<BlockHash>)> {
        self.core().presence_snapshot()
    }

    /// The shutdown signal (true once [`Peers::shutdown`] ran).
    pub(crate) fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Link `link` logged in to its relay: register it (None: not wanted
    /// any more, close it).
    pub(crate) fn link_connected(&self, link: PeerId) -> Option<LinkSession> {
        let conn = self.next_conn();
        let (tx, rx) = mpsc::channel(limits::OUTBOUND_QUEUE);
        let kill = Arc::new(Kill::default());
        if let Ok(mut h) = self.handles.lock() {
            h.insert(
                conn,
                ConnHandle {
                    tx,
                    kill: kill.clone(),
                    link: true,
                },
            );
        }
        let up = {
            let mut core = self.core();
            core.link_up(Instant::now(), link, conn)
                .map(|acts| self.count(acts))
        };
        match up {
            Some(acts) => {
                self.apply(acts);
                Some(LinkSession { conn, rx, kill })
            }
            None => {
                if let Ok(mut h) = self.handles.lock() {
                    h.remove(&conn);
                }
                None
            }
        }
    }

    /// A message from the relay at the other end of link `conn`.
    pub(crate) fn link_message(&self, conn: ConnId, m: FromRelay) {
        let now = Instant::now();
        self.drive(|core| match m {
            FromRelay::ChunkData {
                req,
                block,
                index,
                data,
                from,
            } => core.link_chunk(now, conn, req, block, index, data, from),
            FromRelay::ChunkFailed { req, reason, .. } => core.link_failed(now, conn, req, &reason),
            _ => {
                core.heartbeat(now, conn);
                Vec::new()
            }
        });
    }

    /// Any frame on link `conn` (ping, pong).
    pub(crate) fn link_heartbeat(&self, conn: ConnId) {
        self.core().heartbeat(Instant::now(), conn);
    }

    /// Link `link` failed to open (`conn` None) or its connection ended.
    pub(crate) fn link_closed(&self, link: PeerId, conn: Option<ConnId>) {
        if let Some(c) = conn {
            if let Ok(mut h) = self.handles.lock() {
                h.remove(&c);
            }
        }
        self.drive(|core| core.link_down(Instant::now(), link, conn));
    }

    /// A copy of every counter.
    pub fn stats(&self) -> PeerStats {
        self.counters.snapshot()
    }

    /// The live counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    pub(crate) fn core(&self) -> MutexGuard<'_, Core> {
        // A panic while holding the lock would be a bug; keep serving.
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Call into the core (the caller reads the clock and passes it): what
    /// it reports to count is counted at once, under the core's lock and in
    /// the order it happened; its other actions are returned, to execute.
    pub(crate) fn call(&self, f: impl FnOnce(&mut Core) -> Vec<Action>) -> Vec<Action> {
        let mut core = self.core();
        self.count(f(&mut core))
    }

    /// [`Peers::call`], then execute the actions.
    pub(crate) fn drive(&self, f: impl FnOnce(&mut Core) -> Vec<Action>) {
        let acts = self.call(f);
        self.apply(acts);
    }

    /// Count the [`Action::Usage`] among `actions` ([`Counters::record`]);
    /// the others are left to execute.
    pub(crate) fn count(&self, actions: Vec<Action>) -> Vec<Action> {
        actions
            .into_iter()
            .filter(|a| match a {
                Action::Usage(e) => {
                    self.counters.record(e);
                    false
                }
                _ => true,
            })
            .collect()
    }

    /// Logged-in peers, sorted by id.
    pub fn views(&self) -> Vec<PeerView> {
        self.core().views(Instant::now())
    }

    /// Logged-in peers announcing `block`.
    pub fn holders_of(&self, block: &BlockHash) -> Vec<PeerId> {
        self.core().holders_of(block)
    }

    /// Until when a peer is banned (None: not banned).
    pub fn banned_for(&self, id: &PeerId) -> Option<Duration> {
        let now = Instant::now();
        self.core()
            .banned_until(id, now)
            .map(|u| u.saturating_duration_since(now))
    }

    /// Close a logged-in peer's connection (with `Error{code, message}`).
    pub fn disconnect(&self, id: &PeerId, code: &'static str, message: &str) {
        let conn = self.core().conn_of(id);
        if let Some(conn) = conn {
            self.kill(conn, code, message.to_string());
        }
    }

    /// Close every connection (the relay is shutting down) and refuse new ones.
    pub fn shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    fn is_shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Wait (up to `grace`) until every WebSocket connection has closed
    /// and, on a shared database, this relay has removed itself from it.
    pub async fn drain(&self, grace: Duration) {
        let end = tokio::time::Instant::now() + grace;
        while self.conns.lock().map(|t| t.total).unwrap_or(0) > 0
            && tokio::time::Instant::now() < end
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if let Some(c) = self.cluster.as_ref() {
            let left = end.saturating_duration_since(tokio::time::Instant::now());
            c.wait_left(left).await;
        }
    }

    /// Take a place under the connection caps (before the upgrade).
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnGuard, String> {
        if self.is_shutting_down() {
            crate::metrics::refused(crate::metrics::Limit::PeerShutdown);
            return Err("the relay is shutting down".into());
        }
        let mut t = self
            .conns
            .lock()
            .map_err(|_| "connection table unavailable".to_string())?;
        if t.total >= self.opts.max_conns {
            crate::metrics::refused(crate::metrics::Limit::PeerTotal);
            return Err(format!(
                "the relay holds its maximum of {} peer connections; retry later",
                self.opts.max_conns
            ));
        }
        let n = t.per_ip.entry(ip).or_insert(0);
        if *n >= self.opts.max_conns_per_ip {
            crate::metrics::refused(crate::metrics::Limit::PeerPerIp);
            return Err(format!(
                "too many peer connections from {ip} (at most {}); retry later",
                self.opts.max_conns_per_ip
            ));
        }
        *n += 1;
        t.total += 1;
        drop(t);
        Counters::inc(&self.counters.connections_open);
        crate::metrics::ws_connection(true);
        self.ensure_timer();
        Ok(ConnGuard {
            peers: Arc::downgrade(self),
            ip,
        })
    }

    fn ensure_timer(self: &Arc<Self>) {
        self.timer.get_or_init(|| {
            let weak = Arc::downgrade(self);
            let mut stop = self.shutdown.subscribe();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(TIMER_TICK);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        r = stop.changed() => if r.is_err() || *stop.borrow() { break },
                    }
                    let Some(p) = weak.upgrade() else { break };
                    p.drive(|core| core.handle_timeout(Instant::now()));
                }
            });
        });
    }

    pub(crate) fn next_conn(&self) -> ConnId {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// Execute the core's actions (never blocks: queues are `try_send`).
    pub(crate) fn apply(&self, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Send { conn, msg } => {
                    self.send(conn, msg);
                }
                Action::Close {
                    conn,
                    code,
                    message,
                } => self.kill(conn, code, message),
                Action::ReadStore { job, info, index } => self.read_store(job, info, index),
                Action::ComputeDone { req, outcome } => {
                    let w = self.waiters.lock().ok().and_then(|mut w| w.remove(&req));
                    if let Some(w) = w {
                        let _ = w.send(outcome);
                    }
                }
                Action::Presence(change) => {
                    if let Some(c) = self.cluster.as_ref() {
                        c.presence(change);
                    }
                }
                Action::Lookup { block } => {
                    let asked = self.cluster.as_ref().is_some_and(|c| c.lookup(block));
                    if !asked {
                        self.remote_holders(block, Vec::new());
                    }
                }
                Action::OpenLink { link, relay } => match (self.cluster.as_ref(), self.me()) {
                    (Some(c), Some(me)) => c.open_link(me, link, relay),
                    _ => self.link_closed(link, None),
                },
                // Counted by `drive` already, unless it came another way.
                Action::Usage(e) => self.counters.record(&e),
            }
        }
    }

    fn handle(&self, conn: ConnId) -> Option<ConnHandle> {
        self.handles.lock().ok()?.get(&conn).cloned()
    }

    /// Queue a message; a full queue means the peer does not read: drop it.
    fn send(&self, conn: ConnId, msg: FromRelay) -> bool {
        let Some(h) = self.handle(conn) else {
            return false;
        };
        match h.tx.try_send(msg) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                Counters::inc(&self.counters.dropped_slow);
                h.kill.fire(
                    codes::UNAVAILABLE,
                    format!(
                        "dropped: {} messages queued and not read",
                        limits::OUTBOUND_QUEUE
                    ),
                );
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    fn kill(&self, conn: ConnId, code: &'static str, message: String) {
        if let Some(h) = self.handle(conn) {
            h.kill.fire(code, message);
        }
    }

    fn read_store(&self, job: u64, info: Arc<ChunkInfo>, index: u32) {
        let Some(peers) = self.me() else {
            self.drive(|core| core.store_read(job, Err("the relay is shutting down".into())));
            return;
        };
        let store = self.store.clone();
        tokio::spawn(async move {
            let r = match info.range(index) {
                Some(range) => {
                    let block = info.block;
                    tokio::task::spawn_blocking(move || {
                        store.read_payload(&block, range.start, range.end - range.start)
                    })
                    .await
                    .map_err(|e| format!("store task failed: {e}"))
                    .and_then(|r| r.map_err(|e| format!("the relay's store: {e}")))
                }
                None => Err(format!("index {index} out of range")),
            };
            peers.drive(|core| core.store_read(job, r));
        });
    }

    /// The chunk list of a block the relay holds (header in the chain and
    /// payload in the store, not quarantined); cached.
    pub(crate) async fn chunk_info(&self, block: BlockHash) -> Option<Arc<ChunkInfo>> {
        if let Some(i) = self.cache.lock().ok()?.map.get(&block) {
            return Some(i.clone());
        }
        let (len, cs) = {
            let c = self.chain.read().await;
            let e = c.dag.get(&block)?;
            (e.header.payload_len, e.header.chunk_size)
        };
        let store = self.store.clone();
        let list = tokio::task::spawn_blocking(move || store.chunk_list(&block))
            .await
            .ok()?
            .ok()?;
        if list.len() as u64 != web_node::chain::chunk_count(len, cs) || cs == 0 {
            return None;
        }
        let info = Arc::new(ChunkInfo {
            block,
            chunks: list.into(),
            chunk_size: cs,
            payload_len: len,
        });
        if let Ok(mut c) = self.cache.lock() {
            if c.hashes + info.chunks.len() > CHUNK_CACHE_HASHES {
                c.map.clear();
                c.hashes = 0;
            }
            c.hashes += info.chunks.len();
            c.map.insert(block, info.clone());
        }
        Some(info)
    }

    /// The relay accepted a block: tell every logged-in peer (never blocks;
    /// a peer whose queue is full is dropped as a non-reader).
    pub fn block_added(&self, block: &Block) {
        let conns: Vec<ConnId> = self
            .handles
            .lock()
            .map(|h| h.iter().filter(|(_, c)| !c.link).map(|(k, _)| *k).collect())
            .unwrap_or_default();
        for conn in conns {
            let msg = FromRelay::BlockAdded {
                hash: block.hash,
                chain: block.header.chain,
                name: block.header.name.clone(),
            };
            if self.send(conn, msg) {
                Counters::inc(&self.counters.block_added_sent);
            }
        }
    }

    /// Logged-in peers serving computations.
    pub fn compute_peer_count(&self) -> usize {
        self.core().compute_peers()
    }

    async fn compute_impl(
        &self,
        block: BlockHash,
        rows: u32,
        input: Vec<f32>,
    ) -> Result<ComputeAnswer, ComputeFailure> {
        let mut failed: Vec<(PeerId, String)> = Vec::new();
        // Frame budget: 4 bytes per float plus the envelope.
        if input.len().saturating_mul(4) + 1024 > limits::MAX_MESSAGE {
            return Err(ComputeFailure {
                message: format!(
                    "{} floats do not fit one message of {} bytes",
                    input.len(),
                    limits::MAX_MESSAGE
                ),
                failed,
            });
        }
        loop {
            let tried: Vec<PeerId> = failed.iter().map(|f| f.0).collect();
            let started = {
                let mut core = self.core();
                core.compute_start(Instant::now(), block, rows, input.clone(), &tried)
                    .map(|(req, peer, acts)| (req, peer, self.count(acts)))
            };
            let Some((req, peer, send)) = started else {
                let message = if failed.is_empty() {
                    format!("no logged-in peer serves computations for block {block}")
                } else {
                    format!(
                        "no peer answered the computation for block {block} ({} tried)",
                        failed.len()
                    )
                };
                return Err(ComputeFailure { message, failed });
            };
            let (tx, rx) = oneshot::channel();
            if let Ok(mut w) = self.waiters.lock() {
                w.insert(req, tx);
            }
            let queued = send.into_iter().any(|a| match a {
                Action::Send { conn, msg } => self.send(conn, msg),
                _ => false,
            });
            if !queued {
                self.drive(|core| {
                    core.compute_abandon(Instant::now(), req, "queue full".into(), false)
                });
            }
            let outcome = match tokio::time::timeout(self.opts.compute_timeout, rx).await {
                Ok(Ok(o)) => o,
                Ok(Err(_)) => ComputeOutcome::Failed {
                    peer,
                    reason: "the request was dropped".into(),
                },
                Err(_) => {
                    if let Ok(mut w) = self.waiters.lock() {
                        w.remove(&req);
                    }
                    let secs = self.opts.compute_timeout.as_secs_f64();
                    self.drive(|core| {
                        let why = format!("no answer within {secs} s");
                        core.compute_abandon(Instant::now(), req, why, true)
                    });
                    ComputeOutcome::Failed {
                        peer,
                        reason: format!("no answer within {secs} s"),
                    }
                }
            };
            match outcome {
                ComputeOutcome::Answered { peer, output } => {
                    // Its usage was recorded when the core checked it.
                    return Ok(ComputeAnswer {
                        output,
                        peer,
                        failed,
                    });
                }
                ComputeOutcome::Failed { peer, reason } => {
                    tracing::info!(peer = %hex::encode(&peer[..8]), %block, %reason, "remote computation failed; trying the next holder");
                    failed.push((peer, reason));
                }
            }
        }
    }
}

/// Expert computations on peers that hold the expert block (see
/// [`Core::compute_start`] for the choice), each within
/// [`PeerOptions::compute_timeout`], failing over to the next holder.
impl ExpertCompute for Peers {
    fn compute(&self, block: BlockHash, rows: u32, input: Vec<f32>) -> ComputeFuture<'_> {
        Box::pin(self.compute_impl(block, rows, input))
    }

    fn compute_peers(&self) -> usize {
        self.compute_peer_count()
    }
}
