//! REST glue: listings, payloads by HTTP Range, and the [`Supply`] that
//! hands the engine an expert's weights. Every byte goes through the core's
//! checks: a payload is assembled by [`PayloadAssembler`] (chunk list
//! against the header's payload root, each chunk against its hash, tensors
//! when the last chunk is in) before anything uses it.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use wasm_bindgen::JsCast;
use wasm_bindgen_futures::JsFuture;

use crate::chain::{
    verify_held_payload, Block, BlockHash, ChainError, ChainId, Dag, PayloadAssembler,
    PayloadStatus,
};
use crate::model::{Config, ExpertId, ExpertWeights, ModelError, Slot, Supply};
use crate::net::api::{BlockInfo, ChunkList};

use super::cache::Cache;
use super::dom::{js_err, set_progress};
use super::{net, panels};
use crate::client::listing::{link_has_next, Pager, MAX_PAGE};
use crate::view::budget::ByteLru;
use crate::view::fmt_bytes;

/// Bytes per payload request: whole chunks, each checked on arrival.
const PIECE_BYTES: u64 = 1024 * 1024;

/// What this page fetched from the relay.
#[derive(Debug, Clone, Default)]
pub struct FetchStats {
    /// Every body byte (listings, chunk lists, payloads).
    pub bytes: u64,
    /// Payload bytes (chunks), including chunks fetched again after a refusal.
    pub payload_bytes: u64,
    pub requests: u64,
    /// Payloads fetched and verified.
    pub payloads: u64,
    /// Chunks refused (bad hash) and fetched again.
    pub refused_chunks: u64,
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
    /// Payloads the peer network could not deliver, fetched over REST instead.
    pub ws_fallbacks: u64,
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
        self.refused_chunks += o.refused_chunks;
        self.experts.extend(o.experts.iter().copied());
        self.ws_payload_bytes += o.ws_payload_bytes;
        self.cache_hits += o.cache_hits;
        self.cache_dropped += o.cache_dropped;
        self.ws_fallbacks += o.ws_fallbacks;
        self.fetch_ms += o.fetch_ms;
        self.store_ms += o.store_ms;
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
) -> Result<(Vec<u8>, Option<String>), String> {
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
        return Err(format!("HTTP {} for {url}: {text}", resp.status()));
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
/// to (checked by whoever assembles the payload).
async fn chunk_list(block: &Block, stats: &mut FetchStats) -> Result<Vec<BlockHash>, String> {
    let (body, _) = get(
        &format!("/blocks/{}/chunks", block.hash.to_hex()),
        None,
        stats,
    )
    .await?;
    let list: ChunkList =
        serde_json::from_slice(&body).map_err(|e| format!("bad chunk list: {e}"))?;
    Ok(list.chunks)
}

/// Payloads fetched at once for one batch (the engine's need for a layer,
/// and what is prefetched beside it): the peer node's chunk credits bound
/// what is in flight on `/ws`, the browser's six connections per host what
/// is in flight over HTTP.
pub const PARALLEL_PAYLOADS: usize = 16;
/// Range requests in flight for one large payload.
const PARALLEL_PIECES: usize = 4;

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

/// Fetch a header-verified block's payload over HTTP and verify it. A
/// payload of one piece comes in one request and is checked as strictly as
/// a chunked download ([`verify_held_payload`]: every chunk hash against
/// the header's payload root, then the tensors); a larger one comes as
/// range requests in flight together, each chunk checked on arrival by the
/// [`PayloadAssembler`], a refused chunk fetched once more before the
/// payload fails.
async fn fetch_verified(
    block: &Block,
    config: Option<&Config>,
    stats: &mut FetchStats,
) -> Result<Vec<u8>, String> {
    let hex = block.hash.to_hex();
    let url = format!("/blocks/{hex}/payload");
    // Pieces of the payload as fetched: (start, end, bytes or why not).
    type Piece = (u64, u64, Result<Vec<u8>, String>);
    let pieces: Vec<Piece>;
    let list;
    if block.header.payload_len <= PIECE_BYTES {
        let (bytes, _) = get(&url, None, stats).await?;
        stats.payload_bytes += bytes.len() as u64;
        if verify_held_payload(block, config, &bytes).is_ok() {
            return Ok(bytes);
        }
        // Refused: chunk by chunk below, so the error names the bad chunk
        // and that chunk is fetched once more.
        list = chunk_list(block, stats).await?;
        pieces = vec![(0, bytes.len() as u64, Ok(bytes))];
    } else {
        list = chunk_list(block, stats).await?;
        let mut asm = PayloadAssembler::new(block);
        asm.set_chunk_list(list.clone())
            .map_err(|e| e.to_string())?;
        let per = (PIECE_BYTES / u64::from(block.header.chunk_size.max(1))).max(1) as usize;
        let ranges: Vec<(u64, u64)> = asm
            .missing()
            .chunks(per)
            .filter_map(|g| {
                let first = g.first().and_then(|&i| asm.chunk_range(i))?;
                let last = g.last().and_then(|&i| asm.chunk_range(i))?;
                Some((first.start, last.end))
            })
            .collect();
        type Got = (Result<Vec<u8>, String>, FetchStats);
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
        let got = join_bounded(futs, PARALLEL_PIECES).await;
        pieces = ranges
            .iter()
            .zip(got)
            .map(|(&(a, b), (r, st))| {
                stats.add(&st);
                if let Ok(bytes) = &r {
                    stats.payload_bytes += bytes.len() as u64;
                }
                (a, b, r)
            })
            .collect();
    }
    let mut asm = PayloadAssembler::new(block);
    asm.set_chunk_list(list).map_err(|e| e.to_string())?;
    for (start, end, got) in pieces {
        let bytes = got?;
        for i in asm.missing() {
            let Some(r) = asm.chunk_range(i) else {
                continue;
            };
            if r.start < start || r.end > end {
                continue;
            }
            let (s, e) = ((r.start - start) as usize, (r.end - start) as usize);
            let piece = bytes.get(s..e).map(<[u8]>::to_vec).unwrap_or_default();
            match asm.add_chunk(i, piece) {
                Ok(_) => {}
                Err(ChainError::ChunkHash { .. }) => {
                    stats.refused_chunks += 1;
                    let (again, _) = get(&url, Some((r.start, r.end)), stats).await?;
                    stats.payload_bytes += again.len() as u64;
                    asm.add_chunk(i, again).map_err(|e| e.to_string())?;
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    }
    asm.finish(config)
        .map(|v| v.bytes)
        .map_err(|e| e.to_string())
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

/// One payload from wherever it is: the cache (re-verified), the peer
/// network (when online), else HTTP. Borrows nothing mutable, so a batch of
/// them runs at once; the counters come back with it.
async fn source(
    block: Block,
    config: Option<Config>,
    cache: Option<&Cache>,
) -> (Sourced, FetchStats) {
    let mut stats = FetchStats::default();
    // `cache` is given only when it holds this block.
    if let Some(c) = cache {
        if let Some(p) = cached_payload(c, &block, config.as_ref(), &mut stats).await {
            return (Ok((p.into(), Origin::Cache)), stats);
        }
    }
    if net::online() && !rest_only() {
        let got = match chunk_list(&block, &mut stats).await {
            Ok(list) => net::fetch(&block, list, config.clone()).await,
            Err(e) => Err(e),
        };
        match got {
            Ok(p) => {
                stats.ws_payload_bytes += p.len() as u64;
                stats.payload_bytes += p.len() as u64;
                return (Ok((p, Origin::Peers)), stats);
            }
            Err(e) => {
                stats.ws_fallbacks += 1;
                set_progress(&format!(
                    "{}: the peer network could not deliver it ({e}); fetching over HTTP…",
                    block.header.name
                ));
            }
        }
    }
    let got = fetch_verified(&block, config.as_ref(), &mut stats).await;
    (got.map(|b| (b.into(), Origin::Rest)), stats)
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
    pub cache: Option<Cache>,
    /// What the cache holds, by block: bytes and last use (startup blocks
    /// protected).
    pub cached: ByteLru<BlockHash>,
    /// Expert payloads the peer node holds and serves.
    pub served: ByteLru<BlockHash>,
    /// Payload bytes the page may keep of experts: the cache holds at most
    /// this much; in memory the engine's decoded experts take half, the
    /// payloads the peer node serves three eighths, prefetched payloads
    /// waiting to be asked for an eighth.
    pub budget: u64,
    /// Cache entries evicted (budget or quota) this session.
    pub evicted: u64,
}

/// Where a payload came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Memory,
    Cache,
    Peers,
    Rest,
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

    /// Several payloads at once ([`PARALLEL_PAYLOADS`] in flight), each
    /// from this session's memory, the cache (re-verified against the
    /// header), the peer network through the relay's `/ws`, or the relay's
    /// REST API (when the peer network is down or could not deliver). One
    /// result per hash, in order; failures are recorded in the DAG.
    pub async fn payloads_many(&mut self, hashes: &[BlockHash]) -> Vec<Sourced> {
        let mut out: Vec<Option<Sourced>> = Vec::new();
        let mut todo = Vec::new();
        for (i, h) in hashes.iter().enumerate() {
            if let Some(p) = self.payloads.get(h) {
                out.push(Some(Ok((p.clone(), Origin::Memory))));
            } else if let Some(b) = self.blocks.get(h) {
                out.push(None);
                todo.push((i, b.clone(), self.config_of(b)));
            } else {
                out.push(Some(Err(format!(
                    "block {} has no verified header",
                    h.short()
                ))));
            }
        }
        if !todo.is_empty() {
            let cache = self.cache.as_ref();
            let futs: Vec<LocalFuture<'_, (Sourced, FetchStats)>> = todo
                .iter()
                .map(|(_, b, c)| {
                    let cache = cache.filter(|_| self.cached.contains(&b.hash));
                    Box::pin(source(b.clone(), c.clone(), cache))
                        as LocalFuture<'_, (Sourced, FetchStats)>
                })
                .collect();
            let t0 = super::dom::now_ms();
            let got = join_bounded(futs, PARALLEL_PAYLOADS).await;
            self.stats.fetch_ms += super::dom::now_ms() - t0;
            let mut downloaded: Vec<(Block, Arc<[u8]>)> = Vec::new();
            for ((i, block, _), (r, st)) in todo.into_iter().zip(got) {
                self.stats.add(&st);
                let r = match r {
                    Ok((p, origin)) => {
                        let p = self.keep(&block, p, origin);
                        if matches!(origin, Origin::Peers | Origin::Rest) {
                            downloaded.push((block, p.clone()));
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
            let t1 = super::dom::now_ms();
            self.cache_put_many(downloaded).await;
            self.stats.store_ms += super::dom::now_ms() - t1;
        }
        out.into_iter()
            .map(|r| r.unwrap_or_else(|| Err("not fetched".into())))
            .collect()
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
            None
        }
    }
}

/// Prefetched expert payloads kept for the next asks at most.
const MAX_READY: usize = 64;

/// The engine's [`Supply`] from the verified chain: an expert slot's head
/// payload through [`VerifiedChain::payloads_many`] (memory, cache, peers or
/// REST, verified the first time), decoded to weights. The experts of one
/// ask are fetched together, and so are those in `prefetch` (likely next:
/// the caller sets them), kept in `ready` until asked for.
pub struct ChainSupply<'a> {
    pub chain: &'a mut VerifiedChain,
    pub config: &'a Config,
    /// The head block of every expert slot of the model.
    pub experts: HashMap<ExpertId, BlockHash>,
    /// Experts whose payload was fetched for this answer.
    pub fetched: Vec<ExpertId>,
    /// Experts the engine asked for during this answer.
    pub asked: Vec<ExpertId>,
    /// Experts likely asked for next, fetched beside the next ask.
    pub prefetch: Vec<ExpertId>,
    /// Prefetched payloads not asked for yet.
    pub ready: HashMap<ExpertId, Arc<[u8]>>,
    /// Experts prefetched that were then asked for.
    pub prefetch_hits: u64,
}

impl ChainSupply<'_> {
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
        let mut ids: Vec<ExpertId> = Vec::new();
        for &id in need {
            self.asked.push(id);
            if !self.ready.contains_key(&id) {
                ids.push(id);
            } else {
                self.prefetch_hits += 1;
            }
        }
        let wanted = ids.len();
        let mut extra: Vec<ExpertId> = std::mem::take(&mut self.prefetch)
            .into_iter()
            .filter(|id| !need.contains(id) && !self.ready.contains_key(id))
            .filter(|id| self.experts.contains_key(id))
            .collect();
        extra.dedup();
        extra.truncate(PARALLEL_PAYLOADS.saturating_sub(wanted % PARALLEL_PAYLOADS));
        ids.extend(extra);
        let hashes = ids
            .iter()
            .map(|&id| self.head(id))
            .collect::<Result<Vec<_>, _>>()?;
        if !hashes.is_empty() {
            set_progress(&format!(
                "fetching {wanted} experts ({} prefetched beside them)…",
                hashes.len() - wanted
            ));
        }
        let got = self.chain.payloads_many(&hashes).await;
        for (k, ((&id, hash), r)) in ids.iter().zip(&hashes).zip(got).enumerate() {
            match r {
                Ok((p, origin)) => {
                    if matches!(origin, Origin::Peers | Origin::Rest) {
                        self.fetched.push(id);
                    }
                    if k >= wanted {
                        // Prefetched: kept while it fits an eighth of the budget.
                        let held: u64 = self.ready.values().map(|p| p.len() as u64).sum();
                        if self.ready.len() >= MAX_READY
                            || held + p.len() as u64 > self.chain.budget / 8
                        {
                            continue;
                        }
                    }
                    self.ready.insert(id, p);
                }
                // A prefetch that failed is asked for again when needed.
                Err(_) if k >= wanted => {}
                Err(e) => {
                    return Err(ModelError::Source(format!(
                        "{id} (block {}): {e}",
                        hash.short()
                    )))
                }
            }
        }
        let mut out = Vec::with_capacity(need.len());
        for &id in need {
            let payload = match self.ready.remove(&id) {
                Some(p) => p,
                None => {
                    let h = self.head(id)?;
                    self.chain
                        .payload(&h, &id.to_string())
                        .await
                        .map_err(|e| ModelError::Source(format!("{id}: {e}")))?
                }
            };
            if let Some(h) = self.experts.get(&id) {
                self.chain.cached.touch(h);
                self.chain.served.touch(h);
            }
            let w = ExpertWeights::from_safetensors(self.config, id.layer, id.expert, &payload)?;
            out.push((id, w));
        }
        Ok(out)
    }
}
