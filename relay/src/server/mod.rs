//! The top layer: the router of every feature ([`app`]), the relay's
//! opening ([`open_relay`]), the connection loop ([`conn`]) and the static
//! files of the web app.
//!
//! * [`routes_read`]: listings (paged), blocks, payloads (HTTP Range), chunk lists, heads.
//! * [`upload`]: `POST /blocks` (streamed, checked as it arrives) and the
//!   seed's JSON `POST /upload_moe_experts`; both run header checks, rate
//!   limits and write rules before the payload, then payload checks, the gate
//!   and the store's fsync with no lock held; the chain lock is taken only to
//!   re-check the slot head and insert.
//! * [`health`]: `/healthz`, `/readyz`.
//! * [`conn`]: [`serve`], the accept loop: connection caps, header / keep-alive
//!   / write timeouts, listen backlog.
//! * `static_files`: the web app through tower-http's `ServeDir`, compressed.
//! * [`auth`] and [`limits`] live in the foundation ([`crate::auth`],
//!   [`crate::limits`]) and are re-exported here under their old paths.
//!
//! * [`AppState`]: the composite every feature's state is cut from: the
//!   core ([`crate::state::CoreState`], reached through `Deref`), the peers'
//!   runtime and the chat runtime, built in one order in [`AppState::new`].
//!
//! Layer: top; nothing but `main` imports it.
//! May import: every module below it (`state`, `http`, the handlers'
//! `routes()`: `peer_api`, `chat_api`, `rewards`, ...).

pub mod conn;
pub mod health;
mod routes_read;
mod static_files;
pub mod upload;

use std::path::PathBuf;
use std::sync::Arc;

use axum::http::{header, Method, StatusCode};
use axum::Router;
use tokio::sync::RwLock;
use tower_http::cors::{Any, CorsLayer};
use tower_http::trace::TraceLayer;
use web_node::chain::{validate_block, BlockHash, ChainId};
use web_node::net::api::{codes, ApiError};
use web_node::store::{BlockStore, StoreError};

use crate::chat::runtime::ChatRuntime;
use crate::chat_api::{ChatHost, ChatState};
use crate::compute::ExpertCompute;
use crate::genesis;
use crate::peer_api::PeerState;
use crate::peers::{Cluster, PeerOptions, Peers};
use crate::state::{BlockListener, CoreState, SharedCore};
use crate::store::{FileStore, PgStore, RelayStore};
use crate::RelayError;

pub use crate::auth::{self, MetaKeys, MetaWriters};
pub use crate::http::{relay_codes, HttpError};
pub use crate::http::{store_err, ApiResult};
pub use crate::limits::{self, RelayOptions, ServeOptions, MAX_BINARY_UPLOAD};
pub use crate::state::{accept_block, ChainState};
pub use conn::serve;

/// The relay's whole state: the core every feature shares and each
/// feature's runtime. Built in one order: the store, usage and chain lock,
/// then [`Peers`] with them, then the core with the peers as its
/// [`BlockListener`].
pub struct AppState {
    /// Store, chain, options, usage, database (also reached through `Deref`).
    pub core: SharedCore,
    /// `/ws` peers: registry, chunk dispatch, remote computation.
    pub peers: Arc<Peers>,
    /// `/chat` state.
    pub chat: ChatRuntime,
}

pub type SharedState = Arc<AppState>;

impl std::ops::Deref for AppState {
    type Target = CoreState;
    fn deref(&self) -> &CoreState {
        &self.core
    }
}

impl BlockListener for Peers {
    fn block_added(&self, block: &web_node::chain::Block) {
        Peers::block_added(self, block)
    }
}

impl ChatHost for AppState {
    fn core(&self) -> &CoreState {
        &self.core
    }
    fn chat(&self) -> &ChatRuntime {
        &self.chat
    }
    fn compute(&self) -> Arc<dyn ExpertCompute> {
        self.peers.clone()
    }
}

impl AppState {
    pub fn new(
        store: Arc<dyn RelayStore>,
        chain: ChainState,
        opts: RelayOptions,
        usage: Arc<crate::usage::Usage>,
    ) -> Self {
        let chain = Arc::new(RwLock::new(chain));
        let peers = Peers::new(
            PeerOptions::default(),
            store.clone(),
            chain.clone(),
            usage.clone(),
            None,
        );
        let core = CoreState::new(store, chain, opts, usage, peers.clone());
        Self {
            core: Arc::new(core),
            peers,
            chat: ChatRuntime::default(),
        }
    }

    /// The core, to change before serving (nothing shares it yet).
    fn core_mut(&mut self) -> &mut CoreState {
        match Arc::get_mut(&mut self.core) {
            Some(core) => core,
            None => unreachable!("the state is changed before serving"),
        }
    }

    /// Replace the peer layer with one using `opts` (before serving; a
    /// cluster it took part in is kept).
    pub fn with_peer_options(self, opts: PeerOptions) -> Self {
        let cluster = self.peers.cluster().cloned();
        self.with_peers(opts, cluster)
    }

    /// Replace the peer layer with one taking part in `cluster` (before
    /// serving, once the listener is bound: the handle from
    /// [`crate::cluster::presence::configure`] carries the advertised `/ws`
    /// URL); the peer options are kept.
    pub fn with_cluster(self, cluster: Arc<Cluster>) -> Self {
        let opts = self.peers.opts.clone();
        self.with_peers(opts, Some(cluster))
    }

    /// A new peer layer, wired to the core as its listener.
    fn with_peers(mut self, opts: PeerOptions, cluster: Option<Arc<Cluster>>) -> Self {
        self.peers = Peers::new(
            opts,
            self.store.clone(),
            self.chain.clone(),
            self.usage.clone(),
            cluster,
        );
        let peers = self.peers.clone();
        self.core_mut().set_listener(peers);
        self
    }

    /// Replace the acceptance gate (default [`crate::AcceptAll`]).
    pub fn with_gate(mut self, gate: Arc<dyn crate::Gate>) -> Self {
        self.core_mut().set_gate(gate);
        self
    }

    /// Add keys allowed to write chain-A meta blocks besides the operator's.
    pub fn with_meta_keys(mut self, keys: impl IntoIterator<Item = [u8; 32]>) -> Self {
        self.core_mut().add_meta_keys(keys);
        self
    }

    /// Change request-level options (before serving).
    pub fn with_options(mut self, f: impl FnOnce(&mut RelayOptions)) -> Self {
        self.core_mut().change_options(f);
        self
    }

    /// What the peer handlers run on.
    pub fn peer_state(&self) -> PeerState {
        PeerState {
            core: self.core.clone(),
            peers: self.peers.clone(),
        }
    }
}

/// The web app, the REST API, CORS for GET and request tracing.
pub fn app(state: SharedState) -> Router {
    let core = state.core.clone();
    let peer_state = state.peer_state();
    let cors = CorsLayer::new()
        .allow_origin(Any)
        .allow_methods([Method::GET, Method::HEAD])
        .allow_headers(Any)
        .expose_headers([
            header::CONTENT_RANGE,
            header::ACCEPT_RANGES,
            header::CONTENT_LENGTH,
            header::LINK,
        ]);
    let web = state
        .opts
        .web_dir
        .as_deref()
        .map(static_files::StaticFiles::new);
    let chat_state: ChatState = state;
    Router::new()
        .merge(routes_read::routes())
        .merge(upload::routes())
        .merge(health::routes())
        .merge(crate::rewards::routes())
        .with_state(core)
        .merge(crate::peer_api::routes().with_state(peer_state))
        .merge(crate::chat_api::routes().with_state(chat_state))
        .fallback(move |req| static_files::static_file(web.clone(), req))
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn(crate::metrics::track_http))
        .layer(cors)
        .layer(TraceLayer::new_for_http())
}

async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> HttpError {
    HttpError::with_status(
        ApiError::new(
            relay_codes::METHOD_NOT_ALLOWED,
            format!("{method} is not allowed on {}", uri.path()),
        ),
        StatusCode::METHOD_NOT_ALLOWED,
    )
}

/// Everything `relay serve` needs besides the address.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    pub web_dir: Option<PathBuf>,
    /// The genesis model (HF dir); used when the chain has no meta block.
    pub model_dir: Option<PathBuf>,
    /// `postgres://...`: keep the chain, usage and peer presence in this
    /// database (shared with other relays) instead of the data dir.
    pub database: Option<String>,
}

/// Open the store (repairing it), load the chain, create the operator key and
/// the genesis blocks if needed. Blocking.
pub fn open_relay(cfg: &ServeConfig) -> Result<AppState, RelayError> {
    open_relay_with_blobs(cfg, None)
}

/// [`open_relay`] with the payloads of a `--database` relay in a directory or
/// an S3-compatible object store (`relay serve --blobs`).
pub fn open_relay_with_blobs(
    cfg: &ServeConfig,
    blobs: Option<&str>,
) -> Result<AppState, RelayError> {
    if blobs.is_some() && cfg.database.is_none() {
        return Err(RelayError::Store(StoreError::Io(
            "--blobs needs --database (the embedded store keeps payloads in --data)".into(),
        )));
    }
    // Resolved once: every path below is absolute, whatever form --data had.
    let data_dir = crate::store::resolve_data_dir(&cfg.data_dir)?;
    let cfg = &ServeConfig {
        data_dir,
        ..cfg.clone()
    };
    let staging = cfg.data_dir.join("tmp");
    let mut pg = None;
    let (store, usage, mut chain): (Arc<dyn RelayStore>, crate::usage::Usage, ChainState) =
        match &cfg.database {
            None => {
                let (store, report) = FileStore::open(&cfg.data_dir)?;
                if report.removed_temp > 0
                    || !report.dropped.is_empty()
                    || !report.orphans.is_empty()
                {
                    tracing::warn!(
                        removed_temp = report.removed_temp,
                        dropped = report.dropped.len(),
                        orphans = report.orphans.len(),
                        "store repaired on open"
                    );
                }
                let mut chain = ChainState::load(&store)?;
                adopt_orphans(&store, &mut chain, &report.orphans);
                let path = cfg.data_dir.join("usage.redb");
                let usage = crate::usage::Usage::open(&path).map_err(|e| {
                    RelayError::Usage(format!(
                        "cannot open {}: usage counters and rewards would not persist ({e})",
                        path.display()
                    ))
                })?;
                (Arc::new(store), usage, chain)
            }
            Some(url) => {
                let db = crate::pg::Pg::connect(url)?;
                pg = Some(db.clone());
                let objects = blobs.map(crate::store::pg::open_blobs).transpose()?;
                let (store, report) = PgStore::open_with_blobs(db.clone(), &staging, objects)?;
                if report.removed_temp > 0 || report.removed_staged > 0 {
                    tracing::warn!(
                        removed_temp = report.removed_temp,
                        removed_staged = report.removed_staged,
                        "abandoned uploads removed"
                    );
                }
                let chain = ChainState::load(&store)?;
                let usage = crate::usage::Usage::open_pg(db)
                    .map_err(|e| RelayError::Usage(format!("{} ({e})", crate::pg::redact(url))))?;
                tracing::info!(database = %crate::pg::redact(url), "chain, usage and peer presence in PostgreSQL");
                (Arc::new(store), usage, chain)
            }
        };
    for (h, why) in store.quarantined_all()? {
        tracing::warn!(block = %h, reason = %why, "payload quarantined (not served)");
    }
    let key = genesis::operator_key(&cfg.data_dir)?;
    let mut opts = RelayOptions::new(staging);
    opts.web_dir = cfg.web_dir.clone();
    let mut state = AppState::new(store, ChainState::default(), opts, Arc::new(usage));
    let core = state.core_mut();
    core.set_meta_keys(MetaKeys::new(Some(key.verifying_key().to_bytes())));
    core.pg = pg;
    if chain.dag.chain(ChainId::A).next().is_none() {
        create_genesis(&state, &mut chain, cfg, &key)?;
    } else if let Some(m) = cfg.model_dir.as_deref() {
        check_genesis_matches(&state, &chain, m, &key, &cfg.data_dir)?;
    }
    tracing::info!(
        blocks = chain.len(),
        store = state.store.kind(),
        "chain loaded"
    );
    state.set_chain(chain);
    Ok(state)
}

/// A data dir whose chain already holds a genesis of the `--model`'s name
/// must hold this very model: same meta payload (config, tokenizer) and the
/// same genesis `shared` weights. A chain made from an older
/// `models/default` is refused with what to do, never mixed with the new one.
fn check_genesis_matches(
    state: &CoreState,
    chain: &ChainState,
    model_dir: &std::path::Path,
    key: &ed25519_dalek::SigningKey,
    data_dir: &std::path::Path,
) -> Result<(), RelayError> {
    if !model_dir.join("config.json").is_file() {
        return Ok(());
    }
    let (want_meta, want_payload) = genesis::meta_block(model_dir, key, 0)?;
    let name = want_meta.header.name.clone();
    let genesis = chain
        .dag
        .chain(ChainId::A)
        .find(|e| e.header.name == name && e.header.parents.is_empty());
    let Some(genesis) = genesis else {
        tracing::warn!(model = %model_dir.display(), name = %name, "the chain has no genesis of this model; --model is not used (the chain was made from other models)");
        return Ok(());
    };
    let hash = genesis.hash;
    let refuse = |what: &str| {
        RelayError::Genesis(format!(
            "{} holds a chain made from a different `{name}` model than {} (its genesis meta block {} differs in {what}): the data was made by an older model. \
             Move the data dir away (for example `mv {} {}.old`) to start a fresh chain from {}, or serve it without --model",
            data_dir.display(),
            model_dir.display(),
            hash.short(),
            data_dir.display(),
            data_dir.display(),
            model_dir.display()
        ))
    };
    let have = state
        .store
        .payload(&hash)
        .map_err(|e| RelayError::Genesis(format!("reading genesis meta block {hash}: {e}")))?;
    if have != want_payload {
        return Err(refuse("its config or tokenizer"));
    }
    // Same config and tokenizer: compare the genesis weights of `shared`.
    let ckpt = model_dir.join("model.safetensors");
    let first_shared = chain
        .dag
        .chain(ChainId::B)
        .find(|e| {
            e.header.meta == Some(hash) && e.header.name == "shared" && e.header.parents.is_empty()
        })
        .map(|e| e.hash);
    if let (true, Some(shared)) = (ckpt.is_file(), first_shared) {
        let (_, cfg) = web_node::chain::MetaPayload::parse(&want_payload)
            .map_err(|e| RelayError::Genesis(e.to_string()))?;
        let bytes = std::fs::read(&ckpt)?;
        let bad = |e: web_node::model::ModelError| {
            RelayError::Genesis(format!("{}: {e}", ckpt.display()))
        };
        // Only the shared slot's payload is made (no copy of the model).
        let want = web_node::model::checkpoint::plan_checkpoint(&cfg, &[bytes.as_slice()])
            .map_err(bad)?
            .into_iter()
            .find(|s| s.slot == web_node::model::Slot::Shared)
            .map(|s| s.payload().map(|p| p.bytes))
            .transpose()
            .map_err(bad)?;
        let have = state
            .store
            .payload(&shared)
            .map_err(|e| RelayError::Genesis(format!("reading genesis block {shared}: {e}")))?;
        if want.as_ref() != Some(&have) {
            return Err(refuse("its weights"));
        }
    }
    Ok(())
}

/// The genesis blocks of the model in `cfg.model_dir`, made with the
/// operator key (none without a model dir); on a shared database another
/// relay may have made them first, then its are used.
fn create_genesis(
    state: &CoreState,
    chain: &mut ChainState,
    cfg: &ServeConfig,
    key: &ed25519_dalek::SigningKey,
) -> Result<(), RelayError> {
    match &cfg.model_dir {
        Some(m) if m.join("config.json").is_file() => {
            let mut failed = None;
            let n = genesis::for_each_genesis_block(m, key, genesis::now_ms(), |b, p| {
                match accept_block(state, chain, &b, &p) {
                    Ok(_) => Ok(true),
                    // Another relay on the same database made the genesis first.
                    Err(e)
                        if cfg.database.is_some()
                            && (e.code == codes::NOT_HEAD || e.code == codes::DUPLICATE) =>
                    {
                        tracing::info!("another relay created the genesis: using it");
                        *chain = ChainState::load(state.store.as_ref())?;
                        Ok(false)
                    }
                    Err(e) => {
                        failed = Some(RelayError::Genesis(format!("block {}: {e}", b.header.name)));
                        Ok(false)
                    }
                }
            })?;
            if let Some(e) = failed {
                return Err(e);
            }
            tracing::info!(model = %m.display(), blocks = n, "genesis created");
        }
        Some(m) => {
            tracing::warn!(model = %m.display(), "no config.json in the model dir: starting without genesis")
        }
        None => tracing::warn!("no model dir: starting without genesis"),
    }
    Ok(())
}

/// Validate block files found without an index entry; index the valid ones
/// (they passed validation and the gate before they were written), quarantine the rest.
fn adopt_orphans(store: &FileStore, chain: &mut ChainState, orphans: &[BlockHash]) {
    let mut left: Vec<BlockHash> = orphans.to_vec();
    loop {
        let before = left.len();
        left.retain(|h| {
            let Ok((b, p)) = store.read_orphan(h) else {
                return true;
            };
            match validate_block(&b, &p, &chain.dag) {
                Ok(v) => match BlockStore::put(store, &b, &p) {
                    Ok(()) => {
                        let w = (b.header.chain == ChainId::A).then(|| MetaWriters::of(&b, &p));
                        chain.insert(&v, w);
                        tracing::warn!(block = %h, "adopted unindexed block file");
                        false
                    }
                    Err(_) => true,
                },
                Err(_) => true,
            }
        });
        if left.len() == before {
            break;
        }
    }
    for h in left {
        tracing::warn!(block = %h, "quarantining unindexed block file that does not validate");
        if let Err(e) = store.quarantine(&h) {
            tracing::error!(block = %h, error = %e, "quarantine failed");
        }
    }
}
