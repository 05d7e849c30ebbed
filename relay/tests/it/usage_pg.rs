//! The usage ledger on PostgreSQL (`relay serve --database`): the store's
//! behaviour tests (the same suites as `usage` runs on redb), several relays
//! on one database, and a database that fails or goes away.
//!
//! The tests share one throwaway server ([`TestPg::shared`]) and each gets a
//! database of its own.
//! Without PostgreSQL installed they print SKIPPED and pass, unless
//! `AIBLOCK_REQUIRE_PG=1`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::sync::{Arc, Barrier};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use relay::pg::Pg;
use relay::usage::{
    ReportEntry, Usage, UsageError, UsageReport, VersionInfo, FLUSH_INTERVAL, MINER_UC_PER_TOKEN,
    PEER_UC_PER_COMPUTE, PEER_UC_PER_MIB, REPORTS_PER_PERIOD, REPORT_PERIOD_MS, REPORT_TOKENS_CAP,
};
use test_support::pg::TestPg;
use test_support::usage_conformance as conformance;
use web_node::chain::BlockHash;

/// A fresh database on the test process's server.
fn fresh_db() -> Option<(&'static TestPg, String)> {
    let s = TestPg::shared()?;
    let url = s.create_db();
    Some((s, url))
}

/// One relay's ledger on `url` (its own connection pool, as a relay process has).
fn relay(url: &str) -> Usage {
    Usage::open_pg(Pg::connect(url).expect("connect")).expect("open usage")
}

fn h(b: u8) -> BlockHash {
    BlockHash([b; 32])
}

/// One SQL value of type bigint.
fn sql_i64(url: &str, sql: &'static str) -> i64 {
    Pg::connect(url)
        .expect("connect")
        .with(move |c| async move {
            let r = c.query_one(sql, &[]).await?;
            Ok::<i64, relay::pg::PgError>(r.get(0))
        })
        .expect("query")
}

fn sql_exec(url: &str, sql: &'static str) {
    Pg::connect(url)
        .expect("connect")
        .with(move |c| async move {
            c.batch_execute(sql).await?;
            Ok::<(), relay::pg::PgError>(())
        })
        .expect("execute");
}

fn report(
    key: &SigningKey,
    period: u64,
    seq: u64,
    block: BlockHash,
    calls: u64,
    tokens: u64,
) -> UsageReport {
    UsageReport::sign(
        key,
        period,
        seq,
        vec![ReportEntry {
            block,
            calls,
            tokens,
        }],
    )
}

// ---- The redb behaviour tests, on PostgreSQL (a restart: a new pool and ledger).

macro_rules! conformance_test {
    ($name:ident) => {
        #[test]
        fn $name() {
            let Some((_s, url)) = fresh_db() else { return };
            conformance::$name(&|| relay(&url));
        }
    };
}

conformance_test!(counters_survive_reopen_after_flush);
conformance_test!(reports_are_checked_deduplicated_and_capped);
conformance_test!(rewards_pay_each_unit_once_and_survive_restart);
conformance_test!(worked_example_of_the_readme);

// ---- Several relays on one database.

#[test]
fn counts_of_two_relays_add_up() {
    let Some((_s, url)) = fresh_db() else { return };
    let (a, b) = (relay(&url), relay(&url));
    let peer = [9u8; 32];
    a.record_inference(&[(h(1), 5, 100)]);
    b.record_inference(&[(h(1), 7, 300), (h(2), 1, 10)]);
    a.record_chunk_served(&peer, &h(1), 1000);
    b.record_chunk_served(&peer, &h(1), 24);
    b.record_compute(&peer, &h(1));
    a.record_bad_chunk(&[8; 32], &h(1));
    b.record_quality(&h(2), 0.5, 0.6);
    // Each relay reads its own counts before any flush.
    assert_eq!(a.version_counters(&h(1)).tokens, 5);
    assert_eq!(b.version_counters(&h(1)).tokens, 7);
    a.flush().expect("flush a");
    b.flush().expect("flush b");
    // Counted on a after its flush: not in the database yet, seen by a.
    a.record_inference(&[(h(1), 100, 100)]);
    a.flush().expect("flush a again");
    b.flush().expect("flush b again");
    for u in [&a, &b, &relay(&url)] {
        let c = u.version_counters(&h(1));
        assert_eq!(
            (c.calls, c.tokens, c.latency_us_sum, c.latency_samples),
            (3, 112, 500, 3)
        );
        assert_eq!((c.bytes_served, c.computations), (1024, 1));
        let c2 = u.version_counters(&h(2));
        assert_eq!(
            (c2.tokens, c2.verified_loss, c2.incumbent_loss),
            (1, Some(0.5), Some(0.6))
        );
        let peers = u.peers_of(&h(1));
        assert_eq!(peers.len(), 2);
        assert_eq!(
            (
                peers[0].0,
                peers[0].1.bytes,
                peers[0].1.chunks,
                peers[0].1.computations
            ),
            (peer, 1024, 2, 1)
        );
        assert_eq!(peers[1].1.bad_chunks, 1);
    }
    // A later quality verdict overwrites (not adds).
    a.record_quality(&h(2), 0.4, 0.5);
    a.flush().expect("flush");
    b.flush().expect("flush");
    assert_eq!(b.version_counters(&h(2)).verified_loss, Some(0.4));
}

#[test]
fn a_report_sent_to_two_relays_counts_once() {
    let Some((_s, url)) = fresh_db() else { return };
    let relays = [Arc::new(relay(&url)), Arc::new(relay(&url))];
    let k = SigningKey::from_bytes(&[3; 32]);
    let now = 10 * REPORT_PERIOD_MS + 5;
    let rounds = 20u64;
    for seq in 0..rounds {
        let r = report(&k, 10, seq, h(1), 1, 10);
        let barrier = Arc::new(Barrier::new(2));
        let outs: Vec<_> = relays
            .iter()
            .map(|u| {
                let (u, r, barrier) = (u.clone(), r.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    u.submit_report(&r, now, |_, _| true)
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().expect("thread"))
            .collect();
        let ok: Vec<_> = outs.iter().filter_map(|o| o.as_ref().ok()).collect();
        assert_eq!(ok.len(), 1, "round {seq}: {outs:?}");
        assert_eq!(ok[0].accepted_tokens, 10);
        let refused = outs
            .iter()
            .find_map(|o| o.as_ref().err())
            .expect("one refused");
        assert!(
            matches!(refused, UsageError::Report(m) if m.contains("replay")),
            "{refused}"
        );
    }
    for u in &relays {
        u.flush().expect("flush");
        assert_eq!(u.version_counters(&h(1)).reported_tokens, 10 * rounds);
        assert_eq!(u.version_counters(&h(1)).reported_calls, rounds);
    }
}

#[test]
fn report_caps_hold_across_relays() {
    let Some((_s, url)) = fresh_db() else { return };
    let relays = [Arc::new(relay(&url)), Arc::new(relay(&url))];
    let now = 10 * REPORT_PERIOD_MS + 5;
    // Tokens: 4 threads, 2 per relay, 10 reports of 1 000 tokens each,
    // twice the cap in all.
    let k = Arc::new(SigningKey::from_bytes(&[3; 32]));
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let (u, k) = (relays[(t % 2) as usize].clone(), k.clone());
            std::thread::spawn(move || {
                (0..10u64)
                    .map(|i| {
                        u.submit_report(
                            &report(&k, 10, t * 100 + i, h(1), 1, 1_000),
                            now,
                            |_, _| true,
                        )
                        .expect("under the report cap")
                        .accepted_tokens
                    })
                    .sum::<u64>()
            })
        })
        .collect();
    let accepted: u64 = threads.into_iter().map(|t| t.join().expect("thread")).sum();
    assert_eq!(accepted, REPORT_TOKENS_CAP);
    // Reports per period: one key sends more than allowed to both relays.
    let k2 = Arc::new(SigningKey::from_bytes(&[4; 32]));
    let threads: Vec<_> = (0..2u64)
        .map(|t| {
            let (u, k2) = (relays[t as usize].clone(), k2.clone());
            std::thread::spawn(move || {
                (0..REPORTS_PER_PERIOD)
                    .filter(|i| {
                        u.submit_report(&report(&k2, 10, t * 1000 + i, h(2), 0, 0), now, |_, _| {
                            true
                        })
                        .is_ok()
                    })
                    .count() as u64
            })
        })
        .collect();
    let ok: u64 = threads.into_iter().map(|t| t.join().expect("thread")).sum();
    assert_eq!(ok, REPORTS_PER_PERIOD);
    for u in &relays {
        u.flush().expect("flush");
        assert_eq!(u.version_counters(&h(1)).reported_tokens, REPORT_TOKENS_CAP);
    }
}

#[test]
fn concurrent_rewards_on_two_relays_pay_each_unit_once() {
    let Some((_s, url)) = fresh_db() else { return };
    let relays = [Arc::new(relay(&url)), Arc::new(relay(&url))];
    let (miner, peer) = ([1u8; 32], [2u8; 32]);
    let versions = Arc::new(vec![
        VersionInfo {
            block: h(1),
            miner,
            loss: None,
            parent_loss: None,
        },
        VersionInfo {
            block: h(2),
            miner,
            loss: None,
            parent_loss: None,
        },
    ]);
    // Speed and quality 100 %, whole MiB: each round's pay is linear in
    // its counts, whichever relay pays which part.
    let per_round = 12 * MINER_UC_PER_TOKEN + 3 * PEER_UC_PER_MIB + PEER_UC_PER_COMPUTE;
    let rounds = 10u64;
    let mut paid_total = 0;
    for round in 0..rounds {
        relays[0].record_inference(&[(h(1), 7, 1_000)]);
        relays[1].record_inference(&[(h(1), 3, 1_000), (h(2), 2, 1_000)]);
        relays[0].record_chunk_served(&peer, &h(1), 1 << 20);
        relays[1].record_chunk_served(&peer, &h(2), 2 << 20);
        relays[1].record_compute(&peer, &h(2));
        // Two threads per relay, all at once.
        let barrier = Arc::new(Barrier::new(4));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let (u, vs, barrier) = (relays[t % 2].clone(), versions.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    u.reward("layer0.expert1", &vs, round).expect("reward")
                })
            })
            .collect();
        let paid: u64 = threads
            .into_iter()
            .flat_map(|t| t.join().expect("thread"))
            .map(|e| e.amount_uc)
            .sum();
        assert_eq!(paid, per_round, "round {round}");
        paid_total += paid;
    }
    assert_eq!(paid_total, rounds * per_round);
    let ledger = sql_i64(&url, "SELECT sum(amount_uc)::bigint FROM reward_ledger");
    assert_eq!(ledger as u64, rounds * per_round);
    // Both relays read the same ledger.
    for u in &relays {
        let sum: u64 = [miner, peer]
            .iter()
            .flat_map(|k| u.rewards_of(k))
            .map(|e| e.amount_uc)
            .sum();
        assert_eq!(sum, rounds * per_round);
        u.flush().expect("flush");
        assert_eq!(u.version_counters(&h(1)).paid_units, 10 * rounds);
        assert_eq!(u.version_counters(&h(2)).paid_units, 2 * rounds);
        assert_eq!(u.peers_of(&h(2))[0].1.paid_bytes, (2 << 20) * rounds);
        assert!(u
            .reward("layer0.expert1", &versions, 99)
            .expect("reward")
            .is_empty());
    }
}

#[test]
fn a_fetch_through_one_relay_allows_a_report_to_another() {
    let Some((_s, url)) = fresh_db() else { return };
    let (a, b) = (relay(&url), relay(&url));
    let node = SigningKey::from_bytes(&[7; 32]);
    let nk = node.verifying_key().to_bytes();
    let now = 10 * REPORT_PERIOD_MS + 5;
    a.record_fetch(&nk, &h(1));
    // Not flushed yet: b has no trace of it.
    let r = b.submit_report(&report(&node, 10, 1, h(1), 1, 50), now, |k, x| {
        b.fetched(k, x)
    });
    assert!(matches!(r, Err(UsageError::Report(_))), "{r:?}");
    a.flush().expect("flush");
    // b remembers a "no" for at most a flush interval.
    std::thread::sleep(FLUSH_INTERVAL + Duration::from_millis(100));
    let r = b
        .submit_report(&report(&node, 10, 2, h(1), 1, 50), now, |k, x| {
            b.fetched(k, x)
        })
        .expect("accepted on b");
    assert_eq!(r.accepted_tokens, 50);
    assert!(b.fetched(&nk, &h(1)));
    assert!(!b.fetched(&nk, &h(2)));
    // And a third relay started later.
    assert!(relay(&url).fetched(&nk, &h(1)));
}

// ---- Failures.

#[test]
fn a_failed_flush_keeps_its_counts_and_writes_nothing_half() {
    let Some((_s, url)) = fresh_db() else { return };
    let u = relay(&url);
    let peer = [9u8; 32];
    u.record_inference(&[(h(1), 5, 100)]);
    u.record_chunk_served(&peer, &h(1), 1000);
    u.flush().expect("flush");
    // The peers table is away: the versions written before it in the same
    // transaction must roll back.
    sql_exec(&url, "ALTER TABLE usage_peers RENAME TO usage_peers_away");
    u.record_inference(&[(h(1), 10, 100)]);
    u.record_chunk_served(&peer, &h(1), 24);
    let e = u.flush().expect_err("flush fails");
    assert!(
        matches!(&e, UsageError::Db(m) if m.contains("usage_peers")),
        "{e}"
    );
    assert_eq!(
        sql_i64(&url, "SELECT tokens FROM usage_versions"),
        5,
        "nothing half-written"
    );
    // Still counted here, and more counted while it is down.
    assert_eq!(u.version_counters(&h(1)).tokens, 15);
    u.record_inference(&[(h(1), 100, 100)]);
    assert!(u.flush().is_err());
    sql_exec(&url, "ALTER TABLE usage_peers_away RENAME TO usage_peers");
    u.flush().expect("flush after repair");
    assert_eq!(sql_i64(&url, "SELECT tokens FROM usage_versions"), 115);
    assert_eq!(sql_i64(&url, "SELECT bytes FROM usage_peers"), 1024);
    u.flush().expect("nothing twice");
    let again = relay(&url);
    assert_eq!(again.version_counters(&h(1)).tokens, 115);
    assert_eq!(again.version_counters(&h(1)).calls, 3);
}

#[test]
fn a_database_that_goes_away_gives_errors_not_panics() {
    // A server of its own: this test stops it.
    let Some(own) = TestPg::start() else { return };
    let url = own.create_db();
    let u = relay(&url);
    let node = SigningKey::from_bytes(&[7; 32]);
    let nk = node.verifying_key().to_bytes();
    u.record_fetch(&nk, &h(1));
    u.record_inference(&[(h(1), 5, 100)]);
    u.flush().expect("flush");
    drop(own);
    // Counting goes on in memory.
    u.record_inference(&[(h(1), 5, 100)]);
    u.record_chunk_served(&[9; 32], &h(1), 10);
    assert_eq!(u.version_counters(&h(1)).tokens, 10);
    let e = u.flush().expect_err("flush");
    assert!(
        matches!(&e, UsageError::Db(m) if m.contains("flush") && m.contains("postgres")),
        "{e}"
    );
    let r = u.submit_report(
        &report(&node, 1, 1, h(1), 1, 5),
        REPORT_PERIOD_MS + 1,
        |k, b| u.fetched(k, b),
    );
    assert!(matches!(r, Err(UsageError::Db(_))), "{r:?}");
    // A pair not in memory: the lookup fails, counted as not fetched.
    assert!(!u.fetched(&nk, &h(2)));
    let v = [VersionInfo {
        block: h(1),
        miner: [1; 32],
        loss: None,
        parent_loss: None,
    }];
    assert!(matches!(u.reward("s", &v, 0), Err(UsageError::Db(_))));
    assert!(matches!(u.try_rewards_of(&[1; 32]), Err(UsageError::Db(_))));
    assert!(u.rewards_of(&[1; 32]).is_empty());
    assert_eq!(u.version_counters(&h(1)).tokens, 10);
    // A closed port: no ledger at all.
    let e = Pg::connect("postgres://postgres@127.0.0.1:1/none").expect_err("closed port");
    assert!(e.to_string().contains("cannot connect"), "{e}");
    // Dropping flushes once more and logs the error.
    drop(u);
}
