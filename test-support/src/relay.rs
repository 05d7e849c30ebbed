//! A relay for tests, two ways:
//!
//! * [`TestRelay`]: the relay library serving in this process on
//!   127.0.0.1 (port 0 by default) through the production accept loop
//!   [`relay::serve`] (with [`relay::app`], [`ServeOptions`] and the
//!   listener of [`relay::server::conn::bind`]), on a runtime of its own.
//!   Rate limits are lifted ([`unthrottled`]) so that tests exercise
//!   validation, not throttling. It stops gracefully (as `SIGTERM` would) or
//!   crashes (every task and socket dropped, nothing cleaned up).
//! * [`ChildRelay`]: the real `relay` binary as a child process, found by
//!   [`relay_bin`].

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use relay::cluster::presence::ClusterOptions;
use relay::server::limits::Rate;
use relay::server::ServeConfig;
use relay::{AppState, ServeOptions, SharedState};

use crate::pg::TestPg;

/// Rate limits high enough that tests exercise validation, not throttling
/// (the rate-limit tests set their own).
pub fn unthrottled(s: AppState) -> AppState {
    s.with_options(|o| {
        o.ip_rate = Rate {
            burst: 1_000_000,
            per_minute: 1_000_000,
        };
        o.key_rate = o.ip_rate;
    })
}

/// The database a relay on data dir `data` uses in this test: None (the
/// embedded store), or under `AIBLOCK_TEST_STORE=postgres` a PostgreSQL
/// database of its own on the process's shared server ([`TestPg::shared`]),
/// the same one when the relay restarts on that dir.
pub fn test_database(data: &Path) -> Option<String> {
    static DBS: Mutex<Vec<(PathBuf, String)>> = Mutex::new(Vec::new());
    match std::env::var("AIBLOCK_TEST_STORE").as_deref() {
        Ok("postgres") => {
            let mut dbs = DBS.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((_, url)) = dbs.iter().find(|(d, _)| d == data) {
                return Some(url.clone());
            }
            let Some(pg) = TestPg::shared() else {
                panic!("AIBLOCK_TEST_STORE=postgres but PostgreSQL is not available")
            };
            let url = pg.create_db();
            dbs.push((data.to_path_buf(), url.clone()));
            Some(url)
        }
        _ => None,
    }
}

/// How a [`TestRelay`] listens and takes part in a cluster.
#[derive(Debug, Clone, Default)]
pub struct Launch {
    /// Port on 127.0.0.1; 0 picks a free one (a restarted relay can ask for
    /// its old one).
    pub port: u16,
    /// On a shared database: join the cluster with these timings,
    /// advertising `ws://ADDR/ws` (the bound address).
    pub cluster: Option<ClusterOptions>,
    /// Dropping the relay crashes it (see [`TestRelay::crash`]) instead of
    /// stopping it gracefully: for relays that outlive their database.
    pub crash_on_drop: bool,
}

/// How the serving thread is told to end.
enum End {
    Graceful,
    Crash,
}

/// A relay serving in this process through [`relay::serve`]; see the module
/// docs.
pub struct TestRelay {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    pub state: SharedState,
    stop: Mutex<Option<tokio::sync::oneshot::Sender<End>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    crash_on_drop: bool,
}

impl TestRelay {
    pub fn start(data: &Path, model: Option<&Path>, web: Option<&Path>) -> Self {
        Self::start_with(data, model, web, |s| s)
    }

    pub fn start_with(
        data: &Path,
        model: Option<&Path>,
        web: Option<&Path>,
        customize: impl FnOnce(AppState) -> AppState,
    ) -> Self {
        Self::start_full(data, model, web, customize, ServeOptions::default())
    }

    /// `customize` runs after [`unthrottled`]. The store is the embedded
    /// one, or PostgreSQL (a new database on a shared throwaway server)
    /// under `AIBLOCK_TEST_STORE=postgres` ([`test_database`]):
    /// `scripts/test.sh` runs the relay's behaviour tests both ways.
    pub fn start_full(
        data: &Path,
        model: Option<&Path>,
        web: Option<&Path>,
        customize: impl FnOnce(AppState) -> AppState,
        serve_opts: ServeOptions,
    ) -> Self {
        Self::start_cfg(
            ServeConfig {
                data_dir: data.to_path_buf(),
                web_dir: web.map(Path::to_path_buf),
                model_dir: model.map(Path::to_path_buf),
                database: test_database(data),
            },
            customize,
            serve_opts,
        )
    }

    /// A relay on the PostgreSQL database `url` (shared with other relays).
    pub fn start_db(data: &Path, model: Option<&Path>, url: &str) -> Self {
        Self::start_cfg(
            ServeConfig {
                data_dir: data.to_path_buf(),
                web_dir: None,
                model_dir: model.map(Path::to_path_buf),
                database: Some(url.to_string()),
            },
            |s| s,
            ServeOptions::default(),
        )
    }

    /// A relay on exactly `cfg` (no [`test_database`]); `customize` runs
    /// after [`unthrottled`].
    pub fn start_cfg(
        cfg: ServeConfig,
        customize: impl FnOnce(AppState) -> AppState,
        serve_opts: ServeOptions,
    ) -> Self {
        Self::launch(cfg, customize, serve_opts, Launch::default())
    }

    /// The general form: [`TestRelay::start_cfg`] with a port, a cluster
    /// and a drop behaviour ([`Launch`]).
    pub fn launch(
        cfg: ServeConfig,
        customize: impl FnOnce(AppState) -> AppState,
        serve_opts: ServeOptions,
        launch: Launch,
    ) -> Self {
        let opened = match relay::open_relay(&cfg) {
            Ok(s) => s,
            Err(e) => panic!("opening a relay on {}: {e:#}", cfg.data_dir.display()),
        };
        let st = customize(unthrottled(opened));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<End>();
        let dir = cfg.data_dir.clone();
        let Launch { port, cluster, .. } = launch;
        let thread = std::thread::spawn(move || {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => panic!("test relay runtime: {e}"),
            };
            let crashed = rt.block_on(serve(st, dir, port, cluster, serve_opts, addr_tx, stop_rx));
            if crashed {
                // A crash: the runtime goes with every task and socket.
                rt.shutdown_background();
            } else {
                // Dropping the runtime ends every connection task and
                // releases the store.
                rt.shutdown_timeout(Duration::from_secs(10));
            }
        });
        let (addr, state) = match addr_rx.recv() {
            Ok(a) => a,
            Err(_) => {
                // The thread panicked before binding: show why.
                match thread.join() {
                    Err(p) => std::panic::resume_unwind(p),
                    Ok(()) => panic!("the test relay ended before listening"),
                }
            }
        };
        Self {
            url: format!("http://{addr}"),
            state,
            stop: Mutex::new(Some(stop_tx)),
            thread: Mutex::new(Some(thread)),
            crash_on_drop: launch.crash_on_drop,
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        self.url.trim_start_matches("http://").to_string()
    }

    /// The URL (`http://127.0.0.1:PORT`).
    pub fn http(&self) -> String {
        self.url.clone()
    }

    /// The peers' WebSocket URL (`ws://127.0.0.1:PORT/ws`).
    pub fn ws(&self) -> String {
        format!("ws://{}/ws", self.addr())
    }

    /// Stop serving gracefully (peers told to go, connections drained, on a
    /// shared database this relay removed from it) and release the store.
    pub fn stop(self) {
        self.end(true);
    }

    /// Die as a killed process would: every task and socket dropped,
    /// nothing cleaned up (on a shared database its rows expire).
    pub fn crash(&self) {
        self.end(false);
    }

    /// Stop serving: gracefully, or as a crash. Later calls do nothing.
    pub fn end(&self, graceful: bool) {
        let stop = self.stop.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(s) = stop {
            let _ = s.send(if graceful { End::Graceful } else { End::Crash });
        }
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = thread {
            if let Err(p) = t.join() {
                if !std::thread::panicking() {
                    std::panic::resume_unwind(p);
                }
            }
        }
    }
}

impl Drop for TestRelay {
    fn drop(&mut self) {
        self.end(!self.crash_on_drop);
    }
}

/// The serving thread's body, in one order: bind, build the cluster
/// identity with the bound address and the peer layer with it, share the
/// state (sent back with the address), serve until told to end. Returns
/// whether it was a crash.
async fn serve(
    st: AppState,
    dir: PathBuf,
    port: u16,
    cluster: Option<ClusterOptions>,
    serve_opts: ServeOptions,
    addr_tx: std::sync::mpsc::Sender<(SocketAddr, SharedState)>,
    stop_rx: tokio::sync::oneshot::Receiver<End>,
) -> bool {
    let at = SocketAddr::from(([127, 0, 0, 1], port));
    let l = match relay::server::conn::bind(at, 1024) {
        Ok(l) => l,
        Err(e) => panic!("binding {at}: {e}"),
    };
    let addr = match l.local_addr() {
        Ok(a) => a,
        Err(e) => panic!("local address: {e}"),
    };
    let st = match cluster {
        Some(opts) => {
            match relay::cluster::presence::configure_with(
                &st,
                &dir,
                format!("ws://{addr}/ws"),
                opts,
            ) {
                Ok(c) => st.with_cluster(c),
                Err(e) => panic!("joining the cluster: {e:#}"),
            }
        }
        None => st,
    };
    let st: SharedState = Arc::new(st);
    relay::cluster::start(&st.core, &st.peers);
    let _ = addr_tx.send((addr, st.clone()));
    let peers = st.peers.clone();
    let (graceful_tx, graceful_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = relay::serve(l, relay::app(st), serve_opts, async move {
        let _ = graceful_rx.await;
    });
    tokio::pin!(serving);
    tokio::select! {
        r = &mut serving => {
            if let Err(e) = r {
                panic!("relay::serve: {e}");
            }
            false
        }
        end = stop_rx => {
            if let Ok(End::Crash) = end {
                return true;
            }
            peers.shutdown();
            let _ = graceful_tx.send(());
            if let Err(e) = serving.await {
                panic!("relay::serve: {e}");
            }
            peers.drain(Duration::from_secs(5)).await;
            false
        }
    }
}

/// The `relay` binary: `$AIBLOCK_RELAY_BIN`, else `relay` in the profile
/// directory of the running test (`target/debug/relay` for a test binary in
/// `target/debug/deps/`). Cargo builds it for the relay crate's own
/// integration tests; other crates' tests need `cargo build -p relay`
/// first (`scripts/test.sh` builds every binary before the tests). Panics,
/// naming both places, when neither holds it.
pub fn relay_bin() -> PathBuf {
    let beside = std::env::current_exe().ok().and_then(|exe| {
        let dir = exe.parent()?;
        let profile = if dir.file_name().is_some_and(|n| n == "deps") {
            dir.parent()?
        } else {
            dir
        };
        Some(profile.join(format!("relay{}", std::env::consts::EXE_SUFFIX)))
    });
    if let Some(p) = std::env::var_os("AIBLOCK_RELAY_BIN") {
        return PathBuf::from(p);
    }
    match beside {
        Some(p) if p.is_file() => p,
        other => panic!(
            "the relay binary is not built: no $AIBLOCK_RELAY_BIN and nothing at {} \
             (run `cargo build -p relay`, or scripts/test.sh)",
            other
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "the test's target directory".into())
        ),
    }
}

/// The real `relay` binary ([`relay_bin`]) as a child process, on
/// 127.0.0.1:0 with `--gate accept-all`; killed on drop.
pub struct ChildRelay {
    pub child: Child,
    pub url: String,
}

impl ChildRelay {
    pub fn start(data: &Path, model: &Path, web: &Path) -> Self {
        Self::start_args(data, model, web, &[], None, None)
    }

    /// With extra `relay serve` flags, an optional `ulimit -n`, and stderr
    /// to a file (else inherited).
    pub fn start_args(
        data: &Path,
        model: &Path,
        web: &Path,
        extra: &[&str],
        nofile: Option<u64>,
        log: Option<&Path>,
    ) -> Self {
        let bin = relay_bin();
        let mut cmd = match nofile {
            Some(n) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("ulimit -n {n} && exec \"$0\" \"$@\""))
                    .arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        serve_args(&mut cmd, data, model, web)
            .args(extra)
            .stdout(Stdio::piped());
        match log {
            Some(p) => match std::fs::File::create(p) {
                Ok(f) => cmd.stderr(f),
                Err(e) => panic!("{}: {e}", p.display()),
            },
            None => cmd.stderr(Stdio::inherit()),
        };
        let mut child = spawn(&mut cmd, &bin);
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            let _ = BufReader::new(out).read_line(&mut line);
        }
        let url = line
            .trim()
            .strip_prefix("relay listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        Self { child, url }
    }

    /// The real binary with `--metrics-addr 127.0.0.1:0` (and `extra`
    /// flags): the relay, and the URL of its metrics listener, read from the
    /// second line it prints (`metrics listening on http://ADDR`).
    pub fn start_metrics_listener(
        data: &Path,
        model: &Path,
        web: &Path,
        extra: &[&str],
    ) -> (Self, String) {
        let bin = relay_bin();
        let mut cmd = Command::new(&bin);
        serve_args(&mut cmd, data, model, web)
            .args(["--metrics-addr", "127.0.0.1:0"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = spawn(&mut cmd, &bin);
        // Read on a thread: a relay that prints one line only must fail the
        // test, not hang it.
        let (tx, rx) = std::sync::mpsc::channel();
        if let Some(out) = child.stdout.take() {
            let mut out = BufReader::new(out);
            std::thread::spawn(move || {
                for _ in 0..2 {
                    let mut l = String::new();
                    let _ = out.read_line(&mut l);
                    if tx.send(l).is_err() {
                        return;
                    }
                }
            });
        }
        let mut lines = Vec::new();
        while lines.len() < 2 {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(l) => lines.push(l),
                Err(_) => break,
            }
        }
        let after = |i: usize, prefix: &str| {
            lines
                .get(i)
                .and_then(|l| l.trim().strip_prefix(prefix).map(str::to_string))
        };
        match (
            after(0, "relay listening on "),
            after(1, "metrics listening on "),
        ) {
            (Some(url), Some(metrics)) => (Self { child, url }, metrics),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "expected the listening lines of the relay and of its metrics, got {lines:?}"
                )
            }
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        self.url.trim_start_matches("http://").to_string()
    }

    /// Peak resident memory of the relay process (VmHWM), bytes.
    pub fn peak_rss(&self) -> u64 {
        proc_status_kb(self.child.id(), "VmHWM") * 1024
    }

    /// SIGKILL and wait.
    pub fn kill9(mut self) {
        if let Err(e) = self.child.kill() {
            panic!("kill the relay: {e}");
        }
        let _ = self.child.wait();
    }

    /// SIGTERM and wait: graceful shutdown must exit 0.
    pub fn terminate(mut self) {
        let st = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        assert!(st.as_ref().is_ok_and(|s| s.success()), "kill -TERM: {st:?}");
        match self.child.wait() {
            Ok(code) => assert!(code.success(), "relay exited with {code}"),
            Err(e) => panic!("waiting for the relay: {e}"),
        }
    }
}

impl Drop for ChildRelay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `serve --addr 127.0.0.1:0 --data .. --web .. --model .. --gate
/// accept-all` with `RUST_LOG=warn`.
fn serve_args<'c>(cmd: &'c mut Command, data: &Path, model: &Path, web: &Path) -> &'c mut Command {
    cmd.args(["serve", "--addr", "127.0.0.1:0", "--data"])
        .arg(data)
        .arg("--web")
        .arg(web)
        .arg("--model")
        .arg(model)
        // These tests upload random new versions; the quality gate has its own tests.
        .args(["--gate", "accept-all"])
        .env("RUST_LOG", "warn")
}

fn spawn(cmd: &mut Command, bin: &Path) -> Child {
    match cmd.spawn() {
        Ok(c) => c,
        Err(e) => panic!("starting {}: {e}", bin.display()),
    }
}

/// A `/proc/<pid>/status` field in kB.
pub fn proc_status_kb(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}
