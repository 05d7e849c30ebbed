//! The page's peer node: [`crate::node::PeerNode`] driven over a browser
//! WebSocket to the relay's `/ws`. The state machine does all the protocol
//! work (login, credits, chunk checks, serving); this file only moves bytes
//! between the socket and the machine, keeps the key, and wakes waiters.

use crate::chain::BlockHash;
use crate::node::NodeStats;

/// The connection as the page shows it.
#[derive(Debug, Clone, PartialEq)]
pub enum NetState {
    /// Opening the socket or logging in.
    Connecting,
    /// Logged in: fetches go to peers through the relay.
    Online,
    /// The socket closed or could not open; the node retries after
    /// `retry_in_ms` and meanwhile fetches over REST.
    Offline { reason: String, retry_in_ms: u64 },
    /// The relay refused this node for good (a ban, a refused login): REST only.
    Refused(String),
}

/// What the network panel shows.
#[derive(Debug, Clone)]
pub struct NetView {
    pub state: NetState,
    /// `ws://host/ws` of the relay.
    pub relay_url: String,
    /// This browser's node key (public, hex).
    pub peer_id: String,
    /// Chunk bytes received per source, served, bad chunks, ...
    pub stats: NodeStats,
    /// Payloads this node holds and serves.
    pub held: usize,
    /// Fetches in progress: (block, chunks verified, chunks in all).
    pub fetching: Vec<(BlockHash, u64, u64)>,
    /// The last error the relay sent, if any.
    pub last_error: Option<String>,
}

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use ed25519_dalek::SigningKey;
use futures_channel::oneshot;
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;

use crate::chain::Block;
use crate::client::UsageBatch;
use crate::net::peer::{codes, decode_from_relay, SUBPROTOCOL};
use crate::node::{NodeConfig, NodeEvent, PeerNode, Source};
use crate::spec::Config;

use super::dom::{js_err, now_ms, set_progress};
use super::panels;

/// `localStorage` key of this browser's node key (32-byte seed, hex).
const KEY_STORAGE: &str = "aiblock-node-key";
/// Reconnect delay after a lost connection; doubles up to [`MAX_RETRY_MS`].
const RETRY_MS: u64 = 1_000;
const MAX_RETRY_MS: u64 = 30_000;
/// Relay error codes after which this node stops reconnecting.
const FATAL: [&str; 3] = [codes::LOGIN_FAILED, codes::BANNED, codes::REPLACED];

/// A socket event handler.
type Callback = Closure<dyn FnMut(JsValue)>;

type Waiter = oneshot::Sender<Result<Arc<[u8]>, String>>;

struct Net {
    node: PeerNode,
    /// The node key (also signs usage reports).
    key: SigningKey,
    ws: Option<web_sys::WebSocket>,
    state: NetState,
    relay_url: String,
    /// `performance.now()` at start: the state machine's clock origin.
    t0: f64,
    waiters: HashMap<crate::chain::BlockHash, Vec<Waiter>>,
    /// Pending `setTimeout` (node deadline) and its callback, reused.
    timer: Option<i32>,
    retry_ms: u64,
    last_error: Option<String>,
    /// `?test_forge_proof=KEY`: the key to accuse falsely, once.
    forge_against: Option<crate::net::peer::PeerId>,
    /// Usage not reported yet (the client core's batcher).
    usage: UsageBatch,
}

thread_local! {
    static NET: RefCell<Option<Net>> = const { RefCell::new(None) };
    /// Callbacks of the current socket and of the timer, kept alive here.
    static CALLBACKS: RefCell<Vec<Callback>> = const { RefCell::new(Vec::new()) };
    static TIMER_CB: RefCell<Option<Closure<dyn FnMut()>>> = const { RefCell::new(None) };
}

fn with<R>(f: impl FnOnce(&mut Net) -> R) -> Option<R> {
    NET.with(|n| n.borrow_mut().as_mut().map(f))
}

/// The node clock: milliseconds since start.
fn now(n: &Net) -> u64 {
    (now_ms() - n.t0).max(0.0) as u64
}

/// This browser's node key: kept in `localStorage`, created on first use.
/// Without storage (a private window that refuses it) the key lives for
/// this page only.
pub fn node_key() -> SigningKey {
    let storage = web_sys::window().and_then(|w| w.local_storage().ok().flatten());
    if let Some(seed) = storage
        .as_ref()
        .and_then(|s| s.get_item(KEY_STORAGE).ok().flatten())
        .and_then(|h| hex::decode(h).ok())
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
    {
        return SigningKey::from_bytes(&seed);
    }
    let key = SigningKey::generate(&mut rand_core::OsRng);
    if let Some(s) = storage {
        let _ = s.set_item(KEY_STORAGE, &hex::encode(key.to_bytes()));
    }
    key
}

/// `ws://` or `wss://` URL of the relay that served this page.
fn relay_ws_url() -> Option<String> {
    let loc = web_sys::window()?.location();
    let proto = if loc.protocol().ok()? == "https:" {
        "wss"
    } else {
        "ws"
    };
    Some(format!("{proto}://{}/ws", loc.host().ok()?))
}

/// Start the node and connect to the relay (once per page).
pub fn start() {
    let Some(url) = relay_ws_url() else {
        return;
    };
    let search = web_sys::window()
        .and_then(|w| w.location().search().ok())
        .unwrap_or_default();
    let param = |k: &str| crate::view::budget::query_param(&search, k).map(str::to_string);
    let cfg = NodeConfig {
        agent: concat!("aiblock-browser/", env!("CARGO_PKG_VERSION")).to_string(),
        serve_compute: false,
        // WebRTC data channels to other browsers unless `?direct=0`.
        direct: param("direct").as_deref() != Some("0"),
        // Test switch of the direct-transfer tests: serve corrupted chunks.
        corrupt_direct: param("test_lie_direct").as_deref() == Some("1"),
        test_direct_serve_max: param("test_direct_serve_max").and_then(|v| v.parse().ok()),
        test_direct_mute: param("test_direct_mute").as_deref() == Some("1"),
        ..NodeConfig::default()
    };
    let forge_against = param("test_forge_proof")
        .and_then(|h| hex::decode(h).ok())
        .and_then(|b| <[u8; 32]>::try_from(b).ok());
    let key = node_key();
    let mut node = PeerNode::new(key.clone(), cfg);
    // The node clock starts at 0 now; statements carry wall-clock time.
    node.set_wall_offset(js_sys::Date::now().max(0.0) as u64);
    NET.with(|n| {
        *n.borrow_mut() = Some(Net {
            node,
            key,
            ws: None,
            state: NetState::Connecting,
            relay_url: url,
            t0: now_ms(),
            waiters: HashMap::new(),
            timer: None,
            retry_ms: RETRY_MS,
            last_error: None,
            forge_against,
            usage: UsageBatch::new(),
        })
    });
    connect();
}

/// Open the socket; its callbacks drive the node.
fn connect() {
    let Some(url) = with(|n| n.relay_url.clone()) else {
        return;
    };
    let ws = match web_sys::WebSocket::new_with_str(&url, SUBPROTOCOL) {
        Ok(ws) => ws,
        Err(e) => {
            lost(format!("cannot open {url}: {}", js_err(e)));
            return;
        }
    };
    ws.set_binary_type(web_sys::BinaryType::Arraybuffer);
    let on_open = Closure::<dyn FnMut(JsValue)>::new(|_| {
        with(|n| {
            n.state = NetState::Connecting;
            let t = now(n);
            n.node.connected(t);
        });
        pump();
    });
    let on_message = Closure::<dyn FnMut(JsValue)>::new(|ev: JsValue| {
        let Some(data) = ev
            .dyn_ref::<web_sys::MessageEvent>()
            .map(|m| m.data())
            .and_then(|d| d.dyn_into::<js_sys::ArrayBuffer>().ok())
        else {
            // Text frames are not part of the protocol.
            return;
        };
        let bytes = js_sys::Uint8Array::new(&data).to_vec();
        match decode_from_relay(&bytes) {
            Ok(msg) => {
                with(|n| {
                    let t = now(n);
                    n.node.handle(msg, t);
                });
            }
            Err(e) => {
                with(|n| n.last_error = Some(format!("malformed message from the relay: {e}")));
            }
        }
        pump();
    });
    let on_close = Closure::<dyn FnMut(JsValue)>::new(|ev: JsValue| {
        let why = ev
            .dyn_ref::<web_sys::CloseEvent>()
            .map(|c| {
                if c.reason().is_empty() {
                    format!("closed (code {})", c.code())
                } else {
                    format!("closed: {} (code {})", c.reason(), c.code())
                }
            })
            .unwrap_or_else(|| "closed".into());
        lost(why);
    });
    ws.set_onopen(Some(on_open.as_ref().unchecked_ref()));
    ws.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
    ws.set_onclose(Some(on_close.as_ref().unchecked_ref()));
    CALLBACKS.with(|c| *c.borrow_mut() = vec![on_open, on_message, on_close]);
    with(|n| n.ws = Some(ws));
}

/// The connection is gone: fail the waiters (the caller falls back to
/// REST), tell the node, and reconnect later unless the relay refused us.
fn lost(why: String) {
    let retry = with(|n| {
        if let Some(ws) = n.ws.take() {
            ws.set_onopen(None);
            ws.set_onmessage(None);
            ws.set_onclose(None);
            let _ = ws.close();
        }
        let t = now(n);
        n.node.disconnected(t);
        for (hash, ws) in n.waiters.drain() {
            n.node.cancel_fetch(&hash);
            for w in ws {
                let _ = w.send(Err(format!("relay connection lost ({why})")));
            }
        }
        if matches!(n.state, NetState::Refused(_)) {
            return None;
        }
        let retry = n.retry_ms;
        n.retry_ms = (n.retry_ms * 2).min(MAX_RETRY_MS);
        n.state = NetState::Offline {
            reason: why.clone(),
            retry_in_ms: retry,
        };
        Some(retry)
    })
    .flatten();
    if retry.is_some() {
        panels::alert(
            "relay-down",
            &format!("The relay's peer network is unreachable ({why}); blocks come over HTTP meanwhile, and the page reconnects."),
        );
    }
    // The node closed its direct connections: carry that out.
    pump();
    if let Some(ms) = retry {
        let cb = Closure::once_into_js(connect);
        if let Some(w) = web_sys::window() {
            let _ = w.set_timeout_with_callback_and_timeout_and_arguments_0(
                cb.unchecked_ref(),
                ms.min(i32::MAX as u64) as i32,
            );
        }
    }
}

/// Call the node with the current time (a WebRTC event), then pump.
pub(super) fn drive(f: impl FnOnce(&mut PeerNode, u64)) {
    with(|n| {
        let t = now(n);
        f(&mut n.node, t);
    });
    pump();
}

/// Send what the node wants sent, act on its events, arm its timer.
fn pump() {
    let mut fatal = None;
    let mut rtc = Vec::new();
    with(|n| {
        while let Some(m) = n.node.poll_transmit() {
            if let Some(ws) = &n.ws {
                if let Err(e) = ws.send_with_u8_array(&m.encode()) {
                    n.last_error = Some(format!("send failed: {}", js_err(e)));
                }
            }
        }
        while let Some(ev) = n.node.poll_event() {
            match ev {
                NodeEvent::LoggedIn { .. } => {
                    n.state = NetState::Online;
                    n.retry_ms = RETRY_MS;
                    panels::clear_alert("relay-down");
                }
                NodeEvent::RelayError { code, message } => {
                    let text = format!("{code}: {message}");
                    if code == codes::BANNED {
                        panels::alert(
                            "peer-banned",
                            &format!("The relay banned this browser's node: {message}"),
                        );
                    }
                    if FATAL.contains(&code.as_str()) {
                        n.state = NetState::Refused(text.clone());
                        fatal = Some(text.clone());
                    }
                    n.last_error = Some(text);
                }
                NodeEvent::Progress { hash, received, of } => {
                    set_progress(&format!(
                        "block {}: chunk {received} of {of} verified",
                        hash.short()
                    ));
                }
                NodeEvent::BadChunk { hash, index, from } => {
                    let who = match from {
                        Source::Peer(p) => format!("peer {}", &hex::encode(p)[..12]),
                        Source::Relay => "the relay".into(),
                        Source::Other => "an unknown source".into(),
                    };
                    panels::alert(
                        "bad-block",
                        &format!(
                            "Chunk {index} of block {} from {who} failed its hash check.",
                            hash.short()
                        ),
                    );
                }
                NodeEvent::BlockComplete { hash, payload } => {
                    for w in n.waiters.remove(&hash).unwrap_or_default() {
                        let _ = w.send(Ok(payload.clone()));
                    }
                }
                NodeEvent::FetchFailed { hash, reason } => {
                    for w in n.waiters.remove(&hash).unwrap_or_default() {
                        let _ = w.send(Err(reason.clone()));
                    }
                }
                NodeEvent::Compute { req, .. } => {
                    // This node does not announce compute; refuse at once.
                    n.node
                        .compute_done(req, Err("this browser serves no computations".into()));
                }
                NodeEvent::BlockAdded { name, .. } => {
                    set_progress(&format!(
                        "the relay accepted a new block ({name}): reload to verify and use it"
                    ));
                }
                NodeEvent::Rtc(a) => rtc.push(a),
                // No direct holder is the common case, not an error.
                NodeEvent::DirectFallback { reason, .. }
                    if reason.starts_with("no direct holder") => {}
                NodeEvent::DirectFallback {
                    hash,
                    chunks,
                    reason,
                } => {
                    n.last_error = Some(format!(
                        "direct fetch of {}: {chunks} chunks go through the relay ({reason})",
                        hash.short()
                    ));
                }
                NodeEvent::DirectVerdict {
                    accused,
                    guilty: true,
                    reason,
                } => {
                    panels::alert(
                        "peer-lied",
                        &format!(
                            "Peer {} sent this browser a wrong chunk directly; the relay checked the signed proof and banned it ({reason}).",
                            &hex::encode(accused)[..12]
                        ),
                    );
                }
                NodeEvent::DirectVerdict { .. } => {}
            }
        }
        // Answers to the events above (compute refusals).
        while let Some(m) = n.node.poll_transmit() {
            if let Some(ws) = &n.ws {
                let _ = ws.send_with_u8_array(&m.encode());
            }
        }
        arm_timer(n);
    });
    // Outside the node's borrow: the driver's callbacks call back into it.
    super::rtc::act(rtc);
    if let Some(why) = fatal {
        lost(why);
    } else {
        refresh();
    }
}

/// Wake the node at its next deadline.
fn arm_timer(n: &mut Net) {
    let Some(w) = web_sys::window() else {
        return;
    };
    if let Some(id) = n.timer.take() {
        w.clear_timeout_with_handle(id);
    }
    let Some(at) = n.node.poll_timeout() else {
        return;
    };
    let delay = at.saturating_sub(now(n)).min(60_000) as i32;
    TIMER_CB.with(|cb| {
        let mut cb = cb.borrow_mut();
        let f = cb.get_or_insert_with(|| {
            Closure::<dyn FnMut()>::new(|| {
                with(|n| {
                    n.timer = None;
                    let t = now(n);
                    n.node.handle_timeout(t);
                });
                pump();
            })
        });
        n.timer = w
            .set_timeout_with_callback_and_timeout_and_arguments_0(
                f.as_ref().unchecked_ref(),
                delay,
            )
            .ok();
    });
}

thread_local! {
    /// When the network panel was last drawn, the state it showed, and
    /// whether a later drawing is already scheduled.
    static DRAWN: RefCell<(f64, Option<NetState>, bool)> =
        const { RefCell::new((f64::NEG_INFINITY, None, false)) };
}

/// Least time between two drawings of the network panel while chunks
/// stream in (a state change draws at once).
const REFRESH_MS: f64 = 250.0;

/// Re-render the network panel: at once when the connection's state
/// changed or [`REFRESH_MS`] passed since the last drawing, else once more
/// at the end of that interval (hundreds of chunk messages a second must
/// not each rebuild it, and the panel must end up current).
pub fn refresh() {
    let Some(v) = view() else {
        return;
    };
    let t = now_ms();
    let (draw, schedule) = DRAWN.with(|d| {
        let mut d = d.borrow_mut();
        let changed = d.1.as_ref() != Some(&v.state);
        if changed || t - d.0 >= REFRESH_MS {
            d.0 = t;
            d.1 = Some(v.state.clone());
            (true, false)
        } else if !d.2 {
            d.2 = true;
            (false, true)
        } else {
            (false, false)
        }
    });
    if draw {
        panels::show_net(&v);
    }
    if schedule {
        let cb = Closure::once_into_js(|| {
            DRAWN.with(|d| {
                let mut d = d.borrow_mut();
                d.0 = f64::NEG_INFINITY;
                d.2 = false;
            });
            refresh();
        });
        if let Some(w) = web_sys::window() {
            let _ = w.set_timeout_with_callback_and_timeout_and_arguments_0(
                cb.unchecked_ref(),
                REFRESH_MS as i32,
            );
        }
    }
}

/// Draw the network panel now (after an answer: its counts final).
pub fn refresh_now() {
    DRAWN.with(|d| d.borrow_mut().0 = f64::NEG_INFINITY);
    refresh();
}

/// What the network panel shows (`None` before [`start`]).
pub fn view() -> Option<NetView> {
    with(|n| NetView {
        state: n.state.clone(),
        relay_url: n.relay_url.clone(),
        peer_id: hex::encode(n.node.id()),
        stats: n.node.stats().clone(),
        held: n.node.held().count(),
        fetching: n.node.fetching(),
        last_error: n.last_error.clone(),
    })
}

/// Whether fetches go to the peer network now.
pub fn online() -> bool {
    with(|n| n.state == NetState::Online && n.node.is_logged_in()).unwrap_or(false)
}

/// Serve a verified payload to other nodes (announced with `Have`).
pub fn hold(hash: crate::chain::BlockHash, payload: Arc<[u8]>, chunk_size: u32) {
    with(|n| {
        let _ = n.node.hold(hash, payload, chunk_size);
        // Test switch of the direct-transfer tests (`?test_forge_proof=KEY`):
        // accuse KEY of lying about this block with a proof it never signed.
        if let Some(accused) = n.forge_against.take() {
            let t = now(n);
            if !n.node.test_forge_proof(accused, hash, t) {
                n.forge_against = Some(accused);
            }
        }
    });
    pump();
}

/// Stop serving a payload (the budget has no room for it); false when the
/// node did not hold it.
pub fn unhold(hash: &crate::chain::BlockHash) -> bool {
    let was = with(|n| n.node.unhold(hash)).unwrap_or(false);
    if was {
        pump();
    }
    was
}

/// Fetch a header-verified block's payload from peers through the relay
/// (the relay's store is its fallback), every chunk checked by the node;
/// the complete payload passed every content rule. The node holds and
/// announces it.
pub async fn fetch(
    block: &Block,
    chunk_list: Vec<crate::chain::BlockHash>,
    config: Option<Config>,
) -> Result<Arc<[u8]>, String> {
    let rx = with(|n| -> Result<_, String> {
        if n.state != NetState::Online {
            return Err("not connected to the relay's peer network".into());
        }
        if let Some(p) = n.node.payload(&block.hash) {
            return Ok(Err(p));
        }
        let t = now(n);
        n.node
            .fetch(block, chunk_list, config, t)
            .map_err(|e| e.to_string())?;
        let (tx, rx) = oneshot::channel();
        n.waiters.entry(block.hash).or_default().push(tx);
        Ok(Ok(rx))
    })
    .ok_or("the peer node is not started")??;
    pump();
    match rx {
        Err(held) => Ok(held),
        Ok(rx) => rx.await.map_err(|_| "the fetch was dropped".to_string())?,
    }
}

/// This node's public key (hex).
pub fn peer_id() -> Option<String> {
    with(|n| hex::encode(n.node.id()))
}

/// Record one answer's usage (each block it used, with the tokens routed
/// to it) in the client core's [`UsageBatch`] and report what is pending
/// in the background ([`send_usage`]); a failure goes to the network
/// panel's last-error line.
pub fn report_usage(used: impl IntoIterator<Item = (BlockHash, u64)>) {
    if with(|n| n.usage.record_answer(used)).is_none() {
        return;
    }
    wasm_bindgen_futures::spawn_local(async {
        if let Err(e) = send_usage().await {
            with(|n| n.last_error = Some(format!("usage report: {e}")));
            refresh();
        }
    });
}

/// Post the pending usage (`POST /usage/report`): the core signs it with
/// the node key, splits it into reports and numbers them; here each is
/// only posted and its outcome handed back to the core, which puts a
/// report that did not arrive back for the next answer. The relay counts
/// a report only for blocks it served this key, once per (key, period,
/// seq), within per-key caps.
async fn send_usage() -> Result<(), String> {
    let wall = js_sys::Date::now().max(0.0) as u64;
    let reports = with(|n| n.usage.take_reports(&n.key, wall)).unwrap_or_default();
    let mut failed = None;
    for report in &reports {
        let (status, why) = match super::fetch::post_json("/usage/report", report).await {
            Ok((s, _)) if (200..300).contains(&s) => (Some(s), None),
            Ok((s, body)) => (
                Some(s),
                Some(format!(
                    "HTTP {s}: {}",
                    body.chars().take(300).collect::<String>()
                )),
            ),
            Err(e) => (None, Some(e)),
        };
        let kept = with(|n| n.usage.settle(report, status)).unwrap_or(false);
        if let Some(why) = why {
            failed = Some(if kept {
                format!("{why} (kept for the next report)")
            } else {
                format!("refused: {why}")
            });
        }
    }
    failed.map_or(Ok(()), Err)
}
