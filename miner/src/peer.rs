//! `aiblock peer`: a native node on the relay's `/ws` network.
//!
//! A thin tokio driver around the sans-IO [`PeerNode`] of `web_node::node`:
//!
//! 1. loads or creates the node's key (mode 0600);
//! 2. syncs the chain's headers over REST (the http base is derived from the
//!    ws URL) and verifies them, through the client core
//!    ([`crate::client::RelayChain`]: paged listing, header verification,
//!    the latest model and its heads);
//! 3. picks the slot heads whose names match `--experts` (globs);
//! 4. checks the verified payloads already in `DATA/payloads/` (each read
//!    once and re-checked against its verified header, one at a time;
//!    corrupt or stale files are deleted) and holds them *on disk*: the
//!    node keeps no payload in memory, it reads each chunk it serves from
//!    its file when asked ([`PayloadFile`], [`PeerNode::hold_stored`]);
//! 5. connects to `/ws` (subprotocol `aiblock.v1`), logs in, announces what
//!    it holds, fetches the rest chunk by chunk through the relay (from other
//!    peers, the relay's store as fallback), stores each verified payload
//!    atomically (temp + fsync + rename), announces it and, once it is on
//!    disk, drops it from memory and serves it from its file;
//! 6. serves chunks, and with `--serve-compute` runs `expert_forward` on
//!    its verified weights for the relay (on a blocking thread; the payload
//!    is read from disk and checked against its header again when its
//!    decoded weights are not in the `--decoded-mb` LRU);
//! 7. reconnects with capped exponential backoff when the relay goes away
//!    (the core's [`Reconnect`]),
//!    resyncs, and resumes where it stopped. Given several relays (relays
//!    sharing one database, `--relay` repeated or comma-separated), it moves
//!    to the next one on each lost connection, so a relay that dies loses
//!    it no peer: the next relay takes its `Have` and routes to it.
//!
//! [`run`] is the whole node as a library function, so tests run nodes in
//! process; [`cli`] wraps it for the command line (until Ctrl-C).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use ed25519_dalek::SigningKey;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use web_node::chain::{check_payload_integrity, validate_payload, Block, BlockHash, BlockHeader};
use web_node::client::backoff::NATIVE_BACKOFF_MS;
use web_node::client::{relay_error_action, ErrorAction, ModelPick, Reconnect};
use web_node::model::reference::expert_forward;
use web_node::model::{Config, ExpertWeights, Slot};
use web_node::net::api::ChunkList;
use web_node::net::peer::{self, decode_from_relay, limits};
use web_node::node::{
    ComputeReq, Millis, NodeConfig, NodeEvent, NodeStats, PayloadReader, PeerNode, Source,
};
use web_node::view::budget::ByteLru;

use crate::blocks;

/// How often the status line is logged.
pub const STATUS_EVERY: Duration = Duration::from_secs(10);
/// A fetch given up (after its bounded retries) is tried again after a
/// header sync this much later (the relay may have a new head, or a holder).
const RESYNC_AFTER_FAILURE: Duration = Duration::from_secs(2);
/// Connecting (TCP + WebSocket handshake) may take this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// REST calls (listing, chunk lists, meta payload) time out after this.
const REST_TIMEOUT: Duration = Duration::from_secs(30);
/// Threads one expert computation uses (a node serves several at once).
const COMPUTE_THREADS: usize = 1;
/// Default `--experts`: every expert slot.
pub const ALL_EXPERTS: &str = "layer*.expert*";
/// Sub-directory of `--data` holding verified payloads, one file per block.
const PAYLOAD_DIR: &str = "payloads";
/// Default key file name inside `--data`.
const KEY_FILE: &str = "peer.key";

/// Flags of `aiblock peer`.
#[derive(Debug, Clone, Args)]
pub struct PeerArgs {
    /// The relay's WebSocket URL, e.g. ws://127.0.0.1:8080/ws. Several
    /// relays of one cluster (repeated or comma-separated): the node uses
    /// the first and moves to the next whenever its connection is lost.
    #[arg(long, required = true, value_delimiter = ',')]
    pub relay: Vec<String>,
    /// Directory for the node's verified payloads (and its key by default).
    #[arg(long)]
    pub data: PathBuf,
    /// Comma-separated globs of the slots to hold, e.g. 'layer0.*,layer1.*'
    /// (`*` any run of characters, `?` one; default: every expert).
    #[arg(long)]
    pub experts: Option<String>,
    /// Run expert computations for the relay on the held experts.
    #[arg(long)]
    pub serve_compute: bool,
    /// The node's key file (created, mode 0600, if missing; default DATA/peer.key).
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// MiB of decoded expert weights kept for `--serve-compute` (least
    /// recently used dropped beyond it, decoded again from the verified
    /// payload when asked).
    #[arg(long, default_value_t = DEFAULT_DECODED_MB)]
    pub decoded_mb: u64,
}

/// Default `--decoded-mb`.
pub const DEFAULT_DECODED_MB: u64 = 512;

/// A node's status as it runs (published on [`PeerConfig::status`]).
#[derive(Debug, Clone, Default)]
pub struct PeerStatus {
    /// Hex public key.
    pub id: String,
    /// The ws URL of the relay the node is on (or trying).
    pub relay: String,
    pub logged_in: bool,
    /// Blocks held (verified), with their slot names.
    pub held: BTreeMap<BlockHash, String>,
    /// Blocks this node should hold (matching slot heads).
    pub wanted: BTreeMap<BlockHash, String>,
    /// Payloads loaded from the data dir (verified) since start.
    pub loaded_from_disk: u64,
    /// Files in the data dir deleted as corrupt or stale.
    pub dropped_files: u64,
    /// Held blocks kept in memory (fetched, not yet on disk, or a write
    /// that failed); every other held block is read from its file.
    pub held_in_memory: u64,
    pub stats: NodeStats,
}

impl PeerStatus {
    /// Every wanted block is held.
    pub fn complete(&self) -> bool {
        !self.wanted.is_empty() && self.wanted.keys().all(|h| self.held.contains_key(h))
    }
}

/// What a finished node reports.
pub type PeerReport = PeerStatus;

/// A callback on every node event, run on the driver's task (tests use it
/// to act at an exact point of a fetch).
pub type EventHook = Arc<dyn Fn(&NodeEvent) + Send + Sync>;

/// Everything [`run`] needs.
pub struct PeerConfig {
    /// ws:// or wss:// URL of the relay's `/ws`; several relays of one
    /// cluster comma-separated (see [`relay_urls`]).
    pub relay: String,
    pub data: PathBuf,
    /// Slot globs; empty: [`ALL_EXPERTS`].
    pub experts: Vec<String>,
    pub serve_compute: bool,
    /// Key file (default DATA/peer.key).
    pub key: Option<PathBuf>,
    /// Chunk requests in flight at most (the relay's credits bound it too).
    pub max_in_flight: u32,
    /// Bytes of decoded expert weights kept for computations.
    pub decoded_bytes: u64,
    /// Receives the status after every change.
    pub status: Option<watch::Sender<PeerStatus>>,
    pub on_event: Option<EventHook>,
}

impl PeerConfig {
    pub fn new(relay: impl Into<String>, data: impl Into<PathBuf>) -> Self {
        Self {
            relay: relay.into(),
            data: data.into(),
            experts: Vec::new(),
            serve_compute: false,
            key: None,
            max_in_flight: limits::CHUNK_CREDITS,
            decoded_bytes: DEFAULT_DECODED_MB << 20,
            status: None,
            on_event: None,
        }
    }
}

/// The relays of a [`PeerConfig::relay`]: comma-separated URLs, in order.
pub fn relay_urls(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(String::from)
        .collect()
}

/// Split `--experts` into globs.
pub fn parse_globs(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|g| !g.is_empty())
        .map(String::from)
        .collect()
}

/// Shell-style glob: `*` matches any run of characters, `?` one character.
pub fn glob_match(glob: &str, name: &str) -> bool {
    let g: Vec<char> = glob.chars().collect();
    let n: Vec<char> = name.chars().collect();
    // Iterative matcher with backtracking to the last `*`.
    let (mut gi, mut ni) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        match g.get(gi) {
            Some('*') => {
                star = Some((gi, ni));
                gi += 1;
            }
            Some(&c) if c == '?' || c == n[ni] => {
                gi += 1;
                ni += 1;
            }
            _ => match star {
                Some((sg, sn)) => {
                    gi = sg + 1;
                    ni = sn + 1;
                    star = Some((sg, sn + 1));
                }
                None => return false,
            },
        }
    }
    g[gi.min(g.len())..].iter().all(|&c| c == '*')
}

/// The http(s) base of a ws(s) URL: `ws://h:p/ws` → `http://h:p`.
pub fn http_base(ws: &str) -> Result<String> {
    let (scheme, rest) = ws
        .split_once("://")
        .ok_or_else(|| anyhow!("{ws:?} is not a URL (expected ws://HOST:PORT/ws)"))?;
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "ws" | "http" => "http",
        "wss" | "https" => "https",
        other => bail!("{ws:?}: scheme {other:?} is not ws:// or wss://"),
    };
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if host.is_empty() {
        bail!("{ws:?} names no host");
    }
    Ok(format!("{scheme}://{host}"))
}

/// The ws(s) URL to connect to (an http(s) URL is accepted too).
fn ws_url(relay: &str) -> Result<String> {
    let base = http_base(relay)?;
    let path = relay
        .split_once("://")
        .map(|(_, r)| r.find('/').map_or("/ws", |i| &r[i..]))
        .unwrap_or("/ws");
    let path = if path == "/" { "/ws" } else { path };
    Ok(base.replacen("http", "ws", 1) + path)
}

/// Load the key, or create it (mode 0600) if the file does not exist.
pub fn load_or_create_key(path: &Path) -> Result<SigningKey> {
    if path.exists() {
        blocks::load_key(path)
    } else {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let key = blocks::keygen(path)?;
        tracing::info!(path = %path.display(), "created a new node key");
        Ok(key)
    }
}

// ---------------------------------------------------------------- REST sync

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout_connect(CONNECT_TIMEOUT)
        .timeout(REST_TIMEOUT)
        .build()
}

fn rest_get(agent: &ureq::Agent, url: &str, max: u64) -> Result<Vec<u8>> {
    let resp = agent.get(url).call().map_err(|e| match e {
        ureq::Error::Status(code, r) => {
            anyhow!(
                "{url}: relay answered {code}: {}",
                r.into_string().unwrap_or_default()
            )
        }
        other => anyhow!("{url}: {other}"),
    })?;
    let mut v = Vec::new();
    resp.into_reader().take(max + 1).read_to_end(&mut v)?;
    if v.len() as u64 > max {
        bail!("{url}: answer larger than {max} bytes");
    }
    Ok(v)
}

fn rest_json<T: serde::de::DeserializeOwned>(agent: &ureq::Agent, url: &str) -> Result<T> {
    // Listings of 1000 headers and chunk lists of 8192 hashes fit easily.
    const MAX_JSON: u64 = 64 * 1024 * 1024;
    let bytes = rest_get(agent, url, MAX_JSON)?;
    serde_json::from_slice(&bytes).with_context(|| format!("parsing the answer of {url}"))
}

/// Verified payloads in the data dir, with their lengths.
type Loaded = Vec<(BlockHash, u64)>;

/// A block this node should hold.
#[derive(Debug, Clone)]
struct Wanted {
    block: Block,
    name: String,
    /// Fetched when the payload is not held yet.
    chunk_list: Option<Vec<BlockHash>>,
}

/// The outcome of one header sync.
#[derive(Debug)]
struct Plan {
    config: Config,
    wanted: Vec<Wanted>,
    /// Verified payloads in the data dir (held from there, not in memory).
    loaded: Loaded,
    dropped_files: u64,
}

/// Header sync and local payload check (blocking: REST and file I/O).
fn sync(
    base: &str,
    globs: &[String],
    dir: &Path,
    held: &BTreeMap<BlockHash, String>,
) -> Result<Plan> {
    let agent = agent();
    // Both chains listed page by page, every header verified, the newest
    // model and its heads: the client core (failures are logged there).
    let chain = crate::client::RelayChain::sync_with(base, agent.clone())?;
    let model = chain.synced.model(&ModelPick::Latest)?;
    let config = model.config.clone();
    let mut wanted = Vec::new();
    for (name, hash) in &model.heads {
        if !globs.iter().any(|g| glob_match(g, name)) {
            continue;
        }
        let Some(block) = chain.synced.block(hash) else {
            continue;
        };
        wanted.push(Wanted {
            block: block.clone(),
            name: name.clone(),
            chunk_list: None,
        });
    }
    let (loaded, dropped_files) = load_dir(dir, &wanted, &config, held)?;
    for w in &mut wanted {
        if held.contains_key(&w.block.hash) || loaded.iter().any(|(h, _)| *h == w.block.hash) {
            continue;
        }
        let list: ChunkList = rest_json(&agent, &format!("{base}/blocks/{}/chunks", w.block.hash))?;
        w.chunk_list = Some(list.chunks);
    }
    Ok(Plan {
        config,
        wanted,
        loaded,
        dropped_files,
    })
}

// ------------------------------------------------------------- payload files

fn payload_path(dir: &Path, hash: &BlockHash) -> PathBuf {
    dir.join(PAYLOAD_DIR).join(format!("{}.bin", hash.to_hex()))
}

/// Check the payload files: keep (and return, with their lengths) those of
/// wanted blocks that pass every rule against their verified header, delete
/// the rest (corrupt, stale, temp). Each file is read whole once and dropped
/// before the next. Blocks already held are not read again.
fn load_dir(
    dir: &Path,
    wanted: &[Wanted],
    config: &Config,
    held: &BTreeMap<BlockHash, String>,
) -> Result<(Loaded, u64)> {
    let pdir = dir.join(PAYLOAD_DIR);
    std::fs::create_dir_all(&pdir).with_context(|| format!("creating {}", pdir.display()))?;
    let by_hash: HashMap<BlockHash, &Wanted> = wanted.iter().map(|w| (w.block.hash, w)).collect();
    let mut loaded = Vec::new();
    let mut dropped = 0u64;
    for entry in std::fs::read_dir(&pdir)? {
        let entry = entry?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let hash = name
            .strip_suffix(".bin")
            .and_then(|h| BlockHash::from_hex(h).ok());
        let keep = match hash.and_then(|h| by_hash.get(&h).map(|w| (h, *w))) {
            None => Err("not a payload of a block this node holds".to_string()),
            Some((h, _)) if held.contains_key(&h) => continue,
            Some((h, w)) => match std::fs::read(&path) {
                Err(e) => Err(format!("unreadable: {e}")),
                Ok(bytes) => check_payload_integrity(&w.block.header, &bytes)
                    .and_then(|_| validate_payload(&w.block.header, &bytes, Some(config)))
                    .map(|_| (h, bytes.len() as u64))
                    .map_err(|e| format!("fails verification: {e}")),
            },
        };
        match keep {
            Ok(loaded_one) => loaded.push(loaded_one),
            Err(why) => {
                tracing::warn!(file = %path.display(), reason = %why, "dropping payload file");
                std::fs::remove_file(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
                dropped += 1;
            }
        }
    }
    Ok((loaded, dropped))
}

/// Write a verified payload: temp file, fsync, rename, fsync the dir.
fn store_payload(dir: &Path, hash: &BlockHash, bytes: &[u8]) -> Result<()> {
    let pdir = dir.join(PAYLOAD_DIR);
    std::fs::create_dir_all(&pdir)?;
    let final_path = payload_path(dir, hash);
    let tmp = pdir.join(format!(".{}.{}.tmp", hash.to_hex(), std::process::id()));
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, &final_path)
        .with_context(|| format!("renaming to {}", final_path.display()))?;
    #[cfg(unix)]
    std::fs::File::open(&pdir)?.sync_all()?;
    Ok(())
}

/// A verified payload file in the data dir, read when a chunk of it is
/// served (opened on every read: a node holding thousands of blocks keeps
/// no file descriptors, and a file removed or cut short gives an error,
/// which the node answers `NoChunk`).
#[derive(Debug, Clone)]
pub struct PayloadFile {
    path: PathBuf,
}

impl PayloadFile {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }
}

impl PayloadReader for PayloadFile {
    fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>, String> {
        use std::io::{Seek, SeekFrom};
        let fail = |e: std::io::Error| format!("reading {}: {e}", self.path.display());
        let mut f = std::fs::File::open(&self.path).map_err(fail)?;
        f.seek(SeekFrom::Start(offset)).map_err(fail)?;
        let mut buf = Vec::with_capacity(len);
        // Fewer bytes than asked at the end of a short file: the node
        // refuses the chunk.
        f.take(len as u64).read_to_end(&mut buf).map_err(fail)?;
        Ok(buf)
    }
}

// ---------------------------------------------------------- decoded weights

/// Values by block within a byte budget, the least recently used dropped
/// first (the decoded expert weights a node computes with: several times
/// its payload's size in f32, so a node that serves many experts must not
/// keep every one it ever decoded).
struct Decoded<V> {
    values: HashMap<BlockHash, V>,
    lru: ByteLru<BlockHash>,
    cap: u64,
}

impl<V: Clone> Decoded<V> {
    fn new(cap: u64) -> Self {
        Self {
            values: HashMap::new(),
            lru: ByteLru::new(),
            cap,
        }
    }

    fn get(&mut self, h: &BlockHash) -> Option<V> {
        let v = self.values.get(h).cloned();
        if v.is_some() {
            self.lru.touch(h);
        }
        v
    }

    /// Keep `v` (`bytes` big), dropping the least recently used beyond the
    /// budget; a value larger than the whole budget is not kept.
    fn insert(&mut self, h: BlockHash, v: V, bytes: u64) {
        if bytes > self.cap {
            return;
        }
        self.remove(&h);
        for old in self.lru.evict_for(bytes, self.cap, &[]) {
            self.remove(&old);
        }
        self.lru.insert(h, bytes, false);
        self.values.insert(h, v);
    }

    fn remove(&mut self, h: &BlockHash) {
        self.lru.remove(h);
        self.values.remove(h);
    }
}

// ------------------------------------------------------------------- driver

/// Why a session ended.
enum Exit {
    Shutdown,
    Lost(String),
}

struct Driver {
    cfg: PeerConfig,
    /// Every relay as (http base, ws URL); `current` is the one in use.
    relays: Vec<(String, String)>,
    current: usize,
    base: String,
    ws_url: String,
    globs: Vec<String>,
    node: PeerNode,
    start: Instant,
    status: PeerStatus,
    config: Option<Config>,
    /// Slot of every wanted block (for compute).
    slots: HashMap<BlockHash, Slot>,
    /// Verified header of every wanted block (a payload read from disk for
    /// compute is checked against it).
    headers: HashMap<BlockHash, BlockHeader>,
    /// Chunk lists of wanted blocks not held yet (for fetches after a resync).
    pending: HashMap<BlockHash, (Block, Vec<BlockHash>)>,
    /// Decoded weights of computed experts, within `decoded_bytes`.
    weights: Arc<Mutex<Decoded<Arc<ExpertWeights>>>>,
    compute_tx: mpsc::UnboundedSender<(ComputeReq, Result<Vec<f32>, String>)>,
    compute_rx: mpsc::UnboundedReceiver<(ComputeReq, Result<Vec<f32>, String>)>,
    plan_tx: mpsc::UnboundedSender<Result<Plan>>,
    plan_rx: mpsc::UnboundedReceiver<Result<Plan>>,
    /// Payloads written to the data dir (or why not).
    stored_tx: mpsc::UnboundedSender<(BlockHash, String, Result<u64>)>,
    stored_rx: mpsc::UnboundedReceiver<(BlockHash, String, Result<u64>)>,
    syncing: bool,
}

impl Driver {
    fn now(&self) -> Millis {
        self.start.elapsed().as_millis() as Millis
    }

    fn publish(&mut self) {
        self.status.logged_in = self.node.is_logged_in();
        self.status.held_in_memory = self
            .node
            .held()
            .filter(|h| self.node.is_held_in_memory(h))
            .count() as u64;
        self.status.stats = self.node.stats().clone();
        if let Some(tx) = &self.cfg.status {
            tx.send_replace(self.status.clone());
        }
    }

    fn log_status(&self) {
        let s = self.node.stats();
        let peers: u64 = s
            .bytes_received
            .iter()
            .filter(|(k, _)| matches!(k, Source::Peer(_)))
            .map(|(_, v)| v)
            .sum();
        tracing::info!(
            "status: {}/{} blocks held, {} fetching, served {} bytes in {} chunks, \
             received {} bytes ({} from peers), {} bad chunks, {} computations",
            self.status.held.len(),
            self.status.wanted.len(),
            self.node.fetching().len(),
            s.bytes_served,
            s.chunks_served,
            s.total_received(),
            peers,
            s.total_bad(),
            s.computes_served
        );
    }

    /// Apply a header sync: hold what was loaded, drop what is no longer
    /// wanted, start fetching the rest.
    fn apply(&mut self, plan: Plan) {
        let now = self.now();
        self.status.loaded_from_disk += plan.loaded.len() as u64;
        self.status.dropped_files += plan.dropped_files;
        let wanted: BTreeMap<BlockHash, String> = plan
            .wanted
            .iter()
            .map(|w| (w.block.hash, w.name.clone()))
            .collect();
        // Blocks no longer wanted (a new version replaced them): stop
        // serving, forget, delete.
        let stale: Vec<BlockHash> = self
            .status
            .held
            .keys()
            .filter(|h| !wanted.contains_key(h))
            .copied()
            .collect();
        for h in stale {
            self.node.unhold(&h);
            self.status.held.remove(&h);
            if let Ok(mut w) = self.weights.lock() {
                w.remove(&h);
            }
            let _ = std::fs::remove_file(payload_path(&self.cfg.data, &h));
            tracing::info!(block = %h, "no longer a wanted head: dropped");
        }
        for (h, _, _) in self.node.fetching() {
            if !wanted.contains_key(&h) {
                self.node.cancel_fetch(&h);
            }
        }
        let names: HashMap<BlockHash, &Wanted> =
            plan.wanted.iter().map(|w| (w.block.hash, w)).collect();
        for (hash, len) in plan.loaded {
            let Some(w) = names.get(&hash) else { continue };
            let file = Arc::new(PayloadFile::new(payload_path(&self.cfg.data, &hash)));
            match self
                .node
                .hold_stored(hash, len, w.block.header.chunk_size, file)
            {
                Ok(()) => {
                    self.status.held.insert(hash, w.name.clone());
                    tracing::info!(slot = %w.name, block = %hash, "loaded a verified payload from disk");
                }
                Err(e) => tracing::warn!(error = %e, "cannot hold a loaded payload"),
            }
        }
        self.slots = plan
            .wanted
            .iter()
            .filter_map(|w| Slot::parse(&w.name).ok().map(|s| (w.block.hash, s)))
            .collect();
        self.headers = plan
            .wanted
            .iter()
            .map(|w| (w.block.hash, w.block.header.clone()))
            .collect();
        self.pending.clear();
        for w in plan.wanted {
            if self.node.is_held(&w.block.hash) {
                continue;
            }
            if let Some(list) = w.chunk_list {
                self.pending.insert(w.block.hash, (w.block, list));
            }
        }
        self.config = Some(plan.config);
        if wanted.is_empty() {
            tracing::warn!(globs = ?self.globs, "no slot head matches the --experts globs: nothing to hold");
        }
        self.status.wanted = wanted;
        self.start_fetches(now);
        self.publish();
    }

    fn start_fetches(&mut self, now: Millis) {
        let Some(config) = self.config.clone() else {
            return;
        };
        for (hash, (block, list)) in &self.pending {
            if self.node.is_held(hash) || self.node.is_fetching(hash) {
                continue;
            }
            if let Err(e) = self
                .node
                .fetch(block, list.clone(), Some(config.clone()), now)
            {
                tracing::warn!(block = %hash, error = %e, "cannot fetch");
            }
        }
    }

    /// A header sync in the background, after `delay`; its plan arrives
    /// on `plan_rx`.
    fn spawn_sync(&mut self, delay: Duration) {
        if self.syncing {
            return;
        }
        self.syncing = true;
        let (base, globs, dir, held, tx) = (
            self.base.clone(),
            self.globs.clone(),
            self.cfg.data.clone(),
            self.status.held.clone(),
            self.plan_tx.clone(),
        );
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let plan = tokio::task::spawn_blocking(move || sync(&base, &globs, &dir, &held))
                .await
                .map_err(|e| anyhow!("sync task: {e}"))
                .and_then(|r| r);
            let _ = tx.send(plan);
        });
    }

    fn on_event(&mut self, ev: NodeEvent) {
        if let Some(hook) = &self.cfg.on_event {
            hook(&ev);
        }
        match ev {
            NodeEvent::LoggedIn { peer, .. } => {
                tracing::info!(peer = %hex::encode(peer), held = self.status.held.len(), "logged in");
            }
            NodeEvent::RelayError { code, message } => {
                tracing::warn!(%code, %message, "relay error");
            }
            NodeEvent::BadChunk { hash, index, from } => {
                tracing::warn!(block = %hash, index, ?from, "bad chunk refused; asking again");
            }
            NodeEvent::BlockComplete { hash, payload } => {
                let name = self.status.wanted.get(&hash).cloned().unwrap_or_default();
                tracing::info!(slot = %name, block = %hash, bytes = payload.len(), "payload verified and held");
                self.pending.remove(&hash);
                let dir = self.cfg.data.clone();
                let tx = self.stored_tx.clone();
                tokio::task::spawn_blocking(move || {
                    let r = store_payload(&dir, &hash, &payload).map(|()| payload.len() as u64);
                    let _ = tx.send((hash, name, r));
                });
            }
            NodeEvent::FetchFailed { hash, reason } => {
                tracing::warn!(block = %hash, %reason, retry_in = ?RESYNC_AFTER_FAILURE, "fetch failed; resyncing");
                self.spawn_sync(RESYNC_AFTER_FAILURE);
            }
            NodeEvent::Compute {
                req,
                block,
                rows,
                input,
            } => self.compute(req, block, rows, input),
            NodeEvent::BlockAdded { hash, name, .. } => {
                tracing::info!(block = %hash, %name, "relay accepted a new block; resyncing");
                self.spawn_sync(Duration::ZERO);
            }
            NodeEvent::Progress { .. } => {}
            other => tracing::debug!(event = ?other, "node event"),
        }
    }

    fn compute(&mut self, req: ComputeReq, block: BlockHash, rows: u32, input: Vec<f32>) {
        let tx = self.compute_tx.clone();
        let (Some(cfg), Some(Slot::Expert { layer, expert })) =
            (self.config.clone(), self.slots.get(&block).copied())
        else {
            let _ = tx.send((
                req,
                Err(format!(
                    "block {} is not an expert held here",
                    block.short()
                )),
            ));
            return;
        };
        let (Some(payload), Some(header)) = (
            self.node.held_payload(&block),
            self.headers.get(&block).cloned(),
        ) else {
            let _ = tx.send((
                req,
                Err(format!("block {} is not held here", block.short())),
            ));
            return;
        };
        let cache = self.weights.clone();
        tokio::task::spawn_blocking(move || {
            let result = (|| {
                let hidden = cfg.hidden_size;
                let rows = rows as usize;
                if input.len() != rows * hidden {
                    return Err(format!(
                        "{} input floats are not {rows} rows of hidden size {hidden}",
                        input.len()
                    ));
                }
                let cached = cache.lock().ok().and_then(|mut c| c.get(&block));
                let w = match cached {
                    Some(w) => w,
                    None => {
                        // Verified before it was stored; checked again, as
                        // the file may have changed since.
                        let bytes = payload.read_all()?;
                        check_payload_integrity(&header, &bytes)
                            .map_err(|e| format!("the stored payload of {}: {e}", block.short()))?;
                        let w = Arc::new(
                            ExpertWeights::from_safetensors(&cfg, layer, expert, &bytes)
                                .map_err(|e| e.to_string())?,
                        );
                        drop(bytes);
                        if let Ok(mut c) = cache.lock() {
                            c.insert(block, w.clone(), w.stored_bytes() as u64);
                        }
                        w
                    }
                };
                Ok(expert_forward(&w, &input, rows, COMPUTE_THREADS))
            })();
            let _ = tx.send((req, result));
        });
    }

    /// Deliver what the node wants sent.
    async fn flush<S>(&mut self, sink: &mut S) -> Result<(), String>
    where
        S: futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
    {
        while let Some(m) = self.node.poll_transmit() {
            let bytes = m.encode();
            match tokio::time::timeout(
                limits::WRITE_TIMEOUT,
                sink.send(Message::Binary(bytes.into())),
            )
            .await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(format!("write failed: {e}")),
                Err(_) => return Err("write timed out".into()),
            }
        }
        Ok(())
    }

    fn drain_events(&mut self) -> Option<String> {
        let mut fatal = None;
        while let Some(ev) = self.node.poll_event() {
            if let NodeEvent::RelayError { code, message } = &ev {
                // Refused or told to come back later: this connection ends
                // either way (the next one may go to another relay).
                if relay_error_action(code) != ErrorAction::Continue {
                    fatal = Some(format!("{code}: {message}"));
                }
            }
            self.on_event(ev);
        }
        fatal
    }

    /// One connection, until it is lost or shutdown comes.
    async fn session(&mut self, shutdown: &mut (impl Future<Output = ()> + Unpin)) -> Exit {
        let mut req = match self.ws_url.as_str().into_client_request() {
            Ok(r) => r,
            Err(e) => return Exit::Lost(format!("bad relay URL: {e}")),
        };
        if let Ok(v) = peer::SUBPROTOCOL.parse() {
            req.headers_mut().insert("Sec-WebSocket-Protocol", v);
        }
        let wscfg = WebSocketConfig::default()
            .max_message_size(Some(limits::MAX_MESSAGE))
            .max_frame_size(Some(limits::MAX_MESSAGE));
        let connect = tokio_tungstenite::connect_async_with_config(req, Some(wscfg), true);
        let ws = tokio::select! {
            _ = &mut *shutdown => return Exit::Shutdown,
            r = tokio::time::timeout(CONNECT_TIMEOUT, connect) => match r {
                Ok(Ok((ws, _))) => ws,
                Ok(Err(e)) => return Exit::Lost(format!("connect: {e}")),
                Err(_) => return Exit::Lost("connect timed out".into()),
            },
        };
        let (mut sink, mut stream) = ws.split();
        self.node.connected(self.now());
        let mut tick = tokio::time::interval(STATUS_EVERY);
        tick.tick().await;
        loop {
            if let Err(e) = self.flush(&mut sink).await {
                return Exit::Lost(e);
            }
            if let Some(fatal) = self.drain_events() {
                let _ = sink.close().await;
                return Exit::Lost(fatal);
            }
            // Events may have queued messages (Have after a completed block).
            if let Err(e) = self.flush(&mut sink).await {
                return Exit::Lost(e);
            }
            self.publish();
            let deadline = self.node.poll_timeout().map(|t| {
                let wait = Duration::from_millis(t.saturating_sub(self.now()));
                tokio::time::Instant::now() + wait
            });
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = &mut *shutdown => {
                    let _ = sink.close().await;
                    return Exit::Shutdown;
                }
                frame = stream.next() => match frame {
                    None => return Exit::Lost("the relay closed the connection".into()),
                    Some(Err(e)) => return Exit::Lost(format!("read: {e}")),
                    Some(Ok(Message::Binary(b))) => match decode_from_relay(&b) {
                        Ok(m) => { let now = self.now(); self.node.handle(m, now) }
                        Err(e) => tracing::warn!(error = %e, "undecodable frame from the relay (ignored)"),
                    },
                    Some(Ok(Message::Close(f))) => {
                        return Exit::Lost(format!("closed by the relay: {f:?}"));
                    }
                    Some(Ok(_)) => {}
                },
                Some((req, res)) = self.compute_rx.recv() => {
                    self.node.compute_done(req, res);
                }
                Some((hash, name, r)) = self.stored_rx.recv() => {
                    match r {
                        Ok(len) => {
                            // On disk now: served from its file, not memory.
                            let file = Arc::new(PayloadFile::new(payload_path(&self.cfg.data, &hash)));
                            let cs = self.headers.get(&hash).map(|h| h.chunk_size);
                            if let (true, Some(cs)) = (self.node.is_held(&hash), cs) {
                                if let Err(e) = self.node.hold_stored(hash, len, cs, file) {
                                    tracing::warn!(block = %hash, error = %e, "kept in memory");
                                }
                            }
                            tracing::info!(slot = %name, block = %hash, "payload stored");
                        }
                        Err(e) => tracing::error!(block = %hash, error = %e, "storing the payload failed (held in memory)"),
                    }
                    // Held once it is also on disk (or could not be put there).
                    if self.node.is_held(&hash) {
                        self.status.held.insert(hash, name);
                    }
                }
                Some(plan) = self.plan_rx.recv() => {
                    self.syncing = false;
                    match plan {
                        Ok(p) => self.apply(p),
                        Err(e) => tracing::warn!(error = %e, "resync failed"),
                    }
                }
                _ = sleep => { let now = self.now(); self.node.handle_timeout(now) }
                _ = tick.tick() => self.log_status(),
            }
        }
    }
}

/// Run a node until `shutdown` completes. Errors only for what retrying
/// cannot fix (bad URL, unusable data dir or key); a relay that is away is
/// retried with backoff.
pub async fn run(cfg: PeerConfig, shutdown: impl Future<Output = ()>) -> Result<PeerReport> {
    let relays = relay_urls(&cfg.relay)
        .iter()
        .map(|r| Ok((http_base(r)?, ws_url(r)?)))
        .collect::<Result<Vec<_>>>()?;
    let Some((base, ws_url)) = relays.first().cloned() else {
        bail!("no relay URL given");
    };
    std::fs::create_dir_all(&cfg.data)
        .with_context(|| format!("creating {}", cfg.data.display()))?;
    let key_path = cfg.key.clone().unwrap_or_else(|| cfg.data.join(KEY_FILE));
    let key = load_or_create_key(&key_path)?;
    let globs = if cfg.experts.is_empty() {
        vec![ALL_EXPERTS.to_string()]
    } else {
        cfg.experts.clone()
    };
    let node = PeerNode::new(
        key,
        NodeConfig {
            serve_compute: cfg.serve_compute,
            max_in_flight: cfg.max_in_flight.max(1),
            ..NodeConfig::default()
        },
    );
    let decoded_bytes = cfg.decoded_bytes;
    let (compute_tx, compute_rx) = mpsc::unbounded_channel();
    let (plan_tx, plan_rx) = mpsc::unbounded_channel();
    let (stored_tx, stored_rx) = mpsc::unbounded_channel();
    let mut d = Driver {
        status: PeerStatus {
            id: hex::encode(node.id()),
            relay: ws_url.clone(),
            ..PeerStatus::default()
        },
        cfg,
        relays,
        current: 0,
        base,
        ws_url,
        globs,
        node,
        start: Instant::now(),
        config: None,
        slots: HashMap::new(),
        headers: HashMap::new(),
        pending: HashMap::new(),
        weights: Arc::new(Mutex::new(Decoded::new(decoded_bytes))),
        compute_tx,
        compute_rx,
        plan_tx,
        plan_rx,
        stored_tx,
        stored_rx,
        syncing: false,
    };
    tracing::info!(id = %d.status.id, relay = %d.ws_url, globs = ?d.globs, "starting node");
    d.publish();
    let mut shutdown = std::pin::pin!(shutdown);
    let mut reconnect = Reconnect::new(d.relays.len(), NATIVE_BACKOFF_MS);
    loop {
        // Headers first (the relay may have changed while we were away).
        let (base, globs, dir, held) = (
            d.base.clone(),
            d.globs.clone(),
            d.cfg.data.clone(),
            d.status.held.clone(),
        );
        let synced = tokio::select! {
            _ = &mut shutdown => break,
            r = tokio::task::spawn_blocking(move || sync(&base, &globs, &dir, &held)) => {
                r.map_err(|e| anyhow!("sync task: {e}")).and_then(|r| r)
            }
        };
        let exit = match synced {
            Ok(plan) => {
                d.apply(plan);
                let logins = d.node.stats().logins;
                let exit = d.session(&mut shutdown).await;
                d.node.disconnected(d.now());
                if d.node.stats().logins > logins {
                    reconnect.on_login();
                }
                exit
            }
            Err(e) => Exit::Lost(format!("header sync: {e:#}")),
        };
        d.publish();
        match exit {
            Exit::Shutdown => break,
            Exit::Lost(why) => {
                // Relays of one cluster: the next one serves the same chain
                // and takes this node's Have.
                let (next, delay_ms) = reconnect.on_lost();
                if next != d.current {
                    d.current = next;
                    (d.base, d.ws_url) = d.relays[d.current].clone();
                    d.status.relay = d.ws_url.clone();
                    d.publish();
                }
                let backoff = Duration::from_millis(delay_ms);
                tracing::warn!(reason = %why, retry_in = ?backoff, next = %d.ws_url, "relay connection lost; reconnecting");
                tokio::select! {
                    _ = &mut shutdown => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
            }
        }
    }
    d.node.disconnected(d.now());
    d.publish();
    d.log_status();
    Ok(d.status)
}

/// `aiblock peer`: run until Ctrl-C.
pub fn cli(a: &PeerArgs) -> Result<()> {
    let mut cfg = PeerConfig::new(a.relay.join(","), a.data.clone());
    cfg.experts = a.experts.as_deref().map(parse_globs).unwrap_or_default();
    cfg.serve_compute = a.serve_compute;
    cfg.key = a.key.clone();
    cfg.decoded_bytes = a.decoded_mb.saturating_mul(1 << 20);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = rt.block_on(run(cfg, async {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("Ctrl-C: shutting down");
    }))?;
    println!(
        "held {} blocks; served {} bytes; received {} bytes",
        report.held.len(),
        report.stats.bytes_served,
        report.stats.total_received()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_slot_names() {
        assert!(glob_match("layer0.*", "layer0.expert3"));
        assert!(glob_match("layer0.*", "layer0.router"));
        assert!(!glob_match("layer0.*", "layer1.expert3"));
        assert!(!glob_match("layer0.*", "layer10.expert3"));
        assert!(glob_match("layer*.expert*", "layer12.expert7"));
        assert!(!glob_match("layer*.expert*", "layer1.router"));
        assert!(glob_match("*", "shared"));
        assert!(glob_match("layer?.expert1", "layer3.expert1"));
        assert!(!glob_match("layer?.expert1", "layer13.expert1"));
        assert!(glob_match("*.expert3", "layer0.expert3"));
        assert!(!glob_match("*.expert3", "layer0.expert31"));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(!glob_match("a*b*c", "aXXbYY"));
        assert!(!glob_match("", "x"));
        assert!(glob_match("", ""));
        assert_eq!(
            parse_globs(" layer0.*, layer1.* ,,"),
            vec!["layer0.*".to_string(), "layer1.*".to_string()]
        );
    }

    #[test]
    fn http_base_and_ws_url_come_from_the_relay_url() {
        assert_eq!(
            http_base("ws://127.0.0.1:8080/ws").unwrap(),
            "http://127.0.0.1:8080"
        );
        assert_eq!(
            http_base("wss://relay.example/ws").unwrap(),
            "https://relay.example"
        );
        assert_eq!(ws_url("ws://h:1/ws").unwrap(), "ws://h:1/ws");
        assert_eq!(ws_url("http://h:1").unwrap(), "ws://h:1/ws");
        assert_eq!(ws_url("https://h:1/").unwrap(), "wss://h:1/ws");
        assert!(http_base("ftp://x/ws").is_err());
        assert!(http_base("nonsense").is_err());
        assert!(http_base("ws:///ws").is_err());
        assert_eq!(
            relay_urls(" ws://a:1/ws, ,ws://b:2/ws,"),
            vec!["ws://a:1/ws".to_string(), "ws://b:2/ws".to_string()]
        );
    }

    #[test]
    fn the_key_is_created_once_with_mode_0600() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("k/peer.key");
        let a = load_or_create_key(&p).unwrap();
        let b = load_or_create_key(&p).unwrap();
        assert_eq!(a.to_bytes(), b.to_bytes());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&p).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn decoded_weights_stay_within_their_budget() {
        let h = |i: u8| BlockHash([i; 32]);
        let mut d: Decoded<u8> = Decoded::new(100);
        d.insert(h(1), 1, 40);
        d.insert(h(2), 2, 40);
        assert_eq!(d.get(&h(1)), Some(1)); // 1 is now the most recent
        d.insert(h(3), 3, 40);
        // 2 was the least recently used: dropped to make room.
        assert_eq!(
            (d.get(&h(1)), d.get(&h(2)), d.get(&h(3))),
            (Some(1), None, Some(3))
        );
        assert!(d.lru.total() <= 100);
        // Larger than the whole budget: not kept, nothing dropped for it.
        d.insert(h(4), 4, 101);
        assert_eq!(d.get(&h(4)), None);
        assert_eq!(d.values.len(), 2);
        // Replacing a value does not count it twice.
        d.insert(h(3), 5, 40);
        assert_eq!((d.get(&h(3)), d.lru.total()), (Some(5), 80));
        d.remove(&h(1));
        assert_eq!((d.get(&h(1)), d.lru.total()), (None, 40));
    }

    #[test]
    fn stored_payloads_are_written_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let h = BlockHash([5; 32]);
        store_payload(tmp.path(), &h, b"abc").unwrap();
        assert_eq!(std::fs::read(payload_path(tmp.path(), &h)).unwrap(), b"abc");
        let names: Vec<_> = std::fs::read_dir(tmp.path().join(PAYLOAD_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "no temp file left: {names:?}");
    }

    #[test]
    fn payload_files_are_read_at_an_offset_and_a_short_or_missing_file_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let h = BlockHash([6; 32]);
        let bytes: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        store_payload(tmp.path(), &h, &bytes).unwrap();
        let file = PayloadFile::new(payload_path(tmp.path(), &h));
        assert_eq!(file.read_at(4096, 4096).unwrap(), &bytes[4096..8192]);
        // Past the end: what there is (the node refuses the short chunk).
        assert_eq!(file.read_at(8192, 4096).unwrap(), &bytes[8192..]);
        let held = web_node::node::HeldPayload::Stored {
            len: 12_000,
            reader: Arc::new(file.clone()),
        };
        assert!(held.read(8192, 3808).unwrap_err().contains("short"));
        assert_eq!(&held.read(0, 100).unwrap()[..], &bytes[..100]);
        std::fs::remove_file(payload_path(tmp.path(), &h)).unwrap();
        let e = file.read_at(0, 10).unwrap_err();
        assert!(e.contains(&h.to_hex()), "{e}");
    }
}
