//! A lying peer for the browser tests (tests/e2e/node.mjs): it logs in to a
//! relay's `/ws`, announces `Have` for expert blocks it takes from the relay's
//! REST API, and answers every `ServeChunk` with the right chunk but one bit
//! flipped (same length: only the hash check can catch it). The relay must
//! catch it itself, ban it, and serve the chunk from elsewhere.
//!
//! ```text
//! cargo run -p miner --example corrupt_peer -- --relay http://127.0.0.1:8080 \
//!     [--experts 'layer*.expert*'] [--blocks HASH,HASH]
//! ```
//!
//! stdout, one JSON object per line (tests read them):
//! `{"event":"ready","peer":HEX,"blocks":[HEX..]}` after the login and `Have`;
//! `{"event":"served_bad","block":HEX,"index":N,"count":N}` per lie;
//! `{"event":"error","code":..,"message":..}` per relay error;
//! `{"event":"closed","served_bad":N}` when the relay closes the connection
//! (the process then exits 0).

use std::collections::HashMap;
use std::io::{Read as _, Write as _};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use ed25519_dalek::SigningKey;
use futures_util::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use web_node::chain::BlockHash;
use web_node::net::api::BlockInfo;
use web_node::net::peer::{decode_from_relay, limits, login, FromRelay, ToRelay, SUBPROTOCOL};

#[derive(Parser)]
struct Args {
    /// The relay: http://HOST:PORT (or ws://HOST:PORT/ws).
    #[arg(long)]
    relay: String,
    /// Comma-separated globs of the slot heads to claim (default: every expert).
    #[arg(long, default_value = miner::peer::ALL_EXPERTS)]
    experts: String,
    /// Claim exactly these blocks instead (comma-separated hex hashes).
    #[arg(long)]
    blocks: Option<String>,
}

/// One claimed block: its payload (fetched honestly) and chunk size.
struct Held {
    payload: Vec<u8>,
    chunk_size: usize,
}

fn emit(v: serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

fn get(url: &str) -> Result<Vec<u8>> {
    let resp = ureq::get(url).call().map_err(|e| anyhow!("{url}: {e}"))?;
    let mut v = Vec::new();
    resp.into_reader()
        .take(web_node::chain::limits::MAX_PAYLOAD_LEN + 1)
        .read_to_end(&mut v)?;
    Ok(v)
}

fn list_b(base: &str) -> Result<Vec<BlockInfo>> {
    let mut out: Vec<BlockInfo> = Vec::new();
    loop {
        let url = match out.last() {
            None => format!("{base}/chain/B/blocks?limit=1000"),
            Some(l) => format!("{base}/chain/B/blocks?after={}&limit=1000", l.hash),
        };
        let page: Vec<BlockInfo> =
            serde_json::from_slice(&get(&url)?).with_context(|| format!("parsing {url}"))?;
        let n = page.len();
        out.extend(page);
        if n < 1000 {
            return Ok(out);
        }
    }
}

/// Fetch the payloads of the blocks to claim (blocking).
fn load(args: &Args, base: &str) -> Result<HashMap<BlockHash, Held>> {
    let listing = list_b(base)?;
    let picked: Vec<&BlockInfo> = match &args.blocks {
        Some(list) => {
            let want = list
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(BlockHash::from_hex)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| anyhow!("--blocks: {e}"))?;
            want.iter()
                .map(|h| {
                    listing
                        .iter()
                        .find(|i| i.hash == *h)
                        .ok_or_else(|| anyhow!("block {h} is not listed on chain B"))
                })
                .collect::<Result<_>>()?
        }
        None => {
            let globs = miner::peer::parse_globs(&args.experts);
            listing
                .iter()
                .filter(|i| i.is_head && globs.iter().any(|g| miner::peer::glob_match(g, &i.name)))
                .collect()
        }
    };
    if picked.is_empty() {
        bail!("no block to claim");
    }
    let mut held = HashMap::new();
    for info in picked {
        let payload = get(&format!("{base}/blocks/{}/payload", info.hash))?;
        if payload.len() as u64 != info.payload_len {
            bail!(
                "payload of {} is {} bytes, not {}",
                info.hash,
                payload.len(),
                info.payload_len
            );
        }
        held.insert(
            info.hash,
            Held {
                payload,
                chunk_size: info.chunk_size as usize,
            },
        );
    }
    Ok(held)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    let base = miner::peer::http_base(&args.relay)?;
    let held = {
        let base = base.clone();
        tokio::task::spawn_blocking(move || load(&args, &base)).await??
    };
    let key = SigningKey::generate(&mut rand_core::OsRng);
    let mut req = format!("{}/ws", base.replacen("http", "ws", 1)).into_client_request()?;
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", SUBPROTOCOL.parse()?);
    let cfg = WebSocketConfig::default()
        .max_message_size(Some(limits::MAX_MESSAGE))
        .max_frame_size(Some(limits::MAX_MESSAGE));
    let (ws, _) = tokio_tungstenite::connect_async_with_config(req, Some(cfg), true)
        .await
        .context("connecting to /ws")?;
    let (mut tx, mut rx) = ws.split();
    let mut served_bad = 0u64;
    let send = |m: ToRelay| Message::Binary(m.encode().into());
    while let Some(frame) = rx.next().await {
        let bytes = match frame {
            Ok(Message::Binary(b)) => b,
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => continue,
        };
        let Ok(msg) = decode_from_relay(&bytes) else {
            continue;
        };
        match msg {
            FromRelay::Challenge { nonce, .. } => {
                tx.send(send(login(&key, &nonce, "corrupt-peer/test")))
                    .await?;
            }
            FromRelay::Welcome { .. } => {
                tx.send(send(ToRelay::Status {
                    load: 0,
                    serve_compute: false,
                }))
                .await?;
                let add: Vec<BlockHash> = held.keys().copied().collect();
                tx.send(send(ToRelay::Have {
                    add: add.clone(),
                    remove: vec![],
                }))
                .await?;
                emit(serde_json::json!({
                    "event": "ready",
                    "peer": hex::encode(key.verifying_key().to_bytes()),
                    "blocks": add.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
                }));
            }
            FromRelay::ServeChunk { req, block, index } => {
                let answer = match held.get(&block) {
                    Some(h) => {
                        let s = index as usize * h.chunk_size;
                        let e = (s + h.chunk_size).min(h.payload.len());
                        if s < e {
                            let mut data = h.payload[s..e].to_vec();
                            data[(e - s) / 2] ^= 0x01;
                            served_bad += 1;
                            emit(serde_json::json!({
                                "event": "served_bad", "block": block.to_string(),
                                "index": index, "count": served_bad,
                            }));
                            ToRelay::Chunk { req, data }
                        } else {
                            ToRelay::NoChunk {
                                req,
                                reason: "index out of range".into(),
                            }
                        }
                    }
                    None => ToRelay::NoChunk {
                        req,
                        reason: "not held".into(),
                    },
                };
                tx.send(send(answer)).await?;
            }
            FromRelay::Error { code, message } => {
                emit(serde_json::json!({"event": "error", "code": code, "message": message}));
            }
            _ => {}
        }
    }
    emit(serde_json::json!({"event": "closed", "served_bad": served_bad}));
    Ok(())
}
