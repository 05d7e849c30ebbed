//! AI-Block node library.
//!
//! Everything a node does lives here as plain Rust that native tests cover:
//! the signed DAG chain ([`chain`]), the model ([`model`]: config, checkpoints,
//! tokenizer, CPU reference forward), the GPU engine ([`gpu`]), the wire
//! protocol ([`net`]) and block stores ([`store`]). The wasm facade in
//! `browser` only wires these to the page.

pub mod chain;
pub mod eval;
pub mod gpu;
pub mod model;
pub mod net;
pub mod node;
pub mod store;
pub mod verify;

#[cfg(target_arch = "wasm32")]
mod browser;
