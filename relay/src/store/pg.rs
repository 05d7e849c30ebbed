//! The PostgreSQL [`RelayStore`] (`relay serve --database postgres://...`):
//! the block index, heads, chunk lists and payloads (as chunk rows) in the
//! tables of `relay/migrations/0001_store.sql`, shared by every relay on the
//! database.
//!
//! * Uploads: [`PgStore::place_staged`] copies the staged file's payload
//!   into `payloads` / `payload_chunks` (one transaction, no block row yet:
//!   nobody lists or serves it); [`PgStore::commit`] then takes the commit
//!   lock (`pg_advisory_xact_lock`), checks the slot's head, inserts the block
//!   row with the next `seq`, moves the head and sends `NOTIFY aiblock_blocks`
//!   with the `seq`, all in one transaction. Two relays committing the same
//!   slot at once: the second sees the first's head and gets
//!   [`Committed::HeadMoved`]; the same block twice: [`StoreError::Duplicate`].
//! * Reads check every chunk against the block's chunk list, as the
//!   embedded store does; a chunk that does not match quarantines the
//!   payload (a `quarantine` row: no relay serves it any more).
//! * Staged payloads of uploads that never committed (a relay killed
//!   mid-upload) are removed by the next relay that opens the store after
//!   [`STALE_STAGED`].
//! * `--blobs DIR|s3://bucket[/prefix]` ([`open_blobs`]): payloads go to a
//!   directory or an S3-compatible object store (the `object_store` crate),
//!   one immutable object `payloads/<hash>` each, written before the commit;
//!   the database keeps everything else, the chunk lists included, and every
//!   ranged read is checked against them as rows are.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use object_store::path::Path as ObjectPath;
use object_store::ObjectStore;
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};
use web_node::chain::{payload_root, Block, BlockHash};
use web_node::net::api::SlotHead;
use web_node::store::{check_range, BlockStore, StoreError};

use super::{Committed, Expect, RelayStore, ScrubReport};
use crate::pg::{hash32, to_i64, to_u64, Pg, PgError};

/// Advisory lock key of block commits ("AIBC"): commits are serialised, so
/// `seq` order is commit order.
const COMMIT_LOCK: i64 = 0x4149_4243;
/// The channel a commit notifies, with the block's `seq` as payload.
pub const BLOCKS_CHANNEL: &str = "aiblock_blocks";
/// A staged payload without a block this old is an abandoned upload.
pub const STALE_STAGED: Duration = Duration::from_secs(3600);
/// Chunks fetched per query by reads and the scrub.
const CHUNK_BATCH: i32 = 16;
/// Bytes per part written to an object store (S3's minimum part is 5 MiB).
const BLOB_PIECE: usize = 8 << 20;

/// Why a query of the store failed.
#[derive(Debug)]
enum Fail {
    Pg(PgError),
    /// Stored data does not match (a chunk missing or not hashing right).
    Corrupt(String),
    Duplicate,
}

impl From<PgError> for Fail {
    fn from(e: PgError) -> Self {
        Self::Pg(e)
    }
}

impl From<tokio_postgres::Error> for Fail {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Pg(e.into())
    }
}

fn corrupt(m: impl Into<String>) -> Fail {
    Fail::Corrupt(m.into())
}

fn pgerr(e: PgError) -> StoreError {
    crate::metrics::db_error(crate::metrics::Db::Postgres, crate::metrics::DbPart::Store);
    StoreError::Io(e.to_string())
}

/// For a block: a duplicate is [`StoreError::Duplicate`] of it.
fn fail_of(hash: &BlockHash) -> impl Fn(Fail) -> StoreError + '_ {
    move |e| match e {
        Fail::Pg(e) => pgerr(e),
        Fail::Corrupt(m) => StoreError::Corrupt(m),
        Fail::Duplicate => StoreError::Duplicate(*hash),
    }
}

fn store_err(e: Fail) -> StoreError {
    match e {
        Fail::Pg(e) => pgerr(e),
        Fail::Corrupt(m) => StoreError::Corrupt(m),
        Fail::Duplicate => StoreError::Corrupt("unexpected duplicate".into()),
    }
}

fn meta_key(meta: Option<&BlockHash>) -> Vec<u8> {
    meta.map(|m| m.0.to_vec()).unwrap_or_default()
}

fn parse_chunks(v: &[u8]) -> Result<Vec<BlockHash>, Fail> {
    if !v.len().is_multiple_of(32) {
        return Err(corrupt(format!("chunk list of {} bytes", v.len())));
    }
    Ok(v.chunks_exact(32)
        .map(|c| BlockHash(c.try_into().unwrap_or([0; 32])))
        .collect())
}

fn decode(env: &[u8]) -> Result<Block, Fail> {
    Block::decode(env).map_err(|e| corrupt(format!("block row: {e}")))
}

/// The PostgreSQL store. See the module docs.
pub struct PgStore {
    pg: Arc<Pg>,
    staging: PathBuf,
    /// Payloads as objects (`--blobs`) instead of chunk rows.
    blobs: Option<Arc<dyn ObjectStore>>,
}

/// The object store of `--blobs`: a directory (created if missing), or
/// `s3://bucket[/prefix]` with the credentials, region and endpoint of the
/// usual `AWS_*` variables (`AWS_ENDPOINT` for an S3-compatible server).
pub fn open_blobs(spec: &str) -> Result<Arc<dyn ObjectStore>, StoreError> {
    let bad = |e: &dyn std::fmt::Display| StoreError::Io(format!("--blobs {spec}: {e}"));
    if let Some(rest) = spec.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(bad(&"no bucket name"));
        }
        let s3 = object_store::aws::AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .build()
            .map_err(|e| bad(&e))?;
        let prefix = prefix.trim_matches('/');
        return Ok(if prefix.is_empty() {
            Arc::new(s3)
        } else {
            Arc::new(object_store::prefix::PrefixStore::new(s3, prefix))
        });
    }
    if spec.contains("://") {
        return Err(bad(&"a directory or s3://bucket[/prefix]"));
    }
    std::fs::create_dir_all(spec).map_err(|e| bad(&e))?;
    let local = object_store::local::LocalFileSystem::new_with_prefix(spec).map_err(|e| bad(&e))?;
    Ok(Arc::new(local))
}

fn object_path(h: &[u8]) -> ObjectPath {
    ObjectPath::from(format!("payloads/{}", hex::encode(h)))
}

fn objerr(e: object_store::Error) -> Fail {
    match e {
        object_store::Error::NotFound { .. } => corrupt("the payload object is missing"),
        e => Fail::Pg(PgError(format!("object store: {e}"))),
    }
}

/// Chunks `first..=last` of a payload from its object.
async fn chunk_objects(
    blobs: &dyn ObjectStore,
    h: &[u8],
    first: u64,
    last: u64,
    chunk_size: u32,
    payload_len: u64,
) -> Result<Vec<Vec<u8>>, Fail> {
    let cs = u64::from(chunk_size.max(1));
    let (a, z) = (first * cs, ((last + 1) * cs).min(payload_len));
    let bytes = blobs
        .get_range(&object_path(h), a..z)
        .await
        .map_err(objerr)?;
    if bytes.len() as u64 != z - a {
        return Err(corrupt(format!(
            "the payload object is shorter than its block ({} of {} bytes read)",
            bytes.len(),
            z - a
        )));
    }
    Ok(bytes.chunks(cs as usize).map(<[u8]>::to_vec).collect())
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").field("pg", &self.pg).finish()
    }
}

/// What [`PgStore::open`] cleaned up.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct PgOpenReport {
    /// Staged upload files removed from the local staging dir.
    pub removed_temp: usize,
    /// Abandoned staged payloads removed from the database.
    pub removed_staged: u64,
}

impl PgStore {
    /// Use a migrated database ([`Pg::connect`]); uploads are staged in `staging`
    /// (emptied here: this relay's own interrupted uploads).
    pub fn open(pg: Arc<Pg>, staging: &Path) -> Result<(Self, PgOpenReport), StoreError> {
        Self::open_with_blobs(pg, staging, None)
    }

    /// [`PgStore::open`] with payloads in an object store ([`open_blobs`]).
    pub fn open_with_blobs(
        pg: Arc<Pg>,
        staging: &Path,
        blobs: Option<Arc<dyn ObjectStore>>,
    ) -> Result<(Self, PgOpenReport), StoreError> {
        let staging = &super::resolve_data_dir(staging)?;
        let io = |e: std::io::Error| StoreError::Io(format!("{}: {e}", staging.display()));
        let mut report = PgOpenReport::default();
        for e in std::fs::read_dir(staging).map_err(io)? {
            let p = e.map_err(io)?.path();
            if p.is_file() {
                std::fs::remove_file(&p).map_err(io)?;
                report.removed_temp += 1;
            }
        }
        let stale = STALE_STAGED.as_secs_f64();
        let b2 = blobs.clone();
        report.removed_staged = pg
            .with(move |c| async move {
                let gone = c
                    .query(
                        "DELETE FROM payloads p WHERE p.staged_at < now() - make_interval(secs => $1)
                         AND NOT EXISTS (SELECT 1 FROM blocks b WHERE b.hash = p.block)
                         RETURNING p.block",
                        &[&stale],
                    )
                    .await?;
                if let Some(b) = &b2 {
                    for r in &gone {
                        let _ = b.delete(&object_path(r.get(0))).await;
                    }
                }
                Ok::<_, PgError>(gone.len() as u64)
            })
            .map_err(pgerr)?;
        Ok((
            Self {
                pg,
                staging: staging.to_path_buf(),
                blobs,
            },
            report,
        ))
    }

    pub fn pg(&self) -> &Arc<Pg> {
        &self.pg
    }

    /// Stop serving a payload and record why (the first reason stays).
    pub fn quarantine_payload(&self, hash: &BlockHash, reason: &str) -> Result<(), StoreError> {
        tracing::error!(block = %hash, %reason, "payload quarantined: it is no longer served");
        let (h, r) = (hash.0.to_vec(), reason.to_string());
        self.pg
            .with(move |c| async move {
                c.execute(
                    "INSERT INTO quarantine (block, reason) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    &[&h, &r],
                )
                .await?;
                Ok(())
            })
            .map_err(pgerr)
    }

    /// Why a payload is quarantined (None: it is not).
    pub fn quarantined(&self, hash: &BlockHash) -> Result<Option<String>, StoreError> {
        let h = hash.0.to_vec();
        self.pg
            .with(move |c| async move {
                Ok(
                    c.query_opt("SELECT reason FROM quarantine WHERE block = $1", &[&h])
                        .await?
                        .map(|r| r.get(0)),
                )
            })
            .map_err(pgerr)
    }

    fn corrupt(&self, hash: &BlockHash, reason: String) -> StoreError {
        if let Err(e) = self.quarantine_payload(hash, &reason) {
            tracing::error!(block = %hash, error = %e, "quarantine failed");
        }
        StoreError::Corrupt(format!("payload of {hash}: {reason} (quarantined)"))
    }
}

/// One block's row as reads need it.
struct Row {
    payload_len: u64,
    chunk_size: u32,
    chunks: Vec<BlockHash>,
    quarantined: Option<String>,
}

async fn block_row(c: &tokio_postgres::Client, h: &[u8]) -> Result<Option<Row>, Fail> {
    let Some(r) = c
        .query_opt(
            "SELECT b.payload_len, b.chunk_size, b.chunk_hashes, q.reason
             FROM blocks b LEFT JOIN quarantine q ON q.block = b.hash WHERE b.hash = $1",
            &[&h],
        )
        .await?
    else {
        return Ok(None);
    };
    let cs: i32 = r.get(1);
    Ok(Some(Row {
        payload_len: to_u64(r.get(0))?,
        chunk_size: u32::try_from(cs).map_err(|_| corrupt(format!("chunk size {cs}")))?,
        chunks: parse_chunks(r.get(2))?,
        quarantined: r.get(3),
    }))
}

/// Chunks `first..=last` of a payload, in order; a missing one is corrupt data.
async fn chunk_rows(
    c: &tokio_postgres::Client,
    h: &[u8],
    first: i32,
    last: i32,
) -> Result<Vec<Vec<u8>>, Fail> {
    let rows = c
        .query(
            "SELECT idx, data FROM payload_chunks WHERE block = $1 AND idx BETWEEN $2 AND $3 ORDER BY idx",
            &[&h, &first, &last],
        )
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for (want, r) in (first..=last).zip(rows.iter()) {
        let idx: i32 = r.get(0);
        if idx != want {
            return Err(corrupt(format!("chunk {want} is missing")));
        }
        out.push(r.get::<_, Vec<u8>>(1));
    }
    if out.len() as i64 != i64::from(last) - i64::from(first) + 1 {
        return Err(corrupt(format!(
            "chunk {} is missing",
            i64::from(first) + out.len() as i64
        )));
    }
    Ok(out)
}

impl BlockStore for PgStore {
    fn get(&self, hash: &BlockHash) -> Result<Option<Block>, StoreError> {
        let h = hash.0.to_vec();
        self.pg
            .with(move |c| async move {
                match c
                    .query_opt("SELECT envelope FROM blocks WHERE hash = $1", &[&h])
                    .await?
                {
                    Some(r) => decode(r.get(0)).map(Some),
                    None => Ok(None),
                }
            })
            .map_err(store_err)
    }

    fn contains(&self, hash: &BlockHash) -> Result<bool, StoreError> {
        let h = hash.0.to_vec();
        self.pg
            .with(move |c| async move {
                Ok(c.query_opt("SELECT 1 FROM blocks WHERE hash = $1", &[&h])
                    .await?
                    .is_some())
            })
            .map_err(pgerr)
    }

    /// Reads whole chunks and checks each against the chunk list before
    /// returning the range: a corrupted row is quarantined, never served.
    fn read_payload(&self, hash: &BlockHash, start: u64, len: u64) -> Result<Vec<u8>, StoreError> {
        let h = hash.0.to_vec();
        let row = {
            let h = h.clone();
            self.pg
                .with(move |c| async move { block_row(&c, &h).await })
                .map_err(store_err)?
                .ok_or(StoreError::NotFound(*hash))?
        };
        check_range(start, len, row.payload_len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        if let Some(r) = row.quarantined {
            return Err(StoreError::Corrupt(format!(
                "payload of {hash} is quarantined: {r}"
            )));
        }
        let cs = u64::from(row.chunk_size.max(1));
        let first = start / cs;
        let last = (start + len - 1) / cs;
        let (f, l) = (
            i32::try_from(first).map_err(|_| StoreError::Range {
                start,
                end: start + len,
                len: row.payload_len,
            })?,
            i32::try_from(last).map_err(|_| StoreError::Range {
                start,
                end: start + len,
                len: row.payload_len,
            })?,
        );
        let blobs = self.blobs.clone();
        let (cs32, plen) = (row.chunk_size, row.payload_len);
        let pieces = match self.pg.with(move |c| async move {
            match blobs {
                Some(b) => chunk_objects(&*b, &h, first, last, cs32, plen).await,
                None => chunk_rows(&c, &h, f, l).await,
            }
        }) {
            Ok(p) => p,
            Err(Fail::Corrupt(why)) => return Err(self.corrupt(hash, why)),
            Err(e) => return Err(store_err(e)),
        };
        let mut buf = Vec::with_capacity((last - first + 1) as usize * cs as usize);
        for (i, piece) in pieces.iter().enumerate() {
            let idx = first + i as u64;
            let want_len = (cs).min(row.payload_len - idx * cs);
            let want = usize::try_from(idx).ok().and_then(|i| row.chunks.get(i));
            if piece.len() as u64 != want_len || want != Some(&BlockHash::of(piece)) {
                return Err(self.corrupt(hash, format!("chunk {idx} does not match its hash")));
            }
            buf.extend_from_slice(piece);
        }
        let off = (start - first * cs) as usize;
        buf.truncate(off + len as usize);
        buf.drain(..off);
        Ok(buf)
    }

    fn put(&self, block: &Block, payload: &[u8]) -> Result<(), StoreError> {
        super::put_checked(self, block, payload, Expect::Any).map(|_| ())
    }

    fn list(&self) -> Result<Vec<Block>, StoreError> {
        Ok(self.list_after(None)?.into_iter().map(|(_, b)| b).collect())
    }

    fn heads(&self) -> Result<Vec<SlotHead>, StoreError> {
        self.pg
            .with(move |c| async move {
                let rows = c
                    .query(
                        "SELECT meta, name, hash FROM heads ORDER BY meta, name",
                        &[],
                    )
                    .await?;
                let mut out = Vec::with_capacity(rows.len());
                for r in rows {
                    let m: Vec<u8> = r.get(0);
                    let meta = if m.is_empty() {
                        None
                    } else {
                        Some(BlockHash(hash32(&m)?))
                    };
                    out.push(SlotHead {
                        meta,
                        name: r.get(1),
                        hash: BlockHash(hash32(r.get(2))?),
                    });
                }
                Ok(out)
            })
            .map_err(store_err)
    }

    fn set_head(
        &self,
        meta: Option<BlockHash>,
        name: &str,
        hash: &BlockHash,
    ) -> Result<(), StoreError> {
        let (m, n, h) = (meta_key(meta.as_ref()), name.to_string(), hash.0.to_vec());
        let n_set = self
            .pg
            .with(move |c| async move {
                if c.query_opt("SELECT 1 FROM blocks WHERE hash = $1", &[&h])
                    .await?
                    .is_none()
                {
                    return Ok(false);
                }
                c.execute(
                    "INSERT INTO heads (meta, name, hash) VALUES ($1, $2, $3)
                     ON CONFLICT (meta, name) DO UPDATE SET hash = EXCLUDED.hash",
                    &[&m, &n, &h],
                )
                .await?;
                Ok(true)
            })
            .map_err(pgerr)?;
        if n_set {
            Ok(())
        } else {
            Err(StoreError::NotFound(*hash))
        }
    }
}

/// Copy the payload of a staged file (`envelope || payload`) into chunk
/// rows, or into its object first (`--blobs`) and then its `payloads` row.
async fn stage_file(
    c: &mut deadpool_postgres::Object,
    h: Vec<u8>,
    path: PathBuf,
    env_len: u64,
    payload_len: u64,
    chunk_size: u32,
    blobs: Option<Arc<dyn ObjectStore>>,
) -> Result<(), Fail> {
    let io = |e: std::io::Error| PgError(format!("staged file {}: {e}", path.display()));
    let mut f = tokio::fs::File::open(&path).await.map_err(io)?;
    f.seek(std::io::SeekFrom::Start(env_len))
        .await
        .map_err(io)?;
    if let Some(b) = blobs {
        if c.query_opt("SELECT 1 FROM blocks WHERE hash = $1", &[&h])
            .await?
            .is_some()
        {
            return Err(Fail::Duplicate);
        }
        let up = b.put_multipart(&object_path(&h)).await.map_err(objerr)?;
        let mut w = object_store::WriteMultipart::new(up);
        let mut left = payload_len;
        let mut buf = vec![0u8; BLOB_PIECE.min(payload_len.max(1) as usize)];
        while left > 0 {
            let n = (BLOB_PIECE as u64).min(left) as usize;
            f.read_exact(&mut buf[..n]).await.map_err(io)?;
            w.wait_for_capacity(2).await.map_err(objerr)?;
            w.write(&buf[..n]);
            left -= n as u64;
        }
        w.finish().await.map_err(objerr)?;
        let t = c.transaction().await?;
        t.execute("DELETE FROM payloads WHERE block = $1", &[&h])
            .await?;
        t.execute(
            "INSERT INTO payloads (block, len) VALUES ($1, $2)",
            &[&h, &to_i64(payload_len)?],
        )
        .await?;
        t.commit().await?;
        return Ok(());
    }
    let t = c.transaction().await?;
    if t.query_opt("SELECT 1 FROM blocks WHERE hash = $1", &[&h])
        .await?
        .is_some()
    {
        return Err(Fail::Duplicate);
    }
    // A previous attempt of this upload that never committed.
    t.execute("DELETE FROM payloads WHERE block = $1", &[&h])
        .await?;
    t.execute(
        "INSERT INTO payloads (block, len) VALUES ($1, $2)",
        &[&h, &to_i64(payload_len)?],
    )
    .await?;
    let ins = t
        .prepare("INSERT INTO payload_chunks (block, idx, data) VALUES ($1, $2, $3)")
        .await?;
    let cs = u64::from(chunk_size.max(1));
    let mut left = payload_len;
    let mut idx: i32 = 0;
    let mut buf = vec![0u8; cs.min(payload_len.max(1)) as usize];
    while left > 0 {
        let n = cs.min(left) as usize;
        f.read_exact(&mut buf[..n]).await.map_err(io)?;
        t.execute(&ins, &[&h, &idx, &&buf[..n]]).await?;
        left -= n as u64;
        idx = idx
            .checked_add(1)
            .ok_or_else(|| corrupt("too many chunks"))?;
    }
    t.commit().await?;
    Ok(())
}

impl RelayStore for PgStore {
    fn kind(&self) -> &'static str {
        if self.blobs.is_some() {
            "postgres+blobs"
        } else {
            "postgres"
        }
    }

    fn staging_dir(&self) -> PathBuf {
        self.staging.clone()
    }

    fn place_staged(&self, block: &Block, staged: &Path) -> Result<(), StoreError> {
        let expected = block.encoded_len() as u64 + block.header.payload_len;
        let ok = std::fs::metadata(staged).is_ok_and(|m| m.is_file() && m.len() == expected);
        if !ok {
            return Err(StoreError::Io(format!(
                "staged file {} is not {expected} bytes",
                staged.display()
            )));
        }
        let (h, path) = (block.hash.0.to_vec(), staged.to_path_buf());
        let (env_len, plen, cs) = (
            block.encoded_len() as u64,
            block.header.payload_len,
            block.header.chunk_size,
        );
        let blobs = self.blobs.clone();
        let r = self.pg.with(move |mut c| async move {
            stage_file(&mut c, h, path, env_len, plen, cs, blobs).await
        });
        // Consumed either way: the rows hold it now, or the upload failed.
        let _ = std::fs::remove_file(staged);
        r.map_err(fail_of(&block.hash))
    }

    fn commit(
        &self,
        block: &Block,
        chunks: &[BlockHash],
        expect: Expect,
    ) -> Result<Committed, StoreError> {
        let h = block.hash.0.to_vec();
        let env = block.encode();
        let hdr = &block.header;
        let chain: i16 = match hdr.chain {
            web_node::chain::ChainId::A => 0,
            web_node::chain::ChainId::B => 1,
        };
        let plen = to_i64(hdr.payload_len).map_err(pgerr)?;
        let cs = i32::try_from(hdr.chunk_size)
            .map_err(|_| StoreError::Corrupt(format!("chunk size {}", hdr.chunk_size)))?;
        let list: Vec<u8> = chunks.iter().flat_map(|c| c.0).collect();
        // Chunk rows a placed payload has (none when it is an object).
        let nchunks = if self.blobs.is_some() {
            0
        } else {
            chunks.len() as i64
        };
        let (meta, name) = (meta_key(hdr.meta.as_ref()), hdr.name.clone());
        let r = self.pg.with(move |mut c| async move {
            let t = c.transaction().await?;
            t.execute("SELECT pg_advisory_xact_lock($1)", &[&COMMIT_LOCK])
                .await?;
            if t.query_opt("SELECT 1 FROM blocks WHERE hash = $1", &[&h])
                .await?
                .is_some()
            {
                return Err(Fail::Duplicate);
            }
            let staged = t
                .query_one(
                    "SELECT (SELECT len FROM payloads WHERE block = $1),
                            (SELECT count(*) FROM payload_chunks WHERE block = $1)",
                    &[&h],
                )
                .await?;
            let (len, n): (Option<i64>, i64) = (staged.get(0), staged.get(1));
            if len != Some(plen) || n != nchunks {
                return Err(corrupt(format!(
                    "the payload is not placed ({n} of {nchunks} chunks staged)"
                )));
            }
            if let Expect::Head(want) = expect {
                let now = t
                    .query_opt(
                        "SELECT hash FROM heads WHERE meta = $1 AND name = $2",
                        &[&meta, &name],
                    )
                    .await?
                    .map(|r| hash32(r.get(0)).map(BlockHash))
                    .transpose()?;
                if now != want {
                    return Ok(Committed::HeadMoved(now));
                }
            }
            let seq: i64 = t
                .query_one("SELECT coalesce(max(seq) + 1, 0) FROM blocks", &[])
                .await?
                .get(0);
            t.execute(
                "INSERT INTO blocks (hash, seq, chain, envelope, payload_len, chunk_size, chunk_hashes)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[&h, &seq, &chain, &env, &plen, &cs, &list],
            )
            .await?;
            t.execute(
                "INSERT INTO heads (meta, name, hash) VALUES ($1, $2, $3)
                 ON CONFLICT (meta, name) DO UPDATE SET hash = EXCLUDED.hash",
                &[&meta, &name, &h],
            )
            .await?;
            t.execute(
                "SELECT pg_notify($1, $2)",
                &[&BLOCKS_CHANNEL, &seq.to_string()],
            )
            .await?;
            t.commit().await?;
            Ok(Committed::Done)
        });
        r.map_err(fail_of(&block.hash))
    }

    fn discard(&self, hash: &BlockHash) -> Result<(), StoreError> {
        let h = hash.0.to_vec();
        let blobs = self.blobs.clone();
        self.pg
            .with(move |c| async move {
                c.execute(
                    "DELETE FROM payloads p WHERE p.block = $1
                     AND NOT EXISTS (SELECT 1 FROM blocks b WHERE b.hash = p.block)",
                    &[&h],
                )
                .await?;
                if let Some(b) = blobs {
                    let committed = c
                        .query_opt("SELECT 1 FROM blocks WHERE hash = $1", &[&h])
                        .await?
                        .is_some();
                    if !committed {
                        match b.delete(&object_path(&h)).await {
                            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                            Err(e) => return Err(PgError(format!("object store: {e}"))),
                        }
                    }
                }
                Ok(())
            })
            .map_err(pgerr)
    }

    fn chunk_list(&self, hash: &BlockHash) -> Result<Vec<BlockHash>, StoreError> {
        let h = hash.0.to_vec();
        let row = self
            .pg
            .with(move |c| async move { block_row(&c, &h).await })
            .map_err(store_err)?
            .ok_or(StoreError::NotFound(*hash))?;
        if let Some(r) = row.quarantined {
            return Err(StoreError::Corrupt(format!(
                "payload of {hash} is quarantined: {r}"
            )));
        }
        Ok(row.chunks)
    }

    fn quarantined(&self, hash: &BlockHash) -> Result<Option<String>, StoreError> {
        PgStore::quarantined(self, hash)
    }

    fn quarantine_payload(&self, hash: &BlockHash, reason: &str) -> Result<(), StoreError> {
        PgStore::quarantine_payload(self, hash, reason)
    }

    fn quarantined_all(&self) -> Result<Vec<(BlockHash, String)>, StoreError> {
        self.pg
            .with(move |c| async move {
                let rows = c
                    .query("SELECT block, reason FROM quarantine ORDER BY at", &[])
                    .await?;
                rows.iter()
                    .map(|r| Ok((BlockHash(hash32(r.get(0))?), r.get(1))))
                    .collect()
            })
            .map_err(store_err)
    }

    fn scrub(&self) -> Result<ScrubReport, StoreError> {
        let mut report = ScrubReport::default();
        for b in self.list()? {
            let h = b.hash.0.to_vec();
            let row = {
                let h = h.clone();
                self.pg
                    .with(move |c| async move { block_row(&c, &h).await })
                    .map_err(store_err)?
                    .ok_or(StoreError::NotFound(b.hash))?
            };
            if row.quarantined.is_some() {
                report.already_quarantined += 1;
                continue;
            }
            let verdict = self.check_payload(&b, &row);
            match verdict {
                Ok(()) => {
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

    fn list_after(&self, after: Option<u64>) -> Result<Vec<(u64, Block)>, StoreError> {
        let from: i64 = match after {
            None => -1,
            Some(a) => to_i64(a).map_err(pgerr)?,
        };
        self.pg
            .with(move |c| async move {
                let rows = c
                    .query(
                        "SELECT seq, envelope FROM blocks WHERE seq > $1 ORDER BY seq",
                        &[&from],
                    )
                    .await?;
                rows.iter()
                    .map(|r| Ok((to_u64(r.get(0))?, decode(r.get(1))?)))
                    .collect()
            })
            .map_err(store_err)
    }
}

impl PgStore {
    /// Every chunk row of a payload against its chunk list, and the list
    /// against the header's root. Err(why) when they do not match.
    fn check_payload(&self, b: &Block, row: &Row) -> Result<(), String> {
        let hdr = &b.header;
        if payload_root(&row.chunks) != hdr.payload_root {
            return Err("the stored chunk list does not hash to the header's root".into());
        }
        let n = row.chunks.len() as i32;
        let cs = u64::from(hdr.chunk_size.max(1));
        let mut first = 0i32;
        while first < n {
            let last = (first + CHUNK_BATCH - 1).min(n - 1);
            let h = b.hash.0.to_vec();
            let blobs = self.blobs.clone();
            let (cs32, plen) = (hdr.chunk_size, hdr.payload_len);
            let pieces = self
                .pg
                .with(move |c| async move {
                    match blobs {
                        Some(bl) => {
                            chunk_objects(&*bl, &h, first as u64, last as u64, cs32, plen).await
                        }
                        None => chunk_rows(&c, &h, first, last).await,
                    }
                })
                .map_err(|e| match e {
                    Fail::Corrupt(m) => m,
                    Fail::Pg(e) => e.to_string(),
                    Fail::Duplicate => "unexpected duplicate".into(),
                })?;
            for (i, p) in pieces.iter().enumerate() {
                let idx = first as u64 + i as u64;
                let want_len = cs.min(hdr.payload_len - idx * cs);
                if p.len() as u64 != want_len || BlockHash::of(p) != row.chunks[idx as usize] {
                    return Err(format!("chunk {idx} does not match its hash"));
                }
            }
            first = last + 1;
        }
        Ok(())
    }
}
