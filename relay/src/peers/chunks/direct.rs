//! Direct transfer between peers: introductions, the signalling the relay
//! passes between two introduced keys, proofs of lying and receipts (the
//! signed statements are [`web_node::net::direct`]'s).
//!
//! * **Introductions.** A peer asks for a holder of a block that accepts
//!   direct connections (`Introduce`); the core picks the cheapest one (as
//!   for chunk dispatch, never the requester or a banned peer) and opens a
//!   *session* between the two keys. Signals (`Signal`: offer, answer, ICE
//!   candidates, bye) pass only between a session's two keys, while both are
//!   online, within [`limits::MAX_SIGNAL_BODY`] bytes each and
//!   [`limits::MAX_SIGNALS_PER_SESSION`] per session; a peer has at most
//!   [`limits::MAX_SESSIONS_PER_PEER`] sessions, each expiring after
//!   [`limits::SESSION_TTL`] without a signal. So the relay's memory for
//!   signalling is bounded by the peers online, whatever they send.
//! * **Proofs.** A signed chunk statement whose hash is not the block's bans
//!   the signer at once (a signature cannot be an accident); a proof that
//!   proves nothing (not signed by the accused, the chunk was right, not
//!   sent by the statement's receiver) bans its sender instead.
//! * **Receipts.** A receiver's signed receipt credits the server with the
//!   receipt's bytes, capped: at most the block's payload per (server,
//!   receiver, block), at most [`RECEIPT_BYTES_PER_PERIOD`] per receiver per
//!   usage period, none from a receiver this relay never delivered a chunk
//!   to (a pair of fresh keys cannot mint credit by signing receipts for
//!   each other), none older than [`limits::MAX_CLOCK_SKEW_MS`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Instant;

use web_node::chain::BlockHash;
use web_node::net::direct::{self, limits, Proof, Receipt, SignalKind, Signed};
use web_node::net::peer::{FromRelay, PeerId};
use web_node::net::usage::REPORT_PERIOD_MS;

use super::{hexid, Action, ChunkInfo, ConnId, ConnKind, Core, UsageEvent};

/// Bytes one receiver's receipts may credit per usage period (an hour):
/// the per-key cap of receipts, as usage reports have theirs.
pub const RECEIPT_BYTES_PER_PERIOD: u64 = 8 << 30;
/// Keys remembered as having fetched through this relay, (server,
/// receiver, block) credit records and judged proofs kept at most; past it
/// the oldest go (a receiver forgotten must fetch through the relay again
/// before its receipts count).
pub const DIRECT_CAPACITY: usize = 65_536;

/// Expired sessions are swept at most this often (a sweep walks them all;
/// a session used past its TTL is refused at once anyway).
pub const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// `Introduced` reasons.
pub const NO_DIRECT_HOLDER: &str = "no online holder of the block accepts direct connections";
pub const TOO_MANY_SESSIONS: &str = "too many open introductions";

#[derive(Debug)]
struct Session {
    a: PeerId,
    b: PeerId,
    signals: u32,
    last: Instant,
}

/// A map with a bound: past it, the oldest keys go first (a set with
/// `V = ()`).
#[derive(Debug)]
struct Bounded<K: std::hash::Hash + Eq + Clone, V = ()> {
    map: HashMap<K, V>,
    order: VecDeque<K>,
}

impl<K: std::hash::Hash + Eq + Clone, V> Default for Bounded<K, V> {
    fn default() -> Self {
        Self {
            map: HashMap::new(),
            order: VecDeque::new(),
        }
    }
}

impl<K: std::hash::Hash + Eq + Clone, V> Bounded<K, V> {
    /// Set `k` to `v`; true when `k` is new (an update keeps its age).
    fn insert(&mut self, k: K, v: V) -> bool {
        if self.map.insert(k.clone(), v).is_some() {
            return false;
        }
        self.order.push_back(k);
        while self.order.len() > DIRECT_CAPACITY {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
        true
    }
    fn get(&self, k: &K) -> Option<&V> {
        self.map.get(k)
    }
    fn contains(&self, k: &K) -> bool {
        self.map.contains_key(k)
    }
}

/// The direct-transfer state of the core.
#[derive(Debug, Default)]
pub(super) struct DirectState {
    accepting: HashSet<PeerId>,
    sessions: HashMap<u64, Session>,
    /// Sessions per key (so a check is O(1), whatever is open).
    per_key: HashMap<PeerId, usize>,
    /// Expired sessions are swept at most once per [`SWEEP_EVERY`].
    last_sweep: Option<Instant>,
    next_session: u64,
    /// Keys this relay delivered a chunk to.
    fetched: Bounded<PeerId>,
    /// Bytes credited per (server, receiver, block).
    credited: Bounded<(PeerId, PeerId, BlockHash), u64>,
    /// Per receiver: (period, bytes credited in it).
    period_bytes: HashMap<PeerId, (u64, u64)>,
    /// Proofs already judged (server, block, index, time).
    judged: Bounded<(PeerId, BlockHash, u32, u64)>,
}

impl DirectState {
    pub(super) fn note_fetch(&mut self, id: PeerId) {
        self.fetched.insert(id, ());
    }

    fn sessions_of(&self, id: &PeerId) -> usize {
        self.per_key.get(id).copied().unwrap_or(0)
    }

    fn open(&mut self, id: u64, s: Session) {
        for k in [s.a, s.b] {
            *self.per_key.entry(k).or_default() += 1;
        }
        self.sessions.insert(id, s);
    }

    fn end(&mut self, id: u64) {
        if let Some(s) = self.sessions.remove(&id) {
            self.uncount(&[s.a, s.b]);
        }
    }

    fn uncount(&mut self, keys: &[PeerId]) {
        for k in keys {
            if let Some(n) = self.per_key.get_mut(k) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.per_key.remove(k);
                }
            }
        }
    }

    fn end_where(&mut self, dead: impl Fn(&Session) -> bool) {
        let gone: Vec<u64> = self
            .sessions
            .iter()
            .filter(|(_, s)| dead(s))
            .map(|(k, _)| *k)
            .collect();
        for id in gone {
            self.end(id);
        }
    }

    /// The key left: its sessions end, it is no longer introduced.
    pub(super) fn forget(&mut self, id: &PeerId) {
        self.accepting.remove(id);
        if self.per_key.contains_key(id) {
            self.end_where(|s| &s.a == id || &s.b == id);
        }
        self.period_bytes.remove(id);
    }

    /// Sweep expired sessions (at most once per [`SWEEP_EVERY`]); a session
    /// used after its TTL is refused by [`Core::signal`] in any case.
    fn expire(&mut self, now: Instant) {
        if self
            .last_sweep
            .is_some_and(|t| now.saturating_duration_since(t) < SWEEP_EVERY)
        {
            return;
        }
        self.last_sweep = Some(now);
        self.end_where(|s| now.saturating_duration_since(s.last) >= limits::SESSION_TTL);
    }
}

impl Core {
    /// `Direct{accept}` from `conn`.
    pub fn direct_accept(&mut self, now: Instant, conn: ConnId, accept: bool) {
        let Some(id) = self.touch(now, conn) else {
            return;
        };
        if accept && self.kind_of(conn) == Some(ConnKind::Peer) {
            self.direct.accepting.insert(id);
        } else {
            self.direct.accepting.remove(&id);
        }
    }

    /// Open introductions (sessions) now.
    pub fn direct_sessions(&self) -> usize {
        self.direct.sessions.len()
    }

    /// `Introduce{req, block}` from `conn`.
    pub fn introduce(
        &mut self,
        now: Instant,
        conn: ConnId,
        req: u64,
        block: BlockHash,
    ) -> Vec<Action> {
        let Some(me) = self.touch(now, conn) else {
            return Vec::new();
        };
        self.direct.expire(now);
        let refuse = |reason: &str| {
            vec![Action::Send {
                conn,
                msg: FromRelay::Introduced {
                    req,
                    block,
                    session: 0,
                    holder: None,
                    reason: reason.to_string(),
                },
            }]
        };
        if self.direct.sessions_of(&me) >= limits::MAX_SESSIONS_PER_PEER {
            return refuse(TOO_MANY_SESSIONS);
        }
        let holder = self
            .holders
            .get(&block)
            .into_iter()
            .flatten()
            .filter(|h| **h != me && self.direct.accepting.contains(*h))
            .filter(|h| self.banned_until(h, now).is_none())
            .filter(|h| self.direct.sessions_of(h) < limits::MAX_SESSIONS_PER_PEER)
            .filter_map(|h| self.peers.get(h).map(|p| (*h, p.cost(p.serving))))
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(h, _)| h);
        let Some(holder) = holder else {
            return refuse(NO_DIRECT_HOLDER);
        };
        self.direct.next_session = self.direct.next_session.wrapping_add(1).max(1);
        let session = self.direct.next_session;
        self.direct.open(
            session,
            Session {
                a: me,
                b: holder,
                signals: 0,
                last: now,
            },
        );
        vec![Action::Send {
            conn,
            msg: FromRelay::Introduced {
                req,
                block,
                session,
                holder: Some(holder),
                reason: String::new(),
            },
        }]
    }

    /// `Signal` from `conn` for the other key of `session`.
    pub fn signal(
        &mut self,
        now: Instant,
        conn: ConnId,
        session: u64,
        to: PeerId,
        kind: SignalKind,
        body: String,
    ) -> Vec<Action> {
        let Some(me) = self.touch(now, conn) else {
            return Vec::new();
        };
        self.direct.expire(now);
        let failed = |reason: String| {
            vec![Action::Send {
                conn,
                msg: FromRelay::SignalFailed { session, reason },
            }]
        };
        if body.len() > limits::MAX_SIGNAL_BODY {
            return failed(format!(
                "signal body of {} bytes exceeds {}",
                body.len(),
                limits::MAX_SIGNAL_BODY
            ));
        }
        let expired = self
            .direct
            .sessions
            .get(&session)
            .is_some_and(|s| now.saturating_duration_since(s.last) >= limits::SESSION_TTL);
        if expired {
            self.direct.end(session);
        }
        let Some(s) = self.direct.sessions.get_mut(&session) else {
            return failed("no such introduction (never made, ended or expired)".into());
        };
        let pair_ok = (s.a == me && s.b == to) || (s.b == me && s.a == to);
        if !pair_ok {
            return failed("that key is not the other side of this introduction".into());
        }
        if s.signals >= limits::MAX_SIGNALS_PER_SESSION {
            return failed(format!(
                "more than {} signals on one introduction",
                limits::MAX_SIGNALS_PER_SESSION
            ));
        }
        s.signals += 1;
        s.last = now;
        let Some(to_conn) = self.conn_of(&to) else {
            self.direct.end(session);
            return failed("the other key is not online".into());
        };
        if kind == SignalKind::Bye {
            self.direct.end(session);
        }
        vec![Action::Send {
            conn: to_conn,
            msg: FromRelay::Signal {
                session,
                from: me,
                kind,
                body,
            },
        }]
    }

    /// `Proof` from `conn`, judged against the block's chunk list (`info`,
    /// `None` when the relay does not hold the block).
    pub fn proof(
        &mut self,
        now: Instant,
        conn: ConnId,
        proof: Proof,
        info: Option<&ChunkInfo>,
    ) -> Vec<Action> {
        let Some(me) = self.touch(now, conn) else {
            return Vec::new();
        };
        let accused = proof.body.server;
        let mut out = Vec::new();
        let verdict = |guilty: bool, reason: String| Action::Send {
            conn,
            msg: FromRelay::Verdict {
                accused,
                guilty,
                reason,
            },
        };
        let Some(info) = info.filter(|i| i.block == proof.body.block) else {
            // Nothing to judge against: no one is blamed.
            out.push(verdict(false, "this relay does not hold that block".into()));
            return out;
        };
        let judged = if proof.body.receiver != me {
            Err("the statement names another receiver".to_string())
        } else {
            proof.judge(&info.chunks).map_err(|e| e.to_string())
        };
        match judged {
            Ok(()) => {
                let b = &proof.body;
                if !self
                    .direct
                    .judged
                    .insert((accused, b.block, b.index, b.time_ms), ())
                {
                    out.push(verdict(true, "already judged".into()));
                    return out;
                }
                tracing::warn!(peer = %hexid(&accused), block = %b.block, index = b.index,
                    "proof of lying accepted: a signed chunk does not match its hash");
                out.push(Action::Usage(UsageEvent::BadChunk {
                    holder: accused,
                    block: b.block,
                    link: false,
                }));
                out.push(verdict(
                    true,
                    "signed chunk does not match the block".into(),
                ));
                self.ban_for(
                    now,
                    accused,
                    "a signed chunk it served does not match its hash (proof of lying)",
                    &mut out,
                );
            }
            Err(reason) => {
                tracing::warn!(peer = %hexid(&me), %reason, "false proof of lying: its sender is banned");
                // The verdict may not reach it before the close: the close
                // says why too.
                out.push(verdict(
                    false,
                    format!("the proof proves nothing: {reason}"),
                ));
                self.ban_for(
                    now,
                    me,
                    &format!("sent a false proof of lying ({reason})"),
                    &mut out,
                );
            }
        }
        out
    }

    /// `Receipt` from `conn` (`info`: the block's chunk list, if held;
    /// `now_ms`: the wall clock).
    pub fn receipt(
        &mut self,
        now: Instant,
        now_ms: u64,
        conn: ConnId,
        receipt: Signed<Receipt>,
        info: Option<&ChunkInfo>,
    ) -> Vec<Action> {
        let Some(me) = self.touch(now, conn) else {
            return Vec::new();
        };
        let r = receipt.body;
        let answer = |credited: u64, reason: String| Action::Send {
            conn,
            msg: FromRelay::ReceiptTaken {
                server: r.server,
                block: r.block,
                credited,
                reason,
            },
        };
        let refused = |reason: String| vec![answer(0, reason)];
        if r.receiver != me {
            return refused("a receipt must be signed by its receiver".into());
        }
        if let Err(e) = receipt.verify() {
            return refused(e.to_string());
        }
        if !direct::fresh(r.to_ms, now_ms) {
            return refused("the receipt's window is not within ten minutes of now".into());
        }
        let Some(info) = info.filter(|i| i.block == r.block) else {
            return refused("this relay does not hold that block".into());
        };
        if !self.direct.fetched.contains(&me) {
            return refused("receipts count only from keys this relay delivered a chunk to".into());
        }
        let key = (r.server, r.receiver, r.block);
        let so_far = self.direct.credited.get(&key).copied().unwrap_or(0);
        let period = now_ms / REPORT_PERIOD_MS;
        let (p, used) = self
            .direct
            .period_bytes
            .get(&me)
            .copied()
            .filter(|(p, _)| *p == period)
            .unwrap_or((period, 0));
        let credit = r
            .bytes
            .min(info.payload_len.saturating_sub(so_far))
            .min(RECEIPT_BYTES_PER_PERIOD.saturating_sub(used));
        if credit == 0 {
            return refused("already credited in full (block size or the period's cap)".into());
        }
        self.direct.credited.insert(key, so_far + credit);
        self.direct.period_bytes.insert(me, (p, used + credit));
        vec![
            Action::Usage(UsageEvent::DirectServed {
                server: r.server,
                receiver: r.receiver,
                block: r.block,
                bytes: credit,
            }),
            answer(credit, String::new()),
        ]
    }
}
