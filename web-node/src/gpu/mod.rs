//! GPU engine (wgpu): WGSL kernels and the Mixtral forward pass.
//!
//! - [`context`]: device setup apart from the work functions
//!   ([`GpuContext::new`] async, [`GpuContext::new_blocking`] natively);
//!   adapter from `WGPU_BACKEND` / `WGPU_ADAPTER_NAME`, the adapter's own limits,
//!   readback (native `device.poll`, browser `map_async` awaited).
//! - one module per kernel in `shaders/`, each with its CPU reference beside it:
//!   [`matvec`], [`rmsnorm`], [`add`], [`embedding`], [`qkv_rope`],
//!   [`attention`], [`router`], [`expert`] (up + down), [`argmax`].

pub mod add;
pub mod argmax;
pub mod attention;
pub mod context;
pub mod embedding;
pub mod engine;
pub mod expert;
pub mod kernel;
pub mod matvec;
pub mod qkv_rope;
pub mod rmsnorm;
pub mod router;

pub use context::{GpuContext, GpuError};
pub use engine::{DynSource, Engine, EngineOptions, EngineStats};

/// Every WGSL file, by name (validated with naga in the tests).
pub const SHADERS: &[(&str, &str)] = &[
    ("add", add::SOURCE),
    ("argmax", argmax::SOURCE),
    ("attention", attention::SOURCE),
    ("embedding", embedding::SOURCE),
    ("expert_down", expert::SOURCE_DOWN),
    ("expert_up", expert::SOURCE_UP),
    ("matvec", matvec::SOURCE),
    ("qkv_rope", qkv_rope::SOURCE),
    ("rmsnorm", rmsnorm::SOURCE),
    ("router", router::SOURCE),
];
