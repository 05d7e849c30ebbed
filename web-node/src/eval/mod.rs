//! Evaluation: a deterministic corpus of skills with exact answers
//! ([`corpus`]), its tokenization, the public-eval loss (mean cross-entropy
//! on answer tokens) and held-out accuracy per skill by greedy decoding.
//!
//! Pure Rust: it compiles for wasm32 and runs against any model that can
//! give the logits of every position ([`LogitsModel`]).

pub mod corpus;

pub use corpus::{Corpus, Example, Skill, DEFAULT_SEED};

use crate::model::ModelError;

/// The end-of-sequence token that follows every answer.
pub const EOS: &str = "</s>";
/// The beginning-of-sequence token (in the vocabulary; prompts do not use it).
pub const BOS: &str = "<s>";

/// Errors of evaluation.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("model: {0}")]
    Model(#[from] ModelError),
    #[error(
        "logits have {got} values, expected {expected} ({positions} positions x vocab {vocab})"
    )]
    Logits {
        got: usize,
        expected: usize,
        positions: usize,
        vocab: usize,
    },
    #[error("token id {id} is outside the model's vocabulary of {vocab}")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("nothing to evaluate")]
    Empty,
}

/// An example as token ids: the answer ends with the EOS token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokenized {
    pub skill: Skill,
    /// Its words are held-out generated words ([`Example::unseen`]).
    pub unseen: bool,
    pub prompt: Vec<u32>,
    pub answer: Vec<u32>,
    /// The answer text (for accuracy).
    pub answer_text: String,
}

impl Tokenized {
    /// Prompt followed by answer (with EOS).
    pub fn full(&self) -> Vec<u32> {
        let mut v = self.prompt.clone();
        v.extend_from_slice(&self.answer);
        v
    }
}

fn tok_err(e: impl std::fmt::Display) -> EvalError {
    EvalError::Tokenizer(e.to_string())
}

/// The EOS token id of a tokenizer.
pub fn eos_id(tok: &tokenizers::Tokenizer) -> Result<u32, EvalError> {
    tok.token_to_id(EOS)
        .ok_or_else(|| tok_err(format!("no {EOS} token in the vocabulary")))
}

/// Encode text without special tokens.
pub fn encode(tok: &tokenizers::Tokenizer, text: &str) -> Result<Vec<u32>, EvalError> {
    Ok(tok.encode(text, false).map_err(tok_err)?.get_ids().to_vec())
}

/// Tokenize examples: prompt and answer separately (so the prompt's tokens are
/// exactly what a user's prompt gives), EOS after the answer.
pub fn tokenize(
    tok: &tokenizers::Tokenizer,
    examples: &[Example],
) -> Result<Vec<Tokenized>, EvalError> {
    let eos = eos_id(tok)?;
    examples
        .iter()
        .map(|e| {
            let prompt = encode(tok, &e.prompt)?;
            let mut answer = encode(tok, &e.answer)?;
            answer.push(eos);
            Ok(Tokenized {
                skill: e.skill,
                unseen: e.unseen,
                prompt,
                answer,
                answer_text: e.answer.clone(),
            })
        })
        .collect()
}

/// A model that returns the logits of every position of a token sequence,
/// `tokens.len() * vocab_size()` values, row-major. Stateless between calls.
pub trait LogitsModel {
    fn vocab_size(&self) -> usize;
    fn logits_all(&mut self, tokens: &[u32]) -> Result<Vec<f32>, EvalError>;
}

fn check_logits(got: usize, positions: usize, vocab: usize) -> Result<(), EvalError> {
    let expected = positions * vocab;
    if got != expected {
        return Err(EvalError::Logits {
            got,
            expected,
            positions,
            vocab,
        });
    }
    Ok(())
}

/// Sum of cross-entropy (nats) over the answer tokens of one example, and
/// their count.
pub fn example_loss(
    model: &mut impl LogitsModel,
    ex: &Tokenized,
) -> Result<(f64, usize), EvalError> {
    let full = ex.full();
    let vocab = model.vocab_size();
    if full.len() < 2 || ex.answer.is_empty() {
        return Err(EvalError::Empty);
    }
    // Positions 0..n-1 predict tokens 1..n; no need for the last position.
    let input = &full[..full.len() - 1];
    let logits = model.logits_all(input)?;
    check_logits(logits.len(), input.len(), vocab)?;
    let mut sum = 0f64;
    let first = ex.prompt.len() - 1; // position predicting the first answer token
    for (i, &target) in ex.answer.iter().enumerate() {
        let row = &logits[(first + i) * vocab..(first + i + 1) * vocab];
        let t = target as usize;
        if t >= vocab {
            return Err(EvalError::TokenOutOfRange { id: target, vocab });
        }
        sum += cross_entropy(row, t);
    }
    Ok((sum, ex.answer.len()))
}

/// `-log softmax(row)[target]`, computed stably in f64.
pub fn cross_entropy(row: &[f32], target: usize) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = row
        .iter()
        .map(|&x| (x as f64 - max).exp())
        .sum::<f64>()
        .ln()
        + max;
    lse - row[target] as f64
}

/// Mean cross-entropy (nats per token) over the answer tokens of all examples:
/// the public-eval loss that miners claim and the relay recomputes.
pub fn eval_loss(model: &mut impl LogitsModel, examples: &[Tokenized]) -> Result<f64, EvalError> {
    let (mut sum, mut n) = (0f64, 0usize);
    for ex in examples {
        let (s, k) = example_loss(model, ex)?;
        sum += s;
        n += k;
    }
    if n == 0 {
        return Err(EvalError::Empty);
    }
    Ok(sum / n as f64)
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best as u32
}

/// Greedy decoding: up to `max_new` tokens after the prompt, stopping after EOS
/// (which is included in the result).
pub fn greedy(
    model: &mut impl LogitsModel,
    prompt: &[u32],
    max_new: usize,
    eos: u32,
) -> Result<Vec<u32>, EvalError> {
    let vocab = model.vocab_size();
    let mut seq = prompt.to_vec();
    let mut out = Vec::new();
    for _ in 0..max_new {
        let logits = model.logits_all(&seq)?;
        check_logits(logits.len(), seq.len(), vocab)?;
        let next = argmax(&logits[(seq.len() - 1) * vocab..]);
        out.push(next);
        seq.push(next);
        if next == eos {
            break;
        }
    }
    Ok(out)
}

/// Correct answers of one skill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SkillAccuracy {
    pub skill: Skill,
    /// Prompts made of held-out generated words (else known words).
    pub unseen: bool,
    pub correct: usize,
    pub total: usize,
}

/// The name of a group of prompts: the skill, with `-new` for prompts made of
/// held-out generated words (`copy-new`).
pub fn group_name(skill: Skill, unseen: bool) -> String {
    if unseen {
        format!("{skill}-new")
    } else {
        skill.name().to_string()
    }
}

/// The groups of eval prompts, in report order: every skill on known words,
/// then the word skills on unseen generated words.
pub fn groups() -> Vec<(Skill, bool)> {
    let mut g: Vec<(Skill, bool)> = Skill::ALL.iter().map(|&s| (s, false)).collect();
    g.extend(
        Skill::ALL
            .iter()
            .filter(|s| corpus::FreshSampler::generates(**s))
            .map(|&s| (s, true)),
    );
    g
}

impl SkillAccuracy {
    /// [`group_name`] of this row.
    pub fn name(&self) -> String {
        group_name(self.skill, self.unseen)
    }

    pub fn fraction(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.correct as f64 / self.total as f64
        }
    }
}

/// Is a greedy continuation the exact answer followed by EOS?
pub fn is_correct(
    tok: &tokenizers::Tokenizer,
    ex: &Tokenized,
    generated: &[u32],
    eos: u32,
) -> Result<bool, EvalError> {
    let Some((&last, body)) = generated.split_last() else {
        return Ok(false);
    };
    if last != eos {
        return Ok(false);
    }
    let text = tok.decode(body, true).map_err(tok_err)?;
    Ok(text.trim() == ex.answer_text.trim())
}

/// Accuracy per group of [`groups`] (groups with no example left out) by
/// greedy decoding.
pub fn accuracy(
    model: &mut impl LogitsModel,
    tok: &tokenizers::Tokenizer,
    examples: &[Tokenized],
) -> Result<Vec<SkillAccuracy>, EvalError> {
    let eos = eos_id(tok)?;
    let mut res: Vec<SkillAccuracy> = Vec::new();
    for (skill, unseen) in groups() {
        let mut acc = SkillAccuracy {
            skill,
            unseen,
            correct: 0,
            total: 0,
        };
        for ex in examples
            .iter()
            .filter(|e| e.skill == skill && e.unseen == unseen)
        {
            let out = greedy(model, &ex.prompt, ex.answer.len() + 4, eos)?;
            acc.total += 1;
            if is_correct(tok, ex, &out, eos)? {
                acc.correct += 1;
            }
        }
        if acc.total > 0 {
            res.push(acc);
        }
    }
    Ok(res)
}

/// A one-line table: `add 48/50 (96.0%) | ...`.
pub fn format_accuracy(acc: &[SkillAccuracy]) -> String {
    acc.iter()
        .map(|a| {
            format!(
                "{} {}/{} ({:.1}%)",
                a.name(),
                a.correct,
                a.total,
                100.0 * a.fraction()
            )
        })
        .collect::<Vec<_>>()
        .join(" | ")
}

impl LogitsModel for crate::model::reference::CpuModel {
    fn vocab_size(&self) -> usize {
        crate::model::Forward::config(self).vocab_size
    }

    fn logits_all(&mut self, tokens: &[u32]) -> Result<Vec<f32>, EvalError> {
        crate::model::Forward::reset(self);
        let rows = self.forward_all_logits(tokens)?;
        Ok(rows.concat())
    }
}

/// Any [`Forward`](crate::model::Forward) engine (e.g. the GPU one) as a
/// [`LogitsModel`]: resets the cache and feeds the tokens one at a time.
pub struct ForwardLogits<'a, F: crate::model::Forward + ?Sized> {
    pub model: &'a mut F,
    pub opts: crate::model::RunOptions,
}

impl<F: crate::model::Forward + ?Sized> LogitsModel for ForwardLogits<'_, F> {
    fn vocab_size(&self) -> usize {
        self.model.config().vocab_size
    }

    fn logits_all(&mut self, tokens: &[u32]) -> Result<Vec<f32>, EvalError> {
        self.model.reset();
        let mut out = Vec::with_capacity(tokens.len() * self.vocab_size());
        for t in tokens {
            out.extend(self.model.forward(std::slice::from_ref(t), &self.opts)?);
        }
        Ok(out)
    }
}

/// The public-eval loss of a model with a tokenizer, on the committed corpus
/// ([`DEFAULT_SEED`]): the number miners claim as `candidate_loss` and the
/// relay's quality gate recomputes.
pub fn public_eval_loss(
    model: &mut impl LogitsModel,
    tok: &tokenizers::Tokenizer,
) -> Result<f64, EvalError> {
    let corpus = Corpus::default_corpus();
    let public = tokenize(tok, &corpus.public_eval)?;
    eval_loss(model, &public)
}

/// Held-out accuracy per skill on the committed corpus.
pub fn held_out_accuracy(
    model: &mut impl LogitsModel,
    tok: &tokenizers::Tokenizer,
) -> Result<Vec<SkillAccuracy>, EvalError> {
    let corpus = Corpus::default_corpus();
    let held = tokenize(tok, &corpus.held_out)?;
    accuracy(model, tok, &held)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Puts `logit` on the token that follows the longest matching prefix of
    /// one known sequence, 0 elsewhere.
    struct Oracle {
        seq: Vec<u32>,
        vocab: usize,
        logit: f32,
    }

    impl LogitsModel for Oracle {
        fn vocab_size(&self) -> usize {
            self.vocab
        }
        fn logits_all(&mut self, tokens: &[u32]) -> Result<Vec<f32>, EvalError> {
            let mut out = vec![0f32; tokens.len() * self.vocab];
            for i in 0..tokens.len() {
                if tokens[..=i] == self.seq[..=i.min(self.seq.len() - 1)] {
                    if let Some(&next) = self.seq.get(i + 1).filter(|&&n| (n as usize) < self.vocab)
                    {
                        out[i * self.vocab + next as usize] = self.logit;
                    }
                }
            }
            Ok(out)
        }
    }

    fn example() -> Tokenized {
        Tokenized {
            skill: Skill::Add,
            unseen: false,
            prompt: vec![5, 6, 7],
            answer: vec![3, 4, 1],
            answer_text: String::new(),
        }
    }

    #[test]
    fn loss_is_mean_cross_entropy_on_answer_tokens() {
        let ex = example();
        // Uniform logits: every answer token costs ln(vocab).
        let mut flat = Oracle {
            seq: ex.full(),
            vocab: 10,
            logit: 0.0,
        };
        let l = eval_loss(&mut flat, std::slice::from_ref(&ex)).unwrap();
        assert!((l - (10f64).ln()).abs() < 1e-9, "{l}");
        // A confident oracle: loss -> log(1 + 9 e^-20) ~ 0.
        let mut sure = Oracle {
            seq: ex.full(),
            vocab: 10,
            logit: 20.0,
        };
        let l = eval_loss(&mut sure, std::slice::from_ref(&ex)).unwrap();
        assert!(l < 1e-6, "{l}");
        // Greedy decoding follows the oracle and stops after EOS (id 1).
        assert_eq!(greedy(&mut sure, &ex.prompt, 10, 1).unwrap(), vec![3, 4, 1]);
        assert!(matches!(eval_loss(&mut sure, &[]), Err(EvalError::Empty)));
    }

    #[test]
    fn bad_models_get_errors_not_panics() {
        struct Short;
        impl LogitsModel for Short {
            fn vocab_size(&self) -> usize {
                10
            }
            fn logits_all(&mut self, _: &[u32]) -> Result<Vec<f32>, EvalError> {
                Ok(vec![0.0; 3])
            }
        }
        assert!(matches!(
            eval_loss(&mut Short, &[example()]),
            Err(EvalError::Logits { .. })
        ));
        let mut big = example();
        big.answer = vec![99, 1];
        let mut m = Oracle {
            seq: big.full(),
            vocab: 10,
            logit: 1.0,
        };
        assert!(matches!(
            eval_loss(&mut m, &[big]),
            Err(EvalError::TokenOutOfRange { id: 99, .. })
        ));
    }
}
