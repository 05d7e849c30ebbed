//! Counters of the peer layer: atomics for the totals, a bounded table for
//! per-peer numbers. [`Counters::snapshot`] copies them into [`PeerStats`]
//! (`GET /p2p/stats`, and tests that prove where a chunk came from).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use web_node::net::peer::PeerId;

use super::chunks::{ConnKind, UsageEvent};

/// Peers whose own counters are kept; past it only the totals count (a
/// churn of fresh keys cannot grow the table).
pub const PER_PEER_CAPACITY: usize = 65_536;

/// One peer's numbers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerCounters {
    /// Chunks (and bytes) this peer served that the relay checked and forwarded.
    pub chunks_served: u64,
    pub bytes_served: u64,
    /// Chunks from this peer that failed the relay's hash check.
    pub bad_chunks: u64,
    /// Chunk requests it did not answer in time.
    pub chunk_timeouts: u64,
    /// Expert computations sent to it, answered (valid, in time), failed
    /// (refused, invalid output, disconnected) and timed out.
    pub compute_sent: u64,
    pub compute_answered: u64,
    pub compute_failed: u64,
    pub compute_timed_out: u64,
    /// Bytes the relay delivered to this peer (from its store, a peer or
    /// another relay), and bytes this peer received directly from other
    /// peers, as its accepted receipts credit them.
    #[serde(default)]
    pub relay_forwarded_bytes: u64,
    #[serde(default)]
    pub direct_bytes: u64,
    /// Bytes this peer served directly, as receivers' receipts credit them.
    #[serde(default)]
    pub direct_bytes_served: u64,
}

/// A copy of every counter.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStats {
    /// Chunks (bytes) the relay answered from its own store.
    pub chunks_from_store: u64,
    pub bytes_from_store: u64,
    /// Chunks (bytes) served by peers, checked and forwarded by the relay.
    pub chunks_from_peers: u64,
    pub bytes_from_peers: u64,
    /// `GetChunk` requests answered `ChunkFailed`.
    pub chunks_failed: u64,
    /// Chunks from peers that failed the relay's hash check.
    pub bad_chunks: u64,
    /// Holders that did not answer a `ServeChunk` in time.
    pub chunk_timeouts: u64,
    /// Bans handed out (a banned peer is disconnected and refused).
    pub bans: u64,
    pub compute_sent: u64,
    pub compute_answered: u64,
    pub compute_failed: u64,
    pub compute_timed_out: u64,
    /// WebSocket connections open now (logged in or not).
    pub connections_open: u64,
    /// Logged-in peers now.
    pub peers_online: u64,
    /// Successful logins.
    pub logins: u64,
    /// Logins refused (bad signature, banned, timeout, not a login).
    pub login_failures: u64,
    /// Upgrades refused (over a connection cap, shutting down, wrong subprotocol).
    pub refused_connections: u64,
    /// Connections replaced by a second login with the same key.
    pub replaced: u64,
    /// Connections cut for flooding, malformed frames, not reading, or silence.
    pub rate_limited: u64,
    pub malformed: u64,
    pub dropped_slow: u64,
    pub dropped_idle: u64,
    /// `BlockAdded` messages queued to peers.
    pub block_added_sent: u64,
    /// Several relays on one database: chunks (bytes) another relay
    /// forwarded over a link, checked here and delivered to a peer here.
    pub chunks_from_relays: u64,
    pub bytes_from_relays: u64,
    /// Chunks (bytes) this relay's peers served to another relay's request.
    pub chunks_to_relays: u64,
    pub bytes_to_relays: u64,
    /// Chunks from a link that failed the hash check (also in `bad_chunks`).
    pub bad_chunks_from_relays: u64,
    /// Other relays logged in here now, and their logins.
    pub relays_online: u64,
    pub relay_logins: u64,
    /// Links to other relays up now, opened (attempts), failed or lost.
    pub links_up: u64,
    pub links_opened: u64,
    pub link_failures: u64,
    /// Presence lookups asked of the database.
    pub presence_lookups: u64,
    /// Presence batches written, and writes that failed (then rewritten whole).
    pub presence_writes: u64,
    pub presence_errors: u64,
    /// Bytes the relay delivered to peers (store, peers, links), and bytes
    /// peers exchanged directly as accepted receipts credit them.
    #[serde(default)]
    pub relay_forwarded_bytes: u64,
    #[serde(default)]
    pub direct_bytes: u64,
    /// Receipts that credited something.
    #[serde(default)]
    pub receipts: u64,
    /// Per peer (hex key).
    pub per_peer: BTreeMap<String, PeerCounters>,
}

impl PeerStats {
    /// One peer's counters (zero if it has none).
    pub fn peer(&self, id: &PeerId) -> PeerCounters {
        self.per_peer
            .get(&hex::encode(id))
            .copied()
            .unwrap_or_default()
    }
}

macro_rules! counters {
    ($($name:ident),* $(,)?) => {
        /// The live counters (see [`PeerStats`] for their meaning).
        #[derive(Debug, Default)]
        pub struct Counters {
            $(pub $name: AtomicU64,)*
            per_peer: Mutex<HashMap<PeerId, PeerCounters>>,
            /// Where verified work is also recorded for rewards.
            usage: Option<std::sync::Arc<crate::usage::Usage>>,
        }

        impl Counters {
            /// Copy every counter.
            pub fn snapshot(&self) -> PeerStats {
                let per_peer = self
                    .per_peer
                    .lock()
                    .map(|t| t.iter().map(|(k, v)| (hex::encode(k), *v)).collect())
                    .unwrap_or_default();
                PeerStats {
                    $($name: self.$name.load(Ordering::Relaxed),)*
                    per_peer,
                }
            }
        }
    };
}

counters!(
    chunks_from_store,
    bytes_from_store,
    chunks_from_peers,
    bytes_from_peers,
    chunks_failed,
    bad_chunks,
    chunk_timeouts,
    bans,
    compute_sent,
    compute_answered,
    compute_failed,
    compute_timed_out,
    connections_open,
    peers_online,
    logins,
    login_failures,
    refused_connections,
    replaced,
    rate_limited,
    malformed,
    dropped_slow,
    dropped_idle,
    block_added_sent,
    chunks_from_relays,
    bytes_from_relays,
    chunks_to_relays,
    bytes_to_relays,
    bad_chunks_from_relays,
    relays_online,
    relay_logins,
    links_up,
    links_opened,
    link_failures,
    presence_lookups,
    presence_writes,
    presence_errors,
    relay_forwarded_bytes,
    direct_bytes,
    receipts,
);

impl Counters {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn dec(c: &AtomicU64) {
        let _ = c.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
            Some(v.saturating_sub(1))
        });
    }

    /// Counters that also record verified work in `usage` (for rewards).
    pub fn with_usage(usage: std::sync::Arc<crate::usage::Usage>) -> Self {
        Self {
            usage: Some(usage),
            ..Self::default()
        }
    }

    /// Run `f` on the usage store, if one is attached.
    pub fn usage(&self, f: impl FnOnce(&crate::usage::Usage)) {
        if let Some(u) = self.usage.as_deref() {
            f(u);
        }
    }

    /// Update one peer's counters (dropped once the table is full and the
    /// peer is not in it).
    pub fn peer(&self, id: &PeerId, f: impl FnOnce(&mut PeerCounters)) {
        if let Ok(mut t) = self.per_peer.lock() {
            if !t.contains_key(id) && t.len() >= PER_PEER_CAPACITY {
                return;
            }
            f(t.entry(*id).or_default());
        }
    }

    /// One peer's counters.
    pub fn of_peer(&self, id: &PeerId) -> PeerCounters {
        self.per_peer
            .lock()
            .ok()
            .and_then(|t| t.get(id).copied())
            .unwrap_or_default()
    }
}

impl Counters {
    /// Count what the chunk-dispatch core reported ([`Action::Usage`]): the
    /// counters, the metrics and, for verified work, the usage store.
    ///
    /// [`Action::Usage`]: super::chunks::Action::Usage
    pub fn record(&self, event: &UsageEvent) {
        use crate::metrics::{self, ChunkPath};
        match *event {
            UsageEvent::Login { kind } => match kind {
                ConnKind::Relay => {
                    Self::inc(&self.relay_logins);
                    Self::inc(&self.relays_online);
                }
                ConnKind::Peer | ConnKind::Link => {
                    Self::inc(&self.logins);
                    Self::inc(&self.peers_online);
                    metrics::ws_peer(true);
                }
            },
            UsageEvent::Replaced => Self::inc(&self.replaced),
            UsageEvent::Logout { kind } => match kind {
                ConnKind::Peer => {
                    Self::dec(&self.peers_online);
                    metrics::ws_peer(false);
                }
                ConnKind::Relay => Self::dec(&self.relays_online),
                ConnKind::Link => Self::dec(&self.links_up),
            },
            UsageEvent::ChunkFailed => Self::inc(&self.chunks_failed),
            UsageEvent::ChunkServed { peer, block, bytes } => {
                Self::inc(&self.chunks_from_peers);
                Self::add(&self.bytes_from_peers, bytes);
                metrics::chunk_bytes(ChunkPath::Peer, bytes);
                self.peer(&peer, |c| {
                    c.chunks_served += 1;
                    c.bytes_served += bytes;
                });
                self.usage(|u| u.record_chunk_served(&peer, &block, bytes));
            }
            UsageEvent::ChunkFromLink { bytes } => {
                Self::inc(&self.chunks_from_relays);
                Self::add(&self.bytes_from_relays, bytes);
                metrics::chunk_bytes(ChunkPath::Link, bytes);
            }
            UsageEvent::ChunkFromStore { bytes } => {
                Self::inc(&self.chunks_from_store);
                Self::add(&self.bytes_from_store, bytes);
                metrics::chunk_bytes(ChunkPath::Store, bytes);
            }
            UsageEvent::ChunkToRelay { bytes } => {
                Self::inc(&self.chunks_to_relays);
                Self::add(&self.bytes_to_relays, bytes);
            }
            UsageEvent::Fetch { peer, block, bytes } => {
                Self::add(&self.relay_forwarded_bytes, bytes);
                self.peer(&peer, |c| c.relay_forwarded_bytes += bytes);
                self.usage(|u| u.record_fetch(&peer, &block));
            }
            UsageEvent::DirectServed {
                server,
                receiver,
                block,
                bytes,
            } => {
                Self::inc(&self.receipts);
                Self::add(&self.direct_bytes, bytes);
                self.peer(&receiver, |c| c.direct_bytes += bytes);
                self.peer(&server, |c| c.direct_bytes_served += bytes);
                self.usage(|u| u.record_direct_served(&server, &block, bytes));
            }
            UsageEvent::BadChunk {
                holder,
                block,
                link,
            } => {
                Self::inc(&self.bad_chunks);
                metrics::bad_chunk(link);
                if link {
                    Self::inc(&self.bad_chunks_from_relays);
                } else {
                    self.peer(&holder, |c| c.bad_chunks += 1);
                    self.usage(|u| u.record_bad_chunk(&holder, &block));
                }
            }
            UsageEvent::ChunkTimeout { peer } => {
                Self::inc(&self.chunk_timeouts);
                if let Some(p) = peer {
                    self.peer(&p, |c| c.chunk_timeouts += 1);
                }
            }
            UsageEvent::Ban => {
                Self::inc(&self.bans);
                metrics::ban();
            }
            UsageEvent::Lookup => Self::inc(&self.presence_lookups),
            UsageEvent::LinkOpened => Self::inc(&self.links_opened),
            UsageEvent::LinkUp => Self::inc(&self.links_up),
            UsageEvent::LinkFailure => Self::inc(&self.link_failures),
            UsageEvent::ComputeSent { peer } => {
                Self::inc(&self.compute_sent);
                self.peer(&peer, |c| c.compute_sent += 1);
            }
            UsageEvent::ComputeAnswered { peer, block } => {
                Self::inc(&self.compute_answered);
                self.peer(&peer, |c| c.compute_answered += 1);
                self.usage(|u| u.record_compute(&peer, &block));
            }
            UsageEvent::ComputeFailed { peer, timed_out } => {
                if timed_out {
                    Self::inc(&self.compute_timed_out);
                    self.peer(&peer, |c| c.compute_timed_out += 1);
                } else {
                    Self::inc(&self.compute_failed);
                    self.peer(&peer, |c| c.compute_failed += 1);
                }
            }
        }
    }
}
