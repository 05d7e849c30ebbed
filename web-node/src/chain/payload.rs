//! Phase two of verification: a payload, chunk by chunk, from any source.
//!
//! A block's header was verified first (phase one, [`super::validate_header`]).
//! Its payload then arrives in chunks, in any order, from peers, the relay or
//! a cache: [`PayloadAssembler`] takes the chunk-hash list once and checks it
//! against the header's payload root, checks every chunk against its hash as
//! it arrives (naming the block and chunk when one is bad, so the caller can
//! fetch it elsewhere), and when the last chunk is in runs the content rules
//! (tensors for chain B, the spec for chain A). Sans-IO: bytes in, verdicts out.

use super::{
    chunk_count, payload_root, validate_payload, verify_chunk, Block, BlockHash, BlockHeader,
    ChainError, MetaPayload,
};
use crate::spec::Config;

/// Where a header-verified block's payload stands.
#[derive(Debug, Clone, PartialEq)]
pub enum PayloadStatus {
    /// Not fetched.
    Absent,
    /// Some chunks are in and verified.
    Partial { chunks: u64, of: u64 },
    /// Every rule passed.
    Verified,
    /// The payload broke a rule (a bad chunk is not this: it is refused and
    /// can be fetched again; this is a complete payload that fails).
    Failed(String),
}

impl PayloadStatus {
    pub fn is_verified(&self) -> bool {
        matches!(self, Self::Verified)
    }
}

/// A payload that passed every rule.
#[derive(Debug, Clone)]
pub struct VerifiedPayload {
    pub hash: BlockHash,
    pub bytes: Vec<u8>,
    /// Chain A: the parsed spec and config.
    pub meta: Option<(MetaPayload, Config)>,
}

/// Collects and checks the chunks of one block's payload.
#[derive(Debug, Clone)]
pub struct PayloadAssembler {
    hash: BlockHash,
    header: BlockHeader,
    list: Option<Vec<BlockHash>>,
    chunks: Vec<Option<Vec<u8>>>,
    received: u64,
}

impl PayloadAssembler {
    /// Start assembling the payload of a header-verified block.
    pub fn new(block: &Block) -> Self {
        Self {
            hash: block.hash,
            header: block.header.clone(),
            list: None,
            chunks: Vec::new(),
            received: 0,
        }
    }

    pub fn hash(&self) -> BlockHash {
        self.hash
    }

    pub fn header(&self) -> &BlockHeader {
        &self.header
    }

    /// Number of chunks the payload has.
    pub fn chunk_count(&self) -> u64 {
        chunk_count(self.header.payload_len, self.header.chunk_size)
    }

    /// Byte range of chunk `index` within the payload.
    pub fn chunk_range(&self, index: u64) -> Option<std::ops::Range<u64>> {
        if index >= self.chunk_count() {
            return None;
        }
        let cs = self.header.chunk_size as u64;
        let start = index * cs;
        Some(start..(start + cs).min(self.header.payload_len))
    }

    /// The chunk list, once accepted.
    pub fn chunk_list(&self) -> Option<&[BlockHash]> {
        self.list.as_deref()
    }

    /// Take the chunk-hash list (fetched once, from anyone): it must have
    /// one entry per chunk and hash to the header's payload root.
    pub fn set_chunk_list(&mut self, list: Vec<BlockHash>) -> Result<(), ChainError> {
        if self.list.is_some() {
            return Ok(());
        }
        let n = self.chunk_count();
        if list.len() as u64 != n {
            return Err(ChainError::ChunkList {
                block: self.hash,
                reason: format!(
                    "chunk list has {} entries, the payload {n} chunks",
                    list.len()
                ),
            });
        }
        let root = payload_root(&list);
        if root != self.header.payload_root {
            return Err(ChainError::PayloadRoot {
                expected: self.header.payload_root,
                actual: root,
            });
        }
        self.chunks = vec![None; list.len()];
        self.list = Some(list);
        Ok(())
    }

    /// Chunks still missing, in order.
    pub fn missing(&self) -> Vec<u64> {
        if self.list.is_none() {
            return (0..self.chunk_count()).collect();
        }
        (0..self.chunks.len() as u64)
            .filter(|&i| self.chunks[i as usize].is_none())
            .collect()
    }

    pub fn received(&self) -> u64 {
        self.received
    }

    pub fn is_complete(&self) -> bool {
        self.list.is_some() && self.received == self.chunks.len() as u64
    }

    pub fn status(&self) -> PayloadStatus {
        if self.received == 0 {
            PayloadStatus::Absent
        } else {
            PayloadStatus::Partial {
                chunks: self.received,
                of: self.chunk_count(),
            }
        }
    }

    /// Check one chunk against its hash and keep it. A bad chunk is refused
    /// with [`ChainError::ChunkHash`] naming block and index, and nothing is
    /// kept: the same chunk from another source can still complete the
    /// payload. Returns whether the payload is now complete.
    pub fn add_chunk(&mut self, index: u64, bytes: Vec<u8>) -> Result<bool, ChainError> {
        let list = self.list.as_deref().ok_or_else(|| ChainError::ChunkList {
            block: self.hash,
            reason: "a chunk arrived before the chunk list".into(),
        })?;
        let want = self
            .chunk_range(index)
            .ok_or_else(|| ChainError::ChunkList {
                block: self.hash,
                reason: format!("chunk index {index} past the {} chunks", list.len()),
            })?;
        if bytes.len() as u64 != want.end - want.start {
            return Err(ChainError::ChunkHash {
                block: self.hash,
                index,
            });
        }
        verify_chunk(&self.hash, list, index, &bytes)?;
        let slot = &mut self.chunks[index as usize];
        if slot.is_none() {
            *slot = Some(bytes);
            self.received += 1;
        }
        Ok(self.is_complete())
    }

    /// The whole payload, checked against every payload rule (length, root,
    /// content: tensors from `config` for chain B, the spec for chain A).
    pub fn finish(self, config: Option<&Config>) -> Result<VerifiedPayload, ChainError> {
        if !self.is_complete() {
            return Err(ChainError::PayloadLength {
                header: self.header.payload_len,
                actual: self.chunks.iter().flatten().map(|c| c.len() as u64).sum(),
            });
        }
        let mut bytes = Vec::with_capacity(self.header.payload_len as usize);
        for c in self.chunks.into_iter().flatten() {
            bytes.extend_from_slice(&c);
        }
        let meta = validate_payload(&self.header, &bytes, config)?;
        Ok(VerifiedPayload {
            hash: self.hash,
            bytes,
            meta,
        })
    }
}
