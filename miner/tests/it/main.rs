//! The crate's integration tests in one binary (one link instead of one per file).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cli;
mod cluster_peers;
mod families_cli;
mod infer_cli;
mod node;
mod peer_network;
mod quant_cli;
mod relay_e2e;
mod routes;
mod scale;
mod tokenizer;
