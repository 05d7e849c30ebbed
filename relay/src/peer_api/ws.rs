//! `GET /ws`: the upgrade (subprotocol, caps, message size) and one actor
//! per connection. The actor logs the peer in (challenge, signed `Login`
//! within the login timeout), then loops over `select!`: shutdown, a kill
//! from the registry (replaced, banned, queue full), the bounded outbound
//! queue (each write within the write timeout), inbound frames (token
//! bucket, decode, hand to the core) and the ping interval (a peer silent
//! for the idle timeout is dropped). Protocol decisions live in
//! [`crate::peers::chunks::Core`].
//!
//! Layer: handlers (a part of [`super`]'s). It drives the internals of
//! [`Peers`] (the core, the connection handles, the kill switches), which
//! `crate::peers` opens to the crate for it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::http::{Extensions, StatusCode};
use axum::response::{IntoResponse, Response};
use rand_core::RngCore as _;
use tokio::sync::mpsc;
use web_node::net::api::{codes as api_codes, ApiError};
use web_node::net::peer::{
    codes, decode_to_relay, limits, truncate_text, verify_login, FromRelay, PeerId, ToRelay,
    WireLimits, SUBPROTOCOL,
};

use super::PeerState;
use crate::http::HttpError;
use crate::peers::{
    Action, ConnHandle, ConnKind, Counters, Kill, Peers, CLOSE_WRITE_TIMEOUT, READ_BUFFER,
};

/// WebSocket close code for a policy violation (RFC 6455 §7.4.1).
const CLOSE_POLICY: u16 = 1008;
/// WebSocket close code for a message too big (RFC 6455 §7.4.1).
const CLOSE_TOO_BIG: u16 = 1009;
/// WebSocket close code: going away (shutdown).
const CLOSE_AWAY: u16 = 1001;
/// Another relay's connection may send this many times a peer's messages
/// per second (it asks on behalf of all its peers; its requests are still
/// bounded by the chunk credits).
pub const RELAY_RATE_FACTOR: u32 = 16;

/// `GET /ws`.
pub(crate) async fn upgrade(
    State(st): State<PeerState>,
    ext: Extensions,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let peers = st.peers.clone();
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => {
            Counters::inc(&peers.counters.refused_connections);
            return HttpError::with_status(
                ApiError::malformed(format!(
                    "/ws is a WebSocket endpoint: connect with a WebSocket client \
                     (GET with Upgrade: websocket) and subprotocol {SUBPROTOCOL} ({})",
                    e.body_text()
                )),
                StatusCode::BAD_REQUEST,
            )
            .into_response();
        }
    };
    if !ws
        .requested_protocols()
        .any(|p| p.as_bytes() == SUBPROTOCOL.as_bytes())
    {
        Counters::inc(&peers.counters.refused_connections);
        return HttpError::with_status(
            ApiError::malformed(format!(
                "the WebSocket subprotocol must be {SUBPROTOCOL} \
                 (header Sec-WebSocket-Protocol: {SUBPROTOCOL})"
            )),
            StatusCode::BAD_REQUEST,
        )
        .into_response();
    }
    let addr = ext
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0)
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
    let guard = match peers.admit(addr.ip()) {
        Ok(g) => g,
        Err(why) => {
            Counters::inc(&peers.counters.refused_connections);
            return HttpError::unavailable(why, 1).into_response();
        }
    };
    ws.protocols([SUBPROTOCOL])
        .max_message_size(limits::MAX_MESSAGE)
        .max_frame_size(limits::MAX_MESSAGE)
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_write_buffer_size(2 * limits::MAX_MESSAGE)
        .on_upgrade(move |socket| async move {
            run(st, socket, addr).await;
            drop(guard);
        })
}

/// Per-connection token bucket.
struct Bucket {
    tokens: f64,
    at: Instant,
    rate: f64,
    burst: f64,
}

impl Bucket {
    fn new(rate: u32, burst: u32) -> Self {
        Self {
            tokens: f64::from(burst.max(1)),
            at: Instant::now(),
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(self.burst);
        self.at = now;
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }
}

async fn write(socket: &mut WebSocket, msg: Message, t: Duration) -> Result<(), &'static str> {
    match tokio::time::timeout(t, socket.send(msg)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err("write failed"),
        Err(_) => Err("write timed out"),
    }
}

/// Send `Error{code, message}` and a close frame, briefly; the socket is
/// dropped after.
async fn close_with(socket: &mut WebSocket, code: &str, message: String, close: u16) {
    let mut reason = message.clone();
    // A close frame's reason is at most 123 bytes.
    if reason.len() > 120 {
        let mut end = 120;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
    }
    let _ = write(
        socket,
        Message::Binary(FromRelay::error(code, message).encode().into()),
        CLOSE_WRITE_TIMEOUT,
    )
    .await;
    let _ = write(
        socket,
        Message::Close(Some(CloseFrame {
            code: close,
            reason: reason.into(),
        })),
        CLOSE_WRITE_TIMEOUT,
    )
    .await;
    // Read what the peer still sends (and its close reply) so that closing
    // does not reset the error away before the peer read it.
    let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, async {
        while let Some(Ok(_)) = socket.recv().await {}
    })
    .await;
}

enum LoginError {
    /// Tell the peer why.
    Refuse(&'static str, String),
    /// The socket closed or failed.
    Gone,
}

/// Wait for the `Login` frame and check it against `nonce`.
async fn read_login(
    socket: &mut WebSocket,
    nonce: &[u8; 32],
    bucket: &mut Bucket,
) -> Result<(PeerId, String), LoginError> {
    loop {
        let msg = match socket.recv().await {
            None => return Err(LoginError::Gone),
            Some(Err(e)) => {
                return Err(
                    frame_error(&e).map_or(LoginError::Gone, |(c, m)| LoginError::Refuse(c, m))
                )
            }
            Some(Ok(m)) => m,
        };
        if !bucket.take() {
            return Err(LoginError::Refuse(
                codes::RATE_LIMITED,
                "too many frames before login".into(),
            ));
        }
        match msg {
            Message::Binary(b) => {
                return match decode_to_relay(&b) {
                    Ok(ToRelay::Login { key, sig, agent }) => match verify_login(nonce, &key, &sig)
                    {
                        Ok(()) => Ok((key, clean_agent(agent))),
                        Err(e) => Err(LoginError::Refuse(codes::LOGIN_FAILED, e.to_string())),
                    },
                    Ok(_) => Err(LoginError::Refuse(
                        codes::LOGIN_FAILED,
                        "the first message must be Login (sign the Challenge)".into(),
                    )),
                    Err(e) => Err(LoginError::Refuse(codes::MALFORMED, e.to_string())),
                }
            }
            Message::Text(_) => {
                return Err(LoginError::Refuse(codes::MALFORMED, text_refused()));
            }
            Message::Close(_) => return Err(LoginError::Gone),
            Message::Ping(_) | Message::Pong(_) => {}
        }
    }
}

fn text_refused() -> String {
    "text frames are not part of the protocol: send binary frames, each one postcard-encoded message"
        .into()
}

/// Printable, bounded agent string.
fn clean_agent(agent: String) -> String {
    let mut a: String = agent
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    truncate_text(&mut a);
    a
}

/// A read error worth telling the peer about (an oversized frame);
/// None for a plain disconnect.
fn frame_error(e: &axum::Error) -> Option<(&'static str, String)> {
    let s = e.to_string();
    if s.contains("Space limit exceeded") || s.contains("too long") || s.contains("too big") {
        Some((
            api_codes::TOO_LARGE,
            format!(
                "frame larger than the limit of {} bytes: {s}",
                limits::MAX_MESSAGE
            ),
        ))
    } else {
        None
    }
}

/// Send the challenge and wait for a valid `Login` (or the shutdown); on
/// failure the socket is closed as the peer should be told, and None.
async fn challenge_and_login(
    peers: &Peers,
    socket: &mut WebSocket,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
    bucket: &mut Bucket,
) -> Option<(PeerId, String)> {
    let o = &peers.opts;
    let mut nonce = [0u8; 32];
    rand_core::OsRng.fill_bytes(&mut nonce);
    let challenge = FromRelay::Challenge {
        nonce,
        version: crate::peers::PROTOCOL_VERSION,
    };
    if write(
        socket,
        Message::Binary(challenge.encode().into()),
        o.write_timeout,
    )
    .await
    .is_err()
    {
        return None;
    }
    let login = tokio::select! {
        r = tokio::time::timeout(o.login_timeout, read_login(socket, &nonce, bucket)) => r,
        _ = shutdown.changed() => {
            close_with(socket, codes::UNAVAILABLE, "the relay is shutting down".into(), CLOSE_AWAY).await;
            return None;
        }
    };
    match login {
        Ok(Ok(x)) => Some(x),
        Ok(Err(LoginError::Gone)) => None,
        Ok(Err(LoginError::Refuse(code, message))) => {
            Counters::inc(&peers.counters.login_failures);
            if code == codes::MALFORMED {
                Counters::inc(&peers.counters.malformed);
            }
            let close = if code == api_codes::TOO_LARGE {
                CLOSE_TOO_BIG
            } else {
                CLOSE_POLICY
            };
            close_with(socket, code, message, close).await;
            None
        }
        Err(_) => {
            Counters::inc(&peers.counters.login_failures);
            let secs = o.login_timeout.as_secs_f64();
            close_with(
                socket,
                codes::LOGIN_TIMEOUT,
                format!("no valid Login within {secs} s of the Challenge"),
                CLOSE_POLICY,
            )
            .await;
            None
        }
    }
}

/// One connection, from the challenge to the close.
async fn run(st: PeerState, mut socket: WebSocket, addr: SocketAddr) {
    let peers = st.peers.clone();
    let o = peers.opts.clone();
    let conn = peers.next_conn();
    let mut shutdown = peers.shutdown.subscribe();
    let mut bucket = Bucket::new(o.msgs_per_sec, o.msgs_burst);
    let Some((key, agent)) =
        challenge_and_login(&peers, &mut socket, &mut shutdown, &mut bucket).await
    else {
        return;
    };
    let (tx, mut rx) = mpsc::channel(limits::OUTBOUND_QUEUE);
    let kill = Arc::new(Kill::default());
    if let Ok(mut h) = peers.handles.lock() {
        h.insert(
            conn,
            ConnHandle {
                tx,
                kill: kill.clone(),
                link: false,
            },
        );
    }
    // Another relay of the same database logging in with its relay key is
    // no peer (see chunks::ConnKind::Relay); its bucket is wider, since it
    // asks for many peers at once.
    let kind = peers.login_kind(&key, &agent).await;
    if kind == ConnKind::Relay {
        bucket = Bucket::new(
            o.msgs_per_sec.saturating_mul(RELAY_RATE_FACTOR),
            o.msgs_burst.saturating_mul(RELAY_RATE_FACTOR),
        );
        tracing::info!(relay = %hex::encode(&key[..8]), %addr, "another relay logged in");
    }
    let login = {
        let mut core = peers.core();
        core.login_as(Instant::now(), conn, key, agent, addr, kind)
            .map(|acts| peers.count(acts))
    };
    match login {
        Ok(acts) => peers.apply(acts),
        Err(r) => {
            Counters::inc(&peers.counters.login_failures);
            finish(&peers, conn);
            close_with(&mut socket, r.code, r.message, CLOSE_POLICY).await;
            return;
        }
    }
    let welcome = FromRelay::Welcome {
        peer: key,
        limits: WireLimits {
            max_message: limits::MAX_MESSAGE as u32,
            chunk_credits: limits::CHUNK_CREDITS,
            msgs_per_sec: o.msgs_per_sec,
            msgs_burst: o.msgs_burst,
        },
    };
    tracing::debug!(peer = %hex::encode(&key[..8]), %addr, "peer logged in");
    let direct = FromRelay::DirectConfig {
        ice_servers: o.ice_servers.clone(),
    };
    let mut greeted = true;
    for m in [welcome, direct] {
        if write(
            &mut socket,
            Message::Binary(m.encode().into()),
            o.write_timeout,
        )
        .await
        .is_err()
        {
            greeted = false;
            break;
        }
    }
    let end = if !greeted {
        None
    } else {
        serve(
            &st,
            &peers,
            conn,
            &mut socket,
            &mut rx,
            &kill,
            &mut shutdown,
            &mut bucket,
        )
        .await
    };
    finish(&peers, conn);
    if let Some((code, message, close)) = end {
        close_with(&mut socket, code, message, close).await;
    }
}

/// Forget the connection: its handle and its registry entry.
fn finish(peers: &Peers, conn: u64) {
    if let Ok(mut h) = peers.handles.lock() {
        h.remove(&conn);
    }
    peers.drive(|core| core.logout(Instant::now(), conn));
}

type End = Option<(&'static str, String, u16)>;

/// The logged-in loop; returns the error to send before closing, if any.
#[allow(clippy::too_many_arguments)]
async fn serve(
    st: &PeerState,
    peers: &Arc<Peers>,
    conn: u64,
    socket: &mut WebSocket,
    rx: &mut mpsc::Receiver<FromRelay>,
    kill: &Kill,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
    bucket: &mut Bucket,
) -> End {
    let o = &peers.opts;
    let start = tokio::time::Instant::now() + o.ping_interval;
    let mut ping = tokio::time::interval_at(start, o.ping_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_frame = Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.changed() => {
                return Some((codes::UNAVAILABLE, "the relay is shutting down".into(), CLOSE_AWAY));
            }
            _ = kill.notify.notified() => {
                let (code, message) = kill.take().unwrap_or((codes::UNAVAILABLE, "closed by the relay".into()));
                return Some((code, message, CLOSE_POLICY));
            }
            m = rx.recv() => {
                let m = m?;
                let bytes = m.encode();
                // The write races the kill switch: a peer that stopped
                // reading is cut as soon as the registry gives up on it.
                // A kill that lands during a write still says why (a ban
                // right after a verdict must reach the banned peer).
                tokio::select! {
                    r = write(socket, Message::Binary(bytes.into()), o.write_timeout) => {
                        if let Err(why) = r {
                            if why == "write timed out" {
                                Counters::inc(&peers.counters.dropped_slow);
                            }
                            tracing::debug!(conn, why, "peer dropped");
                            return None;
                        }
                    }
                    _ = kill.notify.notified() => {
                        let (code, message) = kill.take().unwrap_or((codes::UNAVAILABLE, "closed by the relay".into()));
                        return Some((code, message, CLOSE_POLICY));
                    }
                }
            }
            f = socket.recv() => {
                let msg = match f {
                    None => return None,
                    Some(Err(e)) => {
                        return frame_error(&e).map(|(c, m)| {
                            Counters::inc(&peers.counters.malformed);
                            (c, m, CLOSE_TOO_BIG)
                        });
                    }
                    Some(Ok(m)) => m,
                };
                last_frame = Instant::now();
                if !bucket.take() {
                    Counters::inc(&peers.counters.rate_limited);
                    return Some((
                        codes::RATE_LIMITED,
                        format!(
                            "more than {} messages per second (burst {}): disconnected",
                            o.msgs_per_sec, o.msgs_burst
                        ),
                        CLOSE_POLICY,
                    ));
                }
                match msg {
                    Message::Binary(b) => match decode_to_relay(&b) {
                        Ok(m) => dispatch(st, peers, conn, m).await,
                        Err(e) => {
                            Counters::inc(&peers.counters.malformed);
                            return Some((codes::MALFORMED, e.to_string(), CLOSE_POLICY));
                        }
                    },
                    Message::Text(_) => {
                        Counters::inc(&peers.counters.malformed);
                        return Some((codes::MALFORMED, text_refused(), CLOSE_POLICY));
                    }
                    Message::Ping(_) | Message::Pong(_) => {
                        peers.core().heartbeat(Instant::now(), conn);
                    }
                    Message::Close(_) => return None,
                }
            }
            _ = ping.tick() => {
                if last_frame.elapsed() > o.idle_timeout {
                    Counters::inc(&peers.counters.dropped_idle);
                    let secs = o.idle_timeout.as_secs_f64();
                    return Some((codes::PROTOCOL, format!("silent for {secs} s: disconnected"), CLOSE_POLICY));
                }
                if write(socket, Message::Ping(Vec::new().into()), o.write_timeout).await.is_err() {
                    Counters::inc(&peers.counters.dropped_slow);
                    return None;
                }
            }
        }
    }
}

/// One decoded message from a logged-in peer.
async fn dispatch(st: &PeerState, peers: &Arc<Peers>, conn: u64, m: ToRelay) {
    let now = Instant::now;
    let acts = match m {
        ToRelay::Status {
            load,
            serve_compute,
        } => {
            peers.core().status(now(), conn, load, serve_compute);
            Vec::new()
        }
        ToRelay::Have { add, remove } => {
            // The chain lock is released before the core's is taken.
            let known: std::collections::HashSet<_> =
                if add.len() + remove.len() > limits::MAX_HAVE_PER_MSG {
                    Default::default()
                } else {
                    let chain = st.chain.read().await;
                    add.iter()
                        .filter(|b| chain.dag.get(b).is_some())
                        .copied()
                        .collect()
                };
            peers.call(|core| core.have(now(), conn, &add, &remove, |b| known.contains(b)))
        }
        ToRelay::GetChunk { req, block, index } => {
            let info = peers.chunk_info(block).await;
            peers.call(|core| core.get_chunk(now(), conn, req, block, index, info))
        }
        ToRelay::Chunk { req, data } => peers.call(|core| core.chunk(now(), conn, req, data)),
        ToRelay::NoChunk { req, .. } => peers.call(|core| core.no_chunk(now(), conn, req)),
        ToRelay::ComputeResult { req, output } => {
            peers.call(|core| core.compute_result(now(), conn, req, output))
        }
        ToRelay::ComputeFailed { req, reason } => {
            peers.call(|core| core.compute_refused(now(), conn, req, reason))
        }
        ToRelay::Direct { accept } => {
            peers.core().direct_accept(now(), conn, accept);
            Vec::new()
        }
        ToRelay::Introduce { req, block } => {
            peers.call(|core| core.introduce(now(), conn, req, block))
        }
        ToRelay::Signal {
            session,
            to,
            kind,
            body,
        } => peers.call(|core| core.signal(now(), conn, session, to, kind, body)),
        ToRelay::Proof { proof } => {
            let info = peers.chunk_info(proof.body.block).await;
            peers.call(|core| core.proof(now(), conn, proof, info.as_deref()))
        }
        ToRelay::Receipt { receipt } => {
            let info = peers.chunk_info(receipt.body.block).await;
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            peers.call(|core| core.receipt(now(), now_ms, conn, receipt, info.as_deref()))
        }
        ToRelay::Login { .. } => vec![Action::Send {
            conn,
            msg: FromRelay::error(codes::PROTOCOL, "already logged in: Login ignored"),
        }],
        _ => vec![Action::Send {
            conn,
            msg: FromRelay::error(
                codes::PROTOCOL,
                "message not understood by this relay: ignored",
            ),
        }],
    };
    peers.apply(acts);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_the_burst_then_refuses() {
        let mut b = Bucket::new(0, 3);
        assert!(b.take() && b.take() && b.take());
        assert!(!b.take());
    }

    #[test]
    fn agents_are_printable_and_bounded() {
        assert_eq!(clean_agent("a\nb\u{7}".into()), "a b ");
        assert_eq!(clean_agent("x".repeat(5000)).len(), limits::MAX_TEXT);
    }
}
