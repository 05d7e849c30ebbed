//! Several relays on one PostgreSQL database (`relay serve --database`).
//! No protocol of our own between relays: they share the database, learn of
//! new blocks through PostgreSQL's `LISTEN/NOTIFY` ([`follow`]) and settle
//! same-slot races with its transactions ([`crate::store::PgStore`]).
//!
//! Layer: handlers, above [`crate::state`] (its tasks run on the
//! [`SharedCore`] and the [`Peers`]); it implements [`crate::peers::ClusterIo`].
//! May import: `state` and every module below it (`peers`, `limits`, `pg`,
//! `store`, `auth`); no other handler module, not `server`.

pub mod follow;
pub mod link;
pub mod presence;

use std::sync::Arc;

use crate::peers::Peers;
use crate::state::SharedCore;

/// Start what a relay on a shared database runs besides serving: the block
/// follower, and (after [`presence::configure`]) registration, peer
/// presence and forwarding to other relays. Nothing for the embedded store.
/// Call inside a tokio runtime.
pub fn start(state: &SharedCore, peers: &Arc<Peers>) {
    if state.pg.is_some() {
        follow::spawn(state.clone());
        presence::start(state, peers);
    }
}
