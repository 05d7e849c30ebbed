//! REST JSON types shared by the relay, the CLI and the browser.
//!
//! * [`BlockInfo`]: one block as `GET /chain/{A|B}/blocks` and `GET /blocks/{hash}` return it.
//! * [`SeedUpload`]: the seed's `POST /upload_moe_experts` body, plus optional
//!   extensions (`meta_hash`, `timestamp_ms`, `chunk_size`). [`SeedUpload::header`]
//!   turns it into the exact [`BlockHeader`] whose
//!   [`signing_bytes`](BlockHeader::signing_bytes) `payload_sig` signs, so a client
//!   signs the same header the relay rebuilds; [`SeedUpload::build`] does both sides.
//! * [`ApiError`]: every error body, `{code, message}`, with [`ApiError::status`].
//!
//! Hashes and keys are hex in JSON. Everything here compiles for wasm32.

use base64::Engine as _;
use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};

use crate::chain::{
    limits, payload_root, Block, BlockBuilder, BlockHash, BlockHeader, BlockKind, ChainError,
    ChainId, PayloadDtype, HEADER_VERSION,
};
use crate::model::Slot;

/// Largest JSON body of `POST /upload_moe_experts` (base64 inflates the payload by 4/3;
/// use the binary `POST /blocks` for larger blocks).
pub const MAX_JSON_UPLOAD: usize = 64 * 1024 * 1024;

/// Error body of every failed request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    /// Stable machine-readable code (see [`codes`]).
    pub code: String,
    /// Human-readable explanation.
    pub message: String,
}

/// Error codes and the HTTP status each maps to (see [`ApiError::status`]).
pub mod codes {
    /// 400: the request body or a parameter could not be parsed.
    pub const MALFORMED: &str = "malformed";
    /// 400: the block broke a validation rule (chain, parents, slot, tensors...).
    pub const INVALID_BLOCK: &str = "invalid_block";
    /// 401: the signature does not verify.
    pub const BAD_SIGNATURE: &str = "bad_signature";
    /// 403: the miner key is not a valid key, or is not allowed.
    pub const FORBIDDEN: &str = "forbidden";
    /// 404: no such block / resource.
    pub const NOT_FOUND: &str = "not_found";
    /// 409: the block already exists.
    pub const DUPLICATE: &str = "duplicate";
    /// 409: the block does not build on its slot's current head.
    pub const NOT_HEAD: &str = "not_head";
    /// 413: the body or the block is larger than the limits.
    pub const TOO_LARGE: &str = "too_large";
    /// 416: the requested byte range lies outside the payload.
    pub const RANGE_NOT_SATISFIABLE: &str = "range_not_satisfiable";
    /// 422: the quality gate rejected the block.
    pub const REJECTED: &str = "rejected";
    /// 429: too many requests from one key or address.
    pub const RATE_LIMITED: &str = "rate_limited";
    /// 500: the server failed.
    pub const INTERNAL: &str = "internal";
    /// 500: a stored payload failed its hash check and was quarantined.
    pub const CORRUPT: &str = "corrupt";
    /// 405: the route exists, not with this method.
    pub const METHOD_NOT_ALLOWED: &str = "method_not_allowed";
    /// 408: the request's body stalled and was cut.
    pub const TIMEOUT: &str = "timeout";
    /// 415: the body's Content-Type is not the route's.
    pub const UNSUPPORTED_MEDIA_TYPE: &str = "unsupported_media_type";
    /// 503: the server is at a capacity limit; retry after `Retry-After`.
    pub const UNAVAILABLE: &str = "unavailable";
}

impl ApiError {
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        Self {
            code: code.to_string(),
            message: message.into(),
        }
    }
    pub fn malformed(message: impl Into<String>) -> Self {
        Self::new(codes::MALFORMED, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(codes::NOT_FOUND, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(codes::INTERNAL, message)
    }

    /// HTTP status for this error's code.
    pub fn status(&self) -> u16 {
        match self.code.as_str() {
            codes::MALFORMED | codes::INVALID_BLOCK => 400,
            codes::BAD_SIGNATURE => 401,
            codes::FORBIDDEN => 403,
            codes::NOT_FOUND => 404,
            codes::METHOD_NOT_ALLOWED => 405,
            codes::TIMEOUT => 408,
            codes::DUPLICATE | codes::NOT_HEAD => 409,
            codes::TOO_LARGE => 413,
            codes::UNSUPPORTED_MEDIA_TYPE => 415,
            codes::RANGE_NOT_SATISFIABLE => 416,
            codes::REJECTED => 422,
            codes::RATE_LIMITED => 429,
            codes::UNAVAILABLE => 503,
            _ => 500,
        }
    }
}

impl From<ChainError> for ApiError {
    fn from(e: ChainError) -> Self {
        let code = match &e {
            ChainError::Malformed(_) => codes::MALFORMED,
            ChainError::BadSignature(_) => codes::BAD_SIGNATURE,
            ChainError::BadPublicKey(_) => codes::FORBIDDEN,
            ChainError::Duplicate(_) => codes::DUPLICATE,
            ChainError::NotHead { .. } | ChainError::StaleParent { .. } => codes::NOT_HEAD,
            ChainError::TooLarge { .. } => codes::TOO_LARGE,
            _ => codes::INVALID_BLOCK,
        };
        Self::new(code, e.to_string())
    }
}

/// Serde helpers writing kinds and dtypes as the seed's lowercase strings.
mod str_serde {
    use super::*;

    pub mod kind {
        use super::*;
        pub fn serialize<S: serde::Serializer>(k: &BlockKind, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_str(k.as_str())
        }
        pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BlockKind, D::Error> {
            let s = String::deserialize(d)?;
            BlockKind::parse(&s)
                .ok_or_else(|| serde::de::Error::custom(format!("unknown block kind {s:?}")))
        }
    }

    pub mod dtype {
        use super::*;
        pub fn serialize<S: serde::Serializer>(k: &PayloadDtype, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_str(k.as_str())
        }
        pub fn deserialize<'de, D: serde::Deserializer<'de>>(
            d: D,
        ) -> Result<PayloadDtype, D::Error> {
            let s = String::deserialize(d)?;
            PayloadDtype::parse(&s)
                .ok_or_else(|| serde::de::Error::custom(format!("unknown dtype {s:?}")))
        }
    }
}

/// One block as the REST API lists it. Holds the whole header and signature,
/// so [`BlockInfo::to_block`] rebuilds the signed block and checks its hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlockInfo {
    pub hash: BlockHash,
    pub chain: ChainId,
    #[serde(with = "str_serde::kind")]
    pub kind: BlockKind,
    /// Model name (chain A) or slot name (chain B).
    pub name: String,
    pub meta: Option<BlockHash>,
    pub parents: Vec<BlockHash>,
    pub payload_len: u64,
    pub chunk_size: u32,
    pub payload_root: BlockHash,
    #[serde(with = "str_serde::dtype")]
    pub dtype: PayloadDtype,
    pub candidate_loss: Option<f32>,
    /// Miner ed25519 public key, hex.
    pub miner: String,
    pub address: String,
    pub timestamp_ms: u64,
    /// ed25519 signature, hex.
    pub signature: String,
    /// Whether the block is its slot's current head (set by the server).
    #[serde(default)]
    pub is_head: bool,
    /// Header version.
    #[serde(default = "default_version")]
    pub version: u16,
}

fn default_version() -> u16 {
    HEADER_VERSION
}

impl From<&Block> for BlockInfo {
    fn from(b: &Block) -> Self {
        let h = &b.header;
        Self {
            hash: b.hash,
            chain: h.chain,
            kind: h.kind,
            name: h.name.clone(),
            meta: h.meta,
            parents: h.parents.clone(),
            payload_len: h.payload_len,
            chunk_size: h.chunk_size,
            payload_root: h.payload_root,
            dtype: h.dtype,
            candidate_loss: h.candidate_loss,
            miner: h.miner_hex(),
            address: h.address.clone(),
            timestamp_ms: h.timestamp_ms,
            signature: hex::encode(b.signature),
            is_head: false,
            version: h.version,
        }
    }
}

fn hex_array<const N: usize>(what: &str, s: &str) -> Result<[u8; N], ApiError> {
    if s.len() != 2 * N {
        return Err(ApiError::malformed(format!(
            "{what} must be {} hex characters, got {}",
            2 * N,
            s.len()
        )));
    }
    let mut out = [0u8; N];
    hex::decode_to_slice(s, &mut out)
        .map_err(|e| ApiError::malformed(format!("{what} is not hex: {e}")))?;
    Ok(out)
}

impl BlockInfo {
    pub fn with_head(mut self, is_head: bool) -> Self {
        self.is_head = is_head;
        self
    }

    /// The header this info describes.
    pub fn header(&self) -> Result<BlockHeader, ApiError> {
        Ok(BlockHeader {
            version: self.version,
            chain: self.chain,
            kind: self.kind,
            name: self.name.clone(),
            meta: self.meta,
            parents: self.parents.clone(),
            payload_len: self.payload_len,
            chunk_size: self.chunk_size,
            payload_root: self.payload_root,
            dtype: self.dtype,
            candidate_loss: self.candidate_loss,
            miner: hex_array::<32>("miner", &self.miner)?,
            address: self.address.clone(),
            timestamp_ms: self.timestamp_ms,
        })
    }

    /// Rebuild the signed block and check it hashes to `hash` (the signature
    /// is not checked here: use [`Block::verify_signature`] or `validate_block`).
    pub fn to_block(&self) -> Result<Block, ApiError> {
        let sig = hex_array::<64>("signature", &self.signature)?;
        let b = Block::from_parts(self.header()?, sig);
        b.check_hash(&self.hash)?;
        Ok(b)
    }
}

/// One slot's head as `GET /heads` lists it (the DAG's own record; the
/// JSON fields are `meta`, `name`, `hash`).
pub use crate::chain::SlotHead;

/// `GET /blocks/{hash}/chunks`: the chunk-hash list of a payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkList {
    pub hash: BlockHash,
    pub payload_len: u64,
    pub chunk_size: u32,
    pub payload_root: BlockHash,
    pub chunks: Vec<BlockHash>,
}

impl ChunkList {
    /// Check the list against the payload root and the length in the header.
    pub fn check(&self) -> Result<(), ChainError> {
        let n = crate::chain::chunk_count(self.payload_len, self.chunk_size);
        if n != self.chunks.len() as u64 {
            return Err(ChainError::PayloadLength {
                header: n,
                actual: self.chunks.len() as u64,
            });
        }
        let root = payload_root(&self.chunks);
        if root != self.payload_root {
            return Err(ChainError::PayloadRoot {
                expected: self.payload_root,
                actual: root,
            });
        }
        Ok(())
    }
}

fn default_timestamp() -> u64 {
    0
}

/// The seed's `POST /upload_moe_experts` body, with optional extensions.
///
/// `payload_sig` is the hex ed25519 signature over
/// `SeedUpload::header(..).signing_bytes()`, i.e. over the canonical block
/// header built from these fields and the payload (not over the raw payload
/// bytes, as the seed did: the header binds the payload through its root).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeedUpload {
    /// Slot name (`shared`, `layerN.router`, `layerN.expertM`) or model name (meta).
    pub expert_name: String,
    /// `layerN` of the slot ("" or "shared" for the shared slot and meta blocks).
    #[serde(default)]
    pub layer_id: String,
    /// `meta`, `shared`, `router` or `expert`.
    pub block_type: String,
    /// Parent block hashes (hex): the slot's current head for a new version.
    #[serde(default)]
    pub depends_on: Vec<String>,
    /// The payload, standard base64: safetensors (chain B) or meta JSON (chain A).
    pub tensor_data_b64: String,
    #[serde(default)]
    pub candidate_loss: Option<f32>,
    #[serde(default)]
    pub miner_address: String,
    /// Miner ed25519 public key, hex.
    pub miner_pub: String,
    /// ed25519 signature over the header's signing bytes, hex.
    pub payload_sig: String,
    /// Extension: the chain-A meta block (hex); default: the relay's latest meta.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta_hash: Option<String>,
    /// Extension: block timestamp (ms since the Unix epoch); default 0.
    #[serde(default = "default_timestamp")]
    pub timestamp_ms: u64,
    /// Extension: payload chunk size; default [`limits::DEFAULT_CHUNK_SIZE`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk_size: Option<u32>,
}

/// The dtype of a safetensors payload: every tensor must share it.
pub fn safetensors_dtype(payload: &[u8]) -> Result<PayloadDtype, ApiError> {
    let st = crate::chain::parse_safetensors(payload).map_err(ApiError::from)?;
    let tensors = st.tensors();
    crate::chain::payload_dtype_of_tensors(tensors.iter().map(|(n, v)| (n.as_str(), v.dtype())))
        .map_err(|m| ApiError::new(codes::INVALID_BLOCK, m))
}

/// Optional fields of [`SeedUpload::build`].
#[derive(Debug, Clone, Default)]
pub struct UploadOptions {
    pub parents: Vec<BlockHash>,
    pub candidate_loss: Option<f32>,
    pub address: String,
    /// Chain-B blocks: the meta block (None: let the relay pick its latest meta).
    pub meta: Option<BlockHash>,
    pub timestamp_ms: u64,
    /// None: [`limits::DEFAULT_CHUNK_SIZE`].
    pub chunk_size: Option<u32>,
}

impl SeedUpload {
    /// The payload bytes (base64-decoded).
    pub fn payload(&self) -> Result<Vec<u8>, ApiError> {
        base64::engine::general_purpose::STANDARD
            .decode(self.tensor_data_b64.trim())
            .map_err(|e| ApiError::malformed(format!("tensor_data_b64 is not base64: {e}")))
    }

    /// The exact header `payload_sig` must sign. `default_meta` is used for
    /// chain-B blocks without `meta_hash` (the relay passes its latest meta).
    /// Pure: the same inputs give the same header on every side.
    pub fn header(
        &self,
        payload: &[u8],
        default_meta: Option<BlockHash>,
    ) -> Result<BlockHeader, ApiError> {
        let kind = BlockKind::parse(self.block_type.trim()).ok_or_else(|| {
            ApiError::malformed(format!(
                "block_type {:?} is not meta, shared, router or expert",
                self.block_type
            ))
        })?;
        let name = self.expert_name.clone();
        if kind != BlockKind::Meta {
            let slot = Slot::parse(&name)
                .map_err(|e| ApiError::new(codes::INVALID_BLOCK, e.to_string()))?;
            let layer_ok = match (slot.layer(), self.layer_id.as_str()) {
                (_, "") => true,
                (None, l) => l == "shared",
                (Some(n), l) => l == format!("layer{n}"),
            };
            if !layer_ok {
                return Err(ApiError::malformed(format!(
                    "layer_id {:?} does not match expert_name {name:?}",
                    self.layer_id
                )));
            }
        }
        let mut parents = Vec::with_capacity(self.depends_on.len());
        for p in &self.depends_on {
            parents.push(
                BlockHash::from_hex(p.trim())
                    .map_err(|e| ApiError::malformed(format!("depends_on: {e}")))?,
            );
        }
        let meta = match kind {
            BlockKind::Meta => {
                if self.meta_hash.is_some() {
                    return Err(ApiError::new(
                        codes::INVALID_BLOCK,
                        "a chain-A meta block takes no meta_hash",
                    ));
                }
                None
            }
            _ => match &self.meta_hash {
                Some(m) => Some(
                    BlockHash::from_hex(m.trim())
                        .map_err(|e| ApiError::malformed(format!("meta_hash: {e}")))?,
                ),
                None => Some(default_meta.ok_or_else(|| {
                    ApiError::new(
                        codes::INVALID_BLOCK,
                        "no meta_hash given and no meta block known",
                    )
                })?),
            },
        };
        let dtype = match kind {
            BlockKind::Meta => PayloadDtype::Json,
            _ => safetensors_dtype(payload)?,
        };
        let chunk_size = self.chunk_size.unwrap_or(limits::DEFAULT_CHUNK_SIZE);
        if !(limits::MIN_CHUNK_SIZE..=limits::MAX_CHUNK_SIZE).contains(&chunk_size) {
            return Err(ApiError::new(
                codes::INVALID_BLOCK,
                format!(
                    "chunk_size {chunk_size} outside {}..={}",
                    limits::MIN_CHUNK_SIZE,
                    limits::MAX_CHUNK_SIZE
                ),
            ));
        }
        let miner = hex_array::<32>("miner_pub", self.miner_pub.trim())?;
        Ok(BlockBuilder::new(kind, name, meta, dtype)
            .parents(parents)
            .chunk_size(chunk_size)
            .candidate_loss(self.candidate_loss)
            .address(self.miner_address.clone())
            .timestamp_ms(self.timestamp_ms)
            .header(payload, miner))
    }

    /// Decode the upload into the signed block and its payload. The signature
    /// is attached, not checked: validation does that.
    pub fn to_block(&self, default_meta: Option<BlockHash>) -> Result<(Block, Vec<u8>), ApiError> {
        let payload = self.payload()?;
        let header = self.header(&payload, default_meta)?;
        let sig = hex_array::<64>("payload_sig", self.payload_sig.trim())?;
        Ok((Block::from_parts(header, sig), payload))
    }

    /// Client side: build and sign an upload for `payload` in slot `name`.
    pub fn build(
        kind: BlockKind,
        name: &str,
        payload: &[u8],
        opts: &UploadOptions,
        key: &SigningKey,
    ) -> Result<(Self, Block), ApiError> {
        let layer_id = match Slot::parse(name).ok().and_then(|s| s.layer()) {
            Some(l) => format!("layer{l}"),
            None if kind == BlockKind::Shared => "shared".into(),
            None => String::new(),
        };
        let mut up = SeedUpload {
            expert_name: name.to_string(),
            layer_id,
            block_type: kind.as_str().to_string(),
            depends_on: opts.parents.iter().map(|p| p.to_hex()).collect(),
            tensor_data_b64: base64::engine::general_purpose::STANDARD.encode(payload),
            candidate_loss: opts.candidate_loss,
            miner_address: opts.address.clone(),
            miner_pub: hex::encode(key.verifying_key().to_bytes()),
            payload_sig: String::new(),
            meta_hash: opts.meta.map(|m| m.to_hex()),
            timestamp_ms: opts.timestamp_ms,
            chunk_size: opts.chunk_size,
        };
        let header = up.header(payload, opts.meta)?;
        let block = Block::sign(header, key);
        up.payload_sig = hex::encode(block.signature);
        Ok((up, block))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_its_status() {
        use codes::*;
        for (code, status) in [
            (MALFORMED, 400),
            (INVALID_BLOCK, 400),
            (BAD_SIGNATURE, 401),
            (FORBIDDEN, 403),
            (NOT_FOUND, 404),
            (METHOD_NOT_ALLOWED, 405),
            (TIMEOUT, 408),
            (DUPLICATE, 409),
            (NOT_HEAD, 409),
            (TOO_LARGE, 413),
            (UNSUPPORTED_MEDIA_TYPE, 415),
            (RANGE_NOT_SATISFIABLE, 416),
            (REJECTED, 422),
            (RATE_LIMITED, 429),
            (INTERNAL, 500),
            (CORRUPT, 500),
            (UNAVAILABLE, 503),
        ] {
            assert_eq!(ApiError::new(code, "x").status(), status, "{code}");
        }
    }
    use crate::chain::ChainError;

    fn st_payload(dtype: safetensors::Dtype, n: usize) -> Vec<u8> {
        let bytes = vec![0u8; n * dtype.size()];
        let v = safetensors::tensor::TensorView::new(dtype, vec![n], &bytes).unwrap();
        safetensors::serialize([("x", v)], &None).unwrap()
    }

    #[test]
    fn build_then_decode_gives_the_signed_block() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let payload = st_payload(safetensors::Dtype::F16, 10);
        let opts = UploadOptions {
            meta: Some(BlockHash([5; 32])),
            candidate_loss: Some(1.5),
            address: "alice".into(),
            timestamp_ms: 42,
            ..Default::default()
        };
        let (up, block) =
            SeedUpload::build(BlockKind::Expert, "layer1.expert2", &payload, &opts, &key).unwrap();
        assert_eq!(up.layer_id, "layer1");
        let json = serde_json::to_string(&up).unwrap();
        let back: SeedUpload = serde_json::from_str(&json).unwrap();
        let (b, p) = back.to_block(None).unwrap();
        assert_eq!(b, block);
        assert_eq!(p, payload);
        assert_eq!(b.header.dtype, PayloadDtype::F16);
        b.verify_signature().unwrap();
        // The relay's default meta is used only when meta_hash is absent.
        let mut no_meta = back.clone();
        no_meta.meta_hash = None;
        let (b2, _) = no_meta.to_block(Some(BlockHash([5; 32]))).unwrap();
        assert_eq!(b2.hash, block.hash);
        assert!(no_meta.to_block(None).is_err());
    }

    #[test]
    fn seed_body_without_extensions_parses() {
        let j = r#"{"expert_name":"layer0.expert1","layer_id":"layer0","block_type":"expert",
            "depends_on":[],"tensor_data_b64":"","candidate_loss":0.85,"miner_address":"alice",
            "miner_pub":"00","payload_sig":"00"}"#;
        let up: SeedUpload = serde_json::from_str(j).unwrap();
        assert_eq!(up.timestamp_ms, 0);
        assert!(up.meta_hash.is_none());
        let e = up.to_block(Some(BlockHash([1; 32]))).unwrap_err();
        assert_eq!(e.status(), 400);
    }

    #[test]
    fn bad_fields_are_errors() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let payload = st_payload(safetensors::Dtype::F32, 4);
        let opts = UploadOptions {
            meta: Some(BlockHash([5; 32])),
            ..Default::default()
        };
        let (up, _) =
            SeedUpload::build(BlockKind::Expert, "layer1.expert2", &payload, &opts, &key).unwrap();
        let m = |f: &dyn Fn(&mut SeedUpload)| {
            let mut u = up.clone();
            f(&mut u);
            u.to_block(None).unwrap_err()
        };
        assert_eq!(
            m(&|u| u.tensor_data_b64 = "!!".into()).code,
            codes::MALFORMED
        );
        assert_eq!(m(&|u| u.block_type = "weird".into()).code, codes::MALFORMED);
        assert_eq!(m(&|u| u.layer_id = "layer3".into()).code, codes::MALFORMED);
        assert_eq!(m(&|u| u.miner_pub = "zz".into()).code, codes::MALFORMED);
        assert_eq!(m(&|u| u.payload_sig = "00".into()).code, codes::MALFORMED);
        assert_eq!(
            m(&|u| u.depends_on = vec!["x".into()]).code,
            codes::MALFORMED
        );
        assert_eq!(
            m(&|u| u.expert_name = "layer1.gate".into()).code,
            codes::INVALID_BLOCK
        );
        assert_eq!(m(&|u| u.chunk_size = Some(1)).code, codes::INVALID_BLOCK);
        assert_eq!(
            m(&|u| u.tensor_data_b64 = "AAAA".into()).code,
            codes::INVALID_BLOCK
        );
    }

    #[test]
    fn mixed_dtypes_are_refused() {
        let a = vec![0u8; 8];
        let b = vec![0u8; 4];
        let va =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2], &a).unwrap();
        let vb =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F16, vec![2], &b).unwrap();
        let p = safetensors::serialize([("a", va), ("b", vb)], &None).unwrap();
        assert!(safetensors_dtype(&p).is_err());
        assert_eq!(
            safetensors_dtype(&st_payload(safetensors::Dtype::BF16, 3)).unwrap(),
            PayloadDtype::BF16
        );
    }

    #[test]
    fn block_info_round_trips_through_json() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let payload = st_payload(safetensors::Dtype::F32, 4);
        let opts = UploadOptions {
            meta: Some(BlockHash([5; 32])),
            ..Default::default()
        };
        let (_, block) =
            SeedUpload::build(BlockKind::Router, "layer0.router", &payload, &opts, &key).unwrap();
        let info = BlockInfo::from(&block).with_head(true);
        let json = serde_json::to_value(&info).unwrap();
        assert_eq!(json["kind"], "router");
        assert_eq!(json["dtype"], "F32");
        assert_eq!(json["chain"], "B");
        let back: BlockInfo = serde_json::from_value(json).unwrap();
        assert_eq!(back.to_block().unwrap(), block);
        let mut forged = back.clone();
        forged.candidate_loss = Some(0.0);
        assert!(forged.to_block().is_err());
    }

    #[test]
    fn chain_errors_map_to_statuses() {
        let s = |e: ChainError| ApiError::from(e).status();
        assert_eq!(s(ChainError::BadSignature("x".into())), 401);
        assert_eq!(s(ChainError::BadPublicKey("x".into())), 403);
        assert_eq!(s(ChainError::Duplicate(BlockHash::default())), 409);
        assert_eq!(s(ChainError::UnknownParent(BlockHash::default())), 400);
        assert_eq!(
            s(ChainError::TooLarge {
                what: "x",
                len: 2,
                max: 1
            }),
            413
        );
        assert_eq!(ApiError::new("whatever", "x").status(), 500);
    }
}
