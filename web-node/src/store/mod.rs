//! Block stores.
//!
//! [`BlockStore`] is what a node keeps: signed blocks (envelope) with their
//! payloads, in acceptance order, and the head of every slot. Every block a
//! store holds passed [`validate_block`](crate::chain::validate_block) (and, on
//! a relay, the quality gate) before [`BlockStore::put`]: stores never validate
//! and never hold a block that failed.
//!
//! Implementations: [`MemoryStore`] (tests, browsers without persistence);
//! the relay's embedded store (content-addressed files + redb index). The
//! trait is synchronous and object safe (`Arc<dyn BlockStore>`): async callers
//! run it on a blocking thread. It is shaped so a deployment that outgrows one
//! machine can implement it with PostgreSQL (index, order, heads: one row per
//! block with a sequence number, a `heads` table keyed by `(meta, name)`,
//! `put` as one transaction after the object upload) and an S3-compatible
//! object store (payloads under their hash; `read_payload` is a ranged GET):
//! nothing in the trait assumes local files.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};

use crate::chain::Block;
use crate::chain::{BlockHash, ChainId, ChainView as _, Dag, MetaPayload, SlotHead};

/// Errors of a block store.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StoreError {
    #[error("block {0} not found")]
    NotFound(BlockHash),
    #[error("block {0} is already stored")]
    Duplicate(BlockHash),
    #[error("byte range {start}..{end} is outside the payload of {len} bytes")]
    Range { start: u64, end: u64, len: u64 },
    /// Stored data does not match what the index says (disk corruption, manual edits).
    #[error("store is corrupt: {0}")]
    Corrupt(String),
    #[error("store I/O: {0}")]
    Io(String),
}

/// Durable storage of validated blocks. See the module docs.
pub trait BlockStore: Send + Sync {
    /// The signed block (header + signature), if stored.
    fn get(&self, hash: &BlockHash) -> Result<Option<Block>, StoreError>;

    fn contains(&self, hash: &BlockHash) -> Result<bool, StoreError> {
        Ok(self.get(hash)?.is_some())
    }

    /// `len` payload bytes from offset `start`. Errors with [`StoreError::Range`]
    /// if the range does not lie within the payload.
    fn read_payload(&self, hash: &BlockHash, start: u64, len: u64) -> Result<Vec<u8>, StoreError>;

    /// The whole payload.
    fn payload(&self, hash: &BlockHash) -> Result<Vec<u8>, StoreError> {
        let b = self.get(hash)?.ok_or(StoreError::NotFound(*hash))?;
        self.read_payload(hash, 0, b.header.payload_len)
    }

    /// Store a validated block with its payload, atomically (all or nothing,
    /// also across a crash), append it to the acceptance order and make it its
    /// slot's head. The caller has validated it; `payload.len()` must be the
    /// header's `payload_len`.
    fn put(&self, block: &Block, payload: &[u8]) -> Result<(), StoreError>;

    /// [`BlockStore::put`] for a block whose `envelope || payload` the caller
    /// already holds in a staged file (an upload). A file-backed store may move
    /// the file into place instead of writing the bytes again; the default
    /// ignores the file. The file must hold exactly those bytes.
    fn put_staged(
        &self,
        block: &Block,
        payload: &[u8],
        staged: &std::path::Path,
    ) -> Result<(), StoreError> {
        let _ = staged;
        self.put(block, payload)
    }

    /// Every stored block in acceptance order (parents before children).
    fn list(&self) -> Result<Vec<Block>, StoreError>;

    /// Blocks of one chain in acceptance order.
    fn list_chain(&self, chain: ChainId) -> Result<Vec<Block>, StoreError> {
        Ok(self
            .list()?
            .into_iter()
            .filter(|b| b.header.chain == chain)
            .collect())
    }

    /// The head of every slot.
    fn heads(&self) -> Result<Vec<SlotHead>, StoreError>;

    /// Point a slot's head at a stored block (operator rollback, re-org).
    fn set_head(
        &self,
        meta: Option<BlockHash>,
        name: &str,
        hash: &BlockHash,
    ) -> Result<(), StoreError>;
}

/// Check a payload range against a payload length; returns the end offset.
pub fn check_range(start: u64, len: u64, payload_len: u64) -> Result<u64, StoreError> {
    let end = start.checked_add(len).ok_or(StoreError::Range {
        start,
        end: u64::MAX,
        len: payload_len,
    })?;
    if end > payload_len {
        return Err(StoreError::Range {
            start,
            end,
            len: payload_len,
        });
    }
    Ok(end)
}

/// Rebuild the DAG index of a store: every block in order (chain-A configs
/// parsed from their payloads), then the stored heads.
pub fn load_dag(store: &dyn BlockStore) -> Result<Dag, StoreError> {
    let mut dag = Dag::new();
    for b in store.list()? {
        let config = if b.header.chain == ChainId::A {
            let payload = store.payload(&b.hash)?;
            let (_, cfg) = MetaPayload::parse(&payload)
                .map_err(|e| StoreError::Corrupt(format!("meta block {}: {e}", b.hash)))?;
            Some(cfg)
        } else {
            None
        };
        dag.insert_trusted(b.hash, b.header, config);
    }
    for h in store.heads()? {
        if dag.header(&h.hash).is_some() {
            dag.set_head(h.meta, &h.name, h.hash);
        }
    }
    Ok(dag)
}

#[derive(Default)]
struct MemoryInner {
    blocks: HashMap<BlockHash, (Block, Vec<u8>)>,
    order: Vec<BlockHash>,
    heads: BTreeMap<(Option<BlockHash>, String), BlockHash>,
}

/// A [`BlockStore`] in memory.
#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<MemoryInner>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> Result<MutexGuard<'_, MemoryInner>, StoreError> {
        self.inner
            .lock()
            .map_err(|_| StoreError::Io("memory store lock poisoned".into()))
    }
}

impl BlockStore for MemoryStore {
    fn get(&self, hash: &BlockHash) -> Result<Option<Block>, StoreError> {
        Ok(self.lock()?.blocks.get(hash).map(|(b, _)| b.clone()))
    }

    fn read_payload(&self, hash: &BlockHash, start: u64, len: u64) -> Result<Vec<u8>, StoreError> {
        let g = self.lock()?;
        let (_, p) = g.blocks.get(hash).ok_or(StoreError::NotFound(*hash))?;
        let end = check_range(start, len, p.len() as u64)?;
        Ok(p[start as usize..end as usize].to_vec())
    }

    fn put(&self, block: &Block, payload: &[u8]) -> Result<(), StoreError> {
        if payload.len() as u64 != block.header.payload_len {
            return Err(StoreError::Corrupt(format!(
                "payload of {} bytes for a header of {}",
                payload.len(),
                block.header.payload_len
            )));
        }
        let mut g = self.lock()?;
        if g.blocks.contains_key(&block.hash) {
            return Err(StoreError::Duplicate(block.hash));
        }
        g.blocks
            .insert(block.hash, (block.clone(), payload.to_vec()));
        g.order.push(block.hash);
        g.heads
            .insert((block.header.meta, block.header.name.clone()), block.hash);
        Ok(())
    }

    fn list(&self) -> Result<Vec<Block>, StoreError> {
        let g = self.lock()?;
        Ok(g.order
            .iter()
            .filter_map(|h| g.blocks.get(h).map(|(b, _)| b.clone()))
            .collect())
    }

    fn heads(&self) -> Result<Vec<SlotHead>, StoreError> {
        Ok(self
            .lock()?
            .heads
            .iter()
            .map(|((meta, name), hash)| SlotHead {
                meta: *meta,
                name: name.clone(),
                hash: *hash,
            })
            .collect())
    }

    fn set_head(
        &self,
        meta: Option<BlockHash>,
        name: &str,
        hash: &BlockHash,
    ) -> Result<(), StoreError> {
        let mut g = self.lock()?;
        if !g.blocks.contains_key(hash) {
            return Err(StoreError::NotFound(*hash));
        }
        g.heads.insert((meta, name.to_string()), *hash);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::BlockBuilder;
    use ed25519_dalek::SigningKey;

    fn meta_block(name: &str, parents: Vec<BlockHash>) -> (Block, Vec<u8>) {
        let cfg = serde_json::json!({"vocab_size":16,"hidden_size":8,"intermediate_size":8,
            "num_hidden_layers":1,"num_attention_heads":2,"num_local_experts":2});
        let payload = MetaPayload::new(name, cfg, None).unwrap().to_json();
        let b = BlockBuilder::meta(name)
            .parents(parents)
            .chunk_size(4096)
            .address("op")
            .timestamp_ms(1)
            .sign(&payload, &SigningKey::from_bytes(&[1; 32]));
        (b, payload)
    }

    #[test]
    fn memory_store_round_trip_and_dag() {
        let s = MemoryStore::new();
        let (a, pa) = meta_block("m", vec![]);
        s.put(&a, &pa).unwrap();
        assert_eq!(s.put(&a, &pa), Err(StoreError::Duplicate(a.hash)));
        let (b, pb) = meta_block("m", vec![a.hash]);
        s.put(&b, &pb).unwrap();
        assert_eq!(
            s.list().unwrap().iter().map(|b| b.hash).collect::<Vec<_>>(),
            vec![a.hash, b.hash]
        );
        assert_eq!(s.read_payload(&a.hash, 2, 3).unwrap(), pa[2..5].to_vec());
        assert!(matches!(
            s.read_payload(&a.hash, 2, pa.len() as u64),
            Err(StoreError::Range { .. })
        ));
        assert!(matches!(
            s.read_payload(&a.hash, u64::MAX, 2),
            Err(StoreError::Range { .. })
        ));
        assert_eq!(
            s.heads().unwrap(),
            vec![SlotHead {
                meta: None,
                name: "m".into(),
                hash: b.hash
            }]
        );
        let dag = load_dag(&s).unwrap();
        assert_eq!(dag.len(), 2);
        assert_eq!(dag.head(None, "m"), Some(b.hash));
        assert!(dag.config(&a.hash).is_some());
        s.set_head(None, "m", &a.hash).unwrap();
        assert_eq!(load_dag(&s).unwrap().head(None, "m"), Some(a.hash));
        assert!(s.set_head(None, "m", &BlockHash([9; 32])).is_err());
        assert!(s.put(&b, &pb[1..]).is_err());
    }
}
