//! Other relays on the same database: presence lookups, and links
//! (outbound connections to another relay) used as holders when no local
//! peer is free. See the module docs of [`super`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use web_node::chain::BlockHash;
use web_node::net::peer::{codes, ChunkSource, PeerId};

use super::requests::Answerer;
use super::{
    Action, ConnId, ConnKind, Core, LinkEntry, LinkState, LinkView, Remote, RemoteRelay,
    UsageEvent, CREDITS, LINK_BACKOFF_MAX, LINK_CONNECT_LIMIT, REMOTE_CAPACITY,
};

/// Domain of a link's id in the registry ([`link_id`]).
const LINK_ID_DOMAIN: &[u8] = b"aiblock/relay-link/v1";

/// The registry id of the link to the relay with key `key`: derived from
/// the key (so a link's reputation survives reconnects and relay restarts)
/// and never equal to a key that logs in.
pub fn link_id(key: &PeerId) -> PeerId {
    let mut m = LINK_ID_DOMAIN.to_vec();
    m.extend_from_slice(key);
    BlockHash::of(&m).0
}

/// `base` doubled `fails` times, at most [`LINK_BACKOFF_MAX`].
fn backoff(base: Duration, fails: u32) -> Duration {
    base.saturating_mul(1u32 << fails.min(20))
        .min(LINK_BACKOFF_MAX)
}

impl LinkEntry {
    /// The link failed or was lost: down until its backoff is over (which
    /// doubles with each failure in a row). Returns the backoff.
    fn back_off(&mut self, now: Instant, base: Duration, out: &mut Vec<Action>) -> Duration {
        out.push(Action::Usage(UsageEvent::LinkFailure));
        let d = backoff(base, self.fails);
        self.fails = self.fails.saturating_add(1);
        self.state = LinkState::Down { until: now + d };
        d
    }
}

impl Core {
    /// The best link for `block` not in `tried` with a credit free, and
    /// whether one is worth waiting for (a lookup pending, a link
    /// connecting or at its credits). Asks the lookup, opens links.
    pub(super) fn link_choice(
        &mut self,
        now: Instant,
        block: BlockHash,
        tried: &[PeerId],
        out: &mut Vec<Action>,
    ) -> (Option<(f64, PeerId)>, bool) {
        let fresh = self
            .remote
            .get(&block)
            .filter(|r| r.until > now)
            .map(|r| r.links.clone());
        let Some(links) = fresh else {
            let pending = self
                .lookups
                .get(&block)
                .is_some_and(|t| now.saturating_duration_since(*t) < self.cfg.chunk_timeout);
            if !pending {
                self.lookups.insert(block, now);
                out.push(Action::Usage(UsageEvent::Lookup));
                out.push(Action::Lookup { block });
            }
            return (None, true);
        };
        let mut best: Option<(f64, PeerId)> = None;
        let mut busy = false;
        for l in links {
            if tried.contains(&l) || self.banned_until(&l, now).is_some() {
                continue;
            }
            match self.links.get(&l).map(|e| e.state) {
                Some(LinkState::Up { .. }) => {
                    let Some(p) = self.peers.get(&l) else {
                        continue;
                    };
                    // The other relay gives each requester CHUNK_CREDITS.
                    if p.serving >= self.cfg.chunk_credits {
                        busy = true;
                        continue;
                    }
                    let c = p.cost(p.serving);
                    if best.is_none_or(|(b, _)| c < b) {
                        best = Some((c, l));
                    }
                }
                Some(LinkState::Connecting { since })
                    if now.saturating_duration_since(since) < LINK_CONNECT_LIMIT =>
                {
                    busy = true;
                }
                Some(LinkState::Down { until }) if until <= now => {
                    busy |= self.open_link(now, l, out);
                }
                _ => {}
            }
        }
        (best, busy)
    }

    /// Open link `l` if it is down and its backoff is over.
    fn open_link(&mut self, now: Instant, l: PeerId, out: &mut Vec<Action>) -> bool {
        if self.banned_until(&l, now).is_some() {
            return false;
        }
        let Some(e) = self.links.get_mut(&l) else {
            return false;
        };
        match e.state {
            LinkState::Down { until } if until <= now => {
                e.state = LinkState::Connecting { since: now };
                out.push(Action::Usage(UsageEvent::LinkOpened));
                out.push(Action::OpenLink {
                    link: l,
                    relay: e.relay.clone(),
                });
                true
            }
            _ => false,
        }
    }

    /// Jobs parked on blocks that link `l` may serve look again.
    pub(super) fn wake_link(&mut self, now: Instant, l: &PeerId, out: &mut Vec<Action>) {
        let blocks: Vec<BlockHash> = self
            .parked
            .keys()
            .filter(|b| self.remote.get(b).is_some_and(|r| r.links.contains(l)))
            .copied()
            .collect();
        for b in blocks {
            self.wake(now, &b, out);
        }
    }

    // ---- other relays: presence lookups and links ----

    /// Other live relays of the database (every heartbeat). Links to relays
    /// no longer listed are closed and forgotten; with none listed, no
    /// lookups are made.
    pub fn relays_alive(&mut self, now: Instant, relays: Vec<RemoteRelay>) -> Vec<Action> {
        let mut out = Vec::new();
        self.others = !relays.is_empty();
        let alive: HashMap<PeerId, RemoteRelay> =
            relays.into_iter().map(|r| (link_id(&r.key), r)).collect();
        let gone: Vec<PeerId> = self
            .links
            .keys()
            .filter(|l| !alive.contains_key(*l))
            .copied()
            .collect();
        for l in gone {
            if let Some(e) = self.links.remove(&l) {
                tracing::info!(relay = %e.relay.id, "relay no longer alive: link closed");
                if let LinkState::Up { conn } = e.state {
                    out.push(Action::Close {
                        conn,
                        code: codes::UNAVAILABLE,
                        message: "the relay is no longer alive in the database".into(),
                    });
                    self.remove_conn(now, conn, &mut out);
                }
            }
            self.wake_link(now, &l, &mut out);
        }
        for (l, r) in alive {
            if let Some(e) = self.links.get_mut(&l) {
                e.relay = r;
            }
        }
        out
    }

    /// The answer to [`Action::Lookup`]: the other relays whose peers hold
    /// `block` (empty: none, or the lookup failed). Jobs waiting for it go on.
    pub fn remote_holders(
        &mut self,
        now: Instant,
        block: BlockHash,
        relays: Vec<RemoteRelay>,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        self.lookups.remove(&block);
        let mut ids = Vec::new();
        for r in relays {
            let l = link_id(&r.key);
            if ids.contains(&l) {
                continue;
            }
            if let Some(e) = self.links.get_mut(&l) {
                if !matches!(e.state, LinkState::Up { .. }) {
                    e.relay = r;
                }
                ids.push(l);
            } else if self.links.len() < self.cfg.max_links {
                self.links.insert(
                    l,
                    LinkEntry {
                        relay: r,
                        state: LinkState::Down { until: now },
                        fails: 0,
                    },
                );
                ids.push(l);
            }
        }
        if self.remote.len() >= REMOTE_CAPACITY && !self.remote.contains_key(&block) {
            self.remote.retain(|_, r| r.until > now);
            if self.remote.len() >= REMOTE_CAPACITY {
                self.remote.clear();
            }
        }
        self.remote.insert(
            block,
            Remote {
                links: ids,
                until: now + self.cfg.remote_ttl,
            },
        );
        self.wake(now, &block, &mut out);
        out
    }

    /// Link `l` logged in to its relay on `conn`: it serves from now on.
    /// None if it is not wanted any more (the driver closes it).
    pub fn link_up(&mut self, now: Instant, l: PeerId, conn: ConnId) -> Option<Vec<Action>> {
        let e = self.links.get_mut(&l)?;
        if !matches!(e.state, LinkState::Connecting { .. }) {
            return None;
        }
        // `fails` is reset by the first good chunk, not here: a relay that
        // accepts the login and then drops the link still backs off.
        e.state = LinkState::Up { conn };
        let agent = format!("link to {}", e.relay.ws_url);
        tracing::info!(relay = %e.relay.id, url = %e.relay.ws_url, "link to another relay up");
        let addr = SocketAddr::from(([0, 0, 0, 0], 0));
        self.insert_entry(now, conn, l, agent, addr, ConnKind::Link);
        let mut out = vec![Action::Usage(UsageEvent::LinkUp)];
        self.wake_link(now, &l, &mut out);
        Some(out)
    }

    /// Link `l` could not be opened (`conn` None) or its connection ended:
    /// down, opened again after a backoff. Its jobs go elsewhere.
    pub fn link_down(&mut self, now: Instant, l: PeerId, conn: Option<ConnId>) -> Vec<Action> {
        let mut out = Vec::new();
        match conn {
            Some(c) => self.remove_conn(now, c, &mut out),
            None => {
                let base = self.cfg.link_backoff_base;
                if let Some(e) = self.links.get_mut(&l) {
                    if matches!(e.state, LinkState::Connecting { .. }) {
                        e.back_off(now, base, &mut out);
                    }
                }
            }
        }
        self.wake_link(now, &l, &mut out);
        out
    }

    /// The link entry of `l` loses its connection `conn` (from remove_conn).
    pub(super) fn link_lost(
        &mut self,
        now: Instant,
        l: &PeerId,
        conn: ConnId,
        out: &mut Vec<Action>,
    ) {
        let base = self.cfg.link_backoff_base;
        if let Some(e) = self.links.get_mut(l) {
            if e.state == (LinkState::Up { conn }) {
                let d = e.back_off(now, base, out);
                tracing::info!(relay = %e.relay.id, retry_in_ms = d.as_millis() as u64, "link to another relay down");
            }
        }
    }

    /// `ChunkData` on link `conn` for its `GetChunk` `job`: checked against
    /// the chunk list like a peer's chunk. Bytes forwarded by another relay
    /// earn the link nothing (that relay credited its peer).
    #[allow(clippy::too_many_arguments)]
    pub fn link_chunk(
        &mut self,
        now: Instant,
        conn: ConnId,
        job: u64,
        block: BlockHash,
        index: u32,
        data: Vec<u8>,
        from: ChunkSource,
    ) -> Vec<Action> {
        self.holder_answered(now, conn, job, data, Answerer::Link { block, index, from })
    }

    /// `ChunkFailed` on link `conn` for `job`: the next holder. Unless it
    /// was only out of credits, that relay no longer counts as holding the
    /// block (until the next lookup).
    pub fn link_failed(
        &mut self,
        now: Instant,
        conn: ConnId,
        job: u64,
        reason: &str,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        self.touch(now, conn);
        let Some((h, _)) = self.take_answer(conn, job) else {
            return out;
        };
        if reason != CREDITS {
            if let Some(block) = self.jobs.get(&job).map(|j| j.info.block) {
                if let Some(r) = self.remote.get_mut(&block) {
                    r.links.retain(|l| *l != h);
                }
            }
        }
        self.dispatch(now, job, &mut out);
        self.holder_freed(now, h, &mut out);
        out
    }

    /// Links and their state, for `GET /p2p/stats`.
    pub fn link_views(&self, now: Instant) -> Vec<LinkView> {
        let mut v: Vec<LinkView> = self
            .links
            .iter()
            .map(|(l, e)| {
                let p = self.peers.get(l).filter(|p| p.kind == ConnKind::Link);
                LinkView {
                    relay: e.relay.id.clone(),
                    ws_url: e.relay.ws_url.clone(),
                    state: match e.state {
                        LinkState::Up { .. } => "up",
                        LinkState::Connecting { .. } => "connecting",
                        LinkState::Down { .. } => "down",
                    }
                    .to_string(),
                    fails: e.fails,
                    retry_in_ms: match e.state {
                        LinkState::Down { until } => {
                            until.saturating_duration_since(now).as_millis() as u64
                        }
                        _ => 0,
                    },
                    in_flight: p.map_or(0, |p| p.serving),
                    latency_ms: p.and_then(|p| p.latency_ms),
                    banned: self.banned_until(l, now).is_some(),
                }
            })
            .collect();
        v.sort_by(|a, b| a.relay.cmp(&b.relay));
        v
    }
}
