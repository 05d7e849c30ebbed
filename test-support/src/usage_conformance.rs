//! The usage ledger's behaviour tests, written once and run on both stores:
//! `relay/tests/it/usage.rs` on redb and `relay/tests/it/usage_pg.rs` on
//! PostgreSQL. Each suite takes `open`, which opens the same ledger again
//! each time it is called (a restart).
#![allow(clippy::expect_used)]

use ed25519_dalek::SigningKey;
use relay::usage::{
    ReportEntry, Usage, UsageReport, VersionCounters, VersionInfo, MINER_UC_PER_TOKEN,
    PEER_UC_PER_MIB, REPORTS_PER_PERIOD, REPORT_PERIOD_MS, REPORT_TOKENS_CAP,
};
use web_node::chain::BlockHash;

fn h(b: u8) -> BlockHash {
    BlockHash([b; 32])
}

/// Counters, peers' bytes and bad chunks are read back after a flush and a reopen.
pub fn counters_survive_reopen_after_flush(open: &dyn Fn() -> Usage) {
    {
        let u = open();
        u.record_inference(&[(h(1), 5, 100), (h(2), 0, 0)]);
        u.record_chunk_served(&[9; 32], &h(1), 4096);
        u.record_compute(&[9; 32], &h(1));
        u.record_bad_chunk(&[8; 32], &h(1));
        u.flush().expect("flush");
    }
    let u = open();
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

/// Signed usage reports: replays, forgeries, old periods, unfetched blocks
/// and the per-period caps are refused; the replay table survives a restart.
pub fn reports_are_checked_deduplicated_and_capped(open: &dyn Fn() -> Usage) {
    let u = open();
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
    let u = open();
    assert!(u
        .submit_report(&UsageReport::sign(&k, 10, 1, e(100)), now, fetched)
        .is_err());
    assert_eq!(u.version_counters(&h(1)).reported_tokens, REPORT_TOKENS_CAP);
}

/// A reward pays each unit of use once, also after a restart.
pub fn rewards_pay_each_unit_once_and_survive_restart(open: &dyn Fn() -> Usage) {
    let miner = [1u8; 32];
    let peer = [2u8; 32];
    let v = [VersionInfo {
        block: h(1),
        miner,
        loss: None,
        parent_loss: None,
    }];
    {
        let u = open();
        u.record_inference(&[(h(1), 10, 1000)]);
        u.record_chunk_served(&peer, &h(1), 1 << 20);
        let first = u.reward("layer0.expert1", &v, 1).expect("reward");
        assert_eq!(first.len(), 2);
        assert_eq!(first[0].amount_uc, 10 * MINER_UC_PER_TOKEN);
        assert_eq!(first[1].amount_uc, PEER_UC_PER_MIB);
        assert!(u.reward("layer0.expert1", &v, 2).expect("again").is_empty());
        u.flush().expect("flush");
    }
    let u = open();
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
    let paid: Vec<u64> = u.rewards_of(&miner).iter().map(|e| e.amount_uc).collect();
    assert_eq!(paid, vec![10 * MINER_UC_PER_TOKEN, 3 * MINER_UC_PER_TOKEN]);
    assert_eq!(u.version_counters(&h(1)).paid_units, 13);
}

/// The README's worked example ("Usage and rewards"), computed.
pub fn worked_example_of_the_readme(open: &dyn Fn() -> Usage) {
    let u = open();
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
    // Peer D served 2 MiB of v2 directly to a browser, whose receipts the
    // relay accepted: counted at 50 %.
    let direct = [0x0e; 32];
    u.record_direct_served(&direct, &v2, 2 << 20);
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
            (direct, "peer", 50_000),
        ]
    );
    assert!(u.rewards_of(&liar).is_empty());
    assert_eq!(u.rewards_of(&miner).len(), 1);
    // The losses persist with the counters.
    u.flush().expect("flush");
    drop(u);
    let c = open().version_counters(&v2);
    assert_eq!(
        (c.verified_loss, c.incumbent_loss),
        (Some(0.04390), Some(0.04437))
    );
}
