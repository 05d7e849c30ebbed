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
//!
//! [`validate_block`]: web_node::chain::validate_block
//! [`Dag`]: web_node::chain::Dag
//! [`put_checked`]: crate::store::put_checked
//!
//! Layer: foundation. May import: the foundation's base (`metrics`, `pg`, `auth`, `limits`, `gate`, `compute`, `genesis`)
//! and, without a cycle, `store` and `usage`.

mod archive;
mod restore;
mod source;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use clap::ArgGroup;
use web_node::chain::{limits, BlockHash, ChainError};
use web_node::store::StoreError;

use crate::pg::{Pg, PgError};
use crate::store::{FileStore, PgStore, RelayStore};

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

pub use archive::verify_archive;
pub use restore::restore_into;
pub use source::backup_relay;

use archive::write_archive;

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
