//! The crate's integration tests in one binary (one link instead of one per file).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod chain_validation;
mod cpu_reference;
mod families;
mod gpu_bench;
mod gpu_engine;
mod gpu_fused;
mod gpu_kernels;
mod gpu_shaders;
mod gpu_support;
