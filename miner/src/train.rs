//! Train the default model: a byte-level BPE tokenizer (digits split one per
//! token) on the train split, then a small Mixtral with AdamW on answer
//! tokens, written as a Hugging Face directory.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use tokenizers::models::bpe::{BpeTrainer, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, Tokenizer};
use web_node::eval::corpus::{FreshSampler, Rng};
use web_node::eval::{self, Corpus, Skill, Tokenized, BOS, EOS};
use web_node::model::Config;

use crate::mixtral::{Mixtral, Routed};

/// The routing objective's weight that made the committed default model.
pub const DEFAULT_MI_COEF: f64 = 0.15;

/// The sequence-cover term's weight that made the committed default model.
pub const DEFAULT_COVER_COEF: f64 = 1.0;

/// `aiblock train`: where to write the model and the hyper-parameters of
/// the run (the defaults made the committed default model).
#[derive(Debug, Clone, clap::Args)]
pub struct TrainArgs {
    /// Directory to write (config.json, tokenizer.json, model.safetensors,
    /// train_report.json); rewritten at every checkpoint.
    #[arg(long, default_value = "models/default")]
    pub out: PathBuf,
    /// Seed of the corpus, the initial weights and the batches.
    #[arg(long, default_value_t = web_node::eval::DEFAULT_SEED)]
    pub seed: u64,
    /// Optimizer steps.
    #[arg(long, default_value_t = 8000)]
    pub steps: usize,
    /// Examples per step.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// AdamW learning rate.
    #[arg(long, default_value_t = 2e-3)]
    pub lr: f64,
    /// Hidden size (4 attention heads, 2 KV heads).
    #[arg(long, default_value_t = 128)]
    pub hidden: usize,
    /// Each expert's intermediate size.
    #[arg(long, default_value_t = 256)]
    pub intermediate: usize,
    /// Tokenizer vocabulary size (BPE target).
    #[arg(long, default_value_t = 512)]
    pub vocab: usize,
    /// Router load-balancing loss coefficient.
    #[arg(long, default_value_t = 0.02)]
    pub aux_coef: f64,
    /// Weight of the routing objective: the loss subtracts this times the
    /// mutual information between sequence and expert (Mod-Squad), so that
    /// one prompt uses few experts per layer while the batch uses them all.
    /// 0 turns it off.
    #[arg(long, default_value_t = DEFAULT_MI_COEF)]
    pub mi_coef: f64,
    /// Weight of the sequence-cover term: the loss subtracts this times the
    /// mean log router probability a token puts on its sequence's top-2
    /// experts, so the token's own top-2 falls within them.
    #[arg(long, default_value_t = DEFAULT_COVER_COEF)]
    pub cover_coef: f64,
    /// Initial router weights' std as a multiple of 1/sqrt(hidden): the
    /// routing objective has no gradient at uniform routing, so routers
    /// start with real preferences (the first default model used 0.1).
    #[arg(long, default_value_t = 1.0)]
    pub router_init: f64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.05)]
    pub weight_decay: f64,
    /// Evaluate and write the directory every this many steps.
    #[arg(long, default_value_t = 1000)]
    pub checkpoint_every: usize,
    /// How often a skill is drawn for a batch, relative to the others, as
    /// `SKILL=N` (repeatable; every skill not named keeps its default:
    /// reverse and sort 3, every other skill 2, so that each is at least 2/16
    /// of a batch), e.g. `--skill-weight sort=6` draws sort three times as
    /// often as add.
    #[arg(long = "skill-weight", value_parser = parse_skill_weight)]
    pub skill_weight: Vec<(Skill, u32)>,
    /// Start from the model in this directory (config.json, tokenizer.json,
    /// model.safetensors) instead of fresh weights and a new tokenizer: a
    /// second stage of training. Its shape and tokenizer are kept (--hidden,
    /// --intermediate, --vocab and --router-init are ignored), and --seed
    /// must be the seed it was trained with (checked against its
    /// train_report.json), so the held-out split stays unseen.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Before training (with --init), give every expert that no token of 16
    /// training batches picks a copy of a busy expert of the same layer (at
    /// least half an even share of the picks; weights, and its router row
    /// plus 10 % noise), busiest first, so the two split the busy one's
    /// sequences between them.
    #[arg(long, requires = "init")]
    pub revive: bool,
    /// With --revive, revive again every this many steps (experts that the
    /// training pushed out since), as long as a quarter of the run is left
    /// after the revival, so that the copies have time to find sequences of
    /// their own. 0: only before training.
    #[arg(long, default_value_t = 0, requires = "revive")]
    pub revive_every: usize,
    /// With --init: another stream of batches (and revival noise) for this
    /// stage, so that a chained stage or a second sample of the same stage
    /// does not repeat the draws of the first; the corpus and its held-out
    /// split stay those of --seed. 0 is the stream stages have always had.
    #[arg(long, default_value_t = 0, requires = "init")]
    pub stage_seed: u64,
    /// The routing objective's weight in one layer, as `LAYER=W`
    /// (repeatable; other layers keep --mi-coef), e.g. `--layer-mi 0=0.6`.
    #[arg(long = "layer-mi", value_parser = parse_layer_coef)]
    pub layer_mi: Vec<(usize, f64)>,
    /// The load-balancing weight in one layer, as `LAYER=W` (repeatable;
    /// other layers keep --aux-coef).
    #[arg(long = "layer-aux", value_parser = parse_layer_coef)]
    pub layer_aux: Vec<(usize, f64)>,
    /// The sequence-cover weight in one layer, as `LAYER=W` (repeatable;
    /// other layers keep --cover-coef).
    #[arg(long = "layer-cover", value_parser = parse_layer_coef)]
    pub layer_cover: Vec<(usize, f64)>,
    /// In this layer (repeatable), the sequence cover aims at a balanced
    /// assignment of the batch's sequences to experts (each expert at most
    /// an even share of the sequences, likeliest pairs first) instead of
    /// each sequence's own likeliest two, so that every expert keeps
    /// sequences of its own.
    #[arg(long = "balanced-cover")]
    pub balanced_cover: Vec<usize>,
    /// In one layer, as `LAYER=M` (repeatable): before each sequence's
    /// cover takes its own likeliest experts, every expert claims the `M`
    /// sequences of the batch that lean to it most, so that no expert
    /// stops learning while busy experts keep their sequences.
    #[arg(long = "cover-floor", value_parser = parse_layer_count)]
    pub cover_floor: Vec<(usize, usize)>,
    /// The soft expert count's weight in one layer, as `LAYER=W`
    /// (repeatable): the loss adds W times the mean over sequences of
    /// `sum_e max_t p(e|x_t)`, which is low when a sequence's tokens keep
    /// to few experts (what a prompt must download).
    #[arg(long = "layer-union", value_parser = parse_layer_coef)]
    pub layer_union: Vec<(usize, f64)>,
}

/// Parse `LAYER=W` (a layer index and a finite weight of at most 100).
pub fn parse_layer_coef(s: &str) -> std::result::Result<(usize, f64), String> {
    let (l, w) = s
        .split_once('=')
        .ok_or_else(|| format!("expected LAYER=W, got {s:?}"))?;
    let l: usize = l
        .trim()
        .parse()
        .map_err(|_| format!("layer {l:?} is not a layer index"))?;
    let w: f64 = w
        .trim()
        .parse()
        .map_err(|_| format!("weight {w:?} is not a number"))?;
    if !w.is_finite() || w.abs() > 100.0 {
        return Err(format!(
            "weight {w} of layer {l} is not a number within ±100"
        ));
    }
    Ok((l, w))
}

/// `LAYER=M` with a whole number `M` (at most 1 000), for `--cover-floor`.
pub fn parse_layer_count(s: &str) -> std::result::Result<(usize, usize), String> {
    let (l, m) = s
        .split_once('=')
        .ok_or_else(|| format!("expected LAYER=M, got {s:?}"))?;
    let l: usize = l
        .trim()
        .parse()
        .map_err(|_| format!("layer {l:?} is not a layer index"))?;
    let m: usize = m
        .trim()
        .parse()
        .ok()
        .filter(|m| *m <= 1000)
        .ok_or_else(|| format!("count {m:?} of layer {l} is not a whole number up to 1000"))?;
    Ok((l, m))
}

/// The routing terms' weights: one per term, and per-layer overrides.
#[derive(Debug, Clone, Default)]
pub struct RoutingWeights {
    pub aux: f64,
    pub mi: f64,
    pub cover: f64,
    /// `(layer, weight)` of the load-balancing term, overriding `aux`.
    pub layer_aux: Vec<(usize, f64)>,
    /// `(layer, weight)` of the routing objective, overriding `mi`.
    pub layer_mi: Vec<(usize, f64)>,
    /// `(layer, weight)` of the sequence cover, overriding `cover`.
    pub layer_cover: Vec<(usize, f64)>,
    /// `(layer, weight)` of the soft expert count ([`crate::mixtral::LayerTerms::union`];
    /// 0 in every other layer).
    pub layer_union: Vec<(usize, f64)>,
}

impl RoutingWeights {
    /// The same weight in every layer.
    pub fn uniform(aux: f64, mi: f64, cover: f64) -> Self {
        Self {
            aux,
            mi,
            cover,
            ..Self::default()
        }
    }

    /// Refuse an override of a layer the model does not have.
    pub fn check(&self, layers: usize) -> Result<()> {
        for (l, _) in self
            .layer_aux
            .iter()
            .chain(&self.layer_mi)
            .chain(&self.layer_cover)
            .chain(&self.layer_union)
        {
            if *l >= layers {
                anyhow::bail!(
                    "layer {l} in a per-layer weight, but the model has {layers} layers (0..{})",
                    layers - 1
                );
            }
        }
        Ok(())
    }

    fn at(over: &[(usize, f64)], l: usize, default: f64) -> f64 {
        over.iter()
            .rev()
            .find(|(i, _)| *i == l)
            .map_or(default, |(_, w)| *w)
    }

    /// `ce` plus the weighted routing terms of `r`. With no per-layer
    /// override this is the formula the committed default model was trained
    /// with (weights on the means over layers), bit for bit.
    pub fn loss(&self, ce: &Tensor, r: &Routed) -> Result<Tensor> {
        if self.layer_aux.is_empty()
            && self.layer_mi.is_empty()
            && self.layer_cover.is_empty()
            && self.layer_union.is_empty()
        {
            let mut loss = (ce + (&r.aux * self.aux)?)?;
            if self.mi != 0.0 {
                loss = (loss - (&r.mi * self.mi)?)?;
            }
            if self.cover != 0.0 {
                loss = (loss - (&r.cover * self.cover)?)?;
            }
            return Ok(loss);
        }
        let n = r.layers.len().max(1) as f64;
        let mut loss = ce.clone();
        for (l, t) in r.layers.iter().enumerate() {
            let aux = Self::at(&self.layer_aux, l, self.aux);
            let mi = Self::at(&self.layer_mi, l, self.mi);
            let cover = Self::at(&self.layer_cover, l, self.cover);
            loss = (loss + (&t.aux * (aux / n))?)?;
            if mi != 0.0 {
                loss = (loss - (&t.mi * (mi / n))?)?;
            }
            if cover != 0.0 {
                loss = (loss - (&t.cover * (cover / n))?)?;
            }
            let union = Self::at(&self.layer_union, l, 0.0);
            if union != 0.0 {
                loss = (loss + (&t.union * (union / n))?)?;
            }
        }
        Ok(loss)
    }
}

/// Parse `--skill-weight SKILL=N` (N from 1 to 100).
pub fn parse_skill_weight(s: &str) -> std::result::Result<(Skill, u32), String> {
    let (name, n) = s
        .split_once('=')
        .ok_or_else(|| format!("expected SKILL=N, got {s:?}"))?;
    let skill = Skill::parse(name).ok_or_else(|| {
        let names: Vec<&str> = Skill::ALL.iter().map(|k| k.name()).collect();
        format!("unknown skill {name:?} (one of {})", names.join(", "))
    })?;
    let n: u32 = n
        .parse()
        .map_err(|_| format!("weight {n:?} of {name} is not a whole number"))?;
    if !(1..=100).contains(&n) {
        return Err(format!("weight {n} of {name} is not between 1 and 100"));
    }
    Ok((skill, n))
}

/// The draw weight of a skill that `--skill-weight` does not name: the
/// word skills that learn slowest on new words (reverse, sort) 3, every other
/// skill 2 (the setting of the committed default model).
pub fn default_skill_weight(skill: Skill) -> u32 {
    match skill {
        Skill::Reverse | Skill::Sort => 3,
        _ => 2,
    }
}

/// The draw weight of every skill of [`Skill::ALL`], in that order.
pub fn skill_weights(named: &[(Skill, u32)]) -> Vec<u32> {
    Skill::ALL
        .iter()
        .map(|k| {
            named
                .iter()
                .rev()
                .find(|(s, _)| s == k)
                .map_or(default_skill_weight(*k), |(_, n)| *n)
        })
        .collect()
}

/// Train a byte-level BPE tokenizer on the training texts. Digits are always
/// single tokens; `<s>` and `</s>` are special.
pub fn train_tokenizer(corpus: &Corpus, vocab: usize) -> Result<Tokenizer> {
    let mut tok = Tokenizer::new(BPE::default());
    tok.with_pre_tokenizer(Some(Sequence::new(vec![
        Digits::new(true).into(),
        ByteLevel::new(false, true, true).into(),
    ])));
    tok.with_decoder(Some(ByteLevel::default()));
    let specials = vec![AddedToken::from(BOS, true), AddedToken::from(EOS, true)];
    let mut trainer: tokenizers::models::TrainerWrapper = BpeTrainer::builder()
        .vocab_size(vocab)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(specials.clone())
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    let texts: Vec<String> = corpus.train.iter().map(|e| e.text()).collect();
    tok.train(&mut trainer, texts.iter())
        .map_err(|e| anyhow!("training tokenizer: {e}"))?;
    tok.add_special_tokens(&specials);
    Ok(tok)
}

/// The HF config.json (transformers 4.x form) of a model of these sizes.
pub fn config_json(args: &TrainArgs, vocab_size: usize, bos: u32, eos: u32) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": vocab_size,
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": args.hidden / 4,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "num_experts_per_tok": 2,
        "num_local_experts": 8,
        "router_aux_loss_coef": args.aux_coef,
        "output_router_logits": false,
        "tie_word_embeddings": false,
        "sliding_window": null,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": "float32",
        "use_cache": true,
    })
}

/// A padded batch of examples.
pub struct Batch {
    /// Input ids `(B, T)`: prompt and answer without its last token, then
    /// padding.
    pub inp: Tensor,
    /// Next-token targets `(B * T,)`.
    pub tgt: Tensor,
    /// `(B * T,)`: 1 where the target is an answer token (the loss).
    pub mask: Tensor,
    /// `(B * T,)`: 1 on real input tokens, 0 on padding (the routing terms).
    pub valid: Tensor,
}

/// A padded batch: inputs, targets, the loss mask (1 on answer targets) and
/// the real-token mask.
pub fn make_batch(items: &[&Tokenized], device: &Device) -> Result<Batch> {
    let t = items
        .iter()
        .map(|e| e.prompt.len() + e.answer.len() - 1)
        .max()
        .unwrap_or(1);
    let b = items.len();
    let (mut inp, mut tgt, mut mask) = (vec![0u32; b * t], vec![0u32; b * t], vec![0f32; b * t]);
    let mut valid = vec![0f32; b * t];
    for (i, e) in items.iter().enumerate() {
        let full = e.full();
        for p in 0..full.len() - 1 {
            inp[i * t + p] = full[p];
            valid[i * t + p] = 1.0;
            tgt[i * t + p] = full[p + 1];
            if p + 1 >= e.prompt.len() {
                mask[i * t + p] = 1.0;
            }
        }
    }
    Ok(Batch {
        inp: Tensor::from_vec(inp, (b, t), device)?,
        tgt: Tensor::from_vec(tgt, (b * t,), device)?,
        mask: Tensor::from_vec(mask, (b * t,), device)?,
        valid: Tensor::from_vec(valid, (b * t,), device)?,
    })
}

/// Masked mean cross-entropy of logits `(B, T, V)`.
pub fn masked_ce(logits: &Tensor, targets: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let v = logits.dim(2)?;
    let lsm = candle_nn::ops::log_softmax(&logits.reshape(((), v))?, 1)?;
    let picked = lsm.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
    let n = mask.sum_all()?.to_scalar::<f32>()?.max(1.0);
    Ok(((picked * mask)?.sum_all()?.neg()? / n as f64)?)
}

/// Mean public-eval loss of a candle model (batched, same number as
/// [`eval::eval_loss`] up to float rounding).
pub fn batch_eval_loss(model: &Mixtral, data: &[Tokenized]) -> Result<f64> {
    let (mut sum, mut n) = (0f64, 0f64);
    for chunk in data.chunks(64) {
        let items: Vec<&Tokenized> = chunk.iter().collect();
        let bt = make_batch(&items, model.device())?;
        let (logits, _) = model.forward(&bt.inp)?;
        let k = bt.mask.sum_all()?.to_scalar::<f32>()? as f64;
        sum += masked_ce(&logits, &bt.tgt, &bt.mask)?.to_scalar::<f32>()? as f64 * k;
        n += k;
    }
    Ok(sum / n.max(1.0))
}

/// Where training batches come from: per skill, either the fixed train
/// split or fresh examples (never in the eval splits).
pub struct Source<'a> {
    pub skills: Vec<Skill>,
    /// Relative draw weight of each of `skills`; all equal draws uniformly
    /// (the same random stream as before weights existed).
    pub weights: Vec<u32>,
    pub by_skill: &'a [Vec<Tokenized>],
    pub fresh: Option<(&'a FreshSampler, &'a Tokenizer)>,
}

impl Source<'_> {
    /// Pick a skill index by weight (uniform when every weight is equal).
    fn pick(&self, rng: &mut Rng) -> usize {
        let uniform = self.weights.windows(2).all(|w| w[0] == w[1]);
        if uniform || self.weights.len() != self.skills.len() {
            return rng.below(self.skills.len());
        }
        let total: u32 = self.weights.iter().sum();
        let mut r = rng.below(total as usize) as u32;
        for (i, w) in self.weights.iter().enumerate() {
            if r < *w {
                return i;
            }
            r -= w;
        }
        self.skills.len() - 1
    }

    /// Sample a batch: a skill by weight, then an example of that skill.
    pub fn batch(&self, batch: usize, rng: &mut Rng) -> Result<Vec<Tokenized>> {
        let mut out = Vec::with_capacity(batch);
        for _ in 0..batch {
            let i = self.pick(rng);
            let skill = self.skills[i];
            if let Some((f, tok)) = self.fresh {
                if let Some(e) = f.sample(skill, rng) {
                    out.extend(eval::tokenize(tok, &[e])?);
                    continue;
                }
            }
            let s = &self.by_skill[i];
            out.push(s[rng.below(s.len())].clone());
        }
        Ok(out)
    }
}

/// Cosine schedule with linear warm-up, down to 10% of the peak.
pub fn lr_at(step: usize, total: usize, peak: f64) -> f64 {
    let warm = (total / 20).max(1);
    if step < warm {
        return peak * (step + 1) as f64 / warm as f64;
    }
    let p = (step - warm) as f64 / (total - warm).max(1) as f64;
    peak * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()))
}

/// The tokenized splits, the train split grouped by skill.
pub struct Splits {
    pub by_skill: Vec<Vec<Tokenized>>,
    pub public: Vec<Tokenized>,
    pub held: Vec<Tokenized>,
}

/// Tokenize the splits and group the train split by skill.
pub fn tokenized_splits(tok: &Tokenizer, corpus: &Corpus) -> Result<Splits> {
    let mut by_skill = Vec::new();
    for skill in Skill::ALL {
        let ex: Vec<_> = corpus
            .train
            .iter()
            .filter(|e| e.skill == skill)
            .cloned()
            .collect();
        by_skill.push(eval::tokenize(tok, &ex)?);
    }
    let public = eval::tokenize(tok, &corpus.public_eval)?;
    let held = eval::tokenize(tok, &corpus.held_out)?;
    Ok(Splits {
        by_skill,
        public,
        held,
    })
}

/// Train `vars` of `model` on batches from `by_skill` for `steps` steps.
#[allow(clippy::too_many_arguments)]
pub fn train_loop(
    model: &Mixtral,
    vars: Vec<Var>,
    source: &Source<'_>,
    public: &[Tokenized],
    steps: usize,
    batch: usize,
    lr: f64,
    weights: &RoutingWeights,
    weight_decay: f64,
    seed: u64,
    mut on_checkpoint: impl FnMut(usize, f64) -> Result<()>,
    checkpoint_every: usize,
    mut before_step: impl FnMut(usize) -> Result<()>,
) -> Result<()> {
    let mut opt = AdamW::new(
        vars,
        ParamsAdamW {
            lr,
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-8,
            weight_decay,
        },
    )?;
    let mut rng = Rng::new(seed ^ 0x7EA1_0000);
    let start = Instant::now();
    let (mut avg, mut avg_mi, mut avg_cover) = (0f64, 0f64, 0f64);
    for step in 0..steps {
        before_step(step)?;
        opt.set_learning_rate(lr_at(step, steps, lr));
        let items = source.batch(batch, &mut rng)?;
        let items: Vec<&Tokenized> = items.iter().collect();
        let bt = make_batch(&items, model.device())?;
        let r = model.forward_routed(&bt.inp, Some(&bt.valid))?;
        let ce = masked_ce(&r.logits, &bt.tgt, &bt.mask)?;
        let loss = weights.loss(&ce, &r)?;
        opt.backward_step(&loss)?;
        let l = ce.to_scalar::<f32>()? as f64;
        let mi = r.mi.to_scalar::<f32>()? as f64;
        avg = if step == 0 { l } else { 0.98 * avg + 0.02 * l };
        let cover = (r.cover.to_scalar::<f32>()? as f64).exp();
        let ema = |a: f64, x: f64| if step == 0 { x } else { 0.98 * a + 0.02 * x };
        avg_mi = ema(avg_mi, mi);
        avg_cover = ema(avg_cover, cover);
        if step % 25 == 0 || step + 1 == steps {
            tracing::info!(
                "step {step}/{steps} loss {l:.4} avg {avg:.4} mi {avg_mi:.3} cover {avg_cover:.3} lr {:.2e} {:.1}s",
                lr_at(step, steps, lr),
                start.elapsed().as_secs_f64()
            );
        }
        if checkpoint_every > 0 && (step + 1) % checkpoint_every == 0 && step + 1 < steps {
            let pl = batch_eval_loss(model, public)?;
            tracing::info!("step {} public-eval loss {pl:.4}", step + 1);
            on_checkpoint(step + 1, pl)?;
        }
    }
    let pl = batch_eval_loss(model, public)?;
    tracing::info!(
        "final public-eval loss {pl:.4} after {:.1}s",
        start.elapsed().as_secs_f64()
    );
    on_checkpoint(steps, pl)
}

/// Write a Hugging Face directory: config.json, model.safetensors, tokenizer.json.
pub fn write_dir(
    dir: &Path,
    config: &serde_json::Value,
    model: &Mixtral,
    tok: &Tokenizer,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(config)? + "\n",
    )?;
    let tmp = dir.join("model.safetensors.tmp");
    model.save(&tmp)?;
    std::fs::rename(&tmp, dir.join("model.safetensors"))?;
    let json = tok
        .to_string(true)
        .map_err(|e| anyhow!("serialising tokenizer: {e}"))?;
    std::fs::write(dir.join("tokenizer.json"), json + "\n")?;
    Ok(())
}

/// The tokenizer and config.json of a model to train further, refusing one
/// whose train_report.json names another seed (its held-out split would
/// differ from this run's, so training could see held-out examples).
pub fn init_files(dir: &Path, seed: u64) -> Result<(Tokenizer, serde_json::Value)> {
    let tok = crate::improve::load_tokenizer(dir)?;
    let cp = dir.join("config.json");
    let config: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&cp).with_context(|| format!("reading {}", cp.display()))?,
    )
    .with_context(|| format!("{}: not JSON", cp.display()))?;
    let rp = dir.join("train_report.json");
    if let Ok(bytes) = std::fs::read(&rp) {
        let report: serde_json::Value = serde_json::from_slice(&bytes)
            .with_context(|| format!("{}: not JSON", rp.display()))?;
        if let Some(s) = report.get("seed").and_then(|s| s.as_u64()) {
            if s != seed {
                anyhow::bail!(
                    "{} was trained with --seed {s}, this run has --seed {seed}: give --seed {s} so the held-out split stays unseen",
                    dir.display()
                );
            }
        }
    }
    Ok((tok, config))
}

/// Tokens of 16 training batches (drawn apart from the training stream)
/// that pick each expert, per layer.
pub fn pick_counts(
    model: &Mixtral,
    source: &Source<'_>,
    batch: usize,
    seed: u64,
) -> Result<Vec<Vec<usize>>> {
    let mut rng = Rng::new(seed ^ 0xC0_0A75);
    let mut counts: Vec<Vec<usize>> = Vec::new();
    for _ in 0..16 {
        let items = source.batch(batch, &mut rng)?;
        let items: Vec<&Tokenized> = items.iter().collect();
        let bt = make_batch(&items, model.device())?;
        let r = model.forward_routed(&bt.inp, Some(&bt.valid))?;
        counts.resize(r.picks.len(), Vec::new());
        for (c, p) in counts.iter_mut().zip(&r.picks) {
            c.resize(p.len(), 0);
            for (a, b) in c.iter_mut().zip(p) {
                *a += b;
            }
        }
    }
    Ok(counts)
}

/// Give every expert that no token of [`pick_counts`]' batches picks a copy
/// of a busy expert of its layer (one with at least half an even share of
/// the picks; busiest first, each busy one once before any twice): returns
/// `(layer, from, to)` of each copy.
pub fn revive_unpicked(
    model: &Mixtral,
    source: &Source<'_>,
    batch: usize,
    seed: u64,
) -> Result<Vec<(usize, usize, usize)>> {
    let counts = pick_counts(model, source, batch, seed)?;
    let mut rng = Rng::new(seed ^ 0x5_9117);
    let mut done = Vec::new();
    for (l, c) in counts.iter().enumerate() {
        // Donors: experts with at least half an even share of the picks
        // (a rarely picked expert has little to split).
        let total: usize = c.iter().sum();
        let mut live: Vec<usize> = (0..c.len())
            .filter(|&j| c[j] > 0 && c[j] * 2 * c.len() >= total)
            .collect();
        live.sort_by(|&a, &b| c[b].cmp(&c[a]).then(a.cmp(&b)));
        let dead: Vec<usize> = (0..c.len()).filter(|&j| c[j] == 0).collect();
        tracing::info!("layer {l}: tokens per expert {c:?}");
        if live.is_empty() {
            continue;
        }
        for (i, &to) in dead.iter().enumerate() {
            let from = live[i % live.len()];
            model.split_expert(l, from, to, 0.1, &mut rng)?;
            tracing::info!("layer {l}: expert {to} (never picked) starts as a copy of expert {from} ({} picks)", c[from]);
            done.push((l, from, to));
        }
    }
    Ok(done)
}

/// Whether `--revive-every every` revives before `step` (not at step 0,
/// which `--revive` covers, and only while a quarter of `steps` remains).
pub fn revive_due(step: usize, every: usize, steps: usize) -> bool {
    every > 0 && step > 0 && step.is_multiple_of(every) && 4 * steps.saturating_sub(step) >= steps
}

/// The whole run: tokenizer, model, training, directory with a README section.
pub fn run(args: &TrainArgs) -> Result<()> {
    let out = args.out.as_path();
    let device = Device::Cpu;
    let corpus = Corpus::generate(args.seed);
    let (tok, config) = match &args.init {
        Some(dir) => init_files(dir, args.seed)?,
        None => {
            let tok = train_tokenizer(&corpus, args.vocab)?;
            let bos = tok.token_to_id(BOS).context("no <s>")?;
            let eos = tok.token_to_id(EOS).context("no </s>")?;
            let config = config_json(args, tok.get_vocab_size(true), bos, eos);
            (tok, config)
        }
    };
    let vocab_size = tok.get_vocab_size(true);
    let cfg = Config::from_value(&config)?;
    tracing::info!("tokenizer: {vocab_size} tokens; config {}", config);
    let weights = RoutingWeights {
        aux: args.aux_coef,
        mi: args.mi_coef,
        cover: args.cover_coef,
        layer_aux: args.layer_aux.clone(),
        layer_mi: args.layer_mi.clone(),
        layer_cover: args.layer_cover.clone(),
        layer_union: args.layer_union.clone(),
    };
    weights.check(cfg.num_hidden_layers)?;
    let assigned = (args.balanced_cover.iter().map(|l| ("--balanced-cover", *l)))
        .chain(args.cover_floor.iter().map(|(l, _)| ("--cover-floor", *l)));
    for (flag, l) in assigned {
        if l >= cfg.num_hidden_layers {
            anyhow::bail!("{flag} {l}: the model has {} layers", cfg.num_hidden_layers);
        }
    }
    let Splits {
        by_skill,
        public,
        held,
    } = tokenized_splits(&tok, &corpus)?;
    let mut model = match &args.init {
        Some(dir) => Mixtral::load(&cfg, &dir.join("model.safetensors"), &device)?,
        None => Mixtral::init_with_router_scale(&cfg, args.seed, args.router_init, &device)?,
    };
    model.balanced_cover = args.balanced_cover.clone();
    model.cover_floor = args.cover_floor.clone();
    let params: usize = model.all_vars().iter().map(|v| v.elem_count()).sum();
    tracing::info!("{params} parameters");
    let start = Instant::now();
    let vars = model.all_vars();
    let fresh = FreshSampler::new(&corpus);
    let source = Source {
        skills: Skill::ALL.to_vec(),
        weights: skill_weights(&args.skill_weight),
        by_skill: &by_skill,
        fresh: Some((&fresh, &tok)),
    };
    let stage = args.stage_seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut revived: Vec<(usize, usize, usize, usize)> = if args.revive {
        revive_unpicked(&model, &source, args.batch, args.seed ^ stage)?
            .into_iter()
            .map(|(l, from, to)| (0, l, from, to))
            .collect()
    } else {
        Vec::new()
    };
    // A second stage draws other batches than the first stage did.
    let batch_seed = match args.init {
        Some(_) => args.seed ^ 0x5EC0_0000_0000 ^ stage,
        None => args.seed,
    };
    train_loop(
        &model,
        vars,
        &source,
        &public,
        args.steps,
        args.batch,
        args.lr,
        &weights,
        args.weight_decay,
        batch_seed,
        |step, _| {
            write_dir(out, &config, &model, &tok)?;
            tracing::info!("wrote {} at step {step}", out.display());
            Ok(())
        },
        args.checkpoint_every,
        |step| {
            if revive_due(step, args.revive_every, args.steps) {
                let again =
                    revive_unpicked(&model, &source, args.batch, args.seed ^ stage ^ step as u64)?;
                revived.extend(again.into_iter().map(|(l, from, to)| (step, l, from, to)));
            }
            Ok(())
        },
    )?;
    let secs = start.elapsed().as_secs_f64();
    let public_loss = batch_eval_loss(&model, &public)?;
    let acc = eval::accuracy(&mut model, &tok, &held)?;
    let line = eval::format_accuracy(&acc);
    tracing::info!("held-out accuracy: {line}");
    let routes = crate::routes::held_out_routes(out)?;
    for r in &routes {
        tracing::info!("routes: {}", r.line());
    }
    let report = serde_json::json!({
        "seed": args.seed, "steps": args.steps, "batch": args.batch, "lr": args.lr,
        "hidden": args.hidden, "weight_decay": args.weight_decay, "aux_coef": args.aux_coef,
        "mi_coef": args.mi_coef, "cover_coef": args.cover_coef,
        "layer_mi": args.layer_mi, "layer_aux": args.layer_aux, "layer_cover": args.layer_cover, "balanced_cover": args.balanced_cover, "cover_floor": args.cover_floor, "layer_union": args.layer_union,
        "init": args.init.as_ref().map(|p| p.display().to_string()),
        "revive_every": args.revive_every, "stage_seed": args.stage_seed,
        "revived": revived.iter().map(|(step, l, from, to)| serde_json::json!({"step": step, "layer": l, "from": from, "to": to})).collect::<Vec<_>>(),
        "skill_weights": Skill::ALL.iter().zip(skill_weights(&args.skill_weight)).map(|(k, w)| (k.name().to_string(), w)).collect::<std::collections::BTreeMap<_, _>>(), "router_init": args.router_init, "intermediate": args.intermediate, "vocab": vocab_size,
        "parameters": params, "train_seconds": secs, "public_eval_loss": public_loss,
        "held_out": acc.iter().map(|a| serde_json::json!({"skill": a.name(), "correct": a.correct, "total": a.total})).collect::<Vec<_>>(),
        "routes": routes.iter().map(|r| r.json()).collect::<Vec<_>>(),
    });
    std::fs::write(
        out.join("train_report.json"),
        serde_json::to_string_pretty(&report)? + "\n",
    )?;
    let _ = DType::F32;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skill_weights_parse_and_steer_the_draw() {
        assert_eq!(parse_skill_weight("sort=3"), Ok((Skill::Sort, 3)));
        for bad in ["sort", "sort=0", "sort=101", "sort=x", "sorting=2"] {
            assert!(parse_skill_weight(bad).is_err(), "{bad}");
        }
        // The defaults: reverse and sort 3, the rest 2.
        assert_eq!(skill_weights(&[]), vec![2, 2, 2, 3, 3, 2, 2]);
        let w = skill_weights(&[
            (Skill::Add, 1),
            (Skill::Sub, 1),
            (Skill::Copy, 1),
            (Skill::Count, 1),
            (Skill::Capital, 1),
            (Skill::Sort, 3),
            (Skill::Reverse, 2),
        ]);
        assert_eq!(w, vec![1, 1, 1, 2, 3, 1, 1]);
        let by_skill: Vec<Vec<Tokenized>> = Vec::new();
        let src = Source {
            skills: Skill::ALL.to_vec(),
            weights: w,
            by_skill: &by_skill,
            fresh: None,
        };
        let mut rng = Rng::new(1);
        let mut n = [0usize; 7];
        for _ in 0..10_000 {
            n[src.pick(&mut rng)] += 1;
        }
        // sort (3 of 10) against add (1 of 10): about 3000 and 1000.
        assert!((2700..3300).contains(&n[4]), "{n:?}");
        assert!((850..1150).contains(&n[0]), "{n:?}");
        // Equal weights keep the uniform draw (same stream as before).
        let uni = Source {
            weights: vec![1; 7],
            ..src
        };
        let (mut a, mut b) = (Rng::new(5), Rng::new(5));
        for _ in 0..100 {
            assert_eq!(uni.pick(&mut a), b.below(7));
        }
    }

    fn tiny_model(layers: usize) -> Mixtral {
        let cfg = Config::from_value(&serde_json::json!({
            "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
            "vocab_size": 16, "hidden_size": 8, "intermediate_size": 8,
            "num_hidden_layers": layers, "num_attention_heads": 2, "num_key_value_heads": 1,
            "max_position_embeddings": 16, "rms_norm_eps": 1e-5, "num_experts_per_tok": 2,
            "num_local_experts": 4,
        }))
        .unwrap();
        Mixtral::init_with_router_scale(&cfg, 3, 1.0, &Device::Cpu).unwrap()
    }

    fn tiny_items() -> Vec<Tokenized> {
        (0..8u32)
            .map(|i| Tokenized {
                skill: Skill::Copy,
                unseen: false,
                prompt: vec![0, 2 + i % 5, 3 + (i * 7) % 11, 4],
                answer: vec![5 + i % 9, 1],
                answer_text: String::new(),
            })
            .collect()
    }

    #[test]
    fn layer_weights_parse_check_and_weigh_one_layer() {
        assert_eq!(parse_layer_coef("0=0.6"), Ok((0, 0.6)));
        assert_eq!(parse_layer_coef(" 3 = -1"), Ok((3, -1.0)));
        for bad in ["0", "x=1", "-1=0.5", "0=y", "0=NaN", "0=inf", "0=1000"] {
            assert!(parse_layer_coef(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_layer_count("1=2"), Ok((1, 2)));
        for bad in ["1", "1=0.5", "1=-2", "1=1001", "a=2"] {
            assert!(parse_layer_count(bad).is_err(), "{bad}");
        }
        let mut w = RoutingWeights::uniform(0.02, 0.15, 1.0);
        w.layer_mi.push((2, 0.6));
        assert!(w.check(3).is_ok());
        let err = w.check(2).unwrap_err().to_string();
        assert!(err.contains("layer 2") && err.contains("2 layers"), "{err}");
        let mut u = RoutingWeights::uniform(0.02, 0.15, 1.0);
        u.layer_union.push((4, 1.0));
        assert!(u.check(5).is_ok());
        let err = u.check(4).unwrap_err().to_string();
        assert!(err.contains("layer 4") && err.contains("4 layers"), "{err}");

        // Per-layer weights equal to the uniform ones give the same loss; an
        // override of layer 0's MI weight by d moves it by exactly -d/L times
        // that layer's MI.
        let m = tiny_model(2);
        let items = tiny_items();
        let refs: Vec<&Tokenized> = items.iter().collect();
        let bt = make_batch(&refs, m.device()).unwrap();
        let r = m.forward_routed(&bt.inp, Some(&bt.valid)).unwrap();
        let ce = masked_ce(&r.logits, &bt.tgt, &bt.mask).unwrap();
        let scalar = |t: Tensor| t.to_scalar::<f32>().unwrap() as f64;
        let base = RoutingWeights::uniform(0.02, 0.15, 1.0);
        let same = RoutingWeights {
            layer_mi: vec![(0, 0.15), (1, 0.15)],
            layer_aux: vec![(1, 0.02)],
            layer_cover: vec![(0, 1.0)],
            ..base.clone()
        };
        let a = scalar(base.loss(&ce, &r).unwrap());
        assert!((a - scalar(same.loss(&ce, &r).unwrap())).abs() < 1e-5);
        let more = RoutingWeights {
            layer_mi: vec![(0, 0.15 + 2.0)],
            ..base.clone()
        };
        let mi0 = scalar(r.layers[0].mi.clone());
        assert!(mi0 > 1e-4, "layer 0 MI {mi0}");
        let b = scalar(more.loss(&ce, &r).unwrap());
        assert!(
            (b - (a - 2.0 / 2.0 * mi0)).abs() < 1e-5,
            "{b} vs {a} - {mi0}"
        );
        // The soft expert count: between 1 (one expert for every token)
        // and E, and its weight moves the loss by exactly its share.
        let u0 = scalar(r.layers[0].union.clone());
        assert!((1.0..=4.0).contains(&u0), "union {u0}");
        let with_union = RoutingWeights {
            layer_union: vec![(0, 0.5)],
            ..base.clone()
        };
        let c = scalar(with_union.loss(&ce, &r).unwrap());
        assert!((c - (a + 0.5 / 2.0 * u0)).abs() < 1e-5, "{c} vs {a} + {u0}");
        // Pick counts cover every real token k times per layer.
        let real = bt.valid.sum_all().unwrap().to_scalar::<f32>().unwrap() as usize;
        for p in &r.picks {
            assert_eq!(p.iter().sum::<usize>(), 2 * real);
        }
    }

    #[test]
    fn revive_every_stops_a_quarter_before_the_end() {
        let due: Vec<usize> = (0..1000).filter(|&s| revive_due(s, 200, 1000)).collect();
        assert_eq!(due, vec![200, 400, 600]);
        assert!(!(0..1000).any(|s| revive_due(s, 0, 1000)));
        assert_eq!((0..10).filter(|&s| revive_due(s, 1, 10)).count(), 7);
        assert!(!revive_due(2000, 200, 1000), "past the end");
    }

    #[test]
    fn revive_gives_an_unpicked_expert_a_busy_ones_place() {
        let m = tiny_model(1);
        // With the router's input norm at zero every logit is 0 and the
        // ties go to the lowest index: experts 0 and 1 take every token,
        // 2 and 3 none.
        let norm = &m.vars["model.layers.0.post_attention_layernorm.weight"];
        let norm_w = norm.as_tensor().copy().unwrap();
        norm.set(&norm_w.zeros_like().unwrap()).unwrap();
        let items = tiny_items();
        let by_skill = vec![Vec::new(), Vec::new(), items];
        let src = Source {
            skills: vec![Skill::Add, Skill::Sub, Skill::Copy],
            weights: vec![0, 0, 1],
            by_skill: &by_skill,
            fresh: None,
        };
        let before = pick_counts(&m, &src, 8, 5).unwrap();
        assert_eq!(before[0][2..], [0, 0]);
        assert!(before[0][0] > 0 && before[0][0] == before[0][1]);
        let gate = &m.vars["model.layers.0.block_sparse_moe.gate.weight"];
        let w1_of = |j: usize| {
            m.vars[&format!("model.layers.0.block_sparse_moe.experts.{j}.w1.weight")]
                .as_tensor()
                .to_vec2::<f32>()
                .unwrap()
        };
        let w1_before = w1_of(1);
        let done = revive_unpicked(&m, &src, 8, 5).unwrap();
        // Busiest first, equal counts by index.
        assert_eq!(done, vec![(0, 0, 2), (0, 1, 3)]);
        for (_, from, to) in &done {
            for w in ["w1", "w2", "w3"] {
                let get = |j: usize| {
                    m.vars[&format!("model.layers.0.block_sparse_moe.experts.{j}.{w}.weight")]
                        .as_tensor()
                        .to_vec2::<f32>()
                        .unwrap()
                };
                assert_eq!(get(*to), get(*from), "{w}");
            }
            let rows = gate.as_tensor().to_vec2::<f32>().unwrap();
            let diff: f32 = rows[*to]
                .iter()
                .zip(&rows[*from])
                .map(|(a, b)| (a - b).abs())
                .sum();
            let size: f32 = rows[*from].iter().map(|v| v.abs()).sum();
            assert!(diff > 0.0 && diff < 0.5 * size, "{diff} of {size}");
        }
        // The donors keep their weights.
        assert_eq!(w1_of(1), w1_before);
        // With the router's input back, the copies are picked.
        norm.set(&norm_w).unwrap();
        let after = pick_counts(&m, &src, 8, 5).unwrap();
        assert!(after[0][2] > 0 && after[0][3] > 0, "{:?}", after[0]);
        // Bad indices are refused.
        let mut rng = Rng::new(1);
        assert!(m.split_expert(0, 1, 1, 0.1, &mut rng).is_err());
        assert!(m.split_expert(0, 1, 4, 0.1, &mut rng).is_err());
        assert!(m.split_expert(5, 1, 2, 0.1, &mut rng).is_err());
    }

    #[test]
    fn a_second_stage_refuses_another_seed() {
        let dir = std::env::temp_dir().join(format!("aiblock-init-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let tok = Tokenizer::new(BPE::default());
        std::fs::write(dir.join("tokenizer.json"), tok.to_string(false).unwrap()).unwrap();
        std::fs::write(dir.join("config.json"), "{\"hidden_size\": 8}").unwrap();
        std::fs::write(dir.join("train_report.json"), "{\"seed\": 7}").unwrap();
        let err = init_files(&dir, 20260126).unwrap_err().to_string();
        assert!(err.contains("--seed 7"), "{err}");
        let (_, cfg) = init_files(&dir, 7).unwrap();
        assert_eq!(cfg["hidden_size"], 8);
        std::fs::write(dir.join("config.json"), "{not json").unwrap();
        assert!(init_files(&dir, 7)
            .unwrap_err()
            .to_string()
            .contains("not JSON"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
