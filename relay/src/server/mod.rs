//! The HTTP server: REST API over the store and static files of the web app.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path as UrlPath, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt as _;
use tokio::io::AsyncWriteExt as _;
use tokio::sync::RwLock;
use tower_http::cors::{Any, CorsLayer};
use tower_http::trace::TraceLayer;
use web_node::chain::{
    limits, validate_block, Block, BlockHash, ChainId, ChainView as _, ChunkHasher, Dag,
};
use web_node::net::api::{
    codes, ApiError, BlockInfo, ChunkList, HeadInfo, SeedUpload, MAX_JSON_UPLOAD,
};
use web_node::store::{BlockStore, StoreError};

use crate::gate::{AcceptAll, Gate, GateContext};
use crate::genesis;
use crate::store::FileStore;
use crate::RelayError;

/// Largest binary `POST /blocks` body: envelope plus the largest payload.
pub const MAX_BINARY_UPLOAD: u64 = 8 + limits::MAX_HEADER_LEN as u64 + 64 + limits::MAX_PAYLOAD_LEN;
/// Bytes read from the store per piece of a streamed payload response.
const PAYLOAD_PIECE: u64 = 1024 * 1024;

/// Relay settings.
#[derive(Debug, Clone)]
pub struct RelayOptions {
    /// Largest JSON upload body (413 above).
    pub max_json_body: usize,
    /// Largest binary upload body (413 above).
    pub max_binary_body: u64,
    /// Static files of the web app (trunk's `dist/`); None serves none.
    pub web_dir: Option<PathBuf>,
    /// Where binary uploads are staged while they stream in.
    pub staging_dir: PathBuf,
}

impl RelayOptions {
    pub fn new(staging_dir: PathBuf) -> Self {
        Self {
            max_json_body: MAX_JSON_UPLOAD,
            max_binary_body: MAX_BINARY_UPLOAD,
            web_dir: None,
            staging_dir,
        }
    }
}

/// Everything a request handler needs.
pub struct AppState {
    pub store: Arc<dyn BlockStore>,
    /// The chain index; uploads validate and insert under its write lock.
    pub dag: Arc<RwLock<Dag>>,
    gate: Arc<dyn Gate>,
    pub opts: RelayOptions,
}

pub type SharedState = Arc<AppState>;

impl AppState {
    pub fn new(store: Arc<dyn BlockStore>, dag: Dag, opts: RelayOptions) -> Self {
        Self {
            store,
            dag: Arc::new(RwLock::new(dag)),
            gate: Arc::new(AcceptAll),
            opts,
        }
    }

    /// Replace the acceptance gate (default [`AcceptAll`]).
    pub fn with_gate(mut self, gate: Arc<dyn Gate>) -> Self {
        self.gate = gate;
        self
    }

    /// The acceptance gate new versions of existing slots pass.
    pub fn gate(&self) -> &dyn Gate {
        self.gate.as_ref()
    }
}

fn store_err(e: StoreError) -> ApiError {
    match e {
        StoreError::NotFound(h) => ApiError::not_found(format!("block {h} not found")),
        StoreError::Duplicate(h) => {
            ApiError::new(codes::DUPLICATE, format!("block {h} already exists"))
        }
        StoreError::Range { .. } => ApiError::new(codes::RANGE_NOT_SATISFIABLE, e.to_string()),
        e => {
            tracing::error!(error = %e, "store failure");
            ApiError::internal(e.to_string())
        }
    }
}

/// Validate a block against the chain, pass the gate if it replaces a head,
/// store it and insert it into the DAG. Call with the DAG's write lock held.
pub fn accept_block(
    state: &AppState,
    dag: &mut Dag,
    block: &Block,
    payload: &[u8],
) -> Result<BlockInfo, ApiError> {
    accept_staged(state, dag, block, payload, None)
}

/// [`accept_block`] for an upload staged in a file (`envelope || payload`),
/// which the store may move into place.
fn accept_staged(
    state: &AppState,
    dag: &mut Dag,
    block: &Block,
    payload: &[u8],
    staged: Option<&Path>,
) -> Result<BlockInfo, ApiError> {
    let v = validate_block(block, payload, &*dag)?;
    let h = &block.header;
    if let Some(head) = dag.head(h.meta.as_ref(), &h.name) {
        let config = h.meta.as_ref().and_then(|m| dag.config(m));
        let ctx = GateContext {
            block,
            payload,
            head,
            config: config.as_ref(),
            dag,
            store: state.store.as_ref(),
        };
        if let Err(r) = state.gate().check(&ctx) {
            tracing::info!(block = %block.hash, slot = %h.name, reason = %r, "gate rejected block");
            return Err(r.into());
        }
    }
    match staged {
        Some(p) => state.store.put_staged(block, payload, p),
        None => state.store.put(block, payload),
    }
    .map_err(store_err)?;
    dag.insert(&v);
    tracing::info!(block = %block.hash, chain = ?h.chain, slot = %h.name, bytes = h.payload_len, "block accepted");
    Ok(BlockInfo::from(block).with_head(true))
}

/// An [`ApiError`] as an HTTP response.
pub struct HttpError(pub ApiError);

impl From<ApiError> for HttpError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self.0)).into_response()
    }
}

type ApiResult<T> = Result<T, HttpError>;

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("task failed: {e}")))?
}

fn parse_hash(p: Result<UrlPath<String>, PathRejection>) -> Result<BlockHash, ApiError> {
    let UrlPath(s) = p.map_err(|e| ApiError::malformed(e.body_text()))?;
    BlockHash::from_hex(&s)
        .map_err(|_| ApiError::malformed(format!("{s:?} is not a block hash (64 hex characters)")))
}

async fn get_block_of(state: &SharedState, hash: BlockHash) -> Result<Block, ApiError> {
    let store = state.store.clone();
    blocking(move || store.get(&hash).map_err(store_err))
        .await?
        .ok_or_else(|| ApiError::not_found(format!("block {hash} not found")))
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
        ]);
    Router::new()
        .route("/chain/{chain}/blocks", get(list_chain))
        .route("/blocks", post(upload_binary))
        .route("/blocks/{hash}", get(get_block))
        .route("/blocks/{hash}/payload", get(get_payload))
        .route("/blocks/{hash}/chunks", get(get_chunks))
        .route("/heads", get(get_heads))
        .route("/upload_moe_experts", post(upload_json))
        .fallback(static_file)
        .with_state(state)
        .layer(cors)
        .layer(TraceLayer::new_for_http())
}

async fn list_chain(
    State(st): State<SharedState>,
    chain: Result<UrlPath<String>, PathRejection>,
) -> ApiResult<Json<Vec<BlockInfo>>> {
    let UrlPath(c) = chain.map_err(|e| ApiError::malformed(e.body_text()))?;
    let chain = ChainId::parse(&c)
        .ok_or_else(|| ApiError::not_found(format!("no chain {c:?} (A or B)")))?;
    let store = st.store.clone();
    let blocks = blocking(move || store.list_chain(chain).map_err(store_err)).await?;
    let dag = st.dag.read().await;
    Ok(Json(
        blocks
            .iter()
            .map(|b| {
                let head = dag.head(b.header.meta.as_ref(), &b.header.name) == Some(b.hash);
                BlockInfo::from(b).with_head(head)
            })
            .collect(),
    ))
}

fn wants_binary(query: &Option<String>, headers: &HeaderMap) -> bool {
    let q = query.as_deref().unwrap_or_default();
    if q.split('&').any(|kv| kv == "format=bin") {
        return true;
    }
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/octet-stream"))
}

async fn get_block(
    State(st): State<SharedState>,
    hash: Result<UrlPath<String>, PathRejection>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let hash = parse_hash(hash)?;
    let b = get_block_of(&st, hash).await?;
    if wants_binary(&query, &headers) {
        return Ok((
            [(header::CONTENT_TYPE, "application/octet-stream")],
            b.encode(),
        )
            .into_response());
    }
    let head = st
        .dag
        .read()
        .await
        .head(b.header.meta.as_ref(), &b.header.name)
        == Some(b.hash);
    Ok(Json(BlockInfo::from(&b).with_head(head)).into_response())
}

/// A parsed single `Range: bytes=...` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RangeSpec {
    From(u64, Option<u64>),
    Suffix(u64),
}

/// Parse a single byte range; None for absent, multiple or unparsable ranges
/// (which are ignored: the whole payload is served).
fn parse_range(headers: &HeaderMap) -> Option<RangeSpec> {
    let v = headers.get(header::RANGE)?.to_str().ok()?.trim();
    let spec = v.strip_prefix("bytes=")?.trim();
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        return Some(RangeSpec::Suffix(b.parse().ok()?));
    }
    let start: u64 = a.parse().ok()?;
    let end = if b.is_empty() {
        None
    } else {
        Some(b.parse().ok()?)
    };
    if end.is_some_and(|e| e < start) {
        return None;
    }
    Some(RangeSpec::From(start, end))
}

/// Resolve a range against a length: Ok(start, end_exclusive), Err if unsatisfiable.
fn resolve_range(r: RangeSpec, len: u64) -> Result<(u64, u64), ()> {
    match r {
        RangeSpec::From(s, e) => {
            if s >= len {
                return Err(());
            }
            Ok((s, e.map_or(len, |e| e.saturating_add(1).min(len))))
        }
        RangeSpec::Suffix(n) => {
            if n == 0 || len == 0 {
                return Err(());
            }
            Ok((len - n.min(len), len))
        }
    }
}

async fn get_payload(
    State(st): State<SharedState>,
    hash: Result<UrlPath<String>, PathRejection>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let hash = parse_hash(hash)?;
    let b = get_block_of(&st, hash).await?;
    let len = b.header.payload_len;
    let (status, start, end) = match parse_range(&headers) {
        None => (StatusCode::OK, 0, len),
        Some(r) => match resolve_range(r, len) {
            Ok((s, e)) => (StatusCode::PARTIAL_CONTENT, s, e),
            Err(()) => {
                let mut resp = HttpError(ApiError::new(
                    codes::RANGE_NOT_SATISFIABLE,
                    format!("range outside the payload of {len} bytes"),
                ))
                .into_response();
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                    resp.headers_mut().insert(header::CONTENT_RANGE, v);
                }
                return Ok(resp);
            }
        },
    };
    let store = st.store.clone();
    let stream = futures_util::stream::unfold(start, move |pos| {
        let store = store.clone();
        async move {
            if pos >= end {
                return None;
            }
            let n = PAYLOAD_PIECE.min(end - pos);
            let r = tokio::task::spawn_blocking(move || store.read_payload(&hash, pos, n)).await;
            let item = match r {
                Ok(Ok(v)) => Ok(Bytes::from(v)),
                Ok(Err(e)) => Err(std::io::Error::other(e.to_string())),
                Err(e) => Err(std::io::Error::other(e.to_string())),
            };
            // After an error, end the stream (the client sees a short body).
            let next = if item.is_ok() { pos + n } else { end };
            Some((item, next))
        }
    });
    let mut resp = Response::new(Body::from_stream(stream));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
    if status == StatusCode::PARTIAL_CONTENT {
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{}/{len}", end - 1)) {
            h.insert(header::CONTENT_RANGE, v);
        }
    }
    Ok(resp)
}

async fn get_chunks(
    State(st): State<SharedState>,
    hash: Result<UrlPath<String>, PathRejection>,
) -> ApiResult<Json<ChunkList>> {
    let hash = parse_hash(hash)?;
    let b = get_block_of(&st, hash).await?;
    let store = st.store.clone();
    let list = blocking(move || {
        let h = &b.header;
        let mut hasher = ChunkHasher::new(h.chunk_size);
        let piece = (PAYLOAD_PIECE / h.chunk_size as u64).max(1) * h.chunk_size as u64;
        let mut pos = 0;
        while pos < h.payload_len {
            let n = piece.min(h.payload_len - pos);
            hasher.update(&store.read_payload(&hash, pos, n).map_err(store_err)?);
            pos += n;
        }
        let (chunks, root, _) = hasher.finish();
        if root != h.payload_root {
            return Err(ApiError::internal(format!(
                "stored payload of {hash} does not match its root"
            )));
        }
        Ok(ChunkList {
            hash,
            payload_len: h.payload_len,
            chunk_size: h.chunk_size,
            payload_root: h.payload_root,
            chunks,
        })
    })
    .await?;
    Ok(Json(list))
}

async fn get_heads(State(st): State<SharedState>) -> Json<Vec<HeadInfo>> {
    let dag = st.dag.read().await;
    Json(
        dag.heads()
            .map(|((meta, name), hash)| HeadInfo {
                meta: *meta,
                name: name.clone(),
                hash: *hash,
            })
            .collect(),
    )
}

fn too_large(what: &str, max: u64) -> ApiError {
    ApiError::new(
        codes::TOO_LARGE,
        format!("{what} is larger than {max} bytes"),
    )
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Validate, gate and store under the DAG's write lock, on a blocking thread.
async fn accept_async(
    st: SharedState,
    make: impl FnOnce(&Dag) -> Result<(Block, Vec<u8>), ApiError> + Send + 'static,
) -> ApiResult<(StatusCode, Json<BlockInfo>)> {
    let mut dag = st.dag.clone().write_owned().await;
    let info = blocking(move || {
        let (block, payload) = make(&dag)?;
        accept_block(&st, &mut dag, &block, &payload)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(info)))
}

async fn upload_json(
    State(st): State<SharedState>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<(StatusCode, Json<BlockInfo>)> {
    let max = st.opts.max_json_body;
    if content_length(&headers).is_some_and(|n| n > max as u64) {
        return Err(too_large("JSON body", max as u64).into());
    }
    let mut buf: Vec<u8> = Vec::new();
    let mut stream = body.into_data_stream();
    while let Some(piece) = stream.next().await {
        let piece = piece.map_err(|e| ApiError::malformed(format!("reading the body: {e}")))?;
        if buf.len() + piece.len() > max {
            return Err(too_large("JSON body", max as u64).into());
        }
        buf.extend_from_slice(&piece);
    }
    let up: SeedUpload = serde_json::from_slice(&buf)
        .map_err(|e| ApiError::malformed(format!("upload body: {e}")))?;
    drop(buf);
    accept_async(st, move |dag| {
        up.to_block(dag.latest_meta().map(|e| e.hash))
    })
    .await
}

async fn upload_binary(
    State(st): State<SharedState>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<(StatusCode, Json<BlockInfo>)> {
    let max = st.opts.max_binary_body;
    if content_length(&headers).is_some_and(|n| n > max) {
        return Err(too_large("block upload", max).into());
    }
    let dir = st.opts.staging_dir.clone();
    let tmp = blocking(move || {
        tempfile::Builder::new()
            .prefix("upload-")
            .tempfile_in(&dir)
            .map_err(|e| ApiError::internal(format!("staging upload: {e}")))
    })
    .await?;
    let (file, path) = tmp.into_parts();
    let mut file = tokio::fs::File::from_std(file);
    let mut total: u64 = 0;
    let mut stream = body.into_data_stream();
    while let Some(piece) = stream.next().await {
        let piece = piece.map_err(|e| ApiError::malformed(format!("reading the body: {e}")))?;
        total += piece.len() as u64;
        if total > max {
            return Err(too_large("block upload", max).into());
        }
        file.write_all(&piece)
            .await
            .map_err(|e| ApiError::internal(format!("staging upload: {e}")))?;
    }
    file.flush()
        .await
        .map_err(|e| ApiError::internal(format!("staging upload: {e}")))?;
    drop(file);
    let mut dag = st.dag.clone().write_owned().await;
    let info = blocking(move || {
        let mut bytes = std::fs::read(&path)
            .map_err(|e| ApiError::internal(format!("reading staged upload: {e}")))?;
        let (block, used) = Block::decode_prefix(&bytes)?;
        let payload = bytes.split_off(used);
        drop(bytes);
        // The store may move the staged file into place; otherwise dropping
        // `path` removes it.
        accept_staged(&st, &mut dag, &block, &payload, Some(&path))
    })
    .await?;
    Ok((StatusCode::CREATED, Json(info)))
}

/// Percent-decode a URL path; None if it is not valid UTF-8 or escapes are broken.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn content_type(p: &Path) -> &'static str {
    match p.extension().and_then(|e| e.to_str()).unwrap_or_default() {
        "html" | "htm" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "wasm" => "application/wasm",
        "css" => "text/css; charset=utf-8",
        "json" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "txt" | "md" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

/// Static files of the web app. Refuses `..`, `.`, backslashes and NUL in
/// any (decoded) segment, and anything resolving outside the web dir.
async fn static_file(
    State(st): State<SharedState>,
    method: Method,
    uri: Uri,
) -> ApiResult<Response> {
    let not_found = || ApiError::not_found(format!("no such resource: {}", uri.path()));
    if method != Method::GET && method != Method::HEAD {
        return Err(not_found().into());
    }
    let Some(root) = st.opts.web_dir.clone() else {
        return Err(not_found().into());
    };
    let decoded = percent_decode(uri.path())
        .ok_or_else(|| ApiError::malformed("bad percent-encoding in path"))?;
    let mut rel = PathBuf::new();
    for seg in decoded.split('/') {
        if seg.is_empty() {
            continue;
        }
        if seg == "."
            || seg == ".."
            || seg.contains('\\')
            || seg.contains('\0')
            || seg.contains(':')
        {
            return Err(ApiError::malformed("path traversal refused").into());
        }
        rel.push(seg);
    }
    let file = blocking(move || {
        let root = root
            .canonicalize()
            .map_err(|_| ApiError::not_found("no web app here"))?;
        let mut p = root.join(&rel);
        if p.is_dir() {
            p = p.join("index.html");
        }
        let p = match p.canonicalize() {
            Ok(p) => p,
            Err(_) => return Ok(None),
        };
        if !p.starts_with(&root) || !p.is_file() {
            return Ok(None);
        }
        let bytes = std::fs::read(&p).map_err(|e| ApiError::internal(e.to_string()))?;
        Ok(Some((content_type(&p), bytes)))
    })
    .await?;
    match file {
        Some((ct, bytes)) => Ok(([(header::CONTENT_TYPE, ct)], bytes).into_response()),
        None => Err(not_found().into()),
    }
}

/// Everything `relay serve` needs besides the address.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    pub web_dir: Option<PathBuf>,
    /// The genesis model (HF dir); used when the chain has no meta block.
    pub model_dir: Option<PathBuf>,
}

/// Open the store (repairing it), load the DAG, create the operator key and
/// the genesis blocks if needed. Blocking.
pub fn open_relay(cfg: &ServeConfig) -> Result<AppState, RelayError> {
    std::fs::create_dir_all(&cfg.data_dir)?;
    let (store, report) = FileStore::open(&cfg.data_dir)?;
    if report.removed_temp > 0 || !report.dropped.is_empty() || !report.orphans.is_empty() {
        tracing::warn!(
            removed_temp = report.removed_temp,
            dropped = report.dropped.len(),
            orphans = report.orphans.len(),
            "store repaired on open"
        );
    }
    let mut dag = web_node::store::load_dag(&store)?;
    adopt_orphans(&store, &mut dag, &report.orphans);
    let key = genesis::operator_key(&cfg.data_dir)?;
    let store: Arc<dyn BlockStore> = Arc::new(store);
    let mut opts = RelayOptions::new(cfg.data_dir.join("tmp"));
    opts.web_dir = cfg.web_dir.clone();
    let state = AppState::new(store, Dag::new(), opts);
    if dag.chain(ChainId::A).next().is_none() {
        match &cfg.model_dir {
            Some(m) if m.join("config.json").is_file() => {
                let blocks = genesis::genesis_blocks(m, &key, genesis::now_ms())?;
                for (b, p) in &blocks {
                    accept_block(&state, &mut dag, b, p).map_err(|e| {
                        RelayError::Genesis(format!("block {}: {e}", b.header.name))
                    })?;
                }
                tracing::info!(model = %m.display(), blocks = blocks.len(), "genesis created");
            }
            Some(m) => {
                tracing::warn!(model = %m.display(), "no config.json in the model dir: starting without genesis")
            }
            None => tracing::warn!("no model dir: starting without genesis"),
        }
    }
    tracing::info!(blocks = dag.len(), "chain loaded");
    Ok(AppState {
        dag: Arc::new(RwLock::new(dag)),
        ..state
    })
}

/// Validate block files found without an index entry; index the valid ones
/// (they passed validation and the gate before they were written), quarantine the rest.
fn adopt_orphans(store: &FileStore, dag: &mut Dag, orphans: &[BlockHash]) {
    let mut left: Vec<BlockHash> = orphans.to_vec();
    loop {
        let before = left.len();
        left.retain(|h| {
            let Ok((b, p)) = store.read_orphan(h) else {
                return true;
            };
            match validate_block(&b, &p, &*dag) {
                Ok(v) => match store.put(&b, &p) {
                    Ok(()) => {
                        dag.insert(&v);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn hm(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::RANGE, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn ranges_parse_and_resolve() {
        assert_eq!(
            parse_range(&hm("bytes=0-9")),
            Some(RangeSpec::From(0, Some(9)))
        );
        assert_eq!(parse_range(&hm("bytes=5-")), Some(RangeSpec::From(5, None)));
        assert_eq!(parse_range(&hm("bytes=-3")), Some(RangeSpec::Suffix(3)));
        assert_eq!(parse_range(&hm("bytes=0-1,4-5")), None);
        assert_eq!(parse_range(&hm("bytes=9-1")), None);
        assert_eq!(parse_range(&hm("items=0-1")), None);
        assert_eq!(resolve_range(RangeSpec::From(0, Some(9)), 5), Ok((0, 5)));
        assert_eq!(resolve_range(RangeSpec::From(5, None), 5), Err(()));
        assert_eq!(resolve_range(RangeSpec::Suffix(3), 10), Ok((7, 10)));
        assert_eq!(resolve_range(RangeSpec::Suffix(30), 10), Ok((0, 10)));
        assert_eq!(
            resolve_range(RangeSpec::From(0, Some(u64::MAX)), 10),
            Ok((0, 10))
        );
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("/a%2F..%2fb").as_deref(), Some("/a/../b"));
        assert_eq!(percent_decode("/%zz"), None);
        assert_eq!(percent_decode("/%"), None);
        assert_eq!(percent_decode("/%ff"), None);
    }
}
