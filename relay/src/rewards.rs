//! The seed's analytics and reward endpoints over [`crate::usage`]:
//!
//! | Method and path | What |
//! |---|---|
//! | `GET /experts/stats/{name}` | an expert slot (`layer0.expert1`) of the current model: totals and, per accepted version, its counters, verified loss, improvement over its parent and the peers that served it |
//! | `GET /experts/top?limit=N` | expert slots ranked by reward units (relay-verified tokens + 25 % of self-reported ones, all versions), ties by verified bytes served, then by name; `limit` 1..=[`MAX_TOP`], default [`DEFAULT_TOP`] |
//! | `POST /experts/reward/{name}` | pay the slot's unpaid work (operator only: signed request, see below) |
//! | `GET /rewards/{key}` | what a key earned and why |
//! | `POST /usage/report` | a node's signed [`UsageReport`] |
//!
//! `POST /experts/reward/{name}` needs the operator key's signature in the
//! headers `X-AIBlock-Key`, `X-AIBlock-Timestamp` (unix seconds, within 5
//! minutes) and `X-AIBlock-Signature` over [`reward_message`]
//! (`aiblock/experts-reward/v1` ‖ name ‖ timestamp). The relay also pays
//! every slot by itself each [`REWARD_PERIOD`].
//!
//! Layer: handlers, above [`crate::state`]. May import: `state` and every
//! module below it, and `peer_api::p2p` (request signatures).

use std::sync::{Arc, Weak};
use std::time::Duration;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path as UrlPath, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use web_node::chain::{BlockHash, ChainId, ChainView as _, Dag};
use web_node::model::Slot;
use web_node::net::api::{codes, ApiError};

use crate::http::HttpError;
use crate::state::{CoreState, SharedCore};
use crate::usage::{
    quality_pct, speed_pct, PeerCounters, RewardEntry, Usage, UsageReport, VersionCounters,
    VersionInfo,
};

/// Default and largest `limit` of `GET /experts/top`.
pub const DEFAULT_TOP: usize = 10;
pub const MAX_TOP: usize = 1000;
/// The relay pays every expert slot's unpaid work this often.
pub const REWARD_PERIOD: Duration = Duration::from_secs(3600);
/// Largest `POST /usage/report` body.
pub const MAX_REPORT_BODY: usize = 64 * 1024;
/// Domain of the operator's signature that triggers a reward.
pub const REWARD_DOMAIN: &[u8] = b"aiblock/experts-reward/v1";

/// The bytes a `POST /experts/reward/{name}` signature covers.
pub fn reward_message(name: &str, timestamp: &str) -> Vec<u8> {
    let mut m = REWARD_DOMAIN.to_vec();
    m.extend_from_slice(name.as_bytes());
    m.extend_from_slice(timestamp.as_bytes());
    m
}

pub fn routes() -> Router<SharedCore> {
    Router::new()
        .route("/experts/stats/{name}", get(stats))
        .route("/experts/top", get(top))
        .route("/experts/reward/{name}", post(reward))
        .route("/rewards/{key}", get(rewards_of))
        .route("/usage/report", post(report))
}

/// One accepted version of a slot, oldest first, with what the reward needs.
/// The loss is the quality gate's verified one (else the block's claim);
/// the parent's is the gate's incumbent (else the parent version's claim).
fn versions(
    dag: &Dag,
    usage: &Usage,
    meta: &BlockHash,
    name: &str,
) -> Vec<(VersionInfo, bool, String, Option<BlockHash>)> {
    let head = dag.head(Some(meta), name);
    let entries: Vec<_> = dag
        .chain(ChainId::B)
        .filter(|e| e.header.meta.as_ref() == Some(meta) && e.header.name == name)
        .collect();
    entries
        .iter()
        .map(|e| {
            let parent = e
                .header
                .parents
                .iter()
                .find(|p| entries.iter().any(|x| &x.hash == *p))
                .copied();
            let c = usage.version_counters(&e.hash);
            let parent_loss = c.incumbent_loss.or_else(|| {
                parent
                    .and_then(|p| dag.get(&p))
                    .and_then(|p| p.header.candidate_loss)
                    .map(f64::from)
            });
            (
                VersionInfo {
                    block: e.hash,
                    miner: e.header.miner,
                    loss: c.verified_loss.or(e.header.candidate_loss.map(f64::from)),
                    parent_loss,
                },
                head == Some(e.hash),
                e.header.address.clone(),
                parent,
            )
        })
        .collect()
}

fn parse_slot(p: Result<UrlPath<String>, PathRejection>) -> Result<String, ApiError> {
    let UrlPath(name) = p.map_err(|e| ApiError::malformed(e.body_text()))?;
    match Slot::parse(&name) {
        Ok(Slot::Expert { .. }) => Ok(name),
        Ok(_) => Err(ApiError::malformed(format!(
            "{name:?} is not an expert slot (layerN.expertM)"
        ))),
        Err(e) => Err(ApiError::malformed(format!(
            "{name:?} is not an expert name (layerN.expertM): {e}"
        ))),
    }
}

/// The expert slots of model `meta`, sorted, each once.
fn expert_names(dag: &Dag, meta: &BlockHash) -> Vec<String> {
    let mut names: Vec<String> = dag
        .chain(ChainId::B)
        .filter(|e| e.header.meta.as_ref() == Some(meta))
        .filter(|e| matches!(Slot::parse(&e.header.name), Ok(Slot::Expert { .. })))
        .map(|e| e.header.name.clone())
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The current model's meta block.
fn current_meta(dag: &Dag) -> Result<BlockHash, ApiError> {
    dag.latest_meta()
        .map(|e| e.hash)
        .ok_or_else(|| ApiError::not_found("the relay has no model yet"))
}

#[derive(Serialize)]
struct PeerServed {
    key: String,
    #[serde(flatten)]
    counters: PeerCounters,
}

#[derive(Serialize)]
struct VersionStats {
    block: BlockHash,
    version: usize,
    parent: Option<BlockHash>,
    miner: String,
    address: String,
    is_head: bool,
    loss: Option<f64>,
    parent_loss: Option<f64>,
    /// `parent_loss − loss` (positive: better than its parent).
    improvement: Option<f64>,
    quality_pct: u64,
    speed_pct: u64,
    mean_latency_ms: Option<f64>,
    #[serde(flatten)]
    counters: VersionCounters,
    peers: Vec<PeerServed>,
}

#[derive(Serialize)]
struct ExpertStats {
    expert: String,
    model: BlockHash,
    head: Option<BlockHash>,
    calls: u64,
    tokens_routed: u64,
    reported_calls: u64,
    reported_tokens: u64,
    bytes_served: u64,
    computations_served: u64,
    reward_units: u64,
    versions: Vec<VersionStats>,
}

fn expert_stats(dag: &Dag, usage: &Usage, meta: BlockHash, name: &str) -> Option<ExpertStats> {
    let vs = versions(dag, usage, &meta, name);
    if vs.is_empty() {
        return None;
    }
    let mut out = ExpertStats {
        expert: name.to_string(),
        model: meta,
        head: None,
        calls: 0,
        tokens_routed: 0,
        reported_calls: 0,
        reported_tokens: 0,
        bytes_served: 0,
        computations_served: 0,
        reward_units: 0,
        versions: Vec::new(),
    };
    for (i, (v, is_head, address, parent)) in vs.into_iter().enumerate() {
        let c = usage.version_counters(&v.block);
        out.calls += c.calls;
        out.tokens_routed += c.tokens;
        out.reported_calls += c.reported_calls;
        out.reported_tokens += c.reported_tokens;
        out.bytes_served += c.bytes_served;
        out.computations_served += c.computations;
        out.reward_units += c.units();
        if is_head {
            out.head = Some(v.block);
        }
        out.versions.push(VersionStats {
            block: v.block,
            version: i + 1,
            parent,
            miner: hex::encode(v.miner),
            address,
            is_head,
            loss: v.loss,
            parent_loss: v.parent_loss,
            improvement: v.loss.zip(v.parent_loss).map(|(l, p)| p - l),
            quality_pct: quality_pct(v.loss, v.parent_loss),
            speed_pct: speed_pct(c.mean_latency_us()),
            mean_latency_ms: c.mean_latency_us().map(|u| u as f64 / 1000.0),
            peers: usage
                .peers_of(&v.block)
                .into_iter()
                .map(|(k, counters)| PeerServed {
                    key: hex::encode(k),
                    counters,
                })
                .collect(),
            counters: c,
        });
    }
    Some(out)
}

/// `GET /experts/stats/{name}`.
async fn stats(
    State(st): State<SharedCore>,
    name: Result<UrlPath<String>, PathRejection>,
) -> Result<Response, HttpError> {
    let name = parse_slot(name)?;
    let chain = st.chain.read().await;
    let meta = current_meta(&chain.dag)?;
    let s = expert_stats(&chain.dag, &st.usage, meta, &name).ok_or_else(|| {
        ApiError::not_found(format!(
            "no expert {name} in model {} (see GET /heads)",
            meta.short()
        ))
    })?;
    Ok(Json(s).into_response())
}

#[derive(Serialize)]
struct TopEntry {
    rank: usize,
    expert: String,
    head: Option<BlockHash>,
    reward_units: u64,
    tokens_routed: u64,
    reported_tokens: u64,
    bytes_served: u64,
    computations_served: u64,
    versions: usize,
}

fn parse_limit(query: &Option<String>) -> Result<usize, ApiError> {
    let mut limit = DEFAULT_TOP;
    for kv in query.as_deref().unwrap_or_default().split('&') {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        if k == "limit" {
            limit = match v.parse::<usize>() {
                Ok(n) if (1..=MAX_TOP).contains(&n) => n,
                _ => {
                    return Err(ApiError::malformed(format!(
                        "limit must be an integer from 1 to {MAX_TOP}, got {v:?}"
                    )))
                }
            };
        }
    }
    Ok(limit)
}

/// `GET /experts/top?limit=N`.
async fn top(
    State(st): State<SharedCore>,
    RawQuery(query): RawQuery,
) -> Result<Response, HttpError> {
    let limit = parse_limit(&query)?;
    let chain = st.chain.read().await;
    let meta = current_meta(&chain.dag)?;
    let names = expert_names(&chain.dag, &meta);
    let mut rows: Vec<TopEntry> = names
        .iter()
        .filter_map(|n| expert_stats(&chain.dag, &st.usage, meta, n))
        .map(|s| TopEntry {
            rank: 0,
            versions: s.versions.len(),
            expert: s.expert,
            head: s.head,
            reward_units: s.reward_units,
            tokens_routed: s.tokens_routed,
            reported_tokens: s.reported_tokens,
            bytes_served: s.bytes_served,
            computations_served: s.computations_served,
        })
        .collect();
    rows.sort_by(|a, b| {
        b.reward_units
            .cmp(&a.reward_units)
            .then(b.bytes_served.cmp(&a.bytes_served))
            .then(a.expert.cmp(&b.expert))
    });
    rows.truncate(limit);
    for (i, r) in rows.iter_mut().enumerate() {
        r.rank = i + 1;
    }
    Ok(Json(serde_json::json!({ "model": meta, "limit": limit, "experts": rows })).into_response())
}

/// Pay one slot now.
pub async fn pay_slot(
    st: &SharedCore,
    name: &str,
) -> Result<(BlockHash, Vec<RewardEntry>), ApiError> {
    let vs = {
        let chain = st.chain.read().await;
        let meta = current_meta(&chain.dag)?;
        let vs = versions(&chain.dag, &st.usage, &meta, name);
        if vs.is_empty() {
            return Err(ApiError::not_found(format!(
                "no expert {name} in model {}",
                meta.short()
            )));
        }
        (meta, vs.into_iter().map(|v| v.0).collect::<Vec<_>>())
    };
    let usage = st.usage.clone();
    let name2 = name.to_string();
    let entries =
        tokio::task::spawn_blocking(move || usage.reward(&name2, &vs.1, web_node::chain::now_ms()))
            .await
            .map_err(|e| ApiError::internal(format!("task failed: {e}")))?
            .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok((vs.0, entries))
}

fn entry_json(e: &RewardEntry) -> serde_json::Value {
    serde_json::json!({
        "key": hex::encode(e.key),
        "amount_uc": e.amount_uc,
        "role": e.role,
        "expert": e.slot,
        "block": e.block,
        "reason": e.reason,
        "at_ms": e.at_ms,
    })
}

/// `POST /experts/reward/{name}` (operator only).
async fn reward(
    State(st): State<SharedCore>,
    headers: HeaderMap,
    name: Result<UrlPath<String>, PathRejection>,
) -> Result<Response, HttpError> {
    let name = parse_slot(name)?;
    let signer = crate::peer_api::p2p::signer(&headers, |ts| reward_message(&name, ts))?;
    let Some(key) = signer else {
        return Err(HttpError::with_status(
            ApiError::new(
                codes::BAD_SIGNATURE,
                "only the relay operator may trigger a reward: sign `aiblock/experts-reward/v1` ‖ name ‖ \
                 timestamp with the operator key and send X-AIBlock-Key, X-AIBlock-Timestamp and \
                 X-AIBlock-Signature (hex)",
            ),
            StatusCode::UNAUTHORIZED,
        ));
    };
    if st.meta_keys().operator() != Some(&key) {
        return Err(ApiError::new(
            codes::FORBIDDEN,
            format!("key {} is not the relay operator's", hex::encode(key)),
        )
        .into());
    }
    let (meta, entries) = pay_slot(&st, &name).await?;
    let total: u64 = entries.iter().map(|e| e.amount_uc).sum();
    Ok(Json(serde_json::json!({
        "expert": name,
        "model": meta,
        "paid_uc": total,
        "entries": entries.iter().map(entry_json).collect::<Vec<_>>(),
    }))
    .into_response())
}

/// `GET /rewards/{key}`.
async fn rewards_of(
    State(st): State<SharedCore>,
    key: Result<UrlPath<String>, PathRejection>,
) -> Result<Response, HttpError> {
    let UrlPath(k) = key.map_err(|e| ApiError::malformed(e.body_text()))?;
    let mut key = [0u8; 32];
    hex::decode_to_slice(&k, &mut key).map_err(|_| {
        ApiError::malformed(format!(
            "{k:?} is not a key (64 hex characters of an ed25519 public key)"
        ))
    })?;
    // A database read on PostgreSQL: off the async workers, and an error is a 500.
    let usage = st.usage.clone();
    let entries = tokio::task::spawn_blocking(move || usage.try_rewards_of(&key))
        .await
        .map_err(|e| ApiError::internal(format!("task failed: {e}")))?
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let by_role = |r: &str| -> u64 {
        entries
            .iter()
            .filter(|e| e.role == r)
            .map(|e| e.amount_uc)
            .sum()
    };
    Ok(Json(serde_json::json!({
        "key": hex::encode(key),
        "total_uc": entries.iter().map(|e| e.amount_uc).sum::<u64>(),
        "miner_uc": by_role("miner"),
        "peer_uc": by_role("peer"),
        "entries": entries.iter().map(entry_json).collect::<Vec<_>>(),
    }))
    .into_response())
}

/// `POST /usage/report`.
async fn report(
    State(st): State<SharedCore>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, HttpError> {
    let ct = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !ct.starts_with("application/json") {
        return Err(HttpError::unsupported_media(
            "POST /usage/report takes Content-Type: application/json",
        ));
    }
    if body.len() > MAX_REPORT_BODY {
        return Err(ApiError::new(
            codes::TOO_LARGE,
            format!("a report is at most {MAX_REPORT_BODY} bytes"),
        )
        .into());
    }
    let r: UsageReport = serde_json::from_slice(&body)
        .map_err(|e| ApiError::malformed(format!("not a usage report: {e}")))?;
    let usage = st.usage.clone();
    let out = tokio::task::spawn_blocking(move || {
        let now = web_node::chain::now_ms();
        usage.submit_report(&r, now, |k, b| usage.fetched(k, b))
    })
    .await
    .map_err(|e| ApiError::internal(format!("task failed: {e}")))?;
    match out {
        Ok(o) => Ok(Json(o).into_response()),
        Err(crate::usage::UsageError::Report(m)) => Err(ApiError::new(codes::FORBIDDEN, m).into()),
        Err(e) => Err(ApiError::internal(e.to_string()).into()),
    }
}

/// Flush counters every [`crate::usage::FLUSH_INTERVAL`] and pay every
/// expert slot each [`REWARD_PERIOD`], while the state lives.
pub fn spawn_background(st: &SharedCore) {
    let weak: Weak<CoreState> = Arc::downgrade(st);
    tokio::spawn(async move {
        let mut flush = tokio::time::interval(crate::usage::FLUSH_INTERVAL);
        let mut pay = tokio::time::interval(REWARD_PERIOD);
        pay.tick().await;
        loop {
            tokio::select! {
                _ = flush.tick() => {
                    let Some(st) = weak.upgrade() else { return };
                    let u = st.usage.clone();
                    drop(st);
                    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || u.flush()).await {
                        tracing::error!(error = %e, "usage flush failed");
                    }
                }
                _ = pay.tick() => {
                    let Some(st) = weak.upgrade() else { return };
                    let names = {
                        let chain = st.chain.read().await;
                        let Ok(meta) = current_meta(&chain.dag) else { continue };
                        expert_names(&chain.dag, &meta)
                    };
                    for n in names {
                        match pay_slot(&st, &n).await {
                            Ok((_, e)) if !e.is_empty() => tracing::info!(expert = %n, entries = e.len(), "periodic reward paid"),
                            Ok(_) => {}
                            Err(e) => tracing::warn!(expert = %n, error = %e, "periodic reward failed"),
                        }
                    }
                }
            }
        }
    });
}
