//! Text generation, once for every engine and caller (CLI, page, eval,
//! benches): prefill the prompt, then sample one token at a time, streaming
//! text pieces to a callback, until EOS, `max_tokens`, the context limit or
//! the callback says stop ([`Generator::ignore_eos`]: a fixed length, for
//! benchmarks). [`Generator`] is the state machine;
//! [`generate_async`] drives it over any [`Engine`] and [`Supply`];
//! [`generate`] is the blocking form for models with a source attached.

use super::sampler::Sampler;
use super::tokenizer::Tokenizer;
use super::{
    run_step, Engine, ExpertId, ExpertWeights, Forward, ModelError, Output, RunOptions, Step,
    Supply, Want,
};

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The model produced the EOS token (not included in the output).
    Eos,
    /// `max_tokens` tokens were generated.
    MaxTokens,
    /// The callback returned `false`.
    Callback,
    /// The KV cache reached `max_position_embeddings`.
    ContextFull,
}

/// The result of [`generate`].
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub prompt_tokens: Vec<u32>,
    /// Generated tokens (without EOS).
    pub tokens: Vec<u32>,
    /// Decoded generated text.
    pub text: String,
    pub stop: StopReason,
}

/// Decodes a growing token list into text pieces, holding back incomplete
/// UTF-8 sequences.
#[derive(Debug, Default)]
struct Streamer {
    emitted: String,
}

impl Streamer {
    fn piece(&mut self, tok: &Tokenizer, ids: &[u32]) -> Result<String, ModelError> {
        let text = tok.decode(ids)?;
        if text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let piece = match text.strip_prefix(self.emitted.as_str()) {
            Some(p) => p.to_string(),
            None => String::new(),
        };
        self.emitted = text;
        Ok(piece)
    }
}

/// The generation state machine: which tokens to feed next, what to do
/// with each step's output (sample, stream, EOS, max tokens, context
/// limit, cancel). It performs no I/O and runs no engine; [`generate_async`]
/// drives it, and so does everything that generates.
#[derive(Debug)]
pub struct Generator {
    prompt_tokens: Vec<u32>,
    tokens: Vec<u32>,
    streamer: Streamer,
    max_tokens: usize,
    eos: Option<u32>,
    /// Fixed-length mode: EOS is an ordinary token.
    ignore_eos: bool,
    max_pos: usize,
    fed: usize,
    stop: Option<StopReason>,
}

impl Generator {
    /// Check the prompt against the context; the engine must be reset.
    pub fn new(
        prompt_tokens: Vec<u32>,
        max_tokens: usize,
        cfg: &super::Config,
    ) -> Result<Self, ModelError> {
        if prompt_tokens.is_empty() {
            return Err(ModelError::Input("empty prompt".into()));
        }
        let max_pos = cfg.max_position_embeddings;
        if prompt_tokens.len() > max_pos {
            return Err(ModelError::Input(format!(
                "prompt has {} tokens, the context holds {max_pos}",
                prompt_tokens.len()
            )));
        }
        Ok(Self {
            prompt_tokens,
            tokens: Vec::new(),
            streamer: Streamer::default(),
            max_tokens,
            eos: cfg.eos_token_id,
            ignore_eos: false,
            max_pos,
            fed: 0,
            stop: (max_tokens == 0).then_some(StopReason::MaxTokens),
        })
    }

    /// Fixed-length generation (benchmarks): with `true`, EOS is sampled and
    /// kept like any other token, so generation runs to `max_tokens` (or
    /// the context limit, or the callback's stop).
    pub fn ignore_eos(mut self, ignore: bool) -> Self {
        self.ignore_eos = ignore;
        self
    }

    /// The tokens the engine must append next; `None` when generation is over.
    pub fn input(&self) -> Option<&[u32]> {
        if self.stop.is_some() {
            return None;
        }
        if self.fed == 0 {
            Some(&self.prompt_tokens)
        } else {
            self.tokens.last().map(std::slice::from_ref)
        }
    }

    /// Take the output of the step that appended [`Generator::input`]:
    /// sample the next token. Returns it with its text piece, or `None`
    /// when generation stopped (EOS).
    pub fn push(
        &mut self,
        out: Output,
        sampler: &mut Sampler,
        tok: &Tokenizer,
    ) -> Result<Option<(u32, String)>, ModelError> {
        let fed = self.input().map_or(0, <[u32]>::len);
        self.fed += fed;
        let next = match out {
            Output::Token(t) if sampler.is_greedy() => t,
            Output::Logits(l) => sampler.sample(&l)?,
            Output::AllLogits(mut all) => sampler.sample(&all.pop().unwrap_or_default())?,
            Output::Token(_) => {
                return Err(ModelError::Input(
                    "the engine picked a token but the sampler is not greedy".into(),
                ))
            }
        };
        if !self.ignore_eos && Some(next) == self.eos {
            self.stop = Some(StopReason::Eos);
            return Ok(None);
        }
        self.tokens.push(next);
        let piece = self.streamer.piece(tok, &self.tokens)?;
        if self.tokens.len() >= self.max_tokens {
            self.stop = Some(StopReason::MaxTokens);
        } else if self.fed >= self.max_pos {
            self.stop = Some(StopReason::ContextFull);
        }
        Ok(Some((next, piece)))
    }

    /// Stop now (the caller's stop button, a closed stream).
    pub fn cancel(&mut self) {
        self.stop = Some(StopReason::Callback);
    }

    /// What the engine should return for the next step.
    pub fn want(sampler: &Sampler) -> Want {
        if sampler.is_greedy() {
            Want::Greedy
        } else {
            Want::Logits
        }
    }

    pub fn finish(self, tok: &Tokenizer) -> Result<Generation, ModelError> {
        let text = tok.decode(&self.tokens)?;
        Ok(Generation {
            prompt_tokens: self.prompt_tokens,
            tokens: self.tokens,
            text,
            stop: self.stop.unwrap_or(StopReason::MaxTokens),
        })
    }
}

/// Encode a text prompt with the tokenizer's special tokens (e.g. BOS);
/// an empty encoding becomes just BOS.
pub fn prompt_ids(
    tok: &Tokenizer,
    cfg: &super::Config,
    prompt: &str,
) -> Result<Vec<u32>, ModelError> {
    let mut ids = tok.encode(prompt)?;
    if ids.is_empty() {
        if let Some(bos) = cfg.bos_token_id {
            ids.push(bos);
        }
    }
    Ok(ids)
}

/// The generation loop, for every engine and caller: reset the engine,
/// prefill the prompt, then sample one token at a time, supplying the
/// experts each step asks for from `supply`. `on_token(id, text_piece)`
/// sees every generated token; returning `false` stops.
#[allow(clippy::too_many_arguments)]
pub async fn generate_async<E: Engine + ?Sized, S: Supply + ?Sized>(
    engine: &mut E,
    supply: &mut S,
    tok: &Tokenizer,
    prompt_tokens: Vec<u32>,
    max_tokens: usize,
    sampler: &mut Sampler,
    opts: &RunOptions,
    mut on_token: impl FnMut(u32, &str) -> bool,
) -> Result<Generation, ModelError> {
    engine.reset();
    let mut g = Generator::new(prompt_tokens, max_tokens, engine.config())?;
    let want = Generator::want(sampler);
    while let Some(input) = g.input() {
        let input = input.to_vec();
        let out = run_step(engine, supply, &input, opts, want).await?;
        if let Some((id, piece)) = g.push(out, sampler, tok)? {
            if !on_token(id, &piece) {
                g.cancel();
            }
        }
    }
    g.finish(tok)
}

/// A blocking model (an engine with its source attached) as an [`Engine`]
/// whose steps never pause.
struct Blocking<'a, M: ?Sized>(&'a mut M);

impl<M: Forward + ?Sized> Engine for Blocking<'_, M> {
    async fn step(
        &mut self,
        tokens: &[u32],
        opts: &RunOptions,
        want: Want,
    ) -> Result<Step, ModelError> {
        Ok(Step::Done(self.0.run(tokens, opts, want)?))
    }
    async fn resume(&mut self) -> Result<Step, ModelError> {
        Err(ModelError::Input("no step is paused".into()))
    }
    fn supply_expert(&mut self, id: ExpertId, _: ExpertWeights) -> Result<(), ModelError> {
        Err(ModelError::Input(format!("{id} was not asked for")))
    }
    fn cancel(&mut self) {}
    fn reset(&mut self) {
        self.0.reset();
    }
    fn position(&self) -> usize {
        self.0.position()
    }
    fn config(&self) -> &super::Config {
        self.0.config()
    }
}

/// Nothing to supply (for engines that never pause).
struct NoSupply;

impl Supply for NoSupply {
    async fn experts(
        &mut self,
        need: &[ExpertId],
    ) -> Result<Vec<(ExpertId, ExpertWeights)>, ModelError> {
        Err(ModelError::Source(format!("no source for {need:?}")))
    }
}

/// [`generate_async`] on a blocking model, from a text prompt. The model is
/// reset first.
pub fn generate<M: Forward + ?Sized>(
    model: &mut M,
    tok: &Tokenizer,
    prompt: &str,
    max_tokens: usize,
    sampler: &mut Sampler,
    opts: &RunOptions,
    on_token: impl FnMut(u32, &str) -> bool,
) -> Result<Generation, ModelError> {
    let ids = prompt_ids(tok, model.config(), prompt)?;
    generate_from_ids(model, tok, ids, max_tokens, sampler, opts, on_token)
}

/// [`generate`] from prompt token ids.
pub fn generate_from_ids<M: Forward + ?Sized>(
    model: &mut M,
    tok: &Tokenizer,
    prompt_tokens: Vec<u32>,
    max_tokens: usize,
    sampler: &mut Sampler,
    opts: &RunOptions,
    on_token: impl FnMut(u32, &str) -> bool,
) -> Result<Generation, ModelError> {
    block_on(generate_async(
        &mut Blocking(model),
        &mut NoSupply,
        tok,
        prompt_tokens,
        max_tokens,
        sampler,
        opts,
        on_token,
    ))
}

/// Run a future to completion: natively on this thread, in wasm only if it
/// is ready at once (blocking models there are CPU-only).
fn block_on<T>(
    fut: impl std::future::Future<Output = Result<T, ModelError>>,
) -> Result<T, ModelError> {
    #[cfg(not(target_arch = "wasm32"))]
    {
        pollster::block_on(fut)
    }
    #[cfg(target_arch = "wasm32")]
    {
        super::engine::now(fut)
    }
}
