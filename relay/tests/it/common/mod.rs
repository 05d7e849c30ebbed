//! Helpers for relay integration tests: tiny model dirs, a real relay on
//! 127.0.0.1:0 (in process or as the real binary), a blocking HTTP client.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod ws;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use ed25519_dalek::SigningKey;
use relay::server::limits::Rate;
use relay::server::ServeConfig;
use relay::{AppState, ServeOptions, SharedState};
use web_node::chain::{validate_block, Block, BlockHash, BlockKind, Dag};
use web_node::model::random::{
    random_tensors, safetensors_bytes, small_config, write_random_model,
};
use web_node::model::{Config, Slot};
use web_node::net::api::{ApiError, BlockInfo, SeedUpload, UploadOptions};

/// A small Mixtral: 2 layers, 8 experts, hidden 16, vocab 259.
pub fn test_config() -> Config {
    small_config(259, 16, 24, 2, 2, 1)
}

/// Write a random model dir (config.json, model.safetensors, tokenizer.json).
pub fn model_dir(dir: &Path) -> PathBuf {
    let m = dir.join("model");
    write_random_model(&m, &test_config(), 7).unwrap();
    m
}

/// A payload holding exactly `slot`'s tensors (F32), deterministic from `seed`.
pub fn slot_payload(cfg: &Config, slot: Slot, seed: u64) -> Vec<u8> {
    let want: Vec<String> = slot.tensors(cfg).into_iter().map(|t| t.name).collect();
    let t: Vec<_> = random_tensors(cfg, seed)
        .into_iter()
        .filter(|(n, _, _)| want.contains(n))
        .collect();
    safetensors_bytes(&t).unwrap()
}

pub fn miner_key(n: u8) -> SigningKey {
    SigningKey::from_bytes(&[n; 32])
}

/// A signed seed upload of a new version of `slot`.
pub fn upload(
    slot: Slot,
    payload: &[u8],
    parents: Vec<BlockHash>,
    meta: Option<BlockHash>,
    key: &SigningKey,
) -> (SeedUpload, Block) {
    let kind = BlockKind::of_slot(slot);
    let opts = UploadOptions {
        parents,
        candidate_loss: Some(1.25),
        address: "alice".into(),
        meta,
        timestamp_ms: 1_700_000_000_000,
        chunk_size: Some(4096),
    };
    SeedUpload::build(kind, &slot.to_string(), payload, &opts, key).unwrap()
}

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
/// database of its own, the same one when the relay restarts on that dir.
pub fn test_database(data: &Path) -> Option<String> {
    static DBS: std::sync::Mutex<Vec<(PathBuf, String)>> = std::sync::Mutex::new(Vec::new());
    match std::env::var("AIBLOCK_TEST_STORE").as_deref() {
        Ok("postgres") => {
            let mut dbs = DBS.lock().unwrap();
            if let Some((_, url)) = dbs.iter().find(|(d, _)| d == data) {
                return Some(url.clone());
            }
            let url = relay::pg::testing::TestPg::shared()
                .expect("AIBLOCK_TEST_STORE=postgres but PostgreSQL is not available")
                .create_db();
            dbs.push((data.to_path_buf(), url.clone()));
            Some(url)
        }
        _ => None,
    }
}

/// A relay serving in this process on 127.0.0.1:0 through [`relay::serve`].
pub struct TestRelay {
    pub url: String,
    pub state: SharedState,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
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
    /// under `AIBLOCK_TEST_STORE=postgres`: `scripts/test.sh` runs the
    /// relay's behaviour tests both ways.
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

    pub fn start_cfg(
        cfg: ServeConfig,
        customize: impl FnOnce(AppState) -> AppState,
        serve_opts: ServeOptions,
    ) -> Self {
        let state: SharedState = Arc::new(customize(unthrottled(relay::open_relay(&cfg).unwrap())));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let l = relay::server::conn::bind("127.0.0.1:0".parse().unwrap(), 1024).unwrap();
                addr_tx.send(l.local_addr().unwrap()).unwrap();
                relay::cluster::start(&st);
                let peers = st.peers.clone();
                relay::serve(l, relay::app(st), serve_opts, async move {
                    let _ = stop_rx.await;
                    peers.shutdown();
                })
                .await
                .unwrap();
            });
        });
        let addr = addr_rx.recv().unwrap();
        Self {
            url: format!("http://{addr}"),
            state,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> String {
        self.url.trim_start_matches("http://").to_string()
    }

    /// Stop serving and release the store.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for TestRelay {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The real `relay` binary as a child process.
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
        let bin = env!("CARGO_BIN_EXE_relay");
        let mut cmd = match nofile {
            Some(n) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("ulimit -n {n} && exec \"$0\" \"$@\""))
                    .arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.args(["serve", "--addr", "127.0.0.1:0", "--data"])
            .arg(data)
            .arg("--web")
            .arg(web)
            .arg("--model")
            .arg(model)
            // These tests upload random new versions; the quality gate has its own tests.
            .args(["--gate", "accept-all"])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped());
        match log {
            Some(p) => cmd.stderr(std::fs::File::create(p).unwrap()),
            None => cmd.stderr(Stdio::inherit()),
        };
        let mut child = cmd.spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line
            .trim()
            .strip_prefix("relay listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        Self { child, url }
    }

    pub fn addr(&self) -> String {
        self.url.trim_start_matches("http://").to_string()
    }

    /// Peak resident memory of the relay process (VmHWM), bytes.
    pub fn peak_rss(&self) -> u64 {
        proc_status_kb(self.child.id(), "VmHWM") * 1024
    }

    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM and wait: graceful shutdown must exit 0.
    pub fn terminate(mut self) {
        let st = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(st.success());
        let code = self.child.wait().unwrap();
        assert!(code.success(), "relay exited with {code}");
    }
}

impl Drop for ChildRelay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A response: status, content-type, Content-Range, body.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub content_type: String,
    pub content_range: Option<String>,
    pub link: Option<String>,
    pub retry_after: Option<String>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> T {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }
    /// The JSON error body; asserts the status.
    pub fn error(&self, status: u16) -> ApiError {
        assert_eq!(
            self.status,
            status,
            "body: {}",
            String::from_utf8_lossy(&self.body)
        );
        assert!(
            self.content_type.starts_with("application/json"),
            "{}",
            self.content_type
        );
        let e: ApiError = self.json();
        assert_eq!(e.status(), status, "{e:?}");
        e
    }
}

pub fn to_resp(r: Result<ureq::Response, ureq::Error>) -> Resp {
    let r = match r {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("transport error: {e}"),
    };
    let status = r.status();
    let content_type = r.header("content-type").unwrap_or_default().to_string();
    let content_range = r.header("content-range").map(str::to_string);
    let link = r.header("link").map(str::to_string);
    let retry_after = r.header("retry-after").map(str::to_string);
    let mut body = Vec::new();
    r.into_reader().read_to_end(&mut body).unwrap();
    Resp {
        status,
        content_type,
        content_range,
        link,
        retry_after,
        body,
    }
}

pub fn get(url: &str) -> Resp {
    to_resp(ureq::get(url).call())
}

pub fn get_with(url: &str, header: &str, value: &str) -> Resp {
    to_resp(ureq::get(url).set(header, value).call())
}

pub fn post_json(url: &str, body: &[u8]) -> Resp {
    to_resp(
        ureq::post(url)
            .set("content-type", "application/json")
            .send_bytes(body),
    )
}

pub fn post_bin(url: &str, body: &[u8]) -> Resp {
    to_resp(
        ureq::post(url)
            .set("content-type", "application/octet-stream")
            .send_bytes(body),
    )
}

/// Send raw request bytes (paths no client would normalise) and read the reply.
pub fn raw(addr: &str, request: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}

pub fn list(url: &str, chain: &str) -> Vec<BlockInfo> {
    let r = get(&format!("{url}/chain/{chain}/blocks"));
    assert_eq!(r.status, 200);
    r.json()
}

/// Every file under `dir` (relative paths, sorted) with its length.
pub fn files(dir: &Path) -> Vec<(String, u64)> {
    fn walk(base: &Path, d: &Path, out: &mut Vec<(String, u64)>) {
        let Ok(rd) = std::fs::read_dir(d) else { return };
        for e in rd {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(base, &p, out);
            } else {
                let rel = p.strip_prefix(base).unwrap().to_string_lossy().into_owned();
                out.push((rel, p.metadata().unwrap().len()));
            }
        }
    }
    let mut v = Vec::new();
    walk(dir, dir, &mut v);
    v.sort();
    v
}

/// Fetch every block of both chains (envelope + payload) and validate them in
/// order against a fresh DAG, as a client would.
pub fn fetch_and_validate_all(url: &str) -> usize {
    let mut dag = Dag::new();
    let mut infos = list(url, "A");
    infos.extend(list(url, "B"));
    for info in &infos {
        let env = get(&format!("{url}/blocks/{}?format=bin", info.hash));
        assert_eq!(env.status, 200);
        let b = Block::decode(&env.body).unwrap();
        b.check_hash(&info.hash).unwrap();
        let p = get(&format!("{url}/blocks/{}/payload", info.hash));
        assert_eq!(p.status, 200);
        let v = validate_block(&b, &p.body, &dag).unwrap();
        dag.insert(&v);
    }
    infos.len()
}

/// The binary upload body: envelope then payload.
pub fn envelope_and_payload(b: &Block, payload: &[u8]) -> Vec<u8> {
    let mut v = b.encode();
    v.extend_from_slice(payload);
    v
}

/// A `/proc/<pid>/status` field in kB.
pub fn proc_status_kb(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// A TCP connection to `addr` from a chosen loopback source address.
pub fn connect_from(src: std::net::Ipv4Addr, addr: &str) -> TcpStream {
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.bind(std::net::SocketAddr::from((src, 0))).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let t = rt
        .block_on(s.connect(addr.parse::<std::net::SocketAddr>().unwrap()))
        .unwrap();
    let std = t.into_std().unwrap();
    std.set_nonblocking(false).unwrap();
    std
}

/// The seed JSON body of a signed upload.
pub fn seed_json(up: &SeedUpload) -> Vec<u8> {
    serde_json::to_vec(up).unwrap()
}

/// A signed meta block for a config (`writers`: keys named for first slot versions).
pub fn meta_upload(
    name: &str,
    cfg: &Config,
    parents: Vec<BlockHash>,
    writers: &[&SigningKey],
    key: &SigningKey,
) -> (SeedUpload, Block, Vec<u8>) {
    let m = web_node::model::random::random_model_bytes(cfg, 1).unwrap();
    let cfg_json: serde_json::Value = serde_json::from_slice(&m.config_json).unwrap();
    let meta = web_node::chain::MetaPayload::new(name, cfg_json, None).unwrap();
    let mut v = serde_json::to_value(&meta).unwrap();
    if !writers.is_empty() {
        v["writers"] = writers
            .iter()
            .map(|k| hex::encode(k.verifying_key().to_bytes()))
            .collect();
    }
    let payload = serde_json::to_vec(&v).unwrap();
    let opts = UploadOptions {
        parents,
        timestamp_ms: 1_700_000_000_000,
        ..Default::default()
    };
    let (up, block) = SeedUpload::build(BlockKind::Meta, name, &payload, &opts, key).unwrap();
    (up, block, payload)
}

/// The relay operator's key of a data dir.
pub fn operator_key(data: &Path) -> SigningKey {
    let text = std::fs::read_to_string(data.join("operator.key")).unwrap();
    let mut k = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut k).unwrap();
    SigningKey::from_bytes(&k)
}

/// A model dir with config.json and tokenizer.json only: genesis is the meta
/// block alone, every slot waits for its first version.
pub fn meta_only_dir(dir: &Path, cfg: &Config) -> PathBuf {
    let m = dir.join("meta-only");
    std::fs::create_dir_all(&m).unwrap();
    std::fs::write(
        m.join("config.json"),
        web_node::model::random::config_json(cfg).unwrap(),
    )
    .unwrap();
    std::fs::write(
        m.join("tokenizer.json"),
        web_node::model::random::tokenizer_json().unwrap(),
    )
    .unwrap();
    m
}

/// A config whose `shared` slot is about `mib` MiB of f32 (embeddings and
/// lm_head dominate), one layer.
pub fn big_config(mib: u64) -> Config {
    let hidden = 512usize;
    let vocab = ((mib << 20) / (2 * hidden as u64 * 4)) as usize;
    small_config(vocab.max(300), hidden, 64, 1, 4, 2)
}

/// A block whose payload is streamed from a generator: a valid safetensors
/// header for the slot, then zeros. The root is bogus, so the relay reads
/// every byte and refuses it (400) only at the end.
pub struct Streamed {
    pub block: Block,
    pub prefix: Vec<u8>,
    pub len: u64,
}

pub fn streamed_slot(
    cfg: &Config,
    slot: Slot,
    meta: BlockHash,
    parents: Vec<BlockHash>,
    key: &SigningKey,
    tag: u64,
) -> Streamed {
    let (prefix, len) = web_node::model::random::slot_safetensors_prefix(cfg, slot);
    let block = web_node::chain::BlockBuilder::slot(meta, slot, web_node::chain::PayloadDtype::F32)
        .parents(parents)
        .candidate_loss(Some(1.0))
        .address("streamed")
        .timestamp_ms(tag)
        .sign_for(len, BlockHash([0xEE; 32]), key);
    Streamed { block, prefix, len }
}

/// POST a [`Streamed`] block (1 MiB writes, `pace` between them); returns
/// the reply's status line, or what happened if the relay closed first.
pub fn send_streamed(addr: &str, s: &Streamed, pace: std::time::Duration) -> String {
    let mut c = TcpStream::connect(addr).unwrap();
    let env = s.block.encode();
    write!(
        c,
        "POST /blocks HTTP/1.1\r\nhost: x\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        env.len() as u64 + s.len
    )
    .unwrap();
    c.write_all(&env).unwrap();
    c.write_all(&s.prefix).unwrap();
    let piece = vec![0u8; 1 << 20];
    let mut left = s.len - s.prefix.len() as u64;
    while left > 0 {
        let n = (piece.len() as u64).min(left) as usize;
        if let Err(e) = c.write_all(&piece[..n]) {
            return format!("write failed: {e}");
        }
        left -= n as u64;
        if !pace.is_zero() {
            std::thread::sleep(pace);
        }
    }
    let mut out = String::new();
    let _ = c.read_to_string(&mut out);
    out.lines().next().unwrap_or_default().to_string()
}

impl ChildRelay {
    /// The real binary with `--metrics-addr 127.0.0.1:0` (and `extra`
    /// flags): the relay, and the URL of its metrics listener, read from the
    /// second line it prints (`metrics listening on http://ADDR`).
    pub fn start_metrics_listener(
        data: &Path,
        model: &Path,
        web: &Path,
        extra: &[&str],
    ) -> (Self, String) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_relay"))
            .args(["serve", "--addr", "127.0.0.1:0", "--data"])
            .arg(data)
            .arg("--web")
            .arg(web)
            .arg("--model")
            .arg(model)
            .args(["--gate", "accept-all", "--metrics-addr", "127.0.0.1:0"])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        // Read on a thread: a relay that prints one line only must fail the
        // test, not hang it.
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for _ in 0..2 {
                let mut l = String::new();
                let _ = out.read_line(&mut l);
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        let mut lines = Vec::new();
        while lines.len() < 2 {
            match rx.recv_timeout(std::time::Duration::from_secs(60)) {
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
}
