//! REST glue and the page's driver of the client core's payload sourcing:
//! listings, payloads over HTTP, the peer network through [`net::fetch`],
//! the cache, and the [`Supply`] that hands the engine an expert's weights.
//! Where a payload comes from (memory → cache → peers → REST), how often a
//! source is tried again and when it fails over are the core's
//! ([`PayloadFetch`]); so is the check of every answer against the block's
//! verified header. This file only moves the bytes.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::rc::Rc;
use std::sync::Arc;

use futures_channel::oneshot;
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::JsFuture;

use crate::chain::{verify_held_payload, Block, BlockHash, ChainId, Dag, PayloadStatus};
use crate::client::source::{Answer, Next, PayloadFetch, SourceError, SourcePolicy};
use crate::model::{Config, ExpertId, ExpertWeights, ModelError, Slot, Supply};
use crate::net::api::{BlockInfo, ChunkList};

pub use crate::client::source::Origin;

use super::cache::Cache;
use super::dom::{js_err, set_progress};
use super::{net, panels};
use crate::client::listing::{link_has_next, Pager, MAX_PAGE};
use crate::view::budget::ByteLru;
use crate::view::fmt_bytes;

/// Bytes per payload request: a payload up to this size comes in one
/// request, a larger one as range requests of this size in flight together.
const PIECE_BYTES: u64 = 1024 * 1024;

/// What this page fetched from the relay.
#[derive(Debug, Clone, Default)]
pub struct FetchStats {
    /// Every body byte (listings, chunk lists, payloads).
    pub bytes: u64,
    /// Payload bytes (chunks), including payloads fetched again after a refusal.
    pub payload_bytes: u64,
    pub requests: u64,
    /// Payloads fetched and verified.
    pub payloads: u64,
    /// Downloaded payloads refused by the checks (and fetched again).
    pub refused_payloads: u64,
    /// Experts whose verified payload this session holds (downloaded or
    /// taken from the cache).
    pub experts: BTreeSet<ExpertId>,
    /// Payload bytes that came over the peer network (`/ws`: from other
    /// nodes through the relay, or the relay's store as its fallback).
    pub ws_payload_bytes: u64,
    /// Payloads taken from the browser's cache after re-verification.
    pub cache_hits: u64,
    /// Cache entries dropped: corrupt (failed re-verification) or stale
    /// (no longer a verified block of the chain).
    pub cache_dropped: u64,
    /// Cache entries found corrupt (and deleted) while sourcing.
    pub corrupt_cached: Vec<BlockHash>,
    /// Payloads the peer network could not deliver, fetched over REST instead.
    pub ws_fallbacks: u64,
    /// Asks for a payload that a prefetch had already started or finished.
    pub prefetch_hits: u64,
    /// Milliseconds the page waited for payload batches (network and
    /// verification), and for cache writes.
    pub fetch_ms: f64,
    pub store_ms: f64,
}

impl FetchStats {
    /// Add the counters of a fetch that ran beside others.
    pub fn add(&mut self, o: &FetchStats) {
        self.bytes += o.bytes;
        self.payload_bytes += o.payload_bytes;
        self.requests += o.requests;
        self.payloads += o.payloads;
        self.refused_payloads += o.refused_payloads;
        self.experts.extend(o.experts.iter().copied());
        self.ws_payload_bytes += o.ws_payload_bytes;
        self.cache_hits += o.cache_hits;
        self.cache_dropped += o.cache_dropped;
        self.corrupt_cached.extend(o.corrupt_cached.iter().copied());
        self.ws_fallbacks += o.ws_fallbacks;
        self.prefetch_hits += o.prefetch_hits;
        self.fetch_ms += o.fetch_ms;
        self.store_ms += o.store_ms;
    }
}

/// A failed request: the HTTP status when the relay answered.
#[derive(Debug, Clone)]
struct HttpError {
    status: Option<u16>,
    text: String,
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl From<String> for HttpError {
    fn from(text: String) -> Self {
        Self { status: None, text }
    }
}

impl From<HttpError> for String {
    fn from(e: HttpError) -> Self {
        e.text
    }
}

impl HttpError {
    /// For the core: a missing block or a refused request moves on to the
    /// next source; a lost connection, a timeout or a 5xx is tried again.
    fn source_error(self) -> SourceError {
        match self.status {
            None | Some(408 | 429) => SourceError::Transient(self.text),
            Some(s) if s >= 500 => SourceError::Transient(self.text),
            Some(_) => SourceError::Missing(self.text),
        }
    }
}

/// Send one request relative to the page; a network failure names the
/// method and URL.
async fn send(url: &str, init: &web_sys::RequestInit) -> Result<web_sys::Response, String> {
    let window = web_sys::window().ok_or("no window")?;
    let method = init.get_method().unwrap_or_default();
    let req = web_sys::Request::new_with_str_and_init(url, init).map_err(js_err)?;
    JsFuture::from(window.fetch_with_request(&req))
        .await
        .map_err(|e| format!("{method} {url}: {}", js_err(e)))?
        .dyn_into()
        .map_err(js_err)
}

/// One GET relative to the page; non-2xx answers are errors with the relay's
/// message. Returns the body and the `Link` header.
async fn get(
    url: &str,
    range: Option<(u64, u64)>,
    stats: &mut FetchStats,
) -> Result<(Vec<u8>, Option<String>), HttpError> {
    let init = web_sys::RequestInit::new();
    init.set_method("GET");
    if let Some((start, end)) = range {
        let headers = web_sys::Headers::new().map_err(js_err)?;
        headers
            .set("Range", &format!("bytes={start}-{}", end - 1))
            .map_err(js_err)?;
        init.set_headers(&headers);
    }
    stats.requests += 1;
    let resp = send(url, &init).await?;
    let buf = JsFuture::from(resp.array_buffer().map_err(js_err)?)
        .await
        .map_err(|e| format!("GET {url}: {}", js_err(e)))?;
    let body = js_sys::Uint8Array::new(&buf).to_vec();
    stats.bytes += body.len() as u64;
    if !resp.ok() {
        let text: String = String::from_utf8_lossy(&body).chars().take(300).collect();
        return Err(HttpError {
            status: Some(resp.status()),
            text: format!("HTTP {} for {url}: {text}", resp.status()),
        });
    }
    let link = resp.headers().get("link").ok().flatten();
    Ok((body, link))
}

/// `GET url` as JSON (relay's REST API; not counted as block bytes).
pub async fn get_json<T: serde::de::DeserializeOwned>(url: &str) -> Result<T, String> {
    let (body, _) = get(url, None, &mut FetchStats::default()).await?;
    serde_json::from_slice(&body).map_err(|e| format!("{url}: bad JSON: {e}"))
}

/// `POST url` with a JSON body; the answer's status and body text.
pub async fn post_json<T: serde::Serialize>(url: &str, body: &T) -> Result<(u16, String), String> {
    let json = serde_json::to_string(body).map_err(|e| e.to_string())?;
    let init = web_sys::RequestInit::new();
    init.set_method("POST");
    let headers = web_sys::Headers::new().map_err(js_err)?;
    headers
        .set("Content-Type", "application/json")
        .map_err(js_err)?;
    init.set_headers(&headers);
    init.set_body(&wasm_bindgen::JsValue::from_str(&json));
    let resp = send(url, &init).await?;
    let text = JsFuture::from(resp.text().map_err(js_err)?)
        .await
        .map_err(|e| format!("POST {url}: {}", js_err(e)))?
        .as_string()
        .unwrap_or_default();
    Ok((resp.status(), text))
}

/// `GET /chain/{A|B}/blocks`, every page, through the client core's
/// [`Pager`] (the one every client lists with: its own cursor, bounded, a
/// page that does not advance or repeats a block is an error).
pub async fn list_chain(chain: ChainId, stats: &mut FetchStats) -> Result<Vec<BlockInfo>, String> {
    let mut pager = Pager::new(chain, MAX_PAGE);
    while let Some(req) = pager.next_request() {
        let url = req.path();
        let (body, link) = get(&url, None, stats).await?;
        pager
            .on_page_body(&body, Some(link_has_next(link.as_deref())))
            .map_err(|e| e.to_string())?;
    }
    pager.finish().map_err(|e| e.to_string())
}

/// A whole payload in one request (chain-A payloads: small JSON, checked by
/// [`crate::verify::verify_chain_dag`]).
pub async fn get_payload(hash: &BlockHash, stats: &mut FetchStats) -> Result<Vec<u8>, String> {
    let (body, _) = get(&format!("/blocks/{}/payload", hash.to_hex()), None, stats).await?;
    stats.payload_bytes += body.len() as u64;
    stats.payloads += 1;
    Ok(body)
}

/// `GET /blocks/{hash}/chunks`: the chunk hashes the payload root commits
/// to (the peer node checks them against the root before it asks peers).
async fn chunk_list(block: &Block, stats: &mut FetchStats) -> Result<Vec<BlockHash>, HttpError> {
    let (body, _) = get(
        &format!("/blocks/{}/chunks", block.hash.to_hex()),
        None,
        stats,
    )
    .await?;
    let list: ChunkList = serde_json::from_slice(&body)
        .map_err(|e| HttpError::from(format!("bad chunk list: {e}")))?;
    Ok(list.chunks)
}

/// Payloads fetched at once for one batch (the engine's need for a layer):
/// the peer node's chunk credits bound what is in flight on `/ws`, the
/// browser's six connections per host what is in flight over HTTP.
pub const PARALLEL_PAYLOADS: usize = 16;
/// Range requests in flight for one large payload.
const PARALLEL_PIECES: usize = 4;
/// Prefetches running in the background at most.
const MAX_AHEAD: usize = 16;

/// A boxed future of the page's single thread.
pub type LocalFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + 'a>>;

/// A payload and where it came from, or why not.
pub type Sourced = Result<(Arc<[u8]>, Origin), String>;

/// Run `futs` with at most `n` in flight; the outputs in the order given.
pub async fn join_bounded<'a, T>(futs: Vec<LocalFuture<'a, T>>, n: usize) -> Vec<T> {
    let total = futs.len();
    let mut queue: std::collections::VecDeque<_> = futs.into_iter().enumerate().collect();
    let mut running: Vec<(usize, LocalFuture<'a, T>)> = Vec::new();
    let mut out: Vec<Option<T>> = (0..total).map(|_| None).collect();
    std::future::poll_fn(|cx| loop {
        while running.len() < n.max(1) {
            match queue.pop_front() {
                Some(f) => running.push(f),
                None => break,
            }
        }
        let mut done = false;
        running.retain_mut(|(i, f)| match f.as_mut().poll(cx) {
            std::task::Poll::Ready(v) => {
                out[*i] = Some(v);
                done = true;
                false
            }
            std::task::Poll::Pending => true,
        });
        if running.is_empty() && queue.is_empty() {
            return std::task::Poll::Ready(());
        }
        if !done {
            return std::task::Poll::Pending;
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

/// A payload over HTTP: one request up to [`PIECE_BYTES`], else range
/// requests in flight together, put back in order. Unchecked here: the
/// core verifies the whole payload against the header (every chunk hash
/// against the payload root, then the tensors), so no chunk list is asked
/// for.
async fn rest_payload(block: &Block, stats: &mut FetchStats) -> Result<Vec<u8>, SourceError> {
    let url = format!("/blocks/{}/payload", block.hash.to_hex());
    let len = block.header.payload_len;
    if len <= PIECE_BYTES {
        let (bytes, _) = get(&url, None, stats)
            .await
            .map_err(HttpError::source_error)?;
        stats.payload_bytes += bytes.len() as u64;
        return Ok(bytes);
    }
    let ranges: Vec<(u64, u64)> = (0..len.div_ceil(PIECE_BYTES))
        .map(|i| (i * PIECE_BYTES, ((i + 1) * PIECE_BYTES).min(len)))
        .collect();
    type Got = (Result<Vec<u8>, HttpError>, FetchStats);
    let futs: Vec<LocalFuture<'_, Got>> = ranges
        .iter()
        .map(|&r| {
            let url = url.clone();
            Box::pin(async move {
                let mut st = FetchStats::default();
                let got = get(&url, Some(r), &mut st).await.map(|(b, _)| b);
                (got, st)
            }) as LocalFuture<'_, Got>
        })
        .collect();
    let mut out = Vec::with_capacity(len as usize);
    for ((start, end), (got, st)) in ranges.iter().zip(join_bounded(futs, PARALLEL_PIECES).await) {
        stats.add(&st);
        let bytes = got.map_err(HttpError::source_error)?;
        stats.payload_bytes += bytes.len() as u64;
        if bytes.len() as u64 != end - start {
            // A relay that ignores Range sends the whole payload: wrong here.
            return Err(SourceError::Transient(format!(
                "bytes {start}-{end} of {url}: {} bytes came",
                bytes.len()
            )));
        }
        out.extend_from_slice(&bytes);
    }
    Ok(out)
}

/// `?via=rest` in the page's address: payloads over HTTP only, never the
/// peer network (to compare the two paths, or where `/ws` is blocked).
fn rest_only() -> bool {
    thread_local! {
        static REST: bool = web_sys::window()
            .and_then(|w| w.location().search().ok())
            .is_some_and(|s| crate::view::budget::query_param(&s, "via") == Some("rest"));
    }
    REST.with(|r| *r)
}

/// The page's source order: the core's node order (memory, cache, peers,
/// REST), without the peers under `?via=rest`.
fn policy() -> SourcePolicy {
    let mut p = SourcePolicy::node();
    if rest_only() {
        p.order.retain(|o| *o != Origin::Peers);
    }
    p
}

/// What one payload can be sourced from, owned so that a prefetch runs on
/// its own: this session's verified copy, the cache (when it holds the block).
struct Reach {
    memory: Option<Arc<[u8]>>,
    cache: Option<Rc<Cache>>,
}

/// One payload, driven through the core's [`PayloadFetch`]: each source it
/// names is asked (after the delay it names), each answer handed back, a
/// corrupt cache entry deleted, until the core has a verified payload or
/// every source failed. The counters come back with it.
async fn source(block: Block, config: Option<Config>, reach: Reach) -> (Sourced, FetchStats) {
    let mut stats = FetchStats::default();
    let mut f = PayloadFetch::new(block.clone(), config.clone(), policy());
    loop {
        let (origin, delay_ms) = match f.next() {
            Next::Ask {
                origin, delay_ms, ..
            } => (origin, delay_ms),
            Next::Done(o) => return (Err(format!("{o}: answered twice")), stats),
            Next::Failed(why) => return (Err(why), stats),
        };
        if delay_ms > 0 {
            super::sleep_ms(delay_ms.min(i32::MAX as u64) as i32).await;
        }
        let got = match origin {
            Origin::Memory => match &reach.memory {
                // Verified when it came in this session: not again.
                Some(p) if f.on_checked(Origin::Memory) => {
                    return (Ok((p.clone(), Origin::Memory)), stats)
                }
                _ => Err(SourceError::Missing("not held".into())),
            },
            Origin::Cache => match &reach.cache {
                None => Err(SourceError::Missing("not cached".into())),
                Some(c) => match c.get(&block.hash).await {
                    Ok(Some(b)) => Ok(b),
                    Ok(None) => Err(SourceError::Missing("not cached".into())),
                    Err(e) => {
                        panels::alert(
                            "cache-corrupt",
                            &format!("The block cache could not be read: {e}"),
                        );
                        Err(SourceError::Unavailable(e))
                    }
                },
            },
            Origin::Peers => {
                if !net::online() {
                    f.skip(Origin::Peers, "not connected to the peer network");
                    continue;
                }
                let got = match chunk_list(&block, &mut stats).await {
                    // The node fails over to the relay's store itself: a
                    // failure here is final for this source.
                    Ok(list) => net::fetch(&block, list, config.clone())
                        .await
                        .map_err(SourceError::Missing),
                    Err(e) => Err(e.source_error()),
                };
                match got {
                    // The node checked the chunk list against the root,
                    // every chunk against it and the content rules: the
                    // core takes it without a second pass.
                    Ok(p) => {
                        stats.ws_payload_bytes += p.len() as u64;
                        stats.payload_bytes += p.len() as u64;
                        if f.on_checked(Origin::Peers) {
                            return (Ok((p, Origin::Peers)), stats);
                        }
                        continue;
                    }
                    Err(e) => Err(e),
                }
            }
            Origin::Rest => rest_payload(&block, &mut stats).await,
        };
        match f.on_answer(origin, got) {
            Answer::Verified(bytes) => {
                if origin == Origin::Cache {
                    stats.cache_hits += 1;
                }
                return (Ok((bytes.into(), origin)), stats);
            }
            Answer::Corrupt(Origin::Cache, e) => {
                if let Some(c) = &reach.cache {
                    drop_corrupt(c, &block, &e, &mut stats).await;
                }
                stats.corrupt_cached.push(block.hash);
            }
            Answer::Corrupt(o, e) => {
                stats.refused_payloads += 1;
                // Checked chunk by chunk from now on, so that a refusal
                // names the bad chunk (one more request, on failure only).
                if !f.has_chunk_list() {
                    if let Ok(list) = chunk_list(&block, &mut stats).await {
                        let _ = f.set_chunk_list(list);
                    }
                }
                panels::alert(
                    "bad-block",
                    &format!(
                        "The payload of {} from {o} failed verification ({e}); fetching it again.",
                        block.header.name
                    ),
                );
            }
            Answer::Retry => {}
            Answer::Failover => {
                if origin == Origin::Peers {
                    stats.ws_fallbacks += 1;
                    set_progress(&format!(
                        "{}: the peer network could not deliver it; fetching over HTTP…",
                        block.header.name
                    ));
                }
            }
        }
    }
}

/// Payloads being fetched ahead of the engine's asks (prefetched), and
/// those fetched and not taken yet.
#[derive(Default)]
pub struct Ahead {
    /// Running: who waits for each.
    running: HashMap<BlockHash, Vec<oneshot::Sender<()>>>,
    landed: HashMap<BlockHash, (Sourced, FetchStats)>,
    /// Header payload bytes of what runs or landed.
    bytes: u64,
}

/// The page's verified chain: the blocks whose headers it verified, the DAG
/// with each payload's status, and the payloads it holds. In memory it
/// keeps only what a model cannot run without (meta, shared, routers); an
/// expert's verified payload goes to the cache (IndexedDB, bounded by the
/// budget, least recently used experts evicted first) and to the peer node
/// (served to others while it fits the budget), and is read back when the
/// engine asks again. [`VerifiedChain::payload`] gets and verifies the rest.
pub struct VerifiedChain {
    pub blocks: HashMap<BlockHash, Block>,
    pub dag: Dag,
    /// Startup payloads (meta, shared, routers), held for the session.
    pub payloads: HashMap<BlockHash, Arc<[u8]>>,
    pub stats: FetchStats,
    /// The persistent cache (`None` when IndexedDB is unavailable).
    pub cache: Option<Rc<Cache>>,
    /// What the cache holds, by block: bytes and last use (startup blocks
    /// protected).
    pub cached: ByteLru<BlockHash>,
    /// Expert payloads the peer node holds and serves.
    pub served: ByteLru<BlockHash>,
    /// Payload bytes the page may keep of experts: the cache holds at most
    /// this much; in memory the engine's decoded experts take half, the
    /// payloads the peer node serves three eighths, prefetched payloads
    /// and cache writes waiting for their batch an eighth each.
    pub budget: u64,
    /// Cache entries evicted (budget or quota) this session.
    pub evicted: u64,
    /// Prefetches.
    pub ahead: Rc<RefCell<Ahead>>,
    /// Downloaded payloads waiting to be written to the cache in one
    /// transaction ([`VerifiedChain::flush_cache`]).
    pub unwritten: Vec<(Block, Arc<[u8]>)>,
}

impl VerifiedChain {
    /// The model config a block's payload is checked against.
    fn config_of(&self, block: &Block) -> Option<Config> {
        block
            .header
            .meta
            .and_then(|m| self.dag.get(&m))
            .and_then(|e| e.config.clone())
    }

    /// Where `block`'s payload can be sourced from now.
    fn reach(&self, block: &Block) -> Reach {
        Reach {
            memory: self.payloads.get(&block.hash).cloned(),
            cache: self
                .cache
                .clone()
                .filter(|_| self.cached.contains(&block.hash)),
        }
    }

    /// The verified payload of a header-verified block: held, or fetched
    /// and verified now. A failure is recorded in the DAG (the page shows
    /// it) and returned.
    pub async fn payload(&mut self, hash: &BlockHash, label: &str) -> Result<Arc<[u8]>, String> {
        set_progress(&format!("fetching {label}…"));
        let mut got = self.payloads_many(&[*hash]).await;
        got.pop()
            .unwrap_or_else(|| Err("nothing fetched".into()))
            .map(|(p, _)| p)
    }

    /// Start fetching `hashes` in the background (the experts the engine
    /// is likely to ask for next), within [`MAX_AHEAD`] running and an
    /// eighth of the budget in flight or waiting; skipped: what is held in
    /// memory or already running. [`VerifiedChain::payloads_many`] takes
    /// them when they are asked for.
    pub fn prefetch(&mut self, hashes: &[BlockHash]) {
        let cap = self.budget / 8;
        for h in hashes {
            let Some(block) = self.blocks.get(h).cloned() else {
                continue;
            };
            let len = block.header.payload_len;
            {
                let a = self.ahead.borrow();
                if a.running.len() >= MAX_AHEAD || a.bytes + len > cap {
                    return;
                }
                if a.running.contains_key(h) || a.landed.contains_key(h) {
                    continue;
                }
            }
            if self.payloads.contains_key(h) || self.cached.contains(h) {
                // In memory or one IndexedDB read away: nothing to win.
                continue;
            }
            let config = self.config_of(&block);
            let reach = self.reach(&block);
            {
                let mut a = self.ahead.borrow_mut();
                a.running.insert(*h, Vec::new());
                a.bytes += len;
            }
            let ahead = self.ahead.clone();
            let hash = *h;
            wasm_bindgen_futures::spawn_local(async move {
                let got = source(block, config, reach).await;
                let mut a = ahead.borrow_mut();
                for w in a.running.remove(&hash).unwrap_or_default() {
                    let _ = w.send(());
                }
                a.landed.insert(hash, got);
            });
        }
    }

    /// Prefetched payloads nobody asked for: verified ones kept (cache,
    /// peer node) like any download, so they leave memory.
    fn settle_landed(&mut self, except: &[BlockHash]) {
        let landed: Vec<(BlockHash, (Sourced, FetchStats))> = {
            let mut a = self.ahead.borrow_mut();
            let keys: Vec<BlockHash> = a
                .landed
                .keys()
                .filter(|h| !except.contains(h))
                .copied()
                .collect();
            keys.into_iter()
                .filter_map(|h| a.landed.remove(&h).map(|v| (h, v)))
                .collect()
        };
        for (h, (r, st)) in landed {
            self.release_ahead(&h);
            self.stats.add(&st);
            if let (Ok((p, origin)), Some(block)) = (r, self.blocks.get(&h).cloned()) {
                let p = self.keep(&block, p, origin);
                if matches!(origin, Origin::Peers | Origin::Rest) {
                    self.unwritten.push((block, p));
                }
            }
        }
    }

    /// A prefetch's bytes leave the prefetch share.
    fn release_ahead(&mut self, h: &BlockHash) {
        let len = self.blocks.get(h).map_or(0, |b| b.header.payload_len);
        let mut a = self.ahead.borrow_mut();
        a.bytes = a.bytes.saturating_sub(len);
    }

    /// Several payloads at once ([`PARALLEL_PAYLOADS`] in flight), each
    /// sourced by the core ([`source`]): this session's memory, the cache
    /// (re-verified against the header), the peer network through the
    /// relay's `/ws`, or the relay's REST API; one a prefetch started is
    /// waited for. One result per hash, in order; failures are recorded in
    /// the DAG. Downloads are written to the cache in batches
    /// ([`VerifiedChain::flush_cache`]) once an eighth of the budget waits.
    pub async fn payloads_many(&mut self, hashes: &[BlockHash]) -> Vec<Sourced> {
        self.settle_landed(hashes);
        let mut out: Vec<Option<Sourced>> = Vec::new();
        type Got = (Sourced, FetchStats);
        let mut futs: Vec<LocalFuture<'static, Got>> = Vec::new();
        let mut todo: Vec<(usize, Block, bool)> = Vec::new();
        for (i, h) in hashes.iter().enumerate() {
            let Some(b) = self.blocks.get(h).cloned() else {
                out.push(Some(Err(format!(
                    "block {} has no verified header",
                    h.short()
                ))));
                continue;
            };
            out.push(None);
            let waiting = {
                let mut a = self.ahead.borrow_mut();
                if a.landed.contains_key(h) {
                    Some(None)
                } else if let Some(ws) = a.running.get_mut(h) {
                    let (tx, rx) = oneshot::channel();
                    ws.push(tx);
                    Some(Some(rx))
                } else {
                    None
                }
            };
            let from_ahead = waiting.is_some();
            let config = self.config_of(&b);
            let reach = self.reach(&b);
            let fut: LocalFuture<'static, Got> = match waiting {
                Some(rx) => {
                    self.stats.prefetch_hits += 1;
                    let ahead = self.ahead.clone();
                    let (hash, block) = (*h, b.clone());
                    Box::pin(async move {
                        if let Some(rx) = rx {
                            let _ = rx.await;
                        }
                        let landed = ahead.borrow_mut().landed.remove(&hash);
                        match landed {
                            Some((Ok(p), st)) => (Ok(p), st),
                            // A prefetch that failed is sourced again now.
                            other => {
                                let mut st = other.map(|(_, st)| st).unwrap_or_default();
                                let (r, again) = source(block, config, reach).await;
                                st.add(&again);
                                (r, st)
                            }
                        }
                    })
                }
                None => Box::pin(source(b.clone(), config, reach)),
            };
            futs.push(fut);
            todo.push((i, b, from_ahead));
        }
        if !todo.is_empty() {
            let t0 = super::dom::now_ms();
            let got = join_bounded(futs, PARALLEL_PAYLOADS).await;
            self.stats.fetch_ms += super::dom::now_ms() - t0;
            for ((i, block, from_ahead), (r, st)) in todo.into_iter().zip(got) {
                if from_ahead {
                    self.release_ahead(&block.hash);
                }
                self.stats.add(&st);
                for h in &st.corrupt_cached {
                    self.cached.remove(h);
                }
                let r = match r {
                    Ok((p, origin)) => {
                        let p = self.keep(&block, p, origin);
                        if matches!(origin, Origin::Peers | Origin::Rest) {
                            self.unwritten.push((block, p.clone()));
                        }
                        Ok((p, origin))
                    }
                    Err(e) => {
                        self.dag
                            .set_payload(&block.hash, PayloadStatus::Failed(e.clone()), None);
                        Err(e)
                    }
                };
                out[i] = Some(r);
            }
            let waiting: u64 = self.unwritten.iter().map(|(_, p)| p.len() as u64).sum();
            if waiting > self.budget / 8 {
                self.flush_cache().await;
            }
        }
        out.into_iter()
            .map(|r| r.unwrap_or_else(|| Err("not fetched".into())))
            .collect()
    }

    /// Write the downloads waiting for it to the cache, in one transaction
    /// (prefetches that landed and were not asked for among them).
    pub async fn flush_cache(&mut self) {
        self.settle_landed(&[]);
        let items = std::mem::take(&mut self.unwritten);
        if items.is_empty() {
            return;
        }
        let t1 = super::dom::now_ms();
        self.cache_put_many(items).await;
        self.stats.store_ms += super::dom::now_ms() - t1;
    }

    /// The peer node's share of the budget: three eighths (the engine's
    /// decoded experts take half, prefetched payloads an eighth).
    pub fn served_cap(&self) -> u64 {
        self.budget / 8 * 3
    }

    /// Blocks whose verified payload this page holds: in memory (the
    /// model's core, or served to peers) or in the cache.
    pub fn held_blocks(&self) -> BTreeSet<BlockHash> {
        self.payloads
            .keys()
            .chain(self.cached.keys())
            .chain(self.served.keys())
            .copied()
            .collect()
    }

    /// The experts whose verified payload this page holds: in the cache
    /// (re-verified when read) or served from memory.
    pub fn held_experts(&self) -> BTreeSet<ExpertId> {
        self.cached
            .keys()
            .chain(self.served.keys())
            .filter_map(|h| self.dag.get(h))
            .filter_map(|e| match Slot::parse(&e.header.name) {
                Ok(Slot::Expert { layer, expert }) => Some(ExpertId::new(layer, expert)),
                _ => None,
            })
            .collect()
    }

    /// Whether a block is an expert (evictable) rather than a block every
    /// answer needs.
    fn is_expert(block: &Block) -> bool {
        matches!(Slot::parse(&block.header.name), Ok(Slot::Expert { .. }))
    }

    /// Record a verified payload: startup blocks in memory; an expert in
    /// the cache (when it did not come from there) within the budget and in
    /// the peer node while it fits; served to other nodes.
    fn keep(&mut self, block: &Block, p: Arc<[u8]>, origin: Origin) -> Arc<[u8]> {
        self.dag
            .set_payload(&block.hash, PayloadStatus::Verified, None);
        self.stats.payloads += 1;
        let expert = Self::is_expert(block);
        if let Ok(Slot::Expert { layer, expert }) = Slot::parse(&block.header.name) {
            self.stats.experts.insert(ExpertId::new(layer, expert));
        }
        if !expert {
            self.payloads.insert(block.hash, p.clone());
        }
        if origin == Origin::Cache {
            self.cached.touch(&block.hash);
        }
        if expert {
            // The peer node serves what fits its share of the budget.
            let len = p.len() as u64;
            let cap = self.served_cap();
            for h in self.served.evict_for(len, cap, &[block.hash]) {
                self.served.remove(&h);
                net::unhold(&h);
            }
            if self.served.evictable() + len <= cap {
                self.served.insert(block.hash, len, false);
                net::hold(block.hash, p.clone(), block.header.chunk_size);
            } else {
                net::unhold(&block.hash);
            }
        } else {
            net::hold(block.hash, p.clone(), block.header.chunk_size);
        }
        p
    }

    /// Drop cache entries (experts, least recently used first).
    async fn cache_evict(&mut self, hashes: Vec<BlockHash>) {
        let Some(c) = &self.cache else {
            return;
        };
        for h in hashes {
            let _ = c.delete(&h).await;
            self.cached.remove(&h);
            self.evicted += 1;
        }
    }

    /// Write downloaded payloads to the cache in one transaction, within
    /// the budget (least recently used experts evicted first); when the
    /// browser refuses the batch, one by one through [`Self::cache_put`].
    async fn cache_put_many(&mut self, items: Vec<(Block, Arc<[u8]>)>) {
        if self.cache.is_none() || items.is_empty() {
            return;
        }
        let budget = self.budget;
        let items: Vec<(Block, Arc<[u8]>, bool)> = items
            .into_iter()
            .map(|(b, p)| {
                let protected = !Self::is_expert(&b);
                (b, p, protected)
            })
            .filter(|(_, p, protected)| *protected || p.len() as u64 <= budget)
            .collect();
        let incoming: u64 = items
            .iter()
            .filter(|(_, _, protected)| !protected)
            .map(|(_, p, _)| p.len() as u64)
            .sum();
        let keep: Vec<BlockHash> = items.iter().map(|(b, _, _)| b.hash).collect();
        let out = self.cached.evict_for(incoming.min(budget), budget, &keep);
        self.cache_evict(out).await;
        let batch: Vec<(BlockHash, &[u8])> =
            items.iter().map(|(b, p, _)| (b.hash, &p[..])).collect();
        let wrote = match &self.cache {
            Some(c) => c.put_many(&batch).await,
            None => return,
        };
        match wrote {
            Ok(()) => {
                for (b, p, protected) in &items {
                    self.cached.insert(b.hash, p.len() as u64, *protected);
                }
                // A batch larger than the budget leaves it over: trim.
                let over = self.cached.evict_for(0, budget, &[]);
                self.cache_evict(over).await;
            }
            Err(_) => {
                for (b, p, protected) in &items {
                    self.cache_put(b, p, *protected).await;
                }
            }
        }
    }

    /// Write a verified payload to the cache within the budget; a quota
    /// error evicts the least recently used experts (never the meta, shared
    /// or router blocks) and tries again, and says so in an alert when that
    /// is not enough.
    async fn cache_put(&mut self, block: &Block, p: &[u8], protected: bool) {
        if self.cache.is_none() {
            return;
        }
        let len = p.len() as u64;
        if !protected {
            if len > self.budget {
                return;
            }
            let out = self.cached.evict_for(len, self.budget, &[]);
            self.cache_evict(out).await;
        }
        loop {
            let Some(c) = &self.cache else {
                return;
            };
            match c.put(&block.hash, p).await {
                Ok(()) => {
                    self.cached.insert(block.hash, len, protected);
                    return;
                }
                Err(e) if !e.contains("QuotaExceeded") => {
                    set_progress(&format!("not cached ({e})"));
                    return;
                }
                Err(e) => {
                    // Free at least this payload's size (a quarter of what
                    // the cache holds at least), oldest experts first.
                    let want = len.max(self.cached.evictable() / 4);
                    let out = self.cached.oldest(want, &[]);
                    if out.is_empty() {
                        panels::alert(
                            "storage-full",
                            &format!(
                                "The browser refused to store block {} ({}) and no cached expert is \
                                 left to evict: this page keeps it in memory only ({e}).",
                                block.header.name,
                                fmt_bytes(len)
                            ),
                        );
                        return;
                    }
                    self.cache_evict(out).await;
                }
            }
        }
    }

    /// Take stock of the cache against the verified headers: the entries of
    /// verified blocks are counted (and re-verified when read), the rest
    /// dropped, and the least recently used experts evicted beyond the
    /// budget. Returns (entries kept, entries dropped).
    pub async fn load_cache(&mut self) -> (u64, u64) {
        let Some(cache) = &self.cache else {
            return (0, 0);
        };
        // Keys that are no block hash are dropped on the way.
        let _ = cache.keys().await;
        let sizes = cache.sizes().await.unwrap_or_default();
        let (mut kept, mut dropped) = (0, 0);
        let mut stale = Vec::new();
        for (hash, len) in sizes {
            match self.blocks.get(&hash) {
                Some(b) => {
                    self.cached.insert(hash, len, !Self::is_expert(b));
                    kept += 1;
                }
                None => stale.push(hash),
            }
        }
        for h in stale {
            if let Some(c) = &self.cache {
                let _ = c.delete(&h).await;
            }
            self.stats.cache_dropped += 1;
            dropped += 1;
        }
        let over = self.cached.evict_for(0, self.budget, &[]);
        self.cache_evict(over).await;
        (kept, dropped)
    }
}

/// A cached payload of a header-verified block that passes every check a
/// download would; a corrupt entry is dropped (the caller fetches it
/// again), counted and reported. Counts a hit when it passes.
pub async fn cached_payload(
    cache: &Cache,
    block: &Block,
    config: Option<&Config>,
    stats: &mut FetchStats,
) -> Option<Vec<u8>> {
    let bytes = match cache.get(&block.hash).await {
        Ok(Some(b)) => b,
        Ok(None) => return None,
        Err(e) => {
            panels::alert(
                "cache-corrupt",
                &format!("The block cache could not be read: {e}"),
            );
            return None;
        }
    };
    match verify_held_payload(block, config, &bytes) {
        Ok(()) => {
            stats.cache_hits += 1;
            Some(bytes)
        }
        Err(e) => {
            drop_corrupt(cache, block, &e, stats).await;
            None
        }
    }
}

/// A cached payload failed verification: delete it (the caller fetches the
/// block again), count it and say so.
async fn drop_corrupt(
    cache: &Cache,
    block: &Block,
    e: &dyn std::fmt::Display,
    stats: &mut FetchStats,
) {
    let _ = cache.delete(&block.hash).await;
    stats.cache_dropped += 1;
    panels::alert(
        "cache-corrupt",
        &format!(
            "The cached payload of {} ({}) failed verification ({e}).",
            block.header.name,
            block.hash.short()
        ),
    );
}

/// The engine's [`Supply`] from the verified chain: an expert slot's head
/// payload through [`VerifiedChain::payloads_many`] (memory, cache, peers or
/// REST, verified by the core), decoded to weights. The experts of one ask
/// are fetched together; those in `prefetch` (likely next: the caller sets
/// them) start in the background at the same time
/// ([`VerifiedChain::prefetch`]) and are taken when asked for.
pub struct ChainSupply<'a> {
    pub chain: &'a mut VerifiedChain,
    pub config: &'a Config,
    /// The head block of every expert slot of the model.
    pub experts: HashMap<ExpertId, BlockHash>,
    /// Experts whose payload was downloaded for this answer.
    pub fetched: Vec<ExpertId>,
    /// Experts the engine asked for during this answer.
    pub asked: Vec<ExpertId>,
    /// Experts likely asked for next, prefetched beside the next ask.
    pub prefetch: Vec<ExpertId>,
}

impl<'a> ChainSupply<'a> {
    /// A supply for one answer (or benchmark) over `experts`' head blocks,
    /// nothing fetched or asked yet.
    pub fn new(
        chain: &'a mut VerifiedChain,
        config: &'a Config,
        experts: HashMap<ExpertId, BlockHash>,
    ) -> Self {
        Self {
            chain,
            config,
            experts,
            fetched: Vec::new(),
            asked: Vec::new(),
            prefetch: Vec::new(),
        }
    }

    fn head(&self, id: ExpertId) -> Result<BlockHash, ModelError> {
        self.experts
            .get(&id)
            .copied()
            .ok_or_else(|| ModelError::Source(format!("{id}: no verified block")))
    }
}

impl Supply for ChainSupply<'_> {
    async fn experts(
        &mut self,
        need: &[ExpertId],
    ) -> Result<Vec<(ExpertId, ExpertWeights)>, ModelError> {
        self.asked.extend_from_slice(need);
        let hashes = need
            .iter()
            .map(|&id| self.head(id))
            .collect::<Result<Vec<_>, _>>()?;
        let ahead: Vec<BlockHash> = std::mem::take(&mut self.prefetch)
            .into_iter()
            .filter(|id| !need.contains(id))
            .filter_map(|id| self.experts.get(&id).copied())
            .collect();
        if !hashes.is_empty() {
            set_progress(&format!(
                "fetching {} experts ({} more ahead)…",
                hashes.len(),
                ahead.len()
            ));
        }
        self.chain.prefetch(&ahead);
        let got = self.chain.payloads_many(&hashes).await;
        let mut out = Vec::with_capacity(need.len());
        for ((&id, hash), r) in need.iter().zip(&hashes).zip(got) {
            let (payload, origin) =
                r.map_err(|e| ModelError::Source(format!("{id} (block {}): {e}", hash.short())))?;
            if matches!(origin, Origin::Peers | Origin::Rest) {
                self.fetched.push(id);
            }
            self.chain.cached.touch(hash);
            self.chain.served.touch(hash);
            let w = ExpertWeights::from_safetensors(self.config, id.layer, id.expert, &payload)?;
            out.push((id, w));
        }
        Ok(out)
    }
}
