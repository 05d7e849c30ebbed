//! REST glue: listings, payloads by HTTP Range, and the [`Supply`] that
//! hands the engine an expert's weights. Every byte goes through the core's
//! checks: a payload is assembled by [`PayloadAssembler`] (chunk list
//! against the header's payload root, each chunk against its hash, tensors
//! when the last chunk is in) before anything uses it.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use wasm_bindgen::JsCast;
use wasm_bindgen_futures::JsFuture;

use crate::chain::{Block, BlockHash, ChainError, ChainId, Dag, PayloadAssembler, PayloadStatus};
use crate::model::{Config, ExpertId, ExpertWeights, ModelError, Supply};
use crate::net::api::{BlockInfo, ChunkList};
use crate::verify;

use super::dom::{js_err, set_progress};
use super::render::fmt_bytes;

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
    /// Experts whose payload this session fetched.
    pub experts: BTreeSet<ExpertId>,
}

/// One GET relative to the page; non-2xx answers are errors with the relay's
/// message. Returns the body and the `Link` header.
async fn get(
    url: &str,
    range: Option<(u64, u64)>,
    stats: &mut FetchStats,
) -> Result<(Vec<u8>, Option<String>), String> {
    let window = web_sys::window().ok_or("no window")?;
    let init = web_sys::RequestInit::new();
    init.set_method("GET");
    if let Some((start, end)) = range {
        let headers = web_sys::Headers::new().map_err(js_err)?;
        headers
            .set("Range", &format!("bytes={start}-{}", end - 1))
            .map_err(js_err)?;
        init.set_headers(&headers);
    }
    let req = web_sys::Request::new_with_str_and_init(url, &init).map_err(js_err)?;
    stats.requests += 1;
    let resp: web_sys::Response = JsFuture::from(window.fetch_with_request(&req))
        .await
        .map_err(|e| format!("GET {url}: {}", js_err(e)))?
        .dyn_into()
        .map_err(js_err)?;
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
    let (body, _) = get(&format!("/blocks/{hex}/chunks"), None, stats).await?;
    let list: ChunkList =
        serde_json::from_slice(&body).map_err(|e| format!("bad chunk list: {e}"))?;
    asm.set_chunk_list(list.chunks).map_err(|e| e.to_string())?;
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

/// The blocks this page verified, the DAG with each payload's status, and
/// the verified payloads it holds (in memory, for the session).
pub struct Store {
    pub blocks: HashMap<BlockHash, Block>,
    pub dag: Dag,
    pub payloads: HashMap<BlockHash, Arc<[u8]>>,
    pub stats: FetchStats,
}

impl Store {
    /// The verified payload of a header-verified block: held, or fetched
    /// and verified now. A failure is recorded in the DAG (the page shows
    /// it) and returned.
    pub async fn payload(&mut self, hash: &BlockHash, label: &str) -> Result<Arc<[u8]>, String> {
        if let Some(p) = self.payloads.get(hash) {
            return Ok(p.clone());
        }
        let block = self
            .blocks
            .get(hash)
            .ok_or_else(|| format!("block {} has no verified header", hash.short()))?
            .clone();
        let config = block
            .header
            .meta
            .and_then(|m| self.dag.get(&m))
            .and_then(|e| e.config.clone());
        match fetch_verified(&block, config.as_ref(), &mut self.stats, label).await {
            Ok(bytes) => {
                self.dag.set_payload(hash, PayloadStatus::Verified, None);
                let p: Arc<[u8]> = bytes.into();
                self.payloads.insert(*hash, p.clone());
                self.stats.payloads += 1;
                Ok(p)
            }
            Err(e) => {
                self.dag
                    .set_payload(hash, PayloadStatus::Failed(e.clone()), None);
                Err(e)
            }
        }
    }
}

/// The engine's [`Supply`]: an expert's payload from the store (fetched
/// over REST and verified the first time), decoded to weights.
pub struct RestSupply<'a> {
    pub store: &'a mut Store,
    pub config: &'a Config,
    /// The head block of every expert slot of the model.
    pub experts: HashMap<ExpertId, BlockHash>,
    /// Experts whose payload was fetched for this answer.
    pub fetched: Vec<ExpertId>,
    /// Experts the engine asked for during this answer.
    pub asked: Vec<ExpertId>,
}

impl Supply for RestSupply<'_> {
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
            let held = self.store.payloads.contains_key(&hash);
            let payload = self
                .store
                .payload(&hash, &id.to_string())
                .await
                .map_err(|e| ModelError::Source(format!("{id} (block {}): {e}", hash.short())))?;
            if !held {
                self.fetched.push(id);
                self.store.stats.experts.insert(id);
            }
            let w = ExpertWeights::from_safetensors(self.config, id.layer, id.expert, &payload)?;
            out.push((id, w));
        }
        Ok(out)
    }
}
