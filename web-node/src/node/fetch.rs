//! The fetch scheduler: which chunk to ask for next, what is in flight,
//! retries with a bounded count and a doubling delay, and the check of every
//! arriving chunk ([`PayloadAssembler`]).

use std::collections::HashMap;

use crate::chain::{Block, BlockHash, ChainError, PayloadAssembler};
use crate::spec::Config;

use super::{Millis, NodeConfig, Source, MAX_RETRY_DELAY_MS, RETRY_DELAY_MS};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// To be asked for, not before `not_before`.
    Wanted { not_before: Millis, attempts: u32 },
    /// Asked for; the request is in `Fetches::inflight`.
    InFlight { attempts: u32 },
    /// Verified and kept by the assembler.
    Done,
    /// Being fetched directly from a peer (WebRTC); not asked of the relay
    /// unless [`Fetches::release`] hands it back.
    Direct,
}

#[derive(Debug)]
struct Fetch {
    asm: PayloadAssembler,
    config: Option<Config>,
    chunks: Vec<Chunk>,
    /// Every chunk below this index is in flight or done.
    hint: usize,
}

#[derive(Debug, Clone, Copy)]
struct Inflight {
    block: BlockHash,
    index: u32,
    deadline: Millis,
}

/// What happened to a chunk; the node turns it into counters and events.
#[derive(Debug)]
pub(super) enum ChunkOutcome {
    /// An answer to no outstanding request (stale, unknown, or of a
    /// cancelled fetch).
    Ignored,
    /// The chunk is asked again later.
    Retry,
    Progress {
        hash: BlockHash,
        received: u64,
        of: u64,
        from: Source,
        bytes: u64,
    },
    Bad {
        hash: BlockHash,
        index: u32,
        from: Source,
    },
    Failed {
        hash: BlockHash,
        reason: String,
    },
    Complete {
        hash: BlockHash,
        payload: Vec<u8>,
        chunk_size: u32,
        from: Source,
        bytes: u64,
        of: u64,
    },
    Many(Vec<ChunkOutcome>),
}

/// Every fetch of one node, in the order they were started.
#[derive(Debug, Default)]
pub(super) struct Fetches {
    order: Vec<BlockHash>,
    by_hash: HashMap<BlockHash, Fetch>,
    inflight: HashMap<u64, Inflight>,
    next_req: u64,
}

fn retry_delay(attempts: u32) -> Millis {
    let shift = attempts.saturating_sub(1).min(16);
    RETRY_DELAY_MS
        .saturating_mul(1 << shift)
        .min(MAX_RETRY_DELAY_MS)
}

impl Fetches {
    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn contains(&self, hash: &BlockHash) -> bool {
        self.by_hash.contains_key(hash)
    }

    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    pub fn progress(&self) -> Vec<(BlockHash, u64, u64)> {
        self.order
            .iter()
            .filter_map(|h| self.by_hash.get(h))
            .map(|f| (f.asm.hash(), f.asm.received(), f.asm.chunk_count()))
            .collect()
    }

    /// Start fetching `block`: the chunk list is checked against the payload
    /// root. With `direct`, every chunk is reserved for a direct fetch
    /// ([`Self::on_direct`], [`Self::release`]) instead of the relay.
    pub fn start(
        &mut self,
        block: &Block,
        list: Vec<BlockHash>,
        config: Option<Config>,
        direct: bool,
    ) -> Result<(), ChainError> {
        let mut asm = PayloadAssembler::new(block);
        asm.set_chunk_list(list)?;
        let n = asm.chunk_count() as usize;
        let first = if direct {
            Chunk::Direct
        } else {
            Chunk::Wanted {
                not_before: 0,
                attempts: 0,
            }
        };
        self.by_hash.insert(
            block.hash,
            Fetch {
                asm,
                config,
                chunks: vec![first; n],
                hint: 0,
            },
        );
        self.order.push(block.hash);
        Ok(())
    }

    pub fn cancel(&mut self, hash: &BlockHash) -> bool {
        if self.by_hash.remove(hash).is_none() {
            return false;
        }
        self.order.retain(|h| h != hash);
        self.inflight.retain(|_, i| &i.block != hash);
        true
    }

    /// The connection went away: every request in flight is wanted again now.
    pub fn requeue_all(&mut self, now: Millis) {
        for (_, i) in self.inflight.drain() {
            if let Some(f) = self.by_hash.get_mut(&i.block) {
                let ix = i.index as usize;
                if let Some(Chunk::InFlight { attempts }) = f.chunks.get(ix).copied() {
                    f.chunks[ix] = Chunk::Wanted {
                        not_before: now,
                        attempts,
                    };
                    f.hint = f.hint.min(ix);
                }
            }
        }
    }

    /// Up to `room` new requests: (req, block, index).
    pub fn schedule(
        &mut self,
        mut room: usize,
        now: Millis,
        cfg: &NodeConfig,
    ) -> Vec<(u64, BlockHash, u32)> {
        let mut out = Vec::new();
        for hash in &self.order {
            if room == 0 {
                break;
            }
            let Some(f) = self.by_hash.get_mut(hash) else {
                continue;
            };
            // Skip the prefix that is in flight or done.
            while f.hint < f.chunks.len() && !matches!(f.chunks[f.hint], Chunk::Wanted { .. }) {
                f.hint += 1;
            }
            for ix in f.hint..f.chunks.len() {
                if room == 0 {
                    break;
                }
                if let Chunk::Wanted {
                    not_before,
                    attempts,
                } = f.chunks[ix]
                {
                    if not_before > now {
                        continue;
                    }
                    let req = self.next_req;
                    self.next_req = self.next_req.wrapping_add(1);
                    f.chunks[ix] = Chunk::InFlight { attempts };
                    self.inflight.insert(
                        req,
                        Inflight {
                            block: *hash,
                            index: ix as u32,
                            deadline: now.saturating_add(cfg.chunk_timeout),
                        },
                    );
                    out.push((req, *hash, ix as u32));
                    room -= 1;
                }
            }
        }
        out
    }

    /// The earliest time something is due: a request's deadline, or (with
    /// room for more requests) a delayed retry.
    pub fn next_deadline(&self, room: usize) -> Option<Millis> {
        let inflight = self.inflight.values().map(|i| i.deadline).min();
        let retry = if room > 0 {
            self.by_hash
                .values()
                .flat_map(|f| f.chunks[f.hint.min(f.chunks.len())..].iter())
                .filter_map(|c| match c {
                    Chunk::Wanted { not_before, .. } => Some(*not_before),
                    _ => None,
                })
                .min()
        } else {
            None
        };
        match (inflight, retry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Requests past their deadline fail (and are retried or give up).
    pub fn expire(&mut self, now: Millis, cfg: &NodeConfig) -> Vec<ChunkOutcome> {
        let due: Vec<u64> = self
            .inflight
            .iter()
            .filter(|(_, i)| i.deadline <= now)
            .map(|(r, _)| *r)
            .collect();
        let mut out = Vec::new();
        for req in due {
            if let Some(i) = self.inflight.remove(&req) {
                out.push(self.fail_chunk(i.block, i.index, "timed out", now, cfg));
            }
        }
        out
    }

    pub fn on_failed(
        &mut self,
        req: u64,
        reason: &str,
        now: Millis,
        cfg: &NodeConfig,
    ) -> ChunkOutcome {
        match self.inflight.remove(&req) {
            Some(i) => self.fail_chunk(i.block, i.index, reason, now, cfg),
            None => ChunkOutcome::Ignored,
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn on_data(
        &mut self,
        req: u64,
        block: BlockHash,
        index: u32,
        data: Vec<u8>,
        from: Source,
        now: Millis,
        cfg: &NodeConfig,
    ) -> ChunkOutcome {
        let Some(i) = self.inflight.remove(&req) else {
            return ChunkOutcome::Ignored;
        };
        if !self.by_hash.contains_key(&i.block) {
            return ChunkOutcome::Ignored;
        }
        // The relay names what it sends; an answer for another chunk than
        // the one asked under `req` is as bad as a wrong chunk.
        if block != i.block || index != i.index {
            return self.bad(i.block, i.index, from, now, cfg);
        }
        self.accept(i.block, i.index, data, from, now, cfg)
    }

    /// A chunk that arrived directly from a peer (already checked against
    /// its signed statement and the chunk list by the direct fetch; checked
    /// again here by the assembler, as every chunk is).
    pub fn on_direct(
        &mut self,
        block: BlockHash,
        index: u32,
        data: Vec<u8>,
        from: Source,
        now: Millis,
        cfg: &NodeConfig,
    ) -> ChunkOutcome {
        match self
            .by_hash
            .get(&block)
            .and_then(|f| f.chunks.get(index as usize))
        {
            Some(Chunk::Direct) => self.accept(block, index, data, from, now, cfg),
            _ => ChunkOutcome::Ignored,
        }
    }

    /// Chunks the direct fetch will not deliver: asked of the relay now.
    /// Returns how many were handed back.
    pub fn release(&mut self, block: &BlockHash, indexes: &[u32]) -> usize {
        let Some(f) = self.by_hash.get_mut(block) else {
            return 0;
        };
        let mut n = 0;
        for &ix in indexes {
            if let Some(c @ Chunk::Direct) = f.chunks.get_mut(ix as usize) {
                *c = Chunk::Wanted {
                    not_before: 0,
                    attempts: 0,
                };
                f.hint = f.hint.min(ix as usize);
                n += 1;
            }
        }
        n
    }

    /// Chunks of `block` still reserved for a direct fetch.
    pub fn reserved(&self, block: &BlockHash) -> Vec<u32> {
        self.by_hash.get(block).map_or_else(Vec::new, |f| {
            (0..f.chunks.len() as u32)
                .filter(|i| f.chunks[*i as usize] == Chunk::Direct)
                .collect()
        })
    }

    /// A chunk that failed its check: counted, and asked again (of the relay).
    fn bad(
        &mut self,
        block: BlockHash,
        index: u32,
        from: Source,
        now: Millis,
        cfg: &NodeConfig,
    ) -> ChunkOutcome {
        let bad = ChunkOutcome::Bad {
            hash: block,
            index,
            from,
        };
        if let Some(c @ Chunk::Direct) = self
            .by_hash
            .get_mut(&block)
            .and_then(|f| f.chunks.get_mut(index as usize))
        {
            *c = Chunk::InFlight { attempts: 0 };
        }
        let next = self.fail_chunk(block, index, "bad chunk", now, cfg);
        ChunkOutcome::Many(vec![bad, next])
    }

    /// Add a chunk to its fetch's assembler: progress, completion (every
    /// content rule checked) or a bad chunk.
    fn accept(
        &mut self,
        block: BlockHash,
        index: u32,
        data: Vec<u8>,
        from: Source,
        now: Millis,
        cfg: &NodeConfig,
    ) -> ChunkOutcome {
        let Some(f) = self.by_hash.get_mut(&block) else {
            return ChunkOutcome::Ignored;
        };
        let bytes = data.len() as u64;
        if f.asm.add_chunk(u64::from(index), data).is_err() {
            return self.bad(block, index, from, now, cfg);
        }
        if let Some(c) = f.chunks.get_mut(index as usize) {
            *c = Chunk::Done;
        }
        let of = f.asm.chunk_count();
        if !f.asm.is_complete() {
            return ChunkOutcome::Progress {
                hash: block,
                received: f.asm.received(),
                of,
                from,
                bytes,
            };
        }
        let Some(f) = self.take(&block) else {
            return ChunkOutcome::Ignored;
        };
        let chunk_size = f.asm.header().chunk_size;
        match f.asm.finish(f.config.as_ref()) {
            Ok(v) => ChunkOutcome::Complete {
                hash: block,
                payload: v.bytes,
                chunk_size,
                from,
                bytes,
                of,
            },
            Err(e) => ChunkOutcome::Failed {
                hash: block,
                reason: format!("the complete payload fails verification: {e}"),
            },
        }
    }

    fn take(&mut self, hash: &BlockHash) -> Option<Fetch> {
        let f = self.by_hash.remove(hash)?;
        self.order.retain(|h| h != hash);
        self.inflight.retain(|_, i| &i.block != hash);
        Some(f)
    }

    /// One failed attempt at a chunk: ask again after a delay, or give the
    /// fetch up after `cfg.max_attempts`.
    fn fail_chunk(
        &mut self,
        block: BlockHash,
        index: u32,
        reason: &str,
        now: Millis,
        cfg: &NodeConfig,
    ) -> ChunkOutcome {
        let Some(f) = self.by_hash.get_mut(&block) else {
            return ChunkOutcome::Ignored;
        };
        let ix = index as usize;
        let attempts = match f.chunks.get(ix) {
            Some(Chunk::InFlight { attempts }) => attempts + 1,
            _ => return ChunkOutcome::Ignored,
        };
        if attempts >= cfg.max_attempts {
            self.take(&block);
            return ChunkOutcome::Failed {
                hash: block,
                reason: format!("chunk {index}: {reason} (gave up after {attempts} attempts)"),
            };
        }
        f.chunks[ix] = Chunk::Wanted {
            not_before: now.saturating_add(retry_delay(attempts)),
            attempts,
        };
        f.hint = f.hint.min(ix);
        ChunkOutcome::Retry
    }
}
