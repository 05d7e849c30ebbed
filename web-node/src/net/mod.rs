//! Wire protocol and REST types shared with the relay.

pub mod api;
