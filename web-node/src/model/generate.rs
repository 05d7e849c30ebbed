//! Text generation over any [`Forward`] engine: prefill the prompt, then
//! sample one token at a time, streaming text pieces to a callback, until
//! EOS, `max_tokens`, the context limit or the callback says stop.

use super::sampler::Sampler;
use super::tokenizer::Tokenizer;
use super::{Forward, ModelError, RunOptions};

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

/// Generate from a text prompt (encoded with the tokenizer's special tokens,
/// e.g. BOS). `on_token(id, text_piece)` is called for every generated
/// token; returning `false` stops. The model is reset first.
pub fn generate<M: Forward + ?Sized>(
    model: &mut M,
    tok: &Tokenizer,
    prompt: &str,
    max_tokens: usize,
    sampler: &mut Sampler,
    opts: &RunOptions,
    on_token: impl FnMut(u32, &str) -> bool,
) -> Result<Generation, ModelError> {
    let mut ids = tok.encode(prompt)?;
    if ids.is_empty() {
        if let Some(bos) = model.config().bos_token_id {
            ids.push(bos);
        }
    }
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
    mut on_token: impl FnMut(u32, &str) -> bool,
) -> Result<Generation, ModelError> {
    if prompt_tokens.is_empty() {
        return Err(ModelError::Input("empty prompt".into()));
    }
    let eos = model.config().eos_token_id;
    let max_pos = model.config().max_position_embeddings;
    if prompt_tokens.len() > max_pos {
        return Err(ModelError::Input(format!(
            "prompt has {} tokens, the context holds {max_pos}",
            prompt_tokens.len()
        )));
    }
    model.reset();
    let mut tokens = Vec::new();
    let mut streamer = Streamer::default();
    let mut stop = StopReason::MaxTokens;
    if max_tokens > 0 {
        let mut logits = model.forward(&prompt_tokens, opts)?;
        loop {
            let next = sampler.sample(&logits)?;
            if Some(next) == eos {
                stop = StopReason::Eos;
                break;
            }
            tokens.push(next);
            let piece = streamer.piece(tok, &tokens)?;
            if !on_token(next, &piece) {
                stop = StopReason::Callback;
                break;
            }
            if tokens.len() >= max_tokens {
                break;
            }
            if model.position() >= max_pos {
                stop = StopReason::ContextFull;
                break;
            }
            logits = model.forward(&[next], opts)?;
        }
    }
    let text = tok.decode(&tokens)?;
    Ok(Generation {
        prompt_tokens,
        tokens,
        text,
        stop,
    })
}
