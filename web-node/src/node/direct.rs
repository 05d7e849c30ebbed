//! Direct transfer inside the node: the sessions of this node's WebRTC
//! connections, in both roles, sans-IO.
//!
//! * **Fetching.** With [`super::NodeConfig::direct`] and the relay's
//!   `DirectConfig` received, [`PeerNode::fetch`] reserves every chunk of the
//!   block for a [`DirectFetch`] and asks the relay for an introduction. The
//!   driver opens the connection ([`RtcAction::Open`]), passes signals both
//!   ways and reports the channel's events; chunks that arrive go into the
//!   same assembler as relay-forwarded ones, and whatever the direct fetch
//!   gives up ([`Step::Fallback`]) is asked of the relay at once, so nothing
//!   is fetched twice and a failed channel costs one deadline at most.
//! * **One connection per holder.** A fetch introduced to a holder this node
//!   already has a connection to rides on it (its own lane of request ids,
//!   [`DirectFetch::with_lane`]); the new introduction is released with a
//!   `Bye`. A connection with no fetch left stays open [`IDLE_KEEP_MS`] for
//!   the next layer's experts. A failure (a lie, a silent holder, a channel
//!   that never opened) closes the connection and hands every fetch on it
//!   back to the relay.
//! * **Serving.** An offer on a session the relay introduced opens an
//!   answering connection; each `Want` is answered with the held chunk and
//!   this node's signed statement over it (split under the channel's
//!   message bound).
//!
//! The driver owns the connections and the clock; statements and receipts
//! carry wall-clock time (`now + wall offset`, see
//! [`PeerNode::set_wall_offset`]), as the relay judges their freshness.

use std::collections::{BTreeMap, HashMap};

use crate::chain::BlockHash;
use crate::net::direct::{limits as dl, ChannelMsg, ChunkStatement, SignalKind};
use crate::net::direct_fetch::{lane_of, serve_want, DirectFetch, Step};
use crate::net::peer::{FromRelay, PeerId, ToRelay};

use super::{Millis, NodeEvent, PeerNode, Source};

/// A fetching connection with no fetch left is closed after this long.
pub const IDLE_KEEP_MS: Millis = 15_000;
/// A holder whose connection never opened is not connected to again for
/// this long: its introductions go to relay forwarding at once (a mute or
/// unreachable holder costs one open deadline, not one per layer).
pub const SHUN_MS: Millis = 60_000;

/// What the driver must do with its WebRTC connections.
#[derive(Debug, Clone, PartialEq)]
pub enum RtcAction {
    /// Open a connection for `session` to `peer`. `offer`: this side makes
    /// the data channel and the SDP offer (the fetching side); otherwise it
    /// answers the offer that follows as [`RtcAction::Remote`].
    Open {
        session: u64,
        peer: PeerId,
        offer: bool,
        ice_servers: Vec<String>,
    },
    /// Apply the other side's offer, answer or ICE candidate.
    Remote {
        session: u64,
        kind: SignalKind,
        body: String,
    },
    /// Send on the session's data channel (at most
    /// [`dl::MAX_CHANNEL_MESSAGE`] bytes; respect `bufferedAmount`).
    Send { session: u64, data: Vec<u8> },
    /// Close the session's connection.
    Close { session: u64 },
}

#[derive(Debug)]
enum Session {
    /// This node fetches over the connection: the fetches on it by lane.
    Fetch {
        peer: PeerId,
        open: bool,
        fetches: BTreeMap<u16, Box<DirectFetch>>,
        /// When the last fetch finished (the connection is then idle).
        idle_since: Option<Millis>,
    },
    /// This node serves the other key over the connection.
    Serve { peer: PeerId },
}

impl Session {
    fn peer(&self) -> PeerId {
        match self {
            Self::Fetch { peer, .. } | Self::Serve { peer } => *peer,
        }
    }
}

/// The node's direct-transfer state (empty unless enabled).
#[derive(Debug, Default)]
pub(super) struct Direct {
    /// The operator's ICE servers; `Some` once `DirectConfig` came on this
    /// connection (only then are introductions asked for).
    ice: Option<Vec<String>>,
    /// Direct fetches waiting for their introduction, by request id.
    pending: HashMap<u64, DirectFetch>,
    sessions: HashMap<u64, Session>,
    /// The fetching connection to each holder.
    by_peer: HashMap<PeerId, u64>,
    next_req: u64,
    next_lane: u16,
    /// Chunks served directly (for [`super::NodeConfig::test_direct_serve_max`]).
    chunks_served: u64,
    /// `now + wall_offset` is the wall clock in Unix milliseconds.
    pub wall_offset: u64,
    /// The latest time the node was told (for calls that carry none).
    clock: Millis,
    /// Holders whose connection never opened, until when they are skipped.
    shunned: HashMap<PeerId, Millis>,
}

impl Direct {
    pub fn ready(&self) -> bool {
        self.ice.is_some()
    }

    fn lane(&mut self) -> u16 {
        self.next_lane = self.next_lane.wrapping_add(1).max(1);
        self.next_lane
    }
}

impl PeerNode {
    /// Tell the node the wall clock: `now + offset` is Unix time in
    /// milliseconds. Direct statements and receipts carry it (the relay
    /// refuses ones more than [`dl::MAX_CLOCK_SKEW_MS`] off its clock).
    pub fn set_wall_offset(&mut self, offset: Millis) {
        self.direct.wall_offset = offset;
    }

    fn wall(&mut self, now: Millis) -> u64 {
        self.direct.clock = self.direct.clock.max(now);
        now.saturating_add(self.direct.wall_offset)
    }

    /// The latest time the node was told.
    pub(super) fn direct_clock(&self) -> Millis {
        self.direct.clock
    }

    /// Test switch: send the relay a forged proof, a statement about chunk 0
    /// of `block` that names `accused` as its server but is signed by this
    /// node. The relay must ban this node (the sender), not the accused.
    /// Returns false when not logged in (nothing sent).
    pub fn test_forge_proof(&mut self, accused: PeerId, block: BlockHash, now: Millis) -> bool {
        if !self.is_logged_in() {
            return false;
        }
        let wall = self.wall(now);
        let mut proof = ChunkStatement::sign(&self.key, self.id(), block, 0, b"forged", wall);
        proof.body.server = accused;
        self.outbox.push_back(ToRelay::Proof { proof });
        true
    }

    /// Direct sessions open now (both roles) and introductions awaited.
    pub fn direct_sessions(&self) -> (usize, usize) {
        (self.direct.sessions.len(), self.direct.pending.len())
    }

    /// Start a direct fetch of `block`, whose chunks [`super::fetch`] has
    /// reserved.
    pub(super) fn start_direct(
        &mut self,
        block: BlockHash,
        list: Vec<BlockHash>,
        chunk_size: u32,
        now: Millis,
    ) {
        self.direct.next_req = self.direct.next_req.wrapping_add(1).max(1);
        let req = self.direct.next_req;
        let n = list.len() as u32;
        let lane = self.direct.lane();
        let fetch =
            DirectFetch::new(self.key.clone(), block, list, chunk_size, 0..n, req).with_lane(lane);
        let steps = fetch.start();
        self.direct.pending.insert(req, fetch);
        self.steps(None, 0, block, None, steps, now);
    }

    /// The relay's direct-transfer messages.
    pub(super) fn handle_direct(&mut self, msg: FromRelay, now: Millis) {
        let wall = self.wall(now);
        match msg {
            FromRelay::DirectConfig { ice_servers } => {
                if self.cfg.direct {
                    self.direct.ice = Some(ice_servers);
                } else {
                    self.stats.ignored += 1;
                }
            }
            FromRelay::Introduced {
                req,
                block,
                session,
                holder,
                reason,
            } => {
                let Some(mut fetch) = self.direct.pending.remove(&req) else {
                    self.stats.ignored += 1;
                    return;
                };
                let lane = fetch.lane();
                self.direct.shunned.retain(|_, until| *until > now);
                if let Some(peer) = holder.filter(|h| self.direct.shunned.contains_key(h)) {
                    self.bye(session, peer);
                    let steps = fetch.introduced(
                        None,
                        session,
                        "the holder's connection failed recently",
                        wall,
                    );
                    self.steps(None, lane, block, None, steps, now);
                    return;
                }
                let existing = holder
                    .and_then(|h| self.direct.by_peer.get(&h).copied())
                    .filter(|c| matches!(self.direct.sessions.get(c), Some(Session::Fetch { .. })));
                if let (Some(peer), Some(conn)) = (holder, existing) {
                    // Ride on the connection this node already has to the
                    // holder; release the new introduction.
                    if session != 0 {
                        self.bye(session, peer);
                    }
                    let mut steps = fetch.introduced(holder, conn, &reason, wall);
                    steps.retain(|s| !matches!(s, Step::Connect { .. }));
                    let mut open = false;
                    if let Some(Session::Fetch {
                        open: o,
                        fetches,
                        idle_since,
                        ..
                    }) = self.direct.sessions.get_mut(&conn)
                    {
                        *idle_since = None;
                        fetches.insert(lane, Box::new(fetch));
                        open = *o;
                    }
                    self.steps(Some(conn), lane, block, Some(peer), steps, now);
                    if open {
                        let steps = self
                            .fetch_mut(conn, lane)
                            .map(|f| f.opened(wall))
                            .unwrap_or_default();
                        self.steps(Some(conn), lane, block, Some(peer), steps, now);
                    }
                    return;
                }
                let steps = fetch.introduced(holder, session, &reason, wall);
                match holder {
                    Some(peer)
                        if fetch.holder().is_some()
                            && !self.direct.sessions.contains_key(&session) =>
                    {
                        let mut fetches = BTreeMap::new();
                        fetches.insert(lane, Box::new(fetch));
                        self.direct.sessions.insert(
                            session,
                            Session::Fetch {
                                peer,
                                open: false,
                                fetches,
                                idle_since: None,
                            },
                        );
                        self.direct.by_peer.insert(peer, session);
                        self.steps(Some(session), lane, block, Some(peer), steps, now);
                    }
                    Some(_) if fetch.holder().is_some() => {
                        // A session id already in use: the relay's mistake;
                        // the chunks go to the relay instead.
                        let steps = fetch.closed();
                        self.steps(None, lane, block, None, steps, now);
                    }
                    _ => self.steps(None, lane, block, None, steps, now),
                }
            }
            FromRelay::Signal {
                session,
                from,
                kind,
                body,
            } => self.remote_signal(session, from, kind, body, now),
            FromRelay::SignalFailed { session, .. } => {
                if self.direct.sessions.contains_key(&session) {
                    self.end_session(session, now, false);
                } else {
                    self.stats.ignored += 1;
                }
            }
            FromRelay::Verdict {
                accused,
                guilty,
                reason,
            } => {
                self.events.push_back(NodeEvent::DirectVerdict {
                    accused,
                    guilty,
                    reason,
                });
            }
            FromRelay::ReceiptTaken { credited, .. } => {
                self.stats.direct_receipts_credited += credited;
            }
            _ => self.stats.ignored += 1,
        }
    }

    fn remote_signal(
        &mut self,
        session: u64,
        from: PeerId,
        kind: SignalKind,
        body: String,
        now: Millis,
    ) {
        match self.direct.sessions.get(&session) {
            Some(s) if s.peer() != from => self.stats.ignored += 1,
            Some(_) if kind == SignalKind::Bye => self.end_session(session, now, true),
            Some(Session::Fetch { .. }) if kind == SignalKind::Offer => self.stats.ignored += 1,
            Some(Session::Serve { .. }) if kind == SignalKind::Answer => self.stats.ignored += 1,
            Some(_) => self.rtc(RtcAction::Remote {
                session,
                kind,
                body,
            }),
            None if kind == SignalKind::Offer && self.cfg.test_direct_mute => {
                self.stats.ignored += 1;
            }
            None if kind == SignalKind::Offer && self.cfg.direct && self.direct.ready() => {
                let serving = self
                    .direct
                    .sessions
                    .values()
                    .filter(|s| matches!(s, Session::Serve { .. }))
                    .count();
                if serving >= dl::MAX_SESSIONS_PER_PEER {
                    self.outbox.push_back(ToRelay::Signal {
                        session,
                        to: from,
                        kind: SignalKind::Bye,
                        body: "busy: too many direct connections".into(),
                    });
                    return;
                }
                self.direct
                    .sessions
                    .insert(session, Session::Serve { peer: from });
                let ice_servers = self.direct.ice.clone().unwrap_or_default();
                self.rtc(RtcAction::Open {
                    session,
                    peer: from,
                    offer: false,
                    ice_servers,
                });
                self.rtc(RtcAction::Remote {
                    session,
                    kind,
                    body,
                });
            }
            None => self.stats.ignored += 1,
        }
    }

    /// The driver's own offer, answer or ICE candidate for `session`, to be
    /// passed to the other side by the relay.
    pub fn rtc_signal(&mut self, session: u64, kind: SignalKind, body: String, now: Millis) {
        let Some(peer) = self.direct.sessions.get(&session).map(Session::peer) else {
            return;
        };
        if body.len() > dl::MAX_SIGNAL_BODY {
            // The relay would refuse it: give the session up now.
            self.end_session(session, now, true);
            return;
        }
        if self.is_logged_in() {
            self.outbox.push_back(ToRelay::Signal {
                session,
                to: peer,
                kind,
                body,
            });
        }
    }

    fn fetch_mut(&mut self, session: u64, lane: u16) -> Option<&mut DirectFetch> {
        match self.direct.sessions.get_mut(&session) {
            Some(Session::Fetch { fetches, .. }) => fetches.get_mut(&lane).map(|f| &mut **f),
            _ => None,
        }
    }

    /// Run `f` on every fetch of a fetching connection, and carry out the steps.
    fn each_fetch(
        &mut self,
        session: u64,
        now: Millis,
        mut f: impl FnMut(&mut DirectFetch) -> Vec<Step>,
    ) {
        let (peer, lanes): (PeerId, Vec<u16>) = match self.direct.sessions.get(&session) {
            Some(Session::Fetch { peer, fetches, .. }) => {
                (*peer, fetches.keys().copied().collect())
            }
            _ => return,
        };
        for lane in lanes {
            let Some(fetch) = self.fetch_mut(session, lane) else {
                continue;
            };
            let block = fetch.block();
            let steps = f(fetch);
            self.steps(Some(session), lane, block, Some(peer), steps, now);
        }
    }

    /// The data channel of `session` opened.
    pub fn rtc_opened(&mut self, session: u64, now: Millis) {
        let wall = self.wall(now);
        if let Some(Session::Fetch { open, .. }) = self.direct.sessions.get_mut(&session) {
            *open = true;
            self.each_fetch(session, now, |f| f.opened(wall));
        }
    }

    /// A message on the data channel of `session`.
    pub fn rtc_message(&mut self, session: u64, data: &[u8], now: Millis) {
        let wall = self.wall(now);
        match self.direct.sessions.get(&session) {
            Some(Session::Fetch { peer, .. }) => {
                let peer = *peer;
                let msg = match ChannelMsg::decode(data) {
                    Ok(m) => m,
                    Err(_) => {
                        self.stats.ignored += 1;
                        self.end_session(session, now, true);
                        return;
                    }
                };
                let req = match &msg {
                    ChannelMsg::Part { req, .. } | ChannelMsg::NotHeld { req } => *req,
                    ChannelMsg::Want { .. } => {
                        // A holder does not ask: the channel is misused.
                        self.stats.ignored += 1;
                        self.end_session(session, now, true);
                        return;
                    }
                };
                let lane = lane_of(req);
                let Some(fetch) = self.fetch_mut(session, lane) else {
                    // An answer for a fetch that ended (given up, cancelled).
                    self.stats.ignored += 1;
                    return;
                };
                let block = fetch.block();
                let steps = fetch.on_msg(msg, wall);
                self.steps(Some(session), lane, block, Some(peer), steps, now);
            }
            Some(Session::Serve { peer }) => {
                let peer = *peer;
                let want = match ChannelMsg::decode(data) {
                    Ok(m @ ChannelMsg::Want { .. }) => m,
                    _ => {
                        // Only wants come to a server: anything else ends it.
                        self.stats.ignored += 1;
                        self.end_session(session, now, true);
                        return;
                    }
                };
                if self
                    .cfg
                    .test_direct_serve_max
                    .is_some_and(|max| self.direct.chunks_served >= max)
                {
                    // The test's holder goes away mid-transfer.
                    let serving: Vec<u64> = self
                        .direct
                        .sessions
                        .iter()
                        .filter(|(_, s)| matches!(s, Session::Serve { .. }))
                        .map(|(id, _)| *id)
                        .collect();
                    for s in serving {
                        self.end_session(s, now, true);
                    }
                    return;
                }
                let corrupt = self.cfg.corrupt_direct;
                let held = &self.held;
                let mut sent = 0u64;
                let msgs = serve_want(
                    &self.key,
                    peer,
                    &want,
                    |b, i| {
                        let mut c = held.get(b)?.chunk(b, i).ok()?;
                        if corrupt {
                            if let Some(x) = c.first_mut() {
                                *x ^= 1;
                            }
                        }
                        sent = c.len() as u64;
                        Some(c)
                    },
                    wall,
                );
                self.stats.direct_bytes_served += sent;
                self.direct.chunks_served += u64::from(sent > 0);
                for m in msgs {
                    self.rtc(RtcAction::Send {
                        session,
                        data: m.encode(),
                    });
                }
            }
            None => self.stats.ignored += 1,
        }
    }

    /// The connection or data channel of `session` closed (or failed).
    pub fn rtc_closed(&mut self, session: u64, now: Millis) {
        if self.direct.sessions.contains_key(&session) {
            self.end_session(session, now, false);
        }
    }

    /// Direct deadlines (node clock): fetches' open and answer deadlines,
    /// idle connections' end.
    pub(super) fn direct_deadline(&self) -> Option<Millis> {
        let off = self.direct.wall_offset;
        self.direct
            .sessions
            .values()
            .flat_map(|s| match s {
                Session::Fetch {
                    fetches,
                    idle_since,
                    ..
                } => fetches
                    .values()
                    .filter_map(|f| f.deadline().map(|w| w.saturating_sub(off)))
                    .chain(idle_since.map(|t| t.saturating_add(IDLE_KEEP_MS)))
                    .collect::<Vec<_>>(),
                Session::Serve { .. } => Vec::new(),
            })
            .min()
    }

    pub(super) fn direct_timeout(&mut self, now: Millis) {
        let wall = self.wall(now);
        let ids: Vec<u64> = self.direct.sessions.keys().copied().collect();
        for session in ids {
            match self.direct.sessions.get(&session) {
                Some(Session::Fetch {
                    idle_since: Some(t),
                    fetches,
                    ..
                }) if fetches.is_empty() && now >= t.saturating_add(IDLE_KEEP_MS) => {
                    self.end_session(session, now, true);
                }
                Some(Session::Fetch { .. }) => self.each_fetch(session, now, |f| f.tick(wall)),
                _ => {}
            }
        }
    }

    /// The relay connection is gone: every direct fetch gives its chunks
    /// back (asked of the relay after reconnecting), every connection closes.
    pub(super) fn direct_disconnected(&mut self, now: Millis) {
        self.direct.ice = None;
        let pending: Vec<DirectFetch> = self.direct.pending.drain().map(|(_, f)| f).collect();
        for f in pending {
            let block = f.block();
            let rest = self.fetches.reserved(&block);
            self.fetches.release(&block, &rest);
        }
        let ids: Vec<u64> = self.direct.sessions.keys().copied().collect();
        for session in ids {
            self.end_session(session, now, true);
        }
    }

    /// A fetch was cancelled: its direct fetch (if any) ends; the connection
    /// stays for the others.
    pub(super) fn direct_cancel(&mut self, block: &BlockHash, now: Millis) {
        self.direct.pending.retain(|_, f| &f.block() != block);
        for s in self.direct.sessions.values_mut() {
            if let Session::Fetch {
                fetches,
                idle_since,
                ..
            } = s
            {
                fetches.retain(|_, f| &f.block() != block);
                if fetches.is_empty() && idle_since.is_none() {
                    *idle_since = Some(now);
                }
            }
        }
    }

    /// End `session`: every fetch on it hands back what it did not deliver;
    /// `close` also tells the driver to close the connection.
    fn end_session(&mut self, session: u64, now: Millis, close: bool) {
        match self.direct.sessions.remove(&session) {
            Some(Session::Fetch {
                peer,
                fetches,
                open,
                ..
            }) => {
                if self.direct.by_peer.get(&peer) == Some(&session) {
                    self.direct.by_peer.remove(&peer);
                }
                if !open && self.is_logged_in() {
                    self.direct
                        .shunned
                        .insert(peer, now.saturating_add(SHUN_MS));
                }
                self.bye(session, peer);
                for (lane, mut fetch) in fetches {
                    let block = fetch.block();
                    let steps = fetch.closed();
                    self.steps(None, lane, block, Some(peer), steps, now);
                }
            }
            Some(Session::Serve { .. }) | None => {}
        }
        if close {
            self.rtc(RtcAction::Close { session });
        }
    }

    fn rtc(&mut self, a: RtcAction) {
        self.events.push_back(NodeEvent::Rtc(a));
    }

    /// End introduction `session` at the relay (frees it for both keys).
    fn bye(&mut self, session: u64, to: PeerId) {
        if self.is_logged_in() {
            self.outbox.push_back(ToRelay::Signal {
                session,
                to,
                kind: SignalKind::Bye,
                body: String::new(),
            });
        }
    }

    /// Carry out the steps of the direct fetch on `lane` of `session`.
    fn steps(
        &mut self,
        session: Option<u64>,
        lane: u16,
        block: BlockHash,
        peer: Option<PeerId>,
        steps: Vec<Step>,
        now: Millis,
    ) {
        let failed = steps.iter().any(|s| matches!(s, Step::Fallback { .. }));
        let mut close = false;
        for step in steps {
            match step {
                Step::Relay(m) => {
                    if matches!(m, ToRelay::Proof { .. }) {
                        self.stats.direct_proofs_sent += 1;
                    }
                    if self.is_logged_in() {
                        self.outbox.push_back(m);
                    }
                }
                Step::Connect { holder, session } => {
                    let ice_servers = self.direct.ice.clone().unwrap_or_default();
                    self.rtc(RtcAction::Open {
                        session,
                        peer: holder,
                        offer: true,
                        ice_servers,
                    });
                }
                Step::Channel(m) => {
                    if let Some(session) = session {
                        self.rtc(RtcAction::Send {
                            session,
                            data: m.encode(),
                        });
                    }
                }
                Step::Chunk { index, data } => {
                    let from = Source::Peer(peer.unwrap_or([0; 32]));
                    self.stats.direct_bytes_received += data.len() as u64;
                    let out = self
                        .fetches
                        .on_direct(block, index, data, from, now, &self.cfg);
                    self.outcome(out);
                }
                Step::Fallback { indexes, reason } => {
                    let n = self.fetches.release(&block, &indexes);
                    if n > 0 {
                        self.stats.direct_fallbacks += 1;
                        self.events.push_back(NodeEvent::DirectFallback {
                            hash: block,
                            chunks: n as u32,
                            reason,
                        });
                    }
                }
                Step::Close => close = true,
            }
        }
        let Some(session) = session else {
            self.pump(now);
            return;
        };
        if close && failed {
            // A lie, a silent holder, a channel that never opened: the
            // connection goes, with every fetch on it.
            if let Some(Session::Fetch { fetches, .. }) = self.direct.sessions.get_mut(&session) {
                fetches.remove(&lane);
            }
            self.end_session(session, now, true);
        } else if let Some(Session::Fetch {
            fetches,
            idle_since,
            ..
        }) = self.direct.sessions.get_mut(&session)
        {
            if fetches.get(&lane).is_some_and(|f| f.is_done()) {
                fetches.remove(&lane);
            }
            if fetches.is_empty() {
                idle_since.get_or_insert(now);
            }
        }
        self.pump(now);
    }
}
