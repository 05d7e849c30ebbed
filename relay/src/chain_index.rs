//! [`ChainState`]: the chain as the relay serves it (the DAG index, each
//! chain's acceptance order, signatures, meta writers), rebuilt from the
//! store on open.
//!
//! Layer: foundation. Imports [`crate::auth`] (meta writers) and
//! [`crate::store`]; the peer layer reads it (chunk lists), the state holds
//! it behind a lock.
//!
//! May import: the foundation (its base, `store`, `usage`, `http`, `quality`, `backup`).

use std::collections::HashMap;

use web_node::chain::{Block, BlockHash, ChainId, ChainView as _, Dag, ValidatedBlock};
use web_node::net::api::{ApiError, BlockInfo};
use web_node::store::StoreError;

use crate::auth::MetaWriters;
use crate::store::RelayStore;

/// The chain as the relay serves it: the DAG index (headers, heads,
/// configs), and what listings and write rules need besides: each chain's
/// acceptance order, signatures, and each meta block's writers.
#[derive(Debug, Default)]
pub struct ChainState {
    pub dag: Dag,
    order: [Vec<BlockHash>; 2],
    pos: HashMap<BlockHash, usize>,
    sigs: HashMap<BlockHash, [u8; 64]>,
    writers: HashMap<BlockHash, MetaWriters>,
}

fn chain_ix(c: ChainId) -> usize {
    match c {
        ChainId::A => 0,
        ChainId::B => 1,
    }
}

impl ChainState {
    /// Rebuild from a store: the DAG (as web-node loads it), then the order,
    /// signatures and meta writers.
    pub fn load(store: &dyn RelayStore) -> Result<Self, StoreError> {
        let dag = web_node::store::load_dag(store)?;
        let mut s = Self {
            dag,
            ..Self::default()
        };
        for b in store.list()? {
            let writers = if b.header.chain == ChainId::A {
                let p = store.payload(&b.hash)?;
                Some(MetaWriters::of(&b, &p))
            } else {
                None
            };
            s.index(&b, writers);
        }
        Ok(s)
    }

    fn index(&mut self, b: &Block, writers: Option<MetaWriters>) {
        if self.sigs.contains_key(&b.hash) {
            return;
        }
        let v = &mut self.order[chain_ix(b.header.chain)];
        self.pos.insert(b.hash, v.len());
        v.push(b.hash);
        self.sigs.insert(b.hash, b.signature);
        if let Some(w) = writers {
            self.writers.insert(b.hash, w);
        }
    }

    /// Add an accepted block (it becomes its slot's head).
    pub fn insert(&mut self, v: &ValidatedBlock, writers: Option<MetaWriters>) {
        self.dag.insert(v);
        self.index(&v.block, writers);
    }

    /// The writers of an accepted meta block.
    pub fn meta_writers(&self, meta: &BlockHash) -> Option<&MetaWriters> {
        self.writers.get(meta)
    }

    /// Blocks of a chain in acceptance order, from just after `after`.
    pub fn page(
        &self,
        chain: ChainId,
        after: Option<&BlockHash>,
        limit: usize,
    ) -> Result<(Vec<BlockInfo>, bool), ApiError> {
        let order = &self.order[chain_ix(chain)];
        let start = match after {
            None => 0,
            Some(h) => match self.pos.get(h) {
                Some(&i) if order.get(i) == Some(h) => i + 1,
                _ => {
                    return Err(ApiError::malformed(format!(
                        "after={h}: no such block on chain {chain:?}"
                    )))
                }
            },
        };
        let end = start.saturating_add(limit).min(order.len());
        let infos = order
            .get(start..end)
            .unwrap_or_default()
            .iter()
            .filter_map(|h| self.info(h))
            .collect();
        Ok((infos, end < order.len()))
    }

    /// One block's listing entry (with its head flag), from memory.
    pub fn info(&self, hash: &BlockHash) -> Option<BlockInfo> {
        let e = self.dag.get(hash)?;
        let sig = self.sigs.get(hash)?;
        let b = Block::from_parts(e.header.clone(), *sig);
        let head = self.dag.head(e.header.meta.as_ref(), &e.header.name) == Some(*hash);
        Some(BlockInfo::from(&b).with_head(head))
    }

    pub fn len(&self) -> usize {
        self.dag.len()
    }

    pub fn is_empty(&self) -> bool {
        self.dag.is_empty()
    }
}
