use super::{BlockHash, BlockKind, ChainId};

/// Why a block was refused. One variant per validation rule.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ChainError {
    /// The encoded block could not be decoded (bad magic, truncated, trailing bytes, non-canonical).
    #[error("malformed block: {0}")]
    Malformed(String),
    #[error("unsupported header version {0}")]
    UnsupportedVersion(u16),
    /// The ed25519 signature does not verify against the miner key.
    #[error("bad signature: the block is not signed by miner key {0}")]
    BadSignature(String),
    /// The miner key is not a valid ed25519 point.
    #[error("bad miner public key: {0}")]
    BadPublicKey(String),
    /// The block's hash is not the hash it was asked for or announced under.
    #[error("hash mismatch: expected {expected}, got {actual}")]
    HashMismatch {
        expected: BlockHash,
        actual: BlockHash,
    },
    #[error("payload length mismatch: header says {header} bytes, got {actual}")]
    PayloadLength { header: u64, actual: u64 },
    /// A chunk does not hash to its entry in the chunk list.
    #[error("chunk {index} of block {block} does not match its hash")]
    ChunkHash { block: BlockHash, index: u64 },
    /// A chunk list of the wrong length, or a chunk index past its end.
    #[error("block {block}: {reason}")]
    ChunkList { block: BlockHash, reason: String },
    /// The payload a rule needs has not been verified yet (chain A: the
    /// meta payload gives the config every chain-B block is checked against).
    #[error("the payload of block {0} is not verified yet")]
    PayloadMissing(BlockHash),
    /// The chunk list does not hash to the header's payload root.
    #[error("payload root mismatch: chunk list hashes to {actual}, header says {expected}")]
    PayloadRoot {
        expected: BlockHash,
        actual: BlockHash,
    },
    #[error("block kind {kind:?} does not belong on chain {chain:?}")]
    ChainKind { chain: ChainId, kind: BlockKind },
    /// A chain-B block must link to a chain-A meta block; a chain-A block must not.
    #[error("meta link: {0}")]
    MetaLink(String),
    #[error("meta block {0} is unknown")]
    UnknownMeta(BlockHash),
    #[error("meta link {0} is not a chain-A meta block")]
    MetaNotChainA(BlockHash),
    #[error("parent {0} is unknown")]
    UnknownParent(BlockHash),
    #[error("block lists itself as a parent")]
    SelfParent,
    #[error("duplicate parent {0}")]
    DuplicateParent(BlockHash),
    #[error("dependency cycle through {0}")]
    Cycle(BlockHash),
    /// The name is not a valid slot name, or does not fit the block kind.
    #[error("bad slot name: {0}")]
    SlotName(String),
    /// The slot is outside the spec (layer >= num_layers, expert >= num_experts).
    #[error("slot outside the spec: {0}")]
    SlotOutOfSpec(String),
    /// The payload's tensors are not exactly those the config implies for the slot.
    #[error("tensors do not match the config: {0}")]
    Tensors(String),
    #[error("bad meta payload: {0}")]
    MetaPayload(String),
    #[error("{what} is too large: {len} > {max}")]
    TooLarge {
        what: &'static str,
        len: u64,
        max: u64,
    },
    #[error("bad header field: {0}")]
    Field(String),
    /// The slot already has a head and the block does not build on it.
    #[error("slot {slot} has head {head}; a new version must list it as parent")]
    NotHead { slot: String, head: BlockHash },
    /// A parent of the same slot that is not the slot's head (a fork).
    #[error("parent {parent} is an old version of slot {slot}; its head is {head}")]
    StaleParent {
        slot: String,
        parent: BlockHash,
        head: BlockHash,
    },
    #[error("block {0} already exists")]
    Duplicate(BlockHash),
}
