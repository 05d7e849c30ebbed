//! The reward formula (see the parent module's docs): the quality and speed
//! factors, the rates, and [`plan_reward`], the one place it is computed for
//! both stores.

use std::collections::{BTreeMap, HashMap};

use web_node::chain::BlockHash;

use super::{PeerCounters, PeerKey, RewardEntry, VersionCounters};

/// Micro-credits a miner earns per relay-verified token routed to its version.
pub const MINER_UC_PER_TOKEN: u64 = 1_000;
/// Micro-credits a peer earns per MiB of verified chunk bytes it served.
pub const PEER_UC_PER_MIB: u64 = 50_000;
/// Micro-credits a peer earns per expert computation answered in time.
pub const PEER_UC_PER_COMPUTE: u64 = 200;
/// Self-reported tokens count this percentage of relay-verified ones (the
/// relay cannot see that inference, only that the reporter fetched the block).
pub const REPORT_WEIGHT_PCT: u64 = 25;
/// Expert latency (per call, µs) at or under which the speed factor is 100 %.
pub const TARGET_LATENCY_US: u64 = 20_000;

/// A version of a slot as the reward needs it (from the chain).
#[derive(Debug, Clone)]
pub struct VersionInfo {
    pub block: BlockHash,
    pub miner: [u8; 32],
    /// Verified public-eval loss of this version and of its parent version.
    pub loss: Option<f64>,
    pub parent_loss: Option<f64>,
}

/// Quality factor in percent (see the module docs).
pub fn quality_pct(loss: Option<f64>, parent: Option<f64>) -> u64 {
    match (loss, parent) {
        (Some(l), Some(p)) if p > 0.0 && l >= 0.0 && l < p => {
            // In micro-nats, integers: exact and the same on every machine.
            let (l, p) = ((l * 1e6).round() as u64, (p * 1e6).round() as u64);
            let bonus = p.saturating_sub(l) * 1000 / p.max(1);
            100 + bonus.min(100)
        }
        _ => 100,
    }
}

/// Speed factor in percent (see the module docs).
pub fn speed_pct(mean_latency_us: Option<u64>) -> u64 {
    match mean_latency_us {
        Some(m) if m > TARGET_LATENCY_US => (100 * TARGET_LATENCY_US / m).clamp(50, 100),
        _ => 100,
    }
}

/// A reward computed from counters, not yet written.
pub(super) struct RewardPlan {
    pub(super) entries: Vec<RewardEntry>,
    /// (block, paid units before, paid units after).
    pub(super) versions: Vec<(BlockHash, u64, u64)>,
    /// (peer and block, paid bytes and computations before, and after).
    pub(super) peers: Vec<(PeerKey, u64, u64, u64, u64)>,
}

/// The reward of one slot (see the module docs) from `counters` and `peers`
/// (every peer row of the slot's blocks at least). The one place the
/// formula is written, for both stores.
pub(super) fn plan_reward(
    slot: &str,
    versions: &[VersionInfo],
    counters: &HashMap<BlockHash, VersionCounters>,
    peers: &HashMap<PeerKey, PeerCounters>,
    now_ms: u64,
) -> RewardPlan {
    let mut plan = RewardPlan {
        entries: Vec::new(),
        versions: Vec::new(),
        peers: Vec::new(),
    };
    for v in versions {
        let c = counters.get(&v.block).cloned().unwrap_or_default();
        let units = c.units().saturating_sub(c.paid_units);
        if units > 0 {
            let q = quality_pct(v.loss, v.parent_loss);
            let s = speed_pct(c.mean_latency_us());
            let amount = units * MINER_UC_PER_TOKEN * q / 100 * s / 100;
            plan.entries.push(RewardEntry {
                key: v.miner,
                amount_uc: amount,
                role: "miner".into(),
                slot: slot.into(),
                block: v.block,
                reason: format!(
                    "{units} units ({} verified tokens + {} self-reported × {REPORT_WEIGHT_PCT} %, less already paid) × {MINER_UC_PER_TOKEN} µc × quality {q} % × speed {s} %",
                    c.tokens, c.reported_tokens
                ),
                at_ms: now_ms,
            });
            plan.versions.push((v.block, c.paid_units, c.units()));
        }
        let mut of_block: BTreeMap<[u8; 32], PeerCounters> = BTreeMap::new();
        for ((p, b), pc) in peers {
            if *b == v.block {
                of_block.insert(*p, pc.clone());
            }
        }
        for (p, pc) in of_block {
            let bytes = pc.bytes.saturating_sub(pc.paid_bytes);
            let comps = pc.computations.saturating_sub(pc.paid_computations);
            if bytes == 0 && comps == 0 {
                continue;
            }
            let amount = bytes * PEER_UC_PER_MIB / (1 << 20) + comps * PEER_UC_PER_COMPUTE;
            plan.entries.push(RewardEntry {
                key: p,
                amount_uc: amount,
                role: "peer".into(),
                slot: slot.into(),
                block: v.block,
                reason: format!(
                    "{bytes} verified bytes × {PEER_UC_PER_MIB} µc/MiB + {comps} computations × {PEER_UC_PER_COMPUTE} µc"
                ),
                at_ms: now_ms,
            });
            plan.peers.push((
                (p, v.block),
                pc.paid_bytes,
                pc.paid_computations,
                pc.bytes,
                pc.computations,
            ));
        }
    }
    plan
}
