//! The page's WebRTC driver: carries out the node's [`RtcAction`]s with the
//! browser's `RTCPeerConnection` and `RTCDataChannel`, and reports what the
//! connections do back to the node (through [`super::net::drive`]). Every
//! decision (whom to connect to, what to send, when to give up, what to
//! check) is the sans-IO node's; this file moves bytes and signals.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};

use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::JsFuture;
use web_sys::{
    RtcConfiguration, RtcDataChannel, RtcDataChannelInit, RtcDataChannelState, RtcDataChannelType,
    RtcIceCandidateInit, RtcPeerConnection, RtcPeerConnectionState, RtcSdpType,
    RtcSessionDescriptionInit,
};

use crate::net::direct::SignalKind;
use crate::node::RtcAction;

use super::dom::js_err;
use super::net::drive;

/// Bytes queued in a data channel before this driver waits for
/// `bufferedamountlow` (flow control).
const HIGH_WATER: u32 = 4 << 20;
const LOW_WATER: u32 = 1 << 20;
/// How long a closing channel may take to deliver what is buffered before
/// its connection is closed anyway.
const CLOSE_GRACE_MS: i32 = 2_000;

type Callback = Closure<dyn FnMut(JsValue)>;

struct Conn {
    pc: RtcPeerConnection,
    dc: Option<RtcDataChannel>,
    /// Messages waiting for the channel to open or to drain.
    queue: VecDeque<Vec<u8>>,
    /// Remote ICE candidates that came before the remote description.
    early: Vec<String>,
    remote_set: bool,
    callbacks: Vec<Callback>,
}

thread_local! {
    static CONNS: RefCell<HashMap<u64, Conn>> = RefCell::new(HashMap::new());
}

fn with_conn<R>(session: u64, f: impl FnOnce(&mut Conn) -> R) -> Option<R> {
    CONNS.with(|c| c.borrow_mut().get_mut(&session).map(f))
}

/// Carry out the node's actions (called outside the node's borrow).
pub fn act(actions: Vec<RtcAction>) {
    for a in actions {
        let session = match &a {
            RtcAction::Open { session, .. }
            | RtcAction::Remote { session, .. }
            | RtcAction::Send { session, .. }
            | RtcAction::Close { session } => *session,
        };
        let r = match a {
            RtcAction::Open {
                session,
                offer,
                ice_servers,
                ..
            } => open(session, offer, &ice_servers),
            RtcAction::Remote {
                session,
                kind,
                body,
            } => remote(session, kind, body),
            RtcAction::Send { session, data } => with_conn(session, |c| {
                c.queue.push_back(data);
                flush(c)
            })
            .unwrap_or(Ok(())),
            RtcAction::Close { session } => {
                close(session);
                Ok(())
            }
        };
        if let Err(e) = r {
            fail(session, &e);
        }
    }
}

/// A connection failed: close it and tell the node (later, outside any
/// borrow of the node).
fn fail(session: u64, why: &str) {
    web_sys::console::warn_1(&format!("direct session {session}: {why}").into());
    let was = CONNS.with(|c| c.borrow().contains_key(&session));
    close(session);
    if was {
        later(move || drive(|n, now| n.rtc_closed(session, now)));
    }
}

/// Run `f` from the event loop (never inside the node's borrow).
fn later(f: impl FnOnce() + 'static) {
    wasm_bindgen_futures::spawn_local(async move { f() });
}

fn close(session: u64) {
    let Some(c) = CONNS.with(|c| c.borrow_mut().remove(&session)) else {
        return;
    };
    c.pc.set_onicecandidate(None);
    c.pc.set_ondatachannel(None);
    c.pc.set_onconnectionstatechange(None);
    match &c.dc {
        Some(dc) if dc.ready_state() == RtcDataChannelState::Open => {
            // Close the channel gracefully (what is buffered is still
            // delivered), then the connection when the channel has closed,
            // or after a grace period.
            dc.set_onopen(None);
            dc.set_onmessage(None);
            dc.set_onbufferedamountlow(None);
            let pc = c.pc.clone();
            let done = Closure::once_into_js(move |_: JsValue| pc.close());
            dc.set_onclose(Some(done.unchecked_ref()));
            dc.close();
            let pc = c.pc.clone();
            let later = Closure::once_into_js(move || pc.close());
            if let Some(w) = web_sys::window() {
                let _ = w.set_timeout_with_callback_and_timeout_and_arguments_0(
                    later.unchecked_ref(),
                    CLOSE_GRACE_MS,
                );
            }
        }
        dc => {
            if let Some(dc) = dc {
                dc.set_onopen(None);
                dc.set_onmessage(None);
                dc.set_onclose(None);
                dc.set_onbufferedamountlow(None);
                dc.close();
            }
            c.pc.close();
        }
    }
    // The callbacks are dropped with `c`, after their handlers were unset.
}

fn open(session: u64, offer: bool, ice_servers: &[String]) -> Result<(), String> {
    close(session);
    let cfg = RtcConfiguration::new();
    if !ice_servers.is_empty() {
        let urls: js_sys::Array = ice_servers.iter().map(|u| JsValue::from_str(u)).collect();
        let server = js_sys::Object::new();
        js_sys::Reflect::set(&server, &"urls".into(), &urls).map_err(js_err)?;
        let list = js_sys::Array::of1(&server);
        cfg.set_ice_servers(&list);
    }
    let pc = RtcPeerConnection::new_with_configuration(&cfg).map_err(js_err)?;
    let mut callbacks = Vec::new();

    let on_ice = Callback::new(move |ev: JsValue| {
        let Some(cand) = ev
            .dyn_ref::<web_sys::RtcPeerConnectionIceEvent>()
            .and_then(|e| e.candidate())
        else {
            return; // gathering finished
        };
        let body = js_sys::JSON::stringify(&cand.to_json())
            .ok()
            .and_then(|s| s.as_string())
            .unwrap_or_default();
        drive(|n, now| n.rtc_signal(session, SignalKind::Candidate, body, now));
    });
    pc.set_onicecandidate(Some(on_ice.as_ref().unchecked_ref()));
    callbacks.push(on_ice);

    let pc2 = pc.clone();
    let on_state = Callback::new(move |_| {
        if matches!(
            pc2.connection_state(),
            RtcPeerConnectionState::Failed | RtcPeerConnectionState::Closed
        ) {
            fail(session, "the connection failed");
        }
    });
    pc.set_onconnectionstatechange(Some(on_state.as_ref().unchecked_ref()));
    callbacks.push(on_state);

    let dc = if offer {
        let init = RtcDataChannelInit::new();
        init.set_ordered(true);
        Some(pc.create_data_channel_with_data_channel_dict("aiblock", &init))
    } else {
        let on_dc = Callback::new(move |ev: JsValue| {
            if let Some(dc) = ev
                .dyn_ref::<web_sys::RtcDataChannelEvent>()
                .map(|e| e.channel())
            {
                let cbs = channel_callbacks(session, &dc);
                with_conn(session, |c| {
                    c.callbacks.extend(cbs);
                    c.dc = Some(dc);
                });
            }
        });
        pc.set_ondatachannel(Some(on_dc.as_ref().unchecked_ref()));
        callbacks.push(on_dc);
        None
    };
    if let Some(dc) = &dc {
        callbacks.extend(channel_callbacks(session, dc));
    }
    CONNS.with(|c| {
        c.borrow_mut().insert(
            session,
            Conn {
                pc: pc.clone(),
                dc,
                queue: VecDeque::new(),
                early: Vec::new(),
                remote_set: false,
                callbacks,
            },
        )
    });
    if offer {
        wasm_bindgen_futures::spawn_local(async move {
            match make_local(&pc, true).await {
                Ok(sdp) => drive(|n, now| n.rtc_signal(session, SignalKind::Offer, sdp, now)),
                Err(e) => fail(session, &format!("cannot make an offer: {e}")),
            }
        });
    }
    Ok(())
}

/// Create the offer (or answer), set it as the local description, return its SDP.
async fn make_local(pc: &RtcPeerConnection, offer: bool) -> Result<String, String> {
    let desc = if offer {
        JsFuture::from(pc.create_offer()).await
    } else {
        JsFuture::from(pc.create_answer()).await
    }
    .map_err(js_err)?;
    let sdp = js_sys::Reflect::get(&desc, &"sdp".into())
        .ok()
        .and_then(|s| s.as_string())
        .ok_or("no SDP in the description")?;
    JsFuture::from(pc.set_local_description(&description(offer, &sdp)))
        .await
        .map_err(js_err)?;
    Ok(sdp)
}

/// An offer's or answer's session description.
fn description(offer: bool, sdp: &str) -> RtcSessionDescriptionInit {
    let init = RtcSessionDescriptionInit::new(if offer {
        RtcSdpType::Offer
    } else {
        RtcSdpType::Answer
    });
    init.set_sdp(sdp);
    init
}

fn channel_callbacks(session: u64, dc: &RtcDataChannel) -> Vec<Callback> {
    dc.set_binary_type(RtcDataChannelType::Arraybuffer);
    dc.set_buffered_amount_low_threshold(LOW_WATER);
    let on_open = Callback::new(move |_| {
        if let Some(Err(e)) = with_conn(session, flush) {
            fail(session, &e);
            return;
        }
        drive(|n, now| n.rtc_opened(session, now));
    });
    let on_message = Callback::new(move |ev: JsValue| {
        let Some(data) = ev
            .dyn_ref::<web_sys::MessageEvent>()
            .map(|m| m.data())
            .and_then(|d| d.dyn_into::<js_sys::ArrayBuffer>().ok())
        else {
            fail(session, "a text message on the data channel");
            return;
        };
        let bytes = js_sys::Uint8Array::new(&data).to_vec();
        drive(|n, now| n.rtc_message(session, &bytes, now));
    });
    let on_close = Callback::new(move |_| fail(session, "the data channel closed"));
    let on_low = Callback::new(move |_| {
        if let Some(Err(e)) = with_conn(session, flush) {
            fail(session, &e);
        }
    });
    dc.set_onopen(Some(on_open.as_ref().unchecked_ref()));
    dc.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
    dc.set_onclose(Some(on_close.as_ref().unchecked_ref()));
    dc.set_onbufferedamountlow(Some(on_low.as_ref().unchecked_ref()));
    vec![on_open, on_message, on_close, on_low]
}

/// Send queued messages while the channel is open and not over
/// [`HIGH_WATER`]; the rest waits for `bufferedamountlow`.
fn flush(c: &mut Conn) -> Result<(), String> {
    let Some(dc) = &c.dc else {
        return Ok(());
    };
    if dc.ready_state() != RtcDataChannelState::Open {
        return Ok(());
    }
    while dc.buffered_amount() < HIGH_WATER {
        let Some(m) = c.queue.pop_front() else {
            break;
        };
        dc.send_with_u8_array(&m).map_err(js_err)?;
    }
    Ok(())
}

fn remote(session: u64, kind: SignalKind, body: String) -> Result<(), String> {
    let Some(pc) = with_conn(session, |c| c.pc.clone()) else {
        return Ok(()); // closed meanwhile
    };
    match kind {
        SignalKind::Offer | SignalKind::Answer => {
            let offer = kind == SignalKind::Offer;
            wasm_bindgen_futures::spawn_local(async move {
                let r = async {
                    JsFuture::from(pc.set_remote_description(&description(offer, &body)))
                        .await
                        .map_err(js_err)?;
                    let early = with_conn(session, |c| {
                        c.remote_set = true;
                        std::mem::take(&mut c.early)
                    })
                    .unwrap_or_default();
                    for cand in early {
                        add_candidate(&pc, &cand).await?;
                    }
                    if offer {
                        let sdp = make_local(&pc, false).await?;
                        drive(|n, now| n.rtc_signal(session, SignalKind::Answer, sdp, now));
                    }
                    Ok::<(), String>(())
                }
                .await;
                if let Err(e) = r {
                    fail(session, &format!("signalling failed: {e}"));
                }
            });
        }
        SignalKind::Candidate => {
            let now = with_conn(session, |c| {
                if c.remote_set {
                    true
                } else {
                    c.early.push(body.clone());
                    false
                }
            })
            .unwrap_or(false);
            if now {
                wasm_bindgen_futures::spawn_local(async move {
                    if let Err(e) = add_candidate(&pc, &body).await {
                        fail(session, &format!("bad ICE candidate: {e}"));
                    }
                });
            }
        }
        // Bye is the node's to handle; anything newer is ignored.
        _ => {}
    }
    Ok(())
}

async fn add_candidate(pc: &RtcPeerConnection, json: &str) -> Result<(), String> {
    let v = js_sys::JSON::parse(json).map_err(|_| "an ICE candidate that is not JSON")?;
    if !v.is_object() {
        return Err("an ICE candidate that is not an object".into());
    }
    let init: RtcIceCandidateInit = v.unchecked_into();
    JsFuture::from(pc.add_ice_candidate_with_opt_rtc_ice_candidate_init(Some(&init)))
        .await
        .map_err(js_err)?;
    Ok(())
}
