//! A compute peer for the chat tests and the chat benchmark: a raw
//! tokio-tungstenite client speaking `web_node::net::peer`. It logs in,
//! announces the expert blocks it holds (`Have`) and `Status{serve_compute}`,
//! and answers `Compute` with `expert_forward` on weights read from the
//! block's payload, verified against the signed header of the relay's listing.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::Read as _;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ed25519_dalek::SigningKey;
use futures_util::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::Message;
use web_node::chain::{chunk_hashes, payload_root, BlockHash};
use web_node::model::reference::expert_forward;
use web_node::model::{Config, ExpertWeights, Slot};
use web_node::net::api::BlockInfo;
use web_node::net::peer::{decode_from_relay, login, FromRelay, PeerId, ToRelay, SUBPROTOCOL};

/// The current head blocks of every expert of `layers`, with their weights
/// from the verified payloads (signature, block hash, payload root).
pub fn expert_weights(
    url: &str,
    cfg: &Config,
    layers: Range<usize>,
) -> HashMap<BlockHash, ExpertWeights> {
    let listing: Vec<BlockInfo> = serde_json::from_reader(
        ureq::get(&format!("{url}/chain/B/blocks"))
            .call()
            .unwrap()
            .into_reader(),
    )
    .unwrap();
    let mut out = HashMap::new();
    for info in listing.iter().filter(|i| i.is_head) {
        let Ok(Slot::Expert { layer, expert }) = Slot::parse(&info.name) else {
            continue;
        };
        if !layers.contains(&layer) {
            continue;
        }
        let block = info.to_block().unwrap();
        block.verify_signature().unwrap();
        let mut payload = Vec::new();
        ureq::get(&format!("{url}/blocks/{}/payload", info.hash))
            .call()
            .unwrap()
            .into_reader()
            .read_to_end(&mut payload)
            .unwrap();
        let h = &block.header;
        assert_eq!(payload.len() as u64, h.payload_len);
        assert_eq!(
            payload_root(&chunk_hashes(&payload, h.chunk_size)),
            h.payload_root
        );
        let w = ExpertWeights::from_safetensors(cfg, layer, expert, &payload).unwrap();
        out.insert(info.hash, w);
    }
    out
}

/// How a peer answers `Compute`.
#[derive(Clone)]
pub enum Behaviour {
    /// Compute and answer.
    Answer,
    /// Drop the connection on the first `Compute` (a peer killed mid-request).
    DropOnFirstCompute,
    /// Wait until the flag is true, then answer.
    WaitFor(tokio::sync::watch::Receiver<bool>),
}

/// A running compute peer.
pub struct ComputePeer {
    pub id: PeerId,
    /// `Compute` requests received.
    pub asked: Arc<AtomicU64>,
    /// `ComputeResult`s sent.
    pub answered: Arc<AtomicU64>,
    pub task: tokio::task::JoinHandle<()>,
}

impl ComputePeer {
    pub fn id_hex(&self) -> String {
        hex::encode(self.id)
    }

    pub fn asked(&self) -> u64 {
        self.asked.load(Ordering::SeqCst)
    }

    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::SeqCst)
    }
}

/// Log in to the relay at `addr` (host:port), announce `held` and serve
/// computations on them (in a task of the current runtime).
pub async fn start(
    addr: &str,
    key: SigningKey,
    held: HashMap<BlockHash, ExpertWeights>,
    behaviour: Behaviour,
) -> ComputePeer {
    let mut req = format!("ws://{addr}/ws").into_client_request().unwrap();
    req.headers_mut()
        .insert("sec-websocket-protocol", SUBPROTOCOL.parse().unwrap());
    // Nagle off: a computation is one small message each way.
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(req, None, true)
        .await
        .unwrap();
    let send = |m: ToRelay| Message::Binary(m.encode().into());
    let next = |m: Option<Result<Message, _>>| -> Option<FromRelay> {
        match m {
            Some(Ok(Message::Binary(b))) => Some(decode_from_relay(&b).unwrap()),
            _ => None,
        }
    };
    let Some(FromRelay::Challenge { nonce, .. }) = next(ws.next().await) else {
        panic!("no challenge");
    };
    ws.send(send(login(&key, &nonce, "chat-test-peer")))
        .await
        .unwrap();
    match next(ws.next().await) {
        Some(FromRelay::Welcome { .. }) => {}
        other => panic!("login refused: {other:?}"),
    }
    ws.send(send(ToRelay::Have {
        add: held.keys().copied().collect(),
        remove: vec![],
    }))
    .await
    .unwrap();
    ws.send(send(ToRelay::Status {
        load: 0,
        serve_compute: true,
    }))
    .await
    .unwrap();
    let asked = Arc::new(AtomicU64::new(0));
    let answered = Arc::new(AtomicU64::new(0));
    let (a, b) = (asked.clone(), answered.clone());
    let task = tokio::spawn(async move {
        while let Some(msg) = ws.next().await {
            let bytes = match msg {
                Ok(Message::Binary(b)) => b,
                Ok(Message::Close(c)) => {
                    eprintln!("compute peer: closed by the relay: {c:?}");
                    break;
                }
                Err(e) => {
                    eprintln!("compute peer: connection failed: {e}");
                    break;
                }
                Ok(_) => continue,
            };
            if let Ok(FromRelay::Error { code, message }) = decode_from_relay(&bytes) {
                eprintln!("compute peer: relay error {code}: {message}");
            }
            let Ok(FromRelay::Compute {
                req,
                block,
                rows,
                input,
            }) = decode_from_relay(&bytes)
            else {
                continue;
            };
            a.fetch_add(1, Ordering::SeqCst);
            let reply = match &behaviour {
                Behaviour::DropOnFirstCompute => return,
                Behaviour::WaitFor(rx) => {
                    let mut rx = rx.clone();
                    let _ = rx.wait_for(|go| *go).await;
                    compute(&held, block, rows, &input, req)
                }
                Behaviour::Answer => compute(&held, block, rows, &input, req),
            };
            if ws.send(send(reply)).await.is_err() {
                break;
            }
            b.fetch_add(1, Ordering::SeqCst);
        }
    });
    ComputePeer {
        id: key.verifying_key().to_bytes(),
        asked,
        answered,
        task,
    }
}

fn compute(
    held: &HashMap<BlockHash, ExpertWeights>,
    block: BlockHash,
    rows: u32,
    input: &[f32],
    req: u64,
) -> ToRelay {
    match held.get(&block) {
        Some(w) => ToRelay::ComputeResult {
            req,
            output: expert_forward(w, input, rows as usize, 1),
        },
        None => ToRelay::ComputeFailed {
            req,
            reason: format!("block {block} is not held here"),
        },
    }
}
