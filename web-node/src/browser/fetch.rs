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
use crate::verify;

use super::cache::Cache;
use super::dom::{js_err, set_progress};
use super::render::fmt_bytes;
use super::{net, panels};

/// Bytes per payload request: whole chunks, each checked on arrival.
const PIECE_BYTES: u64 = 1024 * 1024;
/// Most listing pages followed (a relay whose `Link` headers loop stops here).
const MAX_PAGES: usize = 10_000;

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

/// The target of a `Link: <url>; rel="next"` header.
fn next_link(link: &str) -> Option<String> {
    link.split(',').find_map(|part| {
        let (url, params) = part.trim().split_once(';')?;
        params.contains("rel=\"next\"").then(|| {
            url.trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_string()
        })
    })
}

/// `GET /chain/{A|B}/blocks`, every page.
pub async fn list_chain(chain: ChainId, stats: &mut FetchStats) -> Result<Vec<BlockInfo>, String> {
    let mut url = format!("/chain/{chain:?}/blocks");
    let mut out = Vec::new();
    for _ in 0..MAX_PAGES {
        let (body, link) = get(&url, None, stats).await?;
        out.extend(verify::parse_listing(&body).map_err(|e| format!("{url}: {e}"))?);
        match link.as_deref().and_then(next_link) {
            Some(next) if next != url => url = next,
            _ => return Ok(out),
        }
    }
    Err(format!(
        "chain {chain:?}: more than {MAX_PAGES} listing pages"
    ))
}

/// A whole payload in one request (chain-A payloads: small JSON, checked by
/// [`verify::verify_chain_dag`]).
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

/// Fetch a header-verified block's payload chunk by chunk and verify it.
/// A refused chunk is fetched once more before the payload fails.
async fn fetch_verified(
    block: &Block,
    config: Option<&Config>,
    stats: &mut FetchStats,
    label: &str,
) -> Result<Vec<u8>, String> {
    let hex = block.hash.to_hex();
    let mut asm = PayloadAssembler::new(block);
    asm.set_chunk_list(chunk_list(block, stats).await?)
        .map_err(|e| e.to_string())?;
    let url = format!("/blocks/{hex}/payload");
    let per = (PIECE_BYTES / u64::from(block.header.chunk_size.max(1))).max(1) as usize;
    let total = asm.chunk_count();
    let missing = asm.missing();
    for group in missing.chunks(per) {
        let (Some(first), Some(last)) = (
            group.first().and_then(|&i| asm.chunk_range(i)),
            group.last().and_then(|&i| asm.chunk_range(i)),
        ) else {
            continue;
        };
        set_progress(&format!(
            "fetching {label}: chunk {} of {total} ({} so far)…",
            group[0] + 1,
            fmt_bytes(stats.payload_bytes)
        ));
        let (bytes, _) = get(&url, Some((first.start, last.end)), stats).await?;
        stats.payload_bytes += bytes.len() as u64;
        for &i in group {
            let Some(r) = asm.chunk_range(i) else {
                continue;
            };
            let (s, e) = (
                (r.start - first.start) as usize,
                (r.end - first.start) as usize,
            );
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

/// The page's verified chain: the blocks whose headers it verified, the DAG
/// with each payload's status, and the verified payloads it holds (in memory
/// for the session, in the browser's cache across sessions, and served to
/// other nodes); [`VerifiedChain::payload`] gets and verifies the rest.
pub struct VerifiedChain {
    pub blocks: HashMap<BlockHash, Block>,
    pub dag: Dag,
    pub payloads: HashMap<BlockHash, Arc<[u8]>>,
    pub stats: FetchStats,
    /// The persistent cache (`None` when IndexedDB is unavailable).
    pub cache: Option<Cache>,
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
        self.payload_from(hash, label).await.map(|(p, _)| p)
    }

    /// [`VerifiedChain::payload`], and where it came from: this session's memory,
    /// the cache (re-verified against the header), the peer network through
    /// the relay's `/ws`, or the relay's REST API (when the peer network is
    /// down or could not deliver).
    pub async fn payload_from(
        &mut self,
        hash: &BlockHash,
        label: &str,
    ) -> Result<(Arc<[u8]>, Origin), String> {
        if let Some(p) = self.payloads.get(hash) {
            return Ok((p.clone(), Origin::Memory));
        }
        let block = self
            .blocks
            .get(hash)
            .ok_or_else(|| format!("block {} has no verified header", hash.short()))?
            .clone();
        let config = self.config_of(&block);
        if let Some(p) = self.cached(&block, config.as_ref()).await {
            return Ok((self.keep(&block, p, false).await, Origin::Cache));
        }
        if net::online() {
            set_progress(&format!("fetching {label} from peers…"));
            let got = match chunk_list(&block, &mut self.stats).await {
                Ok(list) => net::fetch(&block, list, config.clone()).await,
                Err(e) => Err(e),
            };
            match got {
                Ok(p) => {
                    self.stats.ws_payload_bytes += p.len() as u64;
                    self.stats.payload_bytes += p.len() as u64;
                    return Ok((self.keep(&block, p, true).await, Origin::Peers));
                }
                Err(e) => {
                    self.stats.ws_fallbacks += 1;
                    set_progress(&format!(
                        "{label}: the peer network could not deliver it ({e}); fetching over HTTP…"
                    ));
                }
            }
        }
        match fetch_verified(&block, config.as_ref(), &mut self.stats, label).await {
            Ok(bytes) => Ok((self.keep(&block, bytes.into(), true).await, Origin::Rest)),
            Err(e) => {
                self.dag
                    .set_payload(hash, PayloadStatus::Failed(e.clone()), None);
                Err(e)
            }
        }
    }

    /// A cached payload that passes every check a download would (see
    /// [`cached_payload`]).
    async fn cached(&mut self, block: &Block, config: Option<&Config>) -> Option<Arc<[u8]>> {
        let cache = self.cache.as_ref()?;
        cached_payload(cache, block, config, &mut self.stats)
            .await
            .map(Into::into)
    }

    /// Hold a verified payload: in memory, in the cache (when it was
    /// downloaded) and served to other nodes.
    async fn keep(&mut self, block: &Block, p: Arc<[u8]>, downloaded: bool) -> Arc<[u8]> {
        self.dag
            .set_payload(&block.hash, PayloadStatus::Verified, None);
        self.payloads.insert(block.hash, p.clone());
        self.stats.payloads += 1;
        if let Ok(Slot::Expert { layer, expert }) = Slot::parse(&block.header.name) {
            self.stats.experts.insert(ExpertId::new(layer, expert));
        }
        if downloaded {
            if let Some(c) = &self.cache {
                if let Err(e) = c.put(&block.hash, &p).await {
                    set_progress(&format!("not cached ({e})"));
                }
            }
        }
        net::hold(block.hash, p.clone(), block.header.chunk_size);
        p
    }

    /// Re-verify every cache entry against the verified headers: entries
    /// of verified blocks are held (and served), the rest dropped.
    /// Returns (entries kept, entries dropped).
    pub async fn load_cache(&mut self) -> (u64, u64) {
        let Some(cache) = &self.cache else {
            return (0, 0);
        };
        let keys = cache.keys().await.unwrap_or_default();
        let (mut kept, mut dropped) = (0, 0);
        for hash in keys {
            if self.payloads.contains_key(&hash) {
                kept += 1;
                continue;
            }
            let Some(block) = self.blocks.get(&hash).cloned() else {
                // Stale: not a verified block of this chain (any more).
                if let Some(c) = &self.cache {
                    let _ = c.delete(&hash).await;
                }
                self.stats.cache_dropped += 1;
                dropped += 1;
                continue;
            };
            let config = self.config_of(&block);
            match self.cached(&block, config.as_ref()).await {
                Some(p) => {
                    self.keep(&block, p, false).await;
                    kept += 1;
                }
                None => dropped += 1,
            }
        }
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

/// The engine's [`Supply`] from the verified chain: an expert slot's head
/// payload through [`VerifiedChain::payload_from`] (memory, cache, peers or
/// REST, verified the first time), decoded to weights.
pub struct ChainSupply<'a> {
    pub chain: &'a mut VerifiedChain,
    pub config: &'a Config,
    /// The head block of every expert slot of the model.
    pub experts: HashMap<ExpertId, BlockHash>,
    /// Experts whose payload was fetched for this answer.
    pub fetched: Vec<ExpertId>,
    /// Experts the engine asked for during this answer.
    pub asked: Vec<ExpertId>,
}

impl Supply for ChainSupply<'_> {
    async fn experts(
        &mut self,
        need: &[ExpertId],
    ) -> Result<Vec<(ExpertId, ExpertWeights)>, ModelError> {
        let mut out = Vec::with_capacity(need.len());
        for &id in need {
            self.asked.push(id);
            let hash = *self
                .experts
                .get(&id)
                .ok_or_else(|| ModelError::Source(format!("{id}: no verified block")))?;
            let (payload, origin) = self
                .chain
                .payload_from(&hash, &id.to_string())
                .await
                .map_err(|e| ModelError::Source(format!("{id} (block {}): {e}", hash.short())))?;
            if matches!(origin, Origin::Peers | Origin::Rest) {
                self.fetched.push(id);
            }
            let w = ExpertWeights::from_safetensors(self.config, id.layer, id.expert, &payload)?;
            out.push((id, w));
        }
        Ok(out)
    }
}
