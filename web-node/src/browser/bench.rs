//! The page's fixed-length decode benchmark (issue 21), glue only:
//! `await window.wasmBindings.bench_decode(prompt, n, dtype, rounds[, variant])` (trunk
//! exposes the module's exports as `window.wasmBindings`) once the page is
//! loaded. It fetches every expert of the model through the page's own
//! supply (verified chunk by chunk, from the cache, peers or the relay),
//! builds a WebGPU engine holding them all in `dtype` (`f32`, `f16`, or
//! `q8_0`/`q4_0`: quantized on load; a quantized model only in its own
//! format), and runs [`crate::gpu::bench::bench_decode`]: `n` greedy tokens
//! after `prompt`, EOS ignored, one warm-up then the best of `rounds`, timed
//! with `performance.now()`. `variant` picks the engine's schedule
//! (`fused_attn`, the default, `fused` or `unfused`, as the native
//! benchmark names them). Resolves to the JSON of
//! [`crate::gpu::bench::FixedRun`] plus `dtype`, `variant`, `layers` and `adapter`;
//! rejects with the reason (no adapter, busy, a context too short, …).
//! Driven by tests/e2e/decode_bench.mjs and node.mjs's fixed-length case.

use std::cell::RefCell;
use std::sync::Arc;

use wasm_bindgen::prelude::*;

use crate::gpu::bench::{
    all_resident_options, apply_variant, bench_decode as run_bench, parse_format, supply_all,
    Resident,
};
use crate::gpu::{GpuContext, PoolFormat};
use crate::model::generate::prompt_ids;
use crate::model::{ExpertId, RunOptions, Supply as _};

use super::dom::{now_ms, set_progress};
use super::fetch::ChainSupply;
use super::{Node, NODE};

thread_local! {
    /// The benchmark's WebGPU device, made on its first call.
    static CTX: RefCell<Option<Arc<GpuContext>>> = const { RefCell::new(None) };
}

/// Fixed-length greedy decode of `n` tokens after `prompt` on the WebGPU
/// engine with every expert resident in `dtype`; the best of `rounds`
/// timed runs after a warm-up. See the module docs.
#[wasm_bindgen]
pub async fn bench_decode(
    prompt: String,
    n: usize,
    dtype: String,
    rounds: usize,
    variant: Option<String>,
) -> Result<String, JsError> {
    let Some(mut node) = NODE.with(|c| c.borrow_mut().take()) else {
        return Err(JsError::new(
            "busy: the model is not loaded yet, or an answer is being generated",
        ));
    };
    let variant = variant.unwrap_or_default();
    let r = run(&mut node, &prompt, n, &dtype, rounds, &variant).await;
    set_progress("");
    NODE.with(|c| *c.borrow_mut() = Some(node));
    r.map_err(|e| JsError::new(&e))
}

async fn context() -> Result<Arc<GpuContext>, String> {
    if let Some(c) = CTX.with(|c| c.borrow().clone()) {
        return Ok(c);
    }
    // The engine's API takes an Arc (shared with native threads); wasm has one thread.
    #[allow(clippy::arc_with_non_send_sync)]
    let c = Arc::new(GpuContext::new().await.map_err(|e| e.to_string())?);
    CTX.with(|cell| *cell.borrow_mut() = Some(c.clone()));
    Ok(c)
}

async fn run(
    node: &mut Node,
    prompt: &str,
    n: usize,
    dtype: &str,
    rounds: usize,
    variant: &str,
) -> Result<String, String> {
    let fmt = parse_format(dtype).map_err(|e| e.to_string())?;
    let mut options = all_resident_options(fmt);
    apply_variant(&mut options, variant).map_err(|e| e.to_string())?;
    let Node { store, model, .. } = node;
    let (cfg, shared, routers) = model.engine_parts().map_err(|e| e.to_string())?;
    if let Some(q) = cfg.expert_quant().map_err(|e| e.to_string())? {
        if fmt != PoolFormat::Quant(q) {
            return Err(format!(
                "this model's experts are {q}: only dtype {q} runs it"
            ));
        }
    }
    let ids = prompt_ids(&model.tokenizer, &cfg, prompt).map_err(|e| e.to_string())?;
    let all: Vec<ExpertId> = (0..cfg.num_hidden_layers)
        .flat_map(|l| (0..cfg.num_local_experts).map(move |e| ExpertId::new(l, e)))
        .collect();
    let mut supply = ChainSupply::new(store, &model.config, model.expert_heads());
    set_progress(&format!("benchmark: fetching all {} experts…", all.len()));
    let weights = supply.experts(&all).await.map_err(|e| e.to_string())?;
    let ctx = context().await?;
    // Browsers often hide the adapter's name.
    let adapter = match ctx.info.name.as_str() {
        "" => format!("unnamed adapter ({})", ctx.info.backend),
        name => format!("{name} ({})", ctx.info.backend),
    };
    let mut engine = crate::gpu::Engine::with_options(ctx, &cfg, &shared, &routers, options)
        .map_err(|e| e.to_string())?;
    supply_all(&mut engine, weights).map_err(|e| e.to_string())?;
    set_progress(&format!("benchmark: decoding {n} tokens ({fmt})…"));
    let opts = RunOptions {
        top_k: None,
        use_moe: true,
    };
    let r = run_bench(&mut engine, &mut Resident, &ids, n, &opts, rounds, now_ms)
        .await
        .map_err(|e| e.to_string())?;
    let mut v = serde_json::to_value(&r).map_err(|e| e.to_string())?;
    if let Some(o) = v.as_object_mut() {
        o.insert("dtype".into(), fmt.to_string().into());
        o.insert(
            "variant".into(),
            if variant.is_empty() {
                "fused_attn"
            } else {
                variant
            }
            .into(),
        );
        o.insert("layers".into(), cfg.num_hidden_layers.into());
        o.insert("adapter".into(), adapter.into());
    }
    Ok(v.to_string())
}
