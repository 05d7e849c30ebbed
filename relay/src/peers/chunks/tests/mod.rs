//! The core driven directly: events in, actions out. Each entry point's
//! [`Action::Usage`] events are counted into [`Counters`] by
//! [`Counters::record`], as the driver does, and left out of what the test
//! sees, so the tests look at the other actions and at the counters.
//!
//! May import: `peers` and its parts (test code of the core).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use web_node::chain::BlockHash;
use web_node::net::peer::{codes, limits, ChunkSource, FromRelay, PeerId};

use super::*;
use crate::peers::stats::Counters;

mod direct;
mod links;

/// What an entry point returns, with its usage counted and left out.
trait Counted {
    fn counted(self, c: &Counters) -> Self;
}

impl Counted for Vec<Action> {
    fn counted(self, c: &Counters) -> Self {
        self.into_iter()
            .filter(|a| match a {
                Action::Usage(e) => {
                    c.record(e);
                    false
                }
                _ => true,
            })
            .collect()
    }
}

impl<E> Counted for Result<Vec<Action>, E> {
    fn counted(self, c: &Counters) -> Self {
        self.map(|a| a.counted(c))
    }
}

impl Counted for Option<Vec<Action>> {
    fn counted(self, c: &Counters) -> Self {
        self.map(|a| a.counted(c))
    }
}

impl Counted for Option<(u64, PeerId, Vec<Action>)> {
    fn counted(self, c: &Counters) -> Self {
        self.map(|(r, p, a)| (r, p, a.counted(c)))
    }
}

fn addr() -> SocketAddr {
    "127.0.0.1:1".parse().unwrap()
}

fn info(chunks: &[&[u8]]) -> Arc<ChunkInfo> {
    let len: usize = chunks.iter().map(|c| c.len()).sum();
    Arc::new(ChunkInfo {
        block: BlockHash([9; 32]),
        chunks: chunks.iter().map(|c| BlockHash::of(c)).collect(),
        chunk_size: chunks[0].len() as u32,
        payload_len: len as u64,
    })
}

struct T {
    core: Core,
    now: Instant,
    counters: Arc<Counters>,
}

impl T {
    fn new() -> Self {
        let counters = Arc::new(Counters::default());
        Self {
            core: Core::new(ChunkConfig::default()),
            now: Instant::now(),
            counters,
        }
    }
    fn login(&mut self, conn: ConnId, id: u8) -> Vec<Action> {
        self.core
            .login(self.now, conn, [id; 32], "t".into(), addr())
            .counted(&self.counters)
            .unwrap()
    }
    fn have(&mut self, conn: ConnId, b: BlockHash) {
        let a = self
            .core
            .have(self.now, conn, &[b], &[], |_| true)
            .counted(&self.counters);
        assert!(a.is_empty(), "{a:?}");
    }
}

fn serve_to(a: &[Action]) -> (ConnId, u64) {
    match a {
        [Action::Send {
            conn,
            msg: FromRelay::ServeChunk { req, .. },
        }] => (*conn, *req),
        other => panic!("expected one ServeChunk, got {other:?}"),
    }
}

fn data_to(a: &[Action]) -> (ConnId, Vec<u8>, ChunkSource) {
    let found = a.iter().find_map(|x| match x {
        Action::Send {
            conn,
            msg: FromRelay::ChunkData { data, from, .. },
        } => Some((*conn, data.clone(), *from)),
        _ => None,
    });
    found.unwrap_or_else(|| panic!("no ChunkData in {a:?}"))
}

#[test]
fn chunk_goes_to_a_holder_and_is_checked() {
    let mut t = T::new();
    let i = info(&[b"aaaa", b"bb"]);
    t.login(1, 1);
    t.login(2, 2);
    t.have(1, i.block);
    let a = t
        .core
        .get_chunk(t.now, 2, 77, i.block, 1, Some(i.clone()))
        .counted(&t.counters);
    let (conn, job) = serve_to(&a);
    assert_eq!(conn, 1);
    let a = t
        .core
        .chunk(t.now, 1, job, b"bb".to_vec())
        .counted(&t.counters);
    let (to, data, from) = data_to(&a);
    assert_eq!(
        (to, data, from),
        (2, b"bb".to_vec(), ChunkSource::Peer([1; 32]))
    );
    let s = t.counters.snapshot();
    assert_eq!(
        (s.chunks_from_peers, s.bytes_from_peers, s.chunks_from_store),
        (1, 2, 0)
    );
    assert_eq!(s.peer(&[1; 32]).bytes_served, 2);
}

#[test]
fn the_requester_is_never_its_own_holder_and_the_store_is_the_fallback() {
    let mut t = T::new();
    let i = info(&[b"aaaa"]);
    t.login(1, 1);
    t.have(1, i.block);
    let a = t
        .core
        .get_chunk(t.now, 1, 5, i.block, 0, Some(i.clone()))
        .counted(&t.counters);
    let job = match &a[..] {
        [Action::ReadStore { job, index: 0, .. }] => *job,
        o => panic!("{o:?}"),
    };
    let a = t
        .core
        .store_read(job, Ok(b"aaaa".to_vec()))
        .counted(&t.counters);
    assert_eq!(data_to(&a).2, ChunkSource::Relay);
    assert_eq!(t.counters.snapshot().chunks_from_store, 1);
}

#[test]
fn a_liar_is_caught_banned_after_repeats_and_the_chunk_comes_from_elsewhere() {
    let mut t = T::new();
    let i = info(&[b"good"]);
    t.login(1, 1); // liar
    t.login(2, 2); // requester
    t.have(1, i.block);
    for round in 0..2 {
        let a = t
            .core
            .get_chunk(t.now, 2, round, i.block, 0, Some(i.clone()))
            .counted(&t.counters);
        let (conn, job) = serve_to(&a);
        assert_eq!(conn, 1);
        let a = t
            .core
            .chunk(t.now, 1, job, b"evil".to_vec())
            .counted(&t.counters);
        // Not forwarded; the store reads it instead.
        assert!(a.iter().all(|x| !matches!(
            x,
            Action::Send {
                msg: FromRelay::ChunkData { .. },
                ..
            }
        )));
        let job2 = a
            .iter()
            .find_map(|x| match x {
                Action::ReadStore { job, .. } => Some(*job),
                _ => None,
            })
            .expect("store fallback");
        assert_eq!(job2, job);
        let banned = a
            .iter()
            .any(|x| matches!(x, Action::Close { conn: 1, code, .. } if *code == codes::BANNED));
        assert_eq!(banned, round == 1, "banned on the second bad chunk");
        let d = t
            .core
            .store_read(job, Ok(b"good".to_vec()))
            .counted(&t.counters);
        assert_eq!(data_to(&d).1, b"good".to_vec());
    }
    assert_eq!(t.core.online(), 1);
    assert!(t.core.holders_of(&i.block).is_empty());
    let r = t
        .core
        .login(t.now, 3, [1; 32], "again".into(), addr())
        .counted(&t.counters);
    assert_eq!(r.unwrap_err().code, codes::BANNED);
    // After the ban, logging in works; the next ban is twice as long.
    let later = t.now + Duration::from_secs(61);
    t.core
        .login(later, 4, [1; 32], "t".into(), addr())
        .counted(&t.counters)
        .unwrap();
    t.core
        .have(later, 4, &[i.block], &[], |_| true)
        .counted(&t.counters);
    for round in 0..2 {
        let a = t
            .core
            .get_chunk(later, 2, 10 + round, i.block, 0, Some(i.clone()))
            .counted(&t.counters);
        let (_, job) = serve_to(&a);
        t.core
            .chunk(later, 4, job, b"evil".to_vec())
            .counted(&t.counters);
    }
    let until = t.core.banned_until(&[1; 32], later).unwrap();
    assert_eq!(until - later, Duration::from_secs(120));
    let s = t.counters.snapshot();
    assert_eq!((s.bad_chunks, s.bans), (4, 2));
}

#[test]
fn timeouts_and_no_chunk_move_on_to_the_next_holder() {
    let mut t = T::new();
    let i = info(&[b"abc"]);
    for c in 1..=3 {
        t.login(c, c as u8);
    }
    t.have(1, i.block);
    t.have(2, i.block);
    let a = t
        .core
        .get_chunk(t.now, 3, 1, i.block, 0, Some(i.clone()))
        .counted(&t.counters);
    let (first, job) = serve_to(&a);
    // Timeout: the other holder is asked.
    let later = t.now + t.core.config().chunk_timeout + Duration::from_millis(1);
    let a = t.core.handle_timeout(later).counted(&t.counters);
    let (second, job2) = serve_to(&a);
    assert_ne!(first, second);
    assert_eq!(job, job2);
    // The late answer of the first holder is ignored.
    assert!(t
        .core
        .chunk(later, first, job, b"abc".to_vec())
        .counted(&t.counters)
        .is_empty());
    // NoChunk from the second: no holder left, the store.
    let a = t.core.no_chunk(later, second, job).counted(&t.counters);
    assert!(matches!(&a[..], [Action::ReadStore { .. }]), "{a:?}");
    assert_eq!(t.counters.snapshot().chunk_timeouts, 1);
    assert_eq!(t.core.holders_of(&i.block), vec![[first as u8; 32]]);
}

#[test]
fn parallel_requests_spread_over_holders_and_respect_serve_credits() {
    let mut t = T::new();
    let i = info(&[b"a", b"b", b"c", b"d"]);
    for c in 1..=3 {
        t.login(c, c as u8);
    }
    t.have(1, i.block);
    t.have(2, i.block);
    let mut at = HashMap::new();
    for k in 0..4u32 {
        let a = t
            .core
            .get_chunk(t.now, 3, u64::from(k), i.block, k, Some(i.clone()))
            .counted(&t.counters);
        *at.entry(serve_to(&a).0).or_insert(0) += 1;
    }
    assert_eq!(at.get(&1), Some(&2));
    assert_eq!(at.get(&2), Some(&2));
    // Credits: past SERVE_CREDITS at the only holder, requests wait for
    // a credit (peers first), and go to the store after the chunk timeout.
    let mut t = T::new();
    let chunks: Vec<&[u8]> = vec![b"x"; 20];
    let i = info(&chunks);
    t.login(1, 1);
    t.login(2, 2);
    t.have(1, i.block);
    let mut served = Vec::new();
    for k in 0..12u32 {
        let a = t
            .core
            .get_chunk(t.now, 2, u64::from(k), i.block, k, Some(i.clone()))
            .counted(&t.counters);
        if a.is_empty() {
            continue; // parked
        }
        served.push(serve_to(&a).1);
    }
    assert_eq!(served.len(), limits::SERVE_CREDITS as usize);
    // One answer frees a credit: a parked request goes to the holder.
    let a = t
        .core
        .chunk(t.now, 1, served[0], b"x".to_vec())
        .counted(&t.counters);
    assert_eq!(data_to(&a).2, ChunkSource::Peer([1; 32]));
    assert!(a.iter().any(|x| matches!(
        x,
        Action::Send {
            conn: 1,
            msg: FromRelay::ServeChunk { .. }
        }
    )));
    // At the chunk timeout the 8 unanswered requests go to the store (no
    // other holder) and their freed credits take the 3 still parked.
    let later = t.now + t.core.config().chunk_timeout + Duration::from_millis(1);
    let a = t.core.handle_timeout(later).counted(&t.counters);
    let count = |f: &dyn Fn(&Action) -> bool| a.iter().filter(|x| f(x)).count();
    assert_eq!(count(&|x| matches!(x, Action::ReadStore { .. })), 8);
    assert_eq!(
        count(&|x| matches!(
            x,
            Action::Send {
                conn: 1,
                msg: FromRelay::ServeChunk { .. }
            }
        )),
        3
    );
    assert_eq!(t.core.jobs_in_flight(), 11);
}

#[test]
fn requester_credits_unknown_blocks_and_bad_indexes_fail_at_once() {
    let mut t = T::new();
    let blocks: Vec<&[u8]> = vec![b"x"; 40];
    let i = info(&blocks);
    t.login(1, 1);
    let reason = |a: &[Action]| match a {
        [Action::Send {
            msg: FromRelay::ChunkFailed { reason, .. },
            ..
        }] => reason.clone(),
        o => panic!("{o:?}"),
    };
    assert!(reason(
        &t.core
            .get_chunk(t.now, 1, 1, i.block, 0, None)
            .counted(&t.counters)
    )
    .contains("unknown block"));
    assert!(reason(
        &t.core
            .get_chunk(t.now, 1, 1, i.block, 40, Some(i.clone()))
            .counted(&t.counters)
    )
    .contains("out of range"));
    for k in 0..limits::CHUNK_CREDITS {
        let a = t
            .core
            .get_chunk(t.now, 1, u64::from(k), i.block, k, Some(i.clone()))
            .counted(&t.counters);
        assert!(matches!(&a[..], [Action::ReadStore { .. }]));
    }
    assert_eq!(
        reason(
            &t.core
                .get_chunk(t.now, 1, 99, i.block, 0, Some(i.clone()))
                .counted(&t.counters)
        ),
        "credits"
    );
}

#[test]
fn second_login_replaces_the_first_and_a_holder_leaving_resends_its_jobs() {
    let mut t = T::new();
    let i = info(&[b"q"]);
    t.login(1, 1);
    t.login(2, 2);
    t.have(1, i.block);
    let a = t
        .core
        .get_chunk(t.now, 2, 1, i.block, 0, Some(i.clone()))
        .counted(&t.counters);
    let (_, job) = serve_to(&a);
    let a = t.login(5, 1);
    assert!(a
        .iter()
        .any(|x| matches!(x, Action::Close { conn: 1, code, .. } if *code == codes::REPLACED)));
    assert!(a
        .iter()
        .any(|x| matches!(x, Action::ReadStore { job: j, .. } if *j == job)));
    assert_eq!(t.core.peer_of(5), Some([1; 32]));
    assert_eq!(t.core.peer_of(1), None);
    // The replaced connection's late logout changes nothing.
    assert!(t.core.logout(t.now, 1).counted(&t.counters).is_empty());
    assert_eq!(t.core.online(), 2);
}

#[test]
fn have_ignores_unknown_blocks_and_is_bounded_per_message() {
    let mut t = T::new();
    t.login(1, 1);
    let known = BlockHash([1; 32]);
    let a = t
        .core
        .have(t.now, 1, &[known, BlockHash([2; 32])], &[], |b| *b == known)
        .counted(&t.counters);
    assert!(
        matches!(&a[..], [Action::Send { msg: FromRelay::Error { code, .. }, .. }] if code == codes::PROTOCOL)
    );
    assert_eq!(t.core.holders_of(&known), vec![[1; 32]]);
    assert!(t.core.holders_of(&BlockHash([2; 32])).is_empty());
    let many = vec![known; limits::MAX_HAVE_PER_MSG + 1];
    assert_eq!(
        t.core
            .have(t.now, 1, &many, &[], |_| true)
            .counted(&t.counters)
            .len(),
        1
    );
    t.core
        .have(t.now, 1, &[], &[known], |_| true)
        .counted(&t.counters);
    assert!(t.core.holders_of(&known).is_empty());
}

#[test]
fn compute_checks_output_backs_off_failures_and_fails_on_disconnect() {
    let mut t = T::new();
    let b = BlockHash([3; 32]);
    for c in 1..=2 {
        t.login(c, c as u8);
        t.core.status(t.now, c, 0, true);
        t.have(c, b);
    }
    let (req, p1, _) = t
        .core
        .compute_start(t.now, b, 1, vec![1.0; 4], &[])
        .counted(&t.counters)
        .unwrap();
    let conn1 = if p1 == [1; 32] { 1 } else { 2 };
    // Garbage (wrong length) fails and backs the peer off.
    let a = t
        .core
        .compute_result(t.now, conn1, req, vec![0.0; 3])
        .counted(&t.counters);
    assert!(matches!(
        &a[..],
        [Action::ComputeDone {
            outcome: ComputeOutcome::Failed { .. },
            ..
        }]
    ));
    let (req2, p2, _) = t
        .core
        .compute_start(t.now, b, 1, vec![1.0; 4], &[p1])
        .counted(&t.counters)
        .unwrap();
    assert_ne!(p1, p2);
    // p1 is in backoff: not picked even when nothing else is left.
    assert!(t
        .core
        .compute_start(t.now, b, 1, vec![1.0; 4], &[p2])
        .counted(&t.counters)
        .is_none());
    // A disconnect fails the pending request at once.
    let conn2 = 3 - conn1;
    let a = t.core.logout(t.now, conn2).counted(&t.counters);
    assert!(
        matches!(&a[..], [Action::ComputeDone { req, outcome: ComputeOutcome::Failed { .. } }] if *req == req2)
    );
    // NaN output fails; a good answer counts.
    let later = t.now + Duration::from_secs(6);
    let (r3, _, _) = t
        .core
        .compute_start(later, b, 1, vec![1.0; 2], &[])
        .counted(&t.counters)
        .unwrap();
    let a = t
        .core
        .compute_result(later, conn1, r3, vec![f32::NAN, 0.0])
        .counted(&t.counters);
    assert!(matches!(
        &a[..],
        [Action::ComputeDone {
            outcome: ComputeOutcome::Failed { .. },
            ..
        }]
    ));
    let much_later = later + Duration::from_secs(60);
    let (r4, _, _) = t
        .core
        .compute_start(much_later, b, 1, vec![1.0; 2], &[])
        .counted(&t.counters)
        .unwrap();
    let a = t
        .core
        .compute_result(much_later, conn1, r4, vec![0.5, 0.5])
        .counted(&t.counters);
    assert!(matches!(
        &a[..],
        [Action::ComputeDone {
            outcome: ComputeOutcome::Answered { .. },
            ..
        }]
    ));
    let s = t.counters.snapshot();
    assert_eq!(
        (s.compute_sent, s.compute_answered, s.compute_failed),
        (4, 1, 3)
    );
}

#[test]
fn silent_peers_expire() {
    let mut t = T::new();
    t.login(1, 1);
    let a = t
        .core
        .handle_timeout(t.now + t.core.config().idle_timeout + Duration::from_secs(1))
        .counted(&t.counters);
    assert!(matches!(&a[..], [Action::Close { conn: 1, .. }]));
    assert_eq!(t.core.online(), 0);
}

#[test]
fn usage_comes_back_as_actions_before_what_it_counts() {
    let mut t = T::new();
    let i = info(&[b"aaaa", b"bb"]);
    let a = t.core.login(t.now, 1, [1; 32], "t".into(), addr()).unwrap();
    assert_eq!(
        a,
        vec![Action::Usage(UsageEvent::Login {
            kind: ConnKind::Peer
        })]
    );
    t.login(2, 2);
    t.have(1, i.block);
    let a = t.core.get_chunk(t.now, 2, 7, i.block, 1, Some(i.clone()));
    let (_, job) = serve_to(&a);
    let later = t.now + Duration::from_millis(30);
    let a = t.core.chunk(later, 1, job, b"bb".to_vec());
    assert_eq!(
        &a[..2],
        &[
            Action::Usage(UsageEvent::ChunkServed {
                peer: [1; 32],
                block: i.block,
                bytes: 2,
            }),
            Action::Usage(UsageEvent::Fetch {
                peer: [2; 32],
                block: i.block,
                bytes: 2,
            }),
        ]
    );
    assert_eq!(data_to(&a[2..]).0, 2);
    // Nothing was counted: counting is the driver's.
    assert_eq!(t.counters.snapshot().chunks_from_peers, 0);
    // The time is the caller's: the latency sample and the login age.
    let v = t.core.views(later + Duration::from_secs(1));
    assert_eq!(v[0].latency_ms, Some(30.0));
    assert_eq!(v[0].connected_for, Duration::from_millis(1030));
}
