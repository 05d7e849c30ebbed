//! In-memory DAG index: headers by hash, slot heads, insertion (topological) order.

use std::collections::{BTreeMap, HashMap};

use super::{BlockHash, BlockHeader, ChainId, ChainView, PayloadStatus, ValidatedBlock};
use crate::spec::Config;

/// One block known to the DAG: its header passed every header rule; its
/// payload is absent, partial or verified.
#[derive(Debug, Clone)]
pub struct DagEntry {
    pub hash: BlockHash,
    pub header: BlockHeader,
    /// Chain-A blocks whose payload is verified: the parsed config.
    pub config: Option<Config>,
    pub payload: PayloadStatus,
}

/// A slot's head: the accepted latest version of `name` under `meta`
/// (`meta` is None for chain-A models).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SlotHead {
    /// The chain-A meta block (None for chain-A heads).
    pub meta: Option<BlockHash>,
    /// Slot (chain B) or model (chain A) name.
    pub name: String,
    pub hash: BlockHash,
}

/// Headers by hash, heads per slot, and blocks in the order they were
/// accepted (every parent before its children).
#[derive(Debug, Default, Clone)]
pub struct Dag {
    entries: HashMap<BlockHash, DagEntry>,
    heads: BTreeMap<(Option<BlockHash>, String), BlockHash>,
    order: Vec<BlockHash>,
}

impl Dag {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a block that passed both phases; it becomes its slot's head.
    pub fn insert(&mut self, v: &ValidatedBlock) {
        let config = v.meta.as_ref().map(|(_, c)| c.clone());
        self.insert_trusted(v.block.hash, v.block.header.clone(), config);
    }

    /// Add a block whose header passed [`super::validate_header`]; its
    /// payload is absent until [`Dag::set_payload`] says otherwise. It
    /// becomes its slot's head.
    pub fn insert_header(&mut self, hash: BlockHash, header: BlockHeader) {
        self.insert_entry(hash, header, None, PayloadStatus::Absent);
    }

    /// Add a block read back from this node's own store (validated when it was stored).
    pub fn insert_trusted(&mut self, hash: BlockHash, header: BlockHeader, config: Option<Config>) {
        self.insert_entry(hash, header, config, PayloadStatus::Verified);
    }

    fn insert_entry(
        &mut self,
        hash: BlockHash,
        header: BlockHeader,
        config: Option<Config>,
        payload: PayloadStatus,
    ) {
        if self.entries.contains_key(&hash) {
            return;
        }
        self.heads.insert((header.meta, header.name.clone()), hash);
        self.order.push(hash);
        self.entries.insert(
            hash,
            DagEntry {
                hash,
                header,
                config,
                payload,
            },
        );
    }

    /// Record where a block's payload stands; a verified chain-A payload
    /// brings its config (which its chain-B blocks are checked against).
    /// Unknown hashes are ignored.
    pub fn set_payload(&mut self, hash: &BlockHash, status: PayloadStatus, config: Option<Config>) {
        if let Some(e) = self.entries.get_mut(hash) {
            if config.is_some() {
                e.config = config;
            }
            e.payload = status;
        }
    }

    /// Set a slot's head explicitly (a store that keeps heads apart from blocks).
    pub fn set_head(&mut self, meta: Option<BlockHash>, name: &str, hash: BlockHash) {
        self.heads.insert((meta, name.to_string()), hash);
    }

    pub fn get(&self, hash: &BlockHash) -> Option<&DagEntry> {
        self.entries.get(hash)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Blocks of one chain, in acceptance order.
    pub fn chain(&self, chain: ChainId) -> impl Iterator<Item = &DagEntry> {
        self.order
            .iter()
            .filter_map(|h| self.entries.get(h))
            .filter(move |e| e.header.chain == chain)
    }

    /// Every block in acceptance order.
    pub fn iter(&self) -> impl Iterator<Item = &DagEntry> {
        self.order.iter().filter_map(|h| self.entries.get(h))
    }

    /// All heads: `((meta, name), hash)`.
    pub fn heads(&self) -> impl Iterator<Item = (&(Option<BlockHash>, String), &BlockHash)> {
        self.heads.iter()
    }

    /// Heads of chain-B slots under one meta block, by slot name.
    pub fn slot_heads(&self, meta: &BlockHash) -> BTreeMap<String, BlockHash> {
        self.heads
            .iter()
            .filter(|((m, _), _)| m.as_ref() == Some(meta))
            .map(|((_, n), h)| (n.clone(), *h))
            .collect()
    }

    /// The latest chain-A meta block (the default model): the most recently
    /// accepted chain-A head.
    /// The model `sel` names: a chain-A meta block's hash (hex), or a model
    /// name (its current meta block). `None` when no model matches.
    pub fn find_meta(&self, sel: &str) -> Option<&DagEntry> {
        if let Ok(h) = BlockHash::from_hex(sel) {
            return self
                .entries
                .get(&h)
                .filter(|e| e.header.chain == ChainId::A);
        }
        let head = self.heads.get(&(None, sel.to_string()))?;
        self.entries
            .get(head)
            .filter(|e| e.header.chain == ChainId::A)
    }

    pub fn latest_meta(&self) -> Option<&DagEntry> {
        self.order
            .iter()
            .rev()
            .filter_map(|h| self.entries.get(h))
            .find(|e| {
                e.header.chain == ChainId::A
                    && self.heads.get(&(None, e.header.name.clone())) == Some(&e.hash)
            })
    }
}

impl ChainView for Dag {
    fn header(&self, hash: &BlockHash) -> Option<BlockHeader> {
        self.entries.get(hash).map(|e| e.header.clone())
    }
    fn config(&self, meta: &BlockHash) -> Option<Config> {
        self.entries.get(meta).and_then(|e| e.config.clone())
    }
    fn head(&self, meta: Option<&BlockHash>, name: &str) -> Option<BlockHash> {
        self.heads.get(&(meta.copied(), name.to_string())).copied()
    }
}
