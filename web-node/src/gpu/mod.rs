//! GPU engine (wgpu): WGSL kernels and the Mixtral forward pass.
//!
//! - [`context`]: device setup apart from the work functions
//!   ([`GpuContext::new`] async, [`GpuContext::new_blocking`] natively);
//!   adapter from `WGPU_BACKEND` / `WGPU_ADAPTER_NAME` (/ `WGPU_POWER_PREF`),
//!   the adapter's own limits, workgroup size `min(128, adapter limit)`
//!   (`AIBLOCK_GPU_WG` overrides natively), readback (native `device.poll`,
//!   browser `map_async` awaited through a oneshot channel).
//! - one module per kernel in `shaders/`, each with its CPU reference and a
//!   one-shot `run` beside it: [`matvec`], [`rmsnorm`], [`add`], [`embedding`],
//!   [`qkv_rope`], [`attention`], [`router`], [`expert`] (up + down), [`argmax`].
//!   Weights are stored transposed (`[in][out]`) so neighbouring invocations
//!   read neighbouring words.
//! - [`engine`]: [`Engine`], the forward pass (see its module docs for the
//!   per-step schedule: `6 * layers + 3` dispatches per token).
//!
//! # Using the engine (native and browser)
//!
//! ```ignore
//! let ctx = Arc::new(GpuContext::new().await?);            // or new_blocking() natively
//! let mut engine = Engine::new(ctx, &cfg, &shared, &routers, Box::new(source))?;
//! // (Engine::with_options(.., EngineOptions { max_seq, max_batch }) for other sizes)
//! let logits = engine.forward_async(&prompt_ids, &RunOptions::default()).await?;   // last position
//! let next = engine.next_token_async(&[id], &opts).await?;  // greedy, reads back 4 bytes
//! let ids = engine.generate_greedy_async(&prompt, 32, &opts, |id| stream(id)).await?;
//! let all = engine.forward_all_logits_async(&ids, &opts).await?; // every position (eval)
//! engine.insert_expert(layer, expert, &weights)?;   // push an expert fetched ahead of time
//! engine.reset();                                     // empty the KV cache
//! ```
//!
//! `source` is any [`crate::model::ExpertSource`] (`Send` natively, see
//! [`DynSource`]); it is asked for `(layer, expert)` the first time the router
//! picks it, once. Natively [`Engine`] also implements
//! [`crate::model::Forward`] (blocking), so `generate` and the sampler work
//! with it unchanged; in the browser use the `*_async` methods.

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
pub use kernel::WeightFormat;

/// Every WGSL file, by name (validated with naga in the tests).
pub const SHADERS: &[(&str, &str)] = &[
    ("add", add::SOURCE),
    ("argmax", argmax::SOURCE),
    ("attention", attention::SOURCE),
    ("embedding", embedding::SOURCE),
    ("expert_down", expert::SOURCE_DOWN),
    ("expert_down_f16", expert::SOURCE_DOWN_F16),
    ("expert_up", expert::SOURCE_UP),
    ("expert_up_f16", expert::SOURCE_UP_F16),
    ("matvec", matvec::SOURCE),
    ("matvec_f16", matvec::SOURCE_F16),
    ("qkv_rope", qkv_rope::SOURCE),
    ("qkv_rope_f16", qkv_rope::SOURCE_F16),
    ("rmsnorm", rmsnorm::SOURCE),
    ("router", router::SOURCE),
];
