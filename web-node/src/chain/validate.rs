//! Block validation: one [`ChainError`] variant per rule.
//!
//! [`validate_block`] runs every rule; the pieces are public so that a node
//! can check cheap rules first (signature before downloading a payload).

use std::collections::HashSet;

use safetensors::SafeTensors;

use super::{
    chunk_hashes, limits, payload_root, Block, BlockHash, BlockHeader, BlockKind, ChainError,
    ChainId, MetaPayload, PayloadDtype, HEADER_VERSION,
};
use crate::spec::{Config, Slot};

/// What validation needs to know about the chain a block joins.
pub trait ChainView {
    /// Header of a known block.
    fn header(&self, hash: &BlockHash) -> Option<BlockHeader>;
    /// Parsed config of a known chain-A meta block.
    fn config(&self, meta: &BlockHash) -> Option<Config>;
    /// Current head of a slot: `(meta link, name)`; chain A uses `meta = None`.
    fn head(&self, meta: Option<&BlockHash>, name: &str) -> Option<BlockHash>;
}

/// A block that passed every rule, with what the payload revealed.
#[derive(Debug, Clone)]
pub struct ValidatedBlock {
    pub block: Block,
    /// Chain A: the parsed spec and config.
    pub meta: Option<(MetaPayload, Config)>,
}

/// Rules that need only the block itself: version, field limits,
/// chain/kind/dtype/name consistency, and the signature.
pub fn check_standalone(block: &Block) -> Result<(), ChainError> {
    let h = &block.header;
    if h.version != HEADER_VERSION {
        return Err(ChainError::UnsupportedVersion(h.version));
    }
    if h.kind.chain() != h.chain {
        return Err(ChainError::ChainKind {
            chain: h.chain,
            kind: h.kind,
        });
    }
    let field = |s: String| Err(ChainError::Field(s));
    if h.name.is_empty() || h.name.len() > limits::MAX_NAME_LEN {
        return field(format!("name must be 1..={} bytes", limits::MAX_NAME_LEN));
    }
    if h.address.len() > limits::MAX_ADDRESS_LEN {
        return Err(ChainError::TooLarge {
            what: "address",
            len: h.address.len() as u64,
            max: limits::MAX_ADDRESS_LEN as u64,
        });
    }
    if h.parents.len() > limits::MAX_PARENTS {
        return Err(ChainError::TooLarge {
            what: "parent list",
            len: h.parents.len() as u64,
            max: limits::MAX_PARENTS as u64,
        });
    }
    if !(limits::MIN_CHUNK_SIZE..=limits::MAX_CHUNK_SIZE).contains(&h.chunk_size) {
        return field(format!(
            "chunk_size {} outside {}..={}",
            h.chunk_size,
            limits::MIN_CHUNK_SIZE,
            limits::MAX_CHUNK_SIZE
        ));
    }
    let max = match h.chain {
        ChainId::A => limits::MAX_META_PAYLOAD_LEN,
        ChainId::B => limits::MAX_PAYLOAD_LEN,
    };
    if h.payload_len > max {
        return Err(ChainError::TooLarge {
            what: "payload",
            len: h.payload_len,
            max,
        });
    }
    if let Some(l) = h.candidate_loss {
        if !(l.is_finite() && l >= 0.0) {
            return field(format!("candidate_loss {l} must be finite and >= 0"));
        }
    }
    match (h.kind, h.dtype) {
        (BlockKind::Meta, PayloadDtype::Json) => {}
        (BlockKind::Meta, d) => {
            return field(format!("meta blocks carry JSON, not {}", d.as_str()))
        }
        (_, PayloadDtype::Json) => {
            return field("parameter blocks carry safetensors, not JSON".into())
        }
        (kind, d) if d.quant().is_some() && kind != BlockKind::Expert => {
            return field(format!(
                "only expert blocks are quantized: a {} block cannot be {}",
                kind.as_str(),
                d.as_str()
            ))
        }
        _ => {}
    }
    match h.chain {
        ChainId::A if h.meta.is_some() => {
            return Err(ChainError::MetaLink(
                "a chain-A block must not link to a meta block".into(),
            ))
        }
        ChainId::B if h.meta.is_none() => {
            return Err(ChainError::MetaLink(
                "a chain-B block must link to its chain-A meta block".into(),
            ))
        }
        _ => {}
    }
    if h.kind != BlockKind::Meta {
        let slot = Slot::parse(&h.name).map_err(|e| ChainError::SlotName(e.to_string()))?;
        if BlockKind::of_slot(slot) != h.kind {
            return Err(ChainError::SlotName(format!(
                "{} is not a {} slot",
                h.name,
                h.kind.as_str()
            )));
        }
    }
    block.verify_signature()
}

/// Rules that need the chain: duplicate, meta link, parents, cycles, slot in
/// spec, and that the block builds on its slot's current head. Returns the
/// config the block must conform to (chain B).
pub fn check_context(block: &Block, view: &impl ChainView) -> Result<Option<Config>, ChainError> {
    let h = &block.header;
    if view.header(&block.hash).is_some() {
        return Err(ChainError::Duplicate(block.hash));
    }
    let config = match &h.meta {
        None => None,
        Some(m) => {
            let mh = view.header(m).ok_or(ChainError::UnknownMeta(*m))?;
            if mh.chain != ChainId::A || mh.kind != BlockKind::Meta {
                return Err(ChainError::MetaNotChainA(*m));
            }
            Some(view.config(m).ok_or(ChainError::PayloadMissing(*m))?)
        }
    };
    let mut seen = HashSet::new();
    for p in &h.parents {
        if *p == block.hash {
            return Err(ChainError::SelfParent);
        }
        if !seen.insert(*p) {
            return Err(ChainError::DuplicateParent(*p));
        }
        if view.header(p).is_none() {
            return Err(ChainError::UnknownParent(*p));
        }
    }
    check_acyclic(block, view)?;
    if let (Some(cfg), Ok(slot)) = (&config, Slot::parse(&h.name)) {
        slot.check_in_spec(cfg)
            .map_err(|e| ChainError::SlotOutOfSpec(e.to_string()))?;
    }
    // Versions of a slot form a line: a new version builds on the current head.
    let head = view.head(h.meta.as_ref(), &h.name);
    for p in &h.parents {
        if let Some(ph) = view.header(p) {
            if ph.name == h.name && ph.meta == h.meta && Some(*p) != head {
                if let Some(head) = head {
                    return Err(ChainError::StaleParent {
                        slot: h.name.clone(),
                        parent: *p,
                        head,
                    });
                }
            }
        }
    }
    if let Some(head) = head {
        if !h.parents.contains(&head) {
            return Err(ChainError::NotHead {
                slot: h.name.clone(),
                head,
            });
        }
    }
    Ok(config)
}

/// Walk the ancestors; reaching the block itself means a cycle.
fn check_acyclic(block: &Block, view: &impl ChainView) -> Result<(), ChainError> {
    let mut stack: Vec<BlockHash> = block.header.parents.clone();
    let mut seen: HashSet<BlockHash> = HashSet::new();
    while let Some(x) = stack.pop() {
        if x == block.hash {
            return Err(ChainError::Cycle(x));
        }
        if !seen.insert(x) {
            continue;
        }
        if let Some(h) = view.header(&x) {
            stack.extend(h.parents.iter().copied());
            if let Some(m) = h.meta {
                stack.push(m);
            }
        }
    }
    Ok(())
}

/// Payload length and chunk root.
pub fn check_payload_integrity(header: &BlockHeader, payload: &[u8]) -> Result<(), ChainError> {
    if payload.len() as u64 != header.payload_len {
        return Err(ChainError::PayloadLength {
            header: header.payload_len,
            actual: payload.len() as u64,
        });
    }
    let root = payload_root(&chunk_hashes(payload, header.chunk_size));
    if root != header.payload_root {
        return Err(ChainError::PayloadRoot {
            expected: header.payload_root,
            actual: root,
        });
    }
    Ok(())
}

/// What the payload holds: for chain A a consistent meta spec whose name is
/// the block name; for chain B exactly the tensors (names, shapes, dtype)
/// the config implies for the slot.
pub fn check_payload_content(
    header: &BlockHeader,
    payload: &[u8],
    config: Option<&Config>,
) -> Result<Option<(MetaPayload, Config)>, ChainError> {
    if header.kind == BlockKind::Meta {
        let (m, cfg) = MetaPayload::parse(payload)?;
        if m.model_name != header.name {
            return Err(ChainError::MetaPayload(format!(
                "model_name {:?} is not the block name {:?}",
                m.model_name, header.name
            )));
        }
        return Ok(Some((m, cfg)));
    }
    let cfg = config.ok_or_else(|| ChainError::MetaLink("no config for a chain-B block".into()))?;
    check_tensor_header(header, payload, cfg)?;
    Ok(None)
}

/// Parse a safetensors payload, refusing a header length past
/// [`limits::MAX_SAFETENSORS_HEADER`] before anything is read.
pub fn parse_safetensors(payload: &[u8]) -> Result<SafeTensors<'_>, ChainError> {
    safetensors_header_len(payload)?;
    SafeTensors::deserialize(payload)
        .map_err(|e| ChainError::Tensors(format!("payload is not safetensors: {e}")))
}

/// The payload dtype of a whole safetensors payload's tensors: all float
/// tensors of one dtype, or a quantized payload (every tensor `NAME` packed
/// as I8 or U8 with its F16 `NAME.scales`). `Err` names the offending tensor.
pub fn payload_dtype_of_tensors<'a>(
    tensors: impl IntoIterator<Item = (&'a str, safetensors::Dtype)>,
) -> Result<PayloadDtype, String> {
    let all: Vec<(&str, safetensors::Dtype)> = tensors.into_iter().collect();
    let is_scales = |n: &str| n.ends_with(".scales");
    let quant = all.iter().any(|(n, _)| is_scales(n));
    let mut dtype: Option<PayloadDtype> = None;
    for &(name, d) in &all {
        let this = if quant {
            match (is_scales(name), d) {
                (true, safetensors::Dtype::F16) => continue,
                (false, safetensors::Dtype::I8) => PayloadDtype::Q8_0,
                (false, safetensors::Dtype::U8) => PayloadDtype::Q4_0,
                _ => {
                    return Err(format!(
                        "tensor {name}: dtype {d:?} in a quantized payload (values I8 or U8, scales F16)"
                    ))
                }
            }
        } else {
            payload_dtype_of(d)
                .ok_or_else(|| format!("tensor {name}: dtype {d:?} is not F32/F16/BF16"))?
        };
        match dtype {
            None => dtype = Some(this),
            Some(x) if x != this => {
                return Err(format!(
                    "mixed dtypes: {name} is {}, others are {}",
                    this.as_str(),
                    x.as_str()
                ))
            }
            _ => {}
        }
    }
    dtype.ok_or_else(|| "payload holds no tensors".into())
}

/// The payload dtype of a safetensors tensor dtype (None: not F32/F16/BF16).
pub fn payload_dtype_of(d: safetensors::Dtype) -> Option<PayloadDtype> {
    match d {
        safetensors::Dtype::F32 => Some(PayloadDtype::F32),
        safetensors::Dtype::F16 => Some(PayloadDtype::F16),
        safetensors::Dtype::BF16 => Some(PayloadDtype::BF16),
        _ => None,
    }
}

/// Check a chain-B payload's tensors from its safetensors header alone:
/// exactly the names and shapes the config implies for the slot, the
/// header's dtype, and data that exactly fills `header.payload_len`.
/// `payload_prefix` is the start of the payload (the whole payload will do);
/// it must hold the 8-byte length and the JSON header. Nothing past the
/// header is read, so a streaming upload or a node that holds only the
/// first chunk can run it. The one tensor rule, used by every phase-2 check.
pub fn check_tensor_header(
    header: &BlockHeader,
    payload_prefix: &[u8],
    cfg: &Config,
) -> Result<(), ChainError> {
    let bad = |s: String| ChainError::Tensors(s);
    let slot = Slot::parse(&header.name).map_err(|e| ChainError::SlotName(e.to_string()))?;
    let float_dtype = match header.dtype {
        PayloadDtype::F32 => Some(safetensors::Dtype::F32),
        PayloadDtype::F16 => Some(safetensors::Dtype::F16),
        PayloadDtype::BF16 => Some(safetensors::Dtype::BF16),
        PayloadDtype::Q8_0 | PayloadDtype::Q4_0 => None,
        PayloadDtype::Json => return Err(bad("JSON payload for a parameter block".into())),
    };
    // A quantized model's expert blocks are in its format; everything else,
    // and every block of a float model, is float.
    let model_quant = cfg.expert_quant().map_err(|e| bad(e.to_string()))?;
    let want_quant = if matches!(slot, Slot::Expert { .. }) {
        model_quant
    } else {
        None
    };
    if header.dtype.quant() != want_quant {
        return Err(bad(match want_quant {
            Some(q) => format!(
                "{slot}: this model's expert blocks are {q}, the header says {}",
                header.dtype.as_str()
            ),
            None => format!(
                "{slot}: {} blocks belong to a quantized model (its own meta block); this one is float",
                header.dtype.as_str()
            ),
        }));
    }
    let n = safetensors_header_len(payload_prefix)?;
    let end = 8usize
        .checked_add(n)
        .filter(|&e| e <= payload_prefix.len() && (e as u64) <= header.payload_len)
        .ok_or_else(|| {
            bad(format!(
                "payload is not safetensors: header of {n} bytes does not fit the payload"
            ))
        })?;
    let json = std::str::from_utf8(&payload_prefix[8..end])
        .map_err(|_| bad("payload is not safetensors: header is not UTF-8".into()))?;
    let meta: safetensors::tensor::Metadata =
        serde_json::from_str(json).map_err(|e| bad(format!("payload is not safetensors: {e}")))?;
    let got = meta.tensors();
    // What each tensor must be: the slot's float tensors in the header's
    // dtype, or for a quantized block each matrix as packed values + scales.
    let expected: Vec<(String, safetensors::Dtype, Vec<usize>)> =
        match (float_dtype, header.dtype.quant()) {
            (Some(d), _) => slot
                .tensors(cfg)
                .into_iter()
                .map(|t| (t.name, d, t.shape))
                .collect(),
            (None, Some(q)) => {
                let mut v = Vec::new();
                for t in slot.tensors(cfg) {
                    for qt in crate::spec::quant::quant_tensors(&t, q).map_err(bad)? {
                        v.push((qt.name, qt.dtype, qt.shape));
                    }
                }
                v
            }
            (None, None) => return Err(bad("no tensor dtype for this block".into())),
        };
    if got.len() != expected.len() {
        let names: HashSet<&str> = expected.iter().map(|t| t.0.as_str()).collect();
        let mut extra: Vec<&str> = got
            .keys()
            .map(String::as_str)
            .filter(|n| !names.contains(n))
            .collect();
        extra.sort_unstable();
        return Err(bad(format!(
            "slot {slot} needs {} tensors, payload has {} (unexpected: {:?})",
            expected.len(),
            got.len(),
            extra
        )));
    }
    for (name, want_dtype, shape) in &expected {
        let info = got
            .get(name)
            .ok_or_else(|| bad(format!("missing tensor {name}")))?;
        if info.shape != *shape {
            return Err(bad(format!(
                "{name}: shape {:?}, config implies {shape:?} for {}",
                info.shape,
                header.dtype.as_str()
            )));
        }
        if info.dtype != *want_dtype {
            return Err(bad(format!(
                "{name}: dtype {:?}, header says {} ({want_dtype:?})",
                info.dtype,
                header.dtype.as_str()
            )));
        }
    }
    // The data must be laid out back to back and fill the payload exactly.
    let mut spans: Vec<(usize, usize, &str)> = got
        .iter()
        .map(|(name, i)| (i.data_offsets.0, i.data_offsets.1, name.as_str()))
        .collect();
    spans.sort_unstable();
    let mut at = 0usize;
    for (s, e, name) in spans {
        let want = got
            .get(name)
            .and_then(|i| {
                i.shape
                    .iter()
                    .try_fold(i.dtype.size(), |a, &d| a.checked_mul(d))
            })
            .ok_or_else(|| bad(format!("{name}: size overflows")))?;
        if s != at || e < s || e - s != want {
            return Err(bad(format!(
                "{name}: data offsets {s}..{e} are not the next {want} bytes at {at}"
            )));
        }
        at = e;
    }
    if (end as u64).checked_add(at as u64) != Some(header.payload_len) {
        return Err(bad(format!(
            "tensors fill {} bytes after a {end}-byte header, payload has {}",
            at, header.payload_len
        )));
    }
    Ok(())
}

/// The safetensors header length at the start of a payload, refused past
/// [`limits::MAX_SAFETENSORS_HEADER`] before anything else is read.
fn safetensors_header_len(payload: &[u8]) -> Result<usize, ChainError> {
    let Some(first) = payload.get(..8) else {
        return Err(ChainError::Tensors(
            "payload is not safetensors (shorter than its header length)".into(),
        ));
    };
    let mut n = [0u8; 8];
    n.copy_from_slice(first);
    let n = u64::from_le_bytes(n);
    if n > limits::MAX_SAFETENSORS_HEADER as u64 {
        return Err(ChainError::TooLarge {
            what: "safetensors header",
            len: n,
            max: limits::MAX_SAFETENSORS_HEADER as u64,
        });
    }
    Ok(n as usize)
}

/// Phase one: every rule that needs no payload (version, fields, limits,
/// chain/kind, slot name, signature, duplicate, meta link, parents, cycles,
/// slot in spec, slot head). Returns the config a chain-B block's payload
/// must conform to. A node runs it on the whole chain from headers; the
/// relay runs it before it reads an upload's payload.
pub fn validate_header(block: &Block, view: &impl ChainView) -> Result<Option<Config>, ChainError> {
    check_standalone(block)?;
    check_context(block, view)
}

/// Phase two: the payload of a header-verified block (length, chunk root,
/// content). Chain A returns its parsed spec and config.
pub fn validate_payload(
    header: &BlockHeader,
    payload: &[u8],
    config: Option<&Config>,
) -> Result<Option<(MetaPayload, Config)>, ChainError> {
    check_payload_integrity(header, payload)?;
    check_payload_content(header, payload, config)
}

/// Both phases. Nothing is stored here: the caller inserts the returned
/// block only on `Ok`.
pub fn validate_block(
    block: &Block,
    payload: &[u8],
    view: &impl ChainView,
) -> Result<ValidatedBlock, ChainError> {
    let config = validate_header(block, view)?;
    let meta = validate_payload(&block.header, payload, config.as_ref())?;
    Ok(ValidatedBlock {
        block: block.clone(),
        meta,
    })
}
