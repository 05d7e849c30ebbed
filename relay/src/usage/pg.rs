//! The PostgreSQL store of [`Usage`] (`relay serve --database postgres://...`):
//! one ledger in the tables of `relay/migrations/0002_usage.sql`, shared by
//! every relay on the database.
//!
//! * **Counting** stays in memory (no I/O on the hot path). [`Usage::flush`]
//!   adds this relay's changes to the shared rows in one transaction
//!   (`INSERT ... ON CONFLICT DO UPDATE SET x = t.x + EXCLUDED.x`: relays
//!   counting at once never overwrite each other), then reads the counters
//!   back, so reads on any relay see every relay's counts within a flush
//!   interval. Only the losses of the quality gate are overwritten. A flush
//!   that fails keeps its changes and the next flush writes them again under
//!   the same batch number; `usage_writers` holds the last batch each open
//!   ledger applied, so a flush whose commit went through but whose answer
//!   was lost is not added twice.
//! * **Fetches** ([`Usage::record_fetch`]) go to `usage_fetched` with the
//!   counters; [`Usage::fetched`] asks the database for a pair this relay
//!   did not see (a node may fetch through one relay and report to another).
//! * **Reports**: one transaction: (key, period, seq) is inserted into
//!   `usage_reports_seen`, whose primary key refuses a replay whichever
//!   relay saw the report first; the key's row of `usage_report_caps` is
//!   taken with its row lock (an upsert that returns it), so the caps hold
//!   over every relay; the reported calls and tokens are added to
//!   `usage_versions`. Rows of periods no report can name any more are
//!   deleted once a period.
//! * **Rewards**: the relay flushes its own counts, then in one transaction
//!   locks the rows of the slot's versions and of their peers
//!   (`SELECT ... FOR UPDATE`), computes the reward from them with the same
//!   code as the redb store, appends `reward_ledger` and moves the `paid_*`
//!   columns. Two relays paying a slot at once: the second waits for the
//!   first's commit, then finds only what was counted since.
//! * Rows are locked in one order everywhere (a report's caps row, then
//!   versions by block, then peers by (peer, block)), so these transactions
//!   do not deadlock each other.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio_postgres::{IsolationLevel, Row, Transaction};
use web_node::chain::BlockHash;

use super::reward::RewardPlan;
use super::{
    cap_entries, plan_reward, replay, too_many_reports, PeerCounters, PeerKey, ReportOutcome,
    RewardEntry, Usage, UsageError, UsageReport, VersionCounters, VersionInfo, FLUSH_INTERVAL,
    REPORTS_PER_PERIOD, REPORT_PERIOD_MS,
};
use crate::pg::{hash32, to_i64, to_u64, Pg, PgError};

/// Columns of a `usage_versions` row, as [`version_row`] reads them.
const VERSION_COLS: &str = "block, calls, tokens, latency_us_sum, latency_samples, \
     reported_calls, reported_tokens, bytes_served, computations, paid_units, \
     verified_loss, incumbent_loss";
/// Columns of a `usage_peers` row, as [`peer_row`] reads them.
const PEER_COLS: &str =
    "peer, block, bytes, chunks, computations, bad_chunks, paid_bytes, paid_computations";

/// Marks batch `$2` of writer `$1` applied; no row back: it already was.
const MARK_BATCH: &str = "INSERT INTO usage_writers AS w (id, batch) VALUES ($1, $2)
     ON CONFLICT (id) DO UPDATE SET batch = EXCLUDED.batch, seen_at = now()
     WHERE w.batch < EXCLUDED.batch
     RETURNING w.id";

const ADD_VERSIONS: &str = "INSERT INTO usage_versions AS t
     (block, calls, tokens, latency_us_sum, latency_samples, bytes_served, computations,
      verified_loss, incumbent_loss)
     SELECT * FROM unnest($1::bytea[], $2::int8[], $3::int8[], $4::int8[], $5::int8[],
                          $6::int8[], $7::int8[], $8::float8[], $9::float8[])
     ON CONFLICT (block) DO UPDATE SET
         calls = t.calls + EXCLUDED.calls,
         tokens = t.tokens + EXCLUDED.tokens,
         latency_us_sum = t.latency_us_sum + EXCLUDED.latency_us_sum,
         latency_samples = t.latency_samples + EXCLUDED.latency_samples,
         bytes_served = t.bytes_served + EXCLUDED.bytes_served,
         computations = t.computations + EXCLUDED.computations,
         verified_loss = COALESCE(EXCLUDED.verified_loss, t.verified_loss),
         incumbent_loss = COALESCE(EXCLUDED.incumbent_loss, t.incumbent_loss)";

const ADD_PEERS: &str = "INSERT INTO usage_peers AS t
     (peer, block, bytes, chunks, computations, bad_chunks)
     SELECT * FROM unnest($1::bytea[], $2::bytea[], $3::int8[], $4::int8[], $5::int8[], $6::int8[])
     ON CONFLICT (peer, block) DO UPDATE SET
         bytes = t.bytes + EXCLUDED.bytes,
         chunks = t.chunks + EXCLUDED.chunks,
         computations = t.computations + EXCLUDED.computations,
         bad_chunks = t.bad_chunks + EXCLUDED.bad_chunks";

const ADD_FETCHED: &str = "INSERT INTO usage_fetched (peer, block)
     SELECT * FROM unnest($1::bytea[], $2::bytea[])
     ON CONFLICT DO NOTHING";

const ADD_REPORTED: &str =
    "INSERT INTO usage_versions AS t (block, reported_calls, reported_tokens)
     SELECT * FROM unnest($1::bytea[], $2::int8[], $3::int8[])
     ON CONFLICT (block) DO UPDATE SET
         reported_calls = t.reported_calls + EXCLUDED.reported_calls,
         reported_tokens = t.reported_tokens + EXCLUDED.reported_tokens";

const ADD_LEDGER: &str = "INSERT INTO reward_ledger (key, amount_uc, role, slot, block, reason, at_ms)
     SELECT k, a, r, s, b, re, t
     FROM unnest($1::bytea[], $2::int8[], $3::text[], $4::text[], $5::bytea[], $6::text[], $7::int8[])
         WITH ORDINALITY AS u(k, a, r, s, b, re, t, o)
     ORDER BY o";

/// Pairs remembered as not fetched before the oldest are forgotten.
const NOT_FETCHED_MAX: usize = 100_000;

/// Changes of one flush, numbered per writer.
#[derive(Default)]
struct Batch {
    n: i64,
    versions: BTreeMap<BlockHash, VersionCounters>,
    peers: BTreeMap<PeerKey, PeerCounters>,
    fetched: BTreeSet<PeerKey>,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.versions.is_empty() && self.peers.is_empty() && self.fetched.is_empty()
    }
}

struct Flushing {
    /// Number of the next batch.
    next: i64,
    /// A batch whose write failed: written again (same number) first.
    in_flight: Option<Batch>,
}

/// The PostgreSQL side of a [`Usage`]. See the module docs.
pub(super) struct PgLedger {
    pg: Arc<Pg>,
    /// This ledger's row of `usage_writers`.
    writer: i64,
    /// Held for a whole flush: flushes of one ledger run one at a time.
    flush: Mutex<Flushing>,
    /// The newest report period whose old rows were deleted.
    pruned: AtomicU64,
}

/// Prefix `what` to a database error.
fn ctx(what: &'static str) -> impl Fn(UsageError) -> UsageError {
    move |e| match e {
        UsageError::Db(m) => UsageError::Db(format!("{what}: {m}")),
        e => e,
    }
}

fn u64_at(r: &Row, i: usize) -> Result<u64, PgError> {
    to_u64(r.try_get::<_, i64>(i)?)
}

fn hash_at(r: &Row, i: usize) -> Result<[u8; 32], PgError> {
    hash32(r.try_get::<_, &[u8]>(i)?)
}

/// A row of [`VERSION_COLS`].
fn version_row(r: &Row) -> Result<(BlockHash, VersionCounters), PgError> {
    Ok((
        BlockHash(hash_at(r, 0)?),
        VersionCounters {
            calls: u64_at(r, 1)?,
            tokens: u64_at(r, 2)?,
            latency_us_sum: u64_at(r, 3)?,
            latency_samples: u64_at(r, 4)?,
            reported_calls: u64_at(r, 5)?,
            reported_tokens: u64_at(r, 6)?,
            bytes_served: u64_at(r, 7)?,
            computations: u64_at(r, 8)?,
            paid_units: u64_at(r, 9)?,
            verified_loss: r.try_get(10)?,
            incumbent_loss: r.try_get(11)?,
        },
    ))
}

/// A row of [`PEER_COLS`].
fn peer_row(r: &Row) -> Result<(PeerKey, PeerCounters), PgError> {
    Ok((
        (hash_at(r, 0)?, BlockHash(hash_at(r, 1)?)),
        PeerCounters {
            bytes: u64_at(r, 2)?,
            chunks: u64_at(r, 3)?,
            computations: u64_at(r, 4)?,
            bad_chunks: u64_at(r, 5)?,
            paid_bytes: u64_at(r, 6)?,
            paid_computations: u64_at(r, 7)?,
        },
    ))
}

fn ledger_row(r: &Row) -> Result<RewardEntry, PgError> {
    Ok(RewardEntry {
        key: hash_at(r, 0)?,
        amount_uc: u64_at(r, 1)?,
        role: r.try_get(2)?,
        slot: r.try_get(3)?,
        block: BlockHash(hash_at(r, 4)?),
        reason: r.try_get(5)?,
        at_ms: u64_at(r, 6)?,
    })
}

/// A u64 of a primary key as bigint: its bits (values past i64::MAX stay
/// distinct, and a report's sequence number may be any u64).
fn bits(v: u64) -> i64 {
    v as i64
}

type Counters = (
    HashMap<BlockHash, VersionCounters>,
    HashMap<PeerKey, PeerCounters>,
);

/// Every counter in the database (one snapshot).
fn load(pg: &Pg) -> Result<Counters, UsageError> {
    pg.with(|mut c| async move {
        let t = c
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        let rows = t
            .query(&format!("SELECT {VERSION_COLS} FROM usage_versions"), &[])
            .await?;
        let mut versions = HashMap::with_capacity(rows.len());
        for r in &rows {
            let (b, c) = version_row(r)?;
            versions.insert(b, c);
        }
        let rows = t
            .query(&format!("SELECT {PEER_COLS} FROM usage_peers"), &[])
            .await?;
        let mut peers = HashMap::with_capacity(rows.len());
        for r in &rows {
            let (k, c) = peer_row(r)?;
            peers.insert(k, c);
        }
        t.commit().await?;
        Ok((versions, peers))
    })
}

impl PgLedger {
    /// Register this ledger as a writer and load every counter.
    pub(super) fn open(pg: Arc<Pg>) -> Result<(Self, Counters), UsageError> {
        let writer = pg
            .with(|c| async move {
                // Writers not heard of in a month: relays long gone.
                c.execute(
                    "DELETE FROM usage_writers WHERE seen_at < now() - interval '30 days'",
                    &[],
                )
                .await?;
                let row = c
                    .query_one("INSERT INTO usage_writers DEFAULT VALUES RETURNING id", &[])
                    .await?;
                Ok::<i64, UsageError>(row.try_get(0)?)
            })
            .map_err(ctx("open"))?;
        let counters = load(&pg).map_err(ctx("open"))?;
        Ok((
            Self {
                pg,
                writer,
                flush: Mutex::new(Flushing {
                    next: 1,
                    in_flight: None,
                }),
                pruned: AtomicU64::new(0),
            },
            counters,
        ))
    }

    /// See [`Usage::flush`] and the module docs.
    pub(super) fn flush(&self, u: &Usage) -> Result<(), UsageError> {
        let mut f = self.flush.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = &f.in_flight {
            self.write(b).map_err(ctx("flush"))?;
            f.in_flight = None;
        }
        let batch = {
            let mut st = u.st();
            Batch {
                n: f.next,
                versions: std::mem::take(&mut st.dirty_versions).into_iter().collect(),
                peers: std::mem::take(&mut st.dirty_peers).into_iter().collect(),
                fetched: std::mem::take(&mut st.dirty_fetched).into_iter().collect(),
            }
        };
        if !batch.is_empty() {
            f.next += 1;
            if let Err(e) = self.write(&batch) {
                f.in_flight = Some(batch);
                return Err(ctx("flush")(e));
            }
        }
        let (versions, peers) = load(&self.pg).map_err(ctx("flush (reading counters back)"))?;
        let mut st = u.st();
        let st = &mut *st;
        st.versions = versions;
        st.peers = peers;
        // Counted since the batch was taken: not in the database yet.
        for (b, d) in &st.dirty_versions {
            st.versions.entry(*b).or_default().add(d);
        }
        for (k, d) in &st.dirty_peers {
            st.peers.entry(*k).or_default().add(d);
        }
        Ok(())
    }

    /// Add one batch to the shared rows (one transaction; nothing if this
    /// writer already applied it).
    fn write(&self, b: &Batch) -> Result<(), UsageError> {
        let (writer, n) = (self.writer, b.n);
        let mut v = (
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
        );
        for (blk, d) in &b.versions {
            v.0.push(blk.0.to_vec());
            v.1.push(to_i64(d.calls)?);
            v.2.push(to_i64(d.tokens)?);
            v.3.push(to_i64(d.latency_us_sum)?);
            v.4.push(to_i64(d.latency_samples)?);
            v.5.push(to_i64(d.bytes_served)?);
            v.6.push(to_i64(d.computations)?);
            v.7.push(d.verified_loss);
            v.8.push(d.incumbent_loss);
        }
        let mut p = (
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
        );
        for ((peer, blk), d) in &b.peers {
            p.0.push(peer.to_vec());
            p.1.push(blk.0.to_vec());
            p.2.push(to_i64(d.bytes)?);
            p.3.push(to_i64(d.chunks)?);
            p.4.push(to_i64(d.computations)?);
            p.5.push(to_i64(d.bad_chunks)?);
        }
        let (fp, fb): (Vec<Vec<u8>>, Vec<Vec<u8>>) = b
            .fetched
            .iter()
            .map(|(peer, blk)| (peer.to_vec(), blk.0.to_vec()))
            .unzip();
        let applied = self.pg.with(move |mut c| async move {
            let t = c.transaction().await?;
            if t.query_opt(MARK_BATCH, &[&writer, &n]).await?.is_none() {
                // Its commit went through, its answer did not.
                return Ok(false);
            }
            // Rows in key order (the maps are sorted): see the module docs.
            if !v.0.is_empty() {
                t.execute(
                    ADD_VERSIONS,
                    &[&v.0, &v.1, &v.2, &v.3, &v.4, &v.5, &v.6, &v.7, &v.8],
                )
                .await?;
            }
            if !p.0.is_empty() {
                t.execute(ADD_PEERS, &[&p.0, &p.1, &p.2, &p.3, &p.4, &p.5])
                    .await?;
            }
            if !fp.is_empty() {
                t.execute(ADD_FETCHED, &[&fp, &fb]).await?;
            }
            t.commit().await?;
            Ok::<bool, UsageError>(true)
        })?;
        if !applied {
            tracing::warn!(batch = n, "usage batch already applied: not added twice");
        }
        Ok(())
    }

    /// Which of `blocks` the database says were delivered to `key`.
    fn fetched_in_db(
        &self,
        key: &[u8; 32],
        blocks: &BTreeSet<BlockHash>,
    ) -> Result<HashSet<BlockHash>, UsageError> {
        let k = key.to_vec();
        let bs: Vec<Vec<u8>> = blocks.iter().map(|b| b.0.to_vec()).collect();
        self.pg
            .with(move |c| async move {
                let st = c
                    .prepare_cached(
                        "SELECT block FROM usage_fetched WHERE peer = $1 AND block = ANY($2)",
                    )
                    .await?;
                let rows = c.query(&st, &[&k, &bs]).await?;
                let mut found = HashSet::with_capacity(rows.len());
                for r in &rows {
                    found.insert(BlockHash(hash_at(r, 0)?));
                }
                Ok::<_, UsageError>(found)
            })
            .map_err(ctx("fetched"))
    }

    /// Remember the database's answer for `asked`.
    fn remember(
        u: &Usage,
        key: &[u8; 32],
        asked: &BTreeSet<BlockHash>,
        found: &HashSet<BlockHash>,
    ) {
        let mut st = u.st();
        if st.not_fetched.len() + asked.len() > NOT_FETCHED_MAX {
            st.not_fetched.retain(|_, t| t.elapsed() < FLUSH_INTERVAL);
            if st.not_fetched.len() + asked.len() > NOT_FETCHED_MAX {
                st.not_fetched.clear();
            }
        }
        let now = Instant::now();
        for b in asked {
            if found.contains(b) {
                st.not_fetched.remove(&(*key, *b));
                st.fetched.insert((*key, *b));
            } else {
                st.not_fetched.insert((*key, *b), now);
            }
        }
    }

    /// [`Usage::fetched`] for a pair not in memory.
    pub(super) fn fetched(&self, u: &Usage, key: &[u8; 32], block: &BlockHash) -> bool {
        let asked = BTreeSet::from([*block]);
        match self.fetched_in_db(key, &asked) {
            Ok(found) => {
                Self::remember(u, key, &asked, &found);
                found.contains(block)
            }
            Err(e) => {
                tracing::warn!(error = %e, "fetch check failed: counted as not fetched");
                false
            }
        }
    }

    /// Look up, in one query, the blocks of a report that memory does not
    /// know for `key`.
    pub(super) fn prefetch(
        &self,
        u: &Usage,
        key: &[u8; 32],
        blocks: impl Iterator<Item = BlockHash>,
    ) -> Result<(), UsageError> {
        let asked: BTreeSet<BlockHash> = {
            let st = u.st();
            blocks
                .filter(|b| {
                    let k = (*key, *b);
                    let known_no = st
                        .not_fetched
                        .get(&k)
                        .is_some_and(|t| t.elapsed() < FLUSH_INTERVAL);
                    !st.fetched.contains(&k) && !known_no
                })
                .collect()
        };
        if asked.is_empty() {
            return Ok(());
        }
        let found = self.fetched_in_db(key, &asked)?;
        Self::remember(u, key, &asked, &found);
        Ok(())
    }

    /// The store part of [`Usage::submit_report`] (checked, with
    /// `fetched[i]` for entry `i`). See the module docs.
    pub(super) fn submit_report(
        &self,
        u: &Usage,
        r: &UsageReport,
        fetched: &[bool],
        now_ms: u64,
    ) -> Result<ReportOutcome, UsageError> {
        self.prune(now_ms / REPORT_PERIOD_MS);
        let key = r.key.to_vec();
        let (period, seq) = (bits(r.period), bits(r.seq));
        let (report, fetched) = (r.clone(), fetched.to_vec());
        let capped = self
            .pg
            .with(move |mut c| async move {
                let t = c.transaction().await?;
                let new = t
                    .execute(
                        "INSERT INTO usage_reports_seen (key, period, seq) VALUES ($1, $2, $3)
                         ON CONFLICT DO NOTHING",
                        &[&key, &period, &seq],
                    )
                    .await?;
                if new == 0 {
                    return Err(replay(&report));
                }
                // The upsert returns the row locked: reports of this key and
                // period, on any relay, wait for this one.
                let row = t
                    .query_one(
                        "INSERT INTO usage_report_caps AS c (key, period) VALUES ($1, $2)
                         ON CONFLICT (key, period) DO UPDATE SET reports = c.reports
                         RETURNING c.calls, c.tokens, c.reports",
                        &[&key, &period],
                    )
                    .await?;
                let (calls, tokens, reports) =
                    (u64_at(&row, 0)?, u64_at(&row, 1)?, u64_at(&row, 2)?);
                if reports >= REPORTS_PER_PERIOD {
                    // Dropping the transaction rolls the seen row back.
                    return Err(too_many_reports());
                }
                let capped = cap_entries(&report, &fetched, calls, tokens);
                t.execute(
                    "UPDATE usage_report_caps SET calls = $3, tokens = $4, reports = reports + 1
                     WHERE key = $1 AND period = $2",
                    &[
                        &key,
                        &period,
                        &to_i64(capped.calls_used)?,
                        &to_i64(capped.tokens_used)?,
                    ],
                )
                .await?;
                let mut per_block: BTreeMap<BlockHash, (u64, u64)> = BTreeMap::new();
                for (b, c, t) in &capped.apply {
                    let e = per_block.entry(*b).or_default();
                    e.0 += c;
                    e.1 += t;
                }
                if !per_block.is_empty() {
                    let mut cols = (Vec::new(), Vec::new(), Vec::new());
                    for (b, (c, tk)) in &per_block {
                        cols.0.push(b.0.to_vec());
                        cols.1.push(to_i64(*c)?);
                        cols.2.push(to_i64(*tk)?);
                    }
                    t.execute(ADD_REPORTED, &[&cols.0, &cols.1, &cols.2])
                        .await?;
                }
                t.commit().await?;
                Ok(capped)
            })
            .map_err(ctx("report"))?;
        {
            // Already in the database: the view only.
            let mut st = u.st();
            for (b, c, t) in &capped.apply {
                let v = st.versions.entry(*b).or_default();
                v.reported_calls += c;
                v.reported_tokens += t;
            }
        }
        Ok(capped.outcome())
    }

    /// Delete the replay and cap rows of periods no report can name any
    /// more (older than the previous one, with one period to spare for a
    /// clock set back), once per period; best effort.
    fn prune(&self, current: u64) {
        let before = current.saturating_sub(2);
        if before == 0 || self.pruned.fetch_max(current, Ordering::Relaxed) >= current {
            return;
        }
        let before = bits(before);
        let r = self.pg.with(move |c| async move {
            let seen = c
                .execute(
                    "DELETE FROM usage_reports_seen WHERE period < $1",
                    &[&before],
                )
                .await?;
            let caps = c
                .execute(
                    "DELETE FROM usage_report_caps WHERE period < $1",
                    &[&before],
                )
                .await?;
            Ok::<_, UsageError>((seen, caps))
        });
        match r {
            Ok((seen, caps)) if seen + caps > 0 => {
                tracing::info!(seen, caps, "usage report rows of past periods deleted")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "usage report rows not pruned"),
        }
    }

    /// See [`Usage::reward`] and the module docs.
    pub(super) fn reward(
        &self,
        u: &Usage,
        slot: &str,
        versions: &[VersionInfo],
        now_ms: u64,
    ) -> Result<Vec<RewardEntry>, UsageError> {
        // This relay's counts go in first, to be paid with the others'.
        self.flush(u)?;
        let blocks: Vec<Vec<u8>> = versions
            .iter()
            .map(|v| v.block.0.to_vec())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let (slot, vs) = (slot.to_string(), versions.to_vec());
        let plan = self
            .pg
            .with(move |mut c| async move {
                let t = c.transaction().await?;
                let (counters, peers) = counters_for_update(&t, &blocks).await?;
                let plan = plan_reward(&slot, &vs, &counters, &peers, now_ms);
                if plan.entries.is_empty() {
                    return Ok(plan);
                }
                write_reward(&t, &plan).await?;
                t.commit().await?;
                Ok::<_, UsageError>(plan)
            })
            .map_err(ctx("reward"))?;
        {
            // Paid in the database: the view follows.
            let mut st = u.st();
            for (b, _, units) in &plan.versions {
                st.versions.entry(*b).or_default().paid_units = *units;
            }
            for (k, _, _, bytes, comps) in &plan.peers {
                let c = st.peers.entry(*k).or_default();
                c.paid_bytes = *bytes;
                c.paid_computations = *comps;
            }
        }
        Ok(plan.entries)
    }

    /// See [`Usage::try_rewards_of`].
    pub(super) fn rewards_of(&self, key: &[u8; 32]) -> Result<Vec<RewardEntry>, UsageError> {
        let k = key.to_vec();
        self.pg
            .with(move |c| async move {
                let rows = c
                    .query(
                        "SELECT key, amount_uc, role, slot, block, reason, at_ms
                         FROM reward_ledger WHERE key = $1 ORDER BY id",
                        &[&k],
                    )
                    .await?;
                let mut out = Vec::with_capacity(rows.len());
                for r in &rows {
                    out.push(ledger_row(r)?);
                }
                Ok::<_, UsageError>(out)
            })
            .map_err(ctx("rewards"))
    }
}

/// The counter rows of `blocks` and every peer row of them, locked (`FOR
/// UPDATE`) until the transaction ends.
async fn counters_for_update(
    t: &Transaction<'_>,
    blocks: &[Vec<u8>],
) -> Result<
    (
        HashMap<BlockHash, VersionCounters>,
        HashMap<PeerKey, PeerCounters>,
    ),
    UsageError,
> {
    let rows = t
        .query(
            &format!(
                "SELECT {VERSION_COLS} FROM usage_versions
                             WHERE block = ANY($1) ORDER BY block FOR UPDATE"
            ),
            &[&blocks],
        )
        .await?;
    let mut counters = HashMap::with_capacity(rows.len());
    for r in &rows {
        let (b, c) = version_row(r)?;
        counters.insert(b, c);
    }
    let rows = t
        .query(
            &format!(
                "SELECT {PEER_COLS} FROM usage_peers
                             WHERE block = ANY($1) ORDER BY peer, block FOR UPDATE"
            ),
            &[&blocks],
        )
        .await?;
    let mut peers = HashMap::with_capacity(rows.len());
    for r in &rows {
        let (k, c) = peer_row(r)?;
        peers.insert(k, c);
    }
    Ok((counters, peers))
}

/// Write a reward in the transaction: its ledger entries and what is now paid.
async fn write_reward(t: &Transaction<'_>, plan: &RewardPlan) -> Result<(), UsageError> {
    let mut l = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for e in &plan.entries {
        l.0.push(e.key.to_vec());
        l.1.push(to_i64(e.amount_uc)?);
        l.2.push(e.role.clone());
        l.3.push(e.slot.clone());
        l.4.push(e.block.0.to_vec());
        l.5.push(e.reason.clone());
        l.6.push(to_i64(e.at_ms)?);
    }
    t.execute(ADD_LEDGER, &[&l.0, &l.1, &l.2, &l.3, &l.4, &l.5, &l.6])
        .await?;
    if !plan.versions.is_empty() {
        let mut cols = (Vec::new(), Vec::new());
        for (b, _, units) in &plan.versions {
            cols.0.push(b.0.to_vec());
            cols.1.push(to_i64(*units)?);
        }
        t.execute(
            "UPDATE usage_versions t SET paid_units = u.p
                         FROM unnest($1::bytea[], $2::int8[]) AS u(b, p) WHERE t.block = u.b",
            &[&cols.0, &cols.1],
        )
        .await?;
    }
    if !plan.peers.is_empty() {
        let mut cols = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for ((p, b), _, _, bytes, comps) in &plan.peers {
            cols.0.push(p.to_vec());
            cols.1.push(b.0.to_vec());
            cols.2.push(to_i64(*bytes)?);
            cols.3.push(to_i64(*comps)?);
        }
        t.execute(
            "UPDATE usage_peers t SET paid_bytes = u.pb, paid_computations = u.pc
                         FROM unnest($1::bytea[], $2::bytea[], $3::int8[], $4::int8[])
                             AS u(p, b, pb, pc)
                         WHERE t.peer = u.p AND t.block = u.b",
            &[&cols.0, &cols.1, &cols.2, &cols.3],
        )
        .await?;
    }
    Ok(())
}
