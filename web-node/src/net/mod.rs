//! Wire types shared with the relay: REST ([`api`]), chat ([`chat`]) and the
//! `/ws` peer protocol ([`peer`]).

pub mod api;
pub mod chat;
pub mod peer;
