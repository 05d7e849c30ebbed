//! AI-Block node library.
//!
//! Everything a node does lives here as plain Rust that native tests cover.
//! Layers, each importing only those below it:
//!
//! ```text
//! spec         config.json, slots, tensor shapes
//! chain        blocks, signatures, chunks, DAG, header-first validation
//! model        weights, CPU engine, the Engine contract, generation loop
//! gpu          the WebGPU/wgpu engine
//! store, net   block stores; wire types (REST today)
//! verify       a listed chain verified from headers (+ payloads when fetched)
//! chain_model  a runnable model from verified blocks, experts fetched lazily
//! node         the peer state machine (sans-IO): login, fetch, serve, compute
//! client       the client core (sans-IO): paged listing, header sync, model
//!              and heads, payload sourcing, reconnect, usage reports
//! eval         corpus, splits, public-eval loss
//! browser      (wasm32) the page's glue: fetch, render, events
//! ```

pub mod chain;
pub mod chain_model;
pub mod client;
pub mod eval;
pub mod gpu;
pub mod model;
pub mod net;
pub mod node;
pub mod spec;
pub mod store;
pub mod verify;
pub mod view;

#[cfg(test)]
mod test_chain;

#[cfg(target_arch = "wasm32")]
mod browser;
