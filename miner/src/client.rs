//! Talking to a relay over its REST API: binary upload of blocks, listing
//! chains and heads, fetching payloads, and exporting the heads as a Hugging
//! Face directory.

use std::io::Read;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use web_node::chain::{check_payload_integrity, Block, BlockHash, BlockKind, ChainId, MetaPayload};
use web_node::model::{Config, Slot};
use web_node::net::api::{ApiError, BlockInfo};

use crate::blocks::{join_payloads, parse_block_file};

/// Most bytes read from one response (a payload is at most 2 GiB by the chain limits).
const MAX_RESPONSE: u64 = 2 * 1024 * 1024 * 1024 + 1024 * 1024;

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

fn get_bytes(url: &str) -> Result<Vec<u8>> {
    let resp = ureq::get(url).call().map_err(describe)?;
    let mut v = Vec::new();
    resp.into_reader().take(MAX_RESPONSE).read_to_end(&mut v)?;
    Ok(v)
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

/// Most listing pages followed (1000 blocks each: far past any chain the
/// relay's limits allow; a relay whose `Link` headers loop stops here).
const MAX_PAGES: usize = 100_000;

/// The target of a `Link: <url>; rel="next"` header, made absolute on `base`.
fn next_link(base: &str, link: Option<&str>) -> Option<String> {
    link?.split(',').find_map(|part| {
        let (target, params) = part.trim().split_once(';')?;
        let is_next = params
            .split(';')
            .any(|p| matches!(p.trim(), "rel=\"next\"" | "rel=next"));
        let t = target.trim().strip_prefix('<')?.strip_suffix('>')?;
        is_next.then(|| {
            if t.starts_with("http://") || t.starts_with("https://") {
                t.to_string()
            } else {
                format!("{base}{t}")
            }
        })
    })
}

/// Every block of a chain: `GET /chain/{A|B}/blocks`, following the relay's
/// `Link: <...>; rel="next"` pages to the end.
pub fn list_chain(relay: &str, chain: ChainId) -> Result<Vec<BlockInfo>> {
    let c = match chain {
        ChainId::A => "A",
        ChainId::B => "B",
    };
    let base = base(relay);
    let mut url = format!("{base}/chain/{c}/blocks");
    let mut out: Vec<BlockInfo> = Vec::new();
    for _ in 0..MAX_PAGES {
        let resp = ureq::get(&url).call().map_err(describe)?;
        let next = next_link(&base, resp.header("link"));
        let mut bytes = Vec::new();
        resp.into_reader()
            .take(MAX_RESPONSE)
            .read_to_end(&mut bytes)?;
        let page: Vec<BlockInfo> = serde_json::from_slice(&bytes)
            .with_context(|| format!("parsing the answer of {url}"))?;
        let empty = page.is_empty();
        out.extend(page);
        match next {
            Some(n) if !empty && n != url => url = n,
            _ => return Ok(out),
        }
    }
    bail!("the listing of chain {c} at {base} has more than {MAX_PAGES} pages")
}

/// Fetch a block's payload and check it against the (hash-checked) block.
pub fn fetch_payload(relay: &str, info: &BlockInfo) -> Result<(Block, Vec<u8>)> {
    let block = info
        .to_block()
        .map_err(|e| anyhow!("block {}: {e}", info.hash))?;
    block.verify_signature()?;
    let payload = get_bytes(&format!("{}/blocks/{}/payload", base(relay), info.hash))?;
    check_payload_integrity(&block.header, &payload)
        .with_context(|| format!("payload of {} ({})", info.name, info.hash))?;
    Ok((block, payload))
}

/// The meta block to use: the one given, or the only chain-A head.
pub fn pick_meta(relay: &str, meta: Option<BlockHash>) -> Result<(Block, MetaPayload, Config)> {
    let a = list_chain(relay, ChainId::A)?;
    let info = match meta {
        Some(h) => a
            .iter()
            .find(|i| i.hash == h)
            .ok_or_else(|| anyhow!("the relay has no meta block {h}"))?,
        None => {
            let heads: Vec<&BlockInfo> = a.iter().filter(|i| i.is_head).collect();
            match heads.as_slice() {
                [one] => one,
                [] if a.len() == 1 => &a[0],
                [] => bail!("the relay lists no chain-A head; pass --meta-hash"),
                _ => bail!("the relay has {} models; pass --meta-hash", heads.len()),
            }
        }
    };
    let (block, payload) = fetch_payload(relay, info)?;
    let (m, cfg) = MetaPayload::parse(&payload)?;
    Ok((block, m, cfg))
}

/// Current head of every slot of a model (by meta hash).
pub fn slot_heads(relay: &str, meta: &BlockHash) -> Result<Vec<BlockInfo>> {
    Ok(list_chain(relay, ChainId::B)?
        .into_iter()
        .filter(|i| i.is_head && i.meta.as_ref() == Some(meta))
        .collect())
}

/// Current head of one slot, if any.
pub fn slot_head(relay: &str, meta: &BlockHash, slot: Slot) -> Result<Option<BlockInfo>> {
    let name = slot.to_string();
    Ok(slot_heads(relay, meta)?
        .into_iter()
        .find(|i| i.name == name))
}

/// Write the chain's current heads back as a Hugging Face directory.
/// Returns the meta hash used.
pub fn export(relay: &str, meta: Option<BlockHash>, out: &Path) -> Result<BlockHash> {
    let (meta_block, m, cfg) = pick_meta(relay, meta)?;
    let heads = slot_heads(relay, &meta_block.hash)?;
    let mut payloads = Vec::new();
    for slot in Slot::all(&cfg) {
        let name = slot.to_string();
        let info = heads
            .iter()
            .find(|i| i.name == name)
            .ok_or_else(|| anyhow!("the relay has no head for slot {name}"))?;
        let (_, payload) = fetch_payload(relay, info)?;
        payloads.push(payload);
    }
    let weights = join_payloads(&payloads)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::write(
        out.join("config.json"),
        serde_json::to_string_pretty(&m.config)? + "\n",
    )?;
    if let Some(t) = &m.tokenizer {
        std::fs::write(out.join("tokenizer.json"), serde_json::to_string(t)?)?;
    }
    std::fs::write(out.join("model.safetensors"), weights)?;
    Ok(meta_block.hash)
}

#[cfg(test)]
mod tests {
    use super::next_link;

    #[test]
    fn next_link_of_the_relays_link_header() {
        let b = "http://127.0.0.1:8080";
        assert_eq!(
            next_link(
                b,
                Some(r#"</chain/B/blocks?after=ab&limit=10>; rel="next""#)
            )
            .as_deref(),
            Some("http://127.0.0.1:8080/chain/B/blocks?after=ab&limit=10")
        );
        assert_eq!(
            next_link(b, Some("<http://x/y>; rel=next")).as_deref(),
            Some("http://x/y")
        );
        assert_eq!(next_link(b, Some(r#"</a>; rel="prev""#)), None);
        assert_eq!(next_link(b, Some("garbage")), None);
        assert_eq!(next_link(b, None), None);
    }
}
