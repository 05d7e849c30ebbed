//! Usage and rewards: what each expert version did, counted from work the
//! relay itself saw and verified, persisted in `data/usage.redb`, and the
//! rewards computed from it.
//!
//! What counts:
//! * **Calls, tokens routed, latency** of an expert version: from `/chat` and
//!   `/chat/distributed`, which the relay runs itself ([`Usage::record_inference`]).
//! * **Bytes served** by a peer: counted when the relay forwards a chunk of
//!   that peer that passed the relay's hash check ([`Usage::record_chunk_served`]).
//!   A corrupt chunk earns nothing ([`Usage::record_bad_chunk`]).
//! * **Computations served** by a peer: counted when its answer came in
//!   time and was accepted ([`Usage::record_compute`]).
//! * **Self-reported usage** (inference that ran inside a browser or native
//!   node): a [`UsageReport`] signed by the node key; replays (same key,
//!   period, sequence number), forgeries, reports for another period than
//!   the current or previous one, and usage over the per-key cap of a period
//!   change nothing ([`Usage::submit_report`]). Self-reported tokens count
//!   [`REPORT_WEIGHT_PCT`] % of relay-verified tokens in rewards.
//!
//! Counters are kept in memory and written to redb by [`Usage::flush`]
//! (the relay flushes every [`FLUSH_INTERVAL`] and on shutdown); accepted
//! reports and rewards are written before they are acknowledged.
//!
//! # Rewards
//!
//! [`Usage::reward`] pays, for one expert slot, the work done since its last
//! reward (each counter remembers how much of it was already paid), in
//! integer micro-credits (µc):
//!
//! * the **miner** of each accepted version `v` gets
//!   `units_v × MINER_UC_PER_TOKEN × quality_v / 100 × speed_v / 100`, where
//!   `units_v = tokens_v + reported_tokens_v × REPORT_WEIGHT_PCT / 100`,
//!   `quality_v = 100 + min(100, 1000 × (parent_loss − loss) / parent_loss)`
//!   (percent, losses taken in micro-nats as integers; 100 for a genesis version or one that did not improve; a
//!   version 10 % better than its parent earns double), and
//!   `speed_v = clamp(100 × TARGET_LATENCY_US / mean_latency_us, 50, 100)`
//!   (percent; 100 when it answers within the target or has no samples);
//! * each **peer** `p` that served the slot's versions gets
//!   `bytes_p × PEER_UC_PER_MIB / 2^20 + computations_p × PEER_UC_PER_COMPUTE`.
//!
//! All divisions round down. The README works one example through; a test
//! computes it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use ed25519_dalek::{Signature, Verifier as _, VerifyingKey};
use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use web_node::chain::BlockHash;

/// Micro-credits a miner earns per relay-verified token routed to its version.
pub const MINER_UC_PER_TOKEN: u64 = 1_000;
/// Micro-credits a peer earns per MiB of verified chunk bytes it served.
pub const PEER_UC_PER_MIB: u64 = 50_000;
/// Micro-credits a peer earns per expert computation answered in time.
pub const PEER_UC_PER_COMPUTE: u64 = 200;
/// Self-reported tokens count this percentage of relay-verified ones (the
/// relay cannot see that inference, only that the reporter fetched the block).
pub const REPORT_WEIGHT_PCT: u64 = 25;
/// Expert latency (per call, µs) at or under which the speed factor is 100 %.
pub const TARGET_LATENCY_US: u64 = 20_000;
/// Tokens one key may self-report per period, over all blocks.
pub const REPORT_TOKENS_CAP: u64 = 20_000;
/// Calls one key may self-report per period, over all blocks.
pub const REPORT_CALLS_CAP: u64 = 2_000;
/// Reports one key may send per period (each one is a database write).
pub const REPORTS_PER_PERIOD: u64 = 120;
/// How often the relay writes counters to disk (at most this much is lost
/// in a crash; a graceful stop flushes).
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);

pub use web_node::net::usage::{
    hex32, ReportEntry, UsageReport, REPORT_DOMAIN, REPORT_MAX_ENTRIES, REPORT_PERIOD_MS,
};

const VERSIONS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("usage_versions");
const PEERS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("usage_peers");
const SEEN: TableDefinition<&[u8], ()> = TableDefinition::new("usage_reports_seen");
const CAPS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("usage_report_caps");
const LEDGER: TableDefinition<u64, &[u8]> = TableDefinition::new("reward_ledger");
const FETCHED: TableDefinition<&[u8], ()> = TableDefinition::new("usage_fetched");

/// Errors of the usage store.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    #[error("usage database: {0}")]
    Db(String),
    #[error("{0}")]
    Report(String),
}

fn dberr<E: std::fmt::Display>(e: E) -> UsageError {
    UsageError::Db(e.to_string())
}

/// Counters of one expert version (one block).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VersionCounters {
    /// Relay-run generations that routed at least one token to it.
    pub calls: u64,
    /// Tokens routed to it by relay-run inference.
    pub tokens: u64,
    /// Sum and count of its per-call compute latency (µs).
    pub latency_us_sum: u64,
    pub latency_samples: u64,
    /// Accepted self-reported calls and tokens.
    pub reported_calls: u64,
    pub reported_tokens: u64,
    /// Verified chunk bytes peers served of it, and computations they answered.
    pub bytes_served: u64,
    pub computations: u64,
    /// Miner reward units already paid (`units` at the last reward).
    pub paid_units: u64,
    /// The quality gate's recomputed public-eval loss of the model with this
    /// version, and of the model it replaced (None for genesis versions).
    pub verified_loss: Option<f64>,
    pub incumbent_loss: Option<f64>,
}

impl VersionCounters {
    /// Reward units: verified tokens plus weighted self-reported ones.
    pub fn units(&self) -> u64 {
        self.tokens + self.reported_tokens * REPORT_WEIGHT_PCT / 100
    }

    pub fn mean_latency_us(&self) -> Option<u64> {
        (self.latency_samples > 0).then(|| self.latency_us_sum / self.latency_samples)
    }
}

/// What one peer served of one block.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerCounters {
    pub bytes: u64,
    pub chunks: u64,
    pub computations: u64,
    /// Corrupt chunks the relay caught (earn nothing).
    pub bad_chunks: u64,
    pub paid_bytes: u64,
    pub paid_computations: u64,
}

/// What a report changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportOutcome {
    pub accepted_calls: u64,
    pub accepted_tokens: u64,
    /// Entries (or parts) refused, with why.
    pub refused: Vec<String>,
}

/// One reward paid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RewardEntry {
    #[serde(with = "hex32")]
    pub key: [u8; 32],
    pub amount_uc: u64,
    /// `miner` or `peer`.
    pub role: String,
    pub slot: String,
    pub block: BlockHash,
    /// How the amount was computed, in words and numbers.
    pub reason: String,
    pub at_ms: u64,
}

/// A version of a slot as the reward needs it (from the chain).
#[derive(Debug, Clone)]
pub struct VersionInfo {
    pub block: BlockHash,
    pub miner: [u8; 32],
    /// Verified public-eval loss of this version and of its parent version.
    pub loss: Option<f64>,
    pub parent_loss: Option<f64>,
}

/// Quality factor in percent (see the module docs).
pub fn quality_pct(loss: Option<f64>, parent: Option<f64>) -> u64 {
    match (loss, parent) {
        (Some(l), Some(p)) if p > 0.0 && l >= 0.0 && l < p => {
            // In micro-nats, integers: exact and the same on every machine.
            let (l, p) = ((l * 1e6).round() as u64, (p * 1e6).round() as u64);
            let bonus = p.saturating_sub(l) * 1000 / p.max(1);
            100 + bonus.min(100)
        }
        _ => 100,
    }
}

/// Speed factor in percent (see the module docs).
pub fn speed_pct(mean_latency_us: Option<u64>) -> u64 {
    match mean_latency_us {
        Some(m) if m > TARGET_LATENCY_US => (100 * TARGET_LATENCY_US / m).clamp(50, 100),
        _ => 100,
    }
}

#[derive(Default)]
struct State {
    versions: HashMap<BlockHash, VersionCounters>,
    peers: HashMap<([u8; 32], BlockHash), PeerCounters>,
    dirty_versions: HashSet<BlockHash>,
    dirty_peers: HashSet<([u8; 32], BlockHash)>,
    ledger: Vec<RewardEntry>,
    /// (key, block): the relay served this key chunks of this block.
    fetched: HashSet<([u8; 32], BlockHash)>,
    dirty_fetched: Vec<([u8; 32], BlockHash)>,
}

/// The usage store. Cheap to share (`Arc<Usage>`); every method is sync and
/// short (no I/O but [`flush`](Usage::flush), reports and rewards).
pub struct Usage {
    db: Option<Database>,
    state: Mutex<State>,
}

impl std::fmt::Debug for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Usage").finish_non_exhaustive()
    }
}

fn peer_key(peer: &[u8; 32], block: &BlockHash) -> [u8; 64] {
    let mut k = [0u8; 64];
    k[..32].copy_from_slice(peer);
    k[32..].copy_from_slice(&block.0);
    k
}

/// The inverse of [`peer_key`] (None for a key of another length).
fn split_peer_key(k: &[u8]) -> Option<([u8; 32], BlockHash)> {
    let (p, b) = (k.get(..32)?, k.get(32..)?);
    Some((p.try_into().ok()?, BlockHash(b.try_into().ok()?)))
}

impl Usage {
    /// Open (creating) `path` and load every counter.
    pub fn open(path: &Path) -> Result<Self, UsageError> {
        let db = Database::create(path).map_err(dberr)?;
        let mut st = State::default();
        {
            let w = db.begin_write().map_err(dberr)?;
            w.open_table(VERSIONS).map_err(dberr)?;
            w.open_table(PEERS).map_err(dberr)?;
            w.open_table(SEEN).map_err(dberr)?;
            w.open_table(CAPS).map_err(dberr)?;
            w.open_table(LEDGER).map_err(dberr)?;
            w.open_table(FETCHED).map_err(dberr)?;
            w.commit().map_err(dberr)?;
        }
        let r = db.begin_read().map_err(dberr)?;
        for row in r
            .open_table(VERSIONS)
            .map_err(dberr)?
            .iter()
            .map_err(dberr)?
        {
            let (k, v) = row.map_err(dberr)?;
            let Ok(h) = <[u8; 32]>::try_from(k.value()) else {
                continue;
            };
            let c: VersionCounters = postcard::from_bytes(v.value()).map_err(dberr)?;
            st.versions.insert(BlockHash(h), c);
        }
        for row in r.open_table(PEERS).map_err(dberr)?.iter().map_err(dberr)? {
            let (k, v) = row.map_err(dberr)?;
            let Some(key) = split_peer_key(k.value()) else {
                continue;
            };
            let c: PeerCounters = postcard::from_bytes(v.value()).map_err(dberr)?;
            st.peers.insert(key, c);
        }
        for row in r.open_table(LEDGER).map_err(dberr)?.iter().map_err(dberr)? {
            let (_, v) = row.map_err(dberr)?;
            st.ledger
                .push(postcard::from_bytes(v.value()).map_err(dberr)?);
        }
        for row in r
            .open_table(FETCHED)
            .map_err(dberr)?
            .iter()
            .map_err(dberr)?
        {
            let (k, _) = row.map_err(dberr)?;
            if let Some(key) = split_peer_key(k.value()) {
                st.fetched.insert(key);
            }
        }
        drop(r);
        Ok(Self {
            db: Some(db),
            state: Mutex::new(st),
        })
    }

    /// The usage ledger in PostgreSQL, shared by every relay on the database.
    pub fn open_pg(pg: std::sync::Arc<crate::pg::Pg>) -> Result<Self, UsageError> {
        let _ = pg;
        Err(UsageError::Db(
            "the PostgreSQL usage ledger is not built yet".into(),
        ))
    }

    /// [`Usage::open`], or (logged as an error) a store that counts in
    /// memory only and refuses reports and rewards, so a relay built in a
    /// test or on a read-only disk still serves; `relay serve` opens the file
    /// itself first and refuses to start if that fails.
    pub fn open_or_memory(path: &Path) -> Self {
        match Self::open(path) {
            Ok(u) => u,
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "usage database not opened: counting in memory only");
                Self {
                    db: None,
                    state: Mutex::new(State::default()),
                }
            }
        }
    }

    /// Is a database file behind it (not [`Usage::open_or_memory`]'s fallback)?
    pub fn is_persistent(&self) -> bool {
        self.db.is_some()
    }

    fn db(&self) -> Result<&Database, UsageError> {
        self.db
            .as_ref()
            .ok_or_else(|| UsageError::Db("the usage database is not open".into()))
    }

    fn st(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain counters; keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn version<'a>(st: &'a mut State, block: &BlockHash) -> &'a mut VersionCounters {
        st.dirty_versions.insert(*block);
        st.versions.entry(*block).or_default()
    }

    fn peer<'a>(st: &'a mut State, peer: &[u8; 32], block: &BlockHash) -> &'a mut PeerCounters {
        st.dirty_peers.insert((*peer, *block));
        st.peers.entry((*peer, *block)).or_default()
    }

    /// One relay-run generation: per expert version, the tokens routed to it
    /// and the time its computations took (µs, summed over the generation).
    pub fn record_inference(&self, routed: &[(BlockHash, u64, u64)]) {
        let mut st = self.st();
        for (block, tokens, latency_us) in routed {
            if *tokens == 0 {
                continue;
            }
            let v = Self::version(&mut st, block);
            v.calls += 1;
            v.tokens += tokens;
            v.latency_us_sum += latency_us;
            v.latency_samples += 1;
        }
    }

    /// The quality gate accepted `block` with these losses.
    pub fn record_quality(&self, block: &BlockHash, loss: f64, incumbent: f64) {
        let mut st = self.st();
        let v = Self::version(&mut st, block);
        v.verified_loss = Some(loss);
        v.incumbent_loss = Some(incumbent);
    }

    /// A verified chunk of `block` that `peer` served, forwarded by the relay.
    pub fn record_chunk_served(&self, peer: &[u8; 32], block: &BlockHash, bytes: u64) {
        let mut st = self.st();
        let p = Self::peer(&mut st, peer, block);
        p.bytes += bytes;
        p.chunks += 1;
        Self::version(&mut st, block).bytes_served += bytes;
    }

    /// The relay delivered a chunk of `block` to `peer` (from its store or
    /// another peer): that peer may report inference with it.
    pub fn record_fetch(&self, peer: &[u8; 32], block: &BlockHash) {
        let mut st = self.st();
        if st.fetched.insert((*peer, *block)) {
            st.dirty_fetched.push((*peer, *block));
        }
    }

    /// Did the relay ever deliver `block` to `peer`?
    pub fn fetched(&self, peer: &[u8; 32], block: &BlockHash) -> bool {
        self.st().fetched.contains(&(*peer, *block))
    }

    /// A corrupt chunk the relay caught: recorded, earns nothing.
    pub fn record_bad_chunk(&self, peer: &[u8; 32], block: &BlockHash) {
        let mut st = self.st();
        Self::peer(&mut st, peer, block).bad_chunks += 1;
    }

    /// An expert computation `peer` answered in time.
    pub fn record_compute(&self, peer: &[u8; 32], block: &BlockHash) {
        let mut st = self.st();
        Self::peer(&mut st, peer, block).computations += 1;
        Self::version(&mut st, block).computations += 1;
    }

    /// Counters of one version (zeros if none).
    pub fn version_counters(&self, block: &BlockHash) -> VersionCounters {
        self.st().versions.get(block).cloned().unwrap_or_default()
    }

    /// Every peer's counters for one block.
    pub fn peers_of(&self, block: &BlockHash) -> Vec<([u8; 32], PeerCounters)> {
        let st = self.st();
        let mut v: Vec<_> = st
            .peers
            .iter()
            .filter(|((_, b), _)| b == block)
            .map(|((p, _), c)| (*p, c.clone()))
            .collect();
        v.sort_by(|a, b| b.1.bytes.cmp(&a.1.bytes).then(a.0.cmp(&b.0)));
        v
    }

    /// Write every changed counter (one transaction).
    pub fn flush(&self) -> Result<(), UsageError> {
        let (versions, peers, fetched) = {
            let mut st = self.st();
            let f = std::mem::take(&mut st.dirty_fetched);
            let v: Vec<_> = st
                .dirty_versions
                .drain()
                .collect::<Vec<_>>()
                .into_iter()
                .filter_map(|h| st.versions.get(&h).map(|c| (h, c.clone())))
                .collect();
            let p: Vec<_> = st
                .dirty_peers
                .drain()
                .collect::<Vec<_>>()
                .into_iter()
                .filter_map(|k| st.peers.get(&k).map(|c| (k, c.clone())))
                .collect();
            (v, p, f)
        };
        if versions.is_empty() && peers.is_empty() && fetched.is_empty() {
            return Ok(());
        }
        let Some(db) = &self.db else {
            return Ok(());
        };
        let w = db.begin_write().map_err(dberr)?;
        {
            let mut t = w.open_table(VERSIONS).map_err(dberr)?;
            for (h, c) in &versions {
                let bytes = postcard::to_allocvec(c).map_err(dberr)?;
                t.insert(h.0.as_slice(), bytes.as_slice()).map_err(dberr)?;
            }
            let mut t = w.open_table(FETCHED).map_err(dberr)?;
            for (p, b) in &fetched {
                t.insert(peer_key(p, b).as_slice(), ()).map_err(dberr)?;
            }
            let mut t = w.open_table(PEERS).map_err(dberr)?;
            for ((p, b), c) in &peers {
                let bytes = postcard::to_allocvec(c).map_err(dberr)?;
                t.insert(peer_key(p, b).as_slice(), bytes.as_slice())
                    .map_err(dberr)?;
            }
        }
        w.commit().map_err(dberr)
    }

    /// Check and apply a self-report. `now_ms` decides the periods allowed
    /// (this one and the previous one); `fetched(key, block)` says whether
    /// the relay served this key that block (through its store or a peer),
    /// the only blocks a node can have run. Nothing changes on an error.
    pub fn submit_report(
        &self,
        r: &UsageReport,
        now_ms: u64,
        fetched: impl Fn(&[u8; 32], &BlockHash) -> bool,
    ) -> Result<ReportOutcome, UsageError> {
        let bad = |m: String| Err(UsageError::Report(m));
        let vk = VerifyingKey::from_bytes(&r.key)
            .map_err(|_| UsageError::Report("key is not a valid ed25519 public key".into()))?;
        if vk
            .verify(&r.signing_bytes(), &Signature::from_bytes(&r.sig))
            .is_err()
        {
            return bad("the report's signature does not verify".into());
        }
        let current = now_ms / REPORT_PERIOD_MS;
        if r.period != current && r.period + 1 != current {
            return bad(format!(
                "period {} is not the current ({current}) or the previous one",
                r.period
            ));
        }
        if r.entries.is_empty() || r.entries.len() > REPORT_MAX_ENTRIES {
            return bad(format!(
                "a report has 1..={REPORT_MAX_ENTRIES} entries, this one {}",
                r.entries.len()
            ));
        }
        // Checked before anything is written: a key the relay never served
        // costs it no write at all.
        if !r.entries.iter().any(|e| fetched(&r.key, &e.block)) {
            return bad(
                "this key was never served any of the blocks it reports (usage counts only for blocks the relay delivered to it)"
                    .into(),
            );
        }
        let mut seen_key = r.key.to_vec();
        seen_key.extend_from_slice(&r.period.to_be_bytes());
        let cap_key = seen_key.clone();
        seen_key.extend_from_slice(&r.seq.to_be_bytes());

        let w = self.db()?.begin_write().map_err(dberr)?;
        let outcome;
        let applied;
        {
            let mut seen = w.open_table(SEEN).map_err(dberr)?;
            if seen.get(seen_key.as_slice()).map_err(dberr)?.is_some() {
                return bad(format!(
                    "report {} of period {} was already counted (replay)",
                    r.seq, r.period
                ));
            }
            let mut caps = w.open_table(CAPS).map_err(dberr)?;
            let (mut calls_used, mut tokens_used, reports): (u64, u64, u64) =
                match caps.get(cap_key.as_slice()).map_err(dberr)? {
                    Some(v) => postcard::from_bytes(v.value()).map_err(dberr)?,
                    None => (0, 0, 0),
                };
            if reports >= REPORTS_PER_PERIOD {
                // Returning drops the transaction: nothing is written.
                return bad(format!(
                    "at most {REPORTS_PER_PERIOD} reports per key and period"
                ));
            }
            seen.insert(seen_key.as_slice(), ()).map_err(dberr)?;
            let mut refused = Vec::new();
            let mut apply = Vec::new();
            for e in &r.entries {
                if !fetched(&r.key, &e.block) {
                    refused.push(format!(
                        "{}: this key never fetched that block through the relay",
                        e.block.short()
                    ));
                    continue;
                }
                let calls = e.calls.min(REPORT_CALLS_CAP - calls_used);
                let tokens = e.tokens.min(REPORT_TOKENS_CAP - tokens_used);
                if calls < e.calls || tokens < e.tokens {
                    refused.push(format!(
                        "{}: over the per-key cap of {REPORT_CALLS_CAP} calls / {REPORT_TOKENS_CAP} tokens per period",
                        e.block.short()
                    ));
                }
                calls_used += calls;
                tokens_used += tokens;
                if calls > 0 || tokens > 0 {
                    apply.push((e.block, calls, tokens));
                }
            }
            let used =
                postcard::to_allocvec(&(calls_used, tokens_used, reports + 1)).map_err(dberr)?;
            caps.insert(cap_key.as_slice(), used.as_slice())
                .map_err(dberr)?;
            outcome = ReportOutcome {
                accepted_calls: apply.iter().map(|a| a.1).sum(),
                accepted_tokens: apply.iter().map(|a| a.2).sum(),
                refused,
            };
            applied = apply;
        }
        w.commit().map_err(dberr)?;
        {
            let mut st = self.st();
            for (b, c, t) in applied {
                let v = Self::version(&mut st, &b);
                v.reported_calls += c;
                v.reported_tokens += t;
            }
        }
        self.flush()?;
        Ok(outcome)
    }

    /// Pay one slot's unpaid work (see the module docs): miners of its
    /// versions and the peers that served them. Returns the new entries
    /// (none when nothing new was done). Written before it returns.
    pub fn reward(
        &self,
        slot: &str,
        versions: &[VersionInfo],
        now_ms: u64,
    ) -> Result<Vec<RewardEntry>, UsageError> {
        // Compute and mark paid under the lock, then persist; on a write
        // error the marks are rolled back.
        let mut st = self.st();
        let mut entries = Vec::new();
        let mut marks_v = Vec::new();
        let mut marks_p = Vec::new();
        for v in versions {
            let c = st.versions.get(&v.block).cloned().unwrap_or_default();
            let units = c.units().saturating_sub(c.paid_units);
            if units > 0 {
                let q = quality_pct(v.loss, v.parent_loss);
                let s = speed_pct(c.mean_latency_us());
                let amount = units * MINER_UC_PER_TOKEN * q / 100 * s / 100;
                entries.push(RewardEntry {
                    key: v.miner,
                    amount_uc: amount,
                    role: "miner".into(),
                    slot: slot.into(),
                    block: v.block,
                    reason: format!(
                        "{units} units ({} verified tokens + {} self-reported × {REPORT_WEIGHT_PCT} %, less already paid) × {MINER_UC_PER_TOKEN} µc × quality {q} % × speed {s} %",
                        c.tokens, c.reported_tokens
                    ),
                    at_ms: now_ms,
                });
                marks_v.push((v.block, c.paid_units, c.units()));
            }
            let mut peers: BTreeMap<[u8; 32], PeerCounters> = BTreeMap::new();
            for ((p, b), pc) in &st.peers {
                if *b == v.block {
                    peers.insert(*p, pc.clone());
                }
            }
            for (p, pc) in peers {
                let bytes = pc.bytes.saturating_sub(pc.paid_bytes);
                let comps = pc.computations.saturating_sub(pc.paid_computations);
                if bytes == 0 && comps == 0 {
                    continue;
                }
                let amount = bytes * PEER_UC_PER_MIB / (1 << 20) + comps * PEER_UC_PER_COMPUTE;
                entries.push(RewardEntry {
                    key: p,
                    amount_uc: amount,
                    role: "peer".into(),
                    slot: slot.into(),
                    block: v.block,
                    reason: format!(
                        "{bytes} verified bytes × {PEER_UC_PER_MIB} µc/MiB + {comps} computations × {PEER_UC_PER_COMPUTE} µc"
                    ),
                    at_ms: now_ms,
                });
                marks_p.push((
                    (p, v.block),
                    pc.paid_bytes,
                    pc.paid_computations,
                    pc.bytes,
                    pc.computations,
                ));
            }
        }
        if entries.is_empty() {
            return Ok(entries);
        }
        for (b, _, units) in &marks_v {
            Self::version(&mut st, b).paid_units = *units;
        }
        for ((p, b), _, _, bytes, comps) in &marks_p {
            let c = Self::peer(&mut st, p, b);
            c.paid_bytes = *bytes;
            c.paid_computations = *comps;
        }
        let first = st.ledger.len() as u64;
        let res = (|| {
            let w = self.db()?.begin_write().map_err(dberr)?;
            {
                let mut t = w.open_table(LEDGER).map_err(dberr)?;
                for (i, e) in entries.iter().enumerate() {
                    let bytes = postcard::to_allocvec(e).map_err(dberr)?;
                    t.insert(first + i as u64, bytes.as_slice())
                        .map_err(dberr)?;
                }
                let mut t = w.open_table(VERSIONS).map_err(dberr)?;
                for (b, _, _) in &marks_v {
                    if let Some(c) = st.versions.get(b) {
                        let bytes = postcard::to_allocvec(c).map_err(dberr)?;
                        t.insert(b.0.as_slice(), bytes.as_slice()).map_err(dberr)?;
                    }
                }
                let mut t = w.open_table(PEERS).map_err(dberr)?;
                for (k, ..) in &marks_p {
                    if let Some(c) = st.peers.get(k) {
                        let bytes = postcard::to_allocvec(c).map_err(dberr)?;
                        t.insert(peer_key(&k.0, &k.1).as_slice(), bytes.as_slice())
                            .map_err(dberr)?;
                    }
                }
            }
            w.commit().map_err(dberr)
        })();
        if let Err(e) = res {
            for (b, paid, _) in &marks_v {
                Self::version(&mut st, b).paid_units = *paid;
            }
            for ((p, b), pb, pc, ..) in &marks_p {
                let c = Self::peer(&mut st, p, b);
                c.paid_bytes = *pb;
                c.paid_computations = *pc;
            }
            return Err(e);
        }
        st.ledger.extend(entries.iter().cloned());
        Ok(entries)
    }

    /// Every reward a key earned, oldest first.
    pub fn rewards_of(&self, key: &[u8; 32]) -> Vec<RewardEntry> {
        self.st()
            .ledger
            .iter()
            .filter(|e| &e.key == key)
            .cloned()
            .collect()
    }
}

impl Drop for Usage {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            tracing::error!(error = %e, "usage flush at shutdown failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;

    fn h(b: u8) -> BlockHash {
        BlockHash([b; 32])
    }

    fn open(dir: &tempfile::TempDir) -> Usage {
        Usage::open(&dir.path().join("usage.redb")).expect("open")
    }

    #[test]
    fn counters_survive_reopen_after_flush() {
        let dir = tempfile::tempdir().expect("tmp");
        {
            let u = open(&dir);
            u.record_inference(&[(h(1), 5, 100), (h(2), 0, 0)]);
            u.record_chunk_served(&[9; 32], &h(1), 4096);
            u.record_compute(&[9; 32], &h(1));
            u.record_bad_chunk(&[8; 32], &h(1));
            u.flush().expect("flush");
        }
        let u = open(&dir);
        let c = u.version_counters(&h(1));
        assert_eq!(
            (c.calls, c.tokens, c.bytes_served, c.computations),
            (1, 5, 4096, 1)
        );
        assert_eq!(u.version_counters(&h(2)), VersionCounters::default());
        let peers = u.peers_of(&h(1));
        assert_eq!(peers.len(), 2);
        assert_eq!(peers[0].1.bytes, 4096);
        assert_eq!(peers[1].1.bad_chunks, 1);
        assert_eq!(peers[1].1.bytes, 0);
    }

    #[test]
    fn reports_are_checked_deduplicated_and_capped() {
        let dir = tempfile::tempdir().expect("tmp");
        let u = open(&dir);
        let k = SigningKey::from_bytes(&[3; 32]);
        let now = 10 * REPORT_PERIOD_MS + 5;
        let fetched = |_: &[u8; 32], b: &BlockHash| *b == h(1);
        let e = |tokens| {
            vec![ReportEntry {
                block: h(1),
                calls: 1,
                tokens,
            }]
        };

        let ok = u.submit_report(&UsageReport::sign(&k, 10, 1, e(100)), now, fetched);
        assert_eq!(ok.expect("accepted").accepted_tokens, 100);
        // Replay.
        assert!(u
            .submit_report(&UsageReport::sign(&k, 10, 1, e(100)), now, fetched)
            .is_err());
        // Forged: signature of another key / tampered entries.
        let mut forged = UsageReport::sign(&k, 10, 2, e(100));
        forged.entries[0].tokens = 10_000;
        assert!(u.submit_report(&forged, now, fetched).is_err());
        // Old period.
        assert!(u
            .submit_report(&UsageReport::sign(&k, 8, 3, e(1)), now, fetched)
            .is_err());
        // Only blocks the key never fetched: refused, nothing written.
        let never = ReportEntry {
            block: h(2),
            calls: 1,
            tokens: 50,
        };
        assert!(u
            .submit_report(
                &UsageReport::sign(&k, 10, 4, vec![never.clone()]),
                now,
                fetched
            )
            .is_err());
        // Mixed: the fetched block counts, the other is refused.
        let mixed = vec![
            never,
            ReportEntry {
                block: h(1),
                calls: 0,
                tokens: 0,
            },
        ];
        let r = u
            .submit_report(&UsageReport::sign(&k, 10, 7, mixed), now, fetched)
            .expect("ok");
        assert_eq!(r.accepted_tokens, 0);
        assert_eq!(r.refused.len(), 1);
        // Over the cap: only what is left of it counts.
        let r = u
            .submit_report(
                &UsageReport::sign(&k, 10, 5, e(REPORT_TOKENS_CAP)),
                now,
                fetched,
            )
            .expect("ok");
        assert_eq!(r.accepted_tokens, REPORT_TOKENS_CAP - 100);
        let r = u
            .submit_report(&UsageReport::sign(&k, 10, 6, e(10)), now, fetched)
            .expect("ok");
        assert_eq!(r.accepted_tokens, 0);
        assert_eq!(u.version_counters(&h(1)).reported_tokens, REPORT_TOKENS_CAP);
        assert_eq!(u.version_counters(&h(2)).reported_tokens, 0);
        // A key that reports too often is refused.
        let k2 = SigningKey::from_bytes(&[4; 32]);
        let fetched2 = |_: &[u8; 32], _: &BlockHash| true;
        for seq in 0..REPORTS_PER_PERIOD {
            u.submit_report(&UsageReport::sign(&k2, 10, seq, e(0)), now, fetched2)
                .expect("under the report cap");
        }
        assert!(u
            .submit_report(&UsageReport::sign(&k2, 10, 999, e(0)), now, fetched2)
            .is_err());
        // The replay table survives a restart.
        drop(u);
        let u = open(&dir);
        assert!(u
            .submit_report(&UsageReport::sign(&k, 10, 1, e(100)), now, fetched)
            .is_err());
    }

    #[test]
    fn rewards_pay_each_unit_once_and_survive_restart() {
        let dir = tempfile::tempdir().expect("tmp");
        let miner = [1u8; 32];
        let peer = [2u8; 32];
        let v = [VersionInfo {
            block: h(1),
            miner,
            loss: None,
            parent_loss: None,
        }];
        {
            let u = open(&dir);
            u.record_inference(&[(h(1), 10, 1000)]);
            u.record_chunk_served(&peer, &h(1), 1 << 20);
            let first = u.reward("layer0.expert1", &v, 1).expect("reward");
            assert_eq!(first.len(), 2);
            assert_eq!(first[0].amount_uc, 10 * MINER_UC_PER_TOKEN);
            assert_eq!(first[1].amount_uc, PEER_UC_PER_MIB);
            assert!(u.reward("layer0.expert1", &v, 2).expect("again").is_empty());
            u.flush().expect("flush");
        }
        let u = open(&dir);
        assert!(u
            .reward("layer0.expert1", &v, 3)
            .expect("after restart")
            .is_empty());
        assert_eq!(u.rewards_of(&miner).len(), 1);
        assert_eq!(u.rewards_of(&peer).len(), 1);
        u.record_inference(&[(h(1), 3, 1000)]);
        let next = u.reward("layer0.expert1", &v, 4).expect("reward");
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].amount_uc, 3 * MINER_UC_PER_TOKEN);
    }

    /// The README's worked example ("Usage and rewards"), computed.
    #[test]
    fn worked_example_of_the_readme() {
        let dir = tempfile::tempdir().expect("tmp");
        let u = open(&dir);
        let (operator, miner, peer, liar) = ([0x0a; 32], [0x0b; 32], [0x0c; 32], [0x0d; 32]);
        let (v1, v2) = (h(1), h(2));
        // v2 passed the quality gate: 0.04390 against the incumbent's 0.04437.
        u.record_quality(&v2, 0.04390, 0.04437);
        // 1 200 relay-verified tokens on v1 at 10 ms, 3 000 on v2 at 30 ms.
        u.record_inference(&[(v1, 1_200, 10_000), (v2, 3_000, 30_000)]);
        // 4 000 self-reported tokens on v2 (signed, within the cap).
        let node = SigningKey::from_bytes(&[7; 32]);
        let nk = node.verifying_key().to_bytes();
        u.record_fetch(&nk, &v2);
        let r = UsageReport::sign(
            &node,
            1,
            1,
            vec![ReportEntry {
                block: v2,
                calls: 40,
                tokens: 4_000,
            }],
        );
        u.submit_report(&r, REPORT_PERIOD_MS + 1, |k, b| u.fetched(k, b))
            .expect("report");
        // The peer served 3 MiB of v2, verified, and 25 computations; the
        // liar one corrupt chunk.
        for _ in 0..3 {
            u.record_chunk_served(&peer, &v2, 1 << 20);
        }
        for _ in 0..25 {
            u.record_compute(&peer, &v2);
        }
        u.record_bad_chunk(&liar, &v2);
        let c = u.version_counters(&v2);
        let versions = [
            VersionInfo {
                block: v1,
                miner: operator,
                loss: None,
                parent_loss: None,
            },
            VersionInfo {
                block: v2,
                miner,
                loss: c.verified_loss,
                parent_loss: c.incumbent_loss,
            },
        ];
        let paid = u.reward("layer2.expert5", &versions, 0).expect("reward");
        let amounts: Vec<([u8; 32], &str, u64)> = paid
            .iter()
            .map(|e| (e.key, e.role.as_str(), e.amount_uc))
            .collect();
        assert_eq!(
            amounts,
            vec![
                (operator, "miner", 1_200_000),
                (miner, "miner", 2_904_000),
                (peer, "peer", 155_000),
            ]
        );
        assert!(u.rewards_of(&liar).is_empty());
    }

    #[test]
    fn factors() {
        assert_eq!(quality_pct(None, None), 100);
        assert_eq!(quality_pct(Some(0.9), Some(1.0)), 200);
        assert_eq!(quality_pct(Some(0.99), Some(1.0)), 110);
        assert_eq!(quality_pct(Some(1.1), Some(1.0)), 100);
        assert_eq!(speed_pct(None), 100);
        assert_eq!(speed_pct(Some(TARGET_LATENCY_US)), 100);
        assert_eq!(speed_pct(Some(2 * TARGET_LATENCY_US)), 50);
        assert_eq!(speed_pct(Some(100 * TARGET_LATENCY_US)), 50);
    }
}
