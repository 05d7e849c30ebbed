//! Wire types shared with the relay: REST ([`api`]), chat ([`chat`]), the
//! `/ws` peer protocol ([`peer`]), direct transfer ([`direct`]) and usage reports ([`usage`]).

pub mod api;
pub mod chat;
pub mod direct;
pub mod direct_fetch;
pub mod peer;
pub mod usage;
