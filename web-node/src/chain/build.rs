//! The one way to make a block: [`BlockBuilder`] fills every header field
//! from the payload (length, chunk size, payload root) and signs it. Used by
//! checkpoint splitting, the seed's JSON upload, the miner and the tests.

use ed25519_dalek::SigningKey;

use super::{
    limits, payload_root, Block, BlockHash, BlockHeader, BlockKind, ChunkHasher, PayloadDtype,
    HEADER_VERSION,
};
use crate::spec::Slot;

/// Header fields of a block that are not derived from its payload.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockBuilder {
    kind: BlockKind,
    name: String,
    meta: Option<BlockHash>,
    parents: Vec<BlockHash>,
    dtype: PayloadDtype,
    candidate_loss: Option<f32>,
    address: String,
    timestamp_ms: u64,
    chunk_size: u32,
}

impl BlockBuilder {
    /// A chain-A meta block for model `name` (payload: the JSON spec).
    pub fn meta(name: impl Into<String>) -> Self {
        Self::new(BlockKind::Meta, name.into(), None, PayloadDtype::Json)
    }

    /// A chain-B block for `slot` under meta block `meta`.
    pub fn slot(meta: BlockHash, slot: Slot, dtype: PayloadDtype) -> Self {
        Self::new(
            BlockKind::of_slot(slot),
            slot.to_string(),
            Some(meta),
            dtype,
        )
    }

    /// Any kind and name, unchecked (the seed's upload, tests of bad blocks).
    pub fn new(
        kind: BlockKind,
        name: String,
        meta: Option<BlockHash>,
        dtype: PayloadDtype,
    ) -> Self {
        Self {
            kind,
            name,
            meta,
            parents: Vec::new(),
            dtype,
            candidate_loss: None,
            address: String::new(),
            timestamp_ms: now_ms(),
            chunk_size: limits::DEFAULT_CHUNK_SIZE,
        }
    }

    pub fn parents(mut self, parents: impl IntoIterator<Item = BlockHash>) -> Self {
        self.parents = parents.into_iter().collect();
        self
    }

    pub fn candidate_loss(mut self, loss: Option<f32>) -> Self {
        self.candidate_loss = loss;
        self
    }

    pub fn address(mut self, address: impl Into<String>) -> Self {
        self.address = address.into();
        self
    }

    pub fn timestamp_ms(mut self, ms: u64) -> Self {
        self.timestamp_ms = ms;
        self
    }

    pub fn chunk_size(mut self, chunk_size: u32) -> Self {
        self.chunk_size = chunk_size;
        self
    }

    /// The header for `payload`, signed by `miner` (a public key).
    pub fn header(self, payload: &[u8], miner: [u8; 32]) -> BlockHeader {
        let mut hasher = ChunkHasher::new(self.chunk_size);
        hasher.update(payload);
        let (hashes, _, len) = hasher.finish();
        self.header_for(len, payload_root(&hashes), miner)
    }

    /// The header for a payload hashed elsewhere (streamed through a
    /// [`ChunkHasher`], or deliberately wrong in tests).
    pub fn header_for(
        self,
        payload_len: u64,
        payload_root: BlockHash,
        miner: [u8; 32],
    ) -> BlockHeader {
        BlockHeader {
            version: HEADER_VERSION,
            chain: self.kind.chain(),
            kind: self.kind,
            name: self.name,
            meta: self.meta,
            parents: self.parents,
            payload_len,
            chunk_size: self.chunk_size,
            payload_root,
            dtype: self.dtype,
            candidate_loss: self.candidate_loss,
            miner,
            address: self.address,
            timestamp_ms: self.timestamp_ms,
        }
    }

    /// Build the header for `payload` and sign it with `key`.
    pub fn sign(self, payload: &[u8], key: &SigningKey) -> Block {
        let h = self.header(payload, key.verifying_key().to_bytes());
        Block::sign(h, key)
    }

    /// [`BlockBuilder::header_for`], signed with `key`.
    pub fn sign_for(self, payload_len: u64, payload_root: BlockHash, key: &SigningKey) -> Block {
        Block::sign(
            self.header_for(payload_len, payload_root, key.verifying_key().to_bytes()),
            key,
        )
    }
}

/// Milliseconds since the Unix epoch (0 where the clock is unavailable).
pub fn now_ms() -> u64 {
    #[cfg(target_arch = "wasm32")]
    {
        js_sys::Date::now() as u64
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
}
