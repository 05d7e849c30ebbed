//! Chunk requests and their answers: a `GetChunk` becomes a job sent to
//! the best holder ([`Core::dispatch`]), parked while every holder is busy,
//! retried on a bad, missing or late answer, and answered from the store
//! when no holder is left. An answer of a peer (`Chunk`) and of a link
//! (`ChunkData`) go through the same [`Core::holder_answered`].

use std::sync::Arc;
use std::time::Instant;

use web_node::chain::BlockHash;
use web_node::net::peer::{codes, ChunkSource, FromRelay, PeerId};

use super::{
    Action, ChunkInfo, ChunkJob, ConnId, ConnKind, Core, PresenceChange, UsageEvent, CREDITS,
    NO_LOCAL_HOLDER, SCORE_PENALTY,
};

/// Who answered a chunk request, as [`Core::holder_answered`] checks it.
#[derive(Debug, Clone, Copy)]
pub(super) enum Answerer {
    /// A peer's `Chunk{req, data}`: it earns what it served.
    Peer,
    /// A link's `ChunkData`: it names the chunk (checked too) and where the
    /// other relay got it; it earns nothing here (that relay credited its
    /// peer).
    Link {
        block: BlockHash,
        index: u32,
        from: ChunkSource,
    },
}

impl Core {
    /// Answer request `req` of `conn` with `ChunkFailed`.
    fn chunk_failed(
        out: &mut Vec<Action>,
        conn: ConnId,
        req: u64,
        block: BlockHash,
        index: u32,
        reason: &str,
    ) {
        out.push(Action::Usage(UsageEvent::ChunkFailed));
        out.push(Action::Send {
            conn,
            msg: FromRelay::ChunkFailed {
                req,
                block,
                index,
                reason: reason.into(),
            },
        });
    }

    /// `GetChunk{req, block, index}`; `info` is the block's chunk list if the
    /// relay holds the block (header and payload), else None.
    pub fn get_chunk(
        &mut self,
        now: Instant,
        conn: ConnId,
        req: u64,
        block: BlockHash,
        index: u32,
        info: Option<Arc<ChunkInfo>>,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        let Some(id) = self.touch(now, conn) else {
            return out;
        };
        let Some(info) = info else {
            Self::chunk_failed(
                &mut out,
                conn,
                req,
                block,
                index,
                "unknown block: the relay holds no such block",
            );
            return out;
        };
        if info.range(index).is_none() {
            let n = info.chunks.len();
            Self::chunk_failed(
                &mut out,
                conn,
                req,
                block,
                index,
                &format!("index {index} out of range: the block has {n} chunks"),
            );
            return out;
        }
        let credits = self.cfg.chunk_credits;
        let Some(p) = self.peers.get_mut(&id) else {
            return out;
        };
        if p.gets >= credits {
            Self::chunk_failed(&mut out, conn, req, block, index, CREDITS);
            return out;
        }
        p.gets += 1;
        let from_relay = p.kind == ConnKind::Relay;
        let job = self.req_id();
        self.jobs.insert(
            job,
            ChunkJob {
                requester: conn,
                req,
                info,
                index,
                tried: vec![id],
                at: None,
                parked: None,
                from_relay,
            },
        );
        self.dispatch(now, job, &mut out);
        out
    }

    /// Send job to the best holder not tried yet with a serve credit free:
    /// a local peer, else (cluster mode) a link to a relay whose peers hold
    /// the block; if every such holder is busy (at its credits, a link
    /// connecting, a lookup pending), wait for one (until the chunk
    /// timeout); with no holder left, the store (or, for a request of
    /// another relay, a failure: it reads the same store itself).
    pub(super) fn dispatch(&mut self, now: Instant, job: u64, out: &mut Vec<Action>) {
        let Some(j) = self.jobs.get(&job) else { return };
        let block = j.info.block;
        let tried = j.tried.clone();
        let (index, info, parked, from_relay) = (j.index, j.info.clone(), j.parked, j.from_relay);
        let (best, busy) = self.pick_holder(now, block, &tried, from_relay, out);
        match best.and_then(|(_, h)| self.peers.get_mut(&h).map(|p| (h, p))) {
            Some((h, p)) => {
                p.serving += 1;
                let hconn = p.conn;
                let deadline = now + self.cfg.chunk_timeout;
                if let Some(until) = parked {
                    self.deadlines.remove(&(until, job));
                }
                if let Some(j) = self.jobs.get_mut(&job) {
                    j.tried.push(h);
                    j.at = Some((h, hconn, now, deadline));
                    j.parked = None;
                }
                self.deadlines.insert((deadline, job));
                out.push(Action::Send {
                    conn: hconn,
                    msg: FromRelay::ServeChunk {
                        req: job,
                        block,
                        index,
                    },
                });
            }
            None if busy && parked.is_none_or(|u| u > now) => {
                // Peers first: wait for a credit (holder_freed) rather than
                // read the store at once.
                let until = parked.unwrap_or(now + self.cfg.chunk_timeout);
                if let Some(j) = self.jobs.get_mut(&job) {
                    j.at = None;
                    j.parked = Some(until);
                }
                if parked.is_none() {
                    self.deadlines.insert((until, job));
                }
                self.parked.entry(block).or_default().push_back(job);
            }
            None => {
                if let Some(until) = parked {
                    self.deadlines.remove(&(until, job));
                }
                if let Some(j) = self.jobs.get_mut(&job) {
                    j.at = None;
                    j.parked = None;
                }
                if from_relay {
                    self.fail_job(job, NO_LOCAL_HOLDER, out);
                } else {
                    out.push(Action::ReadStore { job, info, index });
                }
            }
        }
    }

    /// The best holder of `block` not in `tried` with a serve credit free
    /// (a local peer, else a link), and whether one is worth waiting for
    /// (busy, connecting, a lookup pending). Nothing past
    /// [`super::ChunkConfig::max_holder_tries`].
    fn pick_holder(
        &mut self,
        now: Instant,
        block: BlockHash,
        tried: &[PeerId],
        from_relay: bool,
        out: &mut Vec<Action>,
    ) -> (Option<(f64, PeerId)>, bool) {
        let mut best: Option<(f64, PeerId)> = None;
        let mut busy = false;
        // The requester is the first of `tried`.
        if tried.len().saturating_sub(1) >= self.cfg.max_holder_tries {
            return (best, busy);
        }
        for h in self.holders.get(&block).into_iter().flatten() {
            if tried.contains(h) || self.banned_until(h, now).is_some() {
                continue;
            }
            let Some(p) = self.peers.get(h) else { continue };
            if p.serving >= self.cfg.serve_credits {
                busy = true;
                continue;
            }
            let c = p.cost(p.serving);
            if best.is_none_or(|(b, _)| c < b) {
                best = Some((c, *h));
            }
        }
        if best.is_none() && !from_relay && self.cluster && self.others {
            let (b, waiting) = self.link_choice(now, block, tried, out);
            best = b;
            busy |= waiting;
        }
        (best, busy)
    }

    /// Can `h` serve `block` (a peer that announced it, a link whose relay
    /// holds it)?
    fn can_serve(&self, h: &PeerId, block: &BlockHash) -> bool {
        match self.peers.get(h) {
            Some(p) if p.kind == ConnKind::Link => {
                self.remote.get(block).is_some_and(|r| r.links.contains(h))
            }
            Some(p) => p.have.contains(block),
            None => false,
        }
    }

    /// Every job parked on `block` looks again.
    pub(super) fn wake(&mut self, now: Instant, block: &BlockHash, out: &mut Vec<Action>) {
        if let Some(q) = self.parked.remove(block) {
            for job in q {
                self.dispatch(now, job, out);
            }
        }
    }

    /// A serve credit of `h` came free: the oldest job parked on a block
    /// it holds goes on.
    pub(super) fn holder_freed(&mut self, now: Instant, h: PeerId, out: &mut Vec<Action>) {
        let block = self.parked.keys().find(|b| self.can_serve(&h, b)).copied();
        let Some(block) = block else { return };
        let job = self.parked.get_mut(&block).and_then(|q| q.pop_front());
        if self.parked.get(&block).is_some_and(|q| q.is_empty()) {
            self.parked.remove(&block);
        }
        if let Some(job) = job {
            self.dispatch(now, job, out);
        }
    }

    fn unpark(&mut self, job: u64, block: &BlockHash) {
        if let Some(q) = self.parked.get_mut(block) {
            q.retain(|j| *j != job);
            if q.is_empty() {
                self.parked.remove(block);
            }
        }
    }

    /// The job's holder failed (bad chunk, NoChunk, timeout, gone): free
    /// its credit and ask the next one.
    pub(super) fn retry(&mut self, now: Instant, job: u64, out: &mut Vec<Action>) {
        let mut freed = None;
        if let Some(j) = self.jobs.get_mut(&job) {
            if let Some((h, hconn, _, deadline)) = j.at.take() {
                self.deadlines.remove(&(deadline, job));
                if let Some(p) = self.peers.get_mut(&h).filter(|p| p.conn == hconn) {
                    p.serving = p.serving.saturating_sub(1);
                    freed = Some(h);
                }
            }
        }
        self.dispatch(now, job, out);
        if let Some(h) = freed {
            self.holder_freed(now, h, out);
        }
    }

    /// Take a job answered by `conn` (it must be the holder asked).
    pub(super) fn take_answer(&mut self, conn: ConnId, job: u64) -> Option<(PeerId, Instant)> {
        let j = self.jobs.get(&job)?;
        let (h, hconn, sent, deadline) = j.at?;
        if hconn != conn {
            return None;
        }
        self.deadlines.remove(&(deadline, job));
        if let Some(p) = self.peers.get_mut(&h).filter(|p| p.conn == conn) {
            p.serving = p.serving.saturating_sub(1);
        }
        if let Some(j) = self.jobs.get_mut(&job) {
            j.at = None;
        }
        Some((h, sent))
    }

    /// Deliver a checked chunk and close the job.
    fn deliver(&mut self, job: u64, data: Vec<u8>, from: ChunkSource, out: &mut Vec<Action>) {
        let Some(j) = self.jobs.remove(&job) else {
            return;
        };
        if let Some(p) = self
            .conns
            .get(&j.requester)
            .and_then(|id| self.peers.get_mut(id))
            .filter(|p| p.conn == j.requester)
        {
            p.gets = p.gets.saturating_sub(1);
            if p.kind == ConnKind::Relay {
                // The other relay delivers it to its peer and records that.
                out.push(Action::Usage(UsageEvent::ChunkToRelay {
                    bytes: data.len() as u64,
                }));
            } else if let Some(id) = self.conns.get(&j.requester).copied() {
                self.direct.note_fetch(id);
                out.push(Action::Usage(UsageEvent::Fetch {
                    peer: id,
                    block: j.info.block,
                    bytes: data.len() as u64,
                }));
            }
            out.push(Action::Send {
                conn: j.requester,
                msg: FromRelay::ChunkData {
                    req: j.req,
                    block: j.info.block,
                    index: j.index,
                    data,
                    from,
                },
            });
        }
    }

    pub(super) fn fail_job(&mut self, job: u64, reason: &str, out: &mut Vec<Action>) {
        let Some(j) = self.jobs.remove(&job) else {
            return;
        };
        let alive = self
            .conns
            .get(&j.requester)
            .and_then(|id| self.peers.get_mut(id))
            .filter(|p| p.conn == j.requester)
            .map(|p| p.gets = p.gets.saturating_sub(1))
            .is_some();
        if alive {
            Self::chunk_failed(out, j.requester, j.req, j.info.block, j.index, reason);
        }
    }

    /// `Chunk{req, data}` from a holder: checked against the chunk list.
    pub fn chunk(&mut self, now: Instant, conn: ConnId, job: u64, data: Vec<u8>) -> Vec<Action> {
        self.holder_answered(now, conn, job, data, Answerer::Peer)
    }

    /// Holder `conn` (a peer or a link) answered `job` with `data`: take
    /// the answer (late or never asked: nothing to do), check it against
    /// the chunk list; a good one is counted, times and scores the holder
    /// up and is delivered, a bad one scores it down (bans it after
    /// repeats) and asks the next holder. Either way the holder's credit
    /// is free again.
    pub(super) fn holder_answered(
        &mut self,
        now: Instant,
        conn: ConnId,
        job: u64,
        data: Vec<u8>,
        by: Answerer,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        self.touch(now, conn);
        let Some((h, sent)) = self.take_answer(conn, job) else {
            return out;
        };
        let Some(j) = self.jobs.get(&job) else {
            return out;
        };
        let (block, index) = (j.info.block, j.index);
        let named = match by {
            Answerer::Peer => true,
            Answerer::Link {
                block: b, index: i, ..
            } => b == block && i == index,
        };
        if !(named && j.info.check(index, &data)) {
            self.bad_chunk(now, h, job, matches!(by, Answerer::Link { .. }), &mut out);
            self.holder_freed(now, h, &mut out);
            return out;
        }
        let bytes = data.len() as u64;
        let from = match by {
            Answerer::Peer => {
                out.push(Action::Usage(UsageEvent::ChunkServed {
                    peer: h,
                    block,
                    bytes,
                }));
                ChunkSource::Peer(h)
            }
            Answerer::Link { from, .. } => {
                out.push(Action::Usage(UsageEvent::ChunkFromLink { bytes }));
                if let Some(e) = self.links.get_mut(&h) {
                    e.fails = 0;
                }
                match from {
                    ChunkSource::Peer(x) => ChunkSource::Peer(x),
                    _ => ChunkSource::Relay,
                }
            }
        };
        if let Some(p) = self.peers.get_mut(&h) {
            p.sample_latency(now.saturating_duration_since(sent).as_secs_f64() * 1e3);
            p.score = p.score.saturating_add(1);
        }
        self.deliver(job, data, from, &mut out);
        self.holder_freed(now, h, &mut out);
        out
    }

    /// `NoChunk{req}`: the holder cannot serve it after all; it no longer
    /// counts as holding the block.
    pub fn no_chunk(&mut self, now: Instant, conn: ConnId, job: u64) -> Vec<Action> {
        let mut out = Vec::new();
        self.touch(now, conn);
        let Some((h, _)) = self.take_answer(conn, job) else {
            return out;
        };
        if let Some(block) = self.jobs.get(&job).map(|j| j.info.block) {
            if let Some(p) = self.peers.get_mut(&h) {
                if p.have.remove(&block) && self.cluster && p.kind == ConnKind::Peer {
                    out.push(Action::Presence(PresenceChange::Remove {
                        peer: h,
                        blocks: vec![block],
                    }));
                }
            }
            self.unhold(&block, &h);
        }
        self.dispatch(now, job, &mut out);
        self.holder_freed(now, h, &mut out);
        out
    }

    /// The store read of [`Action::ReadStore`] finished.
    pub fn store_read(&mut self, job: u64, data: Result<Vec<u8>, String>) -> Vec<Action> {
        let mut out = Vec::new();
        let Some(j) = self.jobs.get(&job) else {
            return out;
        };
        match data {
            Ok(d) if j.info.check(j.index, &d) => {
                out.push(Action::Usage(UsageEvent::ChunkFromStore {
                    bytes: d.len() as u64,
                }));
                self.deliver(job, d, ChunkSource::Relay, &mut out);
            }
            Ok(_) => self.fail_job(
                job,
                "no source left: the relay's copy does not match",
                &mut out,
            ),
            Err(e) => self.fail_job(job, &format!("no source left: {e}"), &mut out),
        }
        out
    }

    /// The earliest chunk deadline.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.first().map(|(t, _)| *t)
    }

    /// Chunk requests past their deadline go to the next holder; peers
    /// silent past the idle timeout are closed.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        while let Some(&(t, job)) = self.deadlines.first() {
            if t > now {
                break;
            }
            self.deadlines.remove(&(t, job));
            if let Some((h, _, _, _)) = self.jobs.get(&job).and_then(|j| j.at) {
                let is_peer = self.peers.get(&h).is_some_and(|p| p.kind == ConnKind::Peer);
                out.push(Action::Usage(UsageEvent::ChunkTimeout {
                    peer: is_peer.then_some(h),
                }));
                let timeout_ms = self.cfg.chunk_timeout.as_secs_f64() * 1e3;
                if let Some(p) = self.peers.get_mut(&h) {
                    p.sample_latency(timeout_ms);
                    p.score = p.score.saturating_sub(SCORE_PENALTY);
                }
                self.retry(now, job, &mut out);
            } else if let Some(block) = self
                .jobs
                .get(&job)
                .filter(|j| j.parked == Some(t))
                .map(|j| j.info.block)
            {
                // Waited for a holder's credit long enough: the store.
                self.unpark(job, &block);
                self.dispatch(now, job, &mut out);
            }
        }
        if !self.lookups.is_empty() {
            let limit = self.cfg.chunk_timeout;
            self.lookups
                .retain(|_, t| now.saturating_duration_since(*t) < limit);
        }
        let idle = self.cfg.idle_timeout;
        let dead: Vec<ConnId> = self
            .peers
            .values()
            .filter(|p| now.saturating_duration_since(p.last_seen) > idle)
            .map(|p| p.conn)
            .collect();
        for conn in dead {
            out.push(Action::Close {
                conn,
                code: codes::PROTOCOL,
                message: "silent too long".into(),
            });
            self.remove_conn(now, conn, &mut out);
        }
        out
    }
}
