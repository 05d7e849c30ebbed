//! Peer-layer benchmark on loopback, one run:
//!
//! 1. N authenticated idle `/ws` peers held by one relay, and the relay's
//!    resident memory per connection (the relay runs as a child process so
//!    its RSS is its own).
//! 2. Chunk forwarding node → relay → node (the relay checks every chunk's
//!    hash), MB/s and p50/p99 chunk latency, beside a plain tokio-tungstenite
//!    echo server moving the same messages on the same machine.
//!
//! `cargo run --release -p relay --example peer_bench -- [peers] [rounds]`
//! (defaults 1000 and 20). Numbers are printed, nothing is asserted.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use futures_util::{SinkExt as _, StreamExt as _};
use relay::peers::PeerOptions;
use test_support::relay::TestRelay;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::Message;
use web_node::model::random::{small_config, write_random_model};
use web_node::net::api::{BlockInfo, ChunkList};
use web_node::net::peer::{decode_from_relay, login, FromRelay, ToRelay, SUBPROTOCOL};

/// Chunk requests B keeps outstanding (the protocol's credits).
const WINDOW: usize = web_node::net::peer::limits::CHUNK_CREDITS as usize;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--child") {
        return child(&args[2]);
    }
    let peers: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1000);
    let rounds: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(20);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(parent(peers, rounds));
}

/// The relay: a model with 6 MiB experts (256 KiB chunks), limits raised so
/// the benchmark measures the forwarding, not the per-peer message rate.
fn child(dir: &str) {
    let dir = std::path::PathBuf::from(dir);
    let model = dir.join("model");
    write_random_model(&model, &small_config(259, 512, 1024, 1, 4, 2), 7).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let cfg = relay::server::ServeConfig {
            data_dir: dir.join("data"),
            web_dir: None,
            model_dir: Some(model),
            database: None,
        };
        // `test_support`'s relay, through the production accept loop.
        let served = TestRelay::start_cfg(
            cfg,
            |s| {
                s.with_peer_options(
                    PeerOptions::default()
                        .max_conns_per_ip(1_000_000)
                        .max_conns(1_000_000)
                        .msgs_per_sec(1_000_000)
                        .msgs_burst(1_000_000),
                )
            },
            relay::ServeOptions::default()
                .max_connections(100_000)
                .max_connections_per_ip(100_000),
        );
        println!("ADDR {}", served.addr());
        // The parent closes our stdin when it is done.
        let _ = tokio::task::spawn_blocking(|| {
            let mut s = String::new();
            let _ = std::io::stdin().read_line(&mut s);
        })
        .await;
        served.stop();
    });
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

async fn connect(addr: &str) -> Ws {
    let mut req = format!("ws://{addr}/ws").into_client_request().unwrap();
    req.headers_mut()
        .insert("sec-websocket-protocol", SUBPROTOCOL.parse().unwrap());
    // TCP_NODELAY: small requests must not wait for Nagle (a real node sets it too).
    tokio_tungstenite::connect_async_with_config(req, None, true)
        .await
        .unwrap()
        .0
}

async fn recv(ws: &mut Ws) -> Option<FromRelay> {
    loop {
        match ws.next().await? {
            Ok(Message::Binary(b)) => return Some(decode_from_relay(&b).unwrap()),
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

async fn send(ws: &mut Ws, m: &ToRelay) {
    ws.send(Message::Binary(m.encode().into())).await.unwrap();
}

async fn login_peer(addr: &str, seed: u64) -> Ws {
    let mut k = [0u8; 32];
    k[..8].copy_from_slice(&seed.to_le_bytes());
    k[8] = 0xb7;
    let key = SigningKey::from_bytes(&k);
    let mut ws = connect(addr).await;
    let Some(FromRelay::Challenge { nonce, .. }) = recv(&mut ws).await else {
        panic!("no challenge")
    };
    send(&mut ws, &login(&key, &nonce, "bench")).await;
    let Some(FromRelay::Welcome { .. }) = recv(&mut ws).await else {
        panic!("no welcome")
    };
    ws
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

async fn parent(n_peers: usize, rounds: usize) {
    let tmp = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .arg("--child")
        .arg(tmp.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line.trim().strip_prefix("ADDR ").unwrap().to_string();
    let url = format!("http://{addr}");
    let infos: Vec<BlockInfo> = serde_json::from_reader(
        ureq::get(&format!("{url}/chain/B/blocks"))
            .call()
            .unwrap()
            .into_reader(),
    )
    .unwrap();
    let info = infos
        .iter()
        .find(|b| b.name == "layer0.expert1")
        .unwrap()
        .clone();
    let mut payload = Vec::new();
    std::io::Read::read_to_end(
        &mut ureq::get(&format!("{url}/blocks/{}/payload", info.hash))
            .call()
            .unwrap()
            .into_reader(),
        &mut payload,
    )
    .unwrap();
    let chunks: ChunkList = serde_json::from_reader(
        ureq::get(&format!("{url}/blocks/{}/chunks", info.hash))
            .call()
            .unwrap()
            .into_reader(),
    )
    .unwrap();
    let n_chunks = chunks.chunks.len();
    let cs = info.chunk_size as usize;
    println!(
        "relay pid {pid} on {addr}; expert block {} bytes in {n_chunks} chunks of {} KiB",
        payload.len(),
        cs / 1024
    );

    // 1. Idle peers.
    let warm = login_peer(&addr, u64::MAX).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss0 = rss_kb(pid);
    let t = Instant::now();
    let addr2 = addr.clone();
    let idle: Vec<Ws> = futures_util::stream::iter(0..n_peers as u64)
        .map(|i| {
            let a = addr2.clone();
            async move { login_peer(&a, i).await }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let login_s = t.elapsed().as_secs_f64();
    // Keep reading (answer pings) in tasks of the benchmark's process.
    let mut holders = Vec::new();
    for mut ws in idle {
        holders.push(tokio::spawn(async move {
            while recv(&mut ws).await.is_some() {}
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss1 = rss_kb(pid);
    let stats: relay::peers::PeerStats = serde_json::from_reader(
        ureq::get(&format!("{url}/p2p/stats"))
            .call()
            .unwrap()
            .into_reader(),
    )
    .unwrap();
    println!(
        "idle peers: {} logged in ({} online at the relay) in {login_s:.2} s ({:.0} logins/s)",
        n_peers,
        stats.peers_online,
        n_peers as f64 / login_s
    );
    println!(
        "relay RSS: {:.1} MiB before, {:.1} MiB with {n_peers} idle peers: {:.1} KiB per connection",
        rss0 as f64 / 1024.0,
        rss1 as f64 / 1024.0,
        (rss1.saturating_sub(rss0)) as f64 / n_peers.max(1) as f64
    );

    // 2. Forwarding node → relay → node.
    let payload = Arc::new(payload);
    let mut a = login_peer(&addr, 1 << 40).await;
    send(
        &mut a,
        &ToRelay::Have {
            add: vec![info.hash],
            remove: vec![],
        },
    )
    .await;
    let p2 = payload.clone();
    let holder = tokio::spawn(async move {
        while let Some(m) = recv(&mut a).await {
            if let FromRelay::ServeChunk { req, index, .. } = m {
                let s = index as usize * cs;
                let data = p2[s..(s + cs).min(p2.len())].to_vec();
                send(&mut a, &ToRelay::Chunk { req, data }).await;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut b = login_peer(&addr, 1 << 41).await;
    let total = rounds * n_chunks;
    let mut sent_at = vec![Instant::now(); total];
    let mut lat = Vec::with_capacity(total);
    let (mut next, mut done, mut bytes, mut from_peers) = (0usize, 0usize, 0u64, 0usize);
    let t = Instant::now();
    while done < total {
        while next < total && next - done < WINDOW {
            sent_at[next] = Instant::now();
            let m = ToRelay::GetChunk {
                req: next as u64,
                block: info.hash,
                index: (next % n_chunks) as u32,
            };
            b.feed(Message::Binary(m.encode().into())).await.unwrap();
            next += 1;
        }
        b.flush().await.unwrap();
        match recv(&mut b).await.unwrap() {
            FromRelay::ChunkData {
                req, data, from, ..
            } => {
                lat.push(sent_at[req as usize].elapsed().as_secs_f64() * 1e3);
                bytes += data.len() as u64;
                if matches!(from, web_node::net::peer::ChunkSource::Peer(_)) {
                    from_peers += 1;
                }
                done += 1;
            }
            FromRelay::ChunkFailed { reason, .. } => panic!("chunk failed: {reason}"),
            _ => {}
        }
    }
    let fwd_s = t.elapsed().as_secs_f64();
    let fwd_mbs = bytes as f64 / 1e6 / fwd_s;
    let (f50, f99) = (pct(&mut lat, 0.5), pct(&mut lat, 0.99));
    holder.abort();

    // 3. Plain tokio-tungstenite echo, same messages, same window.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo_addr = l.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        s.set_nodelay(true).unwrap();
        let mut ws = tokio_tungstenite::accept_async(s).await.unwrap();
        while let Some(Ok(m)) = ws.next().await {
            if m.is_binary() && ws.send(m).await.is_err() {
                break;
            }
        }
    });
    let (mut e, _) =
        tokio_tungstenite::connect_async_with_config(format!("ws://{echo_addr}"), None, true)
            .await
            .unwrap();
    let msg = payload[..cs].to_vec();
    let mut sent_at = vec![Instant::now(); total];
    let mut elat = Vec::with_capacity(total);
    let (mut next, mut done, mut ebytes) = (0usize, 0usize, 0u64);
    let t = Instant::now();
    while done < total {
        while next < total && next - done < WINDOW {
            sent_at[next] = Instant::now();
            e.feed(Message::Binary(msg.clone().into())).await.unwrap();
            next += 1;
        }
        e.flush().await.unwrap();
        if let Message::Binary(d) = e.next().await.unwrap().unwrap() {
            elat.push(sent_at[done].elapsed().as_secs_f64() * 1e3);
            ebytes += d.len() as u64;
            done += 1;
        }
    }
    let echo_s = t.elapsed().as_secs_f64();
    let echo_mbs = ebytes as f64 / 1e6 / echo_s;
    let (e50, e99) = (pct(&mut elat, 0.5), pct(&mut elat, 0.99));
    server.abort();

    println!();
    println!(
        "{:<44} {:>10} {:>12} {:>12}",
        "path (256 KiB messages, window 16)", "MB/s", "p50 ms", "p99 ms"
    );
    println!(
        "{:<44} {:>10.1} {:>12.2} {:>12.2}",
        "node -> relay (hash check) -> node", fwd_mbs, f50, f99
    );
    println!(
        "{:<44} {:>10.1} {:>12.2} {:>12.2}",
        "plain tokio-tungstenite echo", echo_mbs, e50, e99
    );
    println!(
        "forwarded {total} chunks ({:.1} MB), {from_peers} from the peer, with {n_peers} idle peers connected",
        bytes as f64 / 1e6
    );
    drop(warm);
    for h in holders {
        h.abort();
    }
    // Stop the relay.
    drop(child.stdin.take());
    let _ = child.stdin.as_mut().map(|s| s.flush());
    let _ = child.wait();
}
