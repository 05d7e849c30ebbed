//! Wire types shared with the relay: REST ([`api`]) and the `/ws` peer
//! protocol ([`peer`]).

pub mod api;
pub mod peer;
