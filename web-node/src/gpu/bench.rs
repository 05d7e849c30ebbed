//! Fixed-length greedy decode on the GPU engine, timed (issue 21): the one
//! loop that the native benchmark (`benches/gpu_engine.rs`), the native
//! `greedy_ids --fixed N` (miner example) and the page's `bench_decode`
//! (`src/browser/bench.rs`, WebGPU in the browser) all run, so their
//! ms/token, dispatches and submissions per token compare.
//!
//! - [`decode_fixed`]: prefill a prompt from an empty KV cache, then greedy
//!   tokens until `n` in all, EOS ignored (an ordinary token), by
//!   [`Engine::decode_greedy`]: pipelined, two tokens in flight. The caller's `mark` reads its clocks at the start, after the
//!   prefill and at the end (wall time natively, `performance.now()` in the
//!   page; the native benchmark adds the process CPU time); the engine's
//!   counters are reset after the prefill, so the stats are the decode's.
//! - [`bench_decode`]: one warm-up run (shaders, caches), then the best of
//!   `rounds` runs ([`FixedRun`], per decoded token); the tokens must be the
//!   same in every run.
//! - [`parse_format`], [`all_resident_options`], [`supply_all`]: the engine
//!   set up with every expert resident in one of the pool formats (float
//!   experts are quantized on load for `q8_0`/`q4_0`, as `--quant` does).

use super::{Engine, EngineOptions, EngineStats, PoolFormat, WeightFormat};
use crate::model::quant::quantize_expert;
use crate::model::sampler::argmax;
use crate::model::{
    run_step, Config, ExpertId, ExpertWeights, ModelError, Output, QuantFormat, RunOptions, Supply,
    Want,
};

/// The pool format named `f32`, `f16`, `q8_0` or `q4_0`.
pub fn parse_format(s: &str) -> Result<PoolFormat, ModelError> {
    match s.trim() {
        "f32" => Ok(PoolFormat::Float(WeightFormat::F32)),
        "f16" => Ok(PoolFormat::Float(WeightFormat::F16)),
        other => QuantFormat::parse(other)
            .map(PoolFormat::Quant)
            .ok_or_else(|| {
                ModelError::Input(format!(
                    "unknown weight format {other:?} (f32, f16, q8_0 or q4_0)"
                ))
            }),
    }
}

/// An engine schedule by the name the native benchmark prints: `fused_attn`
/// (the default: `fused` and `fused_attention`), `fused` (the fused router
/// and argmax, the decode attention in three kernels) or `unfused`.
pub fn apply_variant(opts: &mut EngineOptions, variant: &str) -> Result<(), ModelError> {
    (opts.fused, opts.fused_attention) = match variant.trim() {
        "" | "fused_attn" => (true, true),
        "fused" => (true, false),
        "unfused" => (false, false),
        other => {
            return Err(ModelError::Input(format!(
                "unknown engine variant {other:?} (fused_attn, fused or unfused)"
            )))
        }
    };
    Ok(())
}

/// The page's engine options (the default, fused schedule) with every
/// expert resident, in `fmt`: float experts stored as `fmt`'s float
/// format, or quantized experts with f32 attention and head.
pub fn all_resident_options(fmt: PoolFormat) -> EngineOptions {
    let (weights, expert_quant) = match fmt {
        PoolFormat::Float(w) => (w, None),
        PoolFormat::Quant(q) => (WeightFormat::F32, Some(q)),
    };
    EngineOptions {
        weights,
        expert_quant,
        expert_pool_bytes: None,
        ..EngineOptions::default()
    }
}

/// Upload every expert into the engine's pool, quantized first when the
/// pool is quantized and they are not. Errors when the pool cannot hold them
/// all (the adapter's binding limit): the benchmark measures decode with
/// every expert resident.
pub fn supply_all(
    engine: &mut Engine,
    experts: impl IntoIterator<Item = (ExpertId, ExpertWeights)>,
) -> Result<(), ModelError> {
    let fmt = engine.pool_format();
    for (id, w) in experts {
        let w = match (fmt, w.quant()) {
            (PoolFormat::Quant(q), None) => quantize_expert(&w, q)?,
            _ => w,
        };
        engine.supply_expert(id, w)?;
    }
    let cfg = engine.config();
    let all = cfg.num_hidden_layers * cfg.num_local_experts;
    if engine.resident_experts() < all {
        return Err(ModelError::Input(format!(
            "{} of {all} experts resident (pool of {} slots): a fixed-length decode needs them all",
            engine.resident_experts(),
            engine.pool_slots()
        )));
    }
    Ok(())
}

/// A supply for an engine that holds every expert: asked for one, it errors
/// (an expert was evicted, so the run would not measure all-resident decode).
#[derive(Debug, Default)]
pub struct Resident;

impl Supply for Resident {
    async fn experts(
        &mut self,
        need: &[ExpertId],
    ) -> Result<Vec<(ExpertId, ExpertWeights)>, ModelError> {
        Err(ModelError::Source(format!(
            "the engine asked for {need:?}: not every expert is resident"
        )))
    }
}

/// One fixed-length decode: the tokens, the caller's clock readings and the
/// engine's counters over the decode (after the prefill).
#[derive(Debug, Clone)]
pub struct Marks<M> {
    pub tokens: Vec<u32>,
    /// Before the prefill.
    pub start: M,
    /// After the prefill (the first token known), where decode starts.
    pub prefilled: M,
    /// After the last token.
    pub end: M,
    /// Counters of the decode steps only.
    pub stats: EngineStats,
}

/// Check that a fixed-length decode of `n` tokens after `prompt` tokens fits
/// the context (the last token is not fed back).
pub fn check_length(
    cfg: &Config,
    max_seq: usize,
    prompt: usize,
    n: usize,
) -> Result<(), ModelError> {
    if prompt == 0 {
        return Err(ModelError::Input("empty prompt".into()));
    }
    if n == 0 {
        return Err(ModelError::Input(
            "a fixed-length decode of 0 tokens".into(),
        ));
    }
    let room = cfg.max_position_embeddings.min(max_seq);
    if prompt + n - 1 > room {
        return Err(ModelError::Input(format!(
            "{prompt} prompt tokens + {n} decoded tokens do not fit the context of {room}"
        )));
    }
    Ok(())
}

fn greedy(out: Output) -> Result<u32, ModelError> {
    match out {
        Output::Token(t) => Ok(t),
        Output::Logits(l) => Ok(argmax(&l)),
        Output::AllLogits(a) => a
            .last()
            .map(|l| argmax(l))
            .ok_or_else(|| ModelError::Input("no logits".into())),
    }
}

/// Fixed-length greedy decode: reset the engine, prefill `prompt`, then
/// [`Engine::decode_greedy`] until `n` tokens in all, EOS ignored
/// (pipelined: token `t + 1` is submitted before `t` is read back, with
/// every expert resident or with a pool that misses some: see
/// [`Engine::decode_greedy`]). `mark` reads the caller's clocks (see [`Marks`]).
pub async fn decode_fixed<S: Supply + ?Sized, M>(
    engine: &mut Engine,
    supply: &mut S,
    prompt: &[u32],
    n: usize,
    opts: &RunOptions,
    mut mark: impl FnMut() -> M,
) -> Result<Marks<M>, ModelError> {
    check_length(engine.config(), engine.options().max_seq, prompt.len(), n)?;
    engine.reset();
    let start = mark();
    let tok = greedy(run_step(engine, supply, prompt, opts, Want::Greedy).await?)?;
    engine.reset_stats();
    let prefilled = mark();
    let mut tokens = Vec::with_capacity(n);
    tokens.push(tok);
    let rest = engine
        .decode_greedy(supply, tok, n - 1, opts, |_| true)
        .await?;
    tokens.extend(rest);
    let end = mark();
    Ok(Marks {
        tokens,
        start,
        prefilled,
        end,
        stats: engine.stats().clone(),
    })
}

/// A fixed-length decode's numbers, per decoded token (the `n - 1` steps
/// after the prefill).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct FixedRun {
    /// The `n` generated tokens.
    pub tokens: Vec<u32>,
    pub prompt_tokens: usize,
    pub prefill_ms: f64,
    pub ms_per_token: f64,
    pub dispatches_per_token: f64,
    pub submissions_per_token: f64,
    /// Timed runs (after the warm-up); the numbers are the fastest one's.
    pub rounds: usize,
}

impl FixedRun {
    /// From the marks of a run whose clock reads milliseconds.
    pub fn from_marks(prompt_tokens: usize, m: &Marks<f64>, rounds: usize) -> Self {
        let steps = m.tokens.len().saturating_sub(1).max(1) as f64;
        Self {
            tokens: m.tokens.clone(),
            prompt_tokens,
            prefill_ms: m.prefilled - m.start,
            ms_per_token: (m.end - m.prefilled) / steps,
            dispatches_per_token: m.stats.dispatches as f64 / steps,
            submissions_per_token: m.stats.submissions as f64 / steps,
            rounds,
        }
    }
}

/// One warm-up [`decode_fixed`], then `rounds` timed ones (at least one):
/// the fastest, with `now_ms` as the clock. Errors if a run's tokens differ
/// from the warm-up's.
pub async fn bench_decode<S: Supply + ?Sized>(
    engine: &mut Engine,
    supply: &mut S,
    prompt: &[u32],
    n: usize,
    opts: &RunOptions,
    rounds: usize,
    now_ms: impl Fn() -> f64,
) -> Result<FixedRun, ModelError> {
    let rounds = rounds.max(1);
    let warm = decode_fixed(engine, supply, prompt, n, opts, &now_ms).await?;
    let mut best: Option<FixedRun> = None;
    for _ in 0..rounds {
        let m = decode_fixed(engine, supply, prompt, n, opts, &now_ms).await?;
        if m.tokens != warm.tokens {
            return Err(ModelError::Input(format!(
                "greedy tokens changed between runs: {:?} then {:?}",
                warm.tokens, m.tokens
            )));
        }
        let r = FixedRun::from_marks(prompt.len(), &m, rounds);
        if best
            .as_ref()
            .is_none_or(|b| r.ms_per_token < b.ms_per_token)
        {
            best = Some(r);
        }
    }
    best.ok_or_else(|| ModelError::Input("no timed run".into()))
}

/// [`bench_decode`] on this thread (native), timed with the wall clock.
#[cfg(not(target_arch = "wasm32"))]
pub fn bench_decode_blocking<S: Supply + ?Sized>(
    engine: &mut Engine,
    supply: &mut S,
    prompt: &[u32],
    n: usize,
    opts: &RunOptions,
    rounds: usize,
) -> Result<FixedRun, ModelError> {
    let t0 = std::time::Instant::now();
    pollster::block_on(bench_decode(
        engine,
        supply,
        prompt,
        n,
        opts,
        rounds,
        || t0.elapsed().as_secs_f64() * 1e3,
    ))
}

/// Prompts answered by [`answer_prompts`]: each answer, and the engine's
/// counters over all of them and over their prefills alone.
#[derive(Debug, Clone, PartialEq)]
pub struct Answered {
    pub answers: Vec<Vec<u32>>,
    pub stats: EngineStats,
    /// Pauses (experts missing) while prefilling the prompts.
    pub prefill_pauses: u64,
    /// Submissions of the prefills.
    pub prefill_submissions: u64,
}

/// Prompts answered as the page's chat answers them: for each prompt a new
/// conversation (the KV cache reset, the expert pool kept, so an expert the
/// last prompts used may still be resident), the prompt prefilled, then
/// greedy tokens by [`Engine::decode_greedy`] until `eos` (included) or
/// `max_new` tokens. The pool benchmark's chat workload: what a pool of a
/// few experts per layer costs on prompts of the model's own skills, where
/// a fixed-length decode after a made-up prompt routes anywhere.
pub async fn answer_prompts<S: Supply + ?Sized>(
    engine: &mut Engine,
    supply: &mut S,
    prompts: &[Vec<u32>],
    eos: u32,
    max_new: usize,
    opts: &RunOptions,
) -> Result<Answered, ModelError> {
    if max_new == 0 {
        return Err(ModelError::Input("answers of 0 tokens".into()));
    }
    engine.reset_stats();
    let mut answers = Vec::with_capacity(prompts.len());
    let (mut prefill_pauses, mut prefill_submissions) = (0, 0);
    for p in prompts {
        check_length(engine.config(), engine.options().max_seq, p.len(), max_new)?;
        engine.reset();
        let before = engine.stats().clone();
        let first = greedy(run_step(engine, supply, p, opts, Want::Greedy).await?)?;
        prefill_pauses += engine.stats().pauses - before.pauses;
        prefill_submissions += engine.stats().submissions - before.submissions;
        let mut answer = vec![first];
        if first != eos && max_new > 1 {
            let rest = engine
                .decode_greedy(supply, first, max_new - 1, opts, |t| t != eos)
                .await?;
            answer.extend(rest);
        }
        answers.push(answer);
    }
    Ok(Answered {
        answers,
        stats: engine.stats().clone(),
        prefill_pauses,
        prefill_submissions,
    })
}
