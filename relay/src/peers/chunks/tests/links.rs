//! Several relays: presence, lookups, links.

use super::*;

fn remote(n: u8) -> RemoteRelay {
    RemoteRelay {
        id: format!("relay{n}"),
        key: [n; 32],
        ws_url: format!("ws://127.0.0.{n}:1/ws"),
    }
}

fn cluster() -> T {
    let mut t = T::new();
    t.core.enable_cluster();
    t
}

/// (conn, job, index) of every ServeChunk in `a`.
fn serves(a: &[Action]) -> Vec<(ConnId, u64, u32)> {
    a.iter()
        .filter_map(|x| match x {
            Action::Send {
                conn,
                msg: FromRelay::ServeChunk { req, index, .. },
            } => Some((*conn, *req, *index)),
            _ => None,
        })
        .collect()
}

fn store_jobs(a: &[Action]) -> Vec<u64> {
    a.iter()
        .filter_map(|x| match x {
            Action::ReadStore { job, .. } => Some(*job),
            _ => None,
        })
        .collect()
}

/// A link to `r` up on `conn` after a lookup for `i` named it.
fn link_up_for(t: &mut T, i: &Arc<ChunkInfo>, r: &RemoteRelay, conn: ConnId) -> Vec<Action> {
    let a = t
        .core
        .remote_holders(t.now, i.block, vec![r.clone()])
        .counted(&t.counters);
    let l = link_id(&r.key);
    assert!(
        a.contains(&Action::OpenLink {
            link: l,
            relay: r.clone()
        }),
        "{a:?}"
    );
    t.core
        .link_up(t.now, l, conn)
        .counted(&t.counters)
        .expect("wanted")
}

#[test]
fn a_chunk_no_local_peer_holds_goes_over_a_link_and_is_checked_again() {
    let mut t = cluster();
    let i = info(&[b"aaaa", b"bb"]);
    let r = remote(7);
    t.login(2, 2);
    assert!(t
        .core
        .relays_alive(t.now, vec![r.clone()])
        .counted(&t.counters)
        .is_empty());
    let a = t
        .core
        .get_chunk(t.now, 2, 77, i.block, 1, Some(i.clone()))
        .counted(&t.counters);
    assert_eq!(a, vec![Action::Lookup { block: i.block }]);
    // A second request for the block waits for the same lookup.
    let a = t
        .core
        .get_chunk(t.now, 2, 78, i.block, 0, Some(i.clone()))
        .counted(&t.counters);
    assert!(a.is_empty(), "{a:?}");
    let a = link_up_for(&mut t, &i, &r, 100);
    let s = serves(&a);
    assert_eq!(s.len(), 2, "both go over the link: {a:?}");
    assert!(s.iter().all(|x| x.0 == 100));
    let job = |k: u32| s.iter().find(|x| x.2 == k).map(|x| x.1).unwrap();
    let a = t
        .core
        .link_chunk(
            t.now,
            100,
            job(1),
            i.block,
            1,
            b"bb".to_vec(),
            ChunkSource::Peer([5; 32]),
        )
        .counted(&t.counters);
    assert_eq!(data_to(&a), (2, b"bb".to_vec(), ChunkSource::Peer([5; 32])));
    // A lying answer is not delivered: the store answers instead.
    let a = t
        .core
        .link_chunk(
            t.now,
            100,
            job(0),
            i.block,
            0,
            b"evil".to_vec(),
            ChunkSource::Peer([5; 32]),
        )
        .counted(&t.counters);
    assert_eq!(store_jobs(&a), vec![job(0)]);
    let st = t.counters.snapshot();
    assert_eq!(
        (
            st.chunks_from_relays,
            st.bytes_from_relays,
            st.chunks_from_peers
        ),
        (1, 2, 0)
    );
    assert_eq!((st.bad_chunks, st.bad_chunks_from_relays), (1, 1));
    // Neither the link nor the relay's peer earn anything here.
    assert_eq!(
        st.peer(&link_id(&r.key)),
        crate::peers::PeerCounters::default()
    );
    assert_eq!(st.peer(&[5; 32]), crate::peers::PeerCounters::default());
    assert_eq!(
        (st.links_up, st.links_opened, st.presence_lookups),
        (1, 1, 1)
    );
    // The link is no peer.
    assert_eq!(t.core.online(), 1);
    assert_eq!(t.core.views(t.now).len(), 1);
    assert_eq!(t.core.link_views(t.now)[0].state, "up");
}

#[test]
fn local_peers_come_first_and_a_lying_link_is_banned_like_a_peer() {
    let mut t = cluster();
    let i = info(&[b"x", b"y", b"z"]);
    let r = remote(7);
    t.login(1, 1);
    t.login(2, 2);
    t.core
        .relays_alive(t.now, vec![r.clone()])
        .counted(&t.counters);
    t.core
        .have(t.now, 1, &[i.block], &[], |_| true)
        .counted(&t.counters);
    let a = t
        .core
        .get_chunk(t.now, 2, 1, i.block, 0, Some(i.clone()))
        .counted(&t.counters);
    assert_eq!(serve_to(&a).0, 1, "the local holder, no lookup");
    assert_eq!(t.counters.snapshot().presence_lookups, 0);
    // The holder leaves: its job looks for another (a lookup), and a
    // new request waits for the same lookup.
    let a = t.core.logout(t.now, 1).counted(&t.counters);
    assert_eq!(
        a,
        vec![
            Action::Presence(PresenceChange::Gone { peer: [1; 32] }),
            Action::Lookup { block: i.block }
        ]
    );
    assert!(t
        .core
        .get_chunk(t.now, 2, 2, i.block, 1, Some(i.clone()))
        .counted(&t.counters)
        .is_empty());
    let a = link_up_for(&mut t, &i, &r, 100);
    let s = serves(&a);
    assert_eq!(s.len(), 2, "{a:?}");
    for (n, (_, job, index)) in s.into_iter().enumerate() {
        let a = t
            .core
            .link_chunk(
                t.now,
                100,
                job,
                i.block,
                index,
                b"?".to_vec(),
                ChunkSource::Relay,
            )
            .counted(&t.counters);
        assert_eq!(store_jobs(&a), vec![job]);
        let banned = a
            .iter()
            .any(|x| matches!(x, Action::Close { conn: 100, code, .. } if *code == codes::BANNED));
        assert_eq!(banned, n == 1, "banned on the second bad chunk");
    }
    let l = link_id(&r.key);
    assert!(t.core.banned_until(&l, t.now).is_some());
    // While banned it is neither used nor opened again.
    let a = t
        .core
        .get_chunk(t.now, 2, 4, i.block, 0, Some(i.clone()))
        .counted(&t.counters);
    assert_eq!(store_jobs(&a).len(), 1, "{a:?}");
    let later = t.now + Duration::from_secs(5);
    let a = t
        .core
        .remote_holders(later, i.block, vec![r.clone()])
        .counted(&t.counters);
    assert!(a.is_empty(), "{a:?}");
    let a = t
        .core
        .get_chunk(later, 2, 5, i.block, 0, Some(i.clone()))
        .counted(&t.counters);
    assert_eq!(store_jobs(&a).len(), 1, "{a:?}");
}

#[test]
fn requests_of_another_relay_stay_with_local_peers_and_earn_it_nothing() {
    let mut t = cluster();
    let i = info(&[b"abc"]);
    t.core
        .relays_alive(t.now, vec![remote(7)])
        .counted(&t.counters);
    t.core
        .login_as(t.now, 3, [7; 32], "relay".into(), addr(), ConnKind::Relay)
        .counted(&t.counters)
        .unwrap();
    // No local holder: failed at once (no lookup, no link, no store).
    let a = t
        .core
        .get_chunk(t.now, 3, 1, i.block, 0, Some(i.clone()))
        .counted(&t.counters);
    assert!(
        matches!(&a[..], [Action::Send { conn: 3, msg: FromRelay::ChunkFailed { reason, .. } }] if reason == NO_LOCAL_HOLDER),
        "{a:?}"
    );
    // A relay holds nothing and serves no computation.
    let a = t
        .core
        .have(t.now, 3, &[i.block], &[], |_| true)
        .counted(&t.counters);
    assert!(matches!(
        &a[..],
        [Action::Send {
            conn: 3,
            msg: FromRelay::Error { .. }
        }]
    ));
    t.core.status(t.now, 3, 0, true);
    assert_eq!(t.core.compute_peers(), 0);
    assert!(t.core.holders_of(&i.block).is_empty());
    // A local holder serves it; the holder earns, the relay is no peer.
    t.login(1, 1);
    t.core
        .have(t.now, 1, &[i.block], &[], |_| true)
        .counted(&t.counters);
    let a = t
        .core
        .get_chunk(t.now, 3, 2, i.block, 0, Some(i.clone()))
        .counted(&t.counters);
    let (_, job) = serve_to(&a);
    let a = t
        .core
        .chunk(t.now, 1, job, b"abc".to_vec())
        .counted(&t.counters);
    assert_eq!(
        data_to(&a),
        (3, b"abc".to_vec(), ChunkSource::Peer([1; 32]))
    );
    let s = t.counters.snapshot();
    assert_eq!((s.chunks_to_relays, s.bytes_to_relays), (1, 3));
    assert_eq!(s.peer(&[1; 32]).bytes_served, 3);
    assert_eq!((s.relays_online, s.peers_online, s.logins), (1, 1, 1));
    assert_eq!(t.core.online(), 1);
    assert!(t.core.views(t.now).iter().all(|v| v.id != [7; 32]));
    assert!(
        t.core.logout(t.now, 3).counted(&t.counters).is_empty(),
        "no presence for a relay"
    );
    assert_eq!(t.counters.snapshot().relays_online, 0);
}

#[test]
fn presence_follows_have_no_chunk_and_logout_in_cluster_mode_only() {
    let i = info(&[b"q"]);
    let other = BlockHash([3; 32]);
    let mut plain = T::new();
    plain.login(1, 1);
    plain.have(1, i.block); // no Presence without the cluster
    let mut t = cluster();
    t.login(1, 1);
    t.login(2, 2);
    let a = t
        .core
        .have(t.now, 1, &[i.block, other], &[], |_| true)
        .counted(&t.counters);
    assert_eq!(
        a,
        vec![Action::Presence(PresenceChange::Add {
            peer: [1; 32],
            blocks: vec![i.block, other]
        })]
    );
    let a = t
        .core
        .have(t.now, 1, &[], &[other, BlockHash([4; 32])], |_| true)
        .counted(&t.counters);
    assert_eq!(
        a,
        vec![Action::Presence(PresenceChange::Remove {
            peer: [1; 32],
            blocks: vec![other]
        })]
    );
    assert_eq!(t.core.presence_snapshot(), vec![([1; 32], vec![i.block])]);
    let a = t
        .core
        .get_chunk(t.now, 2, 1, i.block, 0, Some(i.clone()))
        .counted(&t.counters);
    let (_, job) = serve_to(&a);
    let a = t.core.no_chunk(t.now, 1, job).counted(&t.counters);
    assert!(a.contains(&Action::Presence(PresenceChange::Remove {
        peer: [1; 32],
        blocks: vec![i.block]
    })));
    t.core
        .have(t.now, 1, &[i.block], &[], |_| true)
        .counted(&t.counters);
    let a = t.core.logout(t.now, 1).counted(&t.counters);
    assert_eq!(
        a,
        vec![Action::Presence(PresenceChange::Gone { peer: [1; 32] })]
    );
    // A peer that held nothing leaves no trace.
    assert!(t.core.logout(t.now, 2).counted(&t.counters).is_empty());
}

#[test]
fn a_failed_or_lost_link_backs_off_and_its_jobs_go_to_the_store() {
    let mut t = cluster();
    let i = info(&[b"a", b"b", b"c"]);
    let r = remote(7);
    let l = link_id(&r.key);
    t.login(2, 2);
    t.core
        .relays_alive(t.now, vec![r.clone()])
        .counted(&t.counters);
    t.core
        .get_chunk(t.now, 2, 1, i.block, 0, Some(i.clone()))
        .counted(&t.counters);
    let a = t
        .core
        .remote_holders(t.now, i.block, vec![r.clone()])
        .counted(&t.counters);
    assert!(matches!(&a[..], [Action::OpenLink { .. }]), "{a:?}");
    // Connecting failed: the waiting job goes to the store.
    let a = t.core.link_down(t.now, l, None).counted(&t.counters);
    assert_eq!(store_jobs(&a).len(), 1, "{a:?}");
    // Within the backoff: straight to the store, nothing opened.
    let a = t
        .core
        .get_chunk(t.now, 2, 2, i.block, 1, Some(i.clone()))
        .counted(&t.counters);
    assert_eq!(store_jobs(&a).len(), 1, "{a:?}");
    // After it: opened again, up, used.
    let later = t.now + LINK_BACKOFF_BASE + Duration::from_millis(1);
    let a = t
        .core
        .get_chunk(later, 2, 3, i.block, 2, Some(i.clone()))
        .counted(&t.counters);
    assert!(matches!(&a[..], [Action::OpenLink { .. }]), "{a:?}");
    let a = t.core.link_up(later, l, 100).counted(&t.counters).unwrap();
    let (conn, job, _) = serves(&a)[0];
    assert_eq!(conn, 100);
    // Lost while asked: the job is asked elsewhere (the store).
    let a = t.core.link_down(later, l, Some(100)).counted(&t.counters);
    assert_eq!(store_jobs(&a), vec![job]);
    assert_eq!(t.core.link_views(later)[0].state, "down");
    let s = t.counters.snapshot();
    assert_eq!((s.links_up, s.link_failures, s.links_opened), (0, 2, 2));
    // A late answer on the closed link changes nothing.
    assert!(t
        .core
        .link_chunk(
            later,
            100,
            job,
            i.block,
            2,
            b"c".to_vec(),
            ChunkSource::Relay
        )
        .counted(&t.counters)
        .is_empty());
}

#[test]
fn a_relay_that_says_it_has_no_holder_is_skipped_and_dead_relays_lose_their_links() {
    let mut t = cluster();
    let i = info(&[b"a", b"b"]);
    let r = remote(7);
    t.login(2, 2);
    t.core
        .relays_alive(t.now, vec![r.clone()])
        .counted(&t.counters);
    t.core
        .get_chunk(t.now, 2, 1, i.block, 0, Some(i.clone()))
        .counted(&t.counters);
    let a = link_up_for(&mut t, &i, &r, 100);
    let (_, job, _) = serves(&a)[0];
    // Out of credits only: asked again later, the relay still counts.
    let a = t
        .core
        .link_failed(t.now, 100, job, CREDITS)
        .counted(&t.counters);
    assert_eq!(store_jobs(&a), vec![job]);
    let a = t
        .core
        .get_chunk(t.now, 2, 2, i.block, 1, Some(i.clone()))
        .counted(&t.counters);
    let (_, job, _) = serves(&a)[0];
    // No holder there: the relay no longer counts for the block.
    let a = t
        .core
        .link_failed(t.now, 100, job, NO_LOCAL_HOLDER)
        .counted(&t.counters);
    assert_eq!(store_jobs(&a), vec![job]);
    let a = t
        .core
        .get_chunk(t.now, 2, 3, i.block, 1, Some(i.clone()))
        .counted(&t.counters);
    assert_eq!(store_jobs(&a).len(), 1, "{a:?}");
    // The relay is no longer alive: its link is closed; no lookups
    // without other relays.
    let a = t.core.relays_alive(t.now, vec![]).counted(&t.counters);
    assert!(a
        .iter()
        .any(|x| matches!(x, Action::Close { conn: 100, .. })));
    assert!(t.core.link_views(t.now).is_empty());
    let j = BlockHash([1; 32]);
    let i2 = Arc::new(ChunkInfo {
        block: j,
        ..(*i).clone()
    });
    let a = t
        .core
        .get_chunk(t.now, 2, 4, j, 0, Some(i2))
        .counted(&t.counters);
    assert_eq!(store_jobs(&a).len(), 1, "{a:?}");
}

#[test]
fn link_credits_bound_the_requests_in_flight_on_a_link() {
    let mut t = cluster();
    let chunks: Vec<&[u8]> = vec![b"x"; 40];
    let i = info(&chunks);
    let r = remote(7);
    t.login(2, 2);
    t.login(3, 3);
    t.core
        .relays_alive(t.now, vec![r.clone()])
        .counted(&t.counters);
    t.core
        .get_chunk(t.now, 2, 0, i.block, 0, Some(i.clone()))
        .counted(&t.counters);
    let mut sent = serves(&link_up_for(&mut t, &i, &r, 100)).len();
    for k in 1..limits::CHUNK_CREDITS * 2 {
        let conn = if k % 2 == 0 { 2 } else { 3 };
        let a = t
            .core
            .get_chunk(t.now, conn, u64::from(k), i.block, k, Some(i.clone()))
            .counted(&t.counters);
        sent += serves(&a).len();
    }
    assert_eq!(sent, limits::CHUNK_CREDITS as usize);
    assert_eq!(t.core.link_views(t.now)[0].in_flight, limits::CHUNK_CREDITS);
}
