//! Embedded block store: content-addressed files plus a redb index.
//!
//! Layout under the data dir:
//! * `blocks/ab/<hash>`: envelope ([`Block::encode`]) followed by the payload.
//!   Written to a `.tmp*` file in the same directory, fsynced, renamed into
//!   place, then the directory is fsynced.
//! * `index.redb`: `order` (sequence -> hash), `blocks` (hash -> envelope),
//!   `heads` (`"<meta hex or ->/<name>"` -> hash). Updated in one transaction
//!   after the file is durable, so a crash leaves at worst an unindexed file.
//! * `tmp/`: staging for uploads in flight; emptied on open.
//! * `quarantine/`: files that failed checks on open (kept for inspection).
//!
//! [`FileStore::open`] repairs: removes temp files, drops index entries whose
//! file is missing or does not match (and their descendants), and reports
//! files without an index entry ([`OpenReport::orphans`]) for the caller to
//! validate and adopt with [`BlockStore::put`] or [`FileStore::quarantine`].

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use redb::{Database, ReadableTable, TableDefinition};
use web_node::chain::{Block, BlockHash};
use web_node::net::api::HeadInfo;
use web_node::store::{check_range, BlockStore, StoreError};

const ORDER: TableDefinition<u64, &[u8]> = TableDefinition::new("order");
const BLOCKS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("blocks");
const HEADS: TableDefinition<&str, &[u8]> = TableDefinition::new("heads");

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
    /// Open (creating if needed) the store in `root` and repair it.
    pub fn open(root: &Path) -> Result<(Self, OpenReport), StoreError> {
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
                                let good = b.hash == hash
                                    && self.file_matches(&hash, &env, b.header.payload_len)
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
        for (k, h) in &last_of_slot {
            heads.entry(k.clone()).or_insert(*h);
        }
        {
            let w = self.db.begin_write().map_err(io)?;
            {
                let mut order = w.open_table(ORDER).map_err(io)?;
                let mut blocks = w.open_table(BLOCKS).map_err(io)?;
                for (seq, h) in &drop_seq {
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
                for (k, h) in &heads {
                    t.insert(k.as_str(), h.0.as_slice()).map_err(io)?;
                }
            }
            w.commit().map_err(io)?;
        }
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

    /// Write the block file durably: temp file, fsync, rename, fsync dir.
    fn write_file(&self, block: &Block, payload: &[u8]) -> Result<(), StoreError> {
        let path = self.block_path(&block.hash);
        let dir = path
            .parent()
            .ok_or_else(|| StoreError::Io("block path has no parent".into()))?;
        if !dir.exists() {
            fs::create_dir_all(dir).map_err(io)?;
            sync_dir(&self.root.join("blocks"))?;
        }
        let mut tmp = tempfile::Builder::new()
            .prefix(".tmp")
            .tempfile_in(dir)
            .map_err(io)?;
        tmp.write_all(&block.encode()).map_err(io)?;
        tmp.write_all(payload).map_err(io)?;
        tmp.as_file().sync_all().map_err(io)?;
        tmp.persist(&path).map_err(io)?;
        sync_dir(dir)
    }
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

    /// Index a block whose file is durable: order, envelope and head in one transaction.
    fn index(&self, block: &Block) -> Result<(), StoreError> {
        let w = self.db.begin_write().map_err(io)?;
        {
            let mut blocks = w.open_table(BLOCKS).map_err(io)?;
            if blocks.get(block.hash.0.as_slice()).map_err(io)?.is_some() {
                return Err(StoreError::Duplicate(block.hash));
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
            let k = head_key(block.header.meta.as_ref(), &block.header.name);
            heads
                .insert(k.as_str(), block.hash.0.as_slice())
                .map_err(io)?;
        }
        w.commit().map_err(io)
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

    fn read_payload(&self, hash: &BlockHash, start: u64, len: u64) -> Result<Vec<u8>, StoreError> {
        let env = self.envelope(hash)?.ok_or(StoreError::NotFound(*hash))?;
        let b = Block::decode(&env).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        check_range(start, len, b.header.payload_len)?;
        let mut f = File::open(self.block_path(hash)).map_err(io)?;
        f.seek(SeekFrom::Start(env.len() as u64 + start))
            .map_err(io)?;
        let n = usize::try_from(len).map_err(io)?;
        let mut out = vec![0u8; n];
        f.read_exact(&mut out)
            .map_err(|e| StoreError::Corrupt(format!("block file {hash}: {e}")))?;
        Ok(out)
    }

    fn put(&self, block: &Block, payload: &[u8]) -> Result<(), StoreError> {
        self.check_new(block, payload)?;
        self.write_file(block, payload)?;
        self.index(block)
    }

    fn put_staged(&self, block: &Block, payload: &[u8], staged: &Path) -> Result<(), StoreError> {
        self.check_new(block, payload)?;
        let expected = block.encoded_len() as u64 + block.header.payload_len;
        let movable = staged.parent() == Some(self.staging_dir().as_path())
            && fs::metadata(staged).is_ok_and(|m| m.is_file() && m.len() == expected);
        if !movable {
            self.write_file(block, payload)?;
            return self.index(block);
        }
        // Same filesystem (data/tmp -> data/blocks): fsync, rename, fsync dir.
        let path = self.block_path(&block.hash);
        let dir = path
            .parent()
            .ok_or_else(|| StoreError::Io("block path has no parent".into()))?;
        if !dir.exists() {
            fs::create_dir_all(dir).map_err(io)?;
            sync_dir(&self.root.join("blocks"))?;
        }
        File::open(staged).and_then(|f| f.sync_all()).map_err(io)?;
        fs::rename(staged, &path).map_err(io)?;
        sync_dir(dir)?;
        self.index(block)
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

    fn heads(&self) -> Result<Vec<HeadInfo>, StoreError> {
        let r = self.db.begin_read().map_err(io)?;
        let t = r.open_table(HEADS).map_err(io)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(io)? {
            let (k, v) = row.map_err(io)?;
            let (meta, name) = parse_head_key(k.value())
                .ok_or_else(|| StoreError::Corrupt(format!("bad head key {:?}", k.value())))?;
            let hash = hash_of_slice(v.value())
                .ok_or_else(|| StoreError::Corrupt("bad head hash".into()))?;
            out.push(HeadInfo { meta, name, hash });
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
