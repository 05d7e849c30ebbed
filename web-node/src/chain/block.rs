//! Block header, canonical postcard encoding, signing and hashing.
//!
//! Encoded block ("envelope"): `BLOCK_MAGIC || u32 LE header_len || header
//! (postcard) || signature (64 bytes)`, followed by the payload in files and
//! uploads. Block hash = SHA-256(header || signature). Signature = ed25519
//! over `SIGNING_DOMAIN || header`.

use std::fmt;
use std::str::FromStr;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{limits, ChainError};
use crate::spec::Slot;

/// First bytes of every encoded block.
pub const BLOCK_MAGIC: &[u8; 4] = b"AIBK";
/// Domain separation for block signatures.
pub const SIGNING_DOMAIN: &[u8] = b"aiblock/block/v1";
/// The header version this code writes and accepts.
pub const HEADER_VERSION: u16 = 1;

/// A SHA-256 hash (block hash, chunk hash, payload root). Hex in JSON and text.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct BlockHash(pub [u8; 32]);

impl BlockHash {
    pub fn of(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
    pub fn from_hex(s: &str) -> Result<Self, ChainError> {
        if s.len() != 64 {
            return Err(ChainError::Field(format!(
                "hash must be 64 hex characters, got {}",
                s.len()
            )));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out)
            .map_err(|e| ChainError::Field(format!("hash is not hex: {e}")))?;
        Ok(Self(out))
    }
    /// First 8 hex characters, for logs and UIs.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }
}

impl fmt::Display for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}
impl fmt::Debug for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlockHash({})", self.to_hex())
    }
}
impl FromStr for BlockHash {
    type Err = ChainError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_hex(s)
    }
}
impl Serialize for BlockHash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&self.to_hex())
        } else {
            self.0.serialize(s)
        }
    }
}
impl<'de> Deserialize<'de> for BlockHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            Self::from_hex(&s).map_err(serde::de::Error::custom)
        } else {
            Ok(Self(<[u8; 32]>::deserialize(d)?))
        }
    }
}

/// Which chain a block is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ChainId {
    /// Model architecture (meta blocks).
    A,
    /// Parameters: shared, router and expert blocks.
    B,
}

impl ChainId {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "A" | "a" => Some(Self::A),
            "B" | "b" => Some(Self::B),
            _ => None,
        }
    }
}

/// What a block holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BlockKind {
    Meta,
    Shared,
    Router,
    Expert,
}

impl BlockKind {
    /// The seed's `block_type` strings.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "meta" => Some(Self::Meta),
            "shared" => Some(Self::Shared),
            "router" => Some(Self::Router),
            "expert" => Some(Self::Expert),
            _ => None,
        }
    }
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Meta => "meta",
            Self::Shared => "shared",
            Self::Router => "router",
            Self::Expert => "expert",
        }
    }
    /// The chain this kind lives on.
    pub fn chain(&self) -> ChainId {
        match self {
            Self::Meta => ChainId::A,
            _ => ChainId::B,
        }
    }

    /// The kind of block that holds a chain-B slot (the one mapping). A
    /// layer's shared expert (Qwen2-MoE) is held with its router, so its
    /// block is of the router kind.
    pub fn of_slot(slot: Slot) -> Self {
        match slot {
            Slot::Shared => Self::Shared,
            Slot::Router { .. } | Slot::SharedExpert { .. } => Self::Router,
            Slot::Expert { .. } => Self::Expert,
        }
    }
}

impl From<Slot> for BlockKind {
    fn from(slot: Slot) -> Self {
        Self::of_slot(slot)
    }
}

/// Encoding of the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PayloadDtype {
    /// Chain-A meta JSON.
    Json,
    /// safetensors with every tensor F32.
    F32,
    /// safetensors with every tensor F16.
    F16,
    /// safetensors with every tensor BF16.
    BF16,
    /// Expert blocks only: every matrix in `q8_0` (packed I8 values and F16
    /// scales per group of 32; layout in [`crate::spec::quant`]).
    Q8_0,
    /// Expert blocks only: every matrix in `q4_0` (packed U8 nibbles and F16
    /// scales per group of 32).
    Q4_0,
}

impl PayloadDtype {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Json => "json",
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
            Self::Q8_0 => "Q8_0",
            Self::Q4_0 => "Q4_0",
        }
    }

    /// The quantized format, for `Q8_0` and `Q4_0`.
    pub fn quant(&self) -> Option<crate::spec::quant::QuantFormat> {
        use crate::spec::quant::QuantFormat;
        match self {
            Self::Q8_0 => Some(QuantFormat::Q8_0),
            Self::Q4_0 => Some(QuantFormat::Q4_0),
            _ => None,
        }
    }

    /// The payload dtype of a quantized format.
    pub fn of_quant(f: crate::spec::quant::QuantFormat) -> Self {
        match f {
            crate::spec::quant::QuantFormat::Q8_0 => Self::Q8_0,
            crate::spec::quant::QuantFormat::Q4_0 => Self::Q4_0,
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "json" => Some(Self::Json),
            "F32" | "f32" => Some(Self::F32),
            "F16" | "f16" => Some(Self::F16),
            "BF16" | "bf16" => Some(Self::BF16),
            "Q8_0" | "q8_0" => Some(Self::Q8_0),
            "Q4_0" | "q4_0" => Some(Self::Q4_0),
            _ => None,
        }
    }
}

/// The signed part of a block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlockHeader {
    pub version: u16,
    pub chain: ChainId,
    pub kind: BlockKind,
    /// Model name (chain A) or slot name (chain B).
    pub name: String,
    /// Chain-B blocks: the chain-A meta block they conform to. Chain A: None.
    pub meta: Option<BlockHash>,
    /// Previous version of the slot and any other dependency.
    pub parents: Vec<BlockHash>,
    pub payload_len: u64,
    pub chunk_size: u32,
    /// SHA-256 over the concatenated chunk hashes.
    pub payload_root: BlockHash,
    pub dtype: PayloadDtype,
    /// Loss the miner claims on the public eval set (None for genesis / meta).
    pub candidate_loss: Option<f32>,
    /// ed25519 public key of the miner.
    pub miner: [u8; 32],
    /// Miner's display address (the seed's `--address`).
    pub address: String,
    /// Milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
}

impl BlockHeader {
    /// Canonical encoding.
    pub fn encode(&self) -> Vec<u8> {
        // postcard into a Vec cannot fail for this type (no maps, no unsized seq lengths).
        postcard::to_allocvec(self).unwrap_or_default()
    }

    /// Decode and require the canonical encoding (no trailing bytes, re-encodes identically).
    pub fn decode(bytes: &[u8]) -> Result<Self, ChainError> {
        if bytes.len() > limits::MAX_HEADER_LEN {
            return Err(ChainError::TooLarge {
                what: "header",
                len: bytes.len() as u64,
                max: limits::MAX_HEADER_LEN as u64,
            });
        }
        let (h, rest): (BlockHeader, _) = postcard::take_from_bytes(bytes)
            .map_err(|e| ChainError::Malformed(format!("header: {e}")))?;
        if !rest.is_empty() {
            return Err(ChainError::Malformed(format!(
                "{} trailing bytes after header",
                rest.len()
            )));
        }
        if h.encode() != bytes {
            return Err(ChainError::Malformed(
                "header is not canonically encoded".into(),
            ));
        }
        Ok(h)
    }

    /// The bytes an ed25519 signature covers.
    pub fn signing_bytes(&self) -> Vec<u8> {
        let enc = self.encode();
        let mut v = Vec::with_capacity(SIGNING_DOMAIN.len() + enc.len());
        v.extend_from_slice(SIGNING_DOMAIN);
        v.extend_from_slice(&enc);
        v
    }

    pub fn miner_hex(&self) -> String {
        hex::encode(self.miner)
    }
}

/// A signed block header (the payload travels separately, in chunks).
#[derive(Debug, Clone, PartialEq)]
pub struct Block {
    pub header: BlockHeader,
    /// Canonical encoding of `header` (what is hashed and signed).
    header_bytes: Vec<u8>,
    pub signature: [u8; 64],
    pub hash: BlockHash,
}

fn hash_of(header_bytes: &[u8], signature: &[u8; 64]) -> BlockHash {
    let mut h = Sha256::new();
    h.update(header_bytes);
    h.update(signature);
    BlockHash(h.finalize().into())
}

impl Block {
    /// Sign a header with the miner key. The header's `miner` field is set from the key.
    pub fn sign(mut header: BlockHeader, key: &SigningKey) -> Self {
        header.miner = key.verifying_key().to_bytes();
        let header_bytes = header.encode();
        let mut msg = SIGNING_DOMAIN.to_vec();
        msg.extend_from_slice(&header_bytes);
        let signature = key.sign(&msg).to_bytes();
        let hash = hash_of(&header_bytes, &signature);
        Self {
            header,
            header_bytes,
            signature,
            hash,
        }
    }

    /// Assemble from a header and a detached signature (as in the seed's JSON
    /// upload). The signature is not checked here; see [`Block::verify_signature`].
    pub fn from_parts(header: BlockHeader, signature: [u8; 64]) -> Self {
        let header_bytes = header.encode();
        let hash = hash_of(&header_bytes, &signature);
        Self {
            header,
            header_bytes,
            signature,
            hash,
        }
    }

    pub fn header_bytes(&self) -> &[u8] {
        &self.header_bytes
    }

    /// Check the ed25519 signature against the miner key in the header.
    pub fn verify_signature(&self) -> Result<(), ChainError> {
        let key = VerifyingKey::from_bytes(&self.header.miner)
            .map_err(|e| ChainError::BadPublicKey(e.to_string()))?;
        let sig = Signature::from_bytes(&self.signature);
        let mut msg = SIGNING_DOMAIN.to_vec();
        msg.extend_from_slice(&self.header_bytes);
        key.verify_strict(&msg, &sig)
            .or_else(|_| key.verify(&msg, &sig))
            .map_err(|_| ChainError::BadSignature(self.header.miner_hex()))
    }

    /// Envelope bytes: magic, header length, header, signature.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(4 + 4 + self.header_bytes.len() + 64);
        v.extend_from_slice(BLOCK_MAGIC);
        v.extend_from_slice(&(self.header_bytes.len() as u32).to_le_bytes());
        v.extend_from_slice(&self.header_bytes);
        v.extend_from_slice(&self.signature);
        v
    }

    /// Length of the envelope [`Block::encode`] writes.
    pub fn encoded_len(&self) -> usize {
        8 + self.header_bytes.len() + 64
    }

    /// Decode an envelope from the front of `bytes`; returns the block and
    /// the number of bytes it took (the payload, if any, follows). Never panics.
    pub fn decode_prefix(bytes: &[u8]) -> Result<(Self, usize), ChainError> {
        if bytes.len() < 8 {
            return Err(ChainError::Malformed(
                "shorter than the block envelope".into(),
            ));
        }
        if &bytes[..4] != BLOCK_MAGIC {
            return Err(ChainError::Malformed(
                "bad magic (not an AI-Block block)".into(),
            ));
        }
        let mut len4 = [0u8; 4];
        len4.copy_from_slice(&bytes[4..8]);
        let hlen = u32::from_le_bytes(len4) as usize;
        if hlen > limits::MAX_HEADER_LEN {
            return Err(ChainError::TooLarge {
                what: "header",
                len: hlen as u64,
                max: limits::MAX_HEADER_LEN as u64,
            });
        }
        let end = 8 + hlen + 64;
        if bytes.len() < end {
            return Err(ChainError::Malformed("truncated block envelope".into()));
        }
        let header_bytes = bytes[8..8 + hlen].to_vec();
        let header = BlockHeader::decode(&header_bytes)?;
        let mut signature = [0u8; 64];
        signature.copy_from_slice(&bytes[8 + hlen..end]);
        let hash = hash_of(&header_bytes, &signature);
        Ok((
            Self {
                header,
                header_bytes,
                signature,
                hash,
            },
            end,
        ))
    }

    /// Decode an envelope that must span all of `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<Self, ChainError> {
        let (b, used) = Self::decode_prefix(bytes)?;
        if used != bytes.len() {
            return Err(ChainError::Malformed(format!(
                "{} trailing bytes after block envelope",
                bytes.len() - used
            )));
        }
        Ok(b)
    }

    /// Check the block hashes to `expected` (a block fetched by hash).
    pub fn check_hash(&self, expected: &BlockHash) -> Result<(), ChainError> {
        if &self.hash != expected {
            return Err(ChainError::HashMismatch {
                expected: *expected,
                actual: self.hash,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn header() -> BlockHeader {
        BlockHeader {
            version: HEADER_VERSION,
            chain: ChainId::B,
            kind: BlockKind::Expert,
            name: "layer0.expert1".into(),
            meta: Some(BlockHash([7; 32])),
            parents: vec![BlockHash([1; 32])],
            payload_len: 10,
            chunk_size: 4096,
            payload_root: BlockHash([2; 32]),
            dtype: PayloadDtype::F32,
            candidate_loss: Some(0.85),
            miner: [0; 32],
            address: "alice".into(),
            timestamp_ms: 1_700_000_000_000,
        }
    }

    #[test]
    fn sign_encode_decode_round_trip() {
        let key = SigningKey::from_bytes(&[9; 32]);
        let b = Block::sign(header(), &key);
        b.verify_signature().unwrap();
        let enc = b.encode();
        assert_eq!(enc.len(), b.encoded_len());
        let d = Block::decode(&enc).unwrap();
        assert_eq!(d, b);
        assert_eq!(d.hash, b.hash);
    }

    #[test]
    fn tampered_header_fails_signature() {
        let key = SigningKey::from_bytes(&[9; 32]);
        let b = Block::sign(header(), &key);
        let mut h = b.header.clone();
        h.candidate_loss = Some(0.1);
        let forged = Block::from_parts(h, b.signature);
        assert!(matches!(
            forged.verify_signature(),
            Err(ChainError::BadSignature(_))
        ));
        assert_ne!(forged.hash, b.hash);
    }

    #[test]
    fn decoder_rejects_garbage_without_panicking() {
        let key = SigningKey::from_bytes(&[9; 32]);
        let enc = Block::sign(header(), &key).encode();
        for cut in 0..enc.len() {
            assert!(Block::decode(&enc[..cut]).is_err());
        }
        let mut extra = enc.clone();
        extra.push(0);
        assert!(Block::decode(&extra).is_err());
        let mut bad = enc.clone();
        bad[0] = b'X';
        assert!(matches!(Block::decode(&bad), Err(ChainError::Malformed(_))));
        let mut huge = enc.clone();
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Block::decode(&huge),
            Err(ChainError::TooLarge { .. })
        ));
    }

    proptest::proptest! {
        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = Block::decode(&bytes);
            let mut v = BLOCK_MAGIC.to_vec();
            v.extend_from_slice(&((bytes.len().saturating_sub(64)) as u32).to_le_bytes());
            v.extend_from_slice(&bytes);
            let _ = Block::decode(&v);
        }
    }

    #[test]
    fn hash_hex_round_trip() {
        let h = BlockHash::of(b"abc");
        assert_eq!(
            h.to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(BlockHash::from_hex(&h.to_hex()).unwrap(), h);
        assert!(BlockHash::from_hex("zz").is_err());
        assert!(BlockHash::from_hex(&"g".repeat(64)).is_err());
    }
}
