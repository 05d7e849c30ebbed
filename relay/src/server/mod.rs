//! The HTTP server: REST API over the store, uploads, static files of the web
//! app, and the connection loop with its limits.
//!
//! * [`routes_read`]: listings (paged), blocks, payloads (HTTP Range), chunk lists, heads.
//! * [`upload`]: `POST /blocks` (streamed, checked as it arrives) and the
//!   seed's JSON `POST /upload_moe_experts`; both run header checks, rate
//!   limits and write rules before the payload, then payload checks, the gate
//!   and the store's fsync with no lock held; the chain lock is taken only to
//!   re-check the slot head and insert.
//! * [`auth`]: who may write what.
//! * [`limits`]: every limit as a named constant, rate tables.
//! * [`conn`]: [`serve`], the accept loop: connection caps, header / keep-alive
//!   / write timeouts, listen backlog.
//! * [`static_files`]: the web app through tower-http's `ServeDir`, compressed.

pub mod auth;
pub mod conn;
pub mod health;
pub mod limits;
mod routes_read;
mod static_files;
pub mod upload;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use axum::extract::ConnectInfo;
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::sync::{Mutex, RwLock, Semaphore};
use tower_http::cors::{Any, CorsLayer};
use tower_http::trace::TraceLayer;
use web_node::chain::{
    validate_block, Block, BlockHash, ChainId, ChainView as _, Dag, ValidatedBlock,
};
use web_node::net::api::{codes, ApiError, BlockInfo};
use web_node::store::{BlockStore, StoreError};

use crate::gate::{AcceptAll, Gate};
use crate::genesis;
use crate::store::{Committed, Expect, FileStore, PgStore, RelayStore};
use crate::RelayError;

pub use auth::{MetaKeys, MetaWriters};
pub use conn::serve;
pub use limits::{RelayOptions, ServeOptions, MAX_BINARY_UPLOAD};

/// The chain as the relay serves it: the DAG index (headers, heads,
/// configs), and what listings and write rules need besides: each chain's
/// acceptance order, signatures, and each meta block's writers.
#[derive(Debug, Default)]
pub struct ChainState {
    pub dag: Dag,
    order: [Vec<BlockHash>; 2],
    pos: HashMap<BlockHash, usize>,
    sigs: HashMap<BlockHash, [u8; 64]>,
    writers: HashMap<BlockHash, MetaWriters>,
}

fn chain_ix(c: ChainId) -> usize {
    match c {
        ChainId::A => 0,
        ChainId::B => 1,
    }
}

impl ChainState {
    /// Rebuild from a store: the DAG (as web-node loads it), then the order,
    /// signatures and meta writers.
    pub fn load(store: &dyn RelayStore) -> Result<Self, StoreError> {
        let dag = web_node::store::load_dag(store)?;
        let mut s = Self {
            dag,
            ..Self::default()
        };
        for b in store.list()? {
            let writers = if b.header.chain == ChainId::A {
                let p = store.payload(&b.hash)?;
                Some(MetaWriters::of(&b, &p))
            } else {
                None
            };
            s.index(&b, writers);
        }
        Ok(s)
    }

    fn index(&mut self, b: &Block, writers: Option<MetaWriters>) {
        if self.sigs.contains_key(&b.hash) {
            return;
        }
        let v = &mut self.order[chain_ix(b.header.chain)];
        self.pos.insert(b.hash, v.len());
        v.push(b.hash);
        self.sigs.insert(b.hash, b.signature);
        if let Some(w) = writers {
            self.writers.insert(b.hash, w);
        }
    }

    /// Add an accepted block (it becomes its slot's head).
    pub fn insert(&mut self, v: &ValidatedBlock, writers: Option<MetaWriters>) {
        self.dag.insert(v);
        self.index(&v.block, writers);
    }

    /// The writers of an accepted meta block.
    pub fn meta_writers(&self, meta: &BlockHash) -> Option<&MetaWriters> {
        self.writers.get(meta)
    }

    /// Blocks of a chain in acceptance order, from just after `after`.
    pub fn page(
        &self,
        chain: ChainId,
        after: Option<&BlockHash>,
        limit: usize,
    ) -> Result<(Vec<BlockInfo>, bool), ApiError> {
        let order = &self.order[chain_ix(chain)];
        let start = match after {
            None => 0,
            Some(h) => match self.pos.get(h) {
                Some(&i) if order.get(i) == Some(h) => i + 1,
                _ => {
                    return Err(ApiError::malformed(format!(
                        "after={h}: no such block on chain {chain:?}"
                    )))
                }
            },
        };
        let end = start.saturating_add(limit).min(order.len());
        let infos = order
            .get(start..end)
            .unwrap_or_default()
            .iter()
            .filter_map(|h| self.info(h))
            .collect();
        Ok((infos, end < order.len()))
    }

    /// One block's listing entry (with its head flag), from memory.
    pub fn info(&self, hash: &BlockHash) -> Option<BlockInfo> {
        let e = self.dag.get(hash)?;
        let sig = self.sigs.get(hash)?;
        let b = Block::from_parts(e.header.clone(), *sig);
        let head = self.dag.head(e.header.meta.as_ref(), &e.header.name) == Some(*hash);
        Some(BlockInfo::from(&b).with_head(head))
    }

    pub fn len(&self) -> usize {
        self.dag.len()
    }

    pub fn is_empty(&self) -> bool {
        self.dag.is_empty()
    }
}

/// Built on first use from [`RelayOptions`] (so options set after
/// construction apply): rate tables and concurrency bounds.
struct Runtime {
    rates: limits::RateLimits,
    json: Arc<Semaphore>,
    eval_queue: Arc<Semaphore>,
    eval_run: Arc<Semaphore>,
    web: Option<static_files::StaticFiles>,
}

/// Everything a request handler needs.
pub struct AppState {
    pub store: Arc<dyn RelayStore>,
    /// The chain index. Readers take it shared; uploads take it exclusively
    /// only to insert an accepted block (see [`upload`]).
    pub chain: Arc<RwLock<ChainState>>,
    /// Serialises the last step of uploads (head re-check, index, insert).
    commit: Mutex<()>,
    gate: Arc<dyn Gate>,
    pub opts: RelayOptions,
    meta_keys: MetaKeys,
    runtime: OnceLock<Runtime>,
    /// `/ws` peers: registry, chunk routing, remote computation.
    pub peers: Arc<crate::peers::Peers>,
    /// `/chat` state.
    pub chat: crate::chat::ChatRuntime,
    /// Usage counters and rewards (`data/usage.redb`, or PostgreSQL).
    pub usage: Arc<crate::usage::Usage>,
    /// The database shared with other relays (`--database`), if any.
    pub pg: Option<Arc<crate::pg::Pg>>,
    /// Set when shutdown starts: `/readyz` answers 503 so that load
    /// balancers stop sending work while connections drain.
    pub draining: Arc<std::sync::atomic::AtomicBool>,
    /// The last `/readyz` answer; held while a probe runs ([`health`]).
    readiness: Mutex<Option<health::Readiness>>,
}

pub type SharedState = Arc<AppState>;

impl AppState {
    pub fn new(
        store: Arc<dyn RelayStore>,
        chain: ChainState,
        opts: RelayOptions,
        usage: Arc<crate::usage::Usage>,
    ) -> Self {
        let peers = Arc::new(crate::peers::Peers::default());
        peers.attach_store(store.clone());
        peers.counters().attach_usage(usage.clone());
        Self {
            store,
            chain: Arc::new(RwLock::new(chain)),
            commit: Mutex::new(()),
            gate: Arc::new(AcceptAll),
            opts,
            meta_keys: MetaKeys::default(),
            runtime: OnceLock::new(),
            peers,
            chat: crate::chat::ChatRuntime::default(),
            usage,
            pg: None,
            draining: Arc::default(),
            readiness: Mutex::new(None),
        }
    }

    /// Replace the peer layer with one using `opts` (before serving).
    pub fn with_peer_options(mut self, opts: crate::peers::PeerOptions) -> Self {
        let peers = Arc::new(crate::peers::Peers::new(opts));
        peers.attach_store(self.store.clone());
        peers.counters().attach_usage(self.usage.clone());
        self.peers = peers;
        self
    }

    /// Replace the acceptance gate (default [`AcceptAll`]).
    pub fn with_gate(mut self, gate: Arc<dyn Gate>) -> Self {
        self.gate = gate;
        self
    }

    /// Add keys allowed to write chain-A meta blocks besides the operator's.
    pub fn with_meta_keys(mut self, keys: impl IntoIterator<Item = [u8; 32]>) -> Self {
        self.meta_keys = self.meta_keys.with_listed(keys);
        self
    }

    /// Change request-level options (before serving).
    pub fn with_options(mut self, f: impl FnOnce(&mut RelayOptions)) -> Self {
        f(&mut self.opts);
        self.runtime = OnceLock::new();
        self
    }

    /// The lock the last step of an upload (head re-check, commit, index)
    /// and the block follower ([`crate::cluster::follow`]) take.
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

    fn rt(&self) -> &Runtime {
        self.runtime.get_or_init(|| Runtime {
            rates: limits::RateLimits::new(&self.opts),
            json: Arc::new(Semaphore::new(self.opts.json_concurrency.max(1))),
            eval_queue: Arc::new(Semaphore::new(self.opts.eval_queue.max(1))),
            eval_run: Arc::new(Semaphore::new(self.opts.eval_concurrency.max(1))),
            web: self
                .opts
                .web_dir
                .as_ref()
                .map(|d| static_files::StaticFiles::new(d)),
        })
    }

    /// Entries in the per-IP and per-key rate tables (bounded by
    /// [`RelayOptions::rate_table_capacity`]).
    pub fn rate_table_sizes(&self) -> (usize, usize) {
        let r = &self.rt().rates;
        (r.ip.len(), r.key.len())
    }
}

/// An error response: the JSON [`ApiError`], its status (from the code
/// unless set), and a Retry-After for load shedding.
#[derive(Debug)]
pub struct HttpError {
    pub error: ApiError,
    pub status: Option<StatusCode>,
    pub retry_after: Option<u64>,
}

/// Error codes of the relay's own limits (in web-node's [`codes`] table, so
/// clients map them to the right status too).
pub mod relay_codes {
    pub use web_node::net::api::codes::{
        CORRUPT, METHOD_NOT_ALLOWED, TIMEOUT, UNAVAILABLE, UNSUPPORTED_MEDIA_TYPE,
    };
}

impl HttpError {
    pub fn with_status(error: ApiError, status: StatusCode) -> Self {
        Self {
            error,
            status: Some(status),
            retry_after: None,
        }
    }

    /// 429 with Retry-After.
    pub fn rate_limited(message: impl Into<String>, retry_after: u64) -> Self {
        Self {
            error: ApiError::new(codes::RATE_LIMITED, message),
            status: None,
            retry_after: Some(retry_after.max(1)),
        }
    }

    /// 503 with Retry-After.
    pub fn unavailable(message: impl Into<String>, retry_after: u64) -> Self {
        Self {
            error: ApiError::new(relay_codes::UNAVAILABLE, message),
            status: Some(StatusCode::SERVICE_UNAVAILABLE),
            retry_after: Some(retry_after.max(1)),
        }
    }

    pub fn unsupported_media(message: impl Into<String>) -> Self {
        Self::with_status(
            ApiError::new(relay_codes::UNSUPPORTED_MEDIA_TYPE, message),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        )
    }

    pub fn timeout(message: impl Into<String>) -> Self {
        Self::with_status(
            ApiError::new(relay_codes::TIMEOUT, message),
            StatusCode::REQUEST_TIMEOUT,
        )
    }
}

impl From<ApiError> for HttpError {
    fn from(error: ApiError) -> Self {
        Self {
            error,
            status: None,
            retry_after: None,
        }
    }
}

impl From<web_node::chain::ChainError> for HttpError {
    fn from(e: web_node::chain::ChainError) -> Self {
        ApiError::from(e).into()
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status = self.status.unwrap_or_else(|| {
            StatusCode::from_u16(self.error.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
        });
        let mut r = (status, Json(self.error)).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

type ApiResult<T> = Result<T, HttpError>;

pub(crate) fn store_err(e: StoreError) -> ApiError {
    crate::metrics::store_error(&e);
    match e {
        StoreError::NotFound(h) => ApiError::not_found(format!("block {h} not found")),
        StoreError::Duplicate(h) => {
            ApiError::new(codes::DUPLICATE, format!("block {h} already exists"))
        }
        StoreError::Range { .. } => ApiError::new(codes::RANGE_NOT_SATISFIABLE, e.to_string()),
        StoreError::Corrupt(m) => ApiError::new(relay_codes::CORRUPT, m),
        e => {
            tracing::error!(error = %e, "store failure");
            ApiError::internal(e.to_string())
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("task failed: {e}")))?
}

/// The client's address ([`serve`] and `into_make_service_with_connect_info`
/// set it; otherwise every client shares one rate bucket).
fn peer_ip(ext: &axum::http::Extensions) -> IpAddr {
    ext.get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
}

/// Store a trusted block (genesis, made by this relay) and insert it: full
/// validation, no gate, no write rules.
pub fn accept_block(
    state: &AppState,
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
    state.peers.block_added(block);
    tracing::info!(block = %block.hash, chain = ?block.header.chain, slot = %block.header.name, "block stored");
    Ok(BlockInfo::from(block).with_head(true))
}

/// The web app, the REST API, CORS for GET and request tracing.
pub fn app(state: SharedState) -> Router {
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
    Router::new()
        .route("/chain/{chain}/blocks", get(routes_read::list_chain))
        .route("/blocks", post(upload::upload_binary))
        .route("/blocks/{hash}", get(routes_read::get_block))
        .route("/blocks/{hash}/payload", get(routes_read::get_payload))
        .route("/blocks/{hash}/chunks", get(routes_read::get_chunks))
        .route("/heads", get(routes_read::get_heads))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/upload_moe_experts", post(upload::upload_json))
        .merge(crate::peers::routes())
        .merge(crate::chat::routes())
        .merge(crate::rewards::routes())
        .fallback(static_files::static_file)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
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
    state.meta_keys = MetaKeys::new(Some(key.verifying_key().to_bytes()));
    state.pg = pg;
    if chain.dag.chain(ChainId::A).next().is_none() {
        match &cfg.model_dir {
            Some(m) if m.join("config.json").is_file() => {
                let blocks = genesis::genesis_blocks(m, &key, genesis::now_ms())?;
                for (b, p) in &blocks {
                    match accept_block(&state, &mut chain, b, p) {
                        Ok(_) => {}
                        // Another relay on the same database made the genesis first.
                        Err(e)
                            if cfg.database.is_some()
                                && (e.code == codes::NOT_HEAD || e.code == codes::DUPLICATE) =>
                        {
                            tracing::info!("another relay created the genesis: using it");
                            chain = ChainState::load(state.store.as_ref())?;
                            break;
                        }
                        Err(e) => {
                            return Err(RelayError::Genesis(format!(
                                "block {}: {e}",
                                b.header.name
                            )))
                        }
                    }
                }
                tracing::info!(model = %m.display(), blocks = blocks.len(), "genesis created");
            }
            Some(m) => {
                tracing::warn!(model = %m.display(), "no config.json in the model dir: starting without genesis")
            }
            None => tracing::warn!("no model dir: starting without genesis"),
        }
    }
    tracing::info!(
        blocks = chain.len(),
        store = state.store.kind(),
        "chain loaded"
    );
    state.chain = Arc::new(RwLock::new(chain));
    Ok(state)
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
