//! A link: this relay's outbound `/ws` connection to another relay of the
//! same database, over the ordinary peer protocol. It logs in with the
//! relay key ([`Cluster::key`], agent [`AGENT`]) through
//! the ordinary challenge, and the other relay, which finds the key in
//! `relays`, treats it as a relay (no peer: no presence, no credit).
//!
//! The core ([`crate::peers::chunks`]) decides when a link opens and what
//! goes over it; this actor only moves messages: the core's `ServeChunk`
//! for the link goes out as `GetChunk` (same request id), the answers
//! (`ChunkData`, `ChunkFailed`) go back to the core, which checks every
//! chunk against the block's chunk list before delivering it. Bounded: the
//! core keeps at most `CHUNK_CREDITS` requests outstanding on a link (what
//! the other relay allows one requester) and times them out like any
//! holder; the queue is [`limits::OUTBOUND_QUEUE`]; connecting, logging in
//! and each write have timeouts; a link silent for the idle timeout is
//! dropped; a failed or lost link is opened again only after the core's
//! doubling backoff.

use std::sync::Arc;
use std::time::Instant;

use futures_util::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use web_node::net::peer::{
    decode_from_relay, limits, login, FromRelay, PeerId, ToRelay, SUBPROTOCOL,
};

use crate::limits::LINK_CLOSE_TIMEOUT;
use crate::peers::cluster::Cluster;
use crate::peers::{LinkSession, Peers, RemoteRelay};

/// TCP connect plus the WebSocket handshake.
pub use crate::limits::LINK_CONNECT_TIMEOUT as CONNECT_TIMEOUT;
/// The agent a link logs in with (followed by the relay's id).
pub use crate::peers::cluster::RELAY_AGENT as AGENT;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Open link `link` to `relay` in a task of its own; the core hears of it
/// through [`Peers::link_connected`] and [`Peers::link_closed`].
pub fn spawn(peers: Arc<Peers>, cluster: Arc<Cluster>, link: PeerId, relay: RemoteRelay) {
    tokio::spawn(async move {
        let ws = match connect(&cluster, &relay).await {
            Ok(ws) => ws,
            Err(why) => {
                tracing::info!(relay = %relay.id, url = %relay.ws_url, reason = %why, "link to another relay failed");
                peers.link_closed(link, None);
                return;
            }
        };
        let Some(mut s) = peers.link_connected(link) else {
            return;
        };
        let why = serve(&peers, &mut s, ws).await;
        tracing::info!(relay = %relay.id, reason = %why, "link to another relay closed");
        peers.link_closed(link, Some(s.conn));
    });
}

/// Connect and log in.
async fn connect(c: &Cluster, r: &RemoteRelay) -> Result<Ws, String> {
    let mut req = r
        .ws_url
        .as_str()
        .into_client_request()
        .map_err(|e| format!("bad URL: {e}"))?;
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        SUBPROTOCOL
            .parse()
            .map_err(|_| "bad subprotocol".to_string())?,
    );
    let cfg = WebSocketConfig::default()
        .max_message_size(Some(limits::MAX_MESSAGE))
        .max_frame_size(Some(limits::MAX_MESSAGE));
    let connect = tokio_tungstenite::connect_async_with_config(req, Some(cfg), true);
    let (mut ws, _) = tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("connect: {e}"))?;
    let nonce = match next(&mut ws).await? {
        FromRelay::Challenge { nonce, .. } => nonce,
        other => return Err(format!("expected Challenge, got {other:?}")),
    };
    let hello = login(&c.key, &nonce, &format!("{AGENT} {}", c.id));
    write(&mut ws, hello).await?;
    match next(&mut ws).await? {
        FromRelay::Welcome { peer, .. } if peer == c.public_key() => Ok(ws),
        FromRelay::Error { code, message } => Err(format!("login refused: {code}: {message}")),
        other => Err(format!("expected Welcome, got {other:?}")),
    }
}

/// The next protocol message during login (within the login timeout).
async fn next(ws: &mut Ws) -> Result<FromRelay, String> {
    let read = async {
        loop {
            match ws.next().await {
                None => return Err("closed".to_string()),
                Some(Err(e)) => return Err(format!("read: {e}")),
                Some(Ok(Message::Binary(b))) => {
                    return decode_from_relay(&b).map_err(|e| e.to_string())
                }
                Some(Ok(Message::Close(f))) => return Err(format!("closed: {f:?}")),
                Some(Ok(_)) => {}
            }
        }
    };
    tokio::time::timeout(limits::LOGIN_TIMEOUT, read)
        .await
        .map_err(|_| "login timed out".to_string())?
}

async fn write(ws: &mut Ws, m: ToRelay) -> Result<(), String> {
    match tokio::time::timeout(
        limits::WRITE_TIMEOUT,
        ws.send(Message::Binary(m.encode().into())),
    )
    .await
    {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("write: {e}")),
        Err(_) => Err("write timed out".into()),
    }
}

/// Move messages until the link ends; returns why.
async fn serve(peers: &Peers, s: &mut LinkSession, mut ws: Ws) -> String {
    let idle = peers.opts.idle_timeout;
    let mut stop = peers.shutdown_signal();
    let mut ping = tokio::time::interval(peers.opts.ping_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    let mut last = Instant::now();
    let kill = s.kill_signal();
    let why = loop {
        tokio::select! {
            _ = stopped(&mut stop) => break "this relay is shutting down".to_string(),
            why = kill.fired() => break why,
            m = s.rx.recv() => match m {
                None => break "queue closed".into(),
                Some(FromRelay::ServeChunk { req, block, index }) => {
                    if let Err(e) = write(&mut ws, ToRelay::GetChunk { req, block, index }).await {
                        break e;
                    }
                }
                Some(_) => {}
            },
            f = ws.next() => match f {
                None => break "closed by the other relay".into(),
                Some(Err(e)) => break format!("read: {e}"),
                Some(Ok(Message::Binary(b))) => {
                    last = Instant::now();
                    match decode_from_relay(&b) {
                        Ok(FromRelay::Error { code, message }) => {
                            tracing::info!(%code, %message, "error from the other relay on a link");
                            peers.link_heartbeat(s.conn);
                        }
                        Ok(m) => peers.link_message(s.conn, m),
                        Err(e) => break format!("undecodable frame: {e}"),
                    }
                }
                Some(Ok(Message::Close(f))) => break format!("closed by the other relay: {f:?}"),
                Some(Ok(_)) => {
                    last = Instant::now();
                    peers.link_heartbeat(s.conn);
                }
            },
            _ = ping.tick() => {
                if last.elapsed() > idle {
                    break format!("silent for {} s", idle.as_secs());
                }
                let p = tokio::time::timeout(limits::WRITE_TIMEOUT, ws.send(Message::Ping(Vec::new().into())));
                if !matches!(p.await, Ok(Ok(()))) {
                    break "ping failed".into();
                }
            }
        }
    };
    let _ = tokio::time::timeout(LINK_CLOSE_TIMEOUT, ws.close(None)).await;
    why
}

/// Resolves once `stop` is true (the relay shuts down).
async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
