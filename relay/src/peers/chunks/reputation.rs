//! Scores, measured latency and bans: what makes a holder cheap or
//! expensive to ask, and what a liar costs itself.

use std::time::Instant;

use web_node::net::peer::{codes, PeerId};

use super::{
    hexid, Action, Core, PeerEntry, Reputation, UsageEvent, DEFAULT_LATENCY_MS, LATENCY_EWMA_ALPHA,
    LOAD_WEIGHT_MS, MAX_BAN, REPUTATION_CAPACITY, SCORE_PENALTY, SCORE_WEIGHT_MS,
};

impl PeerEntry {
    pub(super) fn sample_latency(&mut self, ms: f64) {
        self.latency_ms = Some(match self.latency_ms {
            None => ms,
            Some(old) => old + LATENCY_EWMA_ALPHA * (ms - old),
        });
    }

    /// Lower is better.
    pub(super) fn cost(&self, outstanding: u32) -> f64 {
        let lat = self.latency_ms.unwrap_or(DEFAULT_LATENCY_MS).max(0.1);
        let penalty = if self.score < 0 {
            (-self.score) as f64 * SCORE_WEIGHT_MS
        } else {
            0.0
        };
        lat * f64::from(1 + outstanding)
            + f64::from(self.load.min(1000)) / 1000.0 * LOAD_WEIGHT_MS
            + penalty
    }
}

impl Core {
    /// Until when `id` is banned, if it is.
    pub fn banned_until(&self, id: &PeerId, now: Instant) -> Option<Instant> {
        self.reputation
            .get(id)
            .and_then(|r| r.banned_until)
            .filter(|u| *u > now)
    }

    pub(super) fn rep(&mut self, id: &PeerId, now: Instant) -> &mut Reputation {
        if !self.reputation.contains_key(id) && self.reputation.len() >= REPUTATION_CAPACITY {
            // Drop the least recently touched record that holds no active ban.
            let victim = self
                .reputation
                .iter()
                .filter(|(_, r)| r.banned_until.is_none_or(|u| u <= now))
                .min_by_key(|(_, r)| r.touched)
                .map(|(k, _)| *k);
            if let Some(v) = victim {
                self.reputation.remove(&v);
            }
        }
        let r = self.reputation.entry(*id).or_default();
        r.touched = Some(now);
        r
    }

    /// Holder `h` (a peer, or a link) answered `job` with bytes that do not
    /// match: score it down, ban it after repeats, ask the next holder.
    pub(super) fn bad_chunk(
        &mut self,
        now: Instant,
        h: PeerId,
        job: u64,
        link: bool,
        out: &mut Vec<Action>,
    ) {
        let Some(j) = self.jobs.get(&job) else {
            return;
        };
        let (block, index) = (j.info.block, j.index);
        out.push(Action::Usage(UsageEvent::BadChunk {
            holder: h,
            block,
            link,
        }));
        if link {
            tracing::warn!(link = %hexid(&h), %block, index, "another relay forwarded a corrupt chunk");
        } else {
            tracing::warn!(peer = %hexid(&h), %block, index, "peer served a corrupt chunk");
        }
        if let Some(p) = self.peers.get_mut(&h) {
            p.score = p.score.saturating_sub(SCORE_PENALTY);
        }
        let to_ban = self.cfg.bad_chunks_to_ban.max(1);
        let r = self.rep(&h, now);
        r.bad_chunks += 1;
        if r.bad_chunks >= to_ban {
            self.ban(now, h, out);
        }
        self.dispatch(now, job, out);
    }

    pub(super) fn ban(&mut self, now: Instant, id: PeerId, out: &mut Vec<Action>) {
        self.ban_for(now, id, "served chunks that do not match their hashes", out);
    }

    /// Ban `id` (doubling per ban) and close its connection with `why`.
    pub(super) fn ban_for(&mut self, now: Instant, id: PeerId, why: &str, out: &mut Vec<Action>) {
        let base = self.cfg.ban_base;
        let r = self.rep(&id, now);
        r.bans += 1;
        r.bad_chunks = 0;
        let d = base
            .saturating_mul(1u32 << (r.bans - 1).min(20))
            .min(MAX_BAN);
        r.banned_until = Some(now + d);
        out.push(Action::Usage(UsageEvent::Ban));
        tracing::warn!(peer = %hexid(&id), secs = d.as_secs(), why, "peer banned");
        if let Some(conn) = self.peers.get(&id).map(|p| p.conn) {
            out.push(Action::Close {
                conn,
                code: codes::BANNED,
                message: format!("banned for {} s: {why}", d.as_secs()),
            });
            self.remove_conn(now, conn, out);
        }
    }
}
