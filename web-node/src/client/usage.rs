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

    /// At most `max` pending entries (the blocks with the most calls
    /// first), for a driver that signs its report itself; the rest stay
    /// pending for the next report.
    pub fn take_entries(&mut self, max: usize) -> Vec<ReportEntry> {
        let mut all: Vec<ReportEntry> = std::mem::take(&mut self.pending)
            .into_iter()
            .map(|(block, (calls, tokens))| ReportEntry {
                block,
                calls,
                tokens,
            })
            .collect();
        // Stable: equal calls keep block order.
        all.sort_by_key(|e| std::cmp::Reverse(e.calls));
        for e in all.split_off(max.min(all.len())) {
            self.record(e.block, e.calls, e.tokens);
        }
        all
    }

    /// Put back the entries of a report that was not delivered.
    pub fn restore(&mut self, report: &UsageReport) {
        for e in &report.entries {
            self.record(e.block, e.calls, e.tokens);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_taken_up_to_a_bound_and_the_rest_kept() {
        let b = |i: u8| BlockHash([i; 32]);
        let mut u = UsageBatch::new();
        u.record_answer([(b(1), 4), (b(2), 1), (b(3), 0)]);
        u.record_answer([(b(2), 2)]);
        let first = u.take_entries(2);
        // Block 2 was used twice: first; then block 1 (block order).
        assert_eq!(
            first,
            vec![
                ReportEntry {
                    block: b(2),
                    calls: 2,
                    tokens: 3
                },
                ReportEntry {
                    block: b(1),
                    calls: 1,
                    tokens: 4
                },
            ]
        );
        assert_eq!(u.len(), 1);
        u.record_answer([(b(3), 5)]);
        let rest = u.take_entries(REPORT_MAX_ENTRIES);
        assert_eq!(
            rest,
            vec![ReportEntry {
                block: b(3),
                calls: 2,
                tokens: 5
            }]
        );
        assert!(u.is_empty() && u.take_entries(4).is_empty());
    }

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
}
