//! Payload chunks: fixed-size pieces, each hashed; the payload root is
//! SHA-256 over the concatenated chunk hashes. A node fetches the chunk list
//! once, checks it against the root, then checks each chunk as it arrives.

use sha2::{Digest, Sha256};

use super::{BlockHash, ChainError};

/// Number of chunks of a payload of `len` bytes.
pub fn chunk_count(len: u64, chunk_size: u32) -> u64 {
    if chunk_size == 0 {
        return 0;
    }
    len.div_ceil(chunk_size as u64)
}

/// Hash of every chunk of `payload`.
pub fn chunk_hashes(payload: &[u8], chunk_size: u32) -> Vec<BlockHash> {
    if chunk_size == 0 {
        return Vec::new();
    }
    payload
        .chunks(chunk_size as usize)
        .map(BlockHash::of)
        .collect()
}

/// The payload root of a chunk list.
pub fn payload_root(hashes: &[BlockHash]) -> BlockHash {
    let mut h = Sha256::new();
    for c in hashes {
        h.update(c.0);
    }
    BlockHash(h.finalize().into())
}

/// Check chunk `index` of `block` against its chunk list (already checked
/// against the root).
pub fn verify_chunk(
    block: &BlockHash,
    hashes: &[BlockHash],
    index: u64,
    bytes: &[u8],
) -> Result<(), ChainError> {
    let expected = usize::try_from(index)
        .ok()
        .and_then(|i| hashes.get(i))
        .ok_or_else(|| ChainError::ChunkList {
            block: *block,
            reason: format!("chunk index {index} past the {} chunks", hashes.len()),
        })?;
    if BlockHash::of(bytes) != *expected {
        return Err(ChainError::ChunkHash {
            block: *block,
            index,
        });
    }
    Ok(())
}

/// Streaming chunker: feed bytes in any pieces, get the chunk list, root and length.
#[derive(Debug, Clone)]
pub struct ChunkHasher {
    chunk_size: usize,
    current: Sha256,
    in_current: usize,
    hashes: Vec<BlockHash>,
    len: u64,
}

impl ChunkHasher {
    pub fn new(chunk_size: u32) -> Self {
        Self {
            chunk_size: chunk_size.max(1) as usize,
            current: Sha256::new(),
            in_current: 0,
            hashes: Vec::new(),
            len: 0,
        }
    }

    pub fn update(&mut self, mut bytes: &[u8]) {
        self.len += bytes.len() as u64;
        while !bytes.is_empty() {
            let take = (self.chunk_size - self.in_current).min(bytes.len());
            self.current.update(&bytes[..take]);
            self.in_current += take;
            bytes = &bytes[take..];
            if self.in_current == self.chunk_size {
                let done = std::mem::take(&mut self.current);
                self.hashes.push(BlockHash(done.finalize().into()));
                self.in_current = 0;
            }
        }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Finish: (chunk hashes, payload root, total length).
    pub fn finish(mut self) -> (Vec<BlockHash>, BlockHash, u64) {
        if self.in_current > 0 {
            self.hashes.push(BlockHash(self.current.finalize().into()));
        }
        let root = payload_root(&self.hashes);
        (self.hashes, root, self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn empty_payload_has_no_chunks() {
        assert!(chunk_hashes(&[], 4096).is_empty());
        assert_eq!(chunk_count(0, 4096), 0);
        assert_eq!(payload_root(&[]), BlockHash::of(&[]));
    }

    #[test]
    fn verify_chunk_rejects_wrong_bytes_and_index() {
        let p: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let hs = chunk_hashes(&p, 4096);
        assert_eq!(hs.len(), 3);
        let b = BlockHash::of(b"block");
        verify_chunk(&b, &hs, 2, &p[8192..]).unwrap();
        assert_eq!(
            verify_chunk(&b, &hs, 1, &p[8192..]),
            Err(ChainError::ChunkHash { block: b, index: 1 })
        );
        assert!(matches!(
            verify_chunk(&b, &hs, 3, &p[8192..]),
            Err(ChainError::ChunkList { .. })
        ));
        assert!(verify_chunk(&b, &hs, u64::MAX, &[]).is_err());
    }

    proptest! {
        #[test]
        fn streaming_equals_batch(data in proptest::collection::vec(any::<u8>(), 0..20_000),
                                  cs in 1u32..5000, splits in proptest::collection::vec(0usize..3000, 0..8)) {
            let mut h = ChunkHasher::new(cs);
            let mut rest: &[u8] = &data;
            for s in splits {
                let s = s.min(rest.len());
                h.update(&rest[..s]);
                rest = &rest[s..];
            }
            h.update(rest);
            let (hs, root, len) = h.finish();
            prop_assert_eq!(len, data.len() as u64);
            prop_assert_eq!(&hs, &chunk_hashes(&data, cs));
            prop_assert_eq!(hs.len() as u64, chunk_count(data.len() as u64, cs));
            prop_assert_eq!(root, payload_root(&chunk_hashes(&data, cs)));
        }
    }
}
