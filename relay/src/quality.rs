//! The quality gate: a new version of a slot is accepted only if the relay,
//! recomputing the public-eval loss ([`web_node::eval::public_eval_loss`],
//! CPU reference engine) of the model with the candidate in that slot and
//! every other slot at its head, finds it
//!
//! 1. within [`TOLERANCE`] of the block's `candidate_loss`, and
//! 2. lower than the incumbent's (the heads' model) by at least [`MARGIN`].
//!
//! Rejections carry the numbers. Each miner key also has a token bucket
//! ([`RATE_BURST`] blocks, refilled at [`RATE_PER_MINUTE`] per minute), checked
//! before any recomputation so a flood costs the relay nothing.
//!
//! Layer: foundation. May import: the foundation's base (`metrics`, `pg`, `auth`, `limits`, `gate`, `compute`, `genesis`).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use web_node::chain::{Block, BlockHash, ChainId, MetaPayload};
use web_node::eval::{self, EvalError};
use web_node::model::reference::CpuModel;
use web_node::model::{checkpoint, Config};
use web_node::store::BlockStore;

use crate::gate::{Gate, GateContext, Rejection, Verdict};
use crate::limits::{Rate, RateTable, RATE_TABLE_CAPACITY};

/// Incumbent losses remembered (one per set of heads; an entry is useless
/// once a head of its model moves, so a few suffice).
pub const INCUMBENT_CACHE: usize = 8;

/// Largest accepted gap, in nats per answer token, between the claimed and
/// the recomputed public-eval loss. Both sides run the same deterministic
/// CPU reference code, so honest claims agree to ~1e-6; the slack covers
/// f32 printing and summation-order differences across thread counts.
pub const TOLERANCE: f64 = 1e-3;
/// Smallest improvement over the incumbent's loss (nats per answer token)
/// for a new version to replace the head: equal or noise-level changes do
/// not churn the chain.
pub const MARGIN: f64 = 1e-4;
/// Blocks a miner key may submit in a burst.
pub const RATE_BURST: f64 = 6.0;
/// Sustained blocks per minute per miner key.
pub const RATE_PER_MINUTE: f64 = 6.0;

/// Gate parameters (the defaults are the documented constants).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GateParams {
    pub tolerance: f64,
    pub margin: f64,
    pub burst: f64,
    pub per_minute: f64,
}

impl Default for GateParams {
    fn default() -> Self {
        Self {
            tolerance: TOLERANCE,
            margin: MARGIN,
            burst: RATE_BURST,
            per_minute: RATE_PER_MINUTE,
        }
    }
}

/// Why [`judge`] refused a candidate.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GateError {
    #[error("a new version must claim its public-eval loss (candidate_loss); recomputed {recomputed:.5}")]
    NoClaim { recomputed: f64 },
    #[error(
        "candidate_loss {claimed:.5} does not match the recomputed public-eval loss {recomputed:.5} \
         (|diff| {diff:.5} > tolerance {tolerance})"
    )]
    ClaimMismatch {
        claimed: f64,
        recomputed: f64,
        diff: f64,
        tolerance: f64,
    },
    #[error(
        "public-eval loss {recomputed:.5} is not better than the incumbent's {incumbent:.5} by the \
         margin {margin} (needs < {needed:.5})"
    )]
    NotBetter {
        recomputed: f64,
        incumbent: f64,
        margin: f64,
        needed: f64,
    },
    #[error("cannot evaluate: {0}")]
    Eval(String),
}

/// The decision, as a pure function of the three numbers.
pub fn judge(
    incumbent: f64,
    claimed: Option<f32>,
    recomputed: f64,
    p: &GateParams,
) -> Result<(), GateError> {
    if !recomputed.is_finite() || !incumbent.is_finite() {
        return Err(GateError::Eval(format!(
            "recomputed loss is {recomputed}, incumbent's {incumbent}"
        )));
    }
    let claimed = claimed.ok_or(GateError::NoClaim { recomputed })? as f64;
    let diff = (claimed - recomputed).abs();
    if diff.is_nan() || diff > p.tolerance {
        return Err(GateError::ClaimMismatch {
            claimed,
            recomputed,
            diff,
            tolerance: p.tolerance,
        });
    }
    let needed = incumbent - p.margin;
    if recomputed >= needed {
        return Err(GateError::NotBetter {
            recomputed,
            incumbent,
            margin: p.margin,
            needed,
        });
    }
    Ok(())
}

/// Public-eval loss of the model made of `payloads` (one per slot, any order),
/// with the tokenizer of the meta block.
pub fn model_loss(
    cfg: &Config,
    tokenizer: &tokenizers::Tokenizer,
    payloads: &[&[u8]],
) -> Result<f64, GateError> {
    let weights = checkpoint::join_slots(payloads).map_err(|e| GateError::Eval(e.to_string()))?;
    let mut model = CpuModel::from_safetensors(cfg.clone(), weights)
        .map_err(|e| GateError::Eval(e.to_string()))?;
    eval::public_eval_loss(&mut model, tokenizer)
        .map_err(|e: EvalError| GateError::Eval(e.to_string()))
}

/// A model's identity for the incumbent cache: its meta block and every slot head.
type HeadsKey = (BlockHash, Vec<BlockHash>);

/// The relay's quality gate (see the module docs).
pub struct QualityGate {
    params: GateParams,
    /// Token bucket per miner key, bounded like the relay's own tables.
    buckets: RateTable<[u8; 32]>,
    /// Incumbent losses by (meta, every slot head), the latest [`INCUMBENT_CACHE`].
    incumbents: Mutex<VecDeque<(HeadsKey, f64)>>,
    /// Verdicts of accepted blocks not yet taken (the latest [`VERDICTS`]).
    verdicts: Mutex<VecDeque<(BlockHash, Verdict)>>,
}

/// Verdicts kept until the upload that produced them stores its block.
pub const VERDICTS: usize = 64;

impl Default for QualityGate {
    fn default() -> Self {
        Self::new(GateParams::default())
    }
}

impl QualityGate {
    pub fn new(params: GateParams) -> Self {
        // Whole tokens: the burst and the per-minute rate round to integers.
        let rate = Rate {
            burst: params.burst.round().max(1.0) as u32,
            per_minute: params.per_minute.round().max(0.0) as u32,
        };
        Self {
            params,
            buckets: RateTable::new(rate, RATE_TABLE_CAPACITY),
            incumbents: Mutex::new(VecDeque::new()),
            verdicts: Mutex::new(VecDeque::new()),
        }
    }

    pub fn params(&self) -> &GateParams {
        &self.params
    }

    /// Take one token from the miner's bucket.
    fn rate_limit(&self, miner: &[u8; 32]) -> Result<(), Rejection> {
        self.buckets.take(miner).map_err(|wait| {
            Rejection::rate_limited(format!(
                "miner {} submits too fast: at most {} blocks per minute (burst {}); retry in {wait} s",
                hex::encode(miner),
                self.params.per_minute,
                self.params.burst
            ))
        })
    }

    /// Entries in the per-key table (bounded).
    pub fn rate_table_len(&self) -> usize {
        self.buckets.len()
    }

    fn evaluate(&self, ctx: &GateContext<'_>) -> Result<(), GateError> {
        let h = &ctx.block.header;
        let meta = h
            .meta
            .ok_or_else(|| GateError::Eval("no meta link".into()))?;
        let cfg = ctx
            .config
            .ok_or_else(|| GateError::Eval("unknown meta config".into()))?;
        let meta_payload = read(ctx.store, &meta)?;
        let (m, _) =
            MetaPayload::parse(&meta_payload).map_err(|e| GateError::Eval(e.to_string()))?;
        let tok_json = m
            .tokenizer
            .ok_or_else(|| GateError::Eval("the meta block carries no tokenizer".into()))?;
        let tokenizer: tokenizers::Tokenizer = serde_json::from_value(tok_json)
            .map_err(|e| GateError::Eval(format!("meta tokenizer: {e}")))?;
        let heads: &BTreeMap<String, BlockHash> = ctx.slot_heads;
        let mut payloads: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        for (name, hash) in heads {
            payloads.insert(name.clone(), read(ctx.store, hash)?);
        }
        let key = (meta, heads.values().copied().collect::<Vec<_>>());
        let cached = self
            .incumbents
            .lock()
            .ok()
            .and_then(|c| c.iter().find(|(k, _)| *k == key).map(|(_, l)| *l));
        let incumbent = match cached {
            Some(l) => l,
            None => {
                let refs: Vec<&[u8]> = payloads.values().map(|p| p.as_slice()).collect();
                let l = model_loss(cfg, &tokenizer, &refs)?;
                if let Ok(mut c) = self.incumbents.lock() {
                    if c.len() >= INCUMBENT_CACHE {
                        c.pop_front();
                    }
                    c.push_back((key, l));
                }
                l
            }
        };
        let candidate = ctx.payload().map_err(|r| GateError::Eval(r.message))?;
        payloads.insert(h.name.clone(), candidate);
        let refs: Vec<&[u8]> = payloads.values().map(|p| p.as_slice()).collect();
        let recomputed = model_loss(cfg, &tokenizer, &refs)?;
        tracing::info!(
            slot = %h.name, claimed = ?h.candidate_loss, recomputed, incumbent,
            "quality gate recomputed the public-eval loss"
        );
        judge(incumbent, h.candidate_loss, recomputed, &self.params)?;
        if let Ok(mut v) = self.verdicts.lock() {
            if v.len() >= VERDICTS {
                v.pop_front();
            }
            v.push_back((
                ctx.block.hash,
                Verdict {
                    loss: recomputed,
                    incumbent,
                },
            ));
        }
        Ok(())
    }
}

fn read(store: &dyn BlockStore, hash: &BlockHash) -> Result<Vec<u8>, GateError> {
    store
        .payload(hash)
        .map_err(|e| GateError::Eval(format!("reading {hash}: {e}")))
}

impl Gate for QualityGate {
    fn evaluates(&self, block: &Block) -> bool {
        block.header.chain == ChainId::B
    }

    fn check(&self, ctx: &GateContext<'_>) -> Result<(), Rejection> {
        if ctx.block.header.chain != ChainId::B {
            return Ok(());
        }
        self.rate_limit(&ctx.block.header.miner)?;
        self.evaluate(ctx)
            .map_err(|e| Rejection::rejected(format!("quality gate: {e}")))
    }

    fn take_verdict(&self, block: &BlockHash) -> Option<Verdict> {
        let mut v = self.verdicts.lock().ok()?;
        let i = v.iter().position(|(h, _)| h == block)?;
        v.remove(i).map(|(_, verdict)| verdict)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn judge_accepts_honest_better_claims_only() {
        let p = GateParams::default();
        assert!(judge(0.50, Some(0.40), 0.4000004, &p).is_ok());
        assert!(matches!(
            judge(0.50, None, 0.40, &p),
            Err(GateError::NoClaim { .. })
        ));
        assert!(matches!(
            judge(0.50, Some(0.10), 0.40, &p),
            Err(GateError::ClaimMismatch { .. })
        ));
        assert!(matches!(
            judge(0.50, Some(0.60), 0.60, &p),
            Err(GateError::NotBetter { .. })
        ));
        assert!(matches!(
            judge(0.50, Some(0.49995), 0.49995, &p),
            Err(GateError::NotBetter { .. })
        ));
        assert!(matches!(
            judge(0.50, Some(0.4), f64::NAN, &p),
            Err(GateError::Eval(_))
        ));
        let msg = judge(0.5, Some(0.1), 0.4, &p).unwrap_err().to_string();
        assert!(msg.contains("0.10000") && msg.contains("0.40000"), "{msg}");
    }

    #[test]
    fn token_bucket_limits_each_key() {
        let g = QualityGate::new(GateParams {
            burst: 2.0,
            per_minute: 0.0,
            ..GateParams::default()
        });
        assert!(g.rate_limit(&[1; 32]).is_ok());
        assert!(g.rate_limit(&[1; 32]).is_ok());
        let r = g.rate_limit(&[1; 32]).unwrap_err();
        assert_eq!(r.code, web_node::net::api::codes::RATE_LIMITED);
        assert!(
            g.rate_limit(&[2; 32]).is_ok(),
            "another key has its own bucket"
        );
    }
}
