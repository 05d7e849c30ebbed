//! Direct transfer between two nodes, driven by messages only: a fake relay
//! passes introductions and signals, a fake WebRTC passes channel messages.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use ed25519_dalek::SigningKey;

use super::*;
use crate::chain::chunk_hashes;
use crate::net::direct::{limits as dl, SignalKind};
use crate::test_chain::TinyChain;

const SESSION: u64 = 9;

struct World {
    a: PeerNode,
    b: PeerNode,
    block: Block,
    payload: Vec<u8>,
    config: Config,
}

fn node(seed: u8, cfg: NodeConfig) -> PeerNode {
    let direct = cfg.direct;
    let key = SigningKey::from_bytes(&[seed; 32]);
    let peer = key.verifying_key().to_bytes();
    let mut n = PeerNode::new(key, cfg);
    n.connected(0);
    n.handle(
        FromRelay::Challenge {
            nonce: [1; 32],
            version: 1,
        },
        0,
    );
    n.handle(
        FromRelay::Welcome {
            peer,
            limits: WireLimits::default(),
        },
        0,
    );
    n.handle(
        FromRelay::DirectConfig {
            ice_servers: vec![],
        },
        0,
    );
    let sent = drain(&mut n);
    assert_eq!(
        sent.contains(&ToRelay::Direct { accept: true }),
        direct,
        "{sent:?}"
    );
    n.poll_event();
    n
}

fn drain(n: &mut PeerNode) -> Vec<ToRelay> {
    std::iter::from_fn(|| n.poll_transmit()).collect()
}

fn events(n: &mut PeerNode) -> Vec<NodeEvent> {
    std::iter::from_fn(|| n.poll_event()).collect()
}

fn world(corrupt: bool) -> World {
    let chain = TinyChain::new(3);
    let (block, payload) = chain.experts().into_iter().next().unwrap();
    let direct = NodeConfig {
        direct: true,
        ..NodeConfig::default()
    };
    let a = node(21, direct.clone());
    let mut b = node(
        22,
        NodeConfig {
            corrupt_direct: corrupt,
            ..direct
        },
    );
    b.hold(block.hash, payload.clone().into(), block.header.chunk_size)
        .unwrap();
    drain(&mut b);
    World {
        a,
        b,
        block,
        payload,
        config: chain.config,
    }
}

impl World {
    fn chunks(&self) -> u32 {
        chunk_hashes(&self.payload, self.block.header.chunk_size).len() as u32
    }

    /// A starts a direct fetch; the relay introduces B; both sides signal.
    /// Returns A's messages to the relay after the introduction.
    fn introduce(&mut self) -> Vec<ToRelay> {
        let list = chunk_hashes(&self.payload, self.block.header.chunk_size);
        self.a
            .fetch(&self.block, list, Some(self.config.clone()), 0)
            .unwrap();
        let sent = drain(&mut self.a);
        let req = sent
            .iter()
            .find_map(|m| match m {
                ToRelay::Introduce { req, block } if *block == self.block.hash => Some(*req),
                _ => None,
            })
            .expect("an introduction is asked for");
        assert!(
            !sent.iter().any(|m| matches!(m, ToRelay::GetChunk { .. })),
            "no chunk is asked of the relay while the direct fetch runs"
        );
        let bk = self.b.id();
        self.a.handle(
            FromRelay::Introduced {
                req,
                block: self.block.hash,
                session: SESSION,
                holder: Some(bk),
                reason: String::new(),
            },
            0,
        );
        let ev = events(&mut self.a);
        assert!(ev.contains(&NodeEvent::Rtc(RtcAction::Open {
            session: SESSION,
            peer: bk,
            offer: true,
            ice_servers: vec![],
        })));
        // A's offer reaches B through the relay; B opens and answers.
        self.a
            .rtc_signal(SESSION, SignalKind::Offer, "v=0 offer".into(), 1);
        let sig = drain(&mut self.a);
        assert_eq!(
            sig,
            vec![ToRelay::Signal {
                session: SESSION,
                to: bk,
                kind: SignalKind::Offer,
                body: "v=0 offer".into()
            }]
        );
        self.b.handle(
            FromRelay::Signal {
                session: SESSION,
                from: self.a.id(),
                kind: SignalKind::Offer,
                body: "v=0 offer".into(),
            },
            1,
        );
        let ev = events(&mut self.b);
        assert!(matches!(
            ev.as_slice(),
            [
                NodeEvent::Rtc(RtcAction::Open { offer: false, .. }),
                NodeEvent::Rtc(RtcAction::Remote {
                    kind: SignalKind::Offer,
                    ..
                })
            ]
        ));
        self.b
            .rtc_signal(SESSION, SignalKind::Answer, "v=0 answer".into(), 2);
        let ToRelay::Signal { body, kind, .. } = drain(&mut self.b).remove(0) else {
            panic!()
        };
        self.a.handle(
            FromRelay::Signal {
                session: SESSION,
                from: bk,
                kind,
                body,
            },
            2,
        );
        let ev = events(&mut self.a);
        assert!(ev.contains(&NodeEvent::Rtc(RtcAction::Remote {
            session: SESSION,
            kind: SignalKind::Answer,
            body: "v=0 answer".into()
        })));
        drain(&mut self.a)
    }

    /// Pass channel messages both ways until `stop_after` chunks reached A
    /// or nothing moves. Returns A's events.
    fn pump_channel(&mut self, first: Vec<NodeEvent>, stop_after: u64) -> Vec<NodeEvent> {
        let mut all = Vec::new();
        let mut from_a = first;
        loop {
            let mut to_b = Vec::new();
            for e in from_a.drain(..) {
                match e {
                    NodeEvent::Rtc(RtcAction::Send { data, .. }) => to_b.push(data),
                    other => all.push(other),
                }
            }
            if to_b.is_empty() || self.a.stats().direct_bytes_received >= stop_after {
                return all;
            }
            for d in to_b {
                self.b.rtc_message(SESSION, &d, 10);
            }
            for e in events(&mut self.b) {
                if let NodeEvent::Rtc(RtcAction::Send { data, .. }) = e {
                    self.a.rtc_message(SESSION, &data, 10);
                    if self.a.stats().direct_bytes_received >= stop_after {
                        break;
                    }
                }
            }
            from_a = events(&mut self.a);
        }
    }

    /// The relay is asked for every chunk of the block, and it completes.
    fn relay_completes_all(&mut self, sent: Vec<ToRelay>) {
        let (asked, ev) = self.relay_rest(sent);
        assert_eq!(asked.len() as u32, self.chunks());
        assert_eq!(completed(&ev).as_deref(), Some(&self.payload[..]));
    }

    /// Answer A's relay requests honestly until the block completes.
    fn relay_rest(&mut self, mut sent: Vec<ToRelay>) -> (Vec<u32>, Vec<NodeEvent>) {
        let cs = self.block.header.chunk_size as usize;
        let mut asked = Vec::new();
        let mut evs = Vec::new();
        loop {
            let reqs: Vec<(u64, u32)> = sent
                .iter()
                .filter_map(|m| match m {
                    ToRelay::GetChunk { req, index, .. } => Some((*req, *index)),
                    _ => None,
                })
                .collect();
            if reqs.is_empty() {
                return (asked, evs);
            }
            for (req, index) in reqs {
                asked.push(index);
                let s = index as usize * cs;
                let data = self.payload[s..(s + cs).min(self.payload.len())].to_vec();
                self.a.handle(
                    FromRelay::ChunkData {
                        req,
                        block: self.block.hash,
                        index,
                        data,
                        from: ChunkSource::Relay,
                    },
                    20,
                );
            }
            evs.extend(events(&mut self.a));
            sent = drain(&mut self.a);
        }
    }
}

fn completed(ev: &[NodeEvent]) -> Option<Arc<[u8]>> {
    ev.iter().find_map(|e| match e {
        NodeEvent::BlockComplete { payload, .. } => Some(payload.clone()),
        _ => None,
    })
}

#[test]
fn a_block_comes_directly_with_a_receipt_and_nothing_from_the_relay() {
    let mut w = world(false);
    assert!(w.chunks() >= 3);
    w.introduce();
    w.a.rtc_opened(SESSION, 5);
    let first = events(&mut w.a);
    let ev = w.pump_channel(first, u64::MAX);
    assert_eq!(completed(&ev).as_deref(), Some(&w.payload[..]));
    let sent = drain(&mut w.a);
    assert!(!sent.iter().any(|m| matches!(m, ToRelay::GetChunk { .. })));
    let receipt = sent
        .iter()
        .find_map(|m| match m {
            ToRelay::Receipt { receipt } => Some(receipt.clone()),
            _ => None,
        })
        .expect("a receipt for the holder");
    assert_eq!(receipt.body.bytes, w.payload.len() as u64);
    assert_eq!(receipt.body.server, w.b.id());
    assert_eq!(w.a.stats().direct_bytes_received, w.payload.len() as u64);
    assert_eq!(w.b.stats().direct_bytes_served, w.payload.len() as u64);
    assert!(w.a.is_held(&w.block.hash));
    // The connection stays for the next fetch, then closes when idle.
    assert_eq!(w.a.direct_sessions(), (1, 0));
    let at = w.a.poll_timeout().unwrap();
    assert!(at >= super::direct::IDLE_KEEP_MS, "{at}");
    w.a.handle_timeout(super::direct::IDLE_KEEP_MS + 20);
    assert!(events(&mut w.a).contains(&NodeEvent::Rtc(RtcAction::Close { session: SESSION })));
    assert!(drain(&mut w.a).iter().any(|m| matches!(
        m,
        ToRelay::Signal {
            kind: SignalKind::Bye,
            ..
        }
    )));
    assert_eq!(w.a.direct_sessions(), (0, 0));
}

/// Stored payload bytes, read on demand.
struct Stored(Vec<u8>, std::sync::atomic::AtomicU32);

impl PayloadReader for Stored {
    fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>, String> {
        self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let s = (offset as usize).min(self.0.len());
        Ok(self.0[s..(s + len).min(self.0.len())].to_vec())
    }
}

#[test]
fn a_holder_that_keeps_the_block_stored_serves_it_directly_from_its_reader() {
    let mut w = world(false);
    let stored = Arc::new(Stored(w.payload.clone(), Default::default()));
    w.b.hold_stored(
        w.block.hash,
        w.payload.len() as u64,
        w.block.header.chunk_size,
        stored.clone(),
    )
    .unwrap();
    assert!(!w.b.is_held_in_memory(&w.block.hash));
    w.introduce();
    w.a.rtc_opened(SESSION, 5);
    let first = events(&mut w.a);
    let ev = w.pump_channel(first, u64::MAX);
    assert_eq!(completed(&ev).as_deref(), Some(&w.payload[..]));
    assert_eq!(w.b.stats().direct_bytes_served, w.payload.len() as u64);
    assert_eq!(
        stored.1.load(std::sync::atomic::Ordering::Relaxed),
        w.chunks()
    );
}

#[test]
fn a_second_block_from_the_same_holder_rides_on_the_open_connection() {
    let chain = TinyChain::new(3);
    let (block2, payload2) = chain.experts().into_iter().nth(1).unwrap();
    let mut w = world(false);
    w.b.hold(
        block2.hash,
        payload2.clone().into(),
        block2.header.chunk_size,
    )
    .unwrap();
    drain(&mut w.b);
    w.introduce();
    w.a.rtc_opened(SESSION, 5);
    let first = events(&mut w.a);
    let ev = w.pump_channel(first, u64::MAX);
    assert_eq!(completed(&ev).as_deref(), Some(&w.payload[..]));
    drain(&mut w.a);
    // The second block: the relay introduces the same holder on a new session.
    let list2 = chunk_hashes(&payload2, block2.header.chunk_size);
    w.a.fetch(&block2, list2, Some(w.config.clone()), 30)
        .unwrap();
    let ToRelay::Introduce { req, .. } = drain(&mut w.a).remove(0) else {
        panic!()
    };
    let bk = w.b.id();
    w.a.handle(
        FromRelay::Introduced {
            req,
            block: block2.hash,
            session: SESSION + 1,
            holder: Some(bk),
            reason: String::new(),
        },
        31,
    );
    // No new connection: the new introduction is released, wants go on the
    // open channel.
    let sent = drain(&mut w.a);
    assert!(sent.contains(&ToRelay::Signal {
        session: SESSION + 1,
        to: bk,
        kind: SignalKind::Bye,
        body: String::new()
    }));
    let first = events(&mut w.a);
    assert!(!first
        .iter()
        .any(|e| matches!(e, NodeEvent::Rtc(RtcAction::Open { .. }))));
    assert!(first.iter().all(|e| matches!(
        e,
        NodeEvent::Rtc(RtcAction::Send {
            session: SESSION,
            ..
        })
    )));
    let before = w.a.stats().direct_bytes_received;
    let ev = w.pump_channel(first, u64::MAX);
    assert_eq!(completed(&ev).as_deref(), Some(&payload2[..]));
    assert_eq!(
        w.a.stats().direct_bytes_received - before,
        payload2.len() as u64
    );
    assert_eq!(w.a.direct_sessions(), (1, 0));
    assert!(!drain(&mut w.a)
        .iter()
        .any(|m| matches!(m, ToRelay::GetChunk { .. })));
}

#[test]
fn a_holder_that_closes_mid_transfer_leaves_exactly_the_rest_to_the_relay() {
    let mut w = world(false);
    w.introduce();
    w.a.rtc_opened(SESSION, 5);
    let first = events(&mut w.a);
    w.pump_channel(first, 1);
    let got = w.a.stats().direct_bytes_received;
    assert!(got > 0 && got < w.payload.len() as u64);
    w.a.rtc_closed(SESSION, 30);
    let ev = events(&mut w.a);
    let back = ev
        .iter()
        .find_map(|e| match e {
            NodeEvent::DirectFallback { chunks, .. } => Some(*chunks),
            _ => None,
        })
        .expect("a fallback");
    let sent = drain(&mut w.a);
    // What came directly is receipted, and asked of nobody again.
    assert!(sent
        .iter()
        .any(|m| matches!(m, ToRelay::Receipt { receipt } if receipt.body.bytes == got)));
    let (asked, ev) = w.relay_rest(sent);
    let direct_chunks = w.chunks() - asked.len() as u32;
    assert_eq!(asked.len() as u32, back);
    assert!(direct_chunks >= 1);
    let mut uniq = asked.clone();
    uniq.sort_unstable();
    uniq.dedup();
    assert_eq!(uniq.len(), asked.len(), "no chunk asked twice: {asked:?}");
    assert_eq!(completed(&ev).as_deref(), Some(&w.payload[..]));
    assert_eq!(
        w.a.stats().total_received(),
        w.payload.len() as u64,
        "every byte came once"
    );
}

#[test]
fn a_holder_that_never_opens_is_given_up_at_the_deadline() {
    let mut w = world(false);
    w.introduce();
    let at = w.a.poll_timeout().unwrap();
    assert!(at <= dl::OPEN_DEADLINE.as_millis() as u64 + 10, "{at}");
    w.a.handle_timeout(at);
    let ev = events(&mut w.a);
    assert!(ev
        .iter()
        .any(|e| matches!(e, NodeEvent::DirectFallback { chunks, .. } if *chunks == w.chunks())));
    assert!(ev.contains(&NodeEvent::Rtc(RtcAction::Close { session: SESSION })));
    let sent = drain(&mut w.a);
    w.relay_completes_all(sent);
    // The same holder introduced again soon: no second wait, the relay at once.
    let chain = TinyChain::new(3);
    let (block2, payload2) = chain.experts().into_iter().nth(1).unwrap();
    let list2 = chunk_hashes(&payload2, block2.header.chunk_size);
    w.a.fetch(&block2, list2, Some(w.config.clone()), at + 10)
        .unwrap();
    let ToRelay::Introduce { req, .. } = drain(&mut w.a).remove(0) else {
        panic!()
    };
    w.a.handle(
        FromRelay::Introduced {
            req,
            block: block2.hash,
            session: SESSION + 1,
            holder: Some(w.b.id()),
            reason: String::new(),
        },
        at + 11,
    );
    let ev = events(&mut w.a);
    assert!(!ev
        .iter()
        .any(|e| matches!(e, NodeEvent::Rtc(RtcAction::Open { .. }))));
    assert!(ev
        .iter()
        .any(|e| matches!(e, NodeEvent::DirectFallback { .. })));
    let sent = drain(&mut w.a);
    assert!(sent.iter().any(|m| matches!(m, ToRelay::GetChunk { .. })));
}

#[test]
fn a_lying_holder_is_proven_and_the_block_still_arrives_from_the_relay() {
    let mut w = world(true);
    w.introduce();
    w.a.rtc_opened(SESSION, 5);
    let first = events(&mut w.a);
    let ev = w.pump_channel(first, u64::MAX);
    assert!(ev
        .iter()
        .any(|e| matches!(e, NodeEvent::DirectFallback { chunks, .. } if *chunks == w.chunks())));
    let sent = drain(&mut w.a);
    let proof = sent
        .iter()
        .find_map(|m| match m {
            ToRelay::Proof { proof } => Some(proof.clone()),
            _ => None,
        })
        .expect("a proof");
    assert_eq!(proof.body.server, w.b.id());
    assert_eq!(w.a.stats().direct_proofs_sent, 1);
    assert_eq!(w.a.stats().direct_bytes_received, 0);
    let (_, ev) = w.relay_rest(sent);
    assert_eq!(completed(&ev).as_deref(), Some(&w.payload[..]));
}

#[test]
fn no_direct_holder_means_the_relay_at_once() {
    let mut w = world(false);
    let list = chunk_hashes(&w.payload, w.block.header.chunk_size);
    w.a.fetch(&w.block, list, Some(w.config.clone()), 0)
        .unwrap();
    let ToRelay::Introduce { req, .. } = drain(&mut w.a).remove(0) else {
        panic!()
    };
    w.a.handle(
        FromRelay::Introduced {
            req,
            block: w.block.hash,
            session: 0,
            holder: None,
            reason: "no online holder".into(),
        },
        1,
    );
    let sent = drain(&mut w.a);
    w.relay_completes_all(sent);
}

#[test]
fn hostile_signals_and_channel_messages_are_refused() {
    let mut w = world(false);
    w.introduce();
    let ignored = w.a.stats().ignored;
    // A signal on the session from a key that is not its peer.
    w.a.handle(
        FromRelay::Signal {
            session: SESSION,
            from: [7; 32],
            kind: SignalKind::Candidate,
            body: "x".into(),
        },
        3,
    );
    // An offer to the fetching side of its own session.
    w.a.handle(
        FromRelay::Signal {
            session: SESSION,
            from: w.b.id(),
            kind: SignalKind::Offer,
            body: "x".into(),
        },
        3,
    );
    assert!(events(&mut w.a).is_empty());
    assert_eq!(w.a.stats().ignored, ignored + 2);
    // An oversized local signal ends the session (the relay would refuse it).
    w.a.rtc_signal(
        SESSION,
        SignalKind::Candidate,
        "x".repeat(dl::MAX_SIGNAL_BODY + 1),
        4,
    );
    let ev = events(&mut w.a);
    assert!(ev
        .iter()
        .any(|e| matches!(e, NodeEvent::DirectFallback { .. })));
    // Not sent: only the session's Bye goes to the relay.
    assert!(drain(&mut w.a).iter().all(|m| !matches!(
        m,
        ToRelay::Signal {
            kind: SignalKind::Candidate,
            ..
        }
    )));
    // A node without direct transfer opens nothing for an offer.
    let mut plain = node(23, NodeConfig::default());
    plain.handle(
        FromRelay::Signal {
            session: 4,
            from: [7; 32],
            kind: SignalKind::Offer,
            body: "x".into(),
        },
        0,
    );
    assert!(events(&mut plain).is_empty());
    // A server sent garbage instead of a want closes the connection.
    w.b.rtc_message(SESSION, b"\xff\xff\xff garbage", 5);
    assert!(events(&mut w.b).contains(&NodeEvent::Rtc(RtcAction::Close { session: SESSION })));
    assert_eq!(w.b.direct_sessions(), (0, 0));
}

#[test]
fn losing_the_relay_hands_direct_chunks_back_and_closes_connections() {
    let mut w = world(false);
    w.introduce();
    w.a.disconnected(50);
    let ev = events(&mut w.a);
    assert!(ev.contains(&NodeEvent::Rtc(RtcAction::Close { session: SESSION })));
    assert_eq!(w.a.direct_sessions(), (0, 0));
    // After reconnecting (without DirectConfig yet) the relay is asked.
    w.a.connected(60);
    w.a.handle(
        FromRelay::Challenge {
            nonce: [1; 32],
            version: 1,
        },
        60,
    );
    w.a.handle(
        FromRelay::Welcome {
            peer: w.a.id(),
            limits: WireLimits::default(),
        },
        60,
    );
    let sent = drain(&mut w.a);
    w.relay_completes_all(sent);
}

#[test]
fn test_switches_a_holder_that_stops_and_one_that_never_answers() {
    // Serves one chunk, then closes: the fetcher gets the rest from the relay.
    let mut w = world(false);
    w.b = node(
        24,
        NodeConfig {
            direct: true,
            test_direct_serve_max: Some(1),
            ..NodeConfig::default()
        },
    );
    w.b.hold(
        w.block.hash,
        w.payload.clone().into(),
        w.block.header.chunk_size,
    )
    .unwrap();
    drain(&mut w.b);
    w.introduce();
    w.a.rtc_opened(SESSION, 5);
    let first = events(&mut w.a);
    let mut to_b: Vec<Vec<u8>> = first
        .into_iter()
        .filter_map(|e| match e {
            NodeEvent::Rtc(RtcAction::Send { data, .. }) => Some(data),
            _ => None,
        })
        .collect();
    assert!(to_b.len() >= 2, "pipelined wants");
    let second = to_b.split_off(1);
    w.b.rtc_message(SESSION, &to_b[0], 6);
    for e in events(&mut w.b) {
        if let NodeEvent::Rtc(RtcAction::Send { data, .. }) = e {
            w.a.rtc_message(SESSION, &data, 6);
        }
    }
    assert!(w.a.stats().direct_bytes_received > 0);
    w.b.rtc_message(SESSION, &second[0], 7);
    assert_eq!(
        events(&mut w.b),
        vec![NodeEvent::Rtc(RtcAction::Close { session: SESSION })]
    );
    assert_eq!(
        w.b.stats().direct_bytes_served,
        w.a.stats().direct_bytes_received
    );
    w.a.rtc_closed(SESSION, 8);
    let sent = drain(&mut w.a);
    let (asked, ev) = w.relay_rest(sent);
    assert_eq!(asked.len() as u32, w.chunks() - 1);
    assert_eq!(completed(&ev).as_deref(), Some(&w.payload[..]));

    // A mute holder opens nothing for an offer.
    let mut mute = node(
        25,
        NodeConfig {
            direct: true,
            test_direct_mute: true,
            ..NodeConfig::default()
        },
    );
    mute.handle(
        FromRelay::Signal {
            session: 3,
            from: [7; 32],
            kind: SignalKind::Offer,
            body: "v=0".into(),
        },
        0,
    );
    assert!(events(&mut mute).is_empty());
}

#[test]
fn a_forged_proof_names_the_accused_but_is_not_its_signature() {
    let mut w = world(false);
    let accused = w.b.id();
    assert!(w.a.test_forge_proof(accused, w.block.hash, 5));
    let proof = drain(&mut w.a)
        .into_iter()
        .find_map(|m| match m {
            ToRelay::Proof { proof } => Some(proof),
            _ => None,
        })
        .expect("a proof");
    assert_eq!(proof.body.server, accused);
    assert_eq!(proof.body.receiver, w.a.id());
    // What the relay checks: the accused never signed it.
    let list = chunk_hashes(&w.payload, w.block.header.chunk_size);
    assert!(proof.judge(&list).is_err());
    let mut off = node(26, NodeConfig::default());
    off.disconnected(1);
    assert!(!off.test_forge_proof(accused, w.block.hash, 2));
}

mod hostile {
    use super::*;
    use crate::net::direct::{ChannelMsg, ChunkStatement};
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// Whatever arrives on a data channel (arbitrary bytes, or parts
        /// with arbitrary offsets, sizes, data and statements signed by the
        /// holder or anyone), neither side panics, the fetcher never holds
        /// bytes that are not the block's, and every chunk ends up either
        /// delivered or handed back to the relay.
        #[test]
        fn arbitrary_channel_messages(
            frames in proptest::collection::vec(
                (any::<bool>(), 0u32..6, 0u32..300_000, 0u32..300_000,
                 proptest::collection::vec(any::<u8>(), 0..64), any::<bool>()),
                0..24),
            raw in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..80), 0..8),
        ) {
            let mut w = world(false);
            w.introduce();
            w.a.rtc_opened(SESSION, 5);
            events(&mut w.a);
            let liar = SigningKey::from_bytes(&[77; 32]);
            for (t, (signed_by_holder, req, offset, total, data, garbage)) in frames.into_iter().enumerate() {
                let bytes = if garbage {
                    data.clone()
                } else {
                    let key = if signed_by_holder { SigningKey::from_bytes(&[22; 32]) } else { liar.clone() };
                    let st = ChunkStatement::sign(&key, w.a.id(), w.block.hash, req % 3, &data, 10);
                    ChannelMsg::Part { req: (1 << 16) | req, offset, total, statement: Some(st), data }.encode()
                };
                w.a.rtc_message(SESSION, &bytes, 10 + t as u64);
                w.b.rtc_message(SESSION, &bytes, 10 + t as u64);
                w.a.handle_timeout(10 + t as u64);
            }
            for r in raw {
                w.a.rtc_message(SESSION, &r, 100);
                w.b.rtc_message(SESSION, &r, 100);
            }
            // Past the direct deadlines, before any relay request would time out.
            w.a.handle_timeout(dl::ANSWER_DEADLINE.as_millis() as u64 + 200);
            if let Some(p) = w.a.payload(&w.block.hash) {
                prop_assert_eq!(&*p, &w.payload[..]);
            }
            // Whatever happened, the relay finishes the block.
            let sent = drain(&mut w.a);
            w.a.rtc_closed(SESSION, dl::ANSWER_DEADLINE.as_millis() as u64 + 300);
            let mut sent2 = drain(&mut w.a);
            sent2.extend(sent);
            let (_, ev) = w.relay_rest(sent2);
            let done = completed(&ev).is_some() || w.a.is_held(&w.block.hash);
            prop_assert!(done, "the block never completed");
        }
    }
}
