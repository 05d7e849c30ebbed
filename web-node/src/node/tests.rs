//! The state machine driven by messages only: no socket, no clock.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet};

use ed25519_dalek::SigningKey;
use proptest::prelude::*;

use super::*;
use crate::chain::{chunk_hashes, limits as chain_limits};
use crate::net::peer::{decode_from_relay, verify_login};
use crate::test_chain::TinyChain;

/// The tiny model's meta block and one expert block (several 4 KiB chunks).
struct Fixture {
    config: Config,
    expert: Block,
    payload: Vec<u8>,
    other: Block,
    other_payload: Vec<u8>,
}

fn fixture() -> Fixture {
    let chain = TinyChain::new(3);
    let mut experts = chain.experts().into_iter();
    let (expert, payload) = experts.next().unwrap();
    let (other, other_payload) = experts.next().unwrap();
    assert!(payload.len() > 3 * chain_limits::MIN_CHUNK_SIZE as usize);
    Fixture {
        config: chain.config,
        expert,
        payload,
        other,
        other_payload,
    }
}

fn key() -> SigningKey {
    SigningKey::from_bytes(&[4; 32])
}

fn welcome(credits: u32) -> FromRelay {
    FromRelay::Welcome {
        peer: key().verifying_key().to_bytes(),
        limits: WireLimits {
            chunk_credits: credits,
            ..WireLimits::default()
        },
    }
}

/// A node that is logged in; the login exchange is drained.
fn logged_in(cfg: NodeConfig, credits: u32) -> PeerNode {
    let mut n = PeerNode::new(key(), cfg);
    n.connected(0);
    n.handle(
        FromRelay::Challenge {
            nonce: [1; 32],
            version: 1,
        },
        0,
    );
    let login_msg = n.poll_transmit().unwrap();
    let ToRelay::Login { key: pk, sig, .. } = &login_msg else {
        panic!("expected Login, got {login_msg:?}");
    };
    verify_login(&[1; 32], pk, sig).unwrap();
    assert_eq!(n.poll_transmit(), None);
    n.handle(welcome(credits), 0);
    drain(&mut n);
    events(&mut n);
    n
}

fn drain(n: &mut PeerNode) -> Vec<ToRelay> {
    std::iter::from_fn(|| n.poll_transmit()).collect()
}

fn events(n: &mut PeerNode) -> Vec<NodeEvent> {
    std::iter::from_fn(|| n.poll_event()).collect()
}

fn gets(msgs: &[ToRelay]) -> Vec<(u64, BlockHash, u32)> {
    msgs.iter()
        .filter_map(|m| match m {
            ToRelay::GetChunk { req, block, index } => Some((*req, *block, *index)),
            _ => None,
        })
        .collect()
}

fn chunk_of(payload: &[u8], index: u32) -> Vec<u8> {
    let cs = chain_limits::MIN_CHUNK_SIZE as usize;
    let start = index as usize * cs;
    payload[start..(start + cs).min(payload.len())].to_vec()
}

fn data(req: u64, block: BlockHash, index: u32, bytes: Vec<u8>, from: ChunkSource) -> FromRelay {
    FromRelay::ChunkData {
        req,
        block,
        index,
        data: bytes,
        from,
    }
}

fn list(f: &Fixture) -> Vec<BlockHash> {
    chunk_hashes(&f.payload, f.expert.header.chunk_size)
}

/// Answer every request honestly until nothing is asked; returns the
/// requests answered.
fn serve_all(n: &mut PeerNode, f: &Fixture, now: Millis) -> usize {
    let mut answered = 0;
    loop {
        let reqs = gets(&drain(n));
        if reqs.is_empty() {
            return answered;
        }
        for (req, block, index) in reqs {
            let p = if block == f.expert.hash {
                &f.payload
            } else {
                &f.other_payload
            };
            n.handle(
                data(req, block, index, chunk_of(p, index), ChunkSource::Relay),
                now,
            );
            answered += 1;
        }
    }
}

#[test]
fn login_then_status_and_have() {
    let f = fixture();
    let mut n = PeerNode::new(key(), NodeConfig::default());
    n.hold(f.other.hash, f.other_payload.clone().into(), 4096)
        .unwrap();
    // Nothing is sent before the connection, nor a login before the challenge.
    assert_eq!(n.poll_transmit(), None);
    n.connected(0);
    assert_eq!(n.poll_transmit(), None);
    n.handle(
        FromRelay::Challenge {
            nonce: [7; 32],
            version: 1,
        },
        0,
    );
    let ToRelay::Login { key: pk, sig, .. } = n.poll_transmit().unwrap() else {
        panic!("login");
    };
    assert_eq!(pk, n.id());
    verify_login(&[7; 32], &pk, &sig).unwrap();
    n.handle(welcome(16), 5);
    let out = drain(&mut n);
    assert_eq!(
        out,
        vec![
            ToRelay::Status {
                load: 0,
                serve_compute: false
            },
            ToRelay::Have {
                add: vec![f.other.hash],
                remove: vec![]
            }
        ]
    );
    assert!(matches!(
        events(&mut n).as_slice(),
        [NodeEvent::LoggedIn { .. }]
    ));
    assert_eq!(n.stats().logins, 1);
}

#[test]
fn a_welcome_without_login_is_ignored() {
    let mut n = PeerNode::new(key(), NodeConfig::default());
    n.connected(0);
    n.handle(welcome(16), 0);
    assert!(!n.is_logged_in());
    assert_eq!(n.poll_transmit(), None);
    assert_eq!(n.stats().ignored, 1);
}

#[test]
fn fetch_verifies_every_chunk_and_announces_the_block() {
    let f = fixture();
    let mut n = logged_in(NodeConfig::default(), 16);
    n.fetch(&f.expert, list(&f), Some(f.config.clone()), 10)
        .unwrap();
    let answered = serve_all(&mut n, &f, 10);
    let chunks = f.payload.len().div_ceil(4096);
    assert_eq!(answered, chunks);
    let ev = events(&mut n);
    let done: Vec<_> = ev
        .iter()
        .filter_map(|e| match e {
            NodeEvent::BlockComplete { hash, payload } => Some((*hash, payload.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].0, f.expert.hash);
    assert_eq!(&*done[0].1, &f.payload[..]);
    assert!(n.is_held(&f.expert.hash));
    assert!(!n.is_fetching(&f.expert.hash));
    // The Have went out after the last chunk.
    let out = drain(&mut n);
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(
        n.stats().bytes_received[&Source::Relay],
        f.payload.len() as u64
    );
    assert_eq!(n.stats().blocks_fetched, 1);
}

#[test]
fn have_is_sent_when_the_block_completes() {
    let f = fixture();
    let mut n = logged_in(NodeConfig::default(), 64);
    n.fetch(&f.expert, list(&f), Some(f.config.clone()), 0)
        .unwrap();
    let reqs = gets(&drain(&mut n));
    for (req, block, index) in reqs {
        n.handle(
            data(
                req,
                block,
                index,
                chunk_of(&f.payload, index),
                ChunkSource::Relay,
            ),
            0,
        );
    }
    let out = drain(&mut n);
    assert_eq!(
        out,
        vec![ToRelay::Have {
            add: vec![f.expert.hash],
            remove: vec![]
        }]
    );
}

#[test]
fn a_corrupt_chunk_is_rejected_counted_and_fetched_again() {
    let f = fixture();
    let liar = [0xAA; 32];
    let mut n = logged_in(NodeConfig::default(), 16);
    n.fetch(&f.expert, list(&f), Some(f.config.clone()), 0)
        .unwrap();
    let reqs = gets(&drain(&mut n));
    let (req0, block0, index0) = reqs[0];
    let mut bad = chunk_of(&f.payload, index0);
    bad[0] ^= 1;
    n.handle(data(req0, block0, index0, bad, ChunkSource::Peer(liar)), 0);
    assert_eq!(n.stats().bad_chunks[&Source::Peer(liar)], 1);
    assert!(events(&mut n).contains(&NodeEvent::BadChunk {
        hash: f.expert.hash,
        index: index0,
        from: Source::Peer(liar)
    }));
    // The other chunks arrive honestly.
    for &(req, block, index) in &reqs[1..] {
        n.handle(
            data(
                req,
                block,
                index,
                chunk_of(&f.payload, index),
                ChunkSource::Relay,
            ),
            0,
        );
    }
    assert!(!n.is_held(&f.expert.hash), "a chunk is still missing");
    // The bad chunk is asked again after its retry delay, not before.
    assert!(gets(&drain(&mut n)).is_empty());
    let due = n.poll_timeout().unwrap();
    assert!(due <= RETRY_DELAY_MS);
    n.handle_timeout(due);
    let again = gets(&drain(&mut n));
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].2, index0);
    assert_ne!(again[0].0, req0, "a fresh request id");
    n.handle(
        data(
            again[0].0,
            f.expert.hash,
            index0,
            chunk_of(&f.payload, index0),
            ChunkSource::Relay,
        ),
        due,
    );
    assert!(n.is_held(&f.expert.hash));
    assert_eq!(&*n.payload(&f.expert.hash).unwrap(), &f.payload[..]);
    assert_eq!(n.stats().total_bad(), 1);
}

#[test]
fn a_chunk_answering_another_index_is_bad() {
    let f = fixture();
    let mut n = logged_in(NodeConfig::default(), 16);
    n.fetch(&f.expert, list(&f), Some(f.config.clone()), 0)
        .unwrap();
    let reqs = gets(&drain(&mut n));
    let (req, block, index) = reqs[0];
    // A valid chunk, but of another index than was asked under `req`.
    let other = reqs[1].2;
    n.handle(
        data(
            req,
            block,
            other,
            chunk_of(&f.payload, other),
            ChunkSource::Relay,
        ),
        0,
    );
    assert_eq!(n.stats().bad_chunks[&Source::Relay], 1);
    assert!(events(&mut n).iter().any(|e| matches!(
        e,
        NodeEvent::BadChunk { index: i, .. } if *i == index
    )));
}

#[test]
fn chunk_requests_stay_within_the_relays_credits() {
    let f = fixture();
    let credits = 2;
    let mut n = logged_in(NodeConfig::default(), credits);
    n.fetch(&f.expert, list(&f), Some(f.config.clone()), 0)
        .unwrap();
    n.fetch(
        &f.other,
        chunk_hashes(&f.other_payload, 4096),
        Some(f.config.clone()),
        0,
    )
    .unwrap();
    let mut max_outstanding = 0;
    let mut answered = 0;
    loop {
        let reqs = gets(&drain(&mut n));
        assert!(n.in_flight() <= credits as usize);
        max_outstanding = max_outstanding.max(n.in_flight());
        if reqs.is_empty() {
            break;
        }
        assert!(
            reqs.len() <= credits as usize,
            "{} requests at once",
            reqs.len()
        );
        // Answer one at a time: each answer frees exactly one credit.
        let (req, block, index) = reqs[0];
        let p = if block == f.expert.hash {
            &f.payload
        } else {
            &f.other_payload
        };
        n.handle(
            data(req, block, index, chunk_of(p, index), ChunkSource::Relay),
            0,
        );
        answered += 1;
        for &(req, block, index) in &reqs[1..] {
            let p = if block == f.expert.hash {
                &f.payload
            } else {
                &f.other_payload
            };
            n.handle(
                data(req, block, index, chunk_of(p, index), ChunkSource::Relay),
                0,
            );
            answered += 1;
        }
    }
    assert_eq!(max_outstanding, credits as usize);
    assert!(n.is_held(&f.expert.hash) && n.is_held(&f.other.hash));
    let total = f.payload.len().div_ceil(4096) + f.other_payload.len().div_ceil(4096);
    assert_eq!(answered, total);
}

#[test]
fn the_local_cap_bounds_requests_below_the_credits() {
    let f = fixture();
    let cfg = NodeConfig {
        max_in_flight: 1,
        ..NodeConfig::default()
    };
    let mut n = logged_in(cfg, 16);
    n.fetch(&f.expert, list(&f), Some(f.config.clone()), 0)
        .unwrap();
    assert_eq!(gets(&drain(&mut n)).len(), 1);
}

#[test]
fn failures_are_retried_a_bounded_number_of_times_then_reported() {
    let f = fixture();
    let cfg = NodeConfig {
        max_attempts: 3,
        ..NodeConfig::default()
    };
    let mut n = logged_in(cfg, 1);
    n.fetch(&f.expert, list(&f), Some(f.config.clone()), 0)
        .unwrap();
    let mut now = 0;
    let mut attempts: HashMap<u32, u32> = HashMap::new();
    loop {
        let reqs = gets(&drain(&mut n));
        for (req, block, index) in reqs {
            *attempts.entry(index).or_default() += 1;
            n.handle(
                FromRelay::ChunkFailed {
                    req,
                    block,
                    index,
                    reason: "no source".into(),
                },
                now,
            );
        }
        assert!(
            attempts.values().all(|&a| a <= 3),
            "more attempts than allowed"
        );
        match n.poll_timeout() {
            Some(t) if n.is_fetching(&f.expert.hash) => {
                now = t.max(now);
                n.handle_timeout(now);
            }
            _ => break,
        }
    }
    assert_eq!(attempts.values().max(), Some(&3));
    let ev = events(&mut n);
    assert!(
        ev.iter().any(|e| matches!(
            e,
            NodeEvent::FetchFailed { hash, reason } if *hash == f.expert.hash && reason.contains("no source")
        )),
        "{ev:?}"
    );
    assert!(!n.is_fetching(&f.expert.hash));
    assert_eq!(n.stats().fetches_failed, 1);
}

#[test]
fn a_request_that_times_out_is_asked_again() {
    let f = fixture();
    let mut n = logged_in(NodeConfig::default(), 1);
    n.fetch(&f.expert, list(&f), Some(f.config.clone()), 0)
        .unwrap();
    let first = gets(&drain(&mut n));
    assert_eq!(first.len(), 1);
    // Before the deadline nothing happens.
    n.handle_timeout(CHUNK_TIMEOUT_MS - 1);
    assert!(gets(&drain(&mut n)).is_empty());
    assert_eq!(n.poll_timeout(), Some(CHUNK_TIMEOUT_MS));
    n.handle_timeout(CHUNK_TIMEOUT_MS);
    // The late answer to the timed-out request is ignored, not counted.
    let (req, block, index) = first[0];
    n.handle(
        data(
            req,
            block,
            index,
            chunk_of(&f.payload, index),
            ChunkSource::Relay,
        ),
        CHUNK_TIMEOUT_MS,
    );
    assert_eq!(n.stats().ignored, 1);
    assert!(n.stats().bytes_received.is_empty());
    // Everything else is answered; the timed-out chunk is asked once more.
    let mut asked: HashMap<u32, u32> = HashMap::new();
    let mut now = CHUNK_TIMEOUT_MS;
    while !n.is_held(&f.expert.hash) {
        for (r, b, i) in gets(&drain(&mut n)) {
            *asked.entry(i).or_default() += 1;
            n.handle(
                data(r, b, i, chunk_of(&f.payload, i), ChunkSource::Relay),
                now,
            );
        }
        if let Some(t) = n.poll_timeout() {
            now = now.max(t);
            n.handle_timeout(now);
        }
        assert!(now < 10 * CHUNK_TIMEOUT_MS, "the fetch does not finish");
    }
    assert_eq!(asked[&index], 1);
    assert!(asked.values().all(|&a| a == 1));
    assert_eq!(asked.len(), f.payload.len().div_ceil(4096));
}

#[test]
fn a_reconnection_resumes_the_fetch_where_it_stopped() {
    let f = fixture();
    let mut n = logged_in(NodeConfig::default(), 2);
    n.fetch(&f.expert, list(&f), Some(f.config.clone()), 0)
        .unwrap();
    let reqs = gets(&drain(&mut n));
    let (req, block, index) = reqs[0];
    n.handle(
        data(
            req,
            block,
            index,
            chunk_of(&f.payload, index),
            ChunkSource::Relay,
        ),
        0,
    );
    drain(&mut n);
    n.disconnected(1);
    assert_eq!(n.in_flight(), 0);
    assert_eq!(n.poll_timeout(), None);
    // Answers of the old connection are ignored.
    let (req1, block1, index1) = reqs[1];
    n.handle(
        data(
            req1,
            block1,
            index1,
            chunk_of(&f.payload, index1),
            ChunkSource::Relay,
        ),
        1,
    );
    n.connected(2);
    n.handle(
        FromRelay::Challenge {
            nonce: [2; 32],
            version: 1,
        },
        2,
    );
    n.handle(welcome(16), 2);
    let asked: HashSet<u32> = gets(&drain(&mut n)).iter().map(|r| r.2).collect();
    assert!(
        !asked.contains(&index),
        "a verified chunk is not asked again"
    );
    assert_eq!(asked.len(), f.payload.len().div_ceil(4096) - 1);
    assert_eq!(n.stats().logins, 2);
}

#[test]
fn serving_answers_exact_bytes_and_refuses_the_rest() {
    let f = fixture();
    let mut n = logged_in(NodeConfig::default(), 16);
    n.hold(f.expert.hash, f.payload.clone().into(), 4096)
        .unwrap();
    assert_eq!(
        drain(&mut n),
        vec![ToRelay::Have {
            add: vec![f.expert.hash],
            remove: vec![]
        }]
    );
    let chunks = f.payload.len().div_ceil(4096) as u32;
    for index in 0..chunks {
        n.handle(
            FromRelay::ServeChunk {
                req: 100 + u64::from(index),
                block: f.expert.hash,
                index,
            },
            0,
        );
        let out = drain(&mut n);
        assert_eq!(
            out,
            vec![ToRelay::Chunk {
                req: 100 + u64::from(index),
                data: chunk_of(&f.payload, index)
            }]
        );
    }
    // The last chunk is short and exact.
    assert_eq!(n.stats().bytes_served, f.payload.len() as u64);
    for (block, index) in [
        (f.expert.hash, chunks),
        (f.expert.hash, u32::MAX),
        (f.other.hash, 0),
    ] {
        n.handle(
            FromRelay::ServeChunk {
                req: 7,
                block,
                index,
            },
            0,
        );
        assert!(matches!(
            drain(&mut n).as_slice(),
            [ToRelay::NoChunk { req: 7, .. }]
        ));
    }
    assert_eq!(n.stats().chunks_refused, 3);
    assert!(n.unhold(&f.expert.hash));
    assert_eq!(
        drain(&mut n),
        vec![ToRelay::Have {
            add: vec![],
            remove: vec![f.expert.hash]
        }]
    );
}

/// Payload bytes "on disk": they can be cut short or removed after the hold;
/// every read is counted.
struct FakeFile {
    bytes: std::sync::Mutex<Option<Vec<u8>>>,
    reads: std::sync::atomic::AtomicU32,
}

impl PayloadReader for FakeFile {
    fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>, String> {
        self.reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let guard = self.bytes.lock().unwrap();
        let bytes = guard.as_ref().ok_or("no such file")?;
        let start = (offset as usize).min(bytes.len());
        Ok(bytes[start..(start + len).min(bytes.len())].to_vec())
    }
}

fn serve_one(n: &mut PeerNode, block: BlockHash, index: u32) -> ToRelay {
    n.handle(
        FromRelay::ServeChunk {
            req: 9,
            block,
            index,
        },
        0,
    );
    let mut out = drain(n);
    assert_eq!(out.len(), 1, "{out:?}");
    out.remove(0)
}

#[test]
fn a_payload_held_stored_is_read_when_served_and_a_short_or_missing_file_is_refused() {
    let f = fixture();
    let file = Arc::new(FakeFile {
        bytes: std::sync::Mutex::new(Some(f.payload.clone())),
        reads: Default::default(),
    });
    let mut n = logged_in(NodeConfig::default(), 16);
    n.hold_stored(f.expert.hash, f.payload.len() as u64, 4096, file.clone())
        .unwrap();
    assert_eq!(
        drain(&mut n),
        vec![ToRelay::Have {
            add: vec![f.expert.hash],
            remove: vec![]
        }]
    );
    assert!(n.is_held(&f.expert.hash) && !n.is_held_in_memory(&f.expert.hash));
    // Nothing is read until a chunk is asked for.
    assert_eq!(file.reads.load(std::sync::atomic::Ordering::Relaxed), 0);
    let chunks = f.payload.len().div_ceil(4096) as u32;
    for index in 0..chunks {
        assert_eq!(
            serve_one(&mut n, f.expert.hash, index),
            ToRelay::Chunk {
                req: 9,
                data: chunk_of(&f.payload, index)
            }
        );
    }
    assert_eq!(
        file.reads.load(std::sync::atomic::Ordering::Relaxed),
        chunks
    );
    assert_eq!(n.stats().bytes_served, f.payload.len() as u64);
    assert_eq!(n.payload(&f.expert.hash).as_deref(), Some(&f.payload[..]));
    // Past the end: refused without a read (the one read was the whole payload).
    assert!(matches!(
        serve_one(&mut n, f.expert.hash, chunks),
        ToRelay::NoChunk { ref reason, .. } if reason.contains("past the")
    ));
    assert_eq!(
        file.reads.load(std::sync::atomic::Ordering::Relaxed),
        chunks + 1
    );
    // The file is cut short: its first chunk is still exact, the last is refused.
    file.bytes
        .lock()
        .unwrap()
        .as_mut()
        .unwrap()
        .truncate(f.payload.len() - 10);
    assert_eq!(
        serve_one(&mut n, f.expert.hash, 0),
        ToRelay::Chunk {
            req: 9,
            data: chunk_of(&f.payload, 0)
        }
    );
    assert!(matches!(
        serve_one(&mut n, f.expert.hash, chunks - 1),
        ToRelay::NoChunk { ref reason, .. } if reason.contains("short")
    ));
    assert_eq!(n.payload(&f.expert.hash), None);
    // The file is gone: refused with the reader's reason.
    *file.bytes.lock().unwrap() = None;
    assert!(matches!(
        serve_one(&mut n, f.expert.hash, 0),
        ToRelay::NoChunk { ref reason, .. } if reason.contains("no such file")
    ));
    assert_eq!(n.stats().chunks_refused, 3);
    assert_eq!(n.stats().chunks_served, u64::from(chunks) + 1);
}

#[test]
fn a_payload_held_in_memory_then_stored_is_not_announced_again() {
    let f = fixture();
    let mut n = logged_in(NodeConfig::default(), 16);
    n.hold(f.expert.hash, f.payload.clone().into(), 4096)
        .unwrap();
    assert_eq!(drain(&mut n).len(), 1);
    assert!(n.is_held_in_memory(&f.expert.hash));
    let file = Arc::new(FakeFile {
        bytes: std::sync::Mutex::new(Some(f.payload.clone())),
        reads: Default::default(),
    });
    n.hold_stored(f.expert.hash, f.payload.len() as u64, 4096, file.clone())
        .unwrap();
    assert_eq!(drain(&mut n), vec![]);
    assert!(!n.is_held_in_memory(&f.expert.hash));
    assert_eq!(
        serve_one(&mut n, f.expert.hash, 1),
        ToRelay::Chunk {
            req: 9,
            data: chunk_of(&f.payload, 1)
        }
    );
    assert_eq!(file.reads.load(std::sync::atomic::Ordering::Relaxed), 1);
    // A bad chunk size is refused for a stored hold too.
    assert!(n.hold_stored(f.other.hash, 10, 1, file).is_err());
}

#[test]
fn compute_goes_to_the_driver_and_back() {
    let f = fixture();
    let cfg = NodeConfig {
        serve_compute: true,
        ..NodeConfig::default()
    };
    let mut n = logged_in(cfg, 16);
    n.hold(f.expert.hash, f.payload.clone().into(), 4096)
        .unwrap();
    drain(&mut n);
    n.handle(
        FromRelay::Compute {
            req: 5,
            block: f.expert.hash,
            rows: 2,
            input: vec![0.5; 64],
        },
        0,
    );
    let ev = events(&mut n);
    let Some(NodeEvent::Compute {
        req,
        block,
        rows,
        input,
    }) = ev.into_iter().next()
    else {
        panic!("compute event");
    };
    assert_eq!((block, rows, input.len()), (f.expert.hash, 2, 64));
    assert_eq!(req.id, 5);
    assert!(n.compute_done(req, Ok(vec![1.0; 64])));
    assert_eq!(
        drain(&mut n),
        vec![ToRelay::ComputeResult {
            req: 5,
            output: vec![1.0; 64]
        }]
    );
    // Answering twice, or an unknown request, sends nothing.
    assert!(!n.compute_done(req, Ok(vec![])));
    assert!(!n.compute_done(
        ComputeReq {
            conn: req.conn,
            id: 99
        },
        Ok(vec![])
    ));
    assert_eq!(n.poll_transmit(), None);
    // A failure is reported as such.
    n.handle(
        FromRelay::Compute {
            req: 6,
            block: f.expert.hash,
            rows: 1,
            input: vec![0.5; 32],
        },
        0,
    );
    let Some(NodeEvent::Compute { req, .. }) = n.poll_event() else {
        panic!("compute event");
    };
    assert!(n.compute_done(req, Err("bad shape".into())));
    assert!(matches!(
        drain(&mut n).as_slice(),
        [ToRelay::ComputeFailed { req: 6, reason }] if reason == "bad shape"
    ));
    assert_eq!(
        (n.stats().computes_served, n.stats().computes_failed),
        (1, 1)
    );
}

#[test]
fn a_compute_answer_after_a_reconnection_is_dropped() {
    let f = fixture();
    let cfg = NodeConfig {
        serve_compute: true,
        ..NodeConfig::default()
    };
    let mut n = logged_in(cfg, 16);
    n.hold(f.expert.hash, f.payload.clone().into(), 4096)
        .unwrap();
    n.handle(
        FromRelay::Compute {
            req: 1,
            block: f.expert.hash,
            rows: 1,
            input: vec![0.0; 32],
        },
        0,
    );
    let Some(NodeEvent::Compute { req, .. }) = events(&mut n).into_iter().next() else {
        panic!("compute event");
    };
    n.disconnected(1);
    n.connected(2);
    n.handle(
        FromRelay::Challenge {
            nonce: [3; 32],
            version: 1,
        },
        2,
    );
    n.handle(welcome(16), 2);
    drain(&mut n);
    // The new connection may reuse id 1; the old answer must not go out under it.
    assert!(!n.compute_done(req, Ok(vec![0.0; 32])));
    assert_eq!(n.poll_transmit(), None);
}

#[test]
fn compute_is_refused_when_not_served_not_held_or_malformed() {
    let f = fixture();
    let mut plain = logged_in(NodeConfig::default(), 16);
    plain
        .hold(f.expert.hash, f.payload.clone().into(), 4096)
        .unwrap();
    drain(&mut plain);
    plain.handle(
        FromRelay::Compute {
            req: 1,
            block: f.expert.hash,
            rows: 1,
            input: vec![0.0; 32],
        },
        0,
    );
    assert!(matches!(
        drain(&mut plain).as_slice(),
        [ToRelay::ComputeFailed { req: 1, .. }]
    ));
    assert!(events(&mut plain).is_empty());

    let mut n = logged_in(
        NodeConfig {
            serve_compute: true,
            ..NodeConfig::default()
        },
        16,
    );
    n.hold(f.expert.hash, f.payload.clone().into(), 4096)
        .unwrap();
    drain(&mut n);
    for (req, block, rows, len) in [
        (2, f.other.hash, 1, 32),
        (3, f.expert.hash, 0, 32),
        (4, f.expert.hash, 3, 32),
        (5, f.expert.hash, 1, 0),
    ] {
        n.handle(
            FromRelay::Compute {
                req,
                block,
                rows,
                input: vec![0.0; len],
            },
            0,
        );
        let out = drain(&mut n);
        assert!(
            matches!(out.as_slice(), [ToRelay::ComputeFailed { req: r, .. }] if *r == req),
            "{out:?}"
        );
    }
    assert!(events(&mut n).is_empty());
}

#[test]
fn unknown_request_ids_are_ignored() {
    let f = fixture();
    let mut n = logged_in(NodeConfig::default(), 16);
    n.handle(
        data(
            42,
            f.expert.hash,
            0,
            chunk_of(&f.payload, 0),
            ChunkSource::Relay,
        ),
        0,
    );
    n.handle(
        FromRelay::ChunkFailed {
            req: 43,
            block: f.expert.hash,
            index: 0,
            reason: "x".into(),
        },
        0,
    );
    assert_eq!(n.stats().ignored, 2);
    assert_eq!(n.poll_transmit(), None);
    assert!(events(&mut n).is_empty());
    assert!(!n.is_held(&f.expert.hash));
}

#[test]
fn a_chunk_list_that_does_not_match_the_header_is_refused() {
    let f = fixture();
    let mut n = logged_in(NodeConfig::default(), 16);
    let mut l = list(&f);
    l[0] = BlockHash([0; 32]);
    assert!(matches!(
        n.fetch(&f.expert, l, Some(f.config.clone()), 0),
        Err(NodeError::ChunkList { .. })
    ));
    assert!(matches!(
        n.fetch(&f.expert, list(&f), None, 0),
        Err(NodeError::NoConfig { .. })
    ));
    assert!(!n.is_fetching(&f.expert.hash));
    assert!(gets(&drain(&mut n)).is_empty());
}

#[test]
fn a_payload_whose_tensors_break_the_config_fails_the_fetch() {
    // Chunks that hash right but a payload that is not the slot's tensors:
    // signed with a header naming another expert's payload root.
    let f = fixture();
    let key = SigningKey::from_bytes(&[9; 32]);
    let mut header = f.expert.header.clone();
    header.name = "layer0.expert0".into();
    header.payload_len = f.other_payload.len() as u64;
    header.payload_root = crate::chain::payload_root(&chunk_hashes(&f.other_payload, 4096));
    // The expert in `other` has a different slot (layer0.expert1 or so),
    // so its tensors do not fit this header's name.
    let block = Block::sign(header, &key);
    let mut n = logged_in(NodeConfig::default(), 64);
    n.fetch(
        &block,
        chunk_hashes(&f.other_payload, 4096),
        Some(f.config.clone()),
        0,
    )
    .unwrap();
    for (req, b, index) in gets(&drain(&mut n)) {
        n.handle(
            data(
                req,
                b,
                index,
                chunk_of(&f.other_payload, index),
                ChunkSource::Relay,
            ),
            0,
        );
    }
    let ev = events(&mut n);
    assert!(
        ev.iter()
            .any(|e| matches!(e, NodeEvent::FetchFailed { hash, .. } if *hash == block.hash)),
        "{ev:?}"
    );
    assert!(!n.is_held(&block.hash));
}

#[test]
fn hold_refuses_a_chunk_size_outside_the_limits() {
    let mut n = PeerNode::new(key(), NodeConfig::default());
    assert!(n.hold(BlockHash([1; 32]), vec![1, 2, 3].into(), 0).is_err());
    assert!(!n.is_held(&BlockHash([1; 32])));
}

#[test]
fn heartbeats_follow_the_status_interval() {
    let mut n = logged_in(NodeConfig::default(), 16);
    assert_eq!(n.poll_timeout(), Some(STATUS_INTERVAL_MS));
    n.handle_timeout(STATUS_INTERVAL_MS);
    assert!(matches!(drain(&mut n).as_slice(), [ToRelay::Status { .. }]));
    assert_eq!(n.poll_timeout(), Some(2 * STATUS_INTERVAL_MS));
}

#[test]
fn block_added_and_errors_become_events() {
    let mut n = logged_in(NodeConfig::default(), 16);
    n.handle(
        FromRelay::BlockAdded {
            hash: BlockHash([3; 32]),
            chain: ChainId::B,
            name: "layer0.expert1".into(),
        },
        0,
    );
    n.handle(FromRelay::error("banned", "until later"), 0);
    let ev = events(&mut n);
    assert!(matches!(ev[0], NodeEvent::BlockAdded { .. }));
    assert!(matches!(&ev[1], NodeEvent::RelayError { code, .. } if code == "banned"));
}

proptest! {
    /// Whatever the relay sends (decoded from arbitrary bytes, or arbitrary
    /// chunk answers), the node neither panics nor holds an unverified block.
    #[test]
    fn arbitrary_messages_never_panic(frames in proptest::collection::vec(
        proptest::collection::vec(any::<u8>(), 0..96), 0..40)) {
        let f = fixture_cached();
        let mut n = logged_in(NodeConfig { serve_compute: true, ..NodeConfig::default() }, 16);
        n.fetch(&f.expert, list(f), Some(f.config.clone()), 0).unwrap();
        drain(&mut n);
        for (t, bytes) in frames.iter().enumerate() {
            if let Ok(m) = decode_from_relay(bytes) {
                n.handle(m, t as u64);
            }
            n.handle_timeout(t as u64 * 1000);
            drain(&mut n);
        }
        prop_assert!(!n.is_held(&f.expert.hash));
    }

    #[test]
    fn arbitrary_chunk_answers_never_hold_bad_bytes(
        answers in proptest::collection::vec((0u64..40, 0u32..12, proptest::collection::vec(any::<u8>(), 0..5000)), 0..30)
    ) {
        let f = fixture_cached();
        let mut n = logged_in(NodeConfig::default(), 16);
        n.fetch(&f.expert, list(f), Some(f.config.clone()), 0).unwrap();
        drain(&mut n);
        for (req, index, bytes) in answers {
            n.handle(data(req, f.expert.hash, index, bytes, ChunkSource::Relay), 0);
            drain(&mut n);
        }
        if let Some(p) = n.payload(&f.expert.hash) {
            prop_assert_eq!(&*p, &f.payload[..]);
        }
    }
}

fn fixture_cached() -> &'static Fixture {
    static F: std::sync::OnceLock<Fixture> = std::sync::OnceLock::new();
    F.get_or_init(fixture)
}
