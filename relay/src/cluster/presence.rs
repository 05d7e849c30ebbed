//! How relays on one database find each other and each other's peers.
//!
//! * **Registration.** [`configure`] gives the relay its identity: a relay
//!   key of its own ([`KEY_FILE`] in the data dir, created on first start,
//!   distinct from `operator.key`, which operators may share), a fresh id
//!   per start, and the `/ws` URL other relays reach it at (`relay serve
//!   --advertise`). [`start`] inserts its row in `relays`, refreshes
//!   `seen_at` every [`ClusterOptions::heartbeat`], and deletes the row
//!   (with its presence, `ON DELETE CASCADE`) on a graceful shutdown. A row
//!   not refreshed for [`ClusterOptions::dead_after`] is dead: ignored by
//!   every lookup and deleted by the next live relay's heartbeat. A relay
//!   whose own row went (it stalled past `dead_after`) inserts it again and
//!   rewrites its presence.
//! * **Presence.** The core reports what this relay's peers hold
//!   ([`crate::peers::PresenceChange`]); a writer task takes them from a
//!   bounded queue in batches and writes `peer_presence` in one transaction
//!   per batch, off the peers' path. A full queue or a failed write makes
//!   the next write a full rewrite of this relay's rows from the registry.
//!   Relays logged in here are never in it.
//! * **Lookups.** The core asks which other live relays' peers hold a block
//!   ([`crate::peers::Action::Lookup`]); a lookup task answers in batches
//!   with one query each and feeds the answer back
//!   ([`crate::peers::Peers::remote_holders`]). The core then forwards over
//!   a link ([`super::link`]).
//! * **Who is a relay.** Each heartbeat reads the live relays: their keys
//!   (a login with one of them is another relay, [`Cluster::login_kind`]) and the
//!   list the core keeps links to.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use tokio::sync::{mpsc, watch};
use web_node::chain::BlockHash;
use web_node::net::peer::PeerId;

pub use crate::limits::{
    DB_TIMEOUT, LOGIN_CHECK_TIMEOUT, LOOKUP_BATCH, LOOKUP_QUEUE, MAX_RETRY, PRESENCE_BATCH,
    PRESENCE_DELAY, PRESENCE_QUEUE,
};
pub use crate::peers::cluster::{Cluster, ClusterOptions};

use crate::limits::FIRST_RETRY;
use crate::peers::cluster::{ClusterIo, IoFuture};
use crate::peers::{Counters, Peers, PresenceChange, RemoteRelay};
use crate::pg::{hash32, Client, Pg, PgError};
use crate::state::{CoreState, SharedCore};
use crate::RelayError;

/// The relay's key file in its data dir.
pub const KEY_FILE: &str = "relay-peer.key";

/// `ws://ADDR/ws` for the bound address; an unspecified address (0.0.0.0,
/// [::]) becomes loopback (pass `--advertise` when other machines must
/// reach this relay).
pub fn default_advertise(local: SocketAddr) -> String {
    let mut a = local;
    if a.ip().is_unspecified() {
        a.set_ip(if a.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    format!("ws://{a}/ws")
}

/// Check an advertised URL: `ws://` or `wss://` with a host.
pub fn check_ws_url(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("ws://")
        .or_else(|| url.strip_prefix("wss://"))
        .ok_or_else(|| format!("{url:?}: the advertised URL must start with ws:// or wss://"))?;
    if rest
        .split(['/', '?', '#'])
        .next()
        .unwrap_or_default()
        .is_empty()
    {
        return Err(format!("{url:?} names no host"));
    }
    Ok(())
}

/// Load `DIR/relay-peer.key` (hex ed25519 secret), creating it (mode 0600)
/// on first start.
pub fn relay_key(dir: &Path) -> Result<SigningKey, RelayError> {
    use std::io::Write as _;
    let path = dir.join(KEY_FILE);
    if path.exists() {
        let text = std::fs::read_to_string(&path)?;
        let mut secret = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut secret).map_err(|e| {
            RelayError::Key(format!("{}: not a hex ed25519 secret: {e}", path.display()))
        })?;
        return Ok(SigningKey::from_bytes(&secret));
    }
    std::fs::create_dir_all(dir)?;
    let key = SigningKey::generate(&mut rand_core::OsRng);
    let tmp = dir.join(format!("{KEY_FILE}.tmp"));
    {
        let mut o = std::fs::OpenOptions::new();
        o.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            o.mode(0o600);
        }
        let mut f = o.open(&tmp)?;
        f.write_all(hex::encode(key.to_bytes()).as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path)?;
    tracing::info!(public_key = %hex::encode(key.verifying_key().to_bytes()), path = %path.display(), "relay peer key created");
    Ok(key)
}

/// The identity of a relay on a shared database (see the module docs): the
/// cluster handle to build its peer layer with
/// (`crate::server::AppState::with_cluster`, which gives it to
/// [`Peers::new`]), before [`super::start`]. `ws_url` is the `/ws` URL other
/// relays reach this one at, so the listener is bound first. `data_dir`
/// holds [`KEY_FILE`].
pub fn configure(
    state: &CoreState,
    data_dir: &Path,
    ws_url: String,
) -> Result<Arc<Cluster>, RelayError> {
    configure_with(state, data_dir, ws_url, ClusterOptions::default())
}

/// [`configure`] with other timings (tests).
pub fn configure_with(
    state: &CoreState,
    data_dir: &Path,
    ws_url: String,
    opts: ClusterOptions,
) -> Result<Arc<Cluster>, RelayError> {
    check_ws_url(&ws_url)
        .map_err(|m| RelayError::Io(std::io::Error::new(std::io::ErrorKind::InvalidInput, m)))?;
    let key = relay_key(data_dir)?;
    let io = Box::new(DbIo {
        pg: state.pg.clone(),
    });
    Ok(Arc::new(Cluster::new(key, ws_url, opts, io)))
}

/// [`ClusterIo`] over the shared database and [`super::link`].
struct DbIo {
    pg: Option<Arc<Pg>>,
}

impl ClusterIo for DbIo {
    fn open_link(
        &self,
        peers: Arc<Peers>,
        cluster: Arc<Cluster>,
        link: PeerId,
        relay: RemoteRelay,
    ) {
        super::link::spawn(peers, cluster, link, relay);
    }

    fn is_live_relay(&self, key: PeerId, dead_after: Duration) -> IoFuture {
        let Some(pg) = self.pg.clone() else {
            return Box::pin(async { false });
        };
        let (k, dead) = (key.to_vec(), secs(dead_after));
        Box::pin(async move {
            let found = db(&pg, move |c: Client| async move {
                let row = c
                    .query_opt(
                        "SELECT 1 FROM relays WHERE key = $1 \
                         AND seen_at >= now() - make_interval(secs => $2)",
                        &[&k, &dead],
                    )
                    .await?;
                Ok(row.is_some())
            });
            matches!(found.await, Ok(true))
        })
    }
}

/// Resolves once `stop` is true (the relay shuts down).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Run `f` with a pooled connection without blocking this runtime.
async fn db<T, F, Fut>(pg: &Arc<Pg>, f: F) -> Result<T, PgError>
where
    F: FnOnce(Client) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, PgError>> + Send + 'static,
    T: Send + 'static,
{
    let pg = pg.clone();
    tokio::task::spawn_blocking(move || pg.with(f))
        .await
        .map_err(|e| PgError::new(format!("database task failed: {e}")))?
}

/// [`db`] within [`DB_TIMEOUT`].
async fn db_t<T, F, Fut>(pg: &Arc<Pg>, f: F) -> Result<T, PgError>
where
    F: FnOnce(Client) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, PgError>> + Send + 'static,
    T: Send + 'static,
{
    tokio::time::timeout(DB_TIMEOUT, db(pg, f))
        .await
        .map_err(|_| PgError::new(format!("no answer within {} s", DB_TIMEOUT.as_secs())))?
}

/// Start registration, heartbeat, presence writer and lookups (nothing
/// without a database or without [`configure`]). Inside a tokio runtime.
pub fn start(state: &SharedCore, peers: &Arc<Peers>) {
    let (Some(pg), Some(c)) = (state.pg.clone(), peers.cluster().cloned()) else {
        if state.pg.is_some() {
            tracing::warn!("on a shared database without an advertised /ws URL: peers of this relay are not found by other relays and chunks are not forwarded");
        }
        return;
    };
    let (Some(presence), Some(lookups)) = (
        c.presence_rx.lock().ok().and_then(|mut r| r.take()),
        c.lookup_rx.lock().ok().and_then(|mut r| r.take()),
    ) else {
        return; // started already
    };
    c.left.send_replace(false);
    tokio::spawn(heartbeat(peers.clone(), pg, c, presence, lookups));
}

async fn heartbeat(
    peers: Arc<Peers>,
    pg: Arc<Pg>,
    c: Arc<Cluster>,
    presence: mpsc::Receiver<PresenceChange>,
    lookups: mpsc::Receiver<BlockHash>,
) {
    let mut stop = peers.shutdown_signal();
    let weak = Arc::downgrade(&peers);
    drop(peers);
    let mut retry = FIRST_RETRY;
    loop {
        match register(&pg, &c).await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = retry.as_millis() as u64, "cannot register this relay in the database");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(retry) => {}
            _ = stopped(&mut stop) => {
                c.left.send_replace(true);
                return;
            }
        }
        retry = (retry * 2).min(MAX_RETRY);
    }
    tracing::info!(relay = %c.id, url = %c.ws_url, key = %hex::encode(c.public_key()), "relay registered in the database");
    let writer = tokio::spawn(write_presence(
        weak.clone(),
        pg.clone(),
        c.clone(),
        presence,
    ));
    let lookup = tokio::spawn(answer_lookups(weak.clone(), pg.clone(), c.clone(), lookups));
    let mut tick = tokio::time::interval(c.opts.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopped(&mut stop) => break,
        }
        match beat(&pg, &c).await {
            Ok(alive) => {
                c.set_alive(&alive);
                let Some(p) = weak.upgrade() else { break };
                p.relays_alive(alive);
            }
            Err(e) => tracing::warn!(error = %e, "relay heartbeat failed"),
        }
    }
    // Graceful shutdown: out of the database, with every presence row.
    lookup.abort();
    writer.abort();
    let id = c.id.clone();
    match db_t(&pg, move |cl: Client| async move {
        cl.execute("DELETE FROM relays WHERE id = $1", &[&id])
            .await?;
        Ok(())
    })
    .await
    {
        Ok(()) => tracing::info!(relay = %c.id, "relay removed from the database"),
        Err(e) => {
            tracing::warn!(error = %e, "could not remove this relay from the database (it expires)")
        }
    }
    c.registered.store(false, Ordering::SeqCst);
    c.left.send_replace(true);
}

async fn register(pg: &Arc<Pg>, c: &Arc<Cluster>) -> Result<(), PgError> {
    let (id, key, url) = (c.id.clone(), c.public_key().to_vec(), c.ws_url.clone());
    db_t(pg, move |cl: Client| async move {
        cl.execute(
            "INSERT INTO relays (id, key, ws_url) VALUES ($1, $2, $3) \
             ON CONFLICT (id) DO UPDATE SET seen_at = now()",
            &[&id, &key, &url],
        )
        .await?;
        Ok(())
    })
    .await?;
    c.registered.store(true, Ordering::SeqCst);
    c.resync.store(true, Ordering::SeqCst);
    c.wake.notify_one();
    Ok(())
}

/// Refresh this relay's row (inserting it again if a live relay deleted it
/// as dead), delete dead rows, read the live relays.
async fn beat(pg: &Arc<Pg>, c: &Arc<Cluster>) -> Result<Vec<RemoteRelay>, PgError> {
    let (id, dead) = (c.id.clone(), secs(c.opts.dead_after));
    let (updated, rows) = db_t(pg, move |cl: Client| async move {
        let n = cl
            .execute("UPDATE relays SET seen_at = now() WHERE id = $1", &[&id])
            .await?;
        cl.execute(
            "DELETE FROM relays WHERE seen_at < now() - make_interval(secs => $1)",
            &[&dead],
        )
        .await?;
        let rows = cl
            .query(
                "SELECT id, key, ws_url FROM relays WHERE id <> $1 \
                 AND seen_at >= now() - make_interval(secs => $2) ORDER BY id",
                &[&id, &dead],
            )
            .await?;
        Ok((n, rows))
    })
    .await?;
    if updated == 0 {
        tracing::warn!(relay = %c.id, "this relay's row was gone (deleted as dead): registering again");
        register(pg, c).await?;
    }
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let key: Vec<u8> = r.get(1);
        out.push(RemoteRelay {
            id: r.get(0),
            key: hash32(&key)?,
            ws_url: r.get(2),
        });
    }
    Ok(out)
}

/// What one batch of presence changes does, folded (last change wins).
#[derive(Debug, Default, PartialEq)]
struct Fold {
    gone: Vec<PeerId>,
    set: HashMap<(PeerId, BlockHash), bool>,
}

fn fold(batch: Vec<PresenceChange>) -> Fold {
    let mut f = Fold::default();
    for ch in batch {
        match ch {
            PresenceChange::Add { peer, blocks } => {
                for b in blocks {
                    f.set.insert((peer, b), true);
                }
            }
            PresenceChange::Remove { peer, blocks } => {
                for b in blocks {
                    f.set.insert((peer, b), false);
                }
            }
            PresenceChange::Gone { peer } => {
                // Rows of the peer go first; changes before this are moot.
                f.set.retain(|(p, _), _| *p != peer);
                if !f.gone.contains(&peer) {
                    f.gone.push(peer);
                }
            }
        }
    }
    f
}

async fn write_presence(
    peers: std::sync::Weak<Peers>,
    pg: Arc<Pg>,
    c: Arc<Cluster>,
    mut rx: mpsc::Receiver<PresenceChange>,
) {
    let mut retry = FIRST_RETRY;
    loop {
        let mut batch = Vec::new();
        if !c.resync.load(Ordering::SeqCst) {
            tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => batch.push(m),
                    None => return,
                },
                _ = c.wake.notified() => {}
            }
            tokio::time::sleep(PRESENCE_DELAY).await;
        }
        while batch.len() < PRESENCE_BATCH {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        let resync = c.resync.swap(false, Ordering::SeqCst);
        let Some(p) = peers.upgrade() else { return };
        let snapshot = resync.then(|| p.presence_snapshot());
        if batch.is_empty() && snapshot.is_none() {
            continue;
        }
        let f = fold(batch);
        match write(&pg, &c.id, snapshot, f).await {
            Ok(()) => {
                Counters::inc(&p.counters().presence_writes);
                retry = FIRST_RETRY;
            }
            Err(e) => {
                Counters::inc(&p.counters().presence_errors);
                tracing::warn!(error = %e, retry_in_ms = retry.as_millis() as u64, "writing peer presence failed; it is rewritten whole");
                c.resync.store(true, Ordering::SeqCst);
                drop(p);
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(MAX_RETRY);
            }
        }
    }
}

/// One transaction: the whole presence first (a rewrite), then the batch.
async fn write(
    pg: &Arc<Pg>,
    relay: &str,
    snapshot: Option<Vec<(PeerId, Vec<BlockHash>)>>,
    f: Fold,
) -> Result<(), PgError> {
    let relay = relay.to_string();
    db_t(pg, move |mut cl: Client| async move {
        let t = cl.transaction().await?;
        let flat = |pairs: &mut dyn Iterator<Item = (PeerId, BlockHash)>| {
            let (mut ps, mut bs): (Vec<Vec<u8>>, Vec<Vec<u8>>) = (Vec::new(), Vec::new());
            for (p, b) in pairs {
                ps.push(p.to_vec());
                bs.push(b.0.to_vec());
            }
            (ps, bs)
        };
        const INSERT: &str = "INSERT INTO peer_presence (relay, peer, block) \
             SELECT $1, p, b FROM unnest($2::bytea[], $3::bytea[]) AS x(p, b) \
             ON CONFLICT DO NOTHING";
        if let Some(all) = snapshot {
            t.execute("DELETE FROM peer_presence WHERE relay = $1", &[&relay])
                .await?;
            let (ps, bs) = flat(
                &mut all
                    .into_iter()
                    .flat_map(|(p, bl)| bl.into_iter().map(move |b| (p, b))),
            );
            if !ps.is_empty() {
                t.execute(INSERT, &[&relay, &ps, &bs]).await?;
            }
        }
        if !f.gone.is_empty() {
            let gone: Vec<Vec<u8>> = f.gone.iter().map(|p| p.to_vec()).collect();
            t.execute(
                "DELETE FROM peer_presence WHERE relay = $1 AND peer = ANY($2::bytea[])",
                &[&relay, &gone],
            )
            .await?;
        }
        let (ps, bs) = flat(&mut f.set.iter().filter(|(_, v)| !**v).map(|(k, _)| *k));
        if !ps.is_empty() {
            t.execute(
                "DELETE FROM peer_presence WHERE relay = $1 AND (peer, block) IN \
                 (SELECT p, b FROM unnest($2::bytea[], $3::bytea[]) AS x(p, b))",
                &[&relay, &ps, &bs],
            )
            .await?;
        }
        let (ps, bs) = flat(&mut f.set.iter().filter(|(_, v)| **v).map(|(k, _)| *k));
        if !ps.is_empty() {
            t.execute(INSERT, &[&relay, &ps, &bs]).await?;
        }
        t.commit().await?;
        Ok(())
    })
    .await
}

async fn answer_lookups(
    peers: std::sync::Weak<Peers>,
    pg: Arc<Pg>,
    c: Arc<Cluster>,
    mut rx: mpsc::Receiver<BlockHash>,
) {
    while let Some(first) = rx.recv().await {
        let mut blocks = vec![first];
        while blocks.len() < LOOKUP_BATCH {
            match rx.try_recv() {
                Ok(b) if !blocks.contains(&b) => blocks.push(b),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        let mut found = match lookup(&pg, &c, &blocks).await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, blocks = blocks.len(), "presence lookup failed: those chunks come from the store");
                HashMap::new()
            }
        };
        let Some(p) = peers.upgrade() else { return };
        for b in blocks {
            p.remote_holders(b, found.remove(&b).unwrap_or_default());
        }
    }
}

/// Which other live relays' peers hold each of `blocks`.
async fn lookup(
    pg: &Arc<Pg>,
    c: &Arc<Cluster>,
    blocks: &[BlockHash],
) -> Result<HashMap<BlockHash, Vec<RemoteRelay>>, PgError> {
    let (id, dead) = (c.id.clone(), secs(c.opts.dead_after));
    let bs: Vec<Vec<u8>> = blocks.iter().map(|b| b.0.to_vec()).collect();
    let rows = db_t(pg, move |cl: Client| async move {
        Ok(cl
            .query(
                "SELECT DISTINCT p.block, r.id, r.key, r.ws_url \
                 FROM peer_presence p JOIN relays r ON r.id = p.relay \
                 WHERE p.block = ANY($1::bytea[]) AND p.relay <> $2 \
                 AND r.seen_at >= now() - make_interval(secs => $3)",
                &[&bs, &id, &dead],
            )
            .await?)
    })
    .await?;
    let mut out: HashMap<BlockHash, Vec<RemoteRelay>> = HashMap::new();
    for r in rows {
        let block: Vec<u8> = r.get(0);
        let key: Vec<u8> = r.get(2);
        out.entry(BlockHash(hash32(&block)?))
            .or_default()
            .push(RemoteRelay {
                id: r.get(1),
                key: hash32(&key)?,
                ws_url: r.get(3),
            });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn a_batch_folds_to_its_last_change_per_row() {
        let (p, q) = ([1; 32], [2; 32]);
        let (a, b) = (BlockHash([7; 32]), BlockHash([8; 32]));
        let f = fold(vec![
            PresenceChange::Add {
                peer: p,
                blocks: vec![a, b],
            },
            PresenceChange::Remove {
                peer: p,
                blocks: vec![a],
            },
            PresenceChange::Add {
                peer: q,
                blocks: vec![a],
            },
            PresenceChange::Gone { peer: q },
            PresenceChange::Add {
                peer: q,
                blocks: vec![b],
            },
        ]);
        assert_eq!(f.gone, vec![q]);
        let mut set: Vec<_> = f.set.into_iter().collect();
        set.sort();
        assert_eq!(set, vec![((p, a), false), ((p, b), true), ((q, b), true)]);
    }

    #[test]
    fn advertised_urls_are_checked_and_derived() {
        assert!(check_ws_url("ws://10.0.0.1:8080/ws").is_ok());
        assert!(check_ws_url("wss://relay.example/ws").is_ok());
        assert!(check_ws_url("http://x/ws").is_err());
        assert!(check_ws_url("ws:///ws").is_err());
        assert_eq!(
            default_advertise("0.0.0.0:8080".parse().unwrap()),
            "ws://127.0.0.1:8080/ws"
        );
        assert_eq!(
            default_advertise("10.1.2.3:9".parse().unwrap()),
            "ws://10.1.2.3:9/ws"
        );
    }

    #[test]
    fn the_relay_key_is_created_once_apart_from_the_operator_key() {
        let tmp = tempfile::tempdir().unwrap();
        let a = relay_key(tmp.path()).unwrap();
        let b = relay_key(tmp.path()).unwrap();
        assert_eq!(a.to_bytes(), b.to_bytes());
        assert!(tmp.path().join(KEY_FILE).is_file());
        assert!(!tmp.path().join("operator.key").exists());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(tmp.path().join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
