//! A chain sync, sans-IO: list chain B then chain A page by page
//! ([`Pager`]), get every chain-A payload (small JSON: each model's config,
//! which every chain-B header is checked against), verify every header
//! with [`verify_chain_dag`], and pick a model and its slot heads from the
//! verified DAG ([`Synced::model`]).
//!
//! Chain B is listed first: every meta block a listed chain-B block links
//! to was accepted before it, so the chain-A listing that follows holds it
//! even when the relay accepts blocks meanwhile.
//!
//! ```text
//! driver                              ChainSync
//!   next()                      ──►  Step::List(page)          GET page.path()
//!   on_page(chain, body, more)  ──►  (next page, or chain A)
//!   next()                      ──►  Step::MetaPayload(hash)   GET /blocks/{hash}/payload
//!   on_meta_payload(hash, res)
//!   next()                      ──►  Step::Done
//!   finish()                    ──►  Synced { dag, report, blocks, .. }
//! ```

use std::collections::{BTreeMap, HashMap};

use crate::chain::{Block, BlockHash, ChainId, Dag, MetaPayload};
use crate::chain_model::select_meta;
use crate::model::{Config, Slot};
use crate::net::api::BlockInfo;
use crate::verify::{verify_chain_dag, ChainReport, FetchedBlock};

use super::listing::{ListError, PageRequest, Pager};

/// Why a sync, or a model picked from it, failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    List(#[from] ListError),
    #[error("the sync is not finished (the driver stopped before Step::Done)")]
    Unfinished,
    #[error("the relay's chain has no verified model (chain-A meta block)")]
    NoModel,
    #[error("the relay has no verified meta block {0}")]
    NoSuchModel(String),
    #[error("the relay has {0} models ({1}); name one (--meta-hash)")]
    SeveralModels(usize, String),
    #[error("meta block {0}: its payload is not verified: {1}")]
    MetaUnverified(BlockHash, String),
    #[error("the relay has no head for slot {0}")]
    MissingSlot(String),
    #[error("block {hash} ({name}) of this model failed verification: {error}")]
    Failed {
        hash: BlockHash,
        name: String,
        error: String,
    },
}

/// What the driver does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Get this listing page and give it to [`ChainSync::on_page`].
    List(PageRequest),
    /// Get this chain-A block's payload and give it to
    /// [`ChainSync::on_meta_payload`] (its bytes are verified there).
    MetaPayload(BlockHash),
    /// Everything is in: [`ChainSync::finish`].
    Done,
}

/// A chain sync in progress.
#[derive(Debug, Clone)]
pub struct ChainSync {
    b: Pager,
    a: Pager,
    listed_b: Option<Vec<BlockInfo>>,
    listed_a: Option<Vec<BlockInfo>>,
    /// Chain-A payloads asked for and not answered yet, in listing order.
    metas_wanted: Vec<BlockHash>,
    metas: HashMap<BlockHash, Result<Vec<u8>, String>>,
}

impl ChainSync {
    /// A sync listing `page` blocks a request.
    pub fn new(page: usize) -> Self {
        Self::with_pagers(Pager::new(ChainId::B, page), Pager::new(ChainId::A, page))
    }

    /// A sync with its own pagers (bounds, page sizes).
    pub fn with_pagers(b: Pager, a: Pager) -> Self {
        Self {
            b,
            a,
            listed_b: None,
            listed_a: None,
            metas_wanted: Vec::new(),
            metas: HashMap::new(),
        }
    }

    /// What to do next (the same answer until it is given).
    pub fn next(&self) -> Step {
        if self.listed_b.is_none() {
            return self.b.next_request().map_or(Step::Done, Step::List);
        }
        if self.listed_a.is_none() {
            return self.a.next_request().map_or(Step::Done, Step::List);
        }
        self.metas_wanted
            .iter()
            .find(|h| !self.metas.contains_key(h))
            .map_or(Step::Done, |h| Step::MetaPayload(*h))
    }

    /// A listing page's body (2xx) and whether its `Link` header announced
    /// more (None: unknown).
    pub fn on_page(
        &mut self,
        chain: ChainId,
        body: &[u8],
        more: Option<bool>,
    ) -> Result<(), SyncError> {
        let pager = match chain {
            ChainId::B if self.listed_b.is_none() => &mut self.b,
            ChainId::A if self.listed_b.is_some() && self.listed_a.is_none() => &mut self.a,
            _ => return Ok(()),
        };
        pager.on_page_body(body, more)?;
        if pager.is_done() {
            let done = std::mem::replace(pager, Pager::new(chain, 1)).finish()?;
            match chain {
                ChainId::B => self.listed_b = Some(done),
                ChainId::A => {
                    self.metas_wanted = done.iter().map(|i| i.hash).collect();
                    self.listed_a = Some(done);
                }
            }
        }
        Ok(())
    }

    /// A chain-A payload, or why it could not be fetched (the block then
    /// fails verification with that reason).
    pub fn on_meta_payload(&mut self, hash: BlockHash, payload: Result<Vec<u8>, String>) {
        if self.metas_wanted.contains(&hash) {
            self.metas.insert(hash, payload);
        }
    }

    /// Blocks listed so far (both chains).
    pub fn listed(&self) -> usize {
        let n = |l: &Option<Vec<BlockInfo>>, p: &Pager| l.as_ref().map_or(p.listed(), Vec::len);
        n(&self.listed_b, &self.b) + n(&self.listed_a, &self.a)
    }

    /// Verify every listed header (and the chain-A payloads).
    pub fn finish(self) -> Result<Synced, SyncError> {
        if self.next() != Step::Done {
            return Err(SyncError::Unfinished);
        }
        let (Some(a), Some(b)) = (self.listed_a, self.listed_b) else {
            return Err(SyncError::Unfinished);
        };
        Ok(Synced::verify(a, b, self.metas))
    }
}

/// A verified chain as one relay listed it.
#[derive(Debug, Clone)]
pub struct Synced {
    /// The listings, in the relay's order.
    pub a: Vec<BlockInfo>,
    pub b: Vec<BlockInfo>,
    /// Every block's verification result.
    pub report: ChainReport,
    /// The verified blocks (headers; chain-A payloads verified too).
    pub dag: Dag,
    /// Every verified block, signed header included.
    pub blocks: HashMap<BlockHash, Block>,
    /// Verified chain-A payloads.
    pub meta_payloads: HashMap<BlockHash, Vec<u8>>,
}

impl Synced {
    /// Verify listings and chain-A payloads: headers first, with
    /// [`verify_chain_dag`] (the same rules the relay applies).
    pub fn verify(
        a: Vec<BlockInfo>,
        b: Vec<BlockInfo>,
        mut metas: HashMap<BlockHash, Result<Vec<u8>, String>>,
    ) -> Self {
        let mut fetched = Vec::with_capacity(a.len() + b.len());
        for info in &a {
            let mut f = FetchedBlock::from_listing(info, ChainId::A);
            f.payload = Some(
                metas
                    .remove(&info.hash)
                    .unwrap_or_else(|| Err("its payload was not fetched".into())),
            );
            fetched.push(f);
        }
        fetched.extend(b.iter().map(|i| FetchedBlock::from_listing(i, ChainId::B)));
        let (report, dag) = verify_chain_dag(&fetched);
        let mut blocks = HashMap::new();
        let mut meta_payloads = HashMap::new();
        for f in fetched {
            if dag.get(&f.listed_hash).is_none() {
                continue;
            }
            if let Some(block) = f.envelope.ok().and_then(|e| Block::decode(&e).ok()) {
                blocks.insert(f.listed_hash, block);
            }
            if let Some(Ok(p)) = f.payload {
                meta_payloads.insert(f.listed_hash, p);
            }
        }
        Self {
            a,
            b,
            report,
            dag,
            blocks,
            meta_payloads,
        }
    }

    /// Blocks listed (both chains).
    pub fn total(&self) -> usize {
        self.a.len() + self.b.len()
    }

    /// The model `pick` names, with its verified slot heads.
    pub fn model(&self, pick: &ModelPick) -> Result<Model, SyncError> {
        let entry = match pick {
            ModelPick::Latest => select_meta(&self.dag, None).map_err(|_| SyncError::NoModel)?,
            ModelPick::Named(s) => {
                select_meta(&self.dag, Some(s)).map_err(|_| SyncError::NoSuchModel(s.clone()))?
            }
            ModelPick::Hash(h) => {
                if let Some(r) = self.report.get(h).and_then(|r| r.error.clone()) {
                    return Err(SyncError::MetaUnverified(*h, r));
                }
                self.dag
                    .get(h)
                    .filter(|e| e.header.chain == ChainId::A)
                    .ok_or_else(|| SyncError::NoSuchModel(h.to_hex()))?
            }
            ModelPick::Only => {
                let heads: Vec<_> = self
                    .dag
                    .chain(ChainId::A)
                    .filter(|e| self.dag.heads().any(|(k, h)| k.0.is_none() && *h == e.hash))
                    .collect();
                match heads.as_slice() {
                    [one] => *one,
                    [] => return Err(SyncError::NoModel),
                    many => {
                        let names: Vec<String> = many
                            .iter()
                            .map(|e| format!("{} {}", e.header.name, e.hash.short()))
                            .collect();
                        return Err(SyncError::SeveralModels(many.len(), names.join(", ")));
                    }
                }
            }
        };
        let hash = entry.hash;
        let payload = self
            .meta_payloads
            .get(&hash)
            .ok_or_else(|| SyncError::MetaUnverified(hash, "no payload".into()))?;
        let (meta, config) = MetaPayload::parse(payload)
            .map_err(|e| SyncError::MetaUnverified(hash, e.to_string()))?;
        let heads = self.dag.slot_heads(&hash);
        // Failed blocks of this model, by what the listing says (a block
        // that failed may not even decode).
        let errors: HashMap<BlockHash, &String> = self
            .report
            .blocks
            .iter()
            .filter_map(|r| Some((r.hash, r.error.as_ref()?)))
            .collect();
        let failed = self
            .b
            .iter()
            .filter(|i| i.meta == Some(hash))
            .filter_map(|i| Some((i.hash, i.name.clone(), errors.get(&i.hash)?.to_string())))
            .collect();
        Ok(Model {
            meta: hash,
            name: entry.header.name.clone(),
            payload: meta,
            config,
            heads,
            failed,
        })
    }

    /// The verified block `hash` and its listing entry.
    pub fn block(&self, hash: &BlockHash) -> Option<&Block> {
        self.blocks.get(hash)
    }
}

/// Which model to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelPick {
    /// The newest model (the page's and `aiblock peer`'s default).
    Latest,
    /// The only model; several are an error naming them (the CLI's default,
    /// so a command never picks one of several silently).
    Only,
    /// This meta block.
    Hash(BlockHash),
    /// A meta block hash (hex) or a model name ([`Dag::find_meta`]).
    Named(String),
}

impl ModelPick {
    /// `Hash(h)` when given, `Only` otherwise (the CLI's `--meta-hash`).
    pub fn hash_or_only(h: Option<BlockHash>) -> Self {
        h.map_or(Self::Only, Self::Hash)
    }
}

/// A model of a verified chain: its meta block and its slot heads.
#[derive(Debug, Clone)]
pub struct Model {
    pub meta: BlockHash,
    pub name: String,
    pub payload: MetaPayload,
    pub config: Config,
    /// Verified head of every slot that has one, by slot name.
    pub heads: BTreeMap<String, BlockHash>,
    /// Blocks of this model that failed verification: (hash, name, why).
    pub failed: Vec<(BlockHash, String, String)>,
}

impl Model {
    /// The head of one slot.
    pub fn head(&self, slot: Slot) -> Option<BlockHash> {
        self.heads.get(&slot.to_string()).copied()
    }

    /// Every slot's head in [`Slot::all`] order; a slot without one is an
    /// error naming it.
    pub fn all_heads(&self) -> Result<Vec<(Slot, BlockHash)>, SyncError> {
        Slot::all(&self.config)
            .into_iter()
            .map(|s| {
                self.head(s)
                    .map(|h| (s, h))
                    .ok_or_else(|| SyncError::MissingSlot(s.to_string()))
            })
            .collect()
    }

    /// An error when any block of this model failed verification (a
    /// client that must not work from a partly bad chain).
    pub fn require_clean(&self) -> Result<(), SyncError> {
        match self.failed.first() {
            None => Ok(()),
            Some((hash, name, error)) => Err(SyncError::Failed {
                hash: *hash,
                name: name.clone(),
                error: error.clone(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::BlockKind;
    use crate::test_chain::TinyChain;

    /// A relay's pages and payloads for `chain`, as scripted answers.
    struct Relay {
        a: Vec<BlockInfo>,
        b: Vec<BlockInfo>,
        payloads: HashMap<BlockHash, Vec<u8>>,
    }

    impl Relay {
        fn of(t: &TinyChain) -> Self {
            let mut payloads = HashMap::new();
            payloads.insert(t.meta.0.hash, t.meta.1.clone());
            let mut b = Vec::new();
            for (block, p) in &t.slots {
                payloads.insert(block.hash, p.clone());
                b.push(BlockInfo::from(block).with_head(true));
            }
            Self {
                a: vec![BlockInfo::from(&t.meta.0).with_head(true)],
                b,
                payloads,
            }
        }

        /// Drive `sync` to the end; `requests` counts what it asked.
        fn drive(&self, mut sync: ChainSync) -> Result<(Synced, usize), SyncError> {
            let mut requests = 0;
            loop {
                requests += 1;
                assert!(requests < 1000, "the sync loops");
                match sync.next() {
                    Step::List(req) => {
                        let all = match req.chain {
                            ChainId::A => &self.a,
                            ChainId::B => &self.b,
                        };
                        let start = req.after.map_or(0, |h| {
                            all.iter().position(|i| i.hash == h).expect("cursor") + 1
                        });
                        let end = (start + req.limit).min(all.len());
                        let body = serde_json::to_vec(&all[start..end]).expect("json");
                        sync.on_page(req.chain, &body, Some(end < all.len()))?;
                    }
                    Step::MetaPayload(h) => {
                        let p = self
                            .payloads
                            .get(&h)
                            .cloned()
                            .ok_or_else(|| "404".to_string());
                        sync.on_meta_payload(h, p);
                    }
                    Step::Done => return Ok((sync.finish()?, requests)),
                }
            }
        }
    }

    #[test]
    fn a_sync_lists_every_page_verifies_and_finds_every_head() {
        let t = TinyChain::new(3);
        let relay = Relay::of(&t);
        let n = relay.b.len();
        assert!(n > 6, "several pages of 3");
        let (synced, requests) = relay.drive(ChainSync::new(3)).expect("syncs");
        // B in pages of 3 (the last one short or empty), A in one, one meta payload.
        assert_eq!(requests, n.div_ceil(3) + 1 + 1 + 1);
        assert_eq!(synced.total(), n + 1);
        assert_eq!(synced.report.failed, 0, "{:?}", synced.report.blocks);
        for pick in [
            ModelPick::Only,
            ModelPick::Latest,
            ModelPick::Hash(t.meta.0.hash),
            ModelPick::Named("tiny".into()),
        ] {
            let m = synced.model(&pick).expect("model");
            assert_eq!(m.meta, t.meta.0.hash);
            m.require_clean().expect("clean");
            let heads = m.all_heads().expect("every slot");
            assert_eq!(heads.len(), t.slots.len());
            for (block, _) in &t.slots {
                let slot = Slot::parse(&block.header.name).expect("slot");
                assert_eq!(m.head(slot), Some(block.hash));
            }
        }
        assert!(matches!(
            synced.model(&ModelPick::Hash(BlockHash([9; 32]))),
            Err(SyncError::NoSuchModel(_))
        ));
    }

    #[test]
    fn a_bad_block_is_reported_and_its_slot_has_no_verified_head() {
        let t = TinyChain::new(4);
        let mut relay = Relay::of(&t);
        // A forged signature on one expert's listing entry.
        let i = relay
            .b
            .iter()
            .position(|x| x.kind == BlockKind::Expert)
            .expect("an expert");
        let name = relay.b[i].name.clone();
        relay.b[i].signature = "00".repeat(64);
        let (synced, _) = relay.drive(ChainSync::new(1000)).expect("syncs");
        assert_eq!(synced.report.failed, 1);
        let m = synced.model(&ModelPick::Only).expect("model");
        assert_eq!(m.failed.len(), 1);
        let e = m.require_clean().unwrap_err();
        assert!(e.to_string().contains(&name), "{e}");
        assert_eq!(m.all_heads().unwrap_err(), SyncError::MissingSlot(name));
    }

    #[test]
    fn a_missing_meta_payload_or_a_bad_page_stops_the_sync_clearly() {
        let t = TinyChain::new(5);
        let mut relay = Relay::of(&t);
        relay.payloads.clear();
        let (synced, _) = relay.drive(ChainSync::new(1000)).expect("lists");
        assert_eq!(
            synced.report.failed,
            synced.total(),
            "nothing verifies without a config"
        );
        assert_eq!(
            synced.model(&ModelPick::Only).unwrap_err(),
            SyncError::NoModel
        );

        let relay = Relay::of(&t);
        let mut sync = ChainSync::new(2);
        let body = serde_json::to_vec(&relay.b[..3]).expect("json");
        let e = sync.on_page(ChainId::B, &body, Some(true)).unwrap_err();
        assert!(
            e.to_string().contains("3 blocks in a page of at most 2"),
            "{e}"
        );
        // Stopping early is not a verified chain.
        let sync = ChainSync::new(2);
        assert_eq!(sync.finish().unwrap_err(), SyncError::Unfinished);
    }
}
