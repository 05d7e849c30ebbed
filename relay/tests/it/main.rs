//! The crate's integration tests in one binary (one link instead of one per file).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api;
mod authz;
mod backup;
mod chat;
mod cluster;
mod cluster_peers;
mod common;
mod compute_peer;
mod concurrency;
mod crash;
mod direct;
mod fuzz;
mod integrity;
mod limits;
mod metrics;
mod operator;
mod p2p;
mod quant;
mod rewards;
mod store;
mod store_backends;
mod usage;
mod usage_pg;
mod ws;
