//! Wire types shared with the relay: REST ([`api`]), chat ([`chat`]), the
//! `/ws` peer protocol ([`peer`]) and usage reports ([`usage`]).

pub mod api;
pub mod chat;
pub mod peer;
pub mod usage;
