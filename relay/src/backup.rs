//! `relay backup` and `relay restore`: every accepted block of both chains,
//! payloads included, in one portable archive, and back into an empty store.
//!
//! # Sources and targets
//!
//! * `relay backup --data DIR`: the embedded store of a **stopped** relay.
//!   A serving relay holds the lock of `DIR/index.redb` (redb has no
//!   read-only open); backup then refuses with
//!   [`BackupError::RelayRunning`] and points at `--relay URL`.
//! * `relay backup --database URL [--blobs SPEC]`: PostgreSQL, read while
//!   relays serve (one listing query, then one payload at a time).
//! * `relay backup --relay URL`: a serving relay over its REST API: chain B
//!   is listed first, then chain A (so that every meta block a listed B block
//!   links to is listed too), page by page (`?after=..&limit=..`); each block
//!   is fetched as its signed envelope (`?format=bin`) and its payload, and
//!   checked before it is written (hash as listed, signature, payload length
//!   and chunk root, and every rule of [`validate_block`]). The two listings
//!   are merged into one order that keeps each chain's order and puts every
//!   block after its meta block and its parents.
//!
//! Whatever the source, every block passes [`validate_block`] against the
//! blocks before it while the archive is written, exactly as restore will
//! check it. A payload a store has quarantined cannot be read: the backup
//! fails and names the block (`relay check` lists them).
//!
//! `relay restore --from FILE (--data DIR | --database URL [--blobs SPEC])`
//! imports into an **empty** store ([`BackupError::NotEmpty`] otherwise):
//!
//! 1. The whole archive is read and checked before anything is written: the
//!    header, every record (each block decoded and validated with
//!    [`validate_block`] against a [`Dag`] built in memory, in archive order),
//!    the trailer's block count and its SHA-256. A truncated archive or a
//!    single flipped bit anywhere is refused ([`BackupError::Damaged`]) and
//!    nothing is imported.
//! 2. The blocks are written one by one in archive order through
//!    [`put_checked`] (each block durable and indexed before the next). If
//!    this fails midway (a disk error, the database gone), the error
//!    ([`BackupError::Partial`]) names the block and how many were written
//!    before it: the store is then **not empty**, and restore must be run
//!    again into a fresh store (a new `--data` dir or a new database).
//!
//! Restore into a database no relay is serving from (a relay started on an
//! empty database would write a genesis of its own).
//!
//! # Not in the archive
//!
//! Only blocks and payloads. **Usage counters, usage reports and the reward
//! ledger are not in the archive**, nor the operator key
//! (`DATA/operator.key`: copy it to the new data dir yourself, or the
//! restored relay makes a new one and no longer accepts meta blocks from the
//! old key), nor quarantine records, peer state, or slot heads moved by hand
//! (after restore each slot's head is its last accepted version).
//!
//! # Archive format (version 1)
//!
//! All integers little-endian; the file is streamed, never held in memory.
//!
//! ```text
//! header   "AIBLKBAK" (8 bytes) | format version u32 (= 1) | flags u32 (= 0)
//! record   envelope length u32 (> 0) | envelope (Block::encode: magic,
//!          header length, canonical header, signature) | payload
//!          (header.payload_len bytes); one record per block, in
//!          acceptance order (every block after its meta block and parents)
//! trailer  0u32 (end of records) | "AIBLKEND" (8) | block count u64 |
//!          payload bytes u64 | SHA-256 (32) of every byte before it
//! ```
//!
//! The archive is written to a temporary file in the output's directory,
//! fsynced and renamed into place at the end, so a failed backup leaves no
//! partial file. The same blocks in the same order give the same bytes (no
//! timestamps): a backup of a restored store equals the original archive.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::ArgGroup;
use sha2::{Digest, Sha256};
use web_node::chain::{
    check_payload_integrity, limits, validate_block, Block, BlockHash, ChainError, Dag,
};
use web_node::net::api::{ApiError, BlockInfo};
use web_node::store::StoreError;

use crate::pg::{Pg, PgError};
use crate::store::{put_checked, Committed, Expect, FileStore, PgStore, RelayStore};

/// First bytes of an archive.
pub const MAGIC: &[u8; 8] = b"AIBLKBAK";
/// The archive format this relay writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The trailer's magic, after the end-of-records marker.
pub const TRAILER_MAGIC: &[u8; 8] = b"AIBLKEND";
/// Header: magic, version, flags.
pub const HEADER_LEN: u64 = 16;
/// Trailer: end marker (4), magic (8), block count (8), payload bytes (8), SHA-256 (32).
pub const TRAILER_LEN: u64 = 60;
/// Largest envelope a record may declare.
const MAX_ENVELOPE: u64 = 8 + limits::MAX_HEADER_LEN as u64 + 64;
/// Most blocks per listing request with `--relay` (the relay's maximum page).
pub const MAX_PAGE: u16 = 1000;
/// Buffer of archive reads and writes.
const IO_BUF: usize = 1 << 20;

/// `relay backup`: write every accepted block of both chains, payloads
/// included, to one archive (while the relay serves, with --database or
/// --relay).
///
/// Usage counters, usage reports and rewards are NOT in the archive, nor
/// the operator key (copy DATA/operator.key yourself).
#[derive(Debug, Clone, clap::Args)]
#[command(
    group(ArgGroup::new("source").required(true).args(["data", "database", "relay"])),
    after_help = "The archive holds every accepted block of both chains with its payload, \
in acceptance order. Usage counters, usage reports and rewards are NOT in the archive, \
nor the operator key (copy DATA/operator.key yourself)."
)]
pub struct BackupArgs {
    /// Data directory of a stopped relay's embedded store (a serving relay
    /// locks it: use --relay URL for that one).
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// PostgreSQL URL of the relays' database (`postgres://user@host:5432/aiblock`);
    /// read while the relays serve.
    #[arg(long, value_name = "URL")]
    pub database: Option<String>,
    /// With --database: the --blobs of the relays on that database (a
    /// directory or `s3://bucket/prefix`).
    #[arg(
        long,
        value_name = "SPEC",
        requires = "database",
        conflicts_with_all = ["data", "relay"]
    )]
    pub blobs: Option<String>,
    /// Base URL of a serving relay (`http://host:8080`): read over its REST
    /// API, every block checked before it is written.
    #[arg(long, value_name = "URL")]
    pub relay: Option<String>,
    /// With --relay: blocks per listing request (1-1000).
    #[arg(
        long,
        value_name = "N",
        default_value_t = MAX_PAGE,
        conflicts_with_all = ["data", "database"],
        value_parser = clap::value_parser!(u16).range(1..=i64::from(MAX_PAGE))
    )]
    pub page: u16,
    /// The archive to write (replaced atomically at the end; nothing is left
    /// behind if the backup fails).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

/// `relay restore`: import an archive of `relay backup` into an EMPTY store
/// (the whole archive is checked before the first block is written).
///
/// Usage counters, usage reports and rewards are NOT in the archive and are
/// not restored, nor the operator key (copy DATA/operator.key yourself).
#[derive(Debug, Clone, clap::Args)]
#[command(
    group(ArgGroup::new("target").required(true).args(["data", "database"])),
    after_help = "Restore refuses a store that holds any block, and an archive that is truncated \
or damaged (nothing is imported then). If writing fails midway, the store is no longer empty: \
restore again into a fresh one. Usage counters, usage reports and rewards are NOT in the \
archive, nor the operator key (copy DATA/operator.key yourself)."
)]
pub struct RestoreArgs {
    /// The archive written by `relay backup`.
    #[arg(long, value_name = "FILE")]
    pub from: PathBuf,
    /// Data directory of the new embedded store (created if missing; must
    /// hold no blocks; no relay may be running on it).
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// PostgreSQL URL of the database to restore into (must hold no blocks;
    /// start the relays on it after the restore).
    #[arg(long, value_name = "URL")]
    pub database: Option<String>,
    /// With --database: keep payloads in this directory or `s3://bucket/prefix`,
    /// as the relays on that database will (`relay serve --blobs`).
    #[arg(
        long,
        value_name = "SPEC",
        requires = "database",
        conflicts_with = "data"
    )]
    pub blobs: Option<String>,
}

/// Why a backup or a restore failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(
        "a relay is running on {}: its store is locked. Back up a serving relay with \
         --relay URL (or stop it first)",
        .0.display()
    )]
    RelayRunning(PathBuf),
    #[error("a relay is running on {}: stop it (restore writes only into an empty, unused store)", .0.display())]
    TargetInUse(PathBuf),
    #[error("no relay store in {} (no index.redb there)", .0.display())]
    NoStore(PathBuf),
    #[error("the target store is not empty ({0}): restore writes only into an empty store (a new --data dir or a new database)")]
    NotEmpty(String),
    #[error("block {hash}: {error}")]
    Store { hash: BlockHash, error: StoreError },
    #[error(transparent)]
    StoreOpen(#[from] StoreError),
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error("block {hash} ({name}) from the source does not validate: {error}")]
    SourceInvalid {
        hash: BlockHash,
        name: String,
        error: Box<ChainError>,
    },
    #[error("{url}: {message}")]
    Http { url: String, message: String },
    #[error("relay listing: {0}")]
    Listing(String),
    #[error("{what}: {error}")]
    Io { what: String, error: std::io::Error },
    #[error("{} is not a relay backup archive: {detail}", .path.display())]
    NotArchive { path: PathBuf, detail: String },
    #[error(
        "{} is archive format version {version}; this relay reads version {FORMAT_VERSION} \
         (restore with a newer relay); nothing was imported",
        .path.display()
    )]
    UnsupportedVersion { path: PathBuf, version: u32 },
    #[error("archive {} is damaged or truncated ({detail}); nothing was imported", .path.display())]
    Damaged { path: PathBuf, detail: String },
    #[error(
        "archive {}: block #{index} ({hash}) does not validate: {error}; nothing was imported",
        .path.display()
    )]
    InvalidBlock {
        path: PathBuf,
        index: u64,
        hash: BlockHash,
        error: Box<ChainError>,
    },
    #[error("{}", partial_message(.index, .total, .hash, .error))]
    Partial {
        /// Blocks written before the failure (the 0-based index of the failed one).
        index: u64,
        total: u64,
        hash: Option<BlockHash>,
        error: String,
    },
}

fn partial_message(index: &u64, total: &u64, hash: &Option<BlockHash>, error: &str) -> String {
    let which = match hash {
        Some(h) => format!("block #{index} of {total} ({h})"),
        None => format!("block #{index} of {total}"),
    };
    let state = if *index == 0 {
        "nothing was written before it, but check that the store is still empty before \
         trying again"
            .to_string()
    } else {
        format!(
            "{index} blocks were written before it, so the store is NOT empty any more: \
             restore again into a fresh, empty store (a new --data dir or a new database)"
        )
    };
    format!("restore failed while writing {which}: {error}; {state}")
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BackupError {
    let what = what.into();
    move |error| BackupError::Io { what, error }
}

/// What a backup wrote or a restore imported.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    pub blocks: u64,
    /// Payload bytes of those blocks.
    pub payload_bytes: u64,
    /// Size of the archive file.
    pub archive_bytes: u64,
}

/// A checked archive ([`verify_archive`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verified {
    /// Every block, in archive order.
    pub hashes: Vec<BlockHash>,
    pub payload_bytes: u64,
    pub archive_bytes: u64,
}

// ---------------------------------------------------------------- writing

/// Bytes written so far, hashed as they go; a temp file renamed at the end.
struct ArchiveWriter {
    out: PathBuf,
    tmp: tempfile::TempPath,
    w: BufWriter<File>,
    sha: Sha256,
    written: u64,
    blocks: u64,
    payload_bytes: u64,
}

fn out_dir(out: &Path) -> PathBuf {
    match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

impl ArchiveWriter {
    fn create(out: &Path) -> Result<Self, BackupError> {
        let dir = out_dir(out);
        let name = out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "backup".into());
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .suffix(".tmp")
            .tempfile_in(&dir)
            .map_err(io_err(format!(
                "creating a temporary file in {}",
                dir.display()
            )))?;
        let (file, tmp) = tmp.into_parts();
        let mut w = Self {
            out: out.to_path_buf(),
            tmp,
            w: BufWriter::with_capacity(IO_BUF, file),
            sha: Sha256::new(),
            written: 0,
            blocks: 0,
            payload_bytes: 0,
        };
        w.put(MAGIC)?;
        w.put(&FORMAT_VERSION.to_le_bytes())?;
        w.put(&0u32.to_le_bytes())?;
        Ok(w)
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), BackupError> {
        self.sha.update(bytes);
        self.written += bytes.len() as u64;
        match self.w.write_all(bytes) {
            Ok(()) => Ok(()),
            Err(e) => Err(io_err(format!("writing {}", self.tmp.display()))(e)),
        }
    }

    fn record(&mut self, block: &Block, payload: &[u8]) -> Result<(), BackupError> {
        let env = block.encode();
        self.put(&(env.len() as u32).to_le_bytes())?;
        self.put(&env)?;
        self.put(payload)?;
        self.blocks += 1;
        self.payload_bytes += payload.len() as u64;
        Ok(())
    }

    /// Trailer, fsync, rename into place, fsync the directory.
    fn finish(mut self) -> Result<Summary, BackupError> {
        self.put(&0u32.to_le_bytes())?;
        self.put(TRAILER_MAGIC)?;
        self.put(&self.blocks.to_le_bytes())?;
        self.put(&self.payload_bytes.to_le_bytes())?;
        let digest = self.sha.finalize_reset();
        let what = format!("writing {}", self.tmp.display());
        self.w.write_all(&digest).map_err(io_err(what.clone()))?;
        let file = self
            .w
            .into_inner()
            .map_err(|e| io_err(what.clone())(e.into_error()))?;
        file.sync_all().map_err(io_err(what))?;
        drop(file);
        let out = self.out.clone();
        self.tmp
            .persist(&out)
            .map_err(|e| io_err(format!("renaming the archive to {}", out.display()))(e.error))?;
        let dir = out_dir(&out);
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(format!("syncing {}", dir.display())))?;
        Ok(Summary {
            blocks: self.blocks,
            payload_bytes: self.payload_bytes,
            archive_bytes: self.written + 32,
        })
    }
}

/// Validate each block against the ones before it and write it. The
/// archive appears at `out` only if every block made it.
fn write_archive(
    out: &Path,
    blocks: impl Iterator<Item = Result<(Block, Vec<u8>), BackupError>>,
) -> Result<Summary, BackupError> {
    let mut w = ArchiveWriter::create(out)?;
    let mut dag = Dag::new();
    for item in blocks {
        let (block, payload) = item?;
        let v =
            validate_block(&block, &payload, &dag).map_err(|error| BackupError::SourceInvalid {
                hash: block.hash,
                name: block.header.name.clone(),
                error: Box::new(error),
            })?;
        dag.insert(&v);
        w.record(&block, &payload)?;
    }
    w.finish()
}

/// Back up a store (embedded or PostgreSQL) to `out`: every block in the
/// store's acceptance order ([`RelayStore::list_after`]).
pub fn backup_store(store: &dyn RelayStore, out: &Path) -> Result<Summary, BackupError> {
    let list = store.list_after(None)?;
    let blocks = list.into_iter().map(|(_, b)| {
        let payload = store.payload(&b.hash).map_err(|error| BackupError::Store {
            hash: b.hash,
            error,
        })?;
        Ok((b, payload))
    });
    write_archive(out, blocks)
}

// ---------------------------------------------------------------- --relay

/// A serving relay's REST API.
struct RelayClient {
    base: String,
    agent: ureq::Agent,
}

impl RelayClient {
    fn new(url: &str) -> Self {
        let url = url.trim().trim_end_matches('/');
        let base = if url.contains("://") {
            url.to_string()
        } else {
            format!("http://{url}")
        };
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(10))
            .timeout_read(Duration::from_secs(120))
            .build();
        Self { base, agent }
    }

    /// GET `path`, at most `max` bytes of body.
    fn get(&self, path: &str, max: u64) -> Result<Vec<u8>, BackupError> {
        let url = format!("{}{path}", self.base);
        let fail = |message: String| BackupError::Http {
            url: url.clone(),
            message,
        };
        let resp = match self.agent.get(&url).call() {
            Ok(r) => r,
            Err(ureq::Error::Status(code, r)) => {
                let body = r.into_string().unwrap_or_default();
                let msg = serde_json::from_str::<ApiError>(&body)
                    .map(|e| format!("{} ({})", e.message, e.code))
                    .unwrap_or(body);
                return Err(fail(format!("HTTP {code}: {msg}")));
            }
            Err(e) => return Err(fail(e.to_string())),
        };
        let mut body = Vec::new();
        resp.into_reader()
            .take(max.saturating_add(1))
            .read_to_end(&mut body)
            .map_err(|e| fail(format!("reading the response: {e}")))?;
        if body.len() as u64 > max {
            return Err(fail(format!("the response is larger than {max} bytes")));
        }
        Ok(body)
    }

    /// Every block of a chain, page by page.
    fn list(&self, chain: &str, page: u16) -> Result<Vec<BlockInfo>, BackupError> {
        let page = usize::from(page.clamp(1, MAX_PAGE));
        let mut out: Vec<BlockInfo> = Vec::new();
        loop {
            let path = match out.last() {
                None => format!("/chain/{chain}/blocks?limit={page}"),
                Some(last) => format!("/chain/{chain}/blocks?after={}&limit={page}", last.hash),
            };
            let body = self.get(&path, 64 << 20)?;
            let infos: Vec<BlockInfo> =
                serde_json::from_slice(&body).map_err(|e| BackupError::Http {
                    url: format!("{}{path}", self.base),
                    message: format!("not a block listing: {e}"),
                })?;
            if infos.len() > page {
                return Err(BackupError::Listing(format!(
                    "chain {chain}: {} blocks in a page of {page}",
                    infos.len()
                )));
            }
            let n = infos.len();
            out.extend(infos);
            if n < page {
                return Ok(out);
            }
        }
    }

    /// One block (its envelope, checked against the listed hash) and its
    /// payload (checked against the header's length and chunk root).
    fn fetch(&self, info: &BlockInfo) -> Result<(Block, Vec<u8>), BackupError> {
        let h = info.hash;
        let env = self.get(&format!("/blocks/{h}?format=bin"), MAX_ENVELOPE)?;
        let invalid = |error: ChainError| BackupError::SourceInvalid {
            hash: h,
            name: info.name.clone(),
            error: Box::new(error),
        };
        let block = Block::decode(&env).map_err(invalid)?;
        block.check_hash(&h).map_err(invalid)?;
        block.verify_signature().map_err(invalid)?;
        let payload = self.get(&format!("/blocks/{h}/payload"), block.header.payload_len)?;
        check_payload_integrity(&block.header, &payload).map_err(invalid)?;
        Ok((block, payload))
    }
}

/// One order for both chains' listings: each chain's order kept, every block
/// after its meta block and its parents (a meta block before its B blocks).
fn merge_listings(a: Vec<BlockInfo>, b: Vec<BlockInfo>) -> Result<Vec<BlockInfo>, BackupError> {
    let mut done: HashSet<BlockHash> = HashSet::new();
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut a, mut b) = (a.into_iter().peekable(), b.into_iter().peekable());
    let ready = |i: &BlockInfo, done: &HashSet<BlockHash>| {
        i.meta
            .iter()
            .chain(i.parents.iter())
            .all(|d| done.contains(d))
    };
    loop {
        let next = match (a.peek(), b.peek()) {
            (None, None) => return Ok(out),
            (Some(x), _) if ready(x, &done) => a.next(),
            (_, Some(y)) if ready(y, &done) => b.next(),
            (x, y) => {
                let stuck = x.or(y).map(|i| {
                    let missing = i
                        .meta
                        .iter()
                        .chain(i.parents.iter())
                        .find(|d| !done.contains(*d))
                        .map(|d| d.to_hex())
                        .unwrap_or_default();
                    format!(
                        "block {} ({}) depends on {missing}, which the relay did not list before it",
                        i.hash, i.name
                    )
                });
                return Err(BackupError::Listing(stuck.unwrap_or_default()));
            }
        };
        if let Some(i) = next {
            if !done.insert(i.hash) {
                return Err(BackupError::Listing(format!(
                    "block {} is listed twice",
                    i.hash
                )));
            }
            out.push(i);
        }
    }
}

/// Back up a serving relay over its REST API (see the module docs).
pub fn backup_relay(url: &str, page: u16, out: &Path) -> Result<Summary, BackupError> {
    let client = RelayClient::new(url);
    // B first: every meta block a listed B block links to was accepted
    // before it, so the later A listing holds it.
    let b = client.list("B", page)?;
    let a = client.list("A", page)?;
    let order = merge_listings(a, b)?;
    let client = &client;
    write_archive(out, order.iter().map(|i| client.fetch(i)))
}

// ---------------------------------------------------------------- reading

/// Reads an archive, hashing what it reads.
struct ArchiveReader {
    r: BufReader<File>,
    sha: Sha256,
    pos: u64,
    len: u64,
}

/// Why the first pass stopped.
enum Fail {
    NotArchive(String),
    Version(u32),
    /// Structure, truncation, checksum: the bytes are not what was written.
    Format(String),
    Block {
        index: u64,
        hash: BlockHash,
        error: Box<ChainError>,
    },
    Io(Box<BackupError>),
}

impl ArchiveReader {
    fn open(path: &Path) -> Result<Self, BackupError> {
        let f = File::open(path).map_err(io_err(format!("opening {}", path.display())))?;
        let len = f
            .metadata()
            .map_err(io_err(format!("reading {}", path.display())))?
            .len();
        Ok(Self {
            r: BufReader::with_capacity(IO_BUF, f),
            sha: Sha256::new(),
            pos: 0,
            len,
        })
    }

    fn left(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    /// Exactly `n` bytes (checked against what is left first: a damaged
    /// length never allocates past the file's size).
    fn take(&mut self, n: u64, what: &str) -> Result<Vec<u8>, Fail> {
        if n > self.left() {
            return Err(Fail::Format(format!(
                "{what} of {n} bytes at offset {} runs past the end of the file ({} bytes)",
                self.pos, self.len
            )));
        }
        let mut buf = vec![0u8; n as usize];
        self.r.read_exact(&mut buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Fail::Format(format!("{what} at offset {} is cut short", self.pos))
            } else {
                Fail::Io(Box::new(BackupError::Io {
                    what: "reading the archive".into(),
                    error: e,
                }))
            }
        })?;
        self.sha.update(&buf);
        self.pos += n;
        Ok(buf)
    }

    fn u32(&mut self, what: &str) -> Result<u32, Fail> {
        let b = self.take(4, what)?;
        let mut a = [0u8; 4];
        a.copy_from_slice(&b);
        Ok(u32::from_le_bytes(a))
    }

    fn u64(&mut self, what: &str) -> Result<u64, Fail> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(&b);
        Ok(u64::from_le_bytes(a))
    }

    fn header(&mut self) -> Result<(), Fail> {
        let magic = self
            .take(8, "header")
            .map_err(|_| Fail::NotArchive("shorter than the archive header".into()))?;
        if magic != MAGIC {
            return Err(Fail::NotArchive(
                "bad magic (not written by relay backup, or damaged)".into(),
            ));
        }
        let version = self.u32("header")?;
        if version != FORMAT_VERSION {
            return Err(Fail::Version(version));
        }
        let flags = self.u32("header")?;
        if flags != 0 {
            return Err(Fail::Format(format!("unknown header flags {flags:#x}")));
        }
        Ok(())
    }

    /// The next record's block and payload, or None at the end marker.
    fn record(&mut self, index: u64) -> Result<Option<(Block, Vec<u8>)>, Fail> {
        let n = self.u32("record length")?;
        if n == 0 {
            return Ok(None);
        }
        if u64::from(n) > MAX_ENVELOPE {
            return Err(Fail::Format(format!(
                "record #{index}: envelope length {n} is out of range"
            )));
        }
        let env = self.take(u64::from(n), "envelope")?;
        let block = Block::decode(&env).map_err(|e| {
            Fail::Format(format!(
                "record #{index}: the envelope does not decode: {e}"
            ))
        })?;
        // The trailer must still fit after the payload.
        let room = self.left().saturating_sub(TRAILER_LEN);
        if block.header.payload_len > room {
            return Err(Fail::Format(format!(
                "record #{index} ({}): a payload of {} bytes does not fit in the {} bytes left",
                block.hash,
                block.header.payload_len,
                self.left()
            )));
        }
        let payload = self.take(block.header.payload_len, "payload")?;
        Ok(Some((block, payload)))
    }
}

/// Is the SHA-256 of everything but the last 32 bytes the last 32 bytes?
fn checksum_matches(path: &Path) -> Result<bool, BackupError> {
    let what = || format!("reading {}", path.display());
    let mut f = File::open(path).map_err(io_err(what()))?;
    let len = f.metadata().map_err(io_err(what()))?.len();
    if len < HEADER_LEN + TRAILER_LEN {
        return Ok(false);
    }
    let mut sha = Sha256::new();
    let mut left = len - 32;
    let mut buf = vec![0u8; IO_BUF];
    while left > 0 {
        let n = (IO_BUF as u64).min(left) as usize;
        f.read_exact(&mut buf[..n]).map_err(io_err(what()))?;
        sha.update(&buf[..n]);
        left -= n as u64;
    }
    let mut stored = [0u8; 32];
    f.read_exact(&mut stored).map_err(io_err(what()))?;
    Ok(sha.finalize().as_slice() == stored)
}

fn walk(r: &mut ArchiveReader) -> Result<Verified, Fail> {
    r.header()?;
    let mut dag = Dag::new();
    let mut out = Verified::default();
    let mut index = 0u64;
    while let Some((block, payload)) = r.record(index)? {
        let v = validate_block(&block, &payload, &dag).map_err(|error| Fail::Block {
            index,
            hash: block.hash,
            error: Box::new(error),
        })?;
        dag.insert(&v);
        out.hashes.push(block.hash);
        out.payload_bytes += payload.len() as u64;
        index += 1;
    }
    let magic = r.take(8, "trailer")?;
    if magic != TRAILER_MAGIC {
        return Err(Fail::Format("bad trailer magic".into()));
    }
    let count = r.u64("trailer")?;
    let bytes = r.u64("trailer")?;
    let digest = r.sha.finalize_reset();
    let mut stored = [0u8; 32];
    r.r.read_exact(&mut stored)
        .map_err(|_| Fail::Format("the trailer is cut short".into()))?;
    r.pos += 32;
    if digest.as_slice() != stored {
        return Err(Fail::Format("SHA-256 checksum mismatch".into()));
    }
    if r.pos != r.len {
        return Err(Fail::Format(format!(
            "{} bytes after the trailer",
            r.len.saturating_sub(r.pos)
        )));
    }
    if count != index || bytes != out.payload_bytes {
        return Err(Fail::Format(format!(
            "the trailer counts {count} blocks and {bytes} payload bytes, the archive holds {index} and {}",
            out.payload_bytes
        )));
    }
    out.archive_bytes = r.len;
    Ok(out)
}

/// Read and check a whole archive without writing anything: header,
/// every block validated in order against an in-memory DAG, trailer count
/// and SHA-256 (the first pass of restore).
pub fn verify_archive(path: &Path) -> Result<Verified, BackupError> {
    let mut r = ArchiveReader::open(path)?;
    let fail = match walk(&mut r) {
        Ok(v) => return Ok(v),
        Err(f) => f,
    };
    let path = path.to_path_buf();
    Err(match fail {
        Fail::Io(e) => *e,
        Fail::NotArchive(detail) => BackupError::NotArchive { path, detail },
        // A bad version, structure or block in an archive whose checksum
        // holds was written that way; otherwise the bytes changed.
        Fail::Version(version) if checksum_matches(&path)? => {
            BackupError::UnsupportedVersion { path, version }
        }
        Fail::Block { index, hash, error } if checksum_matches(&path)? => {
            BackupError::InvalidBlock {
                path,
                index,
                hash,
                error,
            }
        }
        Fail::Format(detail) if checksum_matches(&path)? => BackupError::NotArchive {
            path,
            detail: format!("malformed although its checksum matches: {detail}"),
        },
        Fail::Version(version) => BackupError::Damaged {
            path,
            detail: format!("format version {version} and a checksum mismatch"),
        },
        Fail::Block { index, hash, error } => BackupError::Damaged {
            path,
            detail: format!("checksum mismatch; block #{index} ({hash}): {error}"),
        },
        Fail::Format(detail) => BackupError::Damaged {
            path,
            detail: if detail.contains("checksum") {
                detail
            } else {
                format!("{detail}; checksum mismatch")
            },
        },
    })
}

/// Refuse a store that holds any block.
fn ensure_empty(store: &dyn RelayStore) -> Result<(), BackupError> {
    let n = store.list_after(None)?.len();
    if n > 0 {
        return Err(BackupError::NotEmpty(format!("it holds {n} blocks")));
    }
    Ok(())
}

/// Restore an archive into an empty store: check everything, then write
/// (see the module docs).
pub fn restore_into(store: &dyn RelayStore, from: &Path) -> Result<Summary, BackupError> {
    ensure_empty(store)?;
    let v = verify_archive(from)?;
    let total = v.hashes.len() as u64;
    let partial = |index: u64, hash: Option<BlockHash>, error: String| BackupError::Partial {
        index,
        total,
        hash,
        error,
    };
    let mut r = ArchiveReader::open(from)?;
    r.header()
        .map_err(|_| partial(0, None, "the archive changed after it was checked".into()))?;
    for (i, want) in v.hashes.iter().enumerate() {
        let index = i as u64;
        let changed = || {
            partial(
                index,
                Some(*want),
                "the archive changed after it was checked".into(),
            )
        };
        let (block, payload) = match r.record(index) {
            Ok(Some(x)) => x,
            Ok(None) | Err(_) => return Err(changed()),
        };
        if block.hash != *want || check_payload_integrity(&block.header, &payload).is_err() {
            return Err(changed());
        }
        match put_checked(store, &block, &payload, Expect::Any) {
            Ok(Committed::Done) => {}
            Ok(Committed::HeadMoved(_)) => {
                return Err(partial(
                    index,
                    Some(*want),
                    "another writer moved the slot's head".into(),
                ))
            }
            Err(e) => return Err(partial(index, Some(*want), e.to_string())),
        }
    }
    Ok(Summary {
        blocks: total,
        payload_bytes: v.payload_bytes,
        archive_bytes: v.archive_bytes,
    })
}

// ---------------------------------------------------------------- stores

/// Is this redb file locked by a relay (in this or another process)?
fn locked(index: &Path) -> Result<bool, BackupError> {
    match redb::Database::open(index) {
        Ok(db) => {
            drop(db);
            Ok(false)
        }
        Err(redb::DatabaseError::DatabaseAlreadyOpen) => Ok(true),
        Err(e) => Err(BackupError::StoreOpen(StoreError::Io(format!(
            "{}: {e}",
            index.display()
        )))),
    }
}

/// The embedded store of a stopped relay, to read.
fn open_data_source(dir: &Path) -> Result<FileStore, BackupError> {
    if !dir.join("index.redb").is_file() {
        return Err(BackupError::NoStore(dir.to_path_buf()));
    }
    // As the store resolves it (FileStore::open): one canonical form.
    let dir = crate::store::resolve_data_dir(dir)?;
    let dir = dir.as_path();
    let index = dir.join("index.redb");
    // Before FileStore::open, which would clear a running relay's uploads in flight.
    if locked(&index)? {
        return Err(BackupError::RelayRunning(dir.to_path_buf()));
    }
    match FileStore::open(dir) {
        Ok((s, _)) => Ok(s),
        Err(_) if locked(&index)? => Err(BackupError::RelayRunning(dir.to_path_buf())),
        Err(e) => Err(e.into()),
    }
}

/// An embedded store to restore into (created if missing), empty.
fn open_data_target(dir: &Path) -> Result<FileStore, BackupError> {
    let dir = crate::store::resolve_data_dir(dir)?;
    let dir = dir.as_path();
    let index = dir.join("index.redb");
    if index.is_file() && locked(&index)? {
        return Err(BackupError::TargetInUse(dir.to_path_buf()));
    }
    let (s, report) = match FileStore::open(dir) {
        Ok(x) => x,
        Err(_) if index.is_file() && locked(&index)? => {
            return Err(BackupError::TargetInUse(dir.to_path_buf()))
        }
        Err(e) => return Err(e.into()),
    };
    if !report.orphans.is_empty() {
        return Err(BackupError::NotEmpty(format!(
            "{} holds {} block files",
            dir.join("blocks").display(),
            report.orphans.len()
        )));
    }
    Ok(s)
}

/// A PostgreSQL store with a staging dir of its own (never a relay's: the
/// store empties it on open). The staging dir lives as long as the store.
fn open_pg(url: &str, blobs: Option<&str>) -> Result<(PgStore, tempfile::TempDir), BackupError> {
    let pg: Arc<Pg> = Pg::connect(url)?;
    let objects = blobs.map(crate::store::pg::open_blobs).transpose()?;
    let staging = tempfile::Builder::new()
        .prefix("aiblock-backup-")
        .tempdir()
        .map_err(io_err("creating a staging directory"))?;
    let (s, _) = PgStore::open_with_blobs(pg, staging.path(), objects)?;
    Ok((s, staging))
}

fn mb(b: u64) -> f64 {
    b as f64 / 1e6
}

/// `relay backup`: prints one summary line.
pub fn run_backup(a: &BackupArgs) -> anyhow::Result<()> {
    let t = Instant::now();
    let s = match (&a.data, &a.database, &a.relay) {
        (Some(dir), None, None) => backup_store(&open_data_source(dir)?, &a.out)?,
        (None, Some(url), None) => {
            let (store, _staging) = open_pg(url, a.blobs.as_deref())?;
            backup_store(&store, &a.out)?
        }
        (None, None, Some(url)) => backup_relay(url, a.page, &a.out)?,
        _ => anyhow::bail!("give exactly one of --data, --database, --relay"),
    };
    println!(
        "backed up {} blocks ({:.1} MB of payloads) to {} ({:.1} MB) in {:.1} s",
        s.blocks,
        mb(s.payload_bytes),
        a.out.display(),
        mb(s.archive_bytes),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `relay restore`: prints one summary line.
pub fn run_restore(a: &RestoreArgs) -> anyhow::Result<()> {
    let t = Instant::now();
    let (s, place) = match (&a.data, &a.database) {
        (Some(dir), None) => (
            restore_into(&open_data_target(dir)?, &a.from)?,
            dir.display().to_string(),
        ),
        (None, Some(url)) => {
            let (store, _staging) = open_pg(url, a.blobs.as_deref())?;
            (restore_into(&store, &a.from)?, crate::pg::redact(url))
        }
        _ => anyhow::bail!("give exactly one of --data, --database"),
    };
    println!(
        "restored {} blocks ({:.1} MB of payloads) from {} into {place} in {:.1} s",
        s.blocks,
        mb(s.payload_bytes),
        a.from.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
