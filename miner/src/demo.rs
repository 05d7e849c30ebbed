//! `aiblock demo`: the seed's distributed demo, for real, in one command.
//!
//! 1. a relay: the `relay` binary (next to this executable, else on PATH)
//!    as a child process, `relay serve` on 127.0.0.1:0 with its data in a
//!    temporary directory and the genesis of `--model`;
//! 2. three native nodes ([`crate::peer::run`]), all serving compute:
//!    node1 holds layers 0–1 (the first half of the layers), node2 the
//!    others, node3 the first half of the experts of every layer. node1 and
//!    node2 fetch from the relay's store; node3 starts once they hold their
//!    blocks, so its blocks come from them, peer to peer through the relay;
//! 3. `POST /chat/distributed`: the relay runs the model and sends each
//!    routed expert to a node that holds it; then `POST /chat` (local) for
//!    comparison;
//! 4. prints which node computed which expert, the bytes each node served
//!    (the relay's own counters) and whether the answer equals local inference.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use tokio::sync::{oneshot, watch};
use web_node::net::api::BlockInfo;

use crate::peer::{PeerConfig, PeerReport, PeerStatus};

/// How long the demo waits for the nodes to hold their blocks, and for
/// each chat answer, before it gives up with an error.
const WAIT: Duration = Duration::from_secs(300);
/// Poll interval of those waits.
const POLL: Duration = Duration::from_millis(50);
/// Largest JSON answer read from the relay.
const MAX_ANSWER: u64 = 16 * 1024 * 1024;

/// Flags of `aiblock demo`.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Hugging Face-style model directory for the relay's genesis.
    #[arg(long, default_value = "models/default")]
    pub model: PathBuf,
    /// The prompt of the distributed chat.
    #[arg(long, default_value = "Q: 38+45=? A:")]
    pub prompt: String,
    /// Tokens to generate.
    #[arg(long, default_value_t = 12)]
    pub max_tokens: usize,
    /// Experts per token (top-k); default: the model's.
    #[arg(long)]
    pub top_k_experts: Option<usize>,
    /// Keep the relay's and the nodes' data here instead of a temporary directory.
    #[arg(long)]
    pub keep: Option<PathBuf>,
}

/// How long the relay may take to open its data and listen, and to stop.
const RELAY_START: Duration = Duration::from_secs(120);
const RELAY_STOP: Duration = Duration::from_secs(10);

/// The `relay` binary: next to this executable (as `cargo build` and an
/// install put them), else on PATH.
fn relay_binary() -> Result<PathBuf> {
    let name = format!("relay{}", std::env::consts::EXE_SUFFIX);
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join(&name)));
    if let Some(p) = beside.as_ref().filter(|p| p.is_file()) {
        return Ok(p.clone());
    }
    let on_path: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join(&name)).collect())
        .unwrap_or_default();
    if let Some(p) = on_path.into_iter().find(|p| p.is_file()) {
        return Ok(p);
    }
    bail!(
        "the relay binary was not found: not next to aiblock ({}) and not on PATH; \
         build it with `cargo build -p relay` (or `cargo build --workspace --bins`)",
        beside
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "the directory of this executable is unknown".into())
    )
}

/// `relay serve` as a child process; stopped (SIGTERM, as Ctrl-C would)
/// by [`RelayProcess::stop`] or on drop.
struct RelayProcess {
    child: Child,
    /// What it printed: `http://127.0.0.1:PORT`.
    url: String,
}

impl RelayProcess {
    fn start(data: &Path, model: &Path) -> Result<Self> {
        let bin = relay_binary()?;
        let mut cmd = Command::new(&bin);
        cmd.args(["serve", "--addr", "127.0.0.1:0", "--data"])
            .arg(data)
            .arg("--model")
            .arg(model)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "warn");
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let out = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("no stdout from the relay"))?;
        // Its first line is `relay listening on URL`; read on a thread so
        // that a relay that never listens is an error, not a hang. The rest
        // of its stdout is read (and dropped) so that it never blocks.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(out).lines();
            let _ = tx.send(lines.next());
            for _ in lines {}
        });
        let mut relay = Self {
            child,
            url: String::new(),
        };
        let line = match rx.recv_timeout(RELAY_START) {
            Ok(Some(Ok(l))) => l,
            Ok(_) => {
                let status = relay.child.wait()?;
                bail!(
                    "the relay ({}) exited before listening: {status}",
                    bin.display()
                );
            }
            Err(_) => bail!(
                "the relay ({}) did not listen within {} s",
                bin.display(),
                RELAY_START.as_secs()
            ),
        };
        relay.url = line
            .trim()
            .strip_prefix("relay listening on ")
            .ok_or_else(|| anyhow!("unexpected first line from the relay: {line:?}"))?
            .to_string();
        Ok(relay)
    }

    /// SIGTERM (a graceful stop: counters flushed), then SIGKILL if it has
    /// not exited within [`RELAY_STOP`].
    fn stop(mut self) {
        self.terminate();
    }

    fn terminate(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let t0 = Instant::now();
        while t0.elapsed() < RELAY_STOP {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(POLL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// One node of the demo.
struct DemoNode {
    name: &'static str,
    role: String,
    status: watch::Receiver<PeerStatus>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<PeerReport>>,
}

impl DemoNode {
    fn start(
        rt: &tokio::runtime::Runtime,
        name: &'static str,
        role: String,
        ws: &str,
        data: PathBuf,
        globs: Vec<String>,
    ) -> Self {
        let (tx, status) = watch::channel(PeerStatus::default());
        let (stop, stop_rx) = oneshot::channel::<()>();
        let mut cfg = PeerConfig::new(ws, data);
        cfg.experts = globs;
        cfg.serve_compute = true;
        cfg.status = Some(tx);
        let task = rt.spawn(crate::peer::run(cfg, async move {
            let _ = stop_rx.await;
        }));
        Self {
            name,
            role,
            status,
            stop: Some(stop),
            task,
        }
    }

    fn status(&self) -> PeerStatus {
        self.status.borrow().clone()
    }
}

fn wait_all(nodes: &[&DemoNode]) -> Result<()> {
    let t0 = Instant::now();
    loop {
        let pending: Vec<&str> = nodes
            .iter()
            .filter(|n| {
                let s = n.status();
                !(s.logged_in && s.complete())
            })
            .map(|n| n.name)
            .collect();
        if pending.is_empty() {
            return Ok(());
        }
        if nodes.iter().any(|n| n.task.is_finished()) {
            bail!("a node stopped before holding its blocks");
        }
        if t0.elapsed() > WAIT {
            bail!("{} did not get their blocks in time", pending.join(", "));
        }
        std::thread::sleep(POLL);
    }
}

fn get_json(url: &str) -> Result<serde_json::Value> {
    let resp = ureq::get(url)
        .timeout(WAIT)
        .call()
        .map_err(|e| anyhow!("GET {url}: {e}"))?;
    let mut v = Vec::new();
    resp.into_reader().take(MAX_ANSWER).read_to_end(&mut v)?;
    serde_json::from_slice(&v).with_context(|| format!("parsing the answer of {url}"))
}

fn post_json(url: &str, body: &serde_json::Value) -> Result<serde_json::Value> {
    let resp = match ureq::post(url)
        .timeout(WAIT)
        .set("content-type", "application/json")
        .send_bytes(&serde_json::to_vec(body)?)
    {
        Ok(r) => r,
        Err(ureq::Error::Status(code, r)) => {
            bail!(
                "POST {url}: relay answered {code}: {}",
                r.into_string().unwrap_or_default()
            )
        }
        Err(e) => bail!("POST {url}: {e}"),
    };
    let mut v = Vec::new();
    resp.into_reader().take(MAX_ANSWER).read_to_end(&mut v)?;
    serde_json::from_slice(&v).with_context(|| format!("parsing the answer of {url}"))
}

fn short(hex: &str) -> &str {
    hex.get(..8).unwrap_or(hex)
}

fn mb(bytes: u64) -> String {
    format!("{:.2} MB", bytes as f64 / 1e6)
}

/// Layers and experts of the model the relay serves (from its chain-B heads).
fn model_shape(http: &str) -> Result<(usize, usize)> {
    let b: Vec<BlockInfo> = serde_json::from_value(get_json(&format!("{http}/chain/B/blocks"))?)?;
    let (mut layers, mut experts) = (0, 0);
    for i in b.iter().filter(|i| i.is_head) {
        if let Ok(web_node::model::Slot::Expert { layer, expert }) =
            web_node::model::Slot::parse(&i.name)
        {
            layers = layers.max(layer + 1);
            experts = experts.max(expert + 1);
        }
    }
    if layers == 0 {
        bail!("the relay's chain has no expert blocks");
    }
    Ok((layers, experts))
}

fn layer_globs(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|l| format!("layer{l}.*")).collect()
}

/// Run the demo.
pub fn cli(a: &DemoArgs) -> Result<()> {
    if !a.model.join("config.json").is_file() {
        bail!(
            "{} is not a model directory (no config.json); pass --model DIR",
            a.model.display()
        );
    }
    let tmp;
    let root = match &a.keep {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;

    // 1. The relay: the `relay` binary, as a user would run it.
    let relay = RelayProcess::start(&root.join("relay"), &a.model)?;
    let http = relay.url.clone();
    let ws = format!("ws://{}/ws", http.trim_start_matches("http://"));
    println!("relay   {http}  (data in {})", root.join("relay").display());

    // 2. Three nodes.
    let (layers, experts) = model_shape(&http)?;
    let half = layers.div_ceil(2);
    let second = if half < layers {
        half..layers
    } else {
        0..layers
    };
    let node3_experts: Vec<String> = (0..experts.div_ceil(2))
        .map(|e| format!("layer*.expert{e}"))
        .collect();
    let n1 = DemoNode::start(
        &rt,
        "node1",
        format!("layers 0-{}", half - 1),
        &ws,
        root.join("node1"),
        layer_globs(0..half),
    );
    let n2 = DemoNode::start(
        &rt,
        "node2",
        format!("layers {}-{}", second.start, second.end - 1),
        &ws,
        root.join("node2"),
        layer_globs(second),
    );
    let t0 = Instant::now();
    wait_all(&[&n1, &n2])?;
    let t12 = t0.elapsed().as_secs_f64();
    let n3 = DemoNode::start(
        &rt,
        "node3",
        format!("experts 0-{} of every layer", experts.div_ceil(2) - 1),
        &ws,
        root.join("node3"),
        node3_experts,
    );
    let t0 = Instant::now();
    wait_all(&[&n3])?;
    let t3 = t0.elapsed().as_secs_f64();
    let nodes = [n1, n2, n3];
    let names: BTreeMap<String, &'static str> =
        nodes.iter().map(|n| (n.status().id, n.name)).collect();
    for n in &nodes {
        let s = n.status();
        println!(
            "{}   {}  {:<28} holds {:>2} blocks (fetched {} from the relay's store, {} from peers)",
            n.name,
            short(&s.id),
            n.role,
            s.held.len(),
            mb(s.stats
                .bytes_received
                .get(&web_node::node::Source::Relay)
                .copied()
                .unwrap_or(0)),
            mb(s.stats.total_received()
                - s.stats
                    .bytes_received
                    .get(&web_node::node::Source::Relay)
                    .copied()
                    .unwrap_or(0)),
        );
    }

    let rate = |n: &DemoNode, secs: f64| n.status().stats.total_received() as f64 / secs / 1e6;
    println!(
        "node1+node2 fetched in {t12:.2} s ({:.1} MB/s together, from the store); \
         node3 in {t3:.2} s ({:.1} MB/s, from node1 and node2)",
        rate(&nodes[0], t12) + rate(&nodes[1], t12),
        rate(&nodes[2], t3)
    );

    // 3. The distributed chat, and the local one to compare.
    let mut body = serde_json::json!({
        "prompt": a.prompt,
        "max_tokens": a.max_tokens,
    });
    if let Some(k) = a.top_k_experts {
        body["top_k_experts"] = k.into();
    }
    let dist = post_json(&format!("{http}/chat/distributed"), &body)?;
    let mut local_body = body.clone();
    local_body["use_moe"] = true.into();
    let local = post_json(&format!("{http}/chat"), &local_body)?;
    println!();
    println!(
        "POST /chat/distributed {:?} -> {:?}",
        a.prompt,
        dist["response"].as_str().unwrap_or_default()
    );
    let mut per_node: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    if let Some(list) = dist["computed_by"].as_array() {
        println!("  expert            computed by          calls  rows");
        for c in list {
            let by = c["by"].as_str().unwrap_or_default().to_string();
            let who = names
                .get(&by)
                .map(|n| format!("{n} ({})", short(&by)))
                .unwrap_or_else(|| by.clone());
            let calls = c["calls"].as_u64().unwrap_or(0);
            let rows = c["rows"].as_u64().unwrap_or(0);
            let e = per_node.entry(who.clone()).or_default();
            e.0 += calls;
            e.1 += rows;
            let slot = format!("layer{}.expert{}", c["layer"], c["expert"]);
            println!("  {slot:<16}  {who:<20} {calls:>5} {rows:>5}");
        }
    }
    if let Some(f) = dist["failovers"].as_array().filter(|f| !f.is_empty()) {
        println!("  failovers: {}", serde_json::Value::Array(f.clone()));
    }
    println!("  computations per node:");
    for (who, (calls, rows)) in &per_node {
        println!("    {who:<20} {calls:>5} calls, {rows:>5} rows");
    }
    let same = dist["tokens"] == local["tokens"];
    println!(
        "POST /chat (the relay alone)            -> {:?}; same tokens: {}",
        local["response"].as_str().unwrap_or_default(),
        if same { "yes" } else { "NO" }
    );

    // 4. Bytes served, as the relay counted them (checked and forwarded).
    let stats = get_json(&format!("{http}/p2p/stats"))?;
    println!();
    println!("bytes served (the relay's counters):");
    for n in &nodes {
        let id = n.status().id;
        let p = &stats["per_peer"][&id];
        println!(
            "  {}  {:>10} in {:>3} chunks, {:>4} computations answered",
            n.name,
            mb(p["bytes_served"].as_u64().unwrap_or(0)),
            p["chunks_served"].as_u64().unwrap_or(0),
            p["compute_answered"].as_u64().unwrap_or(0),
        );
    }
    println!(
        "  relay store {:>10} in {:>3} chunks",
        mb(stats["bytes_from_store"].as_u64().unwrap_or(0)),
        stats["chunks_from_store"].as_u64().unwrap_or(0)
    );

    // Shut down: nodes first, then the relay.
    for mut n in nodes {
        if let Some(s) = n.stop.take() {
            let _ = s.send(());
        }
        let _ = rt.block_on(n.task);
    }
    relay.stop();
    rt.shutdown_timeout(Duration::from_secs(2));
    if !same {
        bail!("the distributed answer differs from local inference");
    }
    Ok(())
}
