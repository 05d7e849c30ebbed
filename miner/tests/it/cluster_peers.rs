//! Native nodes (`miner::peer::run`) on two relays sharing one real
//! PostgreSQL database (relays in process): a node on relay 1 gets an
//! expert that only a node on relay 2 holds (forwarded between the relays
//! over a `/ws` link); when relay 2 dies, its node moves to relay 1 (it was
//! given both URLs) and serves from there.
//!
//! Skipped (loudly) when PostgreSQL is not installed; `AIBLOCK_REQUIRE_PG=1`
//! makes that a failure. The waits are bounded only so that a broken build
//! fails instead of hanging.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use relay::cluster::presence::ClusterOptions;
use relay::pg::Pg;
use relay::server::ServeConfig;
use relay::ServeOptions;
use test_support::pg::TestPg;
use test_support::relay::{Launch, TestRelay};
use web_node::chain::BlockHash;
use web_node::net::api::BlockInfo;
use web_node::node::Source;

use crate::node::{model_dir, node_cfg, Node, WAIT};

/// Wait until `f` holds (bounded by [`WAIT`]).
fn wait(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < WAIT, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A relay on the shared database in this process (`test_support`'s), in
/// the cluster with short timings; `crash` (and drop) ends it with every
/// task and socket, leaving its rows to expire.
fn start_relay(data: &Path, model: &Path, db: &str) -> TestRelay {
    let cfg = ServeConfig {
        data_dir: data.to_path_buf(),
        web_dir: None,
        model_dir: Some(model.to_path_buf()),
        database: Some(db.to_string()),
    };
    TestRelay::launch(
        cfg,
        |s| s,
        ServeOptions::default(),
        Launch {
            cluster: Some(
                ClusterOptions::default()
                    .heartbeat(Duration::from_millis(300))
                    .dead_after(Duration::from_secs(3)),
            ),
            crash_on_drop: true,
            ..Launch::default()
        },
    )
}

/// The cluster id of a relay.
fn relay_id(r: &TestRelay) -> String {
    r.state.peers.cluster().unwrap().id.clone()
}

fn head(r: &TestRelay, name: &str) -> BlockInfo {
    test_support::http::head(&r.url, name)
}

/// Presence rows of `peer` on relay `relay`.
fn presence(db: &Pg, relay: &str, peer: [u8; 32]) -> i64 {
    let relay = relay.to_string();
    db.with(move |c| async move {
        let r = c
            .query_one(
                "SELECT count(*) FROM peer_presence WHERE relay = $1 AND peer = $2",
                &[&relay, &peer.to_vec()],
            )
            .await
            .map_err(relay::pg::PgError::from)?;
        Ok::<i64, relay::pg::PgError>(r.get(0))
    })
    .unwrap()
}

#[test]
fn nodes_share_across_relays_and_a_node_of_a_dead_relay_moves_to_the_other() {
    let Some(pg) = TestPg::start() else {
        eprintln!("SKIPPED: PostgreSQL is not installed; the cluster node test did not run");
        return;
    };
    let url = pg.create_db();
    let db = Pg::connect(&url).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir(tmp.path());
    let r1 = start_relay(&tmp.path().join("r1"), &model, &url);
    let r2 = start_relay(&tmp.path().join("r2"), &model, &url);
    let c1 = r1.state.peers.cluster().unwrap().clone();
    wait("relay 1 to see relay 2", || {
        c1.relays().iter().any(|r| r.id == relay_id(&r2))
    });
    let slot = "layer1.expert3";
    let info = head(&r1, slot);
    let hash: BlockHash = info.hash;
    let chunks = info.payload_len.div_ceil(u64::from(info.chunk_size));
    assert!(chunks >= 2);

    // N: on relay 2 first (relay 1 second); the only holder.
    let n = Node::start(node_cfg(&[&r2, &r1], &tmp.path().join("n"), &[slot]));
    let sn = n.wait("N to hold the expert", |s| s.logged_in && s.complete());
    assert_eq!(sn.relay, r2.ws());
    let n_key = n.key();
    wait("N's presence on relay 2", || {
        presence(&db, &relay_id(&r2), n_key) == 1
    });

    // M on relay 1 gets it from N, through both relays.
    let m = Node::start(node_cfg(&[&r1], &tmp.path().join("m"), &[slot]));
    let sm = m.wait("M to hold the expert", |s| s.logged_in && s.complete());
    assert_eq!(
        sm.stats.bytes_received[&Source::Peer(n_key)],
        info.payload_len
    );
    assert_eq!(sm.stats.total_bad(), 0);
    let s1 = r1.state.peers.stats();
    assert_eq!(s1.chunks_from_relays, chunks);
    assert_eq!(s1.chunks_from_store, 0);
    assert_eq!(
        r2.state.peers.stats().peer(&n_key).bytes_served,
        info.payload_len
    );
    drop(m);

    // Relay 2 dies; N moves to relay 1 and holds the expert there.
    r2.crash();
    let sn = n.wait("N back on relay 1", |s| s.logged_in && s.relay == r1.ws());
    assert!(sn.complete());
    let peers1 = r1.state.peers.clone();
    wait("relay 1 to list N as a holder", || {
        peers1.holders_of(&hash).contains(&n_key)
    });
    wait("N's presence under relay 1", || {
        presence(&db, &relay_id(&r1), n_key) == 1
    });
    // P on relay 1 now gets it from N directly.
    let before = r1.state.peers.stats().peer(&n_key).bytes_served;
    let p = Node::start(node_cfg(&[&r1], &tmp.path().join("p"), &[slot]));
    let sp = p.wait("P to hold the expert", |s| s.logged_in && s.complete());
    assert_eq!(
        sp.stats.bytes_received[&Source::Peer(n_key)],
        info.payload_len
    );
    assert_eq!(
        r1.state.peers.stats().peer(&n_key).bytes_served - before,
        info.payload_len
    );
    drop(p);
    drop(n);
}
