//! The archive format: the writer (temp file, SHA-256 as it goes, renamed
//! into place), the reader and the checks of [`verify_archive`].

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use web_node::chain::{validate_block, Block, BlockHash, ChainError, Dag};

use super::{
    io_err, BackupError, Summary, Verified, FORMAT_VERSION, HEADER_LEN, IO_BUF, MAGIC,
    MAX_ENVELOPE, TRAILER_LEN, TRAILER_MAGIC,
};

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
pub(super) fn write_archive(
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

// ---------------------------------------------------------------- reading

/// Reads an archive, hashing what it reads.
pub(super) struct ArchiveReader {
    r: BufReader<File>,
    sha: Sha256,
    pos: u64,
    len: u64,
}

/// Why the first pass stopped.
pub(super) enum Fail {
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
    pub(super) fn open(path: &Path) -> Result<Self, BackupError> {
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

    pub(super) fn header(&mut self) -> Result<(), Fail> {
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
    pub(super) fn record(&mut self, index: u64) -> Result<Option<(Block, Vec<u8>)>, Fail> {
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
