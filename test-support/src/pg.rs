//! A throwaway PostgreSQL server for tests and benchmarks: `initdb` and
//! `pg_ctl` from the machine's packages, in a temporary directory, on a free
//! loopback port, run as the `postgres` user when the caller is root (the
//! server refuses root). Stopped and removed on drop.
//!
//! [`TestPg::start`] returns `None` (after printing a loud SKIPPED) when the
//! binaries are not installed, and panics instead under
//! `AIBLOCK_REQUIRE_PG=1` (CI sets it).
#![allow(clippy::print_stderr)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// Is PostgreSQL required (`AIBLOCK_REQUIRE_PG=1`)?
pub fn required() -> bool {
    std::env::var("AIBLOCK_REQUIRE_PG").is_ok_and(|v| v == "1")
}

/// The directory holding `initdb`, `pg_ctl` and `postgres`: `$AIBLOCK_PG_BIN`,
/// then PATH, then the newest `/usr/lib/postgresql/*/bin`.
pub fn bin_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("AIBLOCK_PG_BIN") {
        return Some(PathBuf::from(d));
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let v = e.file_name().to_str()?.parse::<u32>().ok()?;
                    Some((v, e.path().join("bin")))
                })
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    dirs.extend(versions.into_iter().rev().map(|(_, p)| p));
    dirs.into_iter().find(|d| {
        ["initdb", "pg_ctl", "postgres"]
            .iter()
            .all(|b| d.join(b).is_file())
    })
}

fn is_root() -> bool {
    // `id -u` rather than libc: no unsafe, and this runs once per server.
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A running throwaway server. See the module docs.
pub struct TestPg {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    as_postgres: bool,
    version: String,
    /// The `postgres` options it was started with (for [`TestPg::resume`]).
    opts: String,
}

static DB_SEQ: AtomicU32 = AtomicU32::new(0);

static SHARED: std::sync::OnceLock<Option<TestPg>> = std::sync::OnceLock::new();

impl TestPg {
    /// Start a server (fsync off: a test server, fast). See the module docs.
    pub fn start() -> Option<Self> {
        Self::start_with(&["-c", "fsync=off", "-c", "synchronous_commit=off"])
    }

    /// One server for the whole test process (a database per test with
    /// [`TestPg::create_db`]). A static is never dropped, so a watchdog
    /// process stops the server and removes its directory when this process
    /// exits.
    pub fn shared() -> Option<&'static TestPg> {
        SHARED
            .get_or_init(|| {
                let pg = Self::start()?;
                pg.watch_parent();
                Some(pg)
            })
            .as_ref()
    }

    fn watch_parent(&self) {
        let data = self.dir.path().join("data").display().to_string();
        // The same command Drop runs (through runuser when root).
        let stop = self.cmd("pg_ctl", &["-D", &data, "-m", "immediate", "stop"]);
        let prog = stop.get_program().to_string_lossy().into_owned();
        let args: Vec<String> = stop
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let quoted = |v: &str| format!("'{}'", v.replace('\'', "'\\''"));
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; {prog} {args} >/dev/null 2>&1; rm -rf {dir}",
            pid = std::process::id(),
            prog = quoted(&prog),
            args = args.iter().map(|a| quoted(a)).collect::<Vec<_>>().join(" "),
            dir = quoted(&self.dir.path().display().to_string()),
        );
        let _ = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
    }

    /// Start a server with PostgreSQL's default durability (benchmarks).
    pub fn start_durable() -> Option<Self> {
        Self::start_with(&[])
    }

    fn start_with(settings: &[&str]) -> Option<Self> {
        let Some(bin) = bin_dir() else {
            let msg = "PostgreSQL (initdb, pg_ctl) is not installed: apt-get install postgresql";
            if required() {
                panic!("AIBLOCK_REQUIRE_PG=1 but {msg}");
            }
            eprintln!("\n**** SKIPPED: {msg} ****\n");
            return None;
        };
        match Self::try_start(&bin, settings) {
            Ok(s) => Some(s),
            Err(e) => {
                if required() {
                    panic!("AIBLOCK_REQUIRE_PG=1 but PostgreSQL did not start: {e}");
                }
                eprintln!("\n**** SKIPPED: PostgreSQL did not start: {e} ****\n");
                None
            }
        }
    }

    fn try_start(bin: &Path, settings: &[&str]) -> Result<Self, String> {
        let as_postgres = is_root();
        let dir = tempfile::Builder::new()
            .prefix("aiblock-pg-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        if as_postgres {
            run(Command::new("chown").arg("postgres:").arg(dir.path()))?;
        }
        let data = dir.path().join("data");
        let mut s = Self {
            port: 0,
            bin: bin.to_path_buf(),
            as_postgres,
            version: String::new(),
            opts: String::new(),
            dir,
        };
        let v = run(&mut s.cmd("postgres", &["--version"]))?;
        let data_s = data.display().to_string();
        run(&mut s.cmd(
            "initdb",
            &[
                "-D",
                &data_s,
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        ))?;
        // A free port: bind, read, release (another process could take it in
        // between; then pg_ctl fails and says so).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let sock = s.dir.path().display().to_string();
        let mut opts =
            format!("-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c max_connections=200");
        for pair in settings.chunks(2) {
            if let [_, v] = pair {
                opts.push_str(&format!(" -c {v}"));
            }
        }
        let log = s.dir.path().join("server.log").display().to_string();
        run(&mut s.cmd(
            "pg_ctl",
            &[
                "-D", &data_s, "-l", &log, "-o", &opts, "-w", "-t", "60", "start",
            ],
        ))
        .map_err(|e| {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            format!("{e}\n{tail}")
        })?;
        s.port = port;
        s.version = v.trim().to_string();
        s.opts = opts;
        Ok(s)
    }

    fn cmd(&self, prog: &str, args: &[&str]) -> Command {
        let exe = self.bin.join(prog);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe).args(args);
            c.current_dir(self.dir.path());
            c
        } else {
            let mut c = Command::new(exe);
            c.args(args);
            c
        }
    }

    /// Stop the server (fast shutdown; clients see their connections end),
    /// keeping its data, port and directory for [`TestPg::resume`].
    pub fn pause(&self) -> Result<(), String> {
        let data = self.dir.path().join("data").display().to_string();
        run(&mut self.cmd("pg_ctl", &["-D", &data, "-m", "fast", "-w", "stop"])).map(|_| ())
    }

    /// Start a server stopped by [`TestPg::pause`] again, on the same port.
    pub fn resume(&self) -> Result<(), String> {
        let data = self.dir.path().join("data").display().to_string();
        let log = self.dir.path().join("server.log").display().to_string();
        run(&mut self.cmd(
            "pg_ctl",
            &[
                "-D", &data, "-l", &log, "-o", &self.opts, "-w", "-t", "60", "start",
            ],
        ))
        .map(|_| ())
    }

    /// `postgres --version` of the running server.
    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// URL of database `db` on this server.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Create a new, empty database and return its URL.
    pub fn create_db(&self) -> String {
        let name = format!(
            "aiblock_{}_{}",
            std::process::id(),
            DB_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let admin = self.url("postgres");
        let sql = format!("CREATE DATABASE {name}");
        let r = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async move {
                let (c, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::spawn(conn);
                c.batch_execute(&sql).await.map_err(|e| e.to_string())
            })
        })
        .join()
        .map_err(|_| "create database thread panicked".to_string())
        .and_then(|r| r);
        if let Err(e) = r {
            panic!("CREATE DATABASE {name}: {e}");
        }
        self.url(&name)
    }
}

impl Drop for TestPg {
    fn drop(&mut self) {
        let data = self.dir.path().join("data").display().to_string();
        let _ = self
            .cmd("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"])
            .output();
    }
}

fn run(c: &mut Command) -> Result<String, String> {
    let o = c.output().map_err(|e| format!("{c:?}: {e}"))?;
    if o.status.success() {
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    } else {
        Err(format!(
            "{c:?} failed ({}): {}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ))
    }
}
