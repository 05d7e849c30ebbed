//! Usage and rewards: what each expert version did, counted from work the
//! relay itself saw and verified, persisted in `data/usage.redb` or, with
//! `relay serve --database`, in PostgreSQL shared by every relay on it
//! ([`pg`]), and the rewards computed from it.
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
//! Counters are kept in memory and written by [`Usage::flush`] (the relay
//! flushes every [`FLUSH_INTERVAL`] and on shutdown); accepted reports and
//! rewards are written before they are acknowledged. The redb file writes
//! each changed counter; PostgreSQL adds the changes to the shared rows
//! (see [`pg`]).
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
//! computes it. Both stores compute it with the same code (`plan_reward`).
//!
//! Layer: foundation. May import: the foundation's base (`metrics`, `pg`, `auth`, `limits`, `gate`, `compute`, `genesis`).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ed25519_dalek::{Signature, Verifier as _, VerifyingKey};
use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use web_node::chain::BlockHash;

use crate::pg::PgError;

pub mod pg;

mod reward;

use reward::plan_reward;
pub use reward::{
    quality_pct, speed_pct, VersionInfo, MINER_UC_PER_TOKEN, PEER_UC_PER_COMPUTE, PEER_UC_PER_MIB,
    REPORT_WEIGHT_PCT, TARGET_LATENCY_US,
};

/// Tokens one key may self-report per period, over all blocks.
pub const REPORT_TOKENS_CAP: u64 = 20_000;
/// Calls one key may self-report per period, over all blocks.
pub const REPORT_CALLS_CAP: u64 = 2_000;
/// Reports one key may send per period (each one is a database write).
pub const REPORTS_PER_PERIOD: u64 = 120;
/// Bytes a peer served directly (credited from receipts) count this
/// percentage of bytes the relay checked and forwarded itself.
pub const DIRECT_WEIGHT_PCT: u64 = 50;
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
    crate::metrics::db_error(crate::metrics::Db::Redb, crate::metrics::DbPart::Usage);
    UsageError::Db(e.to_string())
}

impl From<PgError> for UsageError {
    fn from(e: PgError) -> Self {
        crate::metrics::db_error(crate::metrics::Db::Postgres, crate::metrics::DbPart::Usage);
        Self::Db(e.to_string())
    }
}

impl From<tokio_postgres::Error> for UsageError {
    fn from(e: tokio_postgres::Error) -> Self {
        PgError::from(e).into()
    }
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

    /// Add the counts of `d` (changes not yet in the database) and take its
    /// losses if it has some.
    fn add(&mut self, d: &VersionCounters) {
        self.calls += d.calls;
        self.tokens += d.tokens;
        self.latency_us_sum += d.latency_us_sum;
        self.latency_samples += d.latency_samples;
        self.reported_calls += d.reported_calls;
        self.reported_tokens += d.reported_tokens;
        self.bytes_served += d.bytes_served;
        self.computations += d.computations;
        self.paid_units += d.paid_units;
        if d.verified_loss.is_some() {
            self.verified_loss = d.verified_loss;
        }
        if d.incumbent_loss.is_some() {
            self.incumbent_loss = d.incumbent_loss;
        }
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

impl PeerCounters {
    /// Add the counts of `d` (changes not yet in the database).
    fn add(&mut self, d: &PeerCounters) {
        self.bytes += d.bytes;
        self.chunks += d.chunks;
        self.computations += d.computations;
        self.bad_chunks += d.bad_chunks;
        self.paid_bytes += d.paid_bytes;
        self.paid_computations += d.paid_computations;
    }
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

/// (peer key, block).
type PeerKey = ([u8; 32], BlockHash);

#[derive(Default)]
struct State {
    /// What reads see: the stored counters plus what was counted since.
    versions: HashMap<BlockHash, VersionCounters>,
    peers: HashMap<PeerKey, PeerCounters>,
    /// Counted since the last flush, per counter: the redb file gets the
    /// counter's whole value (from `versions` / `peers`), PostgreSQL gets
    /// these changes added to its rows.
    dirty_versions: HashMap<BlockHash, VersionCounters>,
    dirty_peers: HashMap<PeerKey, PeerCounters>,
    /// Every reward paid (redb; PostgreSQL reads its ledger table).
    ledger: Vec<RewardEntry>,
    /// (key, block): the relay served this key chunks of this block.
    fetched: HashSet<PeerKey>,
    dirty_fetched: Vec<PeerKey>,
    /// PostgreSQL: pairs the database said were never fetched, and when
    /// (asked again after [`FLUSH_INTERVAL`]: another relay may record it).
    not_fetched: HashMap<PeerKey, Instant>,
}

/// Where the counters persist.
enum Backend {
    /// [`Usage::open_or_memory`]'s fallback: counts, refuses reports and rewards.
    Memory,
    Redb(Database),
    Pg(pg::PgLedger),
}

/// The usage store. Cheap to share (`Arc<Usage>`); every method is sync and
/// short (no I/O but [`flush`](Usage::flush), reports, rewards and, on
/// PostgreSQL, [`fetched`](Usage::fetched) and [`rewards_of`](Usage::rewards_of)).
pub struct Usage {
    backend: Backend,
    state: Mutex<State>,
}

impl std::fmt::Debug for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let backend = match &self.backend {
            Backend::Memory => "memory",
            Backend::Redb(_) => "redb",
            Backend::Pg(_) => "postgres",
        };
        f.debug_struct("Usage")
            .field("backend", &backend)
            .finish_non_exhaustive()
    }
}

fn peer_key(peer: &[u8; 32], block: &BlockHash) -> [u8; 64] {
    let mut k = [0u8; 64];
    k[..32].copy_from_slice(peer);
    k[32..].copy_from_slice(&block.0);
    k
}

/// The inverse of [`peer_key`] (None for a key of another length).
fn split_peer_key(k: &[u8]) -> Option<PeerKey> {
    let (p, b) = (k.get(..32)?, k.get(32..)?);
    Some((p.try_into().ok()?, BlockHash(b.try_into().ok()?)))
}

/// Count on `block`: the view and the changes to flush alike.
fn count_version(st: &mut State, block: &BlockHash, f: impl Fn(&mut VersionCounters)) {
    f(st.versions.entry(*block).or_default());
    f(st.dirty_versions.entry(*block).or_default());
}

/// Count on (`peer`, `block`): the view and the changes to flush alike.
fn count_peer(st: &mut State, peer: &[u8; 32], block: &BlockHash, f: impl Fn(&mut PeerCounters)) {
    f(st.peers.entry((*peer, *block)).or_default());
    f(st.dirty_peers.entry((*peer, *block)).or_default());
}

const NEVER_SERVED: &str = "this key was never served any of the blocks it reports (usage counts only for blocks the relay delivered to it)";

fn replay(r: &UsageReport) -> UsageError {
    UsageError::Report(format!(
        "report {} of period {} was already counted (replay)",
        r.seq, r.period
    ))
}

fn too_many_reports() -> UsageError {
    UsageError::Report(format!(
        "at most {REPORTS_PER_PERIOD} reports per key and period"
    ))
}

/// The checks of a report that need no store: key, signature, period,
/// number of entries.
fn check_report(r: &UsageReport, now_ms: u64) -> Result<(), UsageError> {
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
    Ok(())
}

/// What of a report counts, given what its key already reported in the period.
struct Capped {
    /// (block, calls, tokens) to add, in the report's order.
    apply: Vec<(BlockHash, u64, u64)>,
    refused: Vec<String>,
    /// The key's use of the period with this report.
    calls_used: u64,
    tokens_used: u64,
}

impl Capped {
    fn outcome(&self) -> ReportOutcome {
        ReportOutcome {
            accepted_calls: self.apply.iter().map(|a| a.1).sum(),
            accepted_tokens: self.apply.iter().map(|a| a.2).sum(),
            refused: self.refused.clone(),
        }
    }
}

/// Apply the per-key caps to a report's entries (`fetched[i]`: was entry
/// `i`'s block delivered to the key?).
fn cap_entries(r: &UsageReport, fetched: &[bool], calls_used: u64, tokens_used: u64) -> Capped {
    let mut c = Capped {
        apply: Vec::new(),
        refused: Vec::new(),
        calls_used,
        tokens_used,
    };
    for (e, ok) in r.entries.iter().zip(fetched) {
        if !ok {
            c.refused.push(format!(
                "{}: this key never fetched that block through the relay",
                e.block.short()
            ));
            continue;
        }
        let calls = e.calls.min(REPORT_CALLS_CAP.saturating_sub(c.calls_used));
        let tokens = e
            .tokens
            .min(REPORT_TOKENS_CAP.saturating_sub(c.tokens_used));
        if calls < e.calls || tokens < e.tokens {
            c.refused.push(format!(
                "{}: over the per-key cap of {REPORT_CALLS_CAP} calls / {REPORT_TOKENS_CAP} tokens per period",
                e.block.short()
            ));
        }
        c.calls_used += calls;
        c.tokens_used += tokens;
        if calls > 0 || tokens > 0 {
            c.apply.push((e.block, calls, tokens));
        }
    }
    c
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
            backend: Backend::Redb(db),
            state: Mutex::new(st),
        })
    }

    /// The usage ledger in PostgreSQL (a migrated database, [`crate::pg::Pg::connect`]),
    /// shared by every relay on it: loads the counters. See [`pg`].
    pub fn open_pg(pg: Arc<crate::pg::Pg>) -> Result<Self, UsageError> {
        let (ledger, (versions, peers)) = pg::PgLedger::open(pg)?;
        Ok(Self {
            backend: Backend::Pg(ledger),
            state: Mutex::new(State {
                versions,
                peers,
                ..State::default()
            }),
        })
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
                    backend: Backend::Memory,
                    state: Mutex::new(State::default()),
                }
            }
        }
    }

    /// Is a database behind it (the redb file or PostgreSQL, not
    /// [`Usage::open_or_memory`]'s fallback)?
    pub fn is_persistent(&self) -> bool {
        !matches!(self.backend, Backend::Memory)
    }

    fn redb(&self) -> Result<&Database, UsageError> {
        match &self.backend {
            Backend::Redb(db) => Ok(db),
            _ => Err(UsageError::Db("the usage database is not open".into())),
        }
    }

    fn st(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain counters; keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The view's counters of `block`, marked to be written (redb).
    fn version<'a>(st: &'a mut State, block: &BlockHash) -> &'a mut VersionCounters {
        st.dirty_versions.entry(*block).or_default();
        st.versions.entry(*block).or_default()
    }

    /// The view's counters of (`peer`, `block`), marked to be written (redb).
    fn peer<'a>(st: &'a mut State, peer: &[u8; 32], block: &BlockHash) -> &'a mut PeerCounters {
        st.dirty_peers.entry((*peer, *block)).or_default();
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
            count_version(&mut st, block, |v| {
                v.calls += 1;
                v.tokens += tokens;
                v.latency_us_sum += latency_us;
                v.latency_samples += 1;
            });
        }
    }

    /// The quality gate accepted `block` with these losses.
    pub fn record_quality(&self, block: &BlockHash, loss: f64, incumbent: f64) {
        let mut st = self.st();
        count_version(&mut st, block, |v| {
            v.verified_loss = Some(loss);
            v.incumbent_loss = Some(incumbent);
        });
    }

    /// A verified chunk of `block` that `peer` served, forwarded by the relay.
    pub fn record_chunk_served(&self, peer: &[u8; 32], block: &BlockHash, bytes: u64) {
        let mut st = self.st();
        count_peer(&mut st, peer, block, |p| {
            p.bytes += bytes;
            p.chunks += 1;
        });
        count_version(&mut st, block, |v| v.bytes_served += bytes);
    }

    /// `peer` served `bytes` of `block` directly to another peer, as that
    /// peer's accepted receipt says: counted at [`DIRECT_WEIGHT_PCT`] % of
    /// bytes the relay checked itself (the relay saw a signature, not the
    /// bytes).
    pub fn record_direct_served(&self, peer: &[u8; 32], block: &BlockHash, bytes: u64) {
        let weighted = bytes * DIRECT_WEIGHT_PCT / 100;
        let mut st = self.st();
        count_peer(&mut st, peer, block, |p| {
            p.bytes += weighted;
            p.chunks += 1;
        });
        count_version(&mut st, block, |v| v.bytes_served += weighted);
    }

    /// The relay delivered a chunk of `block` to `peer` (from its store or
    /// another peer): that peer may report inference with it.
    pub fn record_fetch(&self, peer: &[u8; 32], block: &BlockHash) {
        let mut st = self.st();
        if st.fetched.insert((*peer, *block)) {
            st.dirty_fetched.push((*peer, *block));
        }
    }

    /// Did the relay ever deliver `block` to `peer`? On PostgreSQL, a pair
    /// this relay did not see is looked up in the shared ledger (another
    /// relay may have delivered it); a database error answers false.
    pub fn fetched(&self, peer: &[u8; 32], block: &BlockHash) -> bool {
        let k = (*peer, *block);
        {
            let st = self.st();
            if st.fetched.contains(&k) {
                return true;
            }
            if st
                .not_fetched
                .get(&k)
                .is_some_and(|t| t.elapsed() < FLUSH_INTERVAL)
            {
                return false;
            }
        }
        match &self.backend {
            Backend::Pg(l) => l.fetched(self, peer, block),
            _ => false,
        }
    }

    /// A corrupt chunk the relay caught: recorded, earns nothing.
    pub fn record_bad_chunk(&self, peer: &[u8; 32], block: &BlockHash) {
        let mut st = self.st();
        count_peer(&mut st, peer, block, |p| p.bad_chunks += 1);
    }

    /// An expert computation `peer` answered in time.
    pub fn record_compute(&self, peer: &[u8; 32], block: &BlockHash) {
        let mut st = self.st();
        count_peer(&mut st, peer, block, |p| p.computations += 1);
        count_version(&mut st, block, |v| v.computations += 1);
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

    /// Write every changed counter (one transaction). On PostgreSQL the
    /// changes are added to the shared rows and the counters read back, so
    /// this relay's reads see every relay's counts; changes that could not
    /// be written are kept for the next flush.
    pub fn flush(&self) -> Result<(), UsageError> {
        match &self.backend {
            Backend::Pg(l) => l.flush(self),
            Backend::Redb(db) => self.flush_redb(Some(db)),
            Backend::Memory => self.flush_redb(None),
        }
    }

    fn flush_redb(&self, db: Option<&Database>) -> Result<(), UsageError> {
        let (versions, peers, fetched) = {
            let mut st = self.st();
            let f = std::mem::take(&mut st.dirty_fetched);
            let v: Vec<_> = std::mem::take(&mut st.dirty_versions)
                .into_keys()
                .filter_map(|h| st.versions.get(&h).map(|c| (h, c.clone())))
                .collect();
            let p: Vec<_> = std::mem::take(&mut st.dirty_peers)
                .into_keys()
                .filter_map(|k| st.peers.get(&k).map(|c| (k, c.clone())))
                .collect();
            (v, p, f)
        };
        if versions.is_empty() && peers.is_empty() && fetched.is_empty() {
            return Ok(());
        }
        let Some(db) = db else {
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
        check_report(r, now_ms)?;
        if let Backend::Pg(l) = &self.backend {
            // One query for all the report's blocks, so that `fetched`
            // (usually `Usage::fetched`) answers from memory.
            l.prefetch(self, &r.key, r.entries.iter().map(|e| e.block))?;
        }
        let ok: Vec<bool> = r
            .entries
            .iter()
            .map(|e| fetched(&r.key, &e.block))
            .collect();
        // Checked before anything is written: a key the relay never served
        // costs it no write at all.
        if !ok.contains(&true) {
            return Err(UsageError::Report(NEVER_SERVED.into()));
        }
        match &self.backend {
            Backend::Pg(l) => l.submit_report(self, r, &ok, now_ms),
            _ => self.submit_report_redb(r, &ok),
        }
    }

    fn submit_report_redb(
        &self,
        r: &UsageReport,
        ok: &[bool],
    ) -> Result<ReportOutcome, UsageError> {
        let mut seen_key = r.key.to_vec();
        seen_key.extend_from_slice(&r.period.to_be_bytes());
        let cap_key = seen_key.clone();
        seen_key.extend_from_slice(&r.seq.to_be_bytes());

        let w = self.redb()?.begin_write().map_err(dberr)?;
        let capped;
        {
            let mut seen = w.open_table(SEEN).map_err(dberr)?;
            if seen.get(seen_key.as_slice()).map_err(dberr)?.is_some() {
                return Err(replay(r));
            }
            let mut caps = w.open_table(CAPS).map_err(dberr)?;
            let (calls_used, tokens_used, reports): (u64, u64, u64) =
                match caps.get(cap_key.as_slice()).map_err(dberr)? {
                    Some(v) => postcard::from_bytes(v.value()).map_err(dberr)?,
                    None => (0, 0, 0),
                };
            if reports >= REPORTS_PER_PERIOD {
                // Returning drops the transaction: nothing is written.
                return Err(too_many_reports());
            }
            seen.insert(seen_key.as_slice(), ()).map_err(dberr)?;
            capped = cap_entries(r, ok, calls_used, tokens_used);
            let used = postcard::to_allocvec(&(capped.calls_used, capped.tokens_used, reports + 1))
                .map_err(dberr)?;
            caps.insert(cap_key.as_slice(), used.as_slice())
                .map_err(dberr)?;
        }
        w.commit().map_err(dberr)?;
        {
            let mut st = self.st();
            for (b, c, t) in &capped.apply {
                let v = Self::version(&mut st, b);
                v.reported_calls += c;
                v.reported_tokens += t;
            }
        }
        self.flush()?;
        Ok(capped.outcome())
    }

    /// Pay one slot's unpaid work (see the module docs): miners of its
    /// versions and the peers that served them. Returns the new entries
    /// (none when nothing new was done). Written before it returns; on
    /// PostgreSQL each unit is paid once over every relay of the database.
    pub fn reward(
        &self,
        slot: &str,
        versions: &[VersionInfo],
        now_ms: u64,
    ) -> Result<Vec<RewardEntry>, UsageError> {
        if let Backend::Pg(l) = &self.backend {
            return l.reward(self, slot, versions, now_ms);
        }
        // Compute and mark paid under the lock, then persist; on a write
        // error the marks are rolled back.
        let mut st = self.st();
        let plan = plan_reward(slot, versions, &st.versions, &st.peers, now_ms);
        if plan.entries.is_empty() {
            return Ok(plan.entries);
        }
        for (b, _, units) in &plan.versions {
            Self::version(&mut st, b).paid_units = *units;
        }
        for ((p, b), _, _, bytes, comps) in &plan.peers {
            let c = Self::peer(&mut st, p, b);
            c.paid_bytes = *bytes;
            c.paid_computations = *comps;
        }
        let first = st.ledger.len() as u64;
        let res = (|| {
            let w = self.redb()?.begin_write().map_err(dberr)?;
            {
                let mut t = w.open_table(LEDGER).map_err(dberr)?;
                for (i, e) in plan.entries.iter().enumerate() {
                    let bytes = postcard::to_allocvec(e).map_err(dberr)?;
                    t.insert(first + i as u64, bytes.as_slice())
                        .map_err(dberr)?;
                }
                let mut t = w.open_table(VERSIONS).map_err(dberr)?;
                for (b, _, _) in &plan.versions {
                    if let Some(c) = st.versions.get(b) {
                        let bytes = postcard::to_allocvec(c).map_err(dberr)?;
                        t.insert(b.0.as_slice(), bytes.as_slice()).map_err(dberr)?;
                    }
                }
                let mut t = w.open_table(PEERS).map_err(dberr)?;
                for (k, ..) in &plan.peers {
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
            for (b, paid, _) in &plan.versions {
                Self::version(&mut st, b).paid_units = *paid;
            }
            for ((p, b), pb, pc, ..) in &plan.peers {
                let c = Self::peer(&mut st, p, b);
                c.paid_bytes = *pb;
                c.paid_computations = *pc;
            }
            return Err(e);
        }
        st.ledger.extend(plan.entries.iter().cloned());
        Ok(plan.entries)
    }

    /// Every reward a key earned, oldest first (empty, and logged, when the
    /// database cannot be read: see [`Usage::try_rewards_of`]).
    pub fn rewards_of(&self, key: &[u8; 32]) -> Vec<RewardEntry> {
        self.try_rewards_of(key).unwrap_or_else(|e| {
            tracing::error!(key = %hex::encode(key), error = %e, "rewards not read");
            Vec::new()
        })
    }

    /// Every reward a key earned, oldest first, or why they could not be
    /// read (PostgreSQL: from the shared ledger, whichever relay paid them).
    pub fn try_rewards_of(&self, key: &[u8; 32]) -> Result<Vec<RewardEntry>, UsageError> {
        if let Backend::Pg(l) = &self.backend {
            return l.rewards_of(key);
        }
        Ok(self
            .st()
            .ledger
            .iter()
            .filter(|e| &e.key == key)
            .cloned()
            .collect())
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

    #[test]
    fn memory_fallback_counts_and_refuses_reports_and_rewards() {
        let dir = tempfile::tempdir().expect("tmp");
        // A directory is not a database file.
        let u = Usage::open_or_memory(dir.path());
        assert!(!u.is_persistent());
        u.record_inference(&[(BlockHash([1; 32]), 5, 100)]);
        u.flush().expect("nothing to write to");
        assert_eq!(u.version_counters(&BlockHash([1; 32])).tokens, 5);
        let v = [VersionInfo {
            block: BlockHash([1; 32]),
            miner: [1; 32],
            loss: None,
            parent_loss: None,
        }];
        assert!(matches!(u.reward("s", &v, 0), Err(UsageError::Db(_))));
        // The failed reward marked nothing paid.
        assert_eq!(u.version_counters(&BlockHash([1; 32])).paid_units, 0);
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
