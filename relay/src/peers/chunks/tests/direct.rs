//! Introductions, signalling, proofs of lying and receipts, driven through
//! the core with real ed25519 keys.

use ed25519_dalek::SigningKey;
use web_node::net::direct::{limits as dl, ChunkStatement, Receipt, SignalKind};

use super::*;

fn sk(id: u8) -> SigningKey {
    SigningKey::from_bytes(&[id; 32])
}

fn pk(id: u8) -> PeerId {
    sk(id).verifying_key().to_bytes()
}

impl T {
    /// Log in key `id` (a real ed25519 key) on `conn`.
    fn login_key(&mut self, conn: ConnId, id: u8) {
        self.core
            .login(self.now, conn, pk(id), "t".into(), addr())
            .counted(&self.counters)
            .unwrap();
    }
    fn have_ok(&mut self, conn: ConnId, b: BlockHash) {
        let a = self.core.have(self.now, conn, &[b], &[], |_| true);
        assert!(a.counted(&self.counters).is_empty());
    }
    /// Introduce `conn` to a holder of `b`: (session, holder).
    fn intro(&mut self, conn: ConnId, b: BlockHash) -> (u64, Option<PeerId>, String) {
        let a = self
            .core
            .introduce(self.now, conn, 1, b)
            .counted(&self.counters);
        match &a[..] {
            [Action::Send {
                conn: c,
                msg:
                    FromRelay::Introduced {
                        session,
                        holder,
                        reason,
                        ..
                    },
            }] if *c == conn => (*session, *holder, reason.clone()),
            o => panic!("{o:?}"),
        }
    }
    fn signal(&mut self, conn: ConnId, s: u64, to: PeerId, body: &str) -> Vec<Action> {
        self.core
            .signal(self.now, conn, s, to, SignalKind::Offer, body.into())
            .counted(&self.counters)
    }
}

fn failed(a: &[Action]) -> String {
    match a {
        [Action::Send {
            msg: FromRelay::SignalFailed { reason, .. },
            ..
        }] => reason.clone(),
        o => panic!("expected SignalFailed, got {o:?}"),
    }
}

#[test]
fn signals_pass_only_between_an_introduced_pair_within_bounds() {
    let mut t = T::new();
    let b = BlockHash([9; 32]);
    for (c, id) in [(1, 1), (2, 2), (3, 3)] {
        t.login_key(c, id);
    }
    t.have_ok(1, b);
    // No holder accepts direct connections yet.
    assert_eq!(t.intro(2, b), (0, None, NO_DIRECT_HOLDER.to_string()));
    t.core.direct_accept(t.now, 1, true);
    let (s, holder, _) = t.intro(2, b);
    assert_eq!(holder, Some(pk(1)));
    // Offer from 2 to 1 is forwarded, naming 2; the answer goes back.
    let a = t.signal(2, s, pk(1), "v=0 offer");
    assert!(
        matches!(&a[..], [Action::Send { conn: 1, msg: FromRelay::Signal { from, body, .. } }]
        if *from == pk(2) && body == "v=0 offer")
    );
    let a = t.signal(1, s, pk(2), "v=0 answer");
    assert!(matches!(&a[..], [Action::Send { conn: 2, .. }]));
    // A third key cannot use the session, nor address someone else on it.
    assert!(failed(&t.signal(3, s, pk(1), "x")).contains("not the other side"));
    assert!(failed(&t.signal(2, s, pk(3), "x")).contains("not the other side"));
    assert!(failed(&t.signal(2, 999, pk(1), "x")).contains("no such introduction"));
    // Oversized bodies are refused before anything else.
    let big = "a".repeat(dl::MAX_SIGNAL_BODY + 1);
    assert!(failed(&t.signal(2, s, pk(1), &big)).contains("exceeds"));
    // A flood ends at the per-session count.
    let mut refused = 0;
    for _ in 0..dl::MAX_SIGNALS_PER_SESSION + 10 {
        if let [Action::Send {
            msg: FromRelay::SignalFailed { .. },
            ..
        }] = &t.signal(2, s, pk(1), "c")[..]
        {
            refused += 1;
        }
    }
    assert_eq!(refused, 12, "2 signals were sent before the flood");
    // Expiry: a session unused for its TTL is gone.
    let (s2, _, _) = t.intro(2, b);
    t.now += dl::SESSION_TTL + Duration::from_secs(1);
    assert!(failed(&t.signal(2, s2, pk(1), "late")).contains("no such introduction"));
    // A holder that logged out takes its sessions along.
    let (s3, _, _) = t.intro(2, b);
    let _ = t.core.logout(t.now, 1).counted(&t.counters);
    assert!(failed(&t.signal(2, s3, pk(1), "x")).contains("no such introduction"));
    assert_eq!(t.core.direct_sessions(), 0);
}

#[test]
fn introductions_per_peer_are_bounded_so_memory_stays_flat() {
    let mut t = T::new();
    let b = BlockHash([9; 32]);
    t.login_key(1, 1);
    t.login_key(2, 2);
    t.have_ok(1, b);
    t.core.direct_accept(t.now, 1, true);
    for _ in 0..dl::MAX_SESSIONS_PER_PEER {
        assert!(t.intro(2, b).1.is_some());
    }
    for _ in 0..1000 {
        assert_eq!(t.intro(2, b).2, TOO_MANY_SESSIONS);
    }
    assert_eq!(t.core.direct_sessions(), dl::MAX_SESSIONS_PER_PEER);
    // The holder is full too: a fresh requester gets no holder.
    t.login_key(3, 3);
    assert_eq!(t.intro(3, b).2, NO_DIRECT_HOLDER);
    // Bye ends a session at once.
    let a = t
        .core
        .signal(t.now, 2, 1, pk(1), SignalKind::Bye, String::new())
        .counted(&t.counters);
    assert!(matches!(&a[..], [Action::Send { conn: 1, .. }]));
    assert_eq!(t.core.direct_sessions(), dl::MAX_SESSIONS_PER_PEER - 1);
    // Its place is free again, for both keys.
    assert!(t.intro(2, b).1.is_some());
    assert_eq!(t.intro(2, b).2, TOO_MANY_SESSIONS);
    // Expired sessions are swept: both keys can be introduced again.
    t.now += dl::SESSION_TTL + Duration::from_secs(2);
    assert!(t.intro(3, b).1.is_some());
    assert_eq!(t.core.direct_sessions(), 1);
}

fn closed(a: &[Action], conn: ConnId) -> bool {
    a.iter()
        .any(|x| matches!(x, Action::Close { conn: c, code, .. } if *c == conn && *code == codes::BANNED))
}

fn verdict(a: &[Action]) -> (PeerId, bool) {
    a.iter()
        .find_map(|x| match x {
            Action::Send {
                msg: FromRelay::Verdict {
                    accused, guilty, ..
                },
                ..
            } => Some((*accused, *guilty)),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no Verdict in {a:?}"))
}

#[test]
fn a_signed_lie_bans_the_liar_and_a_false_proof_bans_its_sender() {
    let mut t = T::new();
    let i = info(&[b"good", b"ok"]);
    for (c, id) in [(1, 1), (2, 2), (3, 3)] {
        t.login_key(c, id);
    }
    // 1 lies to 2: a signed statement over other bytes.
    let lie = ChunkStatement::sign(&sk(1), pk(2), i.block, 0, b"evil", 5);
    let a = t
        .core
        .proof(t.now, 2, lie.clone(), Some(&i))
        .counted(&t.counters);
    assert_eq!(verdict(&a), (pk(1), true));
    assert!(closed(&a, 1), "{a:?}");
    assert!(t.core.banned_until(&pk(1), t.now).is_some());
    assert!(t.core.banned_until(&pk(2), t.now).is_none());
    assert_eq!(t.counters.snapshot().bans, 1);
    // The same proof again changes nothing.
    let a = t.core.proof(t.now, 2, lie, Some(&i)).counted(&t.counters);
    assert!(!a.iter().any(|x| matches!(x, Action::Close { .. })));

    // 3 forges a proof against 2 (signed with its own key): 3 is banned.
    let mut forged = ChunkStatement::sign(&sk(3), pk(3), i.block, 0, b"evil", 5);
    forged.body.server = pk(2);
    let a = t
        .core
        .proof(t.now, 3, forged, Some(&i))
        .counted(&t.counters);
    assert_eq!(verdict(&a), (pk(2), false));
    assert!(closed(&a, 3));
    assert!(t.core.banned_until(&pk(2), t.now).is_none());

    // A proof of a correct chunk bans its sender too.
    t.login_key(4, 4);
    t.login_key(5, 5);
    let honest = ChunkStatement::sign(&sk(4), pk(5), i.block, 1, b"ok", 5);
    let a = t
        .core
        .proof(t.now, 5, honest, Some(&i))
        .counted(&t.counters);
    assert_eq!(verdict(&a), (pk(4), false));
    assert!(closed(&a, 5) && t.core.banned_until(&pk(4), t.now).is_none());

    // Sent by someone other than the statement's receiver: its sender pays.
    t.login_key(6, 6);
    t.login_key(7, 7);
    let lie = ChunkStatement::sign(&sk(6), pk(2), i.block, 0, b"bad", 5);
    let a = t
        .core
        .proof(t.now, 7, lie.clone(), Some(&i))
        .counted(&t.counters);
    assert!(closed(&a, 7) && t.core.banned_until(&pk(6), t.now).is_none());

    // A block the relay does not hold: no one is blamed.
    t.login_key(8, 8);
    let a = t.core.proof(t.now, 8, lie, None).counted(&t.counters);
    assert_eq!(verdict(&a), (pk(6), false));
    assert!(!a.iter().any(|x| matches!(x, Action::Close { .. })));
}

fn credited(a: &[Action]) -> (u64, String) {
    match a {
        [Action::Send {
            msg: FromRelay::ReceiptTaken {
                credited, reason, ..
            },
            ..
        }] => (*credited, reason.clone()),
        o => panic!("{o:?}"),
    }
}

#[test]
fn receipts_credit_the_server_within_caps_and_only_from_real_fetchers() {
    let mut t = T::new();
    let i = info(&[b"aaaa", b"bb"]); // 6 payload bytes
    t.login_key(1, 1); // server
    t.login_key(2, 2); // receiver
    let now_ms = 1_000_000_000;
    let r = |bytes| Receipt {
        server: pk(1),
        receiver: pk(2),
        block: i.block,
        bytes,
        from_ms: now_ms - 10,
        to_ms: now_ms,
    };
    // A key that never fetched through this relay earns its server nothing.
    let a = t
        .core
        .receipt(t.now, now_ms, 2, r(6).sign(&sk(2)), Some(&i))
        .counted(&t.counters);
    assert!(credited(&a).1.contains("delivered a chunk"), "{a:?}");
    // 2 fetches one chunk through the relay (from the store).
    let a = t
        .core
        .get_chunk(t.now, 2, 1, i.block, 1, Some(i.clone()))
        .counted(&t.counters);
    let job = match &a[..] {
        [Action::ReadStore { job, .. }] => *job,
        o => panic!("{o:?}"),
    };
    let _ = t
        .core
        .store_read(job, Ok(b"bb".to_vec()))
        .counted(&t.counters);
    // Signed by another key, stale, or for a block not held: nothing.
    assert_eq!(
        credited(
            &t.core
                .receipt(t.now, now_ms, 2, r(6).sign(&sk(1)), Some(&i))
        )
        .0,
        0
    );
    assert_eq!(
        credited(&t.core.receipt(
            t.now,
            now_ms + dl::MAX_CLOCK_SKEW_MS + 1,
            2,
            r(6).sign(&sk(2)),
            Some(&i)
        ))
        .0,
        0
    );
    assert_eq!(
        credited(&t.core.receipt(t.now, now_ms, 2, r(6).sign(&sk(2)), None)).0,
        0
    );
    // A receipt sent by the server itself does not count.
    assert_eq!(
        credited(
            &t.core
                .receipt(t.now, now_ms, 1, r(6).sign(&sk(2)), Some(&i))
        )
        .0,
        0
    );
    // Credited up to the block's payload, then no more for that block.
    let a = t
        .core
        .receipt(t.now, now_ms, 2, r(4).sign(&sk(2)), Some(&i))
        .counted(&t.counters);
    assert_eq!(credited(&a).0, 4);
    let a = t
        .core
        .receipt(t.now, now_ms, 2, r(100).sign(&sk(2)), Some(&i))
        .counted(&t.counters);
    assert_eq!(credited(&a).0, 2);
    let a = t
        .core
        .receipt(t.now, now_ms, 2, r(1).sign(&sk(2)), Some(&i))
        .counted(&t.counters);
    assert_eq!(credited(&a).0, 0);
    let s = t.counters.snapshot();
    assert_eq!(
        (s.direct_bytes, s.receipts, s.relay_forwarded_bytes),
        (6, 2, 2)
    );
    assert_eq!(s.peer(&pk(2)).direct_bytes, 6);
    assert_eq!(s.peer(&pk(2)).relay_forwarded_bytes, 2);
    assert_eq!(s.peer(&pk(1)).direct_bytes_served, 6);
}
