//! A raw `/ws` client for tests: real tokio-tungstenite WebSockets speaking
//! `web_node::net::peer`, plus a relay with an expert block of many chunks.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use futures_util::{SinkExt as _, StreamExt as _};
use relay::peers::PeerOptions;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use web_node::chain::{Block, BlockHash, PayloadAssembler};
use web_node::model::random::{small_config, write_random_model};
use web_node::model::{Config, Slot};
use web_node::net::api::{BlockInfo, ChunkList};
use web_node::net::peer::{decode_from_relay, login, ChunkSource, FromRelay, ToRelay, SUBPROTOCOL};

use super::{get, list, miner_key, post_json, seed_json, slot_payload, upload, TestRelay};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Longest wait for one expected message (a failing test, not a timing
/// assertion).
pub const WAIT: Duration = Duration::from_secs(30);

/// The upgrade request for `addr` with the given subprotocols.
pub fn request(
    addr: &str,
    protocols: &[&str],
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    let mut req = format!("ws://{addr}/ws").into_client_request().unwrap();
    if !protocols.is_empty() {
        req.headers_mut().insert(
            "sec-websocket-protocol",
            protocols.join(", ").parse().unwrap(),
        );
    }
    req
}

/// Open a WebSocket with subprotocol aiblock.v1 (no login yet).
pub async fn connect(addr: &str) -> Ws {
    let (ws, resp) = tokio_tungstenite::connect_async(request(addr, &[SUBPROTOCOL]))
        .await
        .unwrap();
    assert_eq!(
        resp.headers()
            .get("sec-websocket-protocol")
            .map(|v| v.to_str().unwrap()),
        Some(SUBPROTOCOL)
    );
    ws
}

pub async fn send(ws: &mut Ws, m: &ToRelay) {
    ws.send(Message::Binary(m.encode().into())).await.unwrap();
}

/// The next protocol message; None when the connection closed.
pub async fn recv(ws: &mut Ws) -> Option<FromRelay> {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await {
            Err(_) => panic!("no message from the relay within {WAIT:?}"),
            Ok(None) | Ok(Some(Err(_))) | Ok(Some(Ok(Message::Close(_)))) => return None,
            Ok(Some(Ok(Message::Binary(b)))) => return Some(decode_from_relay(&b).unwrap()),
            Ok(Some(Ok(_))) => continue,
        }
    }
}

/// Read until an `Error`; returns its code and message (panics if the
/// connection closes first).
pub async fn expect_error(ws: &mut Ws) -> (String, String) {
    loop {
        match recv(ws).await {
            Some(FromRelay::Error { code, message }) => return (code, message),
            Some(_) => continue,
            None => panic!("connection closed without an Error"),
        }
    }
}

/// After a fatal error the relay closes: read to the end.
pub async fn expect_closed(ws: &mut Ws) {
    while let Some(m) = recv(ws).await {
        if let FromRelay::Error { .. } = m {
            continue;
        }
    }
}

/// The challenge's nonce.
pub async fn challenge(ws: &mut Ws) -> [u8; 32] {
    match recv(ws).await {
        Some(FromRelay::Challenge { nonce, version }) => {
            assert_eq!(version, 1);
            nonce
        }
        other => panic!("expected Challenge, got {other:?}"),
    }
}

/// Connect and log in with `key`; the Welcome and the `DirectConfig`
/// after it checked.
pub async fn login_as(addr: &str, key: &SigningKey) -> Ws {
    login_with_ice(addr, key).await.0
}

/// [`login_as`], returning the ICE servers the relay handed out.
pub async fn login_with_ice(addr: &str, key: &SigningKey) -> (Ws, Vec<String>) {
    let mut ws = connect(addr).await;
    let nonce = challenge(&mut ws).await;
    send(&mut ws, &login(key, &nonce, "test-peer")).await;
    match recv(&mut ws).await {
        Some(FromRelay::Welcome { peer, .. }) => {
            assert_eq!(peer, key.verifying_key().to_bytes())
        }
        other => panic!("expected Welcome, got {other:?}"),
    }
    match recv(&mut ws).await {
        Some(FromRelay::DirectConfig { ice_servers }) => (ws, ice_servers),
        other => panic!("expected DirectConfig, got {other:?}"),
    }
}

/// Wait (up to [`WAIT`]) for a condition the relay reaches asynchronously.
pub async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let end = tokio::time::Instant::now() + WAIT;
    while !f() {
        assert!(
            tokio::time::Instant::now() < end,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A relay whose model has one layer of two experts of 96 KiB each, and a
/// new version of `layer0.expert1` uploaded with 4 KiB chunks (24 chunks).
pub struct PeerEnv {
    pub tmp: tempfile::TempDir,
    pub relay: TestRelay,
    pub cfg: Config,
    pub block: Block,
    pub info: BlockInfo,
    pub payload: Arc<Vec<u8>>,
    pub chunks: ChunkList,
}

/// The model config of [`PeerEnv`].
pub fn peer_config() -> Config {
    small_config(259, 32, 256, 1, 2, 1)
}

pub fn peer_model(dir: &Path) -> PathBuf {
    let m = dir.join("model");
    write_random_model(&m, &peer_config(), 7).unwrap();
    m
}

impl PeerEnv {
    pub fn start(opts: PeerOptions) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let model = peer_model(tmp.path());
        let relay = TestRelay::start_with(&tmp.path().join("data"), Some(&model), None, |s| {
            s.with_peer_options(opts)
        });
        let cfg = peer_config();
        let (block, info, payload) = publish_expert(&relay, &cfg, 0, 1, 99);
        let chunks: ChunkList = get(&format!("{}/blocks/{}/chunks", relay.url, block.hash)).json();
        Self {
            tmp,
            relay,
            cfg,
            block,
            info,
            payload: Arc::new(payload),
            chunks,
        }
    }

    pub fn addr(&self) -> String {
        self.relay.addr()
    }

    pub fn hash(&self) -> BlockHash {
        self.block.hash
    }

    pub fn n_chunks(&self) -> u32 {
        self.chunks.chunks.len() as u32
    }

    pub fn chunk(&self, index: u32) -> Vec<u8> {
        let cs = self.info.chunk_size as usize;
        let s = index as usize * cs;
        self.payload[s..(s + cs).min(self.payload.len())].to_vec()
    }

    /// A fresh assembler with the chunk list from the REST API.
    pub fn assembler(&self) -> PayloadAssembler {
        let mut a = PayloadAssembler::new(&self.block);
        a.set_chunk_list(self.chunks.chunks.clone()).unwrap();
        a
    }
}

/// Upload a new version of `layer{l}.expert{e}` (4 KiB chunks) through the
/// seed's JSON upload; returns the block, its listing and payload.
pub fn publish_expert(
    relay: &TestRelay,
    cfg: &Config,
    layer: usize,
    expert: usize,
    seed: u64,
) -> (Block, BlockInfo, Vec<u8>) {
    let slot = Slot::Expert { layer, expert };
    let name = slot.to_string();
    let meta = list(&relay.url, "A")[0].hash;
    let head = list(&relay.url, "B")
        .into_iter()
        .filter(|b| b.name == name && b.is_head)
        .map(|b| b.hash)
        .collect::<Vec<_>>();
    let payload = slot_payload(cfg, slot, seed);
    let (up, block) = upload(slot, &payload, head, Some(meta), &miner_key(9));
    let r = post_json(
        &format!("{}/upload_moe_experts", relay.url),
        &seed_json(&up),
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let info: BlockInfo = r.json();
    assert_eq!(info.hash, block.hash);
    (block, info, payload)
}

/// Serve `ServeChunk` requests from `payload` (flipping a bit when
/// `corrupt`) until the connection ends; returns the errors received.
pub async fn serve_chunks(
    mut ws: Ws,
    payload: Arc<Vec<u8>>,
    chunk_size: usize,
    corrupt: bool,
) -> Vec<(String, String)> {
    let mut errors = Vec::new();
    while let Some(m) = recv(&mut ws).await {
        match m {
            FromRelay::ServeChunk { req, index, .. } => {
                let s = index as usize * chunk_size;
                let mut data = payload[s..(s + chunk_size).min(payload.len())].to_vec();
                if corrupt {
                    data[0] ^= 1;
                }
                if ws
                    .send(Message::Binary(
                        ToRelay::Chunk { req, data }.encode().into(),
                    ))
                    .await
                    .is_err()
                {
                    break;
                }
            }
            FromRelay::Error { code, message } => errors.push((code, message)),
            _ => {}
        }
    }
    errors
}

/// Announce a peer's load and the blocks it holds.
pub async fn announce(ws: &mut Ws, load: u16, serve_compute: bool, have: Vec<BlockHash>) {
    send(
        ws,
        &ToRelay::Status {
            load,
            serve_compute,
        },
    )
    .await;
    send(
        ws,
        &ToRelay::Have {
            add: have,
            remove: vec![],
        },
    )
    .await;
}

/// Ask for chunk `index` and wait for its answer: Ok((data, source)) or
/// Err(reason).
pub async fn fetch_chunk(
    ws: &mut Ws,
    req: u64,
    block: BlockHash,
    index: u32,
) -> Result<(Vec<u8>, ChunkSource), String> {
    send(ws, &ToRelay::GetChunk { req, block, index }).await;
    loop {
        match recv(ws).await {
            Some(FromRelay::ChunkData {
                req: r,
                data,
                from,
                index: i,
                ..
            }) if r == req => {
                assert_eq!(i, index);
                return Ok((data, from));
            }
            Some(FromRelay::ChunkFailed { req: r, reason, .. }) if r == req => return Err(reason),
            Some(_) => continue,
            None => panic!("connection closed while waiting for chunk {index}"),
        }
    }
}
