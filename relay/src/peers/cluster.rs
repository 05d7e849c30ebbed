//! What the peer layer needs of the cluster (several relays on one
//! database), owned here so that `peers` never imports `crate::cluster`:
//!
//! * [`Cluster`]: this relay's identity in the cluster, the live relays as
//!   of the last heartbeat, and the bounded queues (presence changes,
//!   lookups) that [`Peers`] fills and the cluster layer's tasks drain.
//! * [`ClusterIo`]: the port for what needs a socket or the database
//!   (opening a link to another relay, checking an unknown relay key);
//!   `crate::cluster` implements it.
//!
//! Layer: peer core. Imports [`crate::limits`] and the peer core
//! ([`super::ConnKind`], [`super::RemoteRelay`], [`super::Peers`]); the
//! cluster layer above imports it.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use rand_core::RngCore as _;
use tokio::sync::{mpsc, watch, Notify};
use web_node::chain::BlockHash;
use web_node::net::peer::PeerId;

use super::{ConnKind, Peers, PresenceChange, RemoteRelay};
use crate::limits::{
    CLUSTER_DEAD_AFTER, CLUSTER_HEARTBEAT, LOGIN_CHECK_TIMEOUT, LOOKUP_QUEUE, PRESENCE_QUEUE,
};

/// The agent a link logs in with (followed by the relay's id).
pub const RELAY_AGENT: &str = "aiblock-relay/1";

/// A boxed future of the port.
pub type IoFuture = Pin<Box<dyn Future<Output = bool> + Send>>;

/// What the cluster layer does for the peer layer (the port; implemented in
/// `crate::cluster`).
pub trait ClusterIo: Send + Sync {
    /// Open link `link` to `relay` in a task of its own; the core hears of
    /// it through [`Peers::link_connected`] and [`Peers::link_closed`].
    fn open_link(&self, peers: Arc<Peers>, cluster: Arc<Cluster>, link: PeerId, relay: RemoteRelay);
    /// Is `key` the key of a relay whose row in the database was refreshed
    /// within `dead_after` (a relay that started since the last heartbeat)?
    fn is_live_relay(&self, key: PeerId, dead_after: Duration) -> IoFuture;
}

/// Timing of registration (every relay of a database should use the same);
/// changed with the setters ([`ClusterOptions::heartbeat`] ...).
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct ClusterOptions {
    /// How often a relay refreshes its row and reads the live relays
    /// ([`CLUSTER_HEARTBEAT`]).
    pub heartbeat: Duration,
    /// A row not refreshed this long is dead (well above `heartbeat`;
    /// [`CLUSTER_DEAD_AFTER`]).
    pub dead_after: Duration,
}

crate::limits::option_setters!(ClusterOptions {
    heartbeat: Duration,
    dead_after: Duration,
});

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            heartbeat: CLUSTER_HEARTBEAT,
            dead_after: CLUSTER_DEAD_AFTER,
        }
    }
}

/// This relay's side of the cluster, as the peer layer holds it: identity,
/// the live relays (from the heartbeat), the queues the cluster's tasks
/// drain, and its [`ClusterIo`].
pub struct Cluster {
    /// Its row's id in `relays` (fresh per start).
    pub id: String,
    /// The relay key it logs in to other relays with.
    pub key: SigningKey,
    /// Where other relays reach its `/ws`.
    pub ws_url: String,
    pub opts: ClusterOptions,
    pub(crate) relay_keys: RwLock<HashSet<PeerId>>,
    pub(crate) alive: RwLock<Vec<RemoteRelay>>,
    presence_tx: mpsc::Sender<PresenceChange>,
    pub(crate) presence_rx: Mutex<Option<mpsc::Receiver<PresenceChange>>>,
    /// The next presence write rewrites this relay's rows whole.
    pub(crate) resync: AtomicBool,
    pub(crate) wake: Notify,
    lookup_tx: mpsc::Sender<BlockHash>,
    pub(crate) lookup_rx: Mutex<Option<mpsc::Receiver<BlockHash>>>,
    /// Registered now.
    pub(crate) registered: AtomicBool,
    /// True once the relay is out of the database (or never got in).
    pub(crate) left: watch::Sender<bool>,
    io: Box<dyn ClusterIo>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("id", &self.id)
            .field("key", &hex::encode(self.key.verifying_key().to_bytes()))
            .field("ws_url", &self.ws_url)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// A fresh id; nothing registered yet (the cluster layer's `start`
    /// does that).
    pub fn new(
        key: SigningKey,
        ws_url: String,
        opts: ClusterOptions,
        io: Box<dyn ClusterIo>,
    ) -> Self {
        let mut r = [0u8; 8];
        rand_core::OsRng.fill_bytes(&mut r);
        let (ptx, prx) = mpsc::channel(PRESENCE_QUEUE);
        let (ltx, lrx) = mpsc::channel(LOOKUP_QUEUE);
        Self {
            id: hex::encode(r),
            key,
            ws_url,
            opts,
            relay_keys: RwLock::new(HashSet::new()),
            alive: RwLock::new(Vec::new()),
            presence_tx: ptx,
            presence_rx: Mutex::new(Some(prx)),
            resync: AtomicBool::new(true),
            wake: Notify::new(),
            lookup_tx: ltx,
            lookup_rx: Mutex::new(Some(lrx)),
            registered: AtomicBool::new(false),
            left: watch::channel(true).0,
            io,
        }
    }

    /// Its relay key, public.
    pub fn public_key(&self) -> PeerId {
        self.key.verifying_key().to_bytes()
    }

    /// Queue a presence change (never blocks; a full queue means a full
    /// rewrite next).
    pub fn presence(&self, change: PresenceChange) {
        if self.presence_tx.try_send(change).is_err() {
            self.resync.store(true, Ordering::SeqCst);
            self.wake.notify_one();
        }
    }

    /// Queue a lookup; false if the queue is full (answer "nobody").
    pub fn lookup(&self, block: BlockHash) -> bool {
        self.lookup_tx.try_send(block).is_ok()
    }

    /// Is `key` the key of a live relay (as of the last heartbeat)?
    pub fn is_relay_key(&self, key: &PeerId) -> bool {
        self.relay_keys.read().is_ok_and(|k| k.contains(key))
    }

    /// The other live relays, as of the last heartbeat.
    pub fn relays(&self) -> Vec<RemoteRelay> {
        self.alive.read().map(|a| a.clone()).unwrap_or_default()
    }

    /// Is this relay's row in the database now?
    pub fn is_registered(&self) -> bool {
        self.registered.load(Ordering::SeqCst)
    }

    /// Wait (up to `limit`) until the relay is out of the database.
    pub async fn wait_left(&self, limit: Duration) {
        let mut rx = self.left.subscribe();
        let _ = tokio::time::timeout(limit, rx.wait_for(|l| *l)).await;
    }

    pub(crate) fn set_alive(&self, relays: &[RemoteRelay]) {
        if let Ok(mut k) = self.relay_keys.write() {
            *k = relays.iter().map(|r| r.key).collect();
        }
        if let Ok(mut a) = self.alive.write() {
            *a = relays.to_vec();
        }
    }
}

impl Cluster {
    /// Is the login of `key` (agent `agent`) another relay of this database?
    /// The live relays' keys are known from the heartbeat; a login whose
    /// agent says it is a relay ([`RELAY_AGENT`]) and whose key is not known
    /// yet (a relay that started since) is checked in the database within
    /// [`LOGIN_CHECK_TIMEOUT`].
    pub async fn login_kind(&self, key: &PeerId, agent: &str) -> ConnKind {
        if self.is_relay_key(key) {
            return ConnKind::Relay;
        }
        if !agent.starts_with(RELAY_AGENT) {
            return ConnKind::Peer;
        }
        let check = self.io.is_live_relay(*key, self.opts.dead_after);
        match tokio::time::timeout(LOGIN_CHECK_TIMEOUT, check).await {
            Ok(true) => {
                if let Ok(mut k) = self.relay_keys.write() {
                    k.insert(*key);
                }
                ConnKind::Relay
            }
            _ => ConnKind::Peer,
        }
    }

    /// Open a link through the port.
    pub(crate) fn open_link(self: &Arc<Self>, peers: Arc<Peers>, link: PeerId, relay: RemoteRelay) {
        self.io.open_link(peers, self.clone(), link, relay);
    }
}
