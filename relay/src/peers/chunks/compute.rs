//! Remote computations: which peer computes an expert block, what its
//! answer must look like, and the backoff of a peer that fails.

use std::time::Instant;

use web_node::chain::BlockHash;
use web_node::net::peer::{FromRelay, PeerId};

use super::{
    Action, ComputeJob, ComputeOutcome, ConnId, Core, UsageEvent, MAX_COMPUTE_BACKOFF,
    SCORE_PENALTY,
};

impl Core {
    // ---- remote computation ----

    /// Pick a compute peer for `block` not in `tried` (serve_compute, holds
    /// it, not banned, not in backoff, within compute credits), register the
    /// request and return it with the actions to execute: the `Compute`
    /// message to send and what to count.
    pub fn compute_start(
        &mut self,
        now: Instant,
        block: BlockHash,
        rows: u32,
        input: Vec<f32>,
        tried: &[PeerId],
    ) -> Option<(u64, PeerId, Vec<Action>)> {
        let mut best: Option<(f64, PeerId)> = None;
        for h in self.holders.get(&block).into_iter().flatten() {
            if tried.contains(h) || self.banned_until(h, now).is_some() {
                continue;
            }
            if self
                .reputation
                .get(h)
                .and_then(|r| r.compute_backoff_until)
                .is_some_and(|u| u > now)
            {
                continue;
            }
            let Some(p) = self.peers.get(h) else { continue };
            if !p.serve_compute || p.computing >= self.cfg.compute_credits {
                continue;
            }
            let c = p.cost(p.computing);
            if best.is_none_or(|(b, _)| c < b) {
                best = Some((c, *h));
            }
        }
        let (_, h) = best?;
        let req = self.req_id();
        let p = self.peers.get_mut(&h)?;
        p.computing += 1;
        let conn = p.conn;
        self.computes.insert(
            req,
            ComputeJob {
                peer: h,
                block,
                conn,
                sent: now,
                expected: input.len(),
            },
        );
        let send = Action::Send {
            conn,
            msg: FromRelay::Compute {
                req,
                block,
                rows,
                input,
            },
        };
        Some((
            req,
            h,
            vec![Action::Usage(UsageEvent::ComputeSent { peer: h }), send],
        ))
    }

    /// Logged-in peers that serve computations.
    pub fn compute_peers(&self) -> usize {
        self.peers.values().filter(|p| p.serve_compute).count()
    }

    pub(super) fn compute_fail(
        &mut self,
        now: Instant,
        req: u64,
        reason: String,
        timed_out: bool,
        out: &mut Vec<Action>,
    ) {
        let Some(c) = self.computes.remove(&req) else {
            return;
        };
        if let Some(p) = self.peers.get_mut(&c.peer).filter(|p| p.conn == c.conn) {
            p.computing = p.computing.saturating_sub(1);
            p.score = p.score.saturating_sub(SCORE_PENALTY);
        }
        out.push(Action::Usage(UsageEvent::ComputeFailed {
            peer: c.peer,
            timed_out,
        }));
        let base = self.cfg.compute_backoff_base;
        let r = self.rep(&c.peer, now);
        r.compute_fails += 1;
        let d = base
            .saturating_mul(1u32 << (r.compute_fails - 1).min(20))
            .min(MAX_COMPUTE_BACKOFF);
        r.compute_backoff_until = Some(now + d);
        out.push(Action::ComputeDone {
            req,
            outcome: ComputeOutcome::Failed {
                peer: c.peer,
                reason,
            },
        });
    }

    /// `ComputeResult{req, output}`: checked (one float per input float, all
    /// finite) before it counts.
    pub fn compute_result(
        &mut self,
        now: Instant,
        conn: ConnId,
        req: u64,
        output: Vec<f32>,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        self.touch(now, conn);
        let Some(c) = self.computes.get(&req).filter(|c| c.conn == conn) else {
            return out;
        };
        if output.len() != c.expected {
            let why = format!(
                "returned {} floats for an input of {}",
                output.len(),
                c.expected
            );
            self.compute_fail(now, req, why, false, &mut out);
            return out;
        }
        if output.iter().any(|v| !v.is_finite()) {
            self.compute_fail(
                now,
                req,
                "returned non-finite values".into(),
                false,
                &mut out,
            );
            return out;
        }
        let Some(c) = self.computes.remove(&req) else {
            return out;
        };
        if let Some(p) = self.peers.get_mut(&c.peer).filter(|p| p.conn == conn) {
            p.computing = p.computing.saturating_sub(1);
            p.score = p.score.saturating_add(1);
            p.sample_latency(now.saturating_duration_since(c.sent).as_secs_f64() * 1e3);
        }
        if let Some(r) = self.reputation.get_mut(&c.peer) {
            r.compute_fails = 0;
            r.compute_backoff_until = None;
        }
        out.push(Action::Usage(UsageEvent::ComputeAnswered {
            peer: c.peer,
            block: c.block,
        }));
        out.push(Action::ComputeDone {
            req,
            outcome: ComputeOutcome::Answered {
                peer: c.peer,
                output,
            },
        });
        out
    }

    /// `ComputeFailed{req, reason}`.
    pub fn compute_refused(
        &mut self,
        now: Instant,
        conn: ConnId,
        req: u64,
        reason: String,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        self.touch(now, conn);
        if self.computes.get(&req).is_some_and(|c| c.conn == conn) {
            let mut reason = reason;
            web_node::net::peer::truncate_text(&mut reason);
            self.compute_fail(now, req, format!("refused: {reason}"), false, &mut out);
        }
        out
    }

    /// The driver gave up waiting for `req` (its timeout), or could not
    /// queue it (`timed_out` false).
    pub fn compute_abandon(
        &mut self,
        now: Instant,
        req: u64,
        reason: String,
        timed_out: bool,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        self.compute_fail(now, req, reason, timed_out, &mut out);
        out
    }
}
