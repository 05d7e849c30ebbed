//! The native test node, written once: [`Node`] runs `miner::peer::run` (what
//! `aiblock peer` runs) on a runtime of its own thread and watches its
//! status; [`node_cfg`] points it at relays; [`model_dir`] is the random
//! model both peer suites serve. Used by `peer_network` (one relay) and
//! `cluster_peers` (two relays on one database).
//!
//! The waits are bounded ([`WAIT`]) only so that a broken build fails
//! instead of hanging; no assertion depends on how fast anything is.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use test_support::relay::TestRelay;
use tokio::sync::{oneshot, watch};
use web_node::model::random::{small_config, write_random_model};

use miner::peer::{PeerConfig, PeerReport, PeerStatus};

/// Bound on every wait (see the module docs).
pub const WAIT: Duration = Duration::from_secs(180);

/// A random model whose experts span two 256 KiB chunks (hidden 64,
/// intermediate 512: three 64×512 f32 matrices, ~393 KB).
pub fn model_dir(dir: &Path) -> PathBuf {
    let m = dir.join("model");
    write_random_model(&m, &small_config(259, 64, 512, 2, 2, 1), 11).unwrap();
    m
}

/// A node's config: the `/ws` URLs of `relays` (the first is tried first),
/// its data dir, the expert slots it wants (globs).
pub fn node_cfg(relays: &[&TestRelay], data: &Path, globs: &[&str]) -> PeerConfig {
    let urls: Vec<String> = relays.iter().map(|r| r.ws()).collect();
    let mut c = PeerConfig::new(urls.join(","), data);
    c.experts = globs.iter().map(|s| s.to_string()).collect();
    c
}

/// A node running `miner::peer::run` on its own runtime; dropping it stops it.
pub struct Node {
    status: watch::Receiver<PeerStatus>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<PeerReport>>>,
}

impl Node {
    pub fn start(mut cfg: PeerConfig) -> Self {
        let (tx, status) = watch::channel(PeerStatus::default());
        cfg.status = Some(tx);
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(miner::peer::run(cfg, async move {
                let _ = stop_rx.await;
            }))
        });
        Self {
            status,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    pub fn status(&self) -> PeerStatus {
        self.status.borrow().clone()
    }

    /// Wait until `f` holds for the node's status.
    pub fn wait(&self, what: &str, f: impl Fn(&PeerStatus) -> bool) -> PeerStatus {
        let t0 = Instant::now();
        loop {
            let s = self.status();
            if f(&s) {
                return s;
            }
            assert!(
                t0.elapsed() < WAIT,
                "gave up waiting for {what}; status: {s:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait until the node is logged in and holds every block it wants.
    pub fn wait_complete(&self) -> PeerStatus {
        self.wait("every wanted block held", |s| s.logged_in && s.complete())
    }

    /// The node's public key (its peer id).
    pub fn key(&self) -> [u8; 32] {
        let mut k = [0u8; 32];
        hex::decode_to_slice(self.status().id, &mut k).unwrap();
        k
    }

    /// Stop the node and return its report (panics if it failed).
    pub fn stop(mut self) -> PeerReport {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.thread.take().unwrap().join().unwrap().unwrap()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
