//! `/ws` on a real relay (port 0) with real WebSocket clients: login, the
//! refusals (subprotocol, timeout, signature, malformed, oversized, text,
//! flooding), replacement, chunk routing between peers with the relay's own
//! hash check, a lying peer banned, a slow reader dropped, remote compute
//! with failover, BlockAdded.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use crate::common::ws::*;
use crate::common::*;
use ed25519_dalek::SigningKey;
use futures_util::SinkExt as _;
use relay::compute::ExpertCompute as _;
use relay::peers::PeerOptions;
use tokio::io::AsyncWriteExt as _;
use tokio_tungstenite::tungstenite::Message;
use web_node::model::reference::expert_forward;
use web_node::model::ExpertWeights;
use web_node::net::api::codes as api_codes;
use web_node::net::peer::{codes, limits, login, ChunkSource, FromRelay, ToRelay};

fn key(n: u8) -> SigningKey {
    SigningKey::from_bytes(&[n; 32])
}

fn id(k: &SigningKey) -> [u8; 32] {
    k.verifying_key().to_bytes()
}

fn quick() -> PeerOptions {
    PeerOptions::default().login_timeout(Duration::from_millis(300))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_succeeds_and_the_peer_is_listed() {
    let env = PeerEnv::start(quick());
    let k = key(1);
    let mut ws = login_as(&env.addr(), &k).await;
    send(
        &mut ws,
        &ToRelay::Status {
            load: 100,
            serve_compute: true,
        },
    )
    .await;
    send(
        &mut ws,
        &ToRelay::Have {
            add: vec![env.hash()],
            remove: vec![],
        },
    )
    .await;
    let peers = env.relay.state.peers.clone();
    until("the Have", || peers.holders_of(&env.hash()) == vec![id(&k)]).await;
    let v = peers.views();
    assert_eq!(v.len(), 1);
    assert_eq!((v[0].load, v[0].serve_compute), (100, true));
    assert_eq!(v[0].agent, "test-peer");
    let s = peers.stats();
    assert_eq!((s.logins, s.peers_online, s.connections_open), (1, 1, 1));
    drop(ws);
    until("the logout", || peers.stats().connections_open == 0).await;
    assert!(peers.views().is_empty());
    assert!(peers.holders_of(&env.hash()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_or_missing_subprotocol_gets_a_json_400() {
    let env = PeerEnv::start(quick());
    for protos in [&["other.v1"][..], &[][..]] {
        let err = tokio_tungstenite::connect_async(request(&env.addr(), protos))
            .await
            .unwrap_err();
        let tokio_tungstenite::tungstenite::Error::Http(resp) = err else {
            panic!("expected an HTTP refusal, got {err}");
        };
        assert_eq!(resp.status(), 400);
        let body: web_node::net::api::ApiError =
            serde_json::from_slice(resp.body().as_deref().unwrap()).unwrap();
        assert_eq!(body.code, api_codes::MALFORMED);
        assert!(body.message.contains("aiblock.v1"), "{}", body.message);
    }
    // A plain GET (no upgrade) is told how to connect.
    let r = get(&format!("{}/ws", env.relay.url));
    let e = r.error(400);
    assert!(e.message.contains("WebSocket"), "{}", e.message);
    assert_eq!(env.relay.state.peers.stats().refused_connections, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_login_times_out() {
    let env = PeerEnv::start(quick());
    let mut ws = connect(&env.addr()).await;
    challenge(&mut ws).await;
    let (code, msg) = expect_error(&mut ws).await;
    assert_eq!(code, codes::LOGIN_TIMEOUT, "{msg}");
    expect_closed(&mut ws).await;
    assert_eq!(env.relay.state.peers.stats().login_failures, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_signature_or_another_first_message_fails_login() {
    let env = PeerEnv::start(PeerOptions::default());
    // Signed for another nonce.
    let mut ws = connect(&env.addr()).await;
    challenge(&mut ws).await;
    send(&mut ws, &login(&key(2), &[0; 32], "liar")).await;
    let (code, msg) = expect_error(&mut ws).await;
    assert_eq!(code, codes::LOGIN_FAILED);
    assert!(msg.contains("does not verify"), "{msg}");
    expect_closed(&mut ws).await;
    // Not a Login first.
    let mut ws = connect(&env.addr()).await;
    challenge(&mut ws).await;
    send(
        &mut ws,
        &ToRelay::Status {
            load: 0,
            serve_compute: false,
        },
    )
    .await;
    assert_eq!(expect_error(&mut ws).await.0, codes::LOGIN_FAILED);
    expect_closed(&mut ws).await;
    let s = env.relay.state.peers.stats();
    assert_eq!((s.login_failures, s.logins, s.peers_online), (2, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_text_and_oversized_frames_are_cut_with_a_clear_error() {
    let env = PeerEnv::start(PeerOptions::default());
    // Malformed binary after login.
    let mut ws = login_as(&env.addr(), &key(3)).await;
    ws.send(Message::Binary(vec![0xff, 0xff, 0xff].into()))
        .await
        .unwrap();
    assert_eq!(expect_error(&mut ws).await.0, codes::MALFORMED);
    expect_closed(&mut ws).await;
    // A text frame.
    let mut ws = login_as(&env.addr(), &key(3)).await;
    ws.send(Message::Text("{\"hello\":1}".into()))
        .await
        .unwrap();
    let (code, msg) = expect_error(&mut ws).await;
    assert_eq!(code, codes::MALFORMED);
    assert!(msg.contains("text frames"), "{msg}");
    expect_closed(&mut ws).await;
    // A frame header announcing more than the limit (the payload never
    // needs to be sent: it is refused from the header).
    let mut ws = login_as(&env.addr(), &key(3)).await;
    let len = (limits::MAX_MESSAGE + 1) as u64;
    let mut hdr = vec![0x82, 0x80 | 127];
    hdr.extend_from_slice(&len.to_be_bytes());
    hdr.extend_from_slice(&[1, 2, 3, 4]);
    let raw = match ws.get_mut() {
        tokio_tungstenite::MaybeTlsStream::Plain(s) => s,
        _ => unreachable!(),
    };
    raw.write_all(&hdr).await.unwrap();
    raw.write_all(&[0u8; 1024]).await.unwrap();
    let (code, msg) = expect_error(&mut ws).await;
    assert_eq!(code, api_codes::TOO_LARGE, "{msg}");
    expect_closed(&mut ws).await;
    let s = env.relay.state.peers.stats();
    assert_eq!(s.malformed, 3);
    until("all closed", || {
        env.relay.state.peers.stats().connections_open == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_peer_is_cut_off_while_another_keeps_fetching() {
    let env = PeerEnv::start(PeerOptions::default());
    let mut good = login_as(&env.addr(), &key(4)).await;
    let mut flood = login_as(&env.addr(), &key(5)).await;
    let status = ToRelay::Status {
        load: 1,
        serve_compute: false,
    }
    .encode();
    let n = limits::PEER_MSGS_BURST as usize + 200;
    for _ in 0..n {
        if flood
            .feed(Message::Binary(status.clone().into()))
            .await
            .is_err()
        {
            break;
        }
    }
    let _ = flood.flush().await;
    let (code, msg) = expect_error(&mut flood).await;
    assert_eq!(code, codes::RATE_LIMITED, "{msg}");
    expect_closed(&mut flood).await;
    assert_eq!(env.relay.state.peers.stats().rate_limited, 1);
    // The other peer is served as before.
    let (data, from) = fetch_chunk(&mut good, 1, env.hash(), 0).await.unwrap();
    assert_eq!(data, env.chunk(0));
    assert_eq!(from, ChunkSource::Relay);
    assert_eq!(env.relay.state.peers.views().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_login_with_the_same_key_replaces_the_first() {
    let env = PeerEnv::start(PeerOptions::default());
    let k = key(6);
    let mut first = login_as(&env.addr(), &k).await;
    let mut second = login_as(&env.addr(), &k).await;
    let (code, _) = expect_error(&mut first).await;
    assert_eq!(code, codes::REPLACED);
    expect_closed(&mut first).await;
    // The second goes on.
    let (data, _) = fetch_chunk(&mut second, 7, env.hash(), 1).await.unwrap();
    assert_eq!(data, env.chunk(1));
    let peers = &env.relay.state.peers;
    assert_eq!(peers.views().len(), 1);
    assert_eq!(peers.stats().replaced, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_only_a_peer_holds_is_forwarded_verified_and_the_store_serves_nothing() {
    let env = PeerEnv::start(PeerOptions::default());
    let a = key(10);
    let mut wa = login_as(&env.addr(), &a).await;
    send(
        &mut wa,
        &ToRelay::Have {
            add: vec![env.hash()],
            remove: vec![],
        },
    )
    .await;
    let peers = env.relay.state.peers.clone();
    until("A's Have", || !peers.holders_of(&env.hash()).is_empty()).await;
    let served = tokio::spawn(serve_chunks(
        wa,
        env.payload.clone(),
        env.info.chunk_size as usize,
        false,
    ));
    let mut wb = login_as(&env.addr(), &key(11)).await;
    // Every chunk asked at once (within the credits), answers in any order.
    let n = env.n_chunks();
    assert!(n > limits::CHUNK_CREDITS, "{n} chunks");
    let mut asm = env.assembler();
    let mut next = 0u32;
    let mut outstanding = 0u32;
    let mut done = 0u32;
    while done < n {
        while next < n && outstanding < limits::CHUNK_CREDITS {
            send(
                &mut wb,
                &ToRelay::GetChunk {
                    req: u64::from(next),
                    block: env.hash(),
                    index: next,
                },
            )
            .await;
            next += 1;
            outstanding += 1;
        }
        match recv(&mut wb).await.unwrap() {
            FromRelay::ChunkData {
                index, data, from, ..
            } => {
                assert_eq!(from, ChunkSource::Peer(id(&a)));
                asm.add_chunk(u64::from(index), data).unwrap();
                outstanding -= 1;
                done += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    let v = asm.finish(Some(&env.cfg)).unwrap();
    assert_eq!(v.bytes, *env.payload);
    let s = peers.stats();
    assert_eq!(s.chunks_from_store, 0, "the relay's store served nothing");
    assert_eq!(s.bytes_from_store, 0);
    assert_eq!(s.chunks_from_peers, u64::from(n));
    assert_eq!(s.bytes_from_peers, env.payload.len() as u64);
    assert_eq!(s.peer(&id(&a)).bytes_served, env.payload.len() as u64);
    // /p2p/stats says the same.
    let js: relay::peers::PeerStats = get(&format!("{}/p2p/stats", env.relay.url)).json();
    assert_eq!(js.bytes_from_peers, env.payload.len() as u64);
    assert_eq!(js.chunks_from_store, 0);
    drop(wb);
    served.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_peer_is_caught_banned_and_the_chunks_still_arrive_intact() {
    let env = PeerEnv::start(PeerOptions::default());
    let liar = key(20);
    let honest = key(21);
    let peers = env.relay.state.peers.clone();
    let mut wl = login_as(&env.addr(), &liar).await;
    let mut wh = login_as(&env.addr(), &honest).await;
    // The liar looks cheaper (idle); the honest peer is busy.
    for (ws, load) in [(&mut wl, 0u16), (&mut wh, 1000)] {
        announce(ws, load, false, vec![env.hash()]).await;
    }
    until("both holders", || peers.holders_of(&env.hash()).len() == 2).await;
    let cs = env.info.chunk_size as usize;
    let lying = tokio::spawn(serve_chunks(wl, env.payload.clone(), cs, true));
    let honest_task = tokio::spawn(serve_chunks(wh, env.payload.clone(), cs, false));
    let mut wb = login_as(&env.addr(), &key(22)).await;
    // 1. The liar is asked first; its chunk fails the relay's check and the
    //    honest holder serves it.
    let (data, from) = fetch_chunk(&mut wb, 1, env.hash(), 0).await.unwrap();
    assert_eq!(data, env.chunk(0));
    assert_eq!(from, ChunkSource::Peer(id(&honest)));
    assert_eq!(peers.stats().bad_chunks, 1);
    assert!(
        peers.banned_for(&id(&liar)).is_none(),
        "one bad chunk is not a ban"
    );
    // 2. The honest peer leaves; the liar lies again, is banned, and the
    //    relay's store serves the chunk.
    honest_task.abort();
    until("the honest peer gone", || {
        peers.holders_of(&env.hash()) == vec![id(&liar)]
    })
    .await;
    let (data, from) = fetch_chunk(&mut wb, 2, env.hash(), 1).await.unwrap();
    assert_eq!(data, env.chunk(1));
    assert_eq!(from, ChunkSource::Relay);
    let errors = lying.await.unwrap();
    assert!(
        errors.iter().any(|(c, _)| c == codes::BANNED),
        "the liar was told: {errors:?}"
    );
    let s = peers.stats();
    assert_eq!((s.bad_chunks, s.bans), (2, 1));
    assert_eq!(s.peer(&id(&liar)).bad_chunks, 2);
    assert_eq!(s.peer(&id(&liar)).bytes_served, 0);
    assert!(peers.banned_for(&id(&liar)).is_some());
    // 3. Its re-login is refused while banned.
    let mut again = connect(&env.addr()).await;
    let nonce = challenge(&mut again).await;
    send(&mut again, &login(&liar, &nonce, "again")).await;
    let (code, msg) = expect_error(&mut again).await;
    assert_eq!(code, codes::BANNED, "{msg}");
    expect_closed(&mut again).await;
    // The requester verifies what it got.
    let mut asm = env.assembler();
    asm.add_chunk(0, env.chunk(0)).unwrap();
    asm.add_chunk(1, data).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_does_not_read_is_dropped_and_others_are_served() {
    let env = PeerEnv::start(PeerOptions::default().write_timeout(Duration::from_millis(500)));
    let peers = env.relay.state.peers.clone();
    // A socket with a tiny receive buffer that never reads after login.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let tcp = sock.connect(env.addr().parse().unwrap()).await.unwrap();
    let (mut slow, _) = tokio_tungstenite::client_async(
        request(&env.addr(), &[web_node::net::peer::SUBPROTOCOL]),
        MaybeTlsStream::Plain(tcp),
    )
    .await
    .unwrap();
    let nonce = challenge(&mut slow).await;
    send(&mut slow, &login(&key(30), &nonce, "slow")).await;
    assert!(matches!(
        recv(&mut slow).await,
        Some(FromRelay::Welcome { .. })
    ));
    // Ask for chunks (within the message rate) and read nothing: the
    // answers pile up in the relay's queue and socket.
    let n = env.n_chunks();
    let mut sent = 0u64;
    let mut cut = false;
    while sent < 20_000 && !cut {
        for _ in 0..50 {
            let m = ToRelay::GetChunk {
                req: sent,
                block: env.hash(),
                index: (sent % u64::from(n)) as u32,
            };
            if slow.feed(Message::Binary(m.encode().into())).await.is_err() {
                cut = true;
                break;
            }
            sent += 1;
        }
        if slow.flush().await.is_err() {
            cut = true;
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
        cut |= peers.stats().dropped_slow > 0;
    }
    until("the slow peer dropped", || peers.stats().dropped_slow > 0).await;
    until("its connection closed", || peers.views().is_empty()).await;
    // Others are served.
    let mut ok = login_as(&env.addr(), &key(31)).await;
    let (data, _) = fetch_chunk(&mut ok, 1, env.hash(), 2).await.unwrap();
    assert_eq!(data, env.chunk(2));
    drop(slow);
}

use tokio_tungstenite::MaybeTlsStream;

/// A compute peer: answers `Compute` with `expert_forward` on the expert's
/// weights, or with garbage, or by disconnecting.
#[derive(Clone, Copy, PartialEq)]
enum Behaviour {
    Honest,
    Garbage,
    Disconnect,
}

async fn compute_peer(
    env: &PeerEnv,
    k: &SigningKey,
    load: u16,
    b: Behaviour,
) -> tokio::task::JoinHandle<u32> {
    let mut ws = login_as(&env.addr(), k).await;
    send(
        &mut ws,
        &ToRelay::Status {
            load,
            serve_compute: true,
        },
    )
    .await;
    send(
        &mut ws,
        &ToRelay::Have {
            add: vec![env.hash()],
            remove: vec![],
        },
    )
    .await;
    let w = ExpertWeights::from_safetensors(&env.cfg, 0, 1, &env.payload).unwrap();
    let hidden = env.cfg.hidden_size;
    tokio::spawn(async move {
        let mut answered = 0;
        while let Some(m) = recv(&mut ws).await {
            if let FromRelay::Compute {
                req, rows, input, ..
            } = m
            {
                assert_eq!(input.len(), rows as usize * hidden);
                let output = match b {
                    Behaviour::Honest => expert_forward(&w, &input, rows as usize, 1),
                    Behaviour::Garbage => vec![f32::NAN; input.len()],
                    Behaviour::Disconnect => return answered,
                };
                send(&mut ws, &ToRelay::ComputeResult { req, output }).await;
                answered += 1;
            }
        }
        answered
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_compute_answers_and_fails_over_from_garbage_and_disconnects() {
    let env = PeerEnv::start(PeerOptions::default());
    let peers = env.relay.state.peers.clone();
    let (honest, garbage, quitter) = (key(40), key(41), key(42));
    let h = compute_peer(&env, &honest, 900, Behaviour::Honest).await;
    let g = compute_peer(&env, &garbage, 0, Behaviour::Garbage).await;
    let q = compute_peer(&env, &quitter, 100, Behaviour::Disconnect).await;
    until("three compute peers", || {
        peers.compute_peers() == 3 && peers.holders_of(&env.hash()).len() == 3
    })
    .await;
    let hidden = env.cfg.hidden_size;
    let rows = 3u32;
    let input: Vec<f32> = (0..rows as usize * hidden)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
        .collect();
    let w = ExpertWeights::from_safetensors(&env.cfg, 0, 1, &env.payload).unwrap();
    let want = expert_forward(&w, &input, rows as usize, 1);
    // The cheapest (garbage) fails its check, the next (the quitter)
    // disconnects mid-request, the honest one answers.
    let ans = peers
        .compute(env.hash(), rows, input.clone())
        .await
        .unwrap();
    assert_eq!(ans.peer, id(&honest));
    assert_eq!(ans.output, want, "the same floats as local computation");
    let failed: Vec<_> = ans.failed.iter().map(|f| f.0).collect();
    assert_eq!(failed, vec![id(&garbage), id(&quitter)], "{:?}", ans.failed);
    assert!(
        ans.failed[0].1.contains("non-finite"),
        "{}",
        ans.failed[0].1
    );
    assert!(
        ans.failed[1].1.contains("disconnect"),
        "{}",
        ans.failed[1].1
    );
    assert_eq!(q.await.unwrap(), 0);
    // The garbage peer is in backoff: the next computation goes straight
    // to the honest peer.
    let ans = peers
        .compute(env.hash(), rows, input.clone())
        .await
        .unwrap();
    assert_eq!(ans.peer, id(&honest));
    assert!(ans.failed.is_empty(), "{:?}", ans.failed);
    let s = peers.stats();
    assert_eq!((s.compute_answered, s.compute_failed), (2, 2));
    assert_eq!(s.peer(&id(&honest)).compute_answered, 2);
    // No holder for another block: a clear failure with nobody tried.
    let err = peers
        .compute(web_node::chain::BlockHash([7; 32]), 1, vec![0.0; hidden])
        .await
        .unwrap_err();
    assert!(err.failed.is_empty());
    assert!(err.message.contains("no logged-in peer"), "{}", err.message);
    g.abort();
    h.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_compute_peer_times_out_and_the_next_answers() {
    let env = PeerEnv::start(PeerOptions::default().compute_timeout(Duration::from_millis(300)));
    let peers = env.relay.state.peers.clone();
    let honest = key(50);
    let h = compute_peer(&env, &honest, 900, Behaviour::Honest).await;
    // Logged in, holds the block, serves compute, never answers.
    let mut mute = login_as(&env.addr(), &key(51)).await;
    send(
        &mut mute,
        &ToRelay::Status {
            load: 0,
            serve_compute: true,
        },
    )
    .await;
    send(
        &mut mute,
        &ToRelay::Have {
            add: vec![env.hash()],
            remove: vec![],
        },
    )
    .await;
    until("two compute peers", || {
        peers.holders_of(&env.hash()).len() == 2
    })
    .await;
    let hidden = env.cfg.hidden_size;
    let ans = peers
        .compute(env.hash(), 1, vec![0.5; hidden])
        .await
        .unwrap();
    assert_eq!(ans.peer, id(&honest));
    assert_eq!(ans.failed.len(), 1);
    assert_eq!(ans.failed[0].0, id(&key(51)));
    assert_eq!(peers.stats().compute_timed_out, 1);
    h.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logged_in_peers_hear_of_new_blocks() {
    let env = PeerEnv::start(PeerOptions::default());
    let mut ws = login_as(&env.addr(), &key(60)).await;
    let relay = &env.relay;
    let cfg = env.cfg.clone();
    let (block, _, _) = tokio::task::block_in_place(|| publish_expert(relay, &cfg, 0, 0, 5));
    match recv(&mut ws).await {
        Some(FromRelay::BlockAdded { hash, name, .. }) => {
            assert_eq!(hash, block.hash);
            assert_eq!(name, "layer0.expert0");
        }
        other => panic!("expected BlockAdded, got {other:?}"),
    }
    assert_eq!(env.relay.state.peers.stats().block_added_sent, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_per_ip_cap_get_503_and_shutdown_closes_peers() {
    let env = PeerEnv::start(PeerOptions::default().max_conns_per_ip(2));
    let mut a = login_as(&env.addr(), &key(70)).await;
    let _b = login_as(&env.addr(), &key(71)).await;
    let err =
        tokio_tungstenite::connect_async(request(&env.addr(), &[web_node::net::peer::SUBPROTOCOL]))
            .await
            .unwrap_err();
    let tokio_tungstenite::tungstenite::Error::Http(resp) = err else {
        panic!("expected 503, got {err}");
    };
    assert_eq!(resp.status(), 503);
    let body = String::from_utf8_lossy(resp.body().as_deref().unwrap()).into_owned();
    assert!(body.contains("too many peer connections"), "{body}");
    assert_eq!(env.relay.state.peers.stats().refused_connections, 1);
    // Upgraded connections keep working past the HTTP keep-alive timeout
    // (5 s by default would have closed an idle HTTP connection).
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (data, _) = fetch_chunk(&mut a, 1, env.hash(), 0).await.unwrap();
    assert_eq!(data, env.chunk(0));
    // Shutdown: peers are told and closed.
    env.relay.state.peers.shutdown();
    let (code, _) = expect_error(&mut a).await;
    assert_eq!(code, codes::UNAVAILABLE);
    expect_closed(&mut a).await;
    let _ = Arc::clone(&env.relay.state);
}
