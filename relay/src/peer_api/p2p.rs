//! The seed's `/p2p/*` endpoints, and `GET /p2p/stats`.
//!
//! * `POST /p2p/register` with the seed's body
//!   `{"node_id", "host", "port", "available_experts"}`: validated (node_id
//!   1..=64 of `[A-Za-z0-9._-]`, host at most 253 bytes of hostname
//!   characters, port 1..=65535, at most [`MAX_EXPERTS`] slot names such as
//!   `layer0.expert1`), rate-limited per client IP, at most
//!   [`MAX_REGISTERED`] nodes. The relay stores it and lists it; it **never
//!   connects to the host and port** (no server-side request forgery).
//!   Nodes that do work for the relay log in on `/ws` instead.
//! * Ownership (optional): with headers `X-AIBlock-Key: <hex ed25519 public
//!   key>`, `X-AIBlock-Timestamp: <unix seconds>` and `X-AIBlock-Signature:
//!   <hex signature of register_message(node_id, timestamp, body)>` the
//!   node_id is bound to the key; registering an id owned by another key
//!   is refused with 409. Unsigned registrations of an unowned id are taken
//!   as in the seed.
//! * `DELETE /p2p/nodes/{id}` needs the node's key or the relay operator's:
//!   headers `X-AIBlock-Key`, `X-AIBlock-Timestamp` (within
//!   [`MAX_CLOCK_SKEW`] of the relay's clock) and `X-AIBlock-Signature` over
//!   [`delete_message`] (`aiblock/p2p-delete/v1` ‖ id ‖ timestamp, the
//!   timestamp as the decimal text sent in the header). 401 without or with
//!   invalid credentials, 403 with a valid signature of another key, 404
//!   for an unknown id. The id of a logged-in `/ws` peer (its hex key)
//!   disconnects that peer.
//! * `GET /p2p/nodes`: registered nodes and logged-in `/ws` peers.
//! * `GET /p2p/stats`: [`crate::peers::PeerStats`], this relay's id on a shared
//!   database and its links to other relays.

use std::net::IpAddr;

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, Extensions, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use ed25519_dalek::{Signature, Verifier as _, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use web_node::model::Slot;
use web_node::net::api::{codes, ApiError};
use web_node::net::peer::codes as peer_codes;

pub use crate::peers::nodes::{
    RegisteredNode, Registry, REGISTER_BURST, REGISTER_PER_MINUTE, REGISTER_RATE_TABLE,
};

use super::PeerState;
use crate::http::HttpError;
use crate::peers::PeerStats;

/// Registered nodes at most; more are refused (503) until some are deleted.
pub const MAX_REGISTERED: usize = 10_000;
/// Retry-After (seconds) of the 503 a full registry answers.
pub const REGISTRY_FULL_RETRY_AFTER: u64 = 60;
/// Largest `POST /p2p/register` body (4096 names of 64 bytes fit).
pub const MAX_REGISTER_BODY: usize = 512 * 1024;
/// Slot names one node may list.
pub const MAX_EXPERTS: usize = 4096;
/// Longest slot name in `available_experts`.
pub const MAX_EXPERT_NAME: usize = 64;
/// Longest `node_id`.
pub const MAX_NODE_ID: usize = 64;
/// Longest `host` (a DNS name's limit).
pub const MAX_HOST: usize = 253;
/// How far a signed request's timestamp may be from the relay's clock.
pub const MAX_CLOCK_SKEW: u64 = 300;
/// Domain of the ownership signature of a registration.
pub const REGISTER_DOMAIN: &[u8] = b"aiblock/p2p-register/v1";
/// Domain of the signature that deletes a node.
pub const DELETE_DOMAIN: &[u8] = b"aiblock/p2p-delete/v1";
/// Header names of signed requests.
pub const KEY_HEADER: &str = "x-aiblock-key";
pub const SIG_HEADER: &str = "x-aiblock-signature";
pub const TS_HEADER: &str = "x-aiblock-timestamp";

/// The bytes a `DELETE /p2p/nodes/{id}` signature covers: domain, id,
/// timestamp (decimal unix seconds, as sent in `X-AIBlock-Timestamp`).
pub fn delete_message(id: &str, timestamp: &str) -> Vec<u8> {
    let mut m = DELETE_DOMAIN.to_vec();
    m.extend_from_slice(id.as_bytes());
    m.extend_from_slice(timestamp.as_bytes());
    m
}

/// The bytes a registration's ownership signature covers: domain, node_id,
/// a zero byte, timestamp (decimal unix seconds), a zero byte, SHA-256 of
/// the exact body.
pub fn register_message(node_id: &str, timestamp: &str, body: &[u8]) -> Vec<u8> {
    let mut m = REGISTER_DOMAIN.to_vec();
    m.extend_from_slice(node_id.as_bytes());
    m.push(0);
    m.extend_from_slice(timestamp.as_bytes());
    m.push(0);
    m.extend_from_slice(&Sha256::digest(body));
    m
}

/// The seed's registration body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RegisterRequest {
    pub node_id: String,
    pub host: String,
    pub port: i64,
    #[serde(default)]
    pub available_experts: Vec<String>,
}

/// `GET /p2p/nodes` entry: a registered node or a `/ws` peer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeEntry {
    /// The node_id, or a `/ws` peer's hex key.
    pub node_id: String,
    /// `registered` or `ws`.
    pub kind: String,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub available_experts: Vec<String>,
    /// `/ws` peers: what they hold (block hashes).
    pub blocks: Vec<String>,
    pub agent: Option<String>,
    pub load: Option<u16>,
    pub serve_compute: bool,
    /// Seconds since the last registration or frame.
    pub last_seen_s: f64,
    pub latency_ms: Option<f64>,
    pub bytes_served: u64,
    pub chunks_served: u64,
    pub computations: u64,
    pub banned: bool,
    pub owner: Option<String>,
}

/// `GET /p2p/nodes`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeList {
    pub nodes: Vec<NodeEntry>,
    pub registered: usize,
    pub ws_peers: usize,
}

fn bad(msg: impl Into<String>) -> HttpError {
    ApiError::malformed(msg).into()
}

fn unauthorized(msg: impl Into<String>) -> HttpError {
    HttpError::with_status(
        ApiError::new(codes::BAD_SIGNATURE, msg),
        StatusCode::UNAUTHORIZED,
    )
}

/// Check the request's fields (see the module docs).
pub fn validate(r: &RegisterRequest) -> Result<u16, String> {
    let id = &r.node_id;
    if id.is_empty() || id.len() > MAX_NODE_ID {
        return Err(format!("node_id must be 1 to {MAX_NODE_ID} characters"));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(format!(
            "node_id {id:?} may only hold letters, digits, '.', '_' and '-'"
        ));
    }
    let h = &r.host;
    if h.is_empty() || h.len() > MAX_HOST {
        return Err(format!("host must be 1 to {MAX_HOST} characters"));
    }
    if !h
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':' | b'[' | b']'))
    {
        return Err(format!(
            "host {:?} is not a host name or address",
            h.chars().take(80).collect::<String>()
        ));
    }
    let port = u16::try_from(r.port)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("port {} is not in 1..=65535", r.port))?;
    if r.available_experts.len() > MAX_EXPERTS {
        return Err(format!(
            "available_experts lists {} names, at most {MAX_EXPERTS}",
            r.available_experts.len()
        ));
    }
    for e in &r.available_experts {
        if e.len() > MAX_EXPERT_NAME || Slot::parse(e).is_err() {
            return Err(format!(
                "available_experts: {:?} is not a slot name like layer0.expert1",
                e.chars().take(80).collect::<String>()
            ));
        }
    }
    Ok(port)
}

/// The signer of a request, if it carries `X-AIBlock-Key`; the signature
/// must verify over `message(timestamp)` and the timestamp be recent.
pub(crate) fn signer(
    headers: &HeaderMap,
    message: impl FnOnce(&str) -> Vec<u8>,
) -> Result<Option<[u8; 32]>, HttpError> {
    let get = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).map(str::trim);
    let Some(key_hex) = get(KEY_HEADER) else {
        return Ok(None);
    };
    let how = "sign with the key's ed25519 secret and send X-AIBlock-Key (hex public key), \
               X-AIBlock-Timestamp (unix seconds) and X-AIBlock-Signature (hex)";
    let mut key = [0u8; 32];
    hex::decode_to_slice(key_hex, &mut key)
        .map_err(|_| unauthorized(format!("X-AIBlock-Key is not 64 hex characters; {how}")))?;
    let vk = VerifyingKey::from_bytes(&key)
        .map_err(|_| unauthorized("X-AIBlock-Key is not an ed25519 public key"))?;
    let ts = get(TS_HEADER)
        .ok_or_else(|| unauthorized(format!("X-AIBlock-Timestamp is missing; {how}")))?;
    let t: u64 = ts
        .parse()
        .map_err(|_| unauthorized("X-AIBlock-Timestamp must be unix seconds"))?;
    let now = web_node::chain::now_ms() / 1000;
    if t.abs_diff(now) > MAX_CLOCK_SKEW {
        return Err(unauthorized(format!(
            "X-AIBlock-Timestamp {t} is more than {MAX_CLOCK_SKEW} s from the relay's clock ({now})"
        )));
    }
    let mut sig = [0u8; 64];
    hex::decode_to_slice(get(SIG_HEADER).unwrap_or_default(), &mut sig).map_err(|_| {
        unauthorized(format!(
            "X-AIBlock-Signature is missing or not 128 hex characters; {how}"
        ))
    })?;
    vk.verify(&message(ts), &Signature::from_bytes(&sig))
        .map_err(|_| {
            unauthorized("X-AIBlock-Signature does not verify for this key and request")
        })?;
    Ok(Some(key))
}

fn client_ip(ext: &Extensions) -> IpAddr {
    ext.get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip())
        .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
}

/// `POST /p2p/register`.
pub(crate) async fn register(
    State(st): State<PeerState>,
    ext: Extensions,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, HttpError> {
    let reg = &st.peers.registry;
    let ip = client_ip(&ext);
    take_register_rate(reg, ip)?;
    let bytes = read_register_body(&headers, body).await?;
    let req: RegisterRequest = serde_json::from_slice(&bytes).map_err(|e| {
        bad(format!(
            "the body must be JSON {{\"node_id\", \"host\", \"port\", \"available_experts\"}}: {e}"
        ))
    })?;
    let port = validate(&req).map_err(bad)?;
    let owner = signer(&headers, |ts| register_message(&req.node_id, ts, &bytes))?;
    let node_id = req.node_id.clone();
    let (node, created) = insert_node(reg, req, port, owner)?;
    tracing::info!(node = %node_id, %ip, "node registered");
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(serde_json::json!({
            "status": "registered",
            "node_id": node.node_id,
            "node": node,
        })),
    )
        .into_response())
}

/// The per-IP registration rate (429 beyond it).
fn take_register_rate(reg: &Registry, ip: IpAddr) -> Result<(), HttpError> {
    reg.rate.take(&ip).map_err(|wait| {
        HttpError::rate_limited(
            format!(
                "too many registrations from {ip}: at most {REGISTER_PER_MINUTE} per minute \
                 (burst {REGISTER_BURST}); retry in {wait} s"
            ),
            wait,
        )
    })
}

/// The body of a registration: JSON, at most [`MAX_REGISTER_BODY`] bytes
/// (refused from its Content-Length when that says more).
async fn read_register_body(
    headers: &HeaderMap,
    body: Body,
) -> Result<axum::body::Bytes, HttpError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !ct
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .eq_ignore_ascii_case("application/json")
    {
        return Err(HttpError::unsupported_media(format!(
            "POST /p2p/register takes Content-Type: application/json, not {ct:?}"
        )));
    }
    let too_large = || {
        HttpError::from(ApiError::new(
            codes::TOO_LARGE,
            format!("the registration body exceeds {MAX_REGISTER_BODY} bytes"),
        ))
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_REGISTER_BODY as u64) {
        return Err(too_large());
    }
    axum::body::to_bytes(body, MAX_REGISTER_BODY)
        .await
        .map_err(|_| too_large())
}

/// Insert or update a node: an id bound to a key takes only registrations
/// signed by it (409), and a full registry takes no new id (503). Returns
/// the entry and whether it is new.
fn insert_node(
    reg: &Registry,
    req: RegisterRequest,
    port: u16,
    owner: Option<[u8; 32]>,
) -> Result<(RegisteredNode, bool), HttpError> {
    let now = web_node::chain::now_ms();
    let mut nodes = reg
        .nodes
        .lock()
        .map_err(|_| HttpError::from(ApiError::internal("registry unavailable")))?;
    let prev = nodes.get(&req.node_id);
    if let Some(p) = prev {
        if let Some(o) = p.owner_key {
            if owner != Some(o) {
                return Err(HttpError::with_status(
                    ApiError::new(
                        codes::DUPLICATE,
                        format!(
                            "node_id {:?} is registered by key {}: sign the registration with that key \
                             (X-AIBlock-Key, X-AIBlock-Timestamp, X-AIBlock-Signature) or pick another id",
                            req.node_id,
                            hex::encode(o)
                        ),
                    ),
                    StatusCode::CONFLICT,
                ));
            }
        }
    } else if nodes.len() >= MAX_REGISTERED {
        return Err(HttpError::unavailable(
            format!("the relay holds its maximum of {MAX_REGISTERED} registered nodes"),
            REGISTRY_FULL_RETRY_AFTER,
        ));
    }
    let created = prev.is_none();
    let registered_at_ms = prev.map_or(now, |p| p.registered_at_ms);
    let owner_key = owner.or(prev.and_then(|p| p.owner_key));
    let node = RegisteredNode {
        node_id: req.node_id.clone(),
        host: req.host,
        port,
        available_experts: req.available_experts,
        owner: owner_key.map(hex::encode),
        registered_at_ms,
        updated_at_ms: now,
        owner_key,
    };
    nodes.insert(req.node_id, node.clone());
    Ok((node, created))
}

/// `GET /p2p/nodes`.
pub(crate) async fn list(State(st): State<PeerState>) -> Json<NodeList> {
    let peers = &st.peers;
    let stats = peers.stats();
    let now = web_node::chain::now_ms();
    let mut nodes: Vec<NodeEntry> = peers
        .registry
        .nodes
        .lock()
        .map(|n| n.values().cloned().collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|n| NodeEntry {
            node_id: n.node_id,
            kind: "registered".into(),
            host: Some(n.host),
            port: Some(n.port),
            available_experts: n.available_experts,
            blocks: Vec::new(),
            agent: None,
            load: None,
            serve_compute: false,
            last_seen_s: now.saturating_sub(n.updated_at_ms) as f64 / 1e3,
            latency_ms: None,
            bytes_served: 0,
            chunks_served: 0,
            computations: 0,
            banned: false,
            owner: n.owner,
        })
        .collect();
    let registered = nodes.len();
    let views = peers.views();
    // Slot names of the blocks each peer holds.
    let names: std::collections::HashMap<_, _> = {
        let chain = st.chain.read().await;
        views
            .iter()
            .flat_map(|v| v.have.iter())
            .filter_map(|h| chain.dag.get(h).map(|e| (*h, e.header.name.clone())))
            .collect()
    };
    let ws_peers = views.len();
    for v in views {
        let c = stats.peer(&v.id);
        let mut slots: Vec<String> = v
            .have
            .iter()
            .filter_map(|h| names.get(h).cloned())
            .collect();
        slots.sort();
        slots.dedup();
        nodes.push(NodeEntry {
            node_id: hex::encode(v.id),
            kind: "ws".into(),
            host: None,
            port: None,
            available_experts: slots,
            blocks: v.have.iter().map(|h| h.to_hex()).collect(),
            agent: Some(v.agent),
            load: Some(v.load),
            serve_compute: v.serve_compute,
            last_seen_s: v.last_seen_ago.as_secs_f64(),
            latency_ms: v.latency_ms,
            bytes_served: c.bytes_served,
            chunks_served: c.chunks_served,
            computations: c.compute_answered,
            banned: peers.banned_for(&v.id).is_some(),
            owner: None,
        });
    }
    Json(NodeList {
        nodes,
        registered,
        ws_peers,
    })
}

/// `DELETE /p2p/nodes/{id}`.
pub(crate) async fn remove(
    State(st): State<PeerState>,
    id: Result<UrlPath<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, HttpError> {
    let UrlPath(id) = id.map_err(|e| bad(e.body_text()))?;
    let registered = st.peers.registry.get(&id);
    let ws_peer = {
        let mut k = [0u8; 32];
        hex::decode_to_slice(&id, &mut k)
            .ok()
            .filter(|_| st.peers.views().iter().any(|v| v.id == k))
            .map(|_| k)
    };
    if registered.is_none() && ws_peer.is_none() {
        return Err(ApiError::not_found(format!("no node {id:?} is registered")).into());
    }
    let key = signer(&headers, |ts| delete_message(&id, ts))?.ok_or_else(|| {
        unauthorized(format!(
            "deleting a node needs its key or the relay operator's: send X-AIBlock-Key (hex \
             ed25519 public key), X-AIBlock-Timestamp (unix seconds) and X-AIBlock-Signature \
             (hex signature of \"aiblock/p2p-delete/v1\" + {id:?} + the timestamp)"
        ))
    })?;
    let operator = st.meta_keys().operator() == Some(&key);
    let owner = registered
        .as_ref()
        .and_then(|n| n.owner_key)
        .is_some_and(|o| o == key)
        || ws_peer == Some(key);
    if !(operator || owner) {
        return Err(ApiError::new(
            codes::FORBIDDEN,
            format!(
                "key {} may not delete node {id:?}: only the node's own key or the relay operator's",
                hex::encode(key)
            ),
        )
        .into());
    }
    if registered.is_some() {
        if let Ok(mut n) = st.peers.registry.nodes.lock() {
            n.remove(&id);
        }
    }
    if let Some(k) = ws_peer {
        st.peers.disconnect(
            &k,
            peer_codes::UNAVAILABLE,
            "removed with DELETE /p2p/nodes",
        );
    }
    tracing::info!(node = %id, by = %hex::encode(key), "node deleted");
    Ok(Json(serde_json::json!({"status": "deleted", "node_id": id})).into_response())
}

/// `GET /p2p/stats`.
/// `GET /p2p/stats`: the counters and, on a shared database, this relay's
/// id and its links to other relays.
#[derive(Debug, Serialize)]
pub struct StatsBody {
    #[serde(flatten)]
    pub stats: PeerStats,
    /// This relay's id in the shared database (None on the embedded store).
    pub relay_id: Option<String>,
    /// The other live relays of the database (ids), as of the last heartbeat.
    pub relays: Vec<String>,
    pub links: Vec<crate::peers::LinkView>,
}

pub(crate) async fn stats(State(st): State<PeerState>) -> Json<StatsBody> {
    Json(StatsBody {
        stats: st.peers.stats(),
        relay_id: st.peers.cluster().map(|c| c.id.clone()),
        relays: st
            .peers
            .cluster()
            .map(|c| c.relays().into_iter().map(|r| r.id).collect())
            .unwrap_or_default(),
        links: st.peers.links(),
    })
}
