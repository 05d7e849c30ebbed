//! Two relays in this process on one real PostgreSQL database, with real
//! WebSocket peers: a peer on relay 1 gets the chunks of a block that only
//! a peer on relay 2 holds (forwarded over a link, the ordinary `/ws`
//! protocol, checked by both relays, credited to relay 2's peer in the
//! shared ledger); a lying peer on relay 2 is caught there and relay 1
//! falls back to the store; a relay that dies stops being used and its
//! rows expire; a relay that stops removes itself.
//!
//! Skipped (loudly) when PostgreSQL is not installed; `AIBLOCK_REQUIRE_PG=1`
//! makes that a failure.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::common::ws::*;
use crate::common::*;
use ed25519_dalek::SigningKey;
use relay::cluster::presence::ClusterOptions;
use relay::peers::PeerOptions;
use relay::pg::Pg;
use relay::server::ServeConfig;
use relay::ServeOptions;
use test_support::pg::TestPg;
use web_node::chain::Block;
use web_node::model::{Config, Slot};
use web_node::net::api::BlockInfo;
use web_node::net::peer::{codes, ChunkSource};

/// Short timings so that a dead relay expires within a test.
fn quick() -> ClusterOptions {
    ClusterOptions::default()
        .heartbeat(Duration::from_millis(300))
        .dead_after(Duration::from_secs(3))
}

fn key(n: u8) -> SigningKey {
    SigningKey::from_bytes(&[n; 32])
}

fn id(k: &SigningKey) -> [u8; 32] {
    k.verifying_key().to_bytes()
}

/// A relay on the shared database, serving in this process, taking part in
/// the cluster (advertising its bound address); dropped, it crashes.
struct Node(TestRelay);

impl std::ops::Deref for Node {
    type Target = TestRelay;
    fn deref(&self) -> &TestRelay {
        &self.0
    }
}

impl Node {
    fn start(data: &Path, model: &Path, db: &str, opts: PeerOptions) -> Self {
        let cfg = ServeConfig {
            data_dir: data.to_path_buf(),
            web_dir: None,
            model_dir: Some(model.to_path_buf()),
            database: Some(db.to_string()),
        };
        Self(TestRelay::launch(
            cfg,
            move |s| s.with_peer_options(opts),
            ServeOptions::default(),
            Launch {
                cluster: Some(quick()),
                crash_on_drop: true,
                ..Launch::default()
            },
        ))
    }

    fn relay_id(&self) -> String {
        self.state.peers.cluster().unwrap().id.clone()
    }

    fn relay_key(&self) -> [u8; 32] {
        self.state.peers.cluster().unwrap().public_key()
    }
}

/// Two relays on one fresh database, an expert block of many 4 KiB chunks
/// uploaded to relay 1 and known to relay 2 (through the follower).
struct Env {
    _pg: TestPg,
    _tmp: tempfile::TempDir,
    db: Arc<Pg>,
    r1: Node,
    r2: Node,
    block: Block,
    payload: Arc<Vec<u8>>,
    chunk_size: usize,
}

impl Env {
    /// `r2`: relay 2's peer options.
    fn start(r2: PeerOptions) -> Option<Self> {
        let Some(pg) = TestPg::start() else {
            eprintln!("SKIPPED: PostgreSQL is not installed; the cluster peer tests did not run");
            return None;
        };
        let url = pg.create_db();
        let tmp = tempfile::tempdir().unwrap();
        let model = peer_model(tmp.path());
        let r1 = Node::start(&tmp.path().join("r1"), &model, &url, PeerOptions::default());
        let r2 = Node::start(&tmp.path().join("r2"), &model, &url, r2);
        let (block, info, payload) = publish_at(&r1.url, &peer_config(), 0, 1, 99);
        wait_blocking("relay 2 to list the block", || {
            get(&format!("{}/blocks/{}", r2.url, block.hash)).status == 200
        });
        let db = Pg::connect(&url).unwrap();
        let env = Self {
            _pg: pg,
            _tmp: tmp,
            db,
            r1,
            r2,
            block,
            payload: Arc::new(payload),
            chunk_size: info.chunk_size as usize,
        };
        let (a, b) = (env.r1.relay_id(), env.r2.relay_id());
        let (c1, c2) = (
            env.r1.state.peers.cluster().unwrap().clone(),
            env.r2.state.peers.cluster().unwrap().clone(),
        );
        wait_blocking("the relays to see each other", || {
            c1.relays().iter().any(|r| r.id == b) && c2.relays().iter().any(|r| r.id == a)
        });
        Some(env)
    }

    fn n_chunks(&self) -> u32 {
        self.payload.len().div_ceil(self.chunk_size) as u32
    }

    fn chunk(&self, k: u32) -> Vec<u8> {
        let s = k as usize * self.chunk_size;
        self.payload[s..(s + self.chunk_size).min(self.payload.len())].to_vec()
    }

    /// `SELECT count(*) ...` with one bytea or text parameter.
    fn count(&self, sql: &'static str, p: Param) -> i64 {
        self.db
            .with(move |c| async move {
                let row = match &p {
                    Param::Bytes(b) => c.query_one(sql, &[b]).await,
                    Param::Text(t) => c.query_one(sql, &[t]).await,
                }
                .map_err(relay::pg::PgError::from)?;
                Ok::<i64, relay::pg::PgError>(row.get(0))
            })
            .unwrap()
    }

    fn presence_of_peer(&self, peer: [u8; 32]) -> i64 {
        self.count(
            "SELECT count(*) FROM peer_presence WHERE peer = $1",
            Param::Bytes(peer.to_vec()),
        )
    }

    fn presence_of_relay(&self, relay: String) -> i64 {
        self.count(
            "SELECT count(*) FROM peer_presence WHERE relay = $1",
            Param::Text(relay),
        )
    }

    fn relay_rows(&self, relay: String) -> i64 {
        self.count(
            "SELECT count(*) FROM relays WHERE id = $1",
            Param::Text(relay),
        )
    }
}

enum Param {
    Bytes(Vec<u8>),
    Text(String),
}

/// [`crate::common::ws::publish_expert`] against a URL.
fn publish_at(
    url: &str,
    cfg: &Config,
    layer: usize,
    expert: usize,
    seed: u64,
) -> (Block, BlockInfo, Vec<u8>) {
    let slot = Slot::Expert { layer, expert };
    let name = slot.to_string();
    let meta = list(url, "A")[0].hash;
    let head = list(url, "B")
        .into_iter()
        .filter(|b| b.name == name && b.is_head)
        .map(|b| b.hash)
        .collect::<Vec<_>>();
    let payload = slot_payload(cfg, slot, seed);
    let (up, block) = upload(slot, &payload, head, Some(meta), &miner_key(9));
    let r = post_json(&format!("{url}/upload_moe_experts"), &seed_json(&up));
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    (block, r.json(), payload)
}

fn wait_blocking(what: &str, mut f: impl FnMut() -> bool) {
    let end = std::time::Instant::now() + WAIT;
    while !f() {
        assert!(
            std::time::Instant::now() < end,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Wait without blocking the test's runtime.
async fn wait(what: &str, mut f: impl FnMut() -> bool) {
    let end = tokio::time::Instant::now() + WAIT;
    while !f() {
        assert!(
            tokio::time::Instant::now() < end,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The database calls of [`Env`] block: run them off the test's runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

/// A holder on `node` announcing `block`, serving from `payload` (lying
/// when `corrupt`) in a task; returns the task (its errors) once the
/// relay's registry and the database show the holding.
async fn holder(
    env: &Arc<Env>,
    on: &Node,
    k: &SigningKey,
    corrupt: bool,
) -> tokio::task::JoinHandle<Vec<(String, String)>> {
    let mut ws = login_as(&on.addr(), k).await;
    announce(&mut ws, 0, false, vec![env.block.hash]).await;
    let peers = on.state.peers.clone();
    let (me, hash) = (id(k), env.block.hash);
    wait("the Have", || peers.holders_of(&hash).contains(&me)).await;
    let e = env.clone();
    blocking(move || {
        wait_blocking("the presence row", || e.presence_of_peer(me) == 1);
    })
    .await;
    tokio::spawn(serve_chunks(
        ws,
        env.payload.clone(),
        env.chunk_size,
        corrupt,
    ))
}

fn env_or_skip() -> Option<Arc<Env>> {
    Env::start(PeerOptions::default()).map(Arc::new)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_on_one_relay_gets_chunks_only_a_peer_on_another_relay_holds() {
    let Some(env) = env_or_skip() else { return };
    let h = key(1);
    let serving = holder(&env, &env.r2, &h, false).await;
    let mut rq = login_as(&env.r1.addr(), &key(2)).await;
    let n = env.n_chunks();
    assert!(n > 10, "{n} chunks");
    for k in 0..n {
        let (data, from) = fetch_chunk(&mut rq, u64::from(k), env.block.hash, k)
            .await
            .unwrap();
        assert_eq!(data, env.chunk(k), "chunk {k}");
        assert_eq!(from, ChunkSource::Peer(id(&h)), "chunk {k}");
    }
    let len = env.payload.len() as u64;
    let (s1, s2) = (env.r1.state.peers.stats(), env.r2.state.peers.stats());
    // Relay 1 forwarded every chunk from relay 2, read none from the store,
    // and credited nobody itself.
    assert_eq!(
        (
            s1.chunks_from_relays,
            s1.bytes_from_relays,
            s1.chunks_from_store
        ),
        (u64::from(n), len, 0)
    );
    assert_eq!((s1.chunks_from_peers, s1.links_up), (0, 1));
    // Its only per-peer numbers: what it delivered to its requesting peer.
    assert!(
        s1.per_peer
            .values()
            .all(|c| c.bytes_served == 0 && c.chunks_served == 0),
        "{:?}",
        s1.per_peer
    );
    assert_eq!(
        s1.per_peer
            .values()
            .map(|c| c.relay_forwarded_bytes)
            .sum::<u64>(),
        len
    );
    // Relay 2: its peer served them all to relay 1's link; the link is a
    // relay, not a peer.
    assert_eq!(
        (
            s2.chunks_from_peers,
            s2.chunks_to_relays,
            s2.bytes_to_relays
        ),
        (u64::from(n), u64::from(n), len)
    );
    assert_eq!(s2.peer(&id(&h)).bytes_served, len);
    assert_eq!((s2.relays_online, s2.peers_online), (1, 1));
    let listed: Vec<[u8; 32]> = env.r2.state.peers.views().iter().map(|v| v.id).collect();
    assert_eq!(listed, vec![id(&h)]);
    // /p2p/stats of relay 1 shows the forwarded chunks and the link.
    let st: serde_json::Value = get(&format!("{}/p2p/stats", env.r1.url)).json();
    assert_eq!(st["chunks_from_relays"], u64::from(n));
    assert_eq!(st["links"][0]["relay"], env.r2.relay_id());
    assert_eq!(st["links"][0]["state"], "up");
    // The ledger: relay 2's peer earned the bytes, the requester may report
    // usage of the block on relay 1, relay 1's key earned nothing.
    let hash = env.block.hash;
    let credited = env.r2.state.usage.peers_of(&hash);
    assert_eq!(credited.len(), 1);
    assert_eq!((credited[0].0, credited[0].1.bytes), (id(&h), len));
    assert!(env.r1.state.usage.fetched(&id(&key(2)), &hash));
    assert!(!env.r2.state.usage.fetched(&env.r1.relay_key(), &hash));
    env.r2.state.usage.flush().unwrap();
    let e = env.clone();
    let (ledger, relay_rows) = blocking(move || {
        let ledger = e.db.with(move |c| async move {
            let rows = c
                .query(
                    "SELECT peer, bytes FROM usage_peers WHERE block = $1",
                    &[&hash.0.to_vec()],
                )
                .await
                .map_err(relay::pg::PgError::from)?;
            Ok::<_, relay::pg::PgError>(
                rows.iter()
                    .map(|r| (r.get::<_, Vec<u8>>(0), r.get::<_, i64>(1)))
                    .collect::<Vec<_>>(),
            )
        });
        (
            ledger.unwrap(),
            e.presence_of_peer(e.r1.relay_key()) + e.presence_of_peer(id(&key(2))),
        )
    })
    .await;
    assert_eq!(ledger, vec![(id(&h).to_vec(), len as i64)]);
    assert_eq!(
        relay_rows, 0,
        "no presence for the link or a peer holding nothing"
    );
    drop(rq);
    serving.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_peer_on_the_other_relay_is_caught_there_and_the_store_answers() {
    // Relay 2 bans at the first bad chunk.
    let Some(env) = Env::start(PeerOptions::default().bad_chunks_to_ban(1)).map(Arc::new) else {
        return;
    };
    let liar = key(3);
    let serving = holder(&env, &env.r2, &liar, true).await;
    let mut rq = login_as(&env.r1.addr(), &key(2)).await;
    for k in 0..3u32 {
        let (data, from) = fetch_chunk(&mut rq, u64::from(k), env.block.hash, k)
            .await
            .unwrap();
        assert_eq!(data, env.chunk(k));
        assert_eq!(from, ChunkSource::Relay, "the liar's bytes never arrive");
    }
    let (s1, s2) = (env.r1.state.peers.stats(), env.r2.state.peers.stats());
    // Caught by relay 2 itself, which refused to forward it; relay 1 saw
    // no bad chunk and read the store.
    assert_eq!((s2.bad_chunks, s2.bans, s2.chunks_to_relays), (1, 1, 0));
    assert_eq!(s2.peer(&id(&liar)).bad_chunks, 1);
    assert!(env.r2.state.peers.banned_for(&id(&liar)).is_some());
    assert_eq!(
        (s1.bad_chunks, s1.chunks_from_relays, s1.chunks_from_store),
        (0, 0, 3)
    );
    let errors = serving.await.unwrap();
    assert!(errors.iter().any(|(c, _)| c == codes::BANNED), "{errors:?}");
    // Banned and gone: its presence is deleted.
    let e = env.clone();
    let me = id(&liar);
    blocking(move || wait_blocking("the liar's presence to go", || e.presence_of_peer(me) == 0))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_relay_stops_being_used_and_its_rows_expire() {
    let Some(env) = env_or_skip() else { return };
    let h = key(1);
    let _serving = holder(&env, &env.r2, &h, false).await;
    let mut rq = login_as(&env.r1.addr(), &key(2)).await;
    let (_, from) = fetch_chunk(&mut rq, 0, env.block.hash, 0).await.unwrap();
    assert_eq!(from, ChunkSource::Peer(id(&h)));
    let (r2_id, hash) = (env.r2.relay_id(), env.block.hash);
    // Relay 2 dies (no graceful stop: its rows stay until they expire).
    let e = env.clone();
    blocking(move || e.r2.end(false)).await;
    let peers1 = env.r1.state.peers.clone();
    // Requests fall back to the store at once (the link is down).
    for k in 1..4u32 {
        let (data, from) = fetch_chunk(&mut rq, u64::from(k), hash, k).await.unwrap();
        assert_eq!(data, env.chunk(k));
        assert_eq!(from, ChunkSource::Relay, "chunk {k}");
    }
    assert_eq!(peers1.stats().chunks_from_relays, 1);
    // After dead_after, relay 1 deletes relay 2's row and its presence.
    let e = env.clone();
    let id2 = r2_id.clone();
    blocking(move || {
        wait_blocking("the dead relay's row to go", || {
            e.relay_rows(id2.clone()) == 0
        });
        assert_eq!(e.presence_of_relay(id2), 0);
    })
    .await;
    let c1 = env.r1.state.peers.cluster().unwrap().clone();
    wait("relay 1 to forget relay 2", || {
        c1.relays().is_empty() && peers1.links().is_empty()
    })
    .await;
    let (_, from) = fetch_chunk(&mut rq, 9, hash, 4).await.unwrap();
    assert_eq!(from, ChunkSource::Relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_stops_removes_itself_and_its_presence() {
    let Some(env) = env_or_skip() else { return };
    let _serving = holder(&env, &env.r2, &key(1), false).await;
    let r2_id = env.r2.relay_id();
    let e = env.clone();
    let id2 = r2_id.clone();
    assert_eq!(
        blocking(move || (e.relay_rows(id2.clone()), e.presence_of_relay(id2))).await,
        (1, 1)
    );
    let e = env.clone();
    blocking(move || e.r2.end(true)).await;
    assert!(!env.r2.state.peers.cluster().unwrap().is_registered());
    let e = env.clone();
    let id2 = r2_id.clone();
    assert_eq!(
        blocking(move || (e.relay_rows(id2.clone()), e.presence_of_relay(id2))).await,
        (0, 0),
        "gone at once, not after expiry"
    );
}

/// The real `relay serve --database` binary: two relays find each other
/// (the advertised URL defaults to the bound address), forward a chunk, and
/// a SIGTERM removes the stopped relay from the database at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_binary_forwards_between_relays_and_leaves_on_sigterm() {
    let Some(pg) = TestPg::start() else {
        eprintln!("SKIPPED: PostgreSQL is not installed; the cluster binary test did not run");
        return;
    };
    let url = pg.create_db();
    let tmp = tempfile::tempdir().unwrap();
    let model = peer_model(tmp.path());
    let web = tmp.path().join("web");
    std::fs::create_dir_all(&web).unwrap();
    let args = ["--database", url.as_str()];
    let r1 = ChildRelay::start_args(&tmp.path().join("r1"), &model, &web, &args, None, None);
    let r2 = ChildRelay::start_args(&tmp.path().join("r2"), &model, &web, &args, None, None);
    let stats = |u: &str| -> serde_json::Value { get(&format!("{u}/p2p/stats")).json() };
    let (u1, u2) = (r1.url.clone(), r2.url.clone());
    let id2 = blocking(move || {
        let id2 = stats(&u2)["relay_id"].as_str().unwrap().to_string();
        let want = id2.clone();
        wait_blocking("relay 1 to see relay 2", || {
            stats(&u1)["relays"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r == want.as_str())
        });
        id2
    })
    .await;
    let (u1, u2) = (r1.url.clone(), r2.url.clone());
    let (block, info, payload) = blocking(move || {
        let b = publish_at(&u1, &peer_config(), 0, 1, 99);
        wait_blocking("relay 2 to list the block", || {
            get(&format!("{u2}/blocks/{}", b.0.hash)).status == 200
        });
        b
    })
    .await;
    let h = key(1);
    let mut ws = login_as(&r2.addr(), &h).await;
    announce(&mut ws, 0, false, vec![block.hash]).await;
    let db = Pg::connect(&url).unwrap();
    let me = id(&h);
    let count = move |sql: &'static str, p: Vec<u8>| {
        db.with(move |c| async move {
            let r = c
                .query_one(sql, &[&p])
                .await
                .map_err(relay::pg::PgError::from)?;
            Ok::<i64, relay::pg::PgError>(r.get(0))
        })
        .unwrap()
    };
    let c = count.clone();
    blocking(move || {
        wait_blocking("the presence row", || {
            c(
                "SELECT count(*) FROM peer_presence WHERE peer = $1",
                me.to_vec(),
            ) == 1
        })
    })
    .await;
    let serving = tokio::spawn(serve_chunks(
        ws,
        Arc::new(payload.clone()),
        info.chunk_size as usize,
        false,
    ));
    let mut rq = login_as(&r1.addr(), &key(2)).await;
    let (data, from) = fetch_chunk(&mut rq, 1, block.hash, 0).await.unwrap();
    assert_eq!(data, payload[..info.chunk_size as usize]);
    assert_eq!(from, ChunkSource::Peer(me));
    let u1 = r1.url.clone();
    let s1 = blocking(move || stats(&u1)).await;
    assert_eq!(s1["chunks_from_relays"], 1);
    assert_eq!(s1["links"][0]["relay"], id2.as_str());
    // SIGTERM: relay 2 leaves the database (with its presence) before it exits.
    blocking(move || r2.terminate()).await;
    let c = count.clone();
    let left = blocking(move || {
        (
            c(
                "SELECT count(*) FROM relays WHERE id = convert_from($1, 'UTF8')",
                id2.into_bytes(),
            ),
            c(
                "SELECT count(*) FROM peer_presence WHERE peer = $1",
                me.to_vec(),
            ),
        )
    })
    .await;
    assert_eq!(left, (0, 0));
    let (_, from) = fetch_chunk(&mut rq, 2, block.hash, 1).await.unwrap();
    assert_eq!(from, ChunkSource::Relay);
    serving.abort();
    drop(r1);
}
