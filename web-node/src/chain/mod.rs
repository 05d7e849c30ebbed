//! The signed DAG chain: block header, canonical encoding, hashing,
//! signatures, payload chunks, the DAG index and validation.
//!
//! Chain A holds model (meta) blocks, chain B one block per slot version
//! (`shared`, `layerN.router`, `layerN.expertM`). Every rule a block must
//! obey has its own [`ChainError`] variant.

mod block;
mod build;
mod chunks;
mod dag;
mod error;
mod held;
mod meta;
mod payload;
mod validate;

pub use block::{
    Block, BlockHash, BlockHeader, BlockKind, ChainId, PayloadDtype, BLOCK_MAGIC, HEADER_VERSION,
    SIGNING_DOMAIN,
};
pub use build::{now_ms, BlockBuilder};
pub use chunks::{chunk_count, chunk_hashes, payload_root, verify_chunk, ChunkHasher};
pub use dag::{Dag, DagEntry, SlotHead};
pub use error::ChainError;
pub use held::{verify_held, verify_held_payload};
pub use meta::{MetaPayload, ARCHITECTURE};
pub use payload::{PayloadAssembler, PayloadStatus, VerifiedPayload};
pub use validate::{
    check_context, check_payload_content, check_payload_integrity, check_standalone,
    check_tensor_header, parse_safetensors, payload_dtype_of, payload_dtype_of_tensors,
    validate_block, validate_header, validate_payload, ChainView, ValidatedBlock,
};

/// Limits every block must respect; each is checked before anything is stored.
pub mod limits {
    /// Default payload chunk size (256 KiB).
    pub const DEFAULT_CHUNK_SIZE: u32 = 256 * 1024;
    /// Smallest chunk size a block may declare (keeps chunk lists short).
    pub const MIN_CHUNK_SIZE: u32 = 4 * 1024;
    /// Largest chunk size a block may declare (one chunk fits one message).
    pub const MAX_CHUNK_SIZE: u32 = 8 * 1024 * 1024;
    /// Largest encoded header (name, address and parents are bounded too).
    pub const MAX_HEADER_LEN: usize = 16 * 1024;
    /// Largest payload of a chain-B block (one Mixtral 8x22B expert in bf16 is ~0.9 GB).
    pub const MAX_PAYLOAD_LEN: u64 = 2 * 1024 * 1024 * 1024;
    /// Largest chain-A (meta) payload: spec, config.json and tokenizer.json.
    pub const MAX_META_PAYLOAD_LEN: u64 = 32 * 1024 * 1024;
    /// Most parents a block may list.
    pub const MAX_PARENTS: usize = 16;
    /// Longest block name.
    pub const MAX_NAME_LEN: usize = 64;
    /// Longest miner display address.
    pub const MAX_ADDRESS_LEN: usize = 128;
    /// Largest safetensors header inside a payload.
    pub const MAX_SAFETENSORS_HEADER: usize = 16 * 1024 * 1024;
}
