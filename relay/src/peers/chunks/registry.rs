//! The registry: logins (peers, other relays, this relay's links), what
//! each peer announces it holds (`Have`), and leaving.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Instant;

use web_node::chain::BlockHash;
use web_node::net::peer::{codes, limits, FromRelay, PeerId};

use super::{
    hexid, Action, ConnId, ConnKind, Core, PeerEntry, PresenceChange, Refused, UsageEvent,
};

impl Core {
    /// A peer proved its key on `conn`. Refused while banned; a previous
    /// connection with the same key is closed (`replaced`).
    pub fn login(
        &mut self,
        now: Instant,
        conn: ConnId,
        id: PeerId,
        agent: String,
        addr: SocketAddr,
    ) -> Result<Vec<Action>, Refused> {
        self.login_as(now, conn, id, agent, addr, ConnKind::Peer)
    }

    /// [`Core::login`] of a peer or of another relay ([`ConnKind::Relay`]).
    pub fn login_as(
        &mut self,
        now: Instant,
        conn: ConnId,
        id: PeerId,
        agent: String,
        addr: SocketAddr,
        kind: ConnKind,
    ) -> Result<Vec<Action>, Refused> {
        if let Some(until) = self.banned_until(&id, now) {
            return Err(Refused {
                code: codes::BANNED,
                message: format!(
                    "peer {} is banned for serving corrupt chunks; retry in {} s",
                    hexid(&id),
                    until.saturating_duration_since(now).as_secs().max(1)
                ),
            });
        }
        let mut out = Vec::new();
        if let Some(old) = self.peers.get(&id).map(|p| p.conn) {
            if old != conn {
                out.push(Action::Usage(UsageEvent::Replaced));
                out.push(Action::Close {
                    conn: old,
                    code: codes::REPLACED,
                    message: "another connection logged in with this key".into(),
                });
                self.remove_conn(now, old, &mut out);
            }
        }
        self.insert_entry(now, conn, id, agent, addr, kind);
        out.push(Action::Usage(UsageEvent::Login { kind }));
        Ok(out)
    }

    pub(super) fn insert_entry(
        &mut self,
        now: Instant,
        conn: ConnId,
        id: PeerId,
        agent: String,
        addr: SocketAddr,
        kind: ConnKind,
    ) {
        self.peers.insert(
            id,
            PeerEntry {
                kind,
                conn,
                agent,
                addr,
                since: now,
                last_seen: now,
                load: 0,
                serve_compute: false,
                have: HashSet::new(),
                latency_ms: None,
                score: 0,
                gets: 0,
                serving: 0,
                computing: 0,
            },
        );
        self.conns.insert(conn, id);
    }

    /// The connection ended (closed, dropped, replaced).
    pub fn logout(&mut self, now: Instant, conn: ConnId) -> Vec<Action> {
        let mut out = Vec::new();
        self.remove_conn(now, conn, &mut out);
        out
    }

    pub(super) fn remove_conn(&mut self, now: Instant, conn: ConnId, out: &mut Vec<Action>) {
        let Some(id) = self.conns.remove(&conn) else {
            return;
        };
        if self.peers.get(&id).is_some_and(|p| p.conn == conn) {
            if let Some(p) = self.peers.remove(&id) {
                self.direct.forget(&id);
                out.push(Action::Usage(UsageEvent::Logout { kind: p.kind }));
                if p.kind == ConnKind::Link {
                    self.link_lost(now, &id, conn, out);
                }
                if self.cluster && p.kind == ConnKind::Peer && !p.have.is_empty() {
                    out.push(Action::Presence(PresenceChange::Gone { peer: id }));
                }
                for b in &p.have {
                    self.unhold(b, &id);
                    // Jobs waiting for its credits look again now.
                    self.wake(now, b, out);
                }
            }
        }
        // Chunk jobs at this holder go elsewhere now; its own requests
        // are dropped when answered (the requester is gone).
        let at_it: Vec<u64> = self
            .jobs
            .iter()
            .filter(|(_, j)| j.at.is_some_and(|a| a.1 == conn))
            .map(|(k, _)| *k)
            .collect();
        for job in at_it {
            self.retry(now, job, out);
        }
        // Computations at it fail at once.
        let comp: Vec<u64> = self
            .computes
            .iter()
            .filter(|(_, c)| c.conn == conn)
            .map(|(k, _)| *k)
            .collect();
        for req in comp {
            self.compute_fail(now, req, "the peer disconnected".into(), false, out);
        }
    }

    pub(super) fn unhold(&mut self, b: &BlockHash, id: &PeerId) {
        if let Some(s) = self.holders.get_mut(b) {
            s.remove(id);
            if s.is_empty() {
                self.holders.remove(b);
            }
        }
    }

    pub(super) fn touch(&mut self, now: Instant, conn: ConnId) -> Option<PeerId> {
        let id = self.conns.get(&conn).copied()?;
        let p = self.peers.get_mut(&id)?;
        (p.conn == conn).then(|| {
            p.last_seen = now;
            id
        })
    }

    /// Any frame (ping, pong, message) from `conn`.
    pub fn heartbeat(&mut self, now: Instant, conn: ConnId) {
        self.touch(now, conn);
    }

    /// `Status{load, serve_compute}`.
    pub fn status(&mut self, now: Instant, conn: ConnId, load: u16, serve_compute: bool) {
        if let Some(id) = self.touch(now, conn) {
            if let Some(p) = self.peers.get_mut(&id).filter(|p| p.kind == ConnKind::Peer) {
                p.load = load.min(1000);
                p.serve_compute = serve_compute;
            }
        }
    }

    /// `Have{add, remove}`; `known` says whether the relay holds a block
    /// (header and payload). Unknown hashes are ignored; what cannot be
    /// taken (unknown, over [`limits::MAX_HAVE`]) is reported in one
    /// non-fatal `Error{protocol}`.
    pub fn have(
        &mut self,
        now: Instant,
        conn: ConnId,
        add: &[BlockHash],
        remove: &[BlockHash],
        known: impl Fn(&BlockHash) -> bool,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        let Some(id) = self.touch(now, conn) else {
            return out;
        };
        if self
            .peers
            .get(&id)
            .is_some_and(|p| p.kind != ConnKind::Peer)
        {
            out.push(Action::Send {
                conn,
                msg: FromRelay::error(
                    codes::PROTOCOL,
                    "Have from a relay: relays hold nothing here; ignored",
                ),
            });
            return out;
        }
        if add.len() + remove.len() > limits::MAX_HAVE_PER_MSG {
            out.push(Action::Send {
                conn,
                msg: FromRelay::error(
                    codes::PROTOCOL,
                    format!(
                        "Have carries {} hashes, at most {} per message: ignored",
                        add.len() + remove.len(),
                        limits::MAX_HAVE_PER_MSG
                    ),
                ),
            });
            return out;
        }
        let (added, removed, unknown, over) = self.update_have(id, add, remove, known);
        if self.cluster {
            if !removed.is_empty() {
                out.push(Action::Presence(PresenceChange::Remove {
                    peer: id,
                    blocks: removed,
                }));
            }
            if !added.is_empty() {
                out.push(Action::Presence(PresenceChange::Add {
                    peer: id,
                    blocks: added,
                }));
            }
        }
        if unknown + over > 0 {
            out.push(Action::Send {
                conn,
                msg: FromRelay::error(
                    codes::PROTOCOL,
                    format!(
                        "Have: {unknown} hashes are not blocks this relay holds and {over} are over \
                         the limit of {} blocks per peer; they were ignored",
                        limits::MAX_HAVE
                    ),
                ),
            });
        }
        out
    }

    /// Apply a `Have` of peer `id` to its set and to the holders: the
    /// blocks added, those removed, and how many were unknown and over
    /// [`limits::MAX_HAVE`].
    fn update_have(
        &mut self,
        id: PeerId,
        add: &[BlockHash],
        remove: &[BlockHash],
        known: impl Fn(&BlockHash) -> bool,
    ) -> (Vec<BlockHash>, Vec<BlockHash>, usize, usize) {
        let (mut unknown, mut over) = (0usize, 0usize);
        let mut added = Vec::new();
        let mut removed = Vec::new();
        if let Some(p) = self.peers.get_mut(&id) {
            for b in remove {
                if p.have.remove(b) {
                    removed.push(*b);
                }
            }
            for b in add {
                if !known(b) {
                    unknown += 1;
                } else if p.have.contains(b) {
                } else if p.have.len() >= limits::MAX_HAVE {
                    over += 1;
                } else {
                    p.have.insert(*b);
                    added.push(*b);
                }
            }
        }
        for b in remove {
            self.unhold(b, &id);
        }
        for b in &added {
            self.holders.entry(*b).or_default().insert(id);
        }
        (added, removed, unknown, over)
    }
}
