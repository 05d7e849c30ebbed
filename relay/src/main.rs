//! `relay serve --addr 127.0.0.1:8080 --data ./data --web dist --model models/default`
//! `relay check --data ./data`
//! `relay backup --data ./data --out chain.aiblock`, `relay restore --from chain.aiblock --data ./data2`
//!
//! Layer: top (the binary). May import: the library (`relay::*`), every
//! module of it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use relay::server::limits::{self, Rate};
use relay::server::ServeConfig;
use relay::store::RelayStore;

#[derive(Parser)]
#[command(
    name = "relay",
    about = "AI-Block relay: stores the chain, serves the REST API and the web app"
)]
struct Cli {
    /// Log lines as human-readable text (default) or one JSON object per line.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the chain, the REST API and the web app.
    Serve(Box<Serve>),
    /// Write every accepted block (payloads included) to one portable archive,
    /// while the relay serves (--relay URL or --database) or is stopped (--data).
    Backup(relay::backup::BackupArgs),
    /// Import an archive of `relay backup` into an empty store, validating
    /// every block first: a damaged archive imports nothing. Also how to move
    /// from the embedded store to PostgreSQL.
    Restore(relay::backup::RestoreArgs),
    /// Re-hash every stored payload against its block; quarantine and report
    /// the ones that do not match (run while the relay is stopped; `serve`
    /// runs the same pass in the background when it starts). Exits 1 if any
    /// payload is quarantined.
    Check {
        /// Data directory of the relay.
        #[arg(long, default_value = "./data")]
        data: PathBuf,
        /// Check the chain in this PostgreSQL database instead of --data.
        #[arg(long)]
        database: Option<String>,
        /// The --blobs of the relays on that database.
        #[arg(long, requires = "database")]
        blobs: Option<String>,
    },
}

fn secs(s: &str) -> Result<Duration, String> {
    let v: f64 = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    if !(v.is_finite() && v > 0.0) {
        return Err(format!("{s:?} must be a positive number of seconds"));
    }
    Ok(Duration::from_secs_f64(v))
}

#[derive(Args)]
struct Serve {
    /// Address to listen on (port 0 picks a free port; the URL is printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// Data directory: block files, index, operator key.
    #[arg(long, default_value = "./data")]
    data: PathBuf,
    /// Static files of the web app (trunk's dist/).
    #[arg(long, default_value = "dist")]
    web: PathBuf,
    /// Genesis model (Hugging Face dir) used when the chain is empty.
    #[arg(long, default_value = "models/default")]
    model: PathBuf,
    /// Acceptance gate for new versions of a slot: `quality` recomputes the
    /// public-eval loss (see relay::quality); `accept-all` only validates.
    #[arg(long, default_value = "quality", value_parser = ["quality", "accept-all"])]
    gate: String,
    /// Keys (hex ed25519 public keys, one per line, `#` comments) allowed to
    /// publish chain-A meta blocks besides the operator key (data/operator.key).
    #[arg(long)]
    meta_keys: Option<PathBuf>,
    /// Largest JSON upload body, bytes (POST /upload_moe_experts).
    #[arg(long, default_value_t = limits::MAX_JSON_UPLOAD)]
    max_json_body: usize,
    /// Largest binary upload body, bytes (POST /blocks).
    #[arg(long, default_value_t = limits::MAX_BINARY_UPLOAD)]
    max_binary_body: u64,
    /// JSON uploads decoded at once (others wait 2 s, then 503).
    #[arg(long, default_value_t = limits::JSON_CONCURRENCY)]
    json_concurrency: usize,
    /// Quality-gate evaluations at once.
    #[arg(long, default_value_t = limits::EVAL_CONCURRENCY)]
    eval_concurrency: usize,
    /// Uploads admitted to wait for an evaluation (more: 429 before their payload).
    #[arg(long, default_value_t = limits::EVAL_QUEUE)]
    eval_queue: usize,
    /// Uploads per miner key in a burst.
    #[arg(long, default_value_t = limits::KEY_BURST)]
    key_burst: u32,
    /// Sustained uploads per minute per miner key.
    #[arg(long, default_value_t = limits::KEY_PER_MINUTE)]
    key_per_minute: u32,
    /// Upload requests per client IP in a burst.
    #[arg(long, default_value_t = limits::IP_BURST)]
    ip_burst: u32,
    /// Sustained upload requests per minute per client IP.
    #[arg(long, default_value_t = limits::IP_PER_MINUTE)]
    ip_per_minute: u32,
    /// Entries of each rate table (per key, per IP).
    #[arg(long, default_value_t = limits::RATE_TABLE_CAPACITY)]
    rate_table_capacity: usize,
    /// Seconds an upload body may send nothing before it is cut (staged file removed).
    #[arg(long, value_parser = secs, default_value = "15")]
    body_idle_timeout: Duration,
    /// Seconds to send a whole request header (from connect or the previous response).
    #[arg(long, value_parser = secs, default_value = "10")]
    header_timeout: Duration,
    /// Seconds an idle keep-alive connection stays open.
    #[arg(long, value_parser = secs, default_value = "5")]
    keepalive_timeout: Duration,
    /// Seconds a response write may make no progress before the connection is closed.
    #[arg(long, value_parser = secs, default_value = "30")]
    write_timeout: Duration,
    /// Open connections in total (also capped below the file-descriptor limit).
    #[arg(long, default_value_t = limits::MAX_CONNECTIONS)]
    max_connections: usize,
    /// Open connections per client IP.
    #[arg(long, default_value_t = limits::MAX_CONNECTIONS_PER_IP)]
    max_connections_per_ip: usize,
    /// Peer (/ws WebSocket) connections per client IP.
    #[arg(long, default_value_t = web_node::net::peer::limits::CONNS_PER_IP)]
    max_conns_per_ip: usize,
    /// Peer (/ws WebSocket) connections in total.
    #[arg(long, default_value_t = web_node::net::peer::limits::MAX_CONNS)]
    max_peer_conns: usize,
    /// A STUN or TURN server URL (`stun:HOST[:PORT]`, `turn:...`) handed to
    /// peers for direct browser-to-browser connections; repeatable. None by
    /// default: peers then use host candidates only (same network).
    #[arg(long = "ice-server", value_parser = ice_server)]
    ice_servers: Vec<String>,
    /// Listen backlog (Linux caps it at net.core.somaxconn).
    #[arg(long, default_value_t = limits::LISTEN_BACKLOG)]
    backlog: u32,
    /// Default number of blocks per page of GET /chain/{A|B}/blocks (max 1000).
    #[arg(long, default_value_t = limits::DEFAULT_PAGE)]
    page_size: usize,
    /// Do not re-hash every stored payload in the background at start.
    #[arg(long)]
    no_scrub: bool,
    /// PostgreSQL URL (`postgres://user@host:5432/aiblock`): keep the chain,
    /// usage ledger and peer presence there, shared with the other relays
    /// on it, instead of the embedded store in --data (which then holds only
    /// the operator key and uploads in flight).
    #[arg(long)]
    database: Option<String>,
    /// With --database: keep payloads in this directory or S3-compatible
    /// bucket (`s3://bucket/prefix`, credentials and endpoint from the AWS_*
    /// variables) instead of chunk rows in the database.
    #[arg(long, requires = "database")]
    blobs: Option<String>,
    /// With --database: the /ws URL other relays on the database reach this
    /// one at (e.g. ws://10.0.0.5:8080/ws); default ws://ADDR/ws from the
    /// bound address (loopback when bound to 0.0.0.0).
    #[arg(long)]
    advertise: Option<String>,
    /// Serve GET /metrics (Prometheus text format) only on this address
    /// (e.g. 127.0.0.1:9100, port 0 picks one and prints it), not on --addr.
    /// Without it /metrics is served on --addr.
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
    /// Seconds, after SIGTERM or SIGINT, that requests in flight (uploads,
    /// chats) may take to finish before they are cut (a cut upload leaves
    /// nothing stored); then usage counters are flushed and the relay exits 0.
    #[arg(long, value_parser = secs, default_value = "10")]
    shutdown_timeout: Duration,
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down: no new connections; requests in flight may finish");
    // A second Ctrl-C does not wait for the drain.
    tokio::spawn(async {
        if tokio::signal::ctrl_c().await.is_ok() {
            tracing::warn!("second interrupt: exiting now");
            std::process::exit(130);
        }
    });
}

fn check(data: PathBuf, database: Option<String>, blobs: Option<String>) -> anyhow::Result<()> {
    let (store, place): (Box<dyn RelayStore>, String) = match &database {
        None => {
            let (s, _) = relay::FileStore::open(&data)
                .with_context(|| format!("opening the store in {}", data.display()))?;
            (Box::new(s), data.join("quarantine").display().to_string())
        }
        Some(url) => {
            let pg = relay::pg::Pg::connect(url)?;
            let objects = blobs
                .as_deref()
                .map(relay::store::pg::open_blobs)
                .transpose()?;
            let (s, _) = relay::store::PgStore::open_with_blobs(pg, &data.join("tmp"), objects)?;
            (Box::new(s), "the quarantine table".into())
        }
    };
    let t = std::time::Instant::now();
    let r = store.scrub()?;
    println!(
        "checked {} payloads ({:.1} MB) in {:.1} s",
        r.checked,
        r.bytes as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
    let all = store.quarantined_all()?;
    for (h, why) in &all {
        println!("quarantined {h}: {why}");
    }
    if all.is_empty() {
        println!("all payloads match their blocks");
        Ok(())
    } else {
        println!(
            "{} payloads quarantined ({} found now) in {place}",
            all.len(),
            r.quarantined.len(),
        );
        std::process::exit(1);
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logs(&cli.log_format);
    let a = match cli.cmd {
        Cmd::Check {
            data,
            database,
            blobs,
        } => return tokio::task::spawn_blocking(move || check(data, database, blobs)).await?,
        Cmd::Backup(b) => {
            return tokio::task::spawn_blocking(move || relay::backup::run_backup(&b)).await?
        }
        Cmd::Restore(r) => {
            return tokio::task::spawn_blocking(move || relay::backup::run_restore(&r)).await?
        }
        Cmd::Serve(a) => a,
    };
    serve(*a).await
}

/// Logs to stderr, as text or JSON (`--log-format`), filtered by `RUST_LOG`.
fn init_logs(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,tower_http=info".into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        logs.json()
            .flatten_event(true)
            .with_current_span(false)
            .init();
    } else {
        logs.init();
    }
}

/// `relay serve`: open the relay, start its background tasks, serve until
/// a shutdown signal, then drain.
async fn serve(a: Serve) -> anyhow::Result<()> {
    // Resolved once (absolute, canonical): relative, `..`, symlinked and
    // trailing-slash forms of --data all name the same directory.
    let data = relay::store::resolve_data_dir(&a.data)
        .with_context(|| format!("the data directory {}", a.data.display()))?;
    let state = open_state(&a, &data).await?;
    // Built in one order: the listener is bound first, so that the cluster
    // identity (with the advertised /ws URL, which defaults to the bound
    // address) is built before the peer layer and the state is shared.
    let listener = relay::server::conn::bind(a.addr, a.backlog)
        .with_context(|| format!("binding {}", a.addr))?;
    let local = listener.local_addr()?;
    println!("relay listening on http://{local}");
    tracing::info!(%local, "listening");
    let state = if state.pg.is_some() {
        let url = a
            .advertise
            .clone()
            .unwrap_or_else(|| relay::cluster::presence::default_advertise(local));
        let cluster = relay::cluster::presence::configure(&state, &data, url)?;
        state.with_cluster(cluster)
    } else {
        state
    };
    let state = Arc::new(state);
    // Usage counters flushed every second, rewards paid every hour.
    relay::rewards::spawn_background(&state.core);
    let usage = state.usage.clone();
    if !a.no_scrub {
        spawn_scrub(&state);
    }
    let (stopped_tx, stopped_rx) = tokio::sync::watch::channel(false);
    let metrics = metrics_routes(a.metrics_addr, stopped_rx).await?;
    // Blocks other relays on the same database accept; presence and forwarding.
    relay::cluster::start(&state.core, &state.peers);
    let opts = serve_options(&a);
    let peers = state.peers.clone();
    let stop_peers = peers.clone();
    let draining = state.draining.clone();
    let staging = state.opts.staging_dir.clone();
    let shutdown = async move {
        shutdown_signal().await;
        // /readyz answers 503 from now on; peers are told and closed while
        // HTTP connections drain.
        draining.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = stopped_tx.send(true);
        stop_peers.shutdown();
    };
    let app = match metrics {
        Some(m) => relay::app(state).merge(m),
        None => relay::app(state),
    };
    relay::serve(listener, app, opts, shutdown).await?;
    peers.drain(a.shutdown_timeout).await;
    // Uploads cut by the deadline removed their staged files as they were
    // dropped; anything left there (a staging task that had not finished) goes now.
    let left = remove_staged(&staging);
    if left > 0 {
        tracing::warn!(files = left, "staged uploads of cut requests removed");
    }
    match usage.flush() {
        Ok(()) => tracing::info!("usage counters flushed; stopped"),
        Err(e) => tracing::error!(error = %e, "usage counters not written at shutdown"),
    }
    Ok(())
}

/// Open the store and chain (blocking), then apply the flags: meta keys,
/// request options, the gate and the peer options.
async fn open_state(a: &Serve, data: &std::path::Path) -> anyhow::Result<relay::AppState> {
    let cfg = ServeConfig {
        data_dir: data.to_path_buf(),
        web_dir: Some(a.web.clone()),
        model_dir: Some(a.model.clone()),
        database: a.database.clone(),
    };
    if !a.web.join("index.html").is_file() {
        tracing::warn!(web = %a.web.display(), "no index.html in the web dir (build the web app with trunk)");
    }
    let meta_keys = match &a.meta_keys {
        Some(p) => relay::server::auth::read_key_file(p)?,
        None => Vec::new(),
    };
    let shown = a.data.clone();
    let blobs = a.blobs.clone();
    let state =
        tokio::task::spawn_blocking(move || relay::open_relay_with_blobs(&cfg, blobs.as_deref()))
            .await?
            .with_context(|| format!("opening the relay data in {}", shown.display()))?;
    let state = state.with_meta_keys(meta_keys).with_options(|o| {
        o.max_json_body = a.max_json_body;
        o.max_binary_body = a.max_binary_body;
        o.json_concurrency = a.json_concurrency;
        o.eval_concurrency = a.eval_concurrency;
        o.eval_queue = a.eval_queue;
        o.key_rate = Rate {
            burst: a.key_burst,
            per_minute: a.key_per_minute,
        };
        o.ip_rate = Rate {
            burst: a.ip_burst,
            per_minute: a.ip_per_minute,
        };
        o.rate_table_capacity = a.rate_table_capacity;
        o.body_idle_timeout = a.body_idle_timeout;
        o.default_page = a.page_size.clamp(1, limits::MAX_PAGE);
    });
    if let Some(op) = state.meta_keys().operator() {
        tracing::info!(operator = %hex::encode(op), "meta blocks accepted from the operator key and --meta-keys");
    }
    let state = if a.gate == "quality" {
        state.with_gate(Arc::new(relay::quality::QualityGate::default()))
    } else {
        tracing::warn!("quality gate off: every valid block is accepted");
        state
    };
    let state = state.with_peer_options(
        relay::peers::PeerOptions::default()
            .max_conns_per_ip(a.max_conns_per_ip.max(1))
            .max_conns(a.max_peer_conns.max(1))
            .ice_servers(a.ice_servers.clone()),
    );
    Ok(state)
}

/// Check every payload against its hash in the background; quarantine the
/// corrupted ones.
fn spawn_scrub(state: &relay::SharedState) {
    let store = state.store.clone();
    tokio::task::spawn_blocking(move || match store.scrub() {
        Ok(r) => {
            for (h, why) in &r.quarantined {
                tracing::error!(block = %h, reason = %why, "corrupted payload quarantined at start (not served)");
            }
            tracing::info!(
                checked = r.checked,
                bytes = r.bytes,
                quarantined = r.quarantined.len(),
                "payload check done"
            );
        }
        Err(e) => tracing::error!(error = %e, "payload check failed"),
    });
}

/// Prometheus metrics: served on `addr` until `stopped` (then `None`), or
/// returned to be merged into the main router.
async fn metrics_routes(
    addr: Option<SocketAddr>,
    mut stopped_rx: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Option<axum::Router>> {
    // Prometheus metrics: on --metrics-addr only, or on the main address.
    let metrics = relay::metrics::install().context("installing the metrics recorder")?;
    Ok(match addr {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the metrics address {addr}"))?;
            let at = l.local_addr()?;
            println!("metrics listening on http://{at}");
            tracing::info!(%at, "metrics listening");
            let routes = relay::metrics::routes(metrics);
            tokio::spawn(async move {
                let stop = async move {
                    let _ = stopped_rx.changed().await;
                };
                if let Err(e) = axum::serve(l, routes).with_graceful_shutdown(stop).await {
                    tracing::error!(error = %e, "metrics listener failed");
                }
            });
            None
        }
        None => Some(relay::metrics::routes(metrics)),
    })
}

/// The connection-level flags.
fn serve_options(a: &Serve) -> relay::ServeOptions {
    relay::ServeOptions::default()
        .header_timeout(a.header_timeout)
        .keepalive_timeout(a.keepalive_timeout)
        .write_timeout(a.write_timeout)
        .max_connections(a.max_connections)
        .max_connections_per_ip(a.max_connections_per_ip)
        .backlog(a.backlog)
        .shutdown_timeout(a.shutdown_timeout)
}

/// Remove the files left in the staging dir; how many.
fn remove_staged(dir: &std::path::Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.filter_map(Result::ok)
        .filter(|e| e.path().is_file() && std::fs::remove_file(e.path()).is_ok())
        .count()
}

/// `--ice-server URL`: one URL as [`web_node::net::direct::check_ice_servers`] accepts.
fn ice_server(s: &str) -> Result<String, String> {
    web_node::net::direct::check_ice_servers(&[s.to_string()])?;
    Ok(s.to_string())
}
