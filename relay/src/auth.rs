//! Who may write what.
//!
//! * Chain-A meta blocks (a new model, or a new version of one): only the
//!   operator key (`data/operator.key`) or a key listed in `--meta-keys FILE`.
//! * The first version of a chain-B slot: only under a meta block signed by
//!   such a key, and only from that meta block's signer or a key the meta
//!   payload names in its `writers` list (hex ed25519 public keys).
//! * New versions of existing slots: anyone; they pass the quality gate.
//!
//! Everything else refused here gets 403 `forbidden` before its payload is read.
//!
//! Layer: foundation (base). May import: nothing of the crate (the base of the foundation, layer 0 of `scripts/relay_layers.py`).

use std::collections::HashSet;
use std::path::Path;

use web_node::chain::{Block, BlockHash, ChainId};
use web_node::net::api::{codes, ApiError};

use crate::RelayError;

/// A public key in hex, for messages.
fn hexk(k: &[u8; 32]) -> String {
    hex::encode(k)
}

/// The keys allowed to write chain-A meta blocks.
#[derive(Debug, Clone, Default)]
pub struct MetaKeys {
    operator: Option<[u8; 32]>,
    listed: HashSet<[u8; 32]>,
}

impl MetaKeys {
    pub fn new(operator: Option<[u8; 32]>) -> Self {
        Self {
            operator,
            listed: HashSet::new(),
        }
    }

    /// Add keys (e.g. from [`read_key_file`]).
    pub fn with_listed(mut self, keys: impl IntoIterator<Item = [u8; 32]>) -> Self {
        self.listed.extend(keys);
        self
    }

    pub fn operator(&self) -> Option<&[u8; 32]> {
        self.operator.as_ref()
    }

    /// May this key sign chain-A meta blocks?
    pub fn allows(&self, key: &[u8; 32]) -> bool {
        self.operator.as_ref() == Some(key) || self.listed.contains(key)
    }
}

/// Read a key list: one hex ed25519 public key per line; blank lines and
/// `#` comments ignored. Every other line must be a valid key.
pub fn read_key_file(path: &Path) -> Result<Vec<[u8; 32]>, RelayError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| RelayError::Key(format!("{}: {e}", path.display())))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let l = line.split('#').next().unwrap_or_default().trim();
        if l.is_empty() {
            continue;
        }
        let mut k = [0u8; 32];
        hex::decode_to_slice(l, &mut k).map_err(|e| {
            RelayError::Key(format!(
                "{}:{}: not a 64-hex-character public key: {e}",
                path.display(),
                i + 1
            ))
        })?;
        ed25519_dalek::VerifyingKey::from_bytes(&k).map_err(|e| {
            RelayError::Key(format!(
                "{}:{}: not an ed25519 key: {e}",
                path.display(),
                i + 1
            ))
        })?;
        out.push(k);
    }
    Ok(out)
}

/// Who signed an accepted meta block and whom it names as slot writers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetaWriters {
    pub signer: [u8; 32],
    pub writers: Vec<[u8; 32]>,
}

impl MetaWriters {
    /// From a meta block and its (already validated) JSON payload: the
    /// optional `writers` array of hex keys. Entries that are not keys are ignored.
    pub fn of(block: &Block, payload: &[u8]) -> Self {
        let writers = serde_json::from_slice::<serde_json::Value>(payload)
            .ok()
            .and_then(|v| v.get("writers").cloned())
            .and_then(|w| w.as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|x| x.as_str())
            .filter_map(|s| {
                let mut k = [0u8; 32];
                hex::decode_to_slice(s.trim(), &mut k).ok().map(|_| k)
            })
            .collect();
        Self {
            signer: block.header.miner,
            writers,
        }
    }
}

fn forbidden(message: String) -> ApiError {
    ApiError::new(codes::FORBIDDEN, message)
}

/// The write rules (see the module docs). `head` is the slot's current head,
/// `meta_writers` the writers of the block's meta block (chain B).
pub fn check_write(
    keys: &MetaKeys,
    block: &Block,
    head: Option<BlockHash>,
    meta_writers: Option<&MetaWriters>,
) -> Result<(), ApiError> {
    let h = &block.header;
    match h.chain {
        ChainId::A => {
            if !keys.allows(&h.miner) {
                return Err(forbidden(format!(
                    "meta block {:?} is signed by {}: chain-A meta blocks are accepted only from \
                     the relay operator's key or keys the operator lists (--meta-keys)",
                    h.name,
                    hexk(&h.miner)
                )));
            }
        }
        ChainId::B if head.is_none() => {
            let Some(m) = meta_writers else {
                return Err(forbidden(format!(
                    "slot {}: the meta block's signer is unknown",
                    h.name
                )));
            };
            if !keys.allows(&m.signer) {
                return Err(forbidden(format!(
                    "slot {}: the meta block is not signed by a key this relay accepts meta \
                     blocks from, so its slots take no first versions",
                    h.name
                )));
            }
            if h.miner != m.signer && !m.writers.contains(&h.miner) {
                return Err(forbidden(format!(
                    "slot {} has no version yet: its first version must be signed by the meta \
                     block's signer {} or a key the meta block names in `writers`, not {}",
                    h.name,
                    hexk(&m.signer),
                    hexk(&h.miner)
                )));
            }
        }
        ChainId::B => {}
    }
    Ok(())
}
