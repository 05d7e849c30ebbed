//! The relay's stores behind one trait, [`RelayStore`]:
//!
//! * [`FileStore`] (embedded, the default): block files and a redb index in
//!   the data dir. See [`file`].
//! * [`PgStore`] (`relay serve --database postgres://...`): the same in
//!   PostgreSQL, shared by several relays. See [`pg`].
//!
//! Everything the relay does to blocks goes through [`RelayStore`], on top
//! of web-node's [`BlockStore`]: uploads are made durable first with no lock
//! held ([`RelayStore::place_staged`]) and indexed second
//! ([`RelayStore::commit`]), where the store itself settles the race for a
//! slot's head, so that two relays on one database accept one version of a
//! slot and refuse the other.
//!
//! Layer: foundation. May import: the foundation's base (`metrics`, `pg`, `auth`, `limits`, `gate`, `compute`, `genesis`).

pub mod file;
pub mod pg;

use std::path::{Path, PathBuf};

use web_node::chain::{Block, BlockHash};
pub use web_node::store::{BlockStore, StoreError};

pub use file::{FileStore, OpenReport, ScrubReport};
pub use pg::PgStore;

/// A data directory as the relay uses it: created if missing, then made
/// absolute and canonical (`.`/`..` removed, symlinks resolved, trailing
/// slash gone), once, when a store or command opens it. Every path under it
/// (staging files, block files, keys) is then compared and joined in one
/// form, whatever form `--data` was given in.
pub fn resolve_data_dir(dir: &Path) -> Result<PathBuf, StoreError> {
    let io = |what: &str, e: std::io::Error| {
        StoreError::Io(format!("data directory {}: {what}: {e}", dir.display()))
    };
    if dir.as_os_str().is_empty() {
        return Err(StoreError::Io("data directory: empty path".into()));
    }
    std::fs::create_dir_all(dir).map_err(|e| io("cannot create it", e))?;
    let abs = std::fs::canonicalize(dir).map_err(|e| io("cannot resolve it", e))?;
    if !abs.is_dir() {
        return Err(StoreError::Io(format!(
            "data directory {} is not a directory",
            dir.display()
        )));
    }
    Ok(abs)
}

/// What [`RelayStore::commit`] requires of the slot's head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Nothing: the block becomes its slot's head (genesis, adoption).
    Any,
    /// The slot's head must still be this one (None: the slot is new).
    Head(Option<BlockHash>),
}

/// The outcome of [`RelayStore::commit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// Indexed: the block is its slot's head.
    Done,
    /// Not indexed: the head is no longer the expected one (it is this now).
    HeadMoved(Option<BlockHash>),
}

/// A block store the relay can serve and accept uploads with. See the module docs.
pub trait RelayStore: BlockStore {
    /// `embedded` or `postgres`, for logs and `/p2p/stats`.
    fn kind(&self) -> &'static str;

    /// Where uploads are staged as files (`envelope || payload`) while they arrive.
    fn staging_dir(&self) -> PathBuf;

    /// Make a staged upload's payload durable without indexing it; the
    /// staged file is consumed. Then [`RelayStore::commit`] or [`RelayStore::discard`].
    fn place_staged(&self, block: &Block, staged: &Path) -> Result<(), StoreError>;

    /// Index a placed block with its chunk list, in one transaction, if the
    /// slot's head is what `expect` says; it becomes the head.
    /// [`StoreError::Duplicate`] if the block is already indexed.
    fn commit(
        &self,
        block: &Block,
        chunks: &[BlockHash],
        expect: Expect,
    ) -> Result<Committed, StoreError>;

    /// Remove a placed payload that was not committed (a committed one is left alone).
    fn discard(&self, hash: &BlockHash) -> Result<(), StoreError>;

    /// The payload's chunk-hash list ([`StoreError::Corrupt`] if quarantined).
    fn chunk_list(&self, hash: &BlockHash) -> Result<Vec<BlockHash>, StoreError>;

    /// Why a payload is quarantined (None: it is served).
    fn quarantined(&self, hash: &BlockHash) -> Result<Option<String>, StoreError>;

    /// Stop serving a payload and record why (the first reason stays). The
    /// block's header stays in the chain.
    fn quarantine_payload(&self, hash: &BlockHash, reason: &str) -> Result<(), StoreError>;

    /// Every quarantined payload (no longer served) and why.
    fn quarantined_all(&self) -> Result<Vec<(BlockHash, String)>, StoreError>;

    /// Re-hash every stored payload; quarantine those that do not match.
    fn scrub(&self) -> Result<ScrubReport, StoreError>;

    /// Blocks indexed after position `after` (all for None) in acceptance
    /// order, each with its position: how a relay catches up with blocks
    /// other relays accepted.
    fn list_after(&self, after: Option<u64>) -> Result<Vec<(u64, Block)>, StoreError>;
}

/// Index a block whose payload is in memory: place, then commit.
pub fn put_checked(
    store: &dyn RelayStore,
    block: &Block,
    payload: &[u8],
    expect: Expect,
) -> Result<Committed, StoreError> {
    if payload.len() as u64 != block.header.payload_len {
        return Err(StoreError::Corrupt(format!(
            "payload of {} bytes for a header of {}",
            payload.len(),
            block.header.payload_len
        )));
    }
    if store.contains(&block.hash)? {
        return Err(StoreError::Duplicate(block.hash));
    }
    let dir = store.staging_dir();
    std::fs::create_dir_all(&dir).map_err(|e| StoreError::Io(e.to_string()))?;
    let mut f = tempfile::Builder::new()
        .prefix("put-")
        .tempfile_in(&dir)
        .map_err(|e| StoreError::Io(e.to_string()))?;
    {
        use std::io::Write as _;
        f.write_all(&block.encode())
            .and_then(|_| f.write_all(payload))
            .map_err(|e| StoreError::Io(e.to_string()))?;
    }
    let path = f.into_temp_path();
    store.place_staged(block, &path)?;
    // Consumed by place_staged.
    let _ = path.keep();
    let chunks = web_node::chain::chunk_hashes(payload, block.header.chunk_size);
    match store.commit(block, &chunks, expect) {
        Ok(c) => {
            if c != Committed::Done {
                let _ = store.discard(&block.hash);
            }
            Ok(c)
        }
        Err(e) => {
            if !matches!(e, StoreError::Duplicate(_)) {
                let _ = store.discard(&block.hash);
            }
            Err(e)
        }
    }
}
