//! Restore: check the whole archive, then write it block by block.

use std::path::Path;

use web_node::chain::{check_payload_integrity, BlockHash};

use super::archive::{verify_archive, ArchiveReader};
use super::{BackupError, Summary};
use crate::store::{put_checked, Committed, Expect, RelayStore};

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
