//! The peer state machine: one node on the relay's `/ws` network, sans-IO.
//!
//! [`PeerNode`] owns no socket, no clock and no task (as str0m and
//! quinn-proto do it): the driver feeds it decoded [`FromRelay`] messages and
//! the time, and takes out [`ToRelay`] messages to send, [`NodeEvent`]s to act
//! on, and the next deadline. The same code runs under tokio (`aiblock peer`),
//! in the browser (wasm32: time is a plain millisecond count) and in tests.
//!
//! ```text
//! driver                          PeerNode
//!   connected(now)            ──►  waits for Challenge
//!   handle(Challenge, now)    ──►  Login                      (poll_transmit)
//!   handle(Welcome, now)      ──►  Status, Have{held}, GetChunk…
//!   fetch(block, list, cfg)   ──►  GetChunk within the relay's credits
//!   handle(ChunkData, now)    ──►  chunk checked; BlockComplete (poll_event), Have
//!   handle(ServeChunk, now)   ──►  Chunk{exact bytes} | NoChunk
//!   handle(Compute, now)      ──►  NodeEvent::Compute; compute_done(..) ──► ComputeResult
//!   poll_timeout() / handle_timeout(now): chunk timeouts, retries, heartbeats
//!   disconnected(now)         ──►  requests in flight go back to the queue
//! ```
//!
//! Nothing from the relay is trusted: every chunk is checked against the
//! block's chunk list (itself checked against the header's payload root), a
//! bad chunk is dropped, counted against its source and asked again, and a
//! whole payload passes every content rule before it is held and announced.

mod direct;
#[cfg(test)]
mod direct_tests;
mod fetch;
#[cfg(test)]
mod tests;

pub use direct::RtcAction;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use ed25519_dalek::SigningKey;

use crate::chain::{chunk_count, limits as chain_limits, Block, BlockHash, ChainError, ChainId};
use crate::net::peer::{
    limits, login, truncate_text, ChunkSource, FromRelay, PeerId, ToRelay, WireLimits,
};
use crate::spec::Config;

use fetch::{ChunkOutcome, Fetches};

/// Milliseconds since the driver started (any fixed origin): the only clock
/// the state machine knows, so it runs the same natively and in wasm.
pub type Millis = u64;

/// How long one chunk request may stay unanswered before it is asked again:
/// the relay itself gives each holder [`limits::CHUNK_TIMEOUT`] and then
/// tries the next one and its store, so allow it three rounds.
pub const CHUNK_TIMEOUT_MS: Millis = 3 * limits::CHUNK_TIMEOUT.as_millis() as Millis;
/// Attempts per chunk (failures, timeouts and bad chunks together) before
/// the whole fetch is given up and reported ([`NodeEvent::FetchFailed`]).
pub const MAX_CHUNK_ATTEMPTS: u32 = 6;
/// Delay before a failed chunk is asked again; doubles with each attempt
/// up to [`MAX_RETRY_DELAY_MS`].
pub const RETRY_DELAY_MS: Millis = 200;
pub const MAX_RETRY_DELAY_MS: Millis = 5_000;
/// A `Status` heartbeat this often (the relay expires peers silent for
/// [`limits::IDLE_TIMEOUT`]; WebSocket pings keep the socket itself alive).
pub const STATUS_INTERVAL_MS: Millis = 15_000;
/// Compute requests accepted at once; the relay keeps at most
/// [`limits::COMPUTE_CREDITS`] outstanding, so more is a relay bug and is
/// answered `ComputeFailed` (busy) at once instead of queueing.
pub const MAX_PENDING_COMPUTE: usize = 2 * limits::COMPUTE_CREDITS as usize;
/// Agent string sent in `Login`.
pub const DEFAULT_AGENT: &str = concat!("aiblock-peer/", env!("CARGO_PKG_VERSION"));

/// What the state machine is told by its driver.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Sent in `Login` (at most [`limits::MAX_TEXT`] bytes).
    pub agent: String,
    /// Whether this node runs expert computations for the relay.
    pub serve_compute: bool,
    /// Chunk requests outstanding at most (the relay's credits from
    /// `Welcome` bound it too; the smaller wins).
    pub max_in_flight: u32,
    /// See [`CHUNK_TIMEOUT_MS`].
    pub chunk_timeout: Millis,
    /// See [`MAX_CHUNK_ATTEMPTS`].
    pub max_attempts: u32,
    /// Fetch directly from peers and serve them over WebRTC data channels
    /// (the browser); the driver carries out [`NodeEvent::Rtc`].
    pub direct: bool,
    /// Test switch: flip a bit of every chunk served directly (a lying
    /// peer, to show that it is caught and banned).
    pub corrupt_direct: bool,
    /// Test switch: after serving this many chunks directly, close every
    /// direct connection this node serves and refuse further wants (a
    /// holder that goes away mid-transfer).
    pub test_direct_serve_max: Option<u64>,
    /// Test switch: accept introductions but never answer an offer (a
    /// holder whose channel never opens).
    pub test_direct_mute: bool,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            agent: DEFAULT_AGENT.to_string(),
            serve_compute: false,
            max_in_flight: limits::CHUNK_CREDITS,
            chunk_timeout: CHUNK_TIMEOUT_MS,
            max_attempts: MAX_CHUNK_ATTEMPTS,
            direct: false,
            corrupt_direct: false,
            test_direct_serve_max: None,
            test_direct_mute: false,
        }
    }
}

/// Why the node refused a call of its driver.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NodeError {
    #[error("block {block}: bad chunk list: {source}")]
    ChunkList {
        block: BlockHash,
        source: ChainError,
    },
    #[error("block {block}: chunk size {chunk_size} is outside the chain's limits")]
    ChunkSize { block: BlockHash, chunk_size: u32 },
    #[error("block {block}: chain-B payloads need the model config to be verified")]
    NoConfig { block: BlockHash },
}

/// Where chunks came from, for counters (an ordered twin of [`ChunkSource`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    Relay,
    Peer(PeerId),
    /// A source this version does not know.
    Other,
}

impl From<&ChunkSource> for Source {
    fn from(s: &ChunkSource) -> Self {
        match s {
            ChunkSource::Relay => Self::Relay,
            ChunkSource::Peer(p) => Self::Peer(*p),
            #[allow(unreachable_patterns)]
            _ => Self::Other,
        }
    }
}

/// Counters of one node since it started (across reconnections).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeStats {
    /// Verified chunk bytes received, per source.
    pub bytes_received: BTreeMap<Source, u64>,
    /// Verified chunks received, per source.
    pub chunks_received: BTreeMap<Source, u64>,
    /// Chunks that failed their hash check (or answered another request), per source.
    pub bad_chunks: BTreeMap<Source, u64>,
    /// Chunk bytes and chunks this node served (`Chunk` answers sent).
    pub bytes_served: u64,
    pub chunks_served: u64,
    /// `ServeChunk` requests answered `NoChunk`.
    pub chunks_refused: u64,
    /// Expert computations answered with a result, and refused or failed.
    pub computes_served: u64,
    pub computes_failed: u64,
    /// Payloads fetched and verified, and fetches given up.
    pub blocks_fetched: u64,
    pub fetches_failed: u64,
    /// Messages ignored: answers to unknown (or stale) request ids, and
    /// messages that make no sense in the connection's state.
    pub ignored: u64,
    /// Logins completed (1 + reconnections).
    pub logins: u64,
    /// Verified chunk bytes received directly (WebRTC), also counted per
    /// source in `bytes_received`.
    pub direct_bytes_received: u64,
    /// Chunk bytes served directly.
    pub direct_bytes_served: u64,
    /// Direct fetches that handed chunks back to relay forwarding.
    pub direct_fallbacks: u64,
    /// Proofs of lying sent to the relay.
    pub direct_proofs_sent: u64,
    /// Bytes the relay credited from this node's receipts.
    pub direct_receipts_credited: u64,
}

impl NodeStats {
    pub fn total_received(&self) -> u64 {
        self.bytes_received.values().sum()
    }
    pub fn total_bad(&self) -> u64 {
        self.bad_chunks.values().sum()
    }
}

/// A compute request handed to the driver; pass it back to
/// [`PeerNode::compute_done`]. It names its connection, so an answer that
/// finishes after a reconnection is dropped rather than sent under a request
/// id the new connection may reuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ComputeReq {
    pub conn: u64,
    pub id: u64,
}

/// What the driver must act on.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum NodeEvent {
    /// The relay accepted the login.
    LoggedIn { peer: PeerId, limits: WireLimits },
    /// The relay sent an error (after a fatal one it closes the connection).
    RelayError { code: String, message: String },
    /// One more chunk of a fetch verified.
    Progress {
        hash: BlockHash,
        received: u64,
        of: u64,
    },
    /// A chunk failed its check; it is asked again.
    BadChunk {
        hash: BlockHash,
        index: u32,
        from: Source,
    },
    /// The whole payload arrived and passed every rule; the node now holds
    /// it, serves it and has announced it.
    BlockComplete { hash: BlockHash, payload: Arc<[u8]> },
    /// A fetch was given up (a chunk failed [`NodeConfig::max_attempts`]
    /// times, or the complete payload broke a content rule).
    FetchFailed { hash: BlockHash, reason: String },
    /// Run expert `block` on `rows` hidden states; answer with
    /// [`PeerNode::compute_done`].
    Compute {
        req: ComputeReq,
        block: BlockHash,
        rows: u32,
        input: Vec<f32>,
    },
    /// The relay accepted a new block: resync the headers.
    BlockAdded {
        hash: BlockHash,
        chain: ChainId,
        name: String,
    },
    /// Carry this out on the node's WebRTC connections (direct transfer).
    Rtc(RtcAction),
    /// A direct fetch gave `chunks` chunks back to relay forwarding.
    DirectFallback {
        hash: BlockHash,
        chunks: u32,
        reason: String,
    },
    /// The relay judged a proof this node sent.
    DirectVerdict {
        accused: PeerId,
        guilty: bool,
        reason: String,
    },
}

/// Reads the bytes of a payload a node holds but does not keep in memory
/// (a native node's verified file in its data dir): the node serves chunks
/// of it by reading them when asked. Implementations must never panic.
pub trait PayloadReader: Send + Sync {
    /// `len` bytes at `offset`, or why not (a missing or unreadable file).
    /// Fewer bytes than asked (a short file) are refused by the node.
    fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>, String>;
}

/// Where a held payload's bytes are.
#[derive(Clone)]
pub enum HeldPayload {
    /// Kept whole in memory ([`PeerNode::hold`]).
    Memory(Arc<[u8]>),
    /// Read when needed ([`PeerNode::hold_stored`]).
    Stored {
        len: u64,
        reader: Arc<dyn PayloadReader>,
    },
}

impl std::fmt::Debug for HeldPayload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Memory(p) => write!(f, "Memory({} bytes)", p.len()),
            Self::Stored { len, .. } => write!(f, "Stored({len} bytes)"),
        }
    }
}

impl HeldPayload {
    /// The payload's length in bytes.
    pub fn len(&self) -> u64 {
        match self {
            Self::Memory(p) => p.len() as u64,
            Self::Stored { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Exactly the `len` bytes at `offset` (within the payload), or why not.
    pub fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, String> {
        let end = offset
            .checked_add(len as u64)
            .filter(|e| *e <= self.len())
            .ok_or_else(|| {
                format!(
                    "bytes {offset}+{len} are outside the payload of {} bytes",
                    self.len()
                )
            })?;
        match self {
            Self::Memory(p) => Ok(p[offset as usize..end as usize].to_vec()),
            Self::Stored { reader, .. } => {
                let data = reader.read_at(offset, len)?;
                if data.len() != len {
                    return Err(format!(
                        "read {} of {len} bytes at offset {offset}: the stored payload is short",
                        data.len()
                    ));
                }
                Ok(data)
            }
        }
    }

    /// The whole payload (read from its reader when it is stored).
    pub fn read_all(&self) -> Result<Arc<[u8]>, String> {
        match self {
            Self::Memory(p) => Ok(p.clone()),
            Self::Stored { len, .. } => {
                let len = usize::try_from(*len).map_err(|_| "payload too large".to_string())?;
                self.read(0, len).map(Into::into)
            }
        }
    }
}

/// A payload this node holds and serves.
#[derive(Debug, Clone)]
struct Held {
    payload: HeldPayload,
    chunk_size: u32,
}

impl Held {
    /// Chunk `index` of `block`: exactly its bytes, or why not.
    fn chunk(&self, block: &BlockHash, index: u32) -> Result<Vec<u8>, String> {
        let cs = u64::from(self.chunk_size);
        let len = self.payload.len();
        let start = u64::from(index).saturating_mul(cs);
        if start >= len {
            return Err(format!(
                "chunk {index} is past the {} chunks of {}",
                chunk_count(len, self.chunk_size),
                block.short()
            ));
        }
        let n = cs.min(len - start) as usize;
        self.payload
            .read(start, n)
            .map_err(|e| format!("chunk {index} of {}: {e}", block.short()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Conn {
    /// No connection.
    Down,
    /// Connected, no challenge yet.
    AwaitChallenge,
    /// Login sent.
    AwaitWelcome,
    /// Logged in.
    Up { chunk_credits: u32 },
}

/// One node's protocol state. See the module docs.
pub struct PeerNode {
    key: SigningKey,
    cfg: NodeConfig,
    conn: Conn,
    /// Incremented on every `connected`; tags compute requests.
    epoch: u64,
    peer: Option<PeerId>,
    outbox: VecDeque<ToRelay>,
    events: VecDeque<NodeEvent>,
    held: BTreeMap<BlockHash, Held>,
    fetches: Fetches,
    computes: BTreeSet<u64>,
    next_status: Millis,
    stats: NodeStats,
    direct: direct::Direct,
}

impl std::fmt::Debug for PeerNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerNode")
            .field("conn", &self.conn)
            .field("held", &self.held.len())
            .field("fetching", &self.fetches.len())
            .finish()
    }
}

impl PeerNode {
    pub fn new(key: SigningKey, cfg: NodeConfig) -> Self {
        Self {
            key,
            cfg,
            conn: Conn::Down,
            epoch: 0,
            peer: None,
            outbox: VecDeque::new(),
            events: VecDeque::new(),
            held: BTreeMap::new(),
            fetches: Fetches::default(),
            computes: BTreeSet::new(),
            next_status: 0,
            stats: NodeStats::default(),
            direct: direct::Direct::default(),
        }
    }

    /// This node's id (its public key).
    pub fn id(&self) -> PeerId {
        self.key.verifying_key().to_bytes()
    }

    pub fn is_logged_in(&self) -> bool {
        matches!(self.conn, Conn::Up { .. })
    }

    pub fn stats(&self) -> &NodeStats {
        &self.stats
    }

    pub fn config(&self) -> &NodeConfig {
        &self.cfg
    }

    pub fn set_serve_compute(&mut self, on: bool, now: Millis) {
        if self.cfg.serve_compute != on {
            self.cfg.serve_compute = on;
            self.next_status = now;
            self.pump(now);
        }
    }

    /// Blocks held (verified payloads this node serves).
    pub fn held(&self) -> impl Iterator<Item = &BlockHash> {
        self.held.keys()
    }

    pub fn is_held(&self, hash: &BlockHash) -> bool {
        self.held.contains_key(hash)
    }

    /// A held payload, whole (read from its reader when it is held stored;
    /// `None` when that read fails).
    pub fn payload(&self, hash: &BlockHash) -> Option<Arc<[u8]>> {
        self.held.get(hash).and_then(|h| h.payload.read_all().ok())
    }

    /// Where a held payload's bytes are (cheap to clone: read them elsewhere,
    /// on a blocking thread, say).
    pub fn held_payload(&self, hash: &BlockHash) -> Option<HeldPayload> {
        self.held.get(hash).map(|h| h.payload.clone())
    }

    /// Whether a held payload is kept in memory (rather than read when needed).
    pub fn is_held_in_memory(&self, hash: &BlockHash) -> bool {
        matches!(
            self.held.get(hash).map(|h| &h.payload),
            Some(HeldPayload::Memory(_))
        )
    }

    /// Blocks being fetched, with (chunks verified, chunks in all).
    pub fn fetching(&self) -> Vec<(BlockHash, u64, u64)> {
        self.fetches.progress()
    }

    pub fn is_fetching(&self, hash: &BlockHash) -> bool {
        self.fetches.contains(hash)
    }

    /// Chunk requests outstanding at the relay.
    pub fn in_flight(&self) -> usize {
        self.fetches.in_flight()
    }

    /// A new connection is open (the relay's `Challenge` comes next).
    pub fn connected(&mut self, now: Millis) {
        self.reset_connection(now);
        self.conn = Conn::AwaitChallenge;
    }

    /// The connection is gone: requests in flight go back to the queue
    /// (without counting as failures: the relay, not the chunk, went away)
    /// and compute requests are forgotten (the relay fails them over).
    pub fn disconnected(&mut self, now: Millis) {
        self.reset_connection(now);
    }

    fn reset_connection(&mut self, now: Millis) {
        self.epoch += 1;
        self.conn = Conn::Down;
        self.direct_disconnected(now);
        self.outbox.clear();
        self.computes.clear();
        self.fetches.requeue_all(now);
    }

    /// Take a payload this node already verified and serve it from memory.
    /// Announced at once when logged in, else after `Welcome`.
    pub fn hold(
        &mut self,
        hash: BlockHash,
        payload: Arc<[u8]>,
        chunk_size: u32,
    ) -> Result<(), NodeError> {
        self.hold_as(hash, HeldPayload::Memory(payload), chunk_size)
    }

    /// Take a payload this node already verified and stored (a native
    /// node's data dir) without keeping it in memory: every chunk served is
    /// read through `reader` when asked (a read that fails or comes back
    /// short is answered `NoChunk` with the reason). Replaces an in-memory
    /// hold of the same block without announcing it again.
    pub fn hold_stored(
        &mut self,
        hash: BlockHash,
        payload_len: u64,
        chunk_size: u32,
        reader: Arc<dyn PayloadReader>,
    ) -> Result<(), NodeError> {
        self.hold_as(
            hash,
            HeldPayload::Stored {
                len: payload_len,
                reader,
            },
            chunk_size,
        )
    }

    fn hold_as(
        &mut self,
        hash: BlockHash,
        payload: HeldPayload,
        chunk_size: u32,
    ) -> Result<(), NodeError> {
        if !(chain_limits::MIN_CHUNK_SIZE..=chain_limits::MAX_CHUNK_SIZE).contains(&chunk_size) {
            return Err(NodeError::ChunkSize {
                block: hash,
                chunk_size,
            });
        }
        self.fetches.cancel(&hash);
        let new = self
            .held
            .insert(
                hash,
                Held {
                    payload,
                    chunk_size,
                },
            )
            .is_none();
        if new && self.is_logged_in() {
            self.outbox.push_back(ToRelay::Have {
                add: vec![hash],
                remove: Vec::new(),
            });
        }
        Ok(())
    }

    /// Stop holding (and serving) a block; announced when logged in.
    pub fn unhold(&mut self, hash: &BlockHash) -> bool {
        let was = self.held.remove(hash).is_some();
        if was && self.is_logged_in() {
            self.outbox.push_back(ToRelay::Have {
                add: Vec::new(),
                remove: vec![*hash],
            });
        }
        was
    }

    /// Fetch a header-verified block's payload through the relay, chunk by
    /// chunk. `chunk_list` is checked against the header's payload root now;
    /// `config` (the model's config) is needed to check a chain-B payload's
    /// tensors when the last chunk is in. A block already held or being
    /// fetched is left as it is.
    pub fn fetch(
        &mut self,
        block: &Block,
        chunk_list: Vec<BlockHash>,
        config: Option<Config>,
        now: Millis,
    ) -> Result<(), NodeError> {
        let hash = block.hash;
        if self.held.contains_key(&hash) || self.fetches.contains(&hash) {
            return Ok(());
        }
        if block.header.chain == ChainId::B && config.is_none() {
            return Err(NodeError::NoConfig { block: hash });
        }
        let direct =
            self.cfg.direct && self.direct.ready() && self.is_logged_in() && !chunk_list.is_empty();
        let list = direct.then(|| chunk_list.clone());
        self.fetches
            .start(block, chunk_list, config, direct)
            .map_err(|source| NodeError::ChunkList {
                block: hash,
                source,
            })?;
        if let Some(list) = list {
            self.start_direct(hash, list, block.header.chunk_size, now);
        }
        self.pump(now);
        Ok(())
    }

    /// Give up a fetch (its late answers are then ignored).
    pub fn cancel_fetch(&mut self, hash: &BlockHash) -> bool {
        self.direct_cancel(hash, self.direct_clock());
        self.fetches.cancel(hash)
    }

    /// The next message to send to the relay.
    pub fn poll_transmit(&mut self) -> Option<ToRelay> {
        self.outbox.pop_front()
    }

    /// The next event for the driver.
    pub fn poll_event(&mut self) -> Option<NodeEvent> {
        self.events.pop_front()
    }

    /// When [`Self::handle_timeout`] should next be called (None: no timer).
    pub fn poll_timeout(&self) -> Option<Millis> {
        let Conn::Up { .. } = self.conn else {
            return None;
        };
        let fetch = self.fetches.next_deadline(self.room());
        let t = fetch.map_or(self.next_status, |f| f.min(self.next_status));
        Some(self.direct_deadline().map_or(t, |d| d.min(t)))
    }

    /// Time passed: chunk requests past their deadline are retried, delayed
    /// retries become due, a heartbeat is sent.
    pub fn handle_timeout(&mut self, now: Millis) {
        if !self.is_logged_in() {
            return;
        }
        for out in self.fetches.expire(now, &self.cfg) {
            self.outcome(out);
        }
        self.direct_timeout(now);
        self.pump(now);
    }

    /// A message from the relay.
    pub fn handle(&mut self, msg: FromRelay, now: Millis) {
        match msg {
            FromRelay::Challenge { nonce, .. } => {
                if self.conn == Conn::Down {
                    self.stats.ignored += 1;
                    return;
                }
                self.outbox
                    .push_back(login(&self.key, &nonce, &self.cfg.agent));
                self.conn = Conn::AwaitWelcome;
            }
            FromRelay::Welcome { peer, limits } => {
                if self.conn != Conn::AwaitWelcome {
                    self.stats.ignored += 1;
                    return;
                }
                self.conn = Conn::Up {
                    chunk_credits: limits.chunk_credits,
                };
                self.peer = Some(peer);
                self.stats.logins += 1;
                self.events.push_back(NodeEvent::LoggedIn { peer, limits });
                self.outbox.push_back(ToRelay::Status {
                    load: self.load(),
                    serve_compute: self.cfg.serve_compute,
                });
                self.next_status = now.saturating_add(STATUS_INTERVAL_MS);
                if self.cfg.direct {
                    self.outbox.push_back(ToRelay::Direct { accept: true });
                }
                self.announce_all();
            }
            FromRelay::Error { code, mut message } => {
                truncate_text(&mut message);
                self.events
                    .push_back(NodeEvent::RelayError { code, message });
            }
            FromRelay::ServeChunk { req, block, index } => self.serve(req, block, index),
            FromRelay::ChunkData {
                req,
                block,
                index,
                data,
                from,
            } => {
                let from = Source::from(&from);
                let out = self
                    .fetches
                    .on_data(req, block, index, data, from, now, &self.cfg);
                self.outcome(out);
            }
            FromRelay::ChunkFailed { req, reason, .. } => {
                let out = self.fetches.on_failed(req, &reason, now, &self.cfg);
                self.outcome(out);
            }
            FromRelay::Compute {
                req,
                block,
                rows,
                input,
            } => self.compute(req, block, rows, input),
            FromRelay::BlockAdded { hash, chain, name } => {
                self.events
                    .push_back(NodeEvent::BlockAdded { hash, chain, name });
            }
            // Direct transfer (WebRTC): a node without `cfg.direct` keeps to
            // relay forwarding and never asks for an introduction.
            m @ (FromRelay::DirectConfig { .. }
            | FromRelay::Introduced { .. }
            | FromRelay::Signal { .. }
            | FromRelay::SignalFailed { .. }
            | FromRelay::Verdict { .. }
            | FromRelay::ReceiptTaken { .. }) => self.handle_direct(m, now),
        }
        self.pump(now);
    }

    /// The answer to a [`NodeEvent::Compute`]. Returns false (and sends
    /// nothing) for a request this connection does not have outstanding.
    pub fn compute_done(&mut self, req: ComputeReq, result: Result<Vec<f32>, String>) -> bool {
        if req.conn != self.epoch || !self.computes.remove(&req.id) {
            self.stats.ignored += 1;
            return false;
        }
        // A result the relay could not take is a failure, not an oversized frame.
        let max_floats = (limits::MAX_MESSAGE - 1024) / std::mem::size_of::<f32>();
        let result = match result {
            Ok(v) if v.len() > max_floats => Err(format!(
                "output of {} floats exceeds the message limit",
                v.len()
            )),
            other => other,
        };
        match result {
            Ok(output) => {
                self.stats.computes_served += 1;
                self.outbox.push_back(ToRelay::ComputeResult {
                    req: req.id,
                    output,
                });
            }
            Err(mut reason) => {
                self.stats.computes_failed += 1;
                truncate_text(&mut reason);
                self.outbox.push_back(ToRelay::ComputeFailed {
                    req: req.id,
                    reason,
                });
            }
        }
        true
    }

    /// Load in permille: compute requests outstanding of the relay's credits.
    fn load(&self) -> u16 {
        let l = self.computes.len() as u64 * 1000 / u64::from(limits::COMPUTE_CREDITS.max(1));
        l.min(1000) as u16
    }

    fn room(&self) -> usize {
        match self.conn {
            Conn::Up { chunk_credits } => {
                let cap = chunk_credits.min(self.cfg.max_in_flight) as usize;
                cap.saturating_sub(self.fetches.in_flight())
            }
            _ => 0,
        }
    }

    /// Send what is due: requests within the credits, a heartbeat.
    fn pump(&mut self, now: Millis) {
        if !self.is_logged_in() {
            return;
        }
        if now >= self.next_status {
            self.outbox.push_back(ToRelay::Status {
                load: self.load(),
                serve_compute: self.cfg.serve_compute,
            });
            self.next_status = now.saturating_add(STATUS_INTERVAL_MS);
        }
        let room = self.room();
        if room > 0 {
            for (req, block, index) in self.fetches.schedule(room, now, &self.cfg) {
                self.outbox
                    .push_back(ToRelay::GetChunk { req, block, index });
            }
        }
    }

    /// Every held block, in messages of at most [`limits::MAX_HAVE_PER_MSG`]
    /// and [`limits::MAX_HAVE`] in all.
    fn announce_all(&mut self) {
        let all: Vec<BlockHash> = self.held.keys().take(limits::MAX_HAVE).copied().collect();
        for part in all.chunks(limits::MAX_HAVE_PER_MSG) {
            self.outbox.push_back(ToRelay::Have {
                add: part.to_vec(),
                remove: Vec::new(),
            });
        }
    }

    fn serve(&mut self, req: u64, block: BlockHash, index: u32) {
        if !self.is_logged_in() {
            self.stats.ignored += 1;
            return;
        }
        let chunk = match self.held.get(&block) {
            Some(h) => h.chunk(&block, index),
            None => Err(format!("block {} is not held here", block.short())),
        };
        match chunk {
            Ok(data) => {
                self.stats.chunks_served += 1;
                self.stats.bytes_served += data.len() as u64;
                self.outbox.push_back(ToRelay::Chunk { req, data });
            }
            Err(mut reason) => {
                self.stats.chunks_refused += 1;
                truncate_text(&mut reason);
                self.outbox.push_back(ToRelay::NoChunk { req, reason });
            }
        }
    }

    fn compute(&mut self, req: u64, block: BlockHash, rows: u32, input: Vec<f32>) {
        if !self.is_logged_in() {
            self.stats.ignored += 1;
            return;
        }
        let refuse = if !self.cfg.serve_compute {
            Some("this node does not serve compute".to_string())
        } else if !self.held.contains_key(&block) {
            Some(format!("block {} is not held here", block.short()))
        } else if self.computes.contains(&req) {
            Some(format!("request {req} is already running"))
        } else if self.computes.len() >= MAX_PENDING_COMPUTE {
            Some("busy: too many computations outstanding".to_string())
        } else if rows == 0 || input.is_empty() || !input.len().is_multiple_of(rows as usize) {
            Some(format!(
                "{} input floats do not make {rows} rows",
                input.len()
            ))
        } else {
            None
        };
        if let Some(reason) = refuse {
            self.stats.computes_failed += 1;
            self.outbox
                .push_back(ToRelay::ComputeFailed { req, reason });
            return;
        }
        self.computes.insert(req);
        self.events.push_back(NodeEvent::Compute {
            req: ComputeReq {
                conn: self.epoch,
                id: req,
            },
            block,
            rows,
            input,
        });
    }

    fn outcome(&mut self, out: ChunkOutcome) {
        match out {
            ChunkOutcome::Ignored => self.stats.ignored += 1,
            ChunkOutcome::Retry => {}
            ChunkOutcome::Progress {
                hash,
                received,
                of,
                from,
                bytes,
            } => {
                *self.stats.bytes_received.entry(from).or_default() += bytes;
                *self.stats.chunks_received.entry(from).or_default() += 1;
                self.events
                    .push_back(NodeEvent::Progress { hash, received, of });
            }
            ChunkOutcome::Bad { hash, index, from } => {
                *self.stats.bad_chunks.entry(from).or_default() += 1;
                self.events
                    .push_back(NodeEvent::BadChunk { hash, index, from });
            }
            ChunkOutcome::Failed { hash, reason } => {
                self.stats.fetches_failed += 1;
                self.events
                    .push_back(NodeEvent::FetchFailed { hash, reason });
            }
            ChunkOutcome::Complete {
                hash,
                payload,
                chunk_size,
                from,
                bytes,
                of,
            } => {
                *self.stats.bytes_received.entry(from).or_default() += bytes;
                *self.stats.chunks_received.entry(from).or_default() += 1;
                self.events.push_back(NodeEvent::Progress {
                    hash,
                    received: of,
                    of,
                });
                self.stats.blocks_fetched += 1;
                let payload: Arc<[u8]> = payload.into();
                // The chunk size came from a verified header.
                if self.hold(hash, payload.clone(), chunk_size).is_ok() {
                    self.events
                        .push_back(NodeEvent::BlockComplete { hash, payload });
                }
            }
            ChunkOutcome::Many(v) => {
                for o in v {
                    self.outcome(o);
                }
            }
        }
    }
}
