//! Several relays on one PostgreSQL database (the real `relay` binary with
//! `--database`, against a throwaway PostgreSQL; SKIPPED loudly without
//! PostgreSQL, failing under AIBLOCK_REQUIRE_PG=1): blocks accepted by one
//! are served by the others, same-slot races have one winner, usage lands in
//! one ledger, and killing a relay loses nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::Value;
use test_support::pg::TestPg;
use web_node::chain::BlockHash;
use web_node::model::Slot;
use web_node::net::api::{codes, ApiError, SlotHead};

fn db() -> Option<String> {
    match TestPg::shared() {
        Some(pg) => Some(pg.create_db()),
        None => {
            eprintln!(
                "**** SKIPPED: no PostgreSQL: several relays on one database not tested ****"
            );
            None
        }
    }
}

fn start(data: &Path, model: &Path, url: &str) -> ChildRelay {
    ChildRelay::start_args(
        data,
        model,
        Path::new("dist-none"),
        &["--database", url, "--no-scrub"],
        None,
        None,
    )
}

fn heads(url: &str) -> Vec<SlotHead> {
    let mut h: Vec<SlotHead> = get(&format!("{url}/heads")).json();
    h.sort_by(|a, b| a.name.cmp(&b.name));
    h
}

fn head_of(url: &str, name: &str) -> BlockHash {
    heads(url)
        .into_iter()
        .find(|h| h.name == name)
        .unwrap()
        .hash
}

/// Wait until `f` holds (or panic after `limit`); the time it took.
fn until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "{what}: not after {limit:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    t.elapsed()
}

/// A new version of `slot` on top of its head at `url`, uploaded there.
fn new_version(url: &str, slot: Slot, seed: u64, key: u8) -> (u16, BlockHash, Vec<u8>) {
    let cfg = test_config();
    let meta = list(url, "A")[0].hash;
    let head = head_of(url, &slot.to_string());
    let payload = slot_payload(&cfg, slot, seed);
    let (up, block) = upload(slot, &payload, vec![head], Some(meta), &miner_key(key));
    let r = post_json(&format!("{url}/upload_moe_experts"), &seed_json(&up));
    (r.status, block.hash, payload)
}

#[test]
fn a_block_accepted_by_one_relay_is_listed_verified_and_served_by_the_other() {
    let Some(url) = db() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir(tmp.path());
    // Both start together on an empty database: one writes the genesis,
    // the other takes it.
    let (d1, d2) = (tmp.path().join("d1"), tmp.path().join("d2"));
    let (m1, u1, m2, u2) = (model.clone(), url.clone(), model.clone(), url.clone());
    let t1 = std::thread::spawn(move || start(&d1, &m1, &u1));
    let t2 = std::thread::spawn(move || start(&d2, &m2, &u2));
    let (r1, r2) = (t1.join().unwrap(), t2.join().unwrap());
    // The one that lost the genesis race may have loaded part of it; the
    // rest arrives through its follower.
    until(
        Duration::from_secs(5),
        "both relays list the genesis",
        || {
            list(&r1.url, "A") == list(&r2.url, "A")
                && list(&r1.url, "B") == list(&r2.url, "B")
                && heads(&r1.url) == heads(&r2.url)
        },
    );
    let genesis = fetch_and_validate_all(&r2.url);
    assert!(genesis > 2);

    let slot = Slot::Expert {
        layer: 0,
        expert: 1,
    };
    let (status, hash, payload) = new_version(&r1.url, slot, 41, 3);
    assert_eq!(status, 201);
    let took = until(Duration::from_secs(5), "relay 2 lists the block", || {
        get(&format!("{}/blocks/{hash}", r2.url)).status == 200
    });
    eprintln!("relay 2 served the block {took:?} after relay 1 accepted it");
    assert_eq!(
        get(&format!("{}/blocks/{hash}/payload", r2.url)).body,
        payload
    );
    assert_eq!(head_of(&r2.url, "layer0.expert1"), hash);
    assert_eq!(list(&r2.url, "B"), list(&r1.url, "B"));
    // A client of relay 2 verifies the whole chain, the new block included.
    assert_eq!(fetch_and_validate_all(&r2.url), genesis + 1);
    // And relay 2 builds on it: the next version goes to relay 2, relay 1 sees it.
    let (status, hash2, _) = new_version(&r2.url, slot, 42, 4);
    assert_eq!(status, 201);
    until(Duration::from_secs(5), "relay 1 lists the block", || {
        get(&format!("{}/blocks/{hash2}", r1.url)).status == 200
    });
    assert_eq!(head_of(&r1.url, "layer0.expert1"), hash2);
    r1.terminate();
    r2.terminate();
}

#[test]
fn same_slot_race_on_two_relays_has_one_winner_and_one_409() {
    let Some(url) = db() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir(tmp.path());
    let r1 = start(&tmp.path().join("d1"), &model, &url);
    let r2 = start(&tmp.path().join("d2"), &model, &url);
    let cfg = test_config();
    let slot = Slot::Expert {
        layer: 1,
        expert: 0,
    };
    for round in 0..6u64 {
        let meta = list(&r1.url, "A")[0].hash;
        let head = head_of(&r1.url, "layer1.expert0");
        until(Duration::from_secs(5), "relays agree on the head", || {
            head_of(&r2.url, "layer1.expert0") == head
        });
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
        let threads: Vec<_> = [&r1.url, &r2.url]
            .into_iter()
            .enumerate()
            .map(|(i, u)| {
                let payload = slot_payload(&cfg, slot, 100 + round * 2 + i as u64);
                let (up, block) = upload(
                    slot,
                    &payload,
                    vec![head],
                    Some(meta),
                    &miner_key(30 + i as u8),
                );
                let (u, b) = (u.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let body = seed_json(&up);
                    b.wait();
                    let r = post_json(&format!("{u}/upload_moe_experts"), &body);
                    (r.status, r.body, block.hash)
                })
            })
            .collect();
        let res: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let won: Vec<_> = res.iter().filter(|r| r.0 == 201).collect();
        let lost: Vec<_> = res.iter().filter(|r| r.0 == 409).collect();
        assert_eq!(
            (won.len(), lost.len()),
            (1, 1),
            "round {round}: {:?}",
            res.iter()
                .map(|r| (r.0, String::from_utf8_lossy(&r.1).into_owned()))
                .collect::<Vec<_>>()
        );
        let e: ApiError = serde_json::from_slice(&lost[0].1).unwrap();
        assert_eq!(e.code, codes::NOT_HEAD, "{}", e.message);
        // Both relays end on the winner; the loser exists nowhere.
        for u in [&r1.url, &r2.url] {
            until(Duration::from_secs(5), "the winner is the head", || {
                head_of(u, "layer1.expert0") == won[0].2
            });
            assert_eq!(get(&format!("{u}/blocks/{}", lost[0].2)).status, 404);
        }
    }
    assert_eq!(list(&r1.url, "B"), list(&r2.url, "B"));
    r1.terminate();
    r2.terminate();
}

#[test]
fn killing_a_relay_loses_nothing() {
    let Some(url) = db() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir(tmp.path());
    let (d1, d2) = (tmp.path().join("d1"), tmp.path().join("d2"));
    let r1 = start(&d1, &model, &url);
    let r2 = start(&d2, &model, &url);
    let slot = Slot::Expert {
        layer: 1,
        expert: 1,
    };
    let (status, hash, payload) = new_version(&r1.url, slot, 51, 5);
    assert_eq!(status, 201);
    // Killed right after its 201: the block is in the database.
    r1.kill9();
    until(Duration::from_secs(5), "relay 2 serves it", || {
        get(&format!("{}/blocks/{hash}", r2.url)).status == 200
    });
    assert_eq!(
        get(&format!("{}/blocks/{hash}/payload", r2.url)).body,
        payload
    );
    let n = fetch_and_validate_all(&r2.url);
    // Relay 2 keeps accepting while relay 1 is down.
    let (status, hash2, _) = new_version(&r2.url, slot, 52, 6);
    assert_eq!(status, 201);
    // Relay 1 comes back on the same database and data dir: everything is there.
    let r1 = start(&d1, &model, &url);
    assert_eq!(fetch_and_validate_all(&r1.url), n + 1);
    assert_eq!(head_of(&r1.url, "layer1.expert1"), hash2);
    assert_eq!(list(&r1.url, "B"), list(&r2.url, "B"));
    r1.terminate();
    r2.terminate();
}

#[test]
fn usage_counted_on_either_relay_lands_in_one_ledger() {
    let Some(url) = db() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir(tmp.path());
    let r1 = start(&tmp.path().join("d1"), &model, &url);
    let r2 = start(&tmp.path().join("d2"), &model, &url);
    let mut want: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
    for (u, prompt) in [(&r1.url, "abc"), (&r2.url, "abd"), (&r1.url, "xyz")] {
        let r = post_json(
            &format!("{u}/chat"),
            format!(r#"{{"prompt": "{prompt}", "max_tokens": 4, "use_moe": true}}"#).as_bytes(),
        );
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let answer: Value = r.json();
        for (l, used) in answer["experts"].as_array().unwrap().iter().enumerate() {
            for x in used.as_array().unwrap() {
                let e = want
                    .entry(format!("layer{l}.expert{}", x["expert"]))
                    .or_default();
                e.0 += 1;
                e.1 += x["tokens"].as_u64().unwrap();
            }
        }
    }
    assert!(!want.is_empty());
    // Each relay flushes every second; both then show the sum of both.
    for u in [&r1.url, &r2.url] {
        for (name, (calls, tokens)) in &want {
            until(
                Duration::from_secs(10),
                "the ledger holds both relays' counts",
                || {
                    let s: Value = get(&format!("{u}/experts/stats/{name}")).json();
                    s["calls"] == *calls && s["tokens_routed"] == *tokens
                },
            );
        }
    }
    r1.terminate();
    r2.terminate();
}

#[test]
fn relays_with_blobs_in_a_shared_directory_serve_each_others_payloads() {
    let Some(url) = db() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir(tmp.path());
    let blobs = tmp.path().join("blobs");
    let b = blobs.to_str().unwrap();
    let start_b = |d: &str| {
        ChildRelay::start_args(
            &tmp.path().join(d),
            &model,
            Path::new("dist-none"),
            &["--database", &url, "--blobs", b, "--no-scrub"],
            None,
            None,
        )
    };
    let r1 = start_b("d1");
    let r2 = start_b("d2");
    let slot = Slot::Expert {
        layer: 0,
        expert: 2,
    };
    let (status, hash, payload) = new_version(&r1.url, slot, 61, 7);
    assert_eq!(status, 201);
    until(Duration::from_secs(5), "relay 2 lists the block", || {
        get(&format!("{}/blocks/{hash}", r2.url)).status == 200
    });
    assert_eq!(
        get(&format!("{}/blocks/{hash}/payload", r2.url)).body,
        payload
    );
    // The payloads are objects in the directory (genesis and the new block).
    assert!(blobs.join("payloads").join(hash.to_hex()).is_file());
    let n = fetch_and_validate_all(&r2.url);
    assert_eq!(
        std::fs::read_dir(blobs.join("payloads")).unwrap().count(),
        n,
        "one object per block"
    );
    r1.terminate();
    r2.terminate();
}
