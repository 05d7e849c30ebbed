//! Fetching one block's chunks from a peer directly: a sans-IO state
//! machine (events and the time in, [`Step`]s out) that a browser driver
//! (WebRTC data channel), a native driver or a test runs.
//!
//! ```text
//! start ─► Introduce ─► Introduced{holder} ─► (driver: offer/answer/ICE) ─► channel open
//!                │ none                       │ not open by OPEN_DEADLINE
//!                ▼                            ▼
//!            Fallback(all)                Fallback(all)
//! open: Want × window ─► Part… ─► statement signed by the holder over these
//!       bytes? ─no─► Fallback(rest) (nothing provable)
//!       hash in the chunk list? ─no─► Proof to the relay + Fallback(rest)
//!       yes ─► Chunk{index, data}, next Want
//! a silent holder (ANSWER_DEADLINE) or a closed channel ─► Fallback(rest)
//! done ─► Receipt (signed by this node) to the relay
//! ```
//!
//! `Fallback` hands the driver the chunk indexes this fetch will not
//! deliver: exactly those not yet delivered, so nothing is fetched twice.

use std::collections::{BTreeSet, HashMap};

use ed25519_dalek::SigningKey;

use crate::chain::BlockHash;
use crate::net::direct::{limits, ChannelMsg, ChunkStatement, Reassembly, Receipt, Signed};
use crate::net::peer::{PeerId, ToRelay};

/// Chunk requests kept outstanding on a channel (pipelining).
pub const WINDOW: usize = 4;

/// What the driver must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Send this to the relay (`Introduce`, `Proof`, `Receipt`).
    Relay(ToRelay),
    /// Open a WebRTC connection to `holder` on `session` (the driver sends
    /// the offer as `Signal`s and reports [`DirectFetch::opened`]).
    Connect { holder: PeerId, session: u64 },
    /// Send this on the data channel.
    Channel(ChannelMsg),
    /// A chunk checked against its statement and the chunk list.
    Chunk { index: u32, data: Vec<u8> },
    /// Fetch these chunks another way (relay forwarding or the store).
    Fallback { indexes: Vec<u32>, reason: String },
    /// Close the data channel (done, failed or lied to).
    Close,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Introducing,
    Connecting { holder: PeerId, since: u64 },
    Open { holder: PeerId },
    Done,
}

/// One block fetched from one holder. See the module docs.
#[derive(Debug)]
pub struct DirectFetch {
    key: SigningKey,
    me: PeerId,
    block: BlockHash,
    chunks: Vec<BlockHash>,
    chunk_size: u32,
    phase: Phase,
    /// Not yet asked on the channel.
    todo: BTreeSet<u32>,
    /// Asked: req → (index, asked at).
    asked: HashMap<u32, (u32, u64)>,
    parts: HashMap<u32, Reassembly>,
    next_req: u32,
    bytes: u64,
    first_ms: Option<u64>,
    last_ms: u64,
    req: u64,
}

impl DirectFetch {
    /// Fetch chunks `want` of `block` (its chunk list and chunk size from
    /// the verified header) as `key`.
    pub fn new(
        key: SigningKey,
        block: BlockHash,
        chunks: Vec<BlockHash>,
        chunk_size: u32,
        want: impl IntoIterator<Item = u32>,
        req: u64,
    ) -> Self {
        let n = chunks.len() as u32;
        Self {
            me: key.verifying_key().to_bytes(),
            key,
            block,
            chunks,
            chunk_size,
            phase: Phase::Introducing,
            todo: want.into_iter().filter(|i| *i < n).collect(),
            asked: HashMap::new(),
            parts: HashMap::new(),
            next_req: 1,
            bytes: 0,
            first_ms: None,
            last_ms: 0,
            req,
        }
    }

    /// Ask the relay for an introduction.
    pub fn start(&self) -> Vec<Step> {
        vec![Step::Relay(ToRelay::Introduce {
            req: self.req,
            block: self.block,
        })]
    }

    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// The holder, once introduced.
    pub fn holder(&self) -> Option<PeerId> {
        match self.phase {
            Phase::Connecting { holder, .. } | Phase::Open { holder } => Some(holder),
            _ => None,
        }
    }

    /// Number this fetch's channel requests in `lane` (the high 16 bits of
    /// every request id), so that fetches sharing one data channel can tell
    /// their answers apart ([`lane_of`]).
    pub fn with_lane(mut self, lane: u16) -> Self {
        self.next_req = (u32::from(lane) << 16) | 1;
        self
    }

    /// This fetch's lane of channel request ids.
    pub fn lane(&self) -> u16 {
        lane_of(self.next_req)
    }

    /// The block being fetched.
    pub fn block(&self) -> BlockHash {
        self.block
    }

    /// When [`Self::tick`] must next be called (the clock of the calls):
    /// the open deadline while connecting, the answer deadline while
    /// chunks are asked.
    pub fn deadline(&self) -> Option<u64> {
        match self.phase {
            Phase::Connecting { since, .. } => {
                Some(since.saturating_add(limits::OPEN_DEADLINE.as_millis() as u64))
            }
            Phase::Open { .. } if !self.asked.is_empty() => Some(
                self.last_ms
                    .saturating_add(limits::ANSWER_DEADLINE.as_millis() as u64),
            ),
            _ => None,
        }
    }

    /// Bytes received and checked so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The relay's `Introduced` answer.
    pub fn introduced(
        &mut self,
        holder: Option<PeerId>,
        session: u64,
        reason: &str,
        now_ms: u64,
    ) -> Vec<Step> {
        if self.phase != Phase::Introducing {
            return Vec::new();
        }
        match holder {
            Some(h) if h != self.me => {
                self.phase = Phase::Connecting {
                    holder: h,
                    since: now_ms,
                };
                vec![Step::Connect { holder: h, session }]
            }
            _ => self.fail(format!("no direct holder: {reason}"), false),
        }
    }

    /// The data channel opened.
    pub fn opened(&mut self, now_ms: u64) -> Vec<Step> {
        let Phase::Connecting { holder, .. } = self.phase else {
            return Vec::new();
        };
        self.phase = Phase::Open { holder };
        self.last_ms = now_ms;
        let mut out = Vec::new();
        self.pump(now_ms, &mut out);
        out
    }

    /// A message on the data channel.
    pub fn on_message(&mut self, bytes: &[u8], now_ms: u64) -> Vec<Step> {
        if !matches!(self.phase, Phase::Open { .. }) {
            return Vec::new();
        }
        match ChannelMsg::decode(bytes) {
            Ok(m) => self.on_msg(m, now_ms),
            Err(e) => self.fail(format!("bad message from the holder: {e}"), true),
        }
    }

    /// A decoded message on the data channel (one of this fetch's lane,
    /// when several fetches share the channel).
    pub fn on_msg(&mut self, msg: ChannelMsg, now_ms: u64) -> Vec<Step> {
        let Phase::Open { holder } = self.phase else {
            return Vec::new();
        };
        let (req, offset, total, statement, data) = match msg {
            ChannelMsg::Part {
                req,
                offset,
                total,
                statement,
                data,
            } => (req, offset, total, statement, data),
            ChannelMsg::NotHeld { .. } => {
                return self.fail("the holder no longer holds the block".into(), true)
            }
            _ => return self.fail("unexpected message from the holder".into(), true),
        };
        let Some(&(index, _)) = self.asked.get(&req) else {
            return self.fail("a part for nothing asked".into(), true);
        };
        self.last_ms = now_ms;
        let r = self
            .parts
            .entry(req)
            .or_insert_with(|| Reassembly::new(self.chunk_size));
        let (st, data) = match r.add(offset, total, statement, data) {
            Ok(Some(done)) => done,
            Ok(None) => return Vec::new(),
            Err(e) => return self.fail(format!("bad part from the holder: {e}"), true),
        };
        self.parts.remove(&req);
        self.asked.remove(&req);
        // The statement must be the holder's, over exactly these bytes.
        if let Err(e) = st.check_received(&holder, &self.me, &self.block, index, &data) {
            self.todo.insert(index);
            return self.fail(format!("an unsigned or mis-signed chunk: {e}"), true);
        }
        let mut out = Vec::new();
        if st.body.chunk_hash != self.chunks[index as usize] {
            // Signed, and wrong: a proof anyone can check.
            self.todo.insert(index);
            out.push(Step::Relay(ToRelay::Proof { proof: st }));
            out.extend(self.fail(
                format!("the holder signed a wrong chunk {index}: proof sent to the relay"),
                true,
            ));
            return out;
        }
        self.bytes += data.len() as u64;
        self.first_ms.get_or_insert(now_ms);
        out.push(Step::Chunk { index, data });
        self.pump(now_ms, &mut out);
        out
    }

    /// The clock: deadlines to open and to answer.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Step> {
        match self.phase {
            Phase::Connecting { since, .. }
                if now_ms.saturating_sub(since) >= limits::OPEN_DEADLINE.as_millis() as u64 =>
            {
                self.fail("the data channel did not open in time".into(), true)
            }
            Phase::Open { .. }
                if !self.asked.is_empty()
                    && now_ms.saturating_sub(self.last_ms)
                        >= limits::ANSWER_DEADLINE.as_millis() as u64 =>
            {
                self.fail("the holder stopped answering".into(), true)
            }
            _ => Vec::new(),
        }
    }

    /// The channel or connection closed.
    pub fn closed(&mut self) -> Vec<Step> {
        match self.phase {
            Phase::Connecting { .. } | Phase::Open { .. } => {
                self.fail("the direct connection closed".into(), false)
            }
            _ => Vec::new(),
        }
    }

    fn pump(&mut self, now_ms: u64, out: &mut Vec<Step>) {
        while self.asked.len() < WINDOW {
            let Some(index) = self.todo.pop_first() else {
                break;
            };
            let req = self.next_req;
            // Within this fetch's lane (the high 16 bits), never 0.
            let lane = req & !0xffff;
            self.next_req = lane | ((req.wrapping_add(1) & 0xffff).max(1));
            self.asked.insert(req, (index, now_ms));
            out.push(Step::Channel(ChannelMsg::Want {
                req,
                block: self.block,
                index,
            }));
        }
        if self.asked.is_empty() && self.todo.is_empty() {
            let holder = self.holder();
            self.phase = Phase::Done;
            out.push(Step::Close);
            out.extend(holder.and_then(|h| self.receipt(h, now_ms)));
        }
    }

    /// Give up: everything not delivered goes back to the driver.
    fn fail(&mut self, reason: String, close: bool) -> Vec<Step> {
        let holder = self.holder();
        let mut rest: BTreeSet<u32> = std::mem::take(&mut self.todo);
        rest.extend(self.asked.drain().map(|(_, (i, _))| i));
        self.parts.clear();
        self.phase = Phase::Done;
        let mut out = Vec::new();
        if close {
            out.push(Step::Close);
        }
        out.extend(holder.and_then(|h| self.receipt(h, self.last_ms)));
        out.push(Step::Fallback {
            indexes: rest.into_iter().collect(),
            reason,
        });
        out
    }

    /// The receipt for what the holder delivered (none for nothing).
    fn receipt(&self, server: PeerId, now_ms: u64) -> Option<Step> {
        (self.bytes > 0).then(|| {
            let r: Signed<Receipt> = Receipt {
                server,
                receiver: self.me,
                block: self.block,
                bytes: self.bytes,
                from_ms: self.first_ms.unwrap_or(now_ms).min(now_ms),
                to_ms: now_ms,
            }
            .sign(&self.key);
            Step::Relay(ToRelay::Receipt { receipt: r })
        })
    }
}

/// The lane of a channel request id (see [`DirectFetch::with_lane`]).
pub fn lane_of(req: u32) -> u16 {
    (req >> 16) as u16
}

/// The serving side: answer a `Want` for a chunk this node holds.
pub fn serve_want(
    key: &SigningKey,
    receiver: PeerId,
    want: &ChannelMsg,
    chunk: impl FnOnce(&BlockHash, u32) -> Option<Vec<u8>>,
    now_ms: u64,
) -> Vec<ChannelMsg> {
    let ChannelMsg::Want { req, block, index } = want else {
        return Vec::new();
    };
    match chunk(block, *index) {
        Some(data) => {
            let st = ChunkStatement::sign(key, receiver, *block, *index, &data, now_ms);
            ChannelMsg::parts(*req, st, &data)
        }
        None => vec![ChannelMsg::NotHeld { req: *req }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct World {
        holder: SigningKey,
        me: PeerId,
        block: BlockHash,
        payload: Vec<u8>,
        chunk_size: u32,
    }

    impl World {
        fn new() -> Self {
            let payload: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
            Self {
                holder: SigningKey::from_bytes(&[1; 32]),
                me: SigningKey::from_bytes(&[2; 32]).verifying_key().to_bytes(),
                block: BlockHash([5; 32]),
                payload,
                chunk_size: 4096,
            }
        }
        fn chunk(&self, i: u32) -> Vec<u8> {
            let cs = self.chunk_size as usize;
            let s = i as usize * cs;
            self.payload[s..(s + cs).min(self.payload.len())].to_vec()
        }
        fn list(&self) -> Vec<BlockHash> {
            (0..3).map(|i| BlockHash::of(&self.chunk(i))).collect()
        }
        fn fetch(&self) -> DirectFetch {
            DirectFetch::new(
                SigningKey::from_bytes(&[2; 32]),
                self.block,
                self.list(),
                self.chunk_size,
                0..3,
                7,
            )
        }
        fn hk(&self) -> PeerId {
            self.holder.verifying_key().to_bytes()
        }
        /// The holder's answers to the wants in `steps` (`lie` flips a bit
        /// of chunk `lie`).
        fn answer(&self, steps: &[Step], lie: Option<u32>) -> Vec<Vec<u8>> {
            let mut out = Vec::new();
            for s in steps {
                if let Step::Channel(w) = s {
                    let msgs = serve_want(
                        &self.holder,
                        self.me,
                        w,
                        |_, i| {
                            let mut c = self.chunk(i);
                            if lie == Some(i) {
                                c[0] ^= 1;
                            }
                            Some(c)
                        },
                        100,
                    );
                    out.extend(msgs.iter().map(|m| m.encode()));
                }
            }
            out
        }
    }

    fn chunks(steps: &[Step]) -> Vec<u32> {
        steps
            .iter()
            .filter_map(|s| match s {
                Step::Chunk { index, .. } => Some(*index),
                _ => None,
            })
            .collect()
    }

    fn fallback(steps: &[Step]) -> Option<Vec<u32>> {
        steps.iter().find_map(|s| match s {
            Step::Fallback { indexes, .. } => Some(indexes.clone()),
            _ => None,
        })
    }

    fn receipt(steps: &[Step]) -> Option<Signed<Receipt>> {
        steps.iter().find_map(|s| match s {
            Step::Relay(ToRelay::Receipt { receipt }) => Some(receipt.clone()),
            _ => None,
        })
    }

    #[test]
    fn an_honest_holder_delivers_everything_pipelined_and_gets_a_receipt() {
        let w = World::new();
        let mut f = w.fetch();
        assert!(matches!(
            &f.start()[..],
            [Step::Relay(ToRelay::Introduce { req: 7, .. })]
        ));
        let s = f.introduced(Some(w.hk()), 3, "", 0);
        assert_eq!(
            s,
            vec![Step::Connect {
                holder: w.hk(),
                session: 3
            }]
        );
        let wants = f.opened(10);
        assert_eq!(wants.len(), 3, "all three asked at once (window {WINDOW})");
        let mut got = Vec::new();
        let mut last = Vec::new();
        for m in w.answer(&wants, None) {
            last = f.on_message(&m, 20);
            got.extend(chunks(&last));
        }
        assert_eq!(got, vec![0, 1, 2]);
        assert!(f.is_done());
        let r = receipt(&last).expect("a receipt at the end");
        assert_eq!(r.verify(), Ok(()));
        assert_eq!(
            (r.body.server, r.body.bytes),
            (w.hk(), w.payload.len() as u64)
        );
        assert_eq!(fallback(&last), None);
    }

    #[test]
    fn a_lie_is_proven_and_the_rest_falls_back_without_refetching() {
        let w = World::new();
        let mut f = w.fetch();
        f.introduced(Some(w.hk()), 3, "", 0);
        let wants = f.opened(10);
        let mut all = Vec::new();
        let mut delivered = Vec::new();
        for m in w.answer(&wants, Some(1)) {
            let s = f.on_message(&m, 20);
            delivered.extend(chunks(&s));
            all.extend(s);
        }
        let proof = all
            .iter()
            .find_map(|s| match s {
                Step::Relay(ToRelay::Proof { proof }) => Some(proof.clone()),
                _ => None,
            })
            .expect("a proof");
        assert_eq!(proof.judge(&w.list()), Ok(()), "the relay can check it");
        let fb = fallback(&all).expect("fallback");
        // Chunk 0 came directly; 1 (the lie) and 2 go to the relay.
        assert_eq!(delivered, vec![0]);
        assert_eq!(fb, vec![1, 2]);
        let r = receipt(&all).expect("a receipt for what was good");
        assert_eq!(r.body.bytes, w.chunk(0).len() as u64);
        assert!(f.is_done());
    }

    #[test]
    fn no_holder_a_channel_that_never_opens_a_silent_or_closing_holder_fall_back() {
        let w = World::new();
        let mut f = w.fetch();
        assert_eq!(
            fallback(&f.introduced(None, 0, "none", 0)),
            Some(vec![0, 1, 2])
        );

        let mut f = w.fetch();
        f.introduced(Some(w.hk()), 3, "", 0);
        assert!(f.tick(1000).is_empty());
        let s = f.tick(limits::OPEN_DEADLINE.as_millis() as u64);
        assert_eq!(fallback(&s), Some(vec![0, 1, 2]));
        assert_eq!(receipt(&s), None, "nothing received, no receipt");

        // Chunk 0 arrives, then silence.
        let mut f = w.fetch();
        f.introduced(Some(w.hk()), 3, "", 0);
        let wants = f.opened(10);
        let first = w.answer(&wants[..1], None);
        for m in first {
            f.on_message(&m, 20);
        }
        assert!(f.tick(1000).is_empty());
        let s = f.tick(20 + limits::ANSWER_DEADLINE.as_millis() as u64);
        assert_eq!(fallback(&s), Some(vec![1, 2]));
        assert_eq!(receipt(&s).unwrap().body.bytes, w.chunk(0).len() as u64);

        // The holder closes mid-transfer.
        let mut f = w.fetch();
        f.introduced(Some(w.hk()), 3, "", 0);
        let wants = f.opened(10);
        for m in w.answer(&wants[..2], None) {
            f.on_message(&m, 20);
        }
        assert_eq!(fallback(&f.closed()), Some(vec![2]));
        assert!(f.closed().is_empty(), "once");
    }

    #[test]
    fn garbage_and_unsigned_chunks_fall_back_without_a_proof() {
        let w = World::new();
        let mut f = w.fetch();
        f.introduced(Some(w.hk()), 3, "", 0);
        f.opened(10);
        let s = f.on_message(&[1, 2, 3], 20);
        assert_eq!(fallback(&s), Some(vec![0, 1, 2]));
        // A chunk signed by another key: not provable, just dropped.
        let mut f = w.fetch();
        f.introduced(Some(w.hk()), 3, "", 0);
        let wants = f.opened(10);
        let other = SigningKey::from_bytes(&[9; 32]);
        let Step::Channel(want) = &wants[0] else {
            panic!()
        };
        let msgs = serve_want(&other, w.me, want, |_, i| Some(w.chunk(i)), 5);
        let s = f.on_message(&msgs[0].encode(), 20);
        assert!(!s
            .iter()
            .any(|x| matches!(x, Step::Relay(ToRelay::Proof { .. }))));
        assert_eq!(fallback(&s), Some(vec![0, 1, 2]));
    }
}
