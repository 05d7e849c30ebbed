//! Direct transfer's relay side over real `/ws` sockets: the operator's ICE
//! servers in `DirectConfig`, an introduction and the signalling it allows,
//! hostile signalling refused, a signed lie banning its signer, a forged
//! proof banning its sender, receipts crediting `direct_bytes` in
//! `/p2p/stats` while `relay_forwarded_bytes` counts what the relay sent.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common::ws::*;
use crate::common::*;
use ed25519_dalek::SigningKey;
use relay::peers::PeerOptions;
use web_node::net::direct::{limits as dl, ChunkStatement, Receipt, SignalKind};
use web_node::net::peer::{codes, FromRelay, ToRelay};

fn key(n: u8) -> SigningKey {
    SigningKey::from_bytes(&[n; 32])
}

fn id(k: &SigningKey) -> [u8; 32] {
    k.verifying_key().to_bytes()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

async fn signal(ws: &mut Ws, session: u64, to: [u8; 32], kind: SignalKind, body: String) {
    send(
        ws,
        &ToRelay::Signal {
            session,
            to,
            kind,
            body,
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signalling_proofs_and_receipts_over_real_sockets() {
    let ice = vec!["stun:stun.example.org:3478".to_string()];
    let env = PeerEnv::start(PeerOptions::default().ice_servers(ice.clone()));
    let peers = env.relay.state.peers.clone();
    let (a, b, c) = (key(1), key(2), key(3));
    let (mut wa, got) = login_with_ice(&env.addr(), &a).await;
    assert_eq!(got, ice, "the operator's ICE servers, nothing else");
    let mut wb = login_as(&env.addr(), &b).await;
    let mut wc = login_as(&env.addr(), &c).await;

    // B fetches one chunk through the relay (its store, before anyone else holds the block): B now counts as a
    // key this relay served, so its receipts count.
    send(
        &mut wb,
        &ToRelay::GetChunk {
            req: 1,
            block: env.hash(),
            index: 0,
        },
    )
    .await;
    let first = match recv(&mut wb).await {
        Some(FromRelay::ChunkData { data, .. }) => data,
        other => panic!("{other:?}"),
    };
    let forwarded = peers.stats().peer(&id(&b)).relay_forwarded_bytes;
    assert_eq!(forwarded, first.len() as u64);

    // A holds the block and accepts direct connections.
    send(&mut wa, &ToRelay::Direct { accept: true }).await;
    announce(&mut wa, 0, false, vec![env.hash()]).await;
    until("A's Have", || !peers.holders_of(&env.hash()).is_empty()).await;
    send(
        &mut wb,
        &ToRelay::Introduce {
            req: 5,
            block: env.hash(),
        },
    )
    .await;
    let session = match recv(&mut wb).await {
        Some(FromRelay::Introduced {
            req: 5,
            session,
            holder: Some(h),
            ..
        }) if h == id(&a) => session,
        other => panic!("{other:?}"),
    };
    // Offer B → A, answer A → B, through the relay.
    signal(
        &mut wb,
        session,
        id(&a),
        SignalKind::Offer,
        "v=0 offer".into(),
    )
    .await;
    match recv(&mut wa).await {
        Some(FromRelay::Signal {
            from,
            kind: SignalKind::Offer,
            body,
            ..
        }) => assert_eq!((from, body.as_str()), (id(&b), "v=0 offer")),
        other => panic!("{other:?}"),
    }
    signal(
        &mut wa,
        session,
        id(&b),
        SignalKind::Answer,
        "v=0 answer".into(),
    )
    .await;
    assert!(matches!(
        recv(&mut wb).await,
        Some(FromRelay::Signal {
            kind: SignalKind::Answer,
            ..
        })
    ));

    // Hostile signalling: C is not introduced; an SDP past the bound; a
    // key that is not online. Each is refused, nobody is disconnected.
    signal(&mut wc, session, id(&a), SignalKind::Offer, "x".into()).await;
    assert!(
        matches!(recv(&mut wc).await, Some(FromRelay::SignalFailed { reason, .. }) if reason.contains("not the other side"))
    );
    let big = "a".repeat(dl::MAX_SIGNAL_BODY + 1);
    signal(&mut wb, session, id(&a), SignalKind::Offer, big).await;
    assert!(
        matches!(recv(&mut wb).await, Some(FromRelay::SignalFailed { reason, .. }) if reason.contains("exceeds"))
    );
    signal(
        &mut wb,
        session,
        id(&key(99)),
        SignalKind::Offer,
        "x".into(),
    )
    .await;
    assert!(matches!(
        recv(&mut wb).await,
        Some(FromRelay::SignalFailed { .. })
    ));
    // A flood of introductions stays within the per-peer bound.
    for r in 0..200 {
        send(
            &mut wc,
            &ToRelay::Introduce {
                req: r,
                block: env.hash(),
            },
        )
        .await;
    }
    let mut holders = 0;
    for _ in 0..200 {
        if let Some(FromRelay::Introduced {
            holder: Some(_), ..
        }) = recv(&mut wc).await
        {
            holders += 1;
        }
    }
    // A has one session with B already: C gets the rest of A's bound.
    assert_eq!(holders, dl::MAX_SESSIONS_PER_PEER - 1);

    // A served the rest directly (not over this test's sockets: the
    // browser test does that); B's receipt credits A.
    let rest = env.payload.len() as u64 - first.len() as u64;
    let t = now_ms();
    let receipt = Receipt {
        server: id(&a),
        receiver: id(&b),
        block: env.hash(),
        bytes: rest,
        from_ms: t - 100,
        to_ms: t,
    }
    .sign(&b);
    send(&mut wb, &ToRelay::Receipt { receipt }).await;
    match recv(&mut wb).await {
        Some(FromRelay::ReceiptTaken { credited, .. }) => assert_eq!(credited, rest),
        other => panic!("{other:?}"),
    }
    let js: relay::peers::PeerStats = get(&format!("{}/p2p/stats", env.relay.url)).json();
    assert_eq!(js.direct_bytes, rest);
    assert_eq!(js.peer(&id(&b)).direct_bytes, rest);
    assert_eq!(js.peer(&id(&a)).direct_bytes_served, rest);
    assert_eq!(
        js.peer(&id(&b)).relay_forwarded_bytes,
        forwarded,
        "unchanged by the direct bytes"
    );

    // A lies to B (a signed chunk with flipped bits): B's proof bans A.
    let mut bad = env.chunk(1);
    bad[0] ^= 1;
    let lie = ChunkStatement::sign(&a, id(&b), env.hash(), 1, &bad, t);
    lie.check_received(&id(&a), &id(&b), &env.hash(), 1, &bad)
        .unwrap();
    send(&mut wb, &ToRelay::Proof { proof: lie }).await;
    match recv(&mut wb).await {
        Some(FromRelay::Verdict {
            accused, guilty, ..
        }) => assert_eq!((accused, guilty), (id(&a), true)),
        other => panic!("{other:?}"),
    }
    let (code, _) = expect_error(&mut wa).await;
    assert_eq!(code, codes::BANNED);
    assert!(peers.banned_for(&id(&a)).is_some());

    // C forges a proof against B (signed by C, naming B as the server): C
    // is banned, B is not.
    let mut forged = ChunkStatement::sign(&c, id(&c), env.hash(), 1, &bad, t);
    forged.body.server = id(&b);
    send(&mut wc, &ToRelay::Proof { proof: forged }).await;
    let (code, message) = expect_error(&mut wc).await;
    assert_eq!(code, codes::BANNED);
    assert!(message.contains("false proof"), "{message}");
    assert!(peers.banned_for(&id(&c)).is_some());
    assert!(peers.banned_for(&id(&b)).is_none());
}
