//! Embedded block store: content-addressed files plus a redb index.
//!
//! Layout under the data dir:
//! * `blocks/ab/<hash>`: envelope ([`Block::encode`]) followed by the payload.
//!   Written to a `.tmp*` file in the same directory, fsynced, renamed into
//!   place, then the directory is fsynced.
//! * `index.redb`: `order` (sequence -> hash), `blocks` (hash -> envelope),
//!   `heads` (`"<meta hex or ->/<name>"` -> hash), `chunks` (hash -> the
//!   payload's chunk-hash list, stored at acceptance), `quarantine` (hash ->
//!   why its payload is no longer served). Updated in one transaction after
//!   the file is durable, so a crash leaves at worst an unindexed file.
//! * `tmp/`: staging for uploads in flight; emptied on open.
//! * `quarantine/`: files that failed checks (kept for inspection).
//!
//! Every payload read is checked: whole chunks are read and hashed against
//! the stored chunk list, so a file corrupted on disk is never served; the
//! first failed check moves the file to `quarantine/` and records why
//! ([`FileStore::quarantined`]); the block's header stays in the chain.
//! [`FileStore::scrub`] re-hashes every payload (`relay check`, and a
//! background pass when `relay serve` starts).
//!
//! [`FileStore::open`] repairs: removes temp files, drops index entries whose
//! file is missing or does not match (and their descendants), and reports
//! files without an index entry ([`OpenReport::orphans`]) for the caller to
//! validate and adopt with [`BlockStore::put`] or [`FileStore::quarantine`].
//!
//! Uploads are stored in two steps so that the relay holds no lock while
//! disks sync: [`FileStore::place_staged`] / [`FileStore::place_bytes`] make
//! the block file durable, then [`FileStore::commit`] indexes it (one redb
//! transaction) or [`FileStore::discard`] removes it.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use redb::{Database, ReadableTable, TableDefinition};
use web_node::chain::{Block, BlockHash, ChunkHasher};
use web_node::net::api::SlotHead;
use web_node::store::{check_range, BlockStore, StoreError};

use super::{Committed, Expect, RelayStore};

const ORDER: TableDefinition<u64, &[u8]> = TableDefinition::new("order");
const BLOCKS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("blocks");
const HEADS: TableDefinition<&str, &[u8]> = TableDefinition::new("heads");
const CHUNKS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("chunks");
const QUARANTINE: TableDefinition<&[u8], &str> = TableDefinition::new("quarantine");

fn io<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Io(e.to_string())
}

fn head_key(meta: Option<&BlockHash>, name: &str) -> String {
    match meta {
        Some(m) => format!("{}/{name}", m.to_hex()),
        None => format!("-/{name}"),
    }
}

fn parse_head_key(k: &str) -> Option<(Option<BlockHash>, String)> {
    let (m, name) = k.split_once('/')?;
    let meta = if m == "-" {
        None
    } else {
        Some(BlockHash::from_hex(m).ok()?)
    };
    Some((meta, name.to_string()))
}

fn hash_of_slice(v: &[u8]) -> Option<BlockHash> {
    let a: [u8; 32] = v.try_into().ok()?;
    Some(BlockHash(a))
}

/// fsync a directory so a rename inside it is durable.
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io)
}

/// What [`FileStore::open`] found and repaired.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct OpenReport {
    /// Temp files (interrupted writes and uploads) removed.
    pub removed_temp: usize,
    /// Index entries dropped (file missing or not matching, or an ancestor dropped).
    pub dropped: Vec<BlockHash>,
    /// Block files without an index entry: validate, then `put` or `quarantine`.
    pub orphans: Vec<BlockHash>,
}

/// The embedded [`BlockStore`]. See the module docs.
pub struct FileStore {
    root: PathBuf,
    db: Database,
}

impl FileStore {
    /// Open (creating if needed) the store in `root` and repair it. `root`
    /// is resolved once here ([`super::resolve_data_dir`]): relative,
    /// `./x/../x`, symlinked and trailing-slash forms all name one store.
    pub fn open(root: &Path) -> Result<(Self, OpenReport), StoreError> {
        let root = super::resolve_data_dir(root)?;
        let root = root.as_path();
        let blocks = root.join("blocks");
        let tmp = root.join("tmp");
        fs::create_dir_all(&blocks).map_err(io)?;
        fs::create_dir_all(&tmp).map_err(io)?;
        let mut report = OpenReport::default();
        // Interrupted uploads.
        for e in fs::read_dir(&tmp).map_err(io)? {
            let p = e.map_err(io)?.path();
            if p.is_file() {
                fs::remove_file(&p).map_err(io)?;
                report.removed_temp += 1;
            }
        }
        // Interrupted block writes, and the block files on disk.
        let mut on_disk = HashSet::new();
        for sub in fs::read_dir(&blocks).map_err(io)? {
            let sub = sub.map_err(io)?.path();
            if !sub.is_dir() {
                continue;
            }
            for e in fs::read_dir(&sub).map_err(io)? {
                let p = e.map_err(io)?.path();
                let name = p
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default()
                    .to_string();
                if name.starts_with(".tmp") {
                    fs::remove_file(&p).map_err(io)?;
                    report.removed_temp += 1;
                } else if let Ok(h) = BlockHash::from_hex(&name) {
                    on_disk.insert(h);
                }
            }
        }
        let db = Database::create(root.join("index.redb")).map_err(io)?;
        {
            let w = db.begin_write().map_err(io)?;
            w.open_table(ORDER).map_err(io)?;
            w.open_table(BLOCKS).map_err(io)?;
            w.open_table(HEADS).map_err(io)?;
            w.open_table(CHUNKS).map_err(io)?;
            w.open_table(QUARANTINE).map_err(io)?;
            w.commit().map_err(io)?;
        }
        let store = Self {
            root: root.to_path_buf(),
            db,
        };
        store.check_index(&on_disk, &mut report)?;
        Ok((store, report))
    }

    /// Drop index entries whose file is missing or does not match, and any
    /// block whose meta or parents were dropped; fix heads; find orphans.
    fn check_index(
        &self,
        on_disk: &HashSet<BlockHash>,
        report: &mut OpenReport,
    ) -> Result<(), StoreError> {
        let mut kept: HashSet<BlockHash> = HashSet::new();
        let mut drop_seq: Vec<(u64, BlockHash)> = Vec::new();
        let mut last_of_slot: BTreeMap<String, BlockHash> = BTreeMap::new();
        {
            let r = self.db.begin_read().map_err(io)?;
            let order = r.open_table(ORDER).map_err(io)?;
            let blocks = r.open_table(BLOCKS).map_err(io)?;
            let quarantined = r.open_table(QUARANTINE).map_err(io)?;
            for row in order.iter().map_err(io)? {
                let (seq, h) = row.map_err(io)?;
                let seq = seq.value();
                let Some(hash) = hash_of_slice(h.value()) else {
                    drop_seq.push((seq, BlockHash::default()));
                    continue;
                };
                let ok = match blocks.get(hash.0.as_slice()).map_err(io)? {
                    Some(env) => {
                        let env = env.value().to_vec();
                        match Block::decode(&env) {
                            Ok(b) => {
                                // A quarantined payload's file is gone on purpose; the
                                // header stays in the chain.
                                let file_ok = self.file_matches(&hash, &env, b.header.payload_len)
                                    || quarantined.get(hash.0.as_slice()).map_err(io)?.is_some();
                                let good = b.hash == hash
                                    && file_ok
                                    && b.header.meta.is_none_or(|m| kept.contains(&m))
                                    && b.header.parents.iter().all(|p| kept.contains(p));
                                if good {
                                    let k = head_key(b.header.meta.as_ref(), &b.header.name);
                                    last_of_slot.insert(k, hash);
                                }
                                good
                            }
                            Err(_) => false,
                        }
                    }
                    None => false,
                };
                if ok {
                    kept.insert(hash);
                } else {
                    tracing::warn!(block = %hash, "dropping index entry: block file missing or not matching");
                    drop_seq.push((seq, hash));
                }
            }
        }
        // Fix heads: keep a stored head if kept, else the slot's last kept block.
        let heads = self.fixed_heads(&kept, &last_of_slot)?;
        self.rewrite_index(&drop_seq, &kept, &heads)?;
        report.dropped = drop_seq.into_iter().map(|(_, h)| h).collect();
        let mut orphans: Vec<BlockHash> = on_disk
            .iter()
            .filter(|h| !kept.contains(h))
            .copied()
            .collect();
        orphans.sort();
        report.orphans = orphans;
        Ok(())
    }

    /// The heads after the check: each stored head that was kept, else the
    /// slot's last kept block.
    fn fixed_heads(
        &self,
        kept: &HashSet<BlockHash>,
        last_of_slot: &BTreeMap<String, BlockHash>,
    ) -> Result<BTreeMap<String, BlockHash>, StoreError> {
        let mut heads: BTreeMap<String, BlockHash> = BTreeMap::new();
        {
            let r = self.db.begin_read().map_err(io)?;
            let t = r.open_table(HEADS).map_err(io)?;
            for row in t.iter().map_err(io)? {
                let (k, v) = row.map_err(io)?;
                if let Some(h) = hash_of_slice(v.value()) {
                    if kept.contains(&h) {
                        heads.insert(k.value().to_string(), h);
                    }
                }
            }
        }
        for (k, h) in last_of_slot {
            heads.entry(k.clone()).or_insert(*h);
        }
        Ok(heads)
    }

    /// Remove the dropped entries (and their envelopes unless kept) and
    /// replace the heads table with `heads`.
    fn rewrite_index(
        &self,
        drop_seq: &[(u64, BlockHash)],
        kept: &HashSet<BlockHash>,
        heads: &BTreeMap<String, BlockHash>,
    ) -> Result<(), StoreError> {
        let w = self.db.begin_write().map_err(io)?;
        {
            let mut order = w.open_table(ORDER).map_err(io)?;
            let mut blocks = w.open_table(BLOCKS).map_err(io)?;
            for (seq, h) in drop_seq {
                order.remove(*seq).map_err(io)?;
                if !kept.contains(h) {
                    blocks.remove(h.0.as_slice()).map_err(io)?;
                }
            }
            let mut t = w.open_table(HEADS).map_err(io)?;
            let stale: Vec<String> = t
                .iter()
                .map_err(io)?
                .filter_map(|r| r.ok())
                .map(|(k, _)| k.value().to_string())
                .filter(|k| !heads.contains_key(k))
                .collect();
            for k in stale {
                t.remove(k.as_str()).map_err(io)?;
            }
            for (k, h) in heads {
                t.insert(k.as_str(), h.0.as_slice()).map_err(io)?;
            }
        }
        w.commit().map_err(io)?;
        Ok(())
    }

    /// Does the block file hold exactly this envelope and a payload of this length?
    fn file_matches(&self, hash: &BlockHash, env: &[u8], payload_len: u64) -> bool {
        let Ok(mut f) = File::open(self.block_path(hash)) else {
            return false;
        };
        let Ok(meta) = f.metadata() else { return false };
        if meta.len() != env.len() as u64 + payload_len {
            return false;
        }
        let mut head = vec![0u8; env.len()];
        f.read_exact(&mut head).is_ok() && head == env
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Staging directory for uploads in flight (emptied on open).
    pub fn staging_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Path of a block file.
    pub fn block_path(&self, hash: &BlockHash) -> PathBuf {
        let hex = hash.to_hex();
        self.root.join("blocks").join(&hex[..2]).join(hex)
    }

    /// Read an unindexed block file (an orphan found on open).
    pub fn read_orphan(&self, hash: &BlockHash) -> Result<(Block, Vec<u8>), StoreError> {
        let bytes = fs::read(self.block_path(hash)).map_err(io)?;
        let (b, used) =
            Block::decode_prefix(&bytes).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        if b.hash != *hash {
            return Err(StoreError::Corrupt(format!(
                "file {hash} holds block {}",
                b.hash
            )));
        }
        Ok((b, bytes[used..].to_vec()))
    }

    /// Move an unindexed block file to `quarantine/`.
    pub fn quarantine(&self, hash: &BlockHash) -> Result<(), StoreError> {
        let q = self.root.join("quarantine");
        fs::create_dir_all(&q).map_err(io)?;
        fs::rename(self.block_path(hash), q.join(hash.to_hex())).map_err(io)
    }

    fn envelope(&self, hash: &BlockHash) -> Result<Option<Vec<u8>>, StoreError> {
        let r = self.db.begin_read().map_err(io)?;
        let t = r.open_table(BLOCKS).map_err(io)?;
        Ok(t.get(hash.0.as_slice())
            .map_err(io)?
            .map(|v| v.value().to_vec()))
    }

    fn indexed_block(&self, hash: &BlockHash) -> Result<(Block, u64), StoreError> {
        let env = self.envelope(hash)?.ok_or(StoreError::NotFound(*hash))?;
        let b = Block::decode(&env).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        Ok((b, env.len() as u64))
    }

    fn block_dir(&self, hash: &BlockHash) -> Result<PathBuf, StoreError> {
        let path = self.block_path(hash);
        let dir = path
            .parent()
            .ok_or_else(|| StoreError::Io("block path has no parent".into()))?
            .to_path_buf();
        if !dir.exists() {
            fs::create_dir_all(&dir).map_err(io)?;
            sync_dir(&self.root.join("blocks"))?;
        }
        Ok(dir)
    }

    /// Make the block file durable from bytes in memory (temp file, fsync,
    /// rename, fsync dir). Not indexed yet: [`FileStore::commit`] or [`FileStore::discard`].
    pub fn place_bytes(&self, block: &Block, payload: &[u8]) -> Result<(), StoreError> {
        if payload.len() as u64 != block.header.payload_len {
            return Err(StoreError::Corrupt(format!(
                "payload of {} bytes for a header of {}",
                payload.len(),
                block.header.payload_len
            )));
        }
        let dir = self.block_dir(&block.hash)?;
        let mut tmp = tempfile::Builder::new()
            .prefix(".tmp")
            .tempfile_in(&dir)
            .map_err(io)?;
        tmp.write_all(&block.encode()).map_err(io)?;
        tmp.write_all(payload).map_err(io)?;
        tmp.as_file().sync_all().map_err(io)?;
        tmp.persist(self.block_path(&block.hash)).map_err(io)?;
        sync_dir(&dir)
    }

    /// Make the block file durable by moving a staged upload (`envelope ||
    /// payload`, in this store's staging dir) into place: fsync, rename, fsync
    /// dir. Not indexed yet: [`FileStore::commit`] or [`FileStore::discard`].
    pub fn place_staged(&self, block: &Block, staged: &Path) -> Result<(), StoreError> {
        let expected = block.encoded_len() as u64 + block.header.payload_len;
        // The root is canonical (open); so is a staged path made in staging_dir().
        let ok = staged.parent() == Some(self.staging_dir().as_path())
            && fs::metadata(staged).is_ok_and(|m| m.is_file() && m.len() == expected);
        if !ok {
            return Err(StoreError::Io(format!(
                "staged file {} is not {expected} bytes in {}",
                staged.display(),
                self.staging_dir().display()
            )));
        }
        let dir = self.block_dir(&block.hash)?;
        File::open(staged).and_then(|f| f.sync_all()).map_err(io)?;
        fs::rename(staged, self.block_path(&block.hash)).map_err(io)?;
        sync_dir(&dir)
    }

    /// Index a placed block: envelope, order, head and chunk list in one
    /// transaction, if the slot's head is what `expect` says.
    pub fn commit(
        &self,
        block: &Block,
        chunks: &[BlockHash],
        expect: Expect,
    ) -> Result<Committed, StoreError> {
        let w = self.db.begin_write().map_err(io)?;
        {
            let mut blocks = w.open_table(BLOCKS).map_err(io)?;
            if blocks.get(block.hash.0.as_slice()).map_err(io)?.is_some() {
                return Err(StoreError::Duplicate(block.hash));
            }
            let k = head_key(block.header.meta.as_ref(), &block.header.name);
            if let Expect::Head(want) = expect {
                let heads = w.open_table(HEADS).map_err(io)?;
                let now = heads
                    .get(k.as_str())
                    .map_err(io)?
                    .and_then(|v| hash_of_slice(v.value()));
                if now != want {
                    // Dropping the transaction writes nothing.
                    return Ok(Committed::HeadMoved(now));
                }
            }
            blocks
                .insert(block.hash.0.as_slice(), block.encode().as_slice())
                .map_err(io)?;
            let mut order = w.open_table(ORDER).map_err(io)?;
            let next = order
                .last()
                .map_err(io)?
                .map(|(k, _)| k.value() + 1)
                .unwrap_or(0);
            order.insert(next, block.hash.0.as_slice()).map_err(io)?;
            let mut heads = w.open_table(HEADS).map_err(io)?;
            heads
                .insert(k.as_str(), block.hash.0.as_slice())
                .map_err(io)?;
            let mut c = w.open_table(CHUNKS).map_err(io)?;
            c.insert(block.hash.0.as_slice(), chunk_bytes(chunks).as_slice())
                .map_err(io)?;
        }
        w.commit().map_err(io)?;
        Ok(Committed::Done)
    }

    /// Blocks indexed after position `after`, with their positions.
    pub fn list_after(&self, after: Option<u64>) -> Result<Vec<(u64, Block)>, StoreError> {
        let r = self.db.begin_read().map_err(io)?;
        let order = r.open_table(ORDER).map_err(io)?;
        let blocks = r.open_table(BLOCKS).map_err(io)?;
        let from = after.map_or(0, |a| a.saturating_add(1));
        let mut out = Vec::new();
        for row in order.range(from..).map_err(io)? {
            let (k, h) = row.map_err(io)?;
            let env = blocks.get(h.value()).map_err(io)?.ok_or_else(|| {
                StoreError::Corrupt("order lists a block without an index entry".into())
            })?;
            let b = Block::decode(env.value()).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            out.push((k.value(), b));
        }
        Ok(out)
    }

    /// Remove a placed block file that was not committed (a block that lost
    /// a race). A committed block is left alone.
    pub fn discard(&self, hash: &BlockHash) -> Result<(), StoreError> {
        if self.envelope(hash)?.is_some() {
            return Ok(());
        }
        match fs::remove_file(self.block_path(hash)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(e)),
        }
    }

    /// Why a block's payload is quarantined (None: it is not).
    pub fn quarantined(&self, hash: &BlockHash) -> Result<Option<String>, StoreError> {
        let r = self.db.begin_read().map_err(io)?;
        let t = r.open_table(QUARANTINE).map_err(io)?;
        Ok(t.get(hash.0.as_slice())
            .map_err(io)?
            .map(|v| v.value().to_string()))
    }

    /// Every quarantined payload and why.
    pub fn quarantined_all(&self) -> Result<Vec<(BlockHash, String)>, StoreError> {
        let r = self.db.begin_read().map_err(io)?;
        let t = r.open_table(QUARANTINE).map_err(io)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(io)? {
            let (k, v) = row.map_err(io)?;
            if let Some(h) = hash_of_slice(k.value()) {
                out.push((h, v.value().to_string()));
            }
        }
        Ok(out)
    }

    /// Stop serving an indexed block's payload: move its file to
    /// `quarantine/` and record why. The header stays in the chain.
    pub fn quarantine_payload(&self, hash: &BlockHash, reason: &str) -> Result<(), StoreError> {
        if self.quarantined(hash)?.is_some() {
            return Ok(()); // keep the first reason
        }
        tracing::error!(block = %hash, %reason, "payload quarantined: it is no longer served");
        let q = self.root.join("quarantine");
        fs::create_dir_all(&q).map_err(io)?;
        match fs::rename(self.block_path(hash), q.join(hash.to_hex())) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        let w = self.db.begin_write().map_err(io)?;
        {
            let mut t = w.open_table(QUARANTINE).map_err(io)?;
            t.insert(hash.0.as_slice(), reason).map_err(io)?;
        }
        w.commit().map_err(io)
    }

    fn stored_chunks(&self, hash: &BlockHash) -> Result<Option<Vec<BlockHash>>, StoreError> {
        let r = self.db.begin_read().map_err(io)?;
        let t = r.open_table(CHUNKS).map_err(io)?;
        Ok(t.get(hash.0.as_slice())
            .map_err(io)?
            .map(|v| parse_chunks(v.value())))
    }

    fn store_chunks(&self, hash: &BlockHash, chunks: &[BlockHash]) -> Result<(), StoreError> {
        let w = self.db.begin_write().map_err(io)?;
        {
            let mut t = w.open_table(CHUNKS).map_err(io)?;
            t.insert(hash.0.as_slice(), chunk_bytes(chunks).as_slice())
                .map_err(io)?;
        }
        w.commit().map_err(io)
    }

    fn corrupt(&self, hash: &BlockHash, reason: String) -> StoreError {
        if let Err(e) = self.quarantine_payload(hash, &reason) {
            tracing::error!(block = %hash, error = %e, "quarantine failed");
        }
        StoreError::Corrupt(format!("payload of {hash}: {reason} (quarantined)"))
    }

    /// Hash a whole payload file against its header (and the stored chunk
    /// list, if any). Ok(chunk list) or Err(why it does not match).
    fn hash_file(&self, b: &Block, env_len: u64) -> Result<Vec<BlockHash>, String> {
        let h = &b.header;
        let mut f = File::open(self.block_path(&b.hash)).map_err(|e| format!("open: {e}"))?;
        let len = f.metadata().map_err(|e| format!("stat: {e}"))?.len();
        if len != env_len + h.payload_len {
            return Err(format!(
                "file is {len} bytes, expected {}",
                env_len + h.payload_len
            ));
        }
        f.seek(SeekFrom::Start(env_len))
            .map_err(|e| format!("seek: {e}"))?;
        let mut hasher = ChunkHasher::new(h.chunk_size);
        let mut buf = vec![0u8; READ_PIECE];
        let mut left = h.payload_len;
        while left > 0 {
            let n = (READ_PIECE as u64).min(left) as usize;
            f.read_exact(&mut buf[..n])
                .map_err(|e| format!("read: {e}"))?;
            hasher.update(&buf[..n]);
            left -= n as u64;
        }
        let (chunks, root, _) = hasher.finish();
        if root != h.payload_root {
            return Err(format!(
                "payload hashes to root {root}, header says {}",
                h.payload_root
            ));
        }
        Ok(chunks)
    }

    /// The payload's chunk-hash list: stored at acceptance; for blocks stored
    /// before lists were kept, computed once from the file (checked against
    /// the root) and stored.
    pub fn chunk_list(&self, hash: &BlockHash) -> Result<Vec<BlockHash>, StoreError> {
        if let Some(r) = self.quarantined(hash)? {
            return Err(StoreError::Corrupt(format!(
                "payload of {hash} is quarantined: {r}"
            )));
        }
        if let Some(c) = self.stored_chunks(hash)? {
            return Ok(c);
        }
        let (b, env_len) = self.indexed_block(hash)?;
        let chunks = self
            .hash_file(&b, env_len)
            .map_err(|why| self.corrupt(hash, why))?;
        self.store_chunks(hash, &chunks)?;
        Ok(chunks)
    }

    /// Re-hash every stored payload; quarantine those that do not match
    /// (see the module docs). Stores missing chunk lists on the way.
    pub fn scrub(&self) -> Result<ScrubReport, StoreError> {
        let mut report = ScrubReport::default();
        for b in self.list()? {
            if self.quarantined(&b.hash)?.is_some() {
                report.already_quarantined += 1;
                continue;
            }
            let env_len = b.encoded_len() as u64;
            let stored = self.stored_chunks(&b.hash)?;
            let verdict = self
                .hash_file(&b, env_len)
                .and_then(|chunks| match &stored {
                    Some(s) if *s != chunks => {
                        Err("payload does not match its stored chunk list".to_string())
                    }
                    _ => Ok(chunks),
                });
            match verdict {
                Ok(chunks) => {
                    if stored.is_none() {
                        self.store_chunks(&b.hash, &chunks)?;
                    }
                    report.checked += 1;
                    report.bytes += b.header.payload_len;
                }
                Err(why) => {
                    self.quarantine_payload(&b.hash, &why)?;
                    report.quarantined.push((b.hash, why));
                }
            }
        }
        Ok(report)
    }
}

/// Bytes read from a block file per step of a hash pass.
const READ_PIECE: usize = 1024 * 1024;

fn chunk_bytes(chunks: &[BlockHash]) -> Vec<u8> {
    chunks.iter().flat_map(|c| c.0).collect()
}

fn parse_chunks(v: &[u8]) -> Vec<BlockHash> {
    v.chunks_exact(32).filter_map(hash_of_slice).collect()
}

/// What [`FileStore::scrub`] found.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ScrubReport {
    /// Payloads that matched.
    pub checked: usize,
    /// Their bytes.
    pub bytes: u64,
    /// Payloads quarantined by this pass, and why.
    pub quarantined: Vec<(BlockHash, String)>,
    /// Payloads quarantined before.
    pub already_quarantined: usize,
}

impl FileStore {
    fn check_new(&self, block: &Block, payload: &[u8]) -> Result<(), StoreError> {
        if payload.len() as u64 != block.header.payload_len {
            return Err(StoreError::Corrupt(format!(
                "payload of {} bytes for a header of {}",
                payload.len(),
                block.header.payload_len
            )));
        }
        if self.envelope(&block.hash)?.is_some() {
            return Err(StoreError::Duplicate(block.hash));
        }
        Ok(())
    }
}

impl BlockStore for FileStore {
    fn get(&self, hash: &BlockHash) -> Result<Option<Block>, StoreError> {
        match self.envelope(hash)? {
            None => Ok(None),
            Some(env) => Block::decode(&env)
                .map(Some)
                .map_err(|e| StoreError::Corrupt(format!("index entry {hash}: {e}"))),
        }
    }

    /// Reads whole chunks and checks each against the chunk list before
    /// returning the range: a corrupted file is quarantined, never served.
    fn read_payload(&self, hash: &BlockHash, start: u64, len: u64) -> Result<Vec<u8>, StoreError> {
        let (b, env_len) = self.indexed_block(hash)?;
        let plen = b.header.payload_len;
        check_range(start, len, plen)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let chunks = self.chunk_list(hash)?;
        let cs = u64::from(b.header.chunk_size.max(1));
        let first = start / cs;
        let a = first * cs;
        let z = ((start + len - 1) / cs + 1).saturating_mul(cs).min(plen);
        let n = usize::try_from(z - a).map_err(io)?;
        let mut buf = vec![0u8; n];
        let read = File::open(self.block_path(hash)).and_then(|mut f| {
            f.seek(SeekFrom::Start(env_len + a))?;
            f.read_exact(&mut buf)
        });
        if let Err(e) = read {
            return Err(self.corrupt(hash, format!("reading the block file: {e}")));
        }
        for (i, piece) in buf.chunks(cs as usize).enumerate() {
            let idx = first + i as u64;
            let want = usize::try_from(idx).ok().and_then(|i| chunks.get(i));
            if want != Some(&BlockHash::of(piece)) {
                return Err(self.corrupt(hash, format!("chunk {idx} does not match its hash")));
            }
        }
        let off = (start - a) as usize;
        buf.truncate(off + len as usize);
        buf.drain(..off);
        Ok(buf)
    }

    fn put(&self, block: &Block, payload: &[u8]) -> Result<(), StoreError> {
        self.check_new(block, payload)?;
        self.place_bytes(block, payload)?;
        let chunks = web_node::chain::chunk_hashes(payload, block.header.chunk_size);
        self.commit(block, &chunks, Expect::Any).map(|_| ())
    }

    fn put_staged(&self, block: &Block, payload: &[u8], staged: &Path) -> Result<(), StoreError> {
        self.check_new(block, payload)?;
        if self.place_staged(block, staged).is_err() {
            self.place_bytes(block, payload)?;
        }
        let chunks = web_node::chain::chunk_hashes(payload, block.header.chunk_size);
        self.commit(block, &chunks, Expect::Any).map(|_| ())
    }

    fn list(&self) -> Result<Vec<Block>, StoreError> {
        let r = self.db.begin_read().map_err(io)?;
        let order = r.open_table(ORDER).map_err(io)?;
        let blocks = r.open_table(BLOCKS).map_err(io)?;
        let mut out = Vec::new();
        for row in order.iter().map_err(io)? {
            let (_, h) = row.map_err(io)?;
            let env = blocks.get(h.value()).map_err(io)?.ok_or_else(|| {
                StoreError::Corrupt("order lists a block without an index entry".into())
            })?;
            out.push(Block::decode(env.value()).map_err(|e| StoreError::Corrupt(e.to_string()))?);
        }
        Ok(out)
    }

    fn heads(&self) -> Result<Vec<SlotHead>, StoreError> {
        let r = self.db.begin_read().map_err(io)?;
        let t = r.open_table(HEADS).map_err(io)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(io)? {
            let (k, v) = row.map_err(io)?;
            let (meta, name) = parse_head_key(k.value())
                .ok_or_else(|| StoreError::Corrupt(format!("bad head key {:?}", k.value())))?;
            let hash = hash_of_slice(v.value())
                .ok_or_else(|| StoreError::Corrupt("bad head hash".into()))?;
            out.push(SlotHead { meta, name, hash });
        }
        Ok(out)
    }

    fn set_head(
        &self,
        meta: Option<BlockHash>,
        name: &str,
        hash: &BlockHash,
    ) -> Result<(), StoreError> {
        if self.envelope(hash)?.is_none() {
            return Err(StoreError::NotFound(*hash));
        }
        let w = self.db.begin_write().map_err(io)?;
        {
            let mut heads = w.open_table(HEADS).map_err(io)?;
            heads
                .insert(head_key(meta.as_ref(), name).as_str(), hash.0.as_slice())
                .map_err(io)?;
        }
        w.commit().map_err(io)
    }
}

impl RelayStore for FileStore {
    fn kind(&self) -> &'static str {
        "embedded"
    }

    fn staging_dir(&self) -> PathBuf {
        FileStore::staging_dir(self)
    }

    fn place_staged(&self, block: &Block, staged: &Path) -> Result<(), StoreError> {
        FileStore::place_staged(self, block, staged)
    }

    fn commit(
        &self,
        block: &Block,
        chunks: &[BlockHash],
        expect: Expect,
    ) -> Result<Committed, StoreError> {
        FileStore::commit(self, block, chunks, expect)
    }

    fn discard(&self, hash: &BlockHash) -> Result<(), StoreError> {
        FileStore::discard(self, hash)
    }

    fn chunk_list(&self, hash: &BlockHash) -> Result<Vec<BlockHash>, StoreError> {
        FileStore::chunk_list(self, hash)
    }

    fn quarantined(&self, hash: &BlockHash) -> Result<Option<String>, StoreError> {
        FileStore::quarantined(self, hash)
    }

    fn quarantine_payload(&self, hash: &BlockHash, reason: &str) -> Result<(), StoreError> {
        FileStore::quarantine_payload(self, hash, reason)
    }

    fn quarantined_all(&self) -> Result<Vec<(BlockHash, String)>, StoreError> {
        FileStore::quarantined_all(self)
    }

    fn scrub(&self) -> Result<ScrubReport, StoreError> {
        FileStore::scrub(self)
    }

    fn list_after(&self, after: Option<u64>) -> Result<Vec<(u64, Block)>, StoreError> {
        FileStore::list_after(self, after)
    }
}
