//! GPU engine (wgpu): WGSL kernels and the MoE forward pass (Mixtral, OLMoE,
//! Qwen2-MoE, Qwen3-MoE; float or quantized experts).
//!
//! - [`context`]: device setup apart from the work functions
//!   ([`GpuContext::new`] async, [`GpuContext::new_blocking`] natively);
//!   adapter from `WGPU_BACKEND` / `WGPU_ADAPTER_NAME` (/ `WGPU_POWER_PREF`),
//!   the adapter's own limits, workgroup size `min(128, adapter limit)`
//!   (`AIBLOCK_GPU_WG` overrides natively), the barrier kernels' own size
//!   (`attn_decode`, `expert_up`: 16 and 64 on the browser's WebGPU, where
//!   SwiftShader's cost grows with the workgroup; `AIBLOCK_GPU_BARRIER_WG`
//!   natively), readback (native `device.poll`, browser `map_async` awaited
//!   through a oneshot channel).
//! - one module per kernel in `shaders/`, each with its CPU reference and a
//!   one-shot `run` beside it: [`matvec`], [`rmsnorm`], [`add`], [`embedding`],
//!   [`qkv_rope`], [`attention`], [`router`], [`expert`] (up + down, float
//!   and quantized), [`argmax`], and [`family`] (q/k/v biases and q/k norms,
//!   the shared expert's gate: OLMoE, Qwen2-MoE, Qwen3-MoE).
//!   Weights are stored transposed (`[in][out]`) so neighbouring invocations
//!   read neighbouring words. The decode kernels have `_v4` variants (four
//!   outputs per invocation, weights read as vec4s, chosen where the shape
//!   divides by 4): software adapters (SwiftShader, lavapipe) pay per load.
//! - [`engine`]: [`Engine`], the forward pass as a sans-IO
//!   [`crate::model::Engine`] (see its module docs for the per-chunk
//!   schedule, `4 * layers + 3` dispatches per decoded token, how a step pauses for
//!   missing experts, and the expert pool).
//! - [`bench`](mod@bench): the fixed-length greedy decode the benchmarks time (native
//!   `gpu_engine`, `greedy_ids --fixed`, the page's `bench_decode`).
//!
//! # Using the engine (native and browser)
//!
//! ```ignore
//! use web_node::model::{run_step, Engine as _, Want};
//! let ctx = Arc::new(GpuContext::new().await?);            // or new_blocking() natively
//! let mut engine = Engine::new(ctx, &cfg, &shared, &routers)?;
//! // Engine::with_options(.., EngineOptions { max_seq, max_batch, weights,
//! //     expert_quant,   // None: float experts; Some(q8_0 | q4_0): quantized pool
//! //     expert_pool_bytes: Some(12 * expert_bytes(&cfg, weights)) }) for a small pool
//! // (Engine::new takes expert_quant from the config: cfg.expert_quant())
//! match engine.step(&prompt_ids, &opts, Want::Greedy).await? {
//!     Step::Done(Output::Token(t)) => { /* next token */ }
//!     Step::Need(ids) => {
//!         for id in ids { engine.supply_expert(id, fetch(id).await?)?; }
//!         engine.resume().await?;                          // (or engine.cancel())
//!     }
//!     _ => {}
//! }
//! // or the whole loop, with any Supply (every ExpertSource is one):
//! let out = run_step(&mut engine, &mut source, &ids, &opts, Want::Logits).await?;
//! engine.reset();                                          // empty the KV cache
//! ```
//!
//! The engine never calls out for weights: the caller supplies what a step
//! asks for (from a file, a store, a cache or a peer). Natively,
//! `Engine::{forward, next_token, forward_all_logits, generate_greedy}` are
//! blocking wrappers over [`crate::model::run_step`] that take a source, and
//! [`engine::Attached`] (engine + source) is a blocking
//! [`crate::model::Forward`].

pub mod add;
pub mod argmax;
pub mod attention;
pub mod attn_decode;
pub mod bench;
pub mod context;
pub mod embedding;
pub mod engine;
pub mod expert;
pub mod family;
pub mod kernel;
pub mod matvec;
pub mod qkv_rope;
pub mod rmsnorm;
pub mod router;

pub use context::{GpuContext, GpuError};
#[cfg(not(target_arch = "wasm32"))]
pub use engine::Attached;
pub use engine::{expert_bytes, pool_expert_bytes, Engine, EngineOptions, EngineStats};
pub use expert::PoolFormat;
pub use kernel::WeightFormat;

/// Every WGSL file, by name (validated with naga in the tests).
pub const SHADERS: &[(&str, &str)] = &[
    ("add", add::SOURCE),
    ("argmax", argmax::SOURCE),
    ("argmax_embed", argmax::SOURCE_EMBED),
    ("attn_decode", attn_decode::SOURCE),
    ("attn_decode_f16", attn_decode::SOURCE_F16),
    ("attn_decode_v4", attn_decode::SOURCE_V4),
    ("attn_decode_f16_v4", attn_decode::SOURCE_F16_V4),
    ("attention", attention::SOURCE),
    ("embedding", embedding::SOURCE),
    ("expert_down", expert::SOURCE_DOWN),
    ("expert_down_f16", expert::SOURCE_DOWN_F16),
    ("expert_down_q4_v4", expert::SOURCE_DOWN_Q4_V4),
    ("expert_down_q8_v4", expert::SOURCE_DOWN_Q8_V4),
    ("expert_up", expert::SOURCE_UP),
    ("expert_up_f16", expert::SOURCE_UP_F16),
    ("expert_up_v4", expert::SOURCE_UP_V4),
    ("expert_up_q8_v4", expert::SOURCE_UP_Q8_V4),
    ("expert_up_q4_v4", expert::SOURCE_UP_Q4_V4),
    ("expert_down_v4", expert::SOURCE_DOWN_V4),
    ("expert_down_f16_v4", expert::SOURCE_DOWN_F16_V4),
    ("expert_up_f16_v4", expert::SOURCE_UP_F16_V4),
    ("matvec", matvec::SOURCE),
    ("matvec_f16", matvec::SOURCE_F16),
    ("matvec_v4", matvec::SOURCE_V4),
    ("matvec_f16_v4", matvec::SOURCE_F16_V4),
    ("qkv_post", family::SOURCE_QKV_POST),
    ("qkv_rope", qkv_rope::SOURCE),
    ("qkv_rope_f16", qkv_rope::SOURCE_F16),
    ("rmsnorm", rmsnorm::SOURCE),
    ("router", router::SOURCE),
    ("shared_gate", family::SOURCE_SHARED_GATE),
];
