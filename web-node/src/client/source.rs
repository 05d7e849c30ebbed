//! Where a payload comes from, sans-IO: a [`PayloadFetch`] walks the
//! sources of a [`SourcePolicy`] in order (memory, cache, peers, REST),
//! retries a source that failed for a passing reason, fails over to the
//! next one otherwise, and verifies every answer against the block's
//! verified header ([`verify_held_payload`]) before it is used. A source
//! that answered bytes that fail verification is reported
//! ([`Answer::Corrupt`]: a cache entry to delete, a peer to distrust).
//!
//! ```text
//! driver                                PayloadFetch
//!   next()                         ──►  Next::Ask { origin, attempt, delay_ms }
//!   on_answer(origin, Ok(bytes))   ──►  Answer::Verified(bytes)
//!   on_answer(origin, Err(miss))   ──►  Answer::Retry | Answer::Failover
//!   next()                         ──►  ... | Next::Failed(why, per source)
//! ```

use crate::chain::{
    chunk_count, payload_root, verify_chunk, verify_held_payload, Block, BlockHash,
};
use crate::model::Config;
use crate::node::Millis;

use super::backoff::Backoff;

/// A place a payload can come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Origin {
    /// This session's verified payloads.
    Memory,
    /// A persistent cache (IndexedDB, a data dir): re-verified on read.
    Cache,
    /// The peer network through the relay's `/ws`.
    Peers,
    /// The relay's REST API.
    Rest,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Origin::Memory => "memory",
            Origin::Cache => "cache",
            Origin::Peers => "peers",
            Origin::Rest => "REST",
        })
    }
}

/// The order of the sources and how hard each is tried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourcePolicy {
    pub order: Vec<Origin>,
    /// Tries of one source for passing failures (a timeout, a 5xx) before
    /// the next source; a miss (not there) or a corrupt cache entry moves
    /// on at once.
    pub attempts: u32,
    /// Delay before the second try of a source; doubles up to `max_delay_ms`.
    pub retry_delay_ms: Millis,
    pub max_delay_ms: Millis,
}

impl SourcePolicy {
    /// The page's and the native node's order: memory, cache, peers, REST.
    pub fn node() -> Self {
        Self {
            order: vec![Origin::Memory, Origin::Cache, Origin::Peers, Origin::Rest],
            attempts: 3,
            retry_delay_ms: 250,
            max_delay_ms: 4_000,
        }
    }

    /// A command-line client: the relay's REST API only.
    pub fn rest() -> Self {
        Self {
            order: vec![Origin::Rest],
            ..Self::node()
        }
    }
}

/// Why one try of a source failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceError {
    /// The source does not have it (a cache miss, a 404, no holder): next source.
    Missing(String),
    /// A passing failure (timeout, connection lost, 5xx): try again.
    Transient(String),
    /// The source cannot be used now (offline, no cache): next source.
    Unavailable(String),
}

impl SourceError {
    fn text(&self) -> &str {
        match self {
            Self::Missing(s) | Self::Transient(s) | Self::Unavailable(s) => s,
        }
    }
}

/// What to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Ask `origin` (after `delay_ms`); `attempt` counts from 1.
    Ask {
        origin: Origin,
        attempt: u32,
        delay_ms: Millis,
    },
    /// Verified: the fetch is over.
    Done(Origin),
    /// Every source failed; the text names each source's last reason.
    Failed(String),
}

/// What an answer did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The bytes passed every check against the verified header.
    Verified(Vec<u8>),
    /// Try the same source again.
    Retry,
    /// Go on with the next source.
    Failover,
    /// The source gave bytes that fail verification (why): delete the
    /// cache entry / count it against the peer. The fetch goes on.
    Corrupt(Origin, String),
}

/// One payload being sourced.
#[derive(Debug, Clone)]
pub struct PayloadFetch {
    block: Block,
    config: Option<Config>,
    policy: SourcePolicy,
    pos: usize,
    attempt: u32,
    backoff: Backoff,
    /// Last failure per source tried.
    errors: Vec<(Origin, String)>,
    done: Option<Origin>,
    /// The block's chunk list, checked against the payload root
    /// ([`PayloadFetch::set_chunk_list`]).
    chunks: Option<Vec<BlockHash>>,
}

impl PayloadFetch {
    /// Source the payload of a header-verified `block`; `config` is its
    /// model's (None for a chain-A block).
    pub fn new(block: Block, config: Option<Config>, policy: SourcePolicy) -> Self {
        let backoff = Backoff::new(policy.retry_delay_ms, policy.max_delay_ms);
        Self {
            block,
            config,
            policy,
            pos: 0,
            attempt: 0,
            backoff,
            errors: Vec::new(),
            done: None,
            chunks: None,
        }
    }

    /// The block's chunk list (`GET /blocks/{hash}/chunks`), for a payload
    /// that failed verification: checked against the header's payload
    /// root, then every later answer is checked chunk by chunk first, so a
    /// refusal names the bad chunk. A list that does not commit to the
    /// root is refused.
    pub fn set_chunk_list(&mut self, list: Vec<BlockHash>) -> Result<(), String> {
        let h = &self.block.header;
        let want = chunk_count(h.payload_len, h.chunk_size);
        if list.len() as u64 != want {
            return Err(format!(
                "chunk list of {} hashes, the payload has {want} chunks",
                list.len()
            ));
        }
        if payload_root(&list) != h.payload_root {
            return Err("the chunk list does not hash to the header's payload root".into());
        }
        self.chunks = Some(list);
        Ok(())
    }

    /// Whether a chunk list was set.
    pub fn has_chunk_list(&self) -> bool {
        self.chunks.is_some()
    }

    pub fn block(&self) -> &Block {
        &self.block
    }

    /// The source to ask now.
    pub fn next(&self) -> Next {
        if let Some(o) = self.done {
            return Next::Done(o);
        }
        let Some(&origin) = self.policy.order.get(self.pos) else {
            let why: Vec<String> = self
                .errors
                .iter()
                .map(|(o, e)| format!("{o}: {e}"))
                .collect();
            return Next::Failed(if why.is_empty() {
                "no source to ask".to_string()
            } else {
                why.join("; ")
            });
        };
        let delay_ms = if self.attempt == 0 {
            0
        } else {
            self.backoff.peek()
        };
        Next::Ask {
            origin,
            attempt: self.attempt + 1,
            delay_ms,
        }
    }

    /// The answer of `origin` to the last [`Next::Ask`].
    pub fn on_answer(&mut self, origin: Origin, answer: Result<Vec<u8>, SourceError>) -> Answer {
        if self.done.is_some() || self.policy.order.get(self.pos) != Some(&origin) {
            // Late or unasked: only a verified payload is still useful.
            return match answer {
                Ok(bytes) if self.verify(&bytes).is_ok() => Answer::Verified(bytes),
                _ => Answer::Failover,
            };
        }
        self.attempt += 1;
        match answer {
            Ok(bytes) => match self.verify(&bytes) {
                Ok(()) => {
                    self.done = Some(origin);
                    Answer::Verified(bytes)
                }
                Err(e) => {
                    self.record(origin, format!("bad payload: {e}"));
                    // A cache entry is corrupt for good; a download may
                    // have met a bad peer: try it again within its tries.
                    if origin == Origin::Cache || origin == Origin::Memory {
                        self.advance();
                    } else {
                        self.retry_or_advance();
                    }
                    Answer::Corrupt(origin, e)
                }
            },
            Err(e) => {
                self.record(origin, e.text().to_string());
                match e {
                    SourceError::Transient(_) => {
                        if self.retry_or_advance() {
                            Answer::Retry
                        } else {
                            Answer::Failover
                        }
                    }
                    SourceError::Missing(_) | SourceError::Unavailable(_) => {
                        self.advance();
                        Answer::Failover
                    }
                }
            }
        }
    }

    /// The answer of a source that already ran the same checks against
    /// this block's verified header (the peer node: its chunk list against
    /// the payload root, each chunk against its hash, then the content
    /// rules), so the payload is not verified (or copied) a second time:
    /// the fetch is over when this returns true. Only the source asked
    /// last can answer this way; anything else is refused (false, nothing
    /// recorded).
    pub fn on_checked(&mut self, origin: Origin) -> bool {
        if self.done.is_some() || self.policy.order.get(self.pos) != Some(&origin) {
            return false;
        }
        self.attempt += 1;
        self.done = Some(origin);
        true
    }

    /// Skip a source that cannot be asked now (no cache, peers offline).
    pub fn skip(&mut self, origin: Origin, why: &str) {
        if self.done.is_none() && self.policy.order.get(self.pos) == Some(&origin) {
            self.record(origin, why.to_string());
            self.advance();
        }
    }

    fn verify(&self, bytes: &[u8]) -> Result<(), String> {
        if let Some(list) = &self.chunks {
            let size = self.block.header.chunk_size.max(1) as usize;
            for (i, c) in bytes.chunks(size).enumerate() {
                verify_chunk(&self.block.hash, list, i as u64, c).map_err(|e| e.to_string())?;
            }
        }
        verify_held_payload(&self.block, self.config.as_ref(), bytes).map_err(|e| e.to_string())
    }

    fn record(&mut self, origin: Origin, why: String) {
        self.errors.retain(|(o, _)| *o != origin);
        self.errors.push((origin, why));
    }

    /// True when the same source is tried again.
    fn retry_or_advance(&mut self) -> bool {
        if self.attempt < self.policy.attempts.max(1) {
            if self.attempt > 1 {
                self.backoff.next_delay();
            }
            true
        } else {
            self.advance();
            false
        }
    }

    fn advance(&mut self) {
        self.pos += 1;
        self.attempt = 0;
        self.backoff.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_chain::TinyChain;

    fn fetch(t: &TinyChain, policy: SourcePolicy) -> (PayloadFetch, Vec<u8>) {
        let (block, payload) = t.experts()[0].clone();
        (
            PayloadFetch::new(block, Some(t.config.clone()), policy),
            payload,
        )
    }

    fn ask(f: &mut PayloadFetch) -> (Origin, u32, Millis) {
        match f.next() {
            Next::Ask {
                origin,
                attempt,
                delay_ms,
            } => (origin, attempt, delay_ms),
            other => panic!("expected an ask, got {other:?}"),
        }
    }

    #[test]
    fn sources_are_asked_in_order_and_a_miss_fails_over() {
        let t = TinyChain::new(1);
        let (mut f, payload) = fetch(&t, SourcePolicy::node());
        assert_eq!(ask(&mut f), (Origin::Memory, 1, 0));
        assert_eq!(
            f.on_answer(Origin::Memory, Err(SourceError::Missing("not held".into()))),
            Answer::Failover
        );
        assert_eq!(ask(&mut f).0, Origin::Cache);
        // A corrupt cache entry: reported, then the peers.
        let mut bad = payload.clone();
        bad[0] ^= 1;
        assert!(matches!(
            f.on_answer(Origin::Cache, Ok(bad)),
            Answer::Corrupt(Origin::Cache, _)
        ));
        assert_eq!(ask(&mut f).0, Origin::Peers);
        f.skip(Origin::Peers, "offline");
        assert_eq!(ask(&mut f), (Origin::Rest, 1, 0));
        assert_eq!(
            f.on_answer(Origin::Rest, Ok(payload.clone())),
            Answer::Verified(payload)
        );
        assert_eq!(f.next(), Next::Done(Origin::Rest));
    }

    #[test]
    fn a_checked_answer_is_taken_only_from_the_source_asked() {
        let t = TinyChain::new(3);
        let (mut f, _) = fetch(&t, SourcePolicy::node());
        f.skip(Origin::Memory, "not held");
        assert_eq!(ask(&mut f).0, Origin::Cache);
        // Not asked: refused, and the cache is still the one to ask.
        assert!(!f.on_checked(Origin::Peers));
        assert_eq!(ask(&mut f).0, Origin::Cache);
        f.skip(Origin::Cache, "not cached");
        assert!(f.on_checked(Origin::Peers));
        assert_eq!(f.next(), Next::Done(Origin::Peers));
        // Over: a second answer is not taken.
        assert!(!f.on_checked(Origin::Peers));
    }

    #[test]
    fn with_the_chunk_list_a_refusal_names_the_bad_chunk() {
        let t = TinyChain::new(5);
        let policy = SourcePolicy {
            order: vec![Origin::Rest],
            ..SourcePolicy::node()
        };
        let (mut f, payload) = fetch(&t, policy);
        let size = f.block().header.chunk_size as usize;
        let list = crate::chain::chunk_hashes(&payload, size as u32);
        assert!(list.len() > 2, "the fixture spans several chunks");
        let mut bad = payload.clone();
        bad[size * 2 + 1] ^= 1;
        let Answer::Corrupt(_, why) = f.on_answer(Origin::Rest, Ok(bad.clone())) else {
            panic!("refused");
        };
        assert!(why.contains("payload root"), "{why}");
        // A list that does not commit to the root is refused.
        let mut wrong = list.clone();
        wrong.swap(0, 1);
        assert!(f.set_chunk_list(wrong).is_err());
        assert!(f.set_chunk_list(list[1..].to_vec()).is_err());
        assert!(!f.has_chunk_list());
        f.set_chunk_list(list).expect("the honest list");
        let Answer::Corrupt(_, why) = f.on_answer(Origin::Rest, Ok(bad)) else {
            panic!("refused");
        };
        assert!(why.contains("chunk 2 of block"), "{why}");
        assert_eq!(
            f.on_answer(Origin::Rest, Ok(payload.clone())),
            Answer::Verified(payload)
        );
    }

    #[test]
    fn passing_failures_are_retried_with_backoff_then_fail_over() {
        let t = TinyChain::new(2);
        let policy = SourcePolicy {
            order: vec![Origin::Peers, Origin::Rest],
            attempts: 3,
            retry_delay_ms: 100,
            max_delay_ms: 150,
        };
        let (mut f, payload) = fetch(&t, policy);
        let mut delays = Vec::new();
        for _ in 0..3 {
            let (o, _, d) = ask(&mut f);
            assert_eq!(o, Origin::Peers);
            delays.push(d);
            f.on_answer(Origin::Peers, Err(SourceError::Transient("timeout".into())));
        }
        assert_eq!(delays, vec![0, 100, 150]);
        assert_eq!(ask(&mut f), (Origin::Rest, 1, 0));
        // A bad download is retried on the same source.
        let mut bad = payload.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(matches!(
            f.on_answer(Origin::Rest, Ok(bad.clone())),
            Answer::Corrupt(..)
        ));
        assert_eq!(ask(&mut f).0, Origin::Rest);
        f.on_answer(Origin::Rest, Ok(bad.clone()));
        f.on_answer(Origin::Rest, Ok(bad));
        match f.next() {
            Next::Failed(why) => {
                assert!(why.contains("peers: timeout"), "{why}");
                assert!(why.contains("REST: bad payload"), "{why}");
            }
            other => panic!("expected a failure, got {other:?}"),
        }
        // A late verified answer is still taken.
        assert_eq!(
            f.on_answer(Origin::Peers, Ok(payload.clone())),
            Answer::Verified(payload)
        );
    }
}
