//! The relay's core state, shared by every feature: [`ChainState`] (the
//! chain index), [`CoreState`] (store, chain, commit lock, gate, options,
//! meta keys, usage, database, draining, readiness, rates), [`SharedCore`],
//! the [`BlockListener`] port (told of every stored block; the peers'
//! runtime implements it) and [`accept_block`] (store and index a trusted
//! block).
//!
//! Layer: state, above the foundation (store, usage, pg, gate, limits,
//! auth, http, metrics) and `chain_index`, below every feature. It imports
//! no feature: each feature's handlers extract the core and their own
//! runtime; the composite `crate::server::AppState` (core, `peers`, `chat`)
//! is assembled in the top layer.
//!
//! May import: the foundation and `chain_index`; no feature (`peers`,
//! `chat`, `peer_api`, `chat_api`, `rewards`, `cluster`), not `server`.

use std::sync::{Arc, OnceLock};

use tokio::sync::{Mutex, RwLock, Semaphore};
use web_node::chain::{validate_block, Block, ChainId, ChainView as _};
use web_node::net::api::{codes, ApiError, BlockInfo};

use crate::auth::{MetaKeys, MetaWriters};
pub use crate::chain_index::ChainState;
use crate::gate::{AcceptAll, Gate};
use crate::http::store_err;
use crate::limits::{self, RelayOptions};
use crate::store::{Committed, Expect, RelayStore};

/// The body of `/readyz`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Readiness {
    pub ready: bool,
    /// `ok` or why not.
    pub store: String,
    /// Blocks in the loaded chain.
    pub chain_blocks: usize,
    /// `ok`, why not, or `not configured` (no `--database`).
    pub database: String,
    pub shutting_down: bool,
    /// The first failing check, when not ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Built on first use from [`RelayOptions`] (so options set after
/// construction apply): rate tables and concurrency bounds.
pub(crate) struct Runtime {
    pub(crate) rates: limits::RateLimits,
    pub(crate) json: Arc<Semaphore>,
    pub(crate) eval_queue: Arc<Semaphore>,
    pub(crate) eval_run: Arc<Semaphore>,
}

/// Told of every block this relay stores or adopts (the port through which
/// the core reaches the peers' runtime: `/ws` peers get `block_added`).
pub trait BlockListener: Send + Sync {
    fn block_added(&self, block: &Block);
}

/// No listener (a core built alone).
pub struct NoListener;

impl BlockListener for NoListener {
    fn block_added(&self, _: &Block) {}
}

/// What every feature shares: the store, the chain, the options, usage and
/// the database.
pub struct CoreState {
    pub store: Arc<dyn RelayStore>,
    /// The chain index. Readers take it shared; uploads take it exclusively
    /// only to insert an accepted block (see `crate::server::upload`).
    pub chain: Arc<RwLock<ChainState>>,
    /// Serialises the last step of uploads (head re-check, index, insert).
    pub(crate) commit: Mutex<()>,
    gate: Arc<dyn Gate>,
    pub opts: RelayOptions,
    pub(crate) meta_keys: MetaKeys,
    runtime: OnceLock<Runtime>,
    /// Told of every stored block (the peers' runtime).
    listener: Arc<dyn BlockListener>,
    /// Usage counters and rewards (`data/usage.redb`, or PostgreSQL).
    pub usage: Arc<crate::usage::Usage>,
    /// The database shared with other relays (`--database`), if any.
    pub pg: Option<Arc<crate::pg::Pg>>,
    /// Set when shutdown starts: `/readyz` answers 503 so that load
    /// balancers stop sending work while connections drain.
    pub draining: Arc<std::sync::atomic::AtomicBool>,
    /// The last `/readyz` answer; held while a probe runs
    /// (`crate::server::health`, which owns the type).
    pub(crate) readiness: Mutex<Option<Readiness>>,
}

pub type SharedCore = Arc<CoreState>;

impl CoreState {
    /// `chain` is the lock the peers' runtime shares; `listener` is told
    /// of every stored block.
    pub fn new(
        store: Arc<dyn RelayStore>,
        chain: Arc<RwLock<ChainState>>,
        opts: RelayOptions,
        usage: Arc<crate::usage::Usage>,
        listener: Arc<dyn BlockListener>,
    ) -> Self {
        Self {
            store,
            chain,
            commit: Mutex::new(()),
            gate: Arc::new(AcceptAll),
            opts,
            meta_keys: MetaKeys::default(),
            runtime: OnceLock::new(),
            listener,
            usage,
            pg: None,
            draining: Arc::default(),
            readiness: Mutex::new(None),
        }
    }

    /// Replace the block listener (before serving).
    pub fn set_listener(&mut self, listener: Arc<dyn BlockListener>) {
        self.listener = listener;
    }

    /// Tell the listener of a stored block.
    pub fn block_added(&self, block: &Block) {
        self.listener.block_added(block);
    }

    /// Replace the acceptance gate (default [`AcceptAll`]).
    pub fn with_gate(mut self, gate: Arc<dyn Gate>) -> Self {
        self.set_gate(gate);
        self
    }

    /// [`Self::with_gate`] in place (before serving).
    pub fn set_gate(&mut self, gate: Arc<dyn Gate>) {
        self.gate = gate;
    }

    /// Replace the chain index in place (the lock the peers' runtime
    /// shares stays the same). Before serving.
    pub(crate) fn set_chain(&self, chain: ChainState) {
        match self.chain.try_write() {
            Ok(mut c) => *c = chain,
            Err(_) => unreachable!("the chain is replaced before serving"),
        }
    }

    /// Add keys allowed to write chain-A meta blocks besides the operator's.
    pub fn with_meta_keys(mut self, keys: impl IntoIterator<Item = [u8; 32]>) -> Self {
        self.add_meta_keys(keys);
        self
    }

    /// [`Self::with_meta_keys`] in place (before serving).
    pub fn add_meta_keys(&mut self, keys: impl IntoIterator<Item = [u8; 32]>) {
        self.meta_keys = std::mem::take(&mut self.meta_keys).with_listed(keys);
    }

    /// Set the keys allowed to write meta blocks (before serving).
    pub(crate) fn set_meta_keys(&mut self, keys: MetaKeys) {
        self.meta_keys = keys;
    }

    /// Change request-level options (before serving).
    pub fn with_options(mut self, f: impl FnOnce(&mut RelayOptions)) -> Self {
        self.change_options(f);
        self
    }

    /// [`Self::with_options`] in place (before serving).
    pub fn change_options(&mut self, f: impl FnOnce(&mut RelayOptions)) {
        f(&mut self.opts);
        self.runtime = OnceLock::new();
    }

    /// The lock the last step of an upload (head re-check, commit, index)
    /// and the block follower (`crate::cluster::follow`) take.
    pub async fn commit_lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.commit.lock().await
    }

    /// The acceptance gate new versions of existing slots pass.
    pub fn gate(&self) -> &dyn Gate {
        self.gate.as_ref()
    }

    /// The keys allowed to write meta blocks.
    pub fn meta_keys(&self) -> &MetaKeys {
        &self.meta_keys
    }

    pub(crate) fn rt(&self) -> &Runtime {
        self.runtime.get_or_init(|| Runtime {
            rates: limits::RateLimits::new(&self.opts),
            json: Arc::new(Semaphore::new(self.opts.json_concurrency.max(1))),
            eval_queue: Arc::new(Semaphore::new(self.opts.eval_queue.max(1))),
            eval_run: Arc::new(Semaphore::new(self.opts.eval_concurrency.max(1))),
        })
    }

    /// Entries in the per-IP and per-key rate tables (bounded by
    /// [`RelayOptions::rate_table_capacity`]).
    pub fn rate_table_sizes(&self) -> (usize, usize) {
        let r = &self.rt().rates;
        (r.ip.len(), r.key.len())
    }
}

/// Store a trusted block (genesis, made by this relay) and insert it: full
/// validation, no gate, no write rules.
pub fn accept_block(
    state: &CoreState,
    chain: &mut ChainState,
    block: &Block,
    payload: &[u8],
) -> Result<BlockInfo, ApiError> {
    let v = validate_block(block, payload, &chain.dag)?;
    let h = &block.header;
    let expect = Expect::Head(chain.dag.head(h.meta.as_ref(), &h.name));
    match crate::store::put_checked(state.store.as_ref(), block, payload, expect)
        .map_err(store_err)?
    {
        Committed::Done => {}
        Committed::HeadMoved(now) => {
            return Err(ApiError::new(
                codes::NOT_HEAD,
                format!(
                    "slot {}'s head moved to {}",
                    h.name,
                    now.map(|x| x.to_hex()).unwrap_or_else(|| "none".into())
                ),
            ))
        }
    }
    let writers = (block.header.chain == ChainId::A).then(|| MetaWriters::of(block, payload));
    chain.insert(&v, writers);
    state.block_added(block);
    tracing::info!(block = %block.hash, chain = ?block.header.chain, slot = %block.header.name, "block stored");
    Ok(BlockInfo::from(block).with_head(true))
}
