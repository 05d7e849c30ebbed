//! Talking to a relay over its REST API: binary upload of blocks, and
//! every read (chains listed page by page, headers verified, model and
//! heads picked, payloads fetched and verified) as a blocking driver of the
//! sans-IO client core [`web_node::client`]; exporting the heads as a
//! Hugging Face directory.

use std::io::Read;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use web_node::chain::{Block, BlockHash, BlockKind};
use web_node::client::listing::MAX_PAGE;
use web_node::client::{
    link_has_next, Answer, ChainSync, Model, ModelPick, Next, PayloadFetch, SourceError,
    SourcePolicy, Step, Synced,
};
use web_node::net::api::ApiError;

use crate::blocks::{join_payloads, parse_block_file};

fn base(relay: &str) -> String {
    relay.trim_end_matches('/').to_string()
}

fn describe(e: ureq::Error) -> anyhow::Error {
    match e {
        ureq::Error::Status(code, resp) => {
            let body = resp.into_string().unwrap_or_default();
            match serde_json::from_str::<ApiError>(&body) {
                Ok(api) => anyhow!("relay refused ({code}): {}: {}", api.code, api.message),
                Err(_) => anyhow!("relay answered {code}: {body}"),
            }
        }
        other => anyhow!("cannot reach the relay: {other}"),
    }
}

/// The Content-Type of a binary block upload (the relay refuses others).
const BINARY: &str = "application/octet-stream";

/// Upload one block (envelope || payload) with `POST /blocks`.
/// A relay limits uploads per key and per address (429 with Retry-After):
/// wait as told, at most this long at a time ...
const MAX_RETRY_WAIT_S: u64 = 120;
/// ... and at most this many times for one block.
const MAX_RATE_RETRIES: usize = 30;

pub fn post_block(relay: &str, body: &[u8]) -> Result<serde_json::Value> {
    let url = format!("{}/blocks", base(relay));
    for _ in 0..MAX_RATE_RETRIES {
        match ureq::post(&url)
            .set("content-type", BINARY)
            .send_bytes(body)
        {
            Ok(resp) => {
                let text = resp.into_string()?;
                return Ok(serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)));
            }
            Err(ureq::Error::Status(429, resp)) => {
                let wait = resp
                    .header("retry-after")
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(5)
                    .clamp(1, MAX_RETRY_WAIT_S);
                eprintln!("the relay limits uploads (429); retrying in {wait} s");
                std::thread::sleep(std::time::Duration::from_secs(wait));
            }
            Err(ureq::Error::Transport(t)) => {
                let e = why_cut_off(&url, body, t);
                // A rate limit can cut the connection before the answer.
                if e.to_string().contains("(429)") {
                    eprintln!("the relay limits uploads (429); retrying in 5 s");
                    std::thread::sleep(std::time::Duration::from_secs(5));
                    continue;
                }
                return Err(e);
            }
            Err(e) => return Err(describe(e)),
        }
    }
    bail!("the relay kept refusing the upload with 429 after {MAX_RATE_RETRIES} tries")
}

/// A relay checks a block's envelope before it reads the payload; when it
/// refuses the block there (a key that may not write, not the head, a rate
/// limit) it may close the connection while the payload is still being
/// sent, and the client sees a broken pipe instead of the answer. Send the
/// envelope alone (chunked: no Content-Length to disagree with the header)
/// to read the reason.
fn why_cut_off(url: &str, body: &[u8], t: ureq::Transport) -> anyhow::Error {
    let cut = anyhow!("the relay closed the connection during the upload: {t}");
    let used = match Block::decode_prefix(body) {
        Ok((_, used)) if used < body.len() => used,
        _ => return cut,
    };
    match ureq::post(url)
        .set("content-type", BINARY)
        .send(&body[..used])
    {
        // 400 is also the answer to a good envelope without its payload.
        Err(e @ ureq::Error::Status(400, _)) => {
            anyhow!("{cut}; the envelope alone gets: {}", describe(e))
        }
        Err(e @ ureq::Error::Status(..)) => describe(e),
        _ => cut,
    }
}

/// Publish every `*.block` file of a directory: meta blocks first, then
/// shared, routers and experts; a progress bar counts bytes.
pub fn publish_dir(relay: &str, dir: &Path) -> Result<Vec<BlockHash>> {
    let mut files: Vec<(u8, String, Block, Vec<u8>)> = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("block") {
            continue;
        }
        let bytes = std::fs::read(&path)?;
        let (block, payload) =
            parse_block_file(&bytes).with_context(|| format!("{}", path.display()))?;
        let rank = match block.header.kind {
            BlockKind::Meta => 0,
            BlockKind::Shared => 1,
            BlockKind::Router => 2,
            BlockKind::Expert => 3,
        };
        files.push((rank, block.header.name.clone(), block, payload));
    }
    if files.is_empty() {
        bail!("no .block files in {}", dir.display());
    }
    files.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    let total: u64 = files
        .iter()
        .map(|f| (f.2.encoded_len() + f.3.len()) as u64)
        .sum();
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{msg:>18} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let mut hashes = Vec::new();
    for (_, name, block, payload) in &files {
        bar.set_message(name.clone());
        let body = crate::blocks::block_file_bytes(block, payload);
        post_block(relay, &body).with_context(|| format!("publishing {name} ({})", block.hash))?;
        bar.inc(body.len() as u64);
        hashes.push(block.hash);
    }
    bar.finish_with_message("published");
    Ok(hashes)
}

/// Largest listing page read (1000 headers are ~1 MB of JSON).
const MAX_LISTING_BYTES: u64 = 64 * 1024 * 1024;
/// Largest chain-A payload read (the chain's limit).
const MAX_META_BYTES: u64 = web_node::chain::limits::MAX_META_PAYLOAD_LEN;

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout_connect(std::time::Duration::from_secs(10))
        .timeout_read(std::time::Duration::from_secs(300))
        .build()
}

/// GET `url`: the body (at most `max` bytes) and the `Link` header.
fn get_limited(agent: &ureq::Agent, url: &str, max: u64) -> Result<(Vec<u8>, Option<String>)> {
    let resp = agent.get(url).call().map_err(describe)?;
    let link = resp.header("link").map(str::to_string);
    let mut v = Vec::new();
    resp.into_reader()
        .take(max.saturating_add(1))
        .read_to_end(&mut v)
        .with_context(|| format!("reading the answer of {url}"))?;
    if v.len() as u64 > max {
        bail!("{url}: the answer is larger than {max} bytes");
    }
    Ok((v, link))
}

/// A relay's chain, listed and verified once ([`ChainSync`]); payloads are
/// fetched from it on demand and verified against their headers
/// ([`PayloadFetch`]).
pub struct RelayChain {
    base: String,
    agent: ureq::Agent,
    pub synced: Synced,
}

impl RelayChain {
    /// List both chains, fetch the chain-A payloads, verify every header.
    pub fn sync(relay: &str) -> Result<Self> {
        Self::sync_with(relay, agent())
    }

    /// [`RelayChain::sync`] with the caller's HTTP agent (its timeouts).
    pub fn sync_with(relay: &str, agent: ureq::Agent) -> Result<Self> {
        let base = base(relay);
        let mut sync = ChainSync::new(MAX_PAGE);
        loop {
            match sync.next() {
                Step::List(req) => {
                    let url = format!("{base}{}", req.path());
                    let (body, link) = get_limited(&agent, &url, MAX_LISTING_BYTES)?;
                    sync.on_page(req.chain, &body, Some(link_has_next(link.as_deref())))?;
                }
                Step::MetaPayload(h) => {
                    let url = format!("{base}/blocks/{h}/payload");
                    let got = get_limited(&agent, &url, MAX_META_BYTES)
                        .map(|(b, _)| b)
                        .map_err(|e| format!("{e:#}"));
                    sync.on_meta_payload(h, got);
                }
                Step::Done => break,
            }
        }
        let synced = sync.finish()?;
        if synced.report.failed > 0 {
            let first = synced.report.blocks.iter().find_map(|r| {
                r.error
                    .as_ref()
                    .map(|e| format!("{} ({}): {e}", r.name.as_deref().unwrap_or("?"), r.hash))
            });
            tracing::warn!(
                failed = synced.report.failed,
                first = ?first,
                "blocks of the relay failed header verification"
            );
        }
        Ok(Self {
            base,
            agent,
            synced,
        })
    }

    /// The model `meta` names, or the relay's only model; every block of it
    /// must have passed verification.
    pub fn model(&self, meta: Option<BlockHash>) -> Result<Model> {
        let m = self.synced.model(&ModelPick::hash_or_only(meta))?;
        m.require_clean()?;
        Ok(m)
    }

    /// A verified block and its payload, checked against the header (and
    /// its model's config): retried on passing failures.
    pub fn payload(&self, hash: &BlockHash) -> Result<(Block, Vec<u8>)> {
        let block = self
            .synced
            .block(hash)
            .ok_or_else(|| anyhow!("block {hash} is not a verified block of the relay"))?
            .clone();
        let config = block
            .header
            .meta
            .and_then(|m| self.synced.dag.get(&m))
            .and_then(|e| e.config.clone());
        let name = block.header.name.clone();
        let url = format!("{}/blocks/{hash}/payload", self.base);
        let max = block.header.payload_len;
        let mut fetch = PayloadFetch::new(block.clone(), config, SourcePolicy::rest());
        loop {
            match fetch.next() {
                Next::Ask {
                    origin, delay_ms, ..
                } => {
                    std::thread::sleep(std::time::Duration::from_millis(delay_ms));
                    let got = get_source(&self.agent, &url, max);
                    if let Answer::Verified(bytes) = fetch.on_answer(origin, got) {
                        return Ok((block, bytes));
                    }
                }
                Next::Done(_) => bail!("payload of {name} ({hash}): fetched twice"),
                Next::Failed(why) => bail!("payload of {name} ({hash}): {why}"),
            }
        }
    }
}

/// One GET of a payload as a [`SourceError`]-typed answer: a 404 is a miss,
/// 429, 5xx and transport errors pass.
fn get_source(agent: &ureq::Agent, url: &str, max: u64) -> Result<Vec<u8>, SourceError> {
    match agent.get(url).call() {
        Ok(resp) => {
            let mut v = Vec::new();
            match resp
                .into_reader()
                .take(max.saturating_add(1))
                .read_to_end(&mut v)
            {
                Ok(_) => Ok(v),
                Err(e) => Err(SourceError::Transient(format!("reading: {e}"))),
            }
        }
        Err(ureq::Error::Status(code, r)) => {
            let e = describe(ureq::Error::Status(code, r)).to_string();
            if code == 429 || code >= 500 {
                Err(SourceError::Transient(e))
            } else {
                Err(SourceError::Missing(e))
            }
        }
        Err(e) => Err(SourceError::Transient(describe(e).to_string())),
    }
}

/// Write a model's current heads back as a Hugging Face directory. Returns
/// the model written.
pub fn export_from(chain: &RelayChain, meta: Option<BlockHash>, out: &Path) -> Result<Model> {
    let model = chain.model(meta)?;
    let mut payloads = Vec::new();
    for (_, hash) in model.all_heads()? {
        payloads.push(chain.payload(&hash)?.1);
    }
    let weights = join_payloads(&payloads)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::write(
        out.join("config.json"),
        serde_json::to_string_pretty(&model.payload.config)? + "\n",
    )?;
    if let Some(t) = &model.payload.tokenizer {
        std::fs::write(out.join("tokenizer.json"), serde_json::to_string(t)?)?;
    }
    std::fs::write(out.join("model.safetensors"), weights)?;
    Ok(model)
}

/// [`export_from`] a relay. Returns the meta hash used.
pub fn export(relay: &str, meta: Option<BlockHash>, out: &Path) -> Result<BlockHash> {
    Ok(export_from(&RelayChain::sync(relay)?, meta, out)?.meta)
}
