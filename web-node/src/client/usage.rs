//! Usage self-reports, batched: the inference a node ran itself, per block,
//! summed until the driver sends it (`POST /usage/report`), split into
//! signed reports of at most [`REPORT_MAX_ENTRIES`] entries, each with a
//! sequence number distinct from every earlier one of this batcher (the
//! relay refuses a repeated `(key, period, seq)` as a replay).

use std::collections::BTreeMap;

use ed25519_dalek::SigningKey;

use crate::chain::BlockHash;
use crate::net::usage::{ReportEntry, UsageReport, REPORT_MAX_ENTRIES, REPORT_PERIOD_MS};

/// Usage waiting to be reported.
#[derive(Debug, Clone, Default)]
pub struct UsageBatch {
    pending: BTreeMap<BlockHash, (u64, u64)>,
    last_seq: u64,
}

impl UsageBatch {
    pub fn new() -> Self {
        Self::default()
    }

    /// `calls` uses of `block` that routed `tokens` tokens.
    pub fn record(&mut self, block: BlockHash, calls: u64, tokens: u64) {
        let e = self.pending.entry(block).or_default();
        e.0 = e.0.saturating_add(calls);
        e.1 = e.1.saturating_add(tokens);
    }

    /// One answer: each block it used once, with the tokens routed to it.
    pub fn record_answer(&mut self, used: impl IntoIterator<Item = (BlockHash, u64)>) {
        for (block, tokens) in used {
            self.record(block, 1, tokens);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Blocks waiting to be reported.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Everything pending as signed reports for the period of `wall_ms`
    /// (wall-clock milliseconds); the batch is empty afterwards. A report
    /// the relay did not take can be put back with [`UsageBatch::restore`].
    pub fn take_reports(&mut self, key: &SigningKey, wall_ms: u64) -> Vec<UsageReport> {
        let entries: Vec<ReportEntry> = std::mem::take(&mut self.pending)
            .into_iter()
            .map(|(block, (calls, tokens))| ReportEntry {
                block,
                calls,
                tokens,
            })
            .collect();
        entries
            .chunks(REPORT_MAX_ENTRIES)
            .map(|c| {
                // Wall-clock milliseconds keep sequence numbers distinct
                // across restarts; +1 keeps them distinct within one.
                let seq = wall_ms.max(self.last_seq.saturating_add(1));
                self.last_seq = seq;
                UsageReport::sign(key, wall_ms / REPORT_PERIOD_MS, seq, c.to_vec())
            })
            .collect()
    }

    /// Put back the entries of a report that was not delivered.
    pub fn restore(&mut self, report: &UsageReport) {
        for e in &report.entries {
            self.record(e.block, e.calls, e.tokens);
        }
    }

    /// What to do with a report the driver posted: `status` is the HTTP
    /// status, `None` when it was not delivered at all. Delivered (2xx):
    /// done. Not delivered, timed out, rate-limited (429) or a server
    /// error (5xx): its entries are put back, to be signed again with a
    /// new sequence number in the next report. Any other refusal (a bad
    /// signature, a replay, a cap: 4xx) is final, since the same usage
    /// would be refused again: dropped. Returns whether it was put back.
    pub fn settle(&mut self, report: &UsageReport, status: Option<u16>) -> bool {
        let again = match status {
            None => true,
            Some(s) => s == 408 || s == 429 || s >= 500,
        };
        if again {
            self.restore(report);
        }
        again
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_summed_split_and_signed_with_distinct_seqs() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let mut u = UsageBatch::new();
        assert!(u.take_reports(&key, 5).is_empty());
        let blocks: Vec<BlockHash> = (0..REPORT_MAX_ENTRIES + 10)
            .map(|i| {
                let mut h = [0u8; 32];
                h[..8].copy_from_slice(&(i as u64).to_le_bytes());
                BlockHash(h)
            })
            .collect();
        u.record_answer(blocks.iter().map(|&b| (b, 2)));
        u.record_answer([(blocks[0], 5)]);
        assert_eq!(u.len(), blocks.len());
        let wall = 7 * REPORT_PERIOD_MS + 123;
        let reports = u.take_reports(&key, wall);
        assert!(u.is_empty());
        assert_eq!(reports.len(), 2);
        assert_eq!(reports[0].entries.len(), REPORT_MAX_ENTRIES);
        assert_eq!(reports[1].entries.len(), 10);
        assert_eq!((reports[0].seq, reports[1].seq), (wall, wall + 1));
        assert!(reports.iter().all(|r| r.period == 7));
        let first = reports[0]
            .entries
            .iter()
            .find(|e| e.block == blocks[0])
            .expect("block 0");
        assert_eq!((first.calls, first.tokens), (2, 7));
        use ed25519_dalek::Verifier as _;
        let vk = key.verifying_key();
        for r in &reports {
            let sig = ed25519_dalek::Signature::from_bytes(&r.sig);
            vk.verify(&r.signing_bytes(), &sig).expect("signed");
        }
        // Put back, sent again: a new seq even within the same millisecond.
        u.restore(&reports[1]);
        let again = u.take_reports(&key, wall);
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].seq, wall + 2);
        assert_eq!(again[0].entries, reports[1].entries);
    }

    #[test]
    fn a_failed_report_is_put_back_unless_refused_for_good() {
        let key = SigningKey::from_bytes(&[4; 32]);
        let b = BlockHash([9; 32]);
        let mut u = UsageBatch::new();
        u.record_answer([(b, 3)]);
        let wall = 5 * REPORT_PERIOD_MS;
        let r = u.take_reports(&key, wall).remove(0);
        // Delivered: nothing comes back.
        assert!(!u.settle(&r, Some(200)) && u.is_empty());
        // Not delivered, or the relay busy: back, summed with new usage,
        // and signed again with a later seq.
        for status in [None, Some(429), Some(503)] {
            assert!(u.settle(&r, status));
        }
        u.record_answer([(b, 1)]);
        let again = u.take_reports(&key, wall);
        assert_eq!(again.len(), 1);
        assert!(again[0].seq > r.seq);
        assert_eq!(
            (again[0].entries[0].calls, again[0].entries[0].tokens),
            (4, 10)
        );
        // Refused (a replay, a cap, a bad signature): dropped.
        assert!(!u.settle(&again[0], Some(403)) && !u.settle(&again[0], Some(400)));
        assert!(u.is_empty());
    }
}
