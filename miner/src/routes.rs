//! Which experts a prompt needs, and what they cost to download: the prompt
//! is answered greedily by the CPU reference engine, and every expert the
//! router picks for a token the engine runs (the prompt and the answer but
//! its last token, which is never fed back) is needed. `aiblock routes`
//! prints these per skill over the held-out prompts, and `aiblock improve
//! --skill` without `--expert` takes the expert its skill uses most.

use std::path::Path;

use anyhow::{Context, Result};
use tokenizers::Tokenizer;
use web_node::eval::{self, Corpus, Skill, Tokenized};
use web_node::model::reference::CpuModel;
use web_node::model::{Config, QuantFormat, Slot};

use crate::blocks::{self, ModelFiles};
use crate::improve::load_tokenizer;

/// Payload bytes of a checkpoint's slots, as the chain stores them (what a
/// node downloads).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sizes {
    /// `expert[layer][expert]`.
    pub expert: Vec<Vec<u64>>,
    /// All experts together.
    pub all_experts: u64,
    /// The shared block and every router: needed by any prompt.
    pub always: u64,
    /// The whole model: `always + all_experts`.
    pub whole: u64,
}

impl Sizes {
    /// The slot sizes of a checkpoint.
    pub fn of(cfg: &Config, weights: &[u8]) -> Result<Self> {
        Self::of_quant(cfg, weights, None)
    }

    /// The slot sizes with every expert block in `quant` (the bytes of the
    /// quantized blocks; shared and routers stay as they are).
    pub fn of_quant(cfg: &Config, weights: &[u8], quant: Option<QuantFormat>) -> Result<Self> {
        let mut expert = vec![vec![0u64; cfg.num_local_experts]; cfg.num_hidden_layers];
        let mut always = 0u64;
        for p in blocks::split_checkpoint(cfg, weights)? {
            let n = match (quant, p.slot) {
                (Some(q), Slot::Expert { .. }) => {
                    web_node::model::quant::quantize_payload(cfg, p.slot, &p.bytes, q)?.len() as u64
                }
                _ => p.bytes.len() as u64,
            };
            match p.slot {
                Slot::Expert { layer, expert: e } => expert[layer][e] = n,
                Slot::Shared | Slot::Router { .. } | Slot::SharedExpert { .. } => always += n,
            }
        }
        let all_experts = expert.iter().flatten().sum();
        Ok(Self {
            expert,
            all_experts,
            always,
            whole: always + all_experts,
        })
    }
}

/// The experts one prompt needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptRoute {
    /// The greedy answer (ending with EOS unless cut at the token limit).
    pub answer: Vec<u32>,
    /// `tokens[layer][expert]`: tokens routed to each expert.
    pub tokens: Vec<Vec<u64>>,
}

impl PromptRoute {
    /// Distinct experts used in each layer.
    pub fn distinct(&self) -> Vec<usize> {
        self.tokens
            .iter()
            .map(|row| row.iter().filter(|&&c| c > 0).count())
            .collect()
    }

    /// Bytes of the experts it needs.
    pub fn expert_bytes(&self, sizes: &Sizes) -> u64 {
        let mut n = 0;
        for (l, row) in self.tokens.iter().enumerate() {
            for (e, &c) in row.iter().enumerate() {
                if c > 0 {
                    n += sizes.expert[l][e];
                }
            }
        }
        n
    }

    /// Needed expert bytes ÷ all expert bytes.
    pub fn expert_fraction(&self, sizes: &Sizes) -> f64 {
        self.expert_bytes(sizes) as f64 / sizes.all_experts.max(1) as f64
    }

    /// (shared + routers + needed experts) ÷ the whole model.
    pub fn model_fraction(&self, sizes: &Sizes) -> f64 {
        (sizes.always + self.expert_bytes(sizes)) as f64 / sizes.whole.max(1) as f64
    }
}

/// Answer `prompt` greedily (at most `max_new` tokens) and record the
/// experts it needed.
pub fn route_prompt(
    model: &mut CpuModel,
    prompt: &[u32],
    max_new: usize,
    eos: u32,
) -> Result<PromptRoute> {
    model.reset_stats();
    // Every step recomputes the whole sequence (causal, so each token routes
    // as it did before): the union is the experts of the prompt and of the
    // answer's tokens that were fed back.
    let answer = eval::greedy(model, prompt, max_new, eos)?;
    Ok(PromptRoute {
        answer,
        tokens: model.routing_stats().tokens_routed.clone(),
    })
}

/// Routing of a set of prompts (one skill, all of them, or one prompt).
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub label: String,
    pub prompts: usize,
    /// Mean over prompts of the distinct experts used, per layer.
    pub experts_per_layer: Vec<f64>,
    /// Mean over prompts of the needed expert bytes ÷ all expert bytes.
    pub expert_fraction: f64,
    /// Mean over prompts of (shared + routers + needed experts) ÷ whole model.
    pub model_fraction: f64,
    /// Largest model fraction of one prompt.
    pub max_model_fraction: f64,
    /// Distinct experts used by any of the prompts, per layer.
    pub union_per_layer: Vec<usize>,
    /// Tokens routed to each expert, summed over the prompts.
    pub tokens: Vec<Vec<u64>>,
}

impl Summary {
    /// Summarise prompt routes (their fractions averaged per prompt).
    pub fn of(label: &str, routes: &[&PromptRoute], sizes: &Sizes) -> Self {
        let layers = sizes.expert.len();
        let experts = sizes.expert.first().map_or(0, |r| r.len());
        let n = routes.len().max(1) as f64;
        let mut tokens = vec![vec![0u64; experts]; layers];
        let mut per_layer = vec![0f64; layers];
        let (mut ef, mut mf, mut max_mf) = (0f64, 0f64, 0f64);
        for r in routes {
            for (l, d) in r.distinct().iter().enumerate() {
                per_layer[l] += *d as f64 / n;
            }
            for (acc, row) in tokens.iter_mut().zip(&r.tokens) {
                for (a, c) in acc.iter_mut().zip(row) {
                    *a += c;
                }
            }
            ef += r.expert_fraction(sizes) / n;
            let m = r.model_fraction(sizes);
            mf += m / n;
            max_mf = max_mf.max(m);
        }
        let union_per_layer = tokens
            .iter()
            .map(|row| row.iter().filter(|&&c| c > 0).count())
            .collect();
        Self {
            label: label.to_string(),
            prompts: routes.len(),
            experts_per_layer: per_layer,
            expert_fraction: ef,
            model_fraction: mf,
            max_model_fraction: max_mf,
            union_per_layer,
            tokens,
        }
    }

    /// Mean distinct experts per layer (over layers and prompts).
    pub fn mean_experts(&self) -> f64 {
        self.experts_per_layer.iter().sum::<f64>() / self.experts_per_layer.len().max(1) as f64
    }

    /// Distinct experts used by any of the prompts, over all layers.
    pub fn union_total(&self) -> usize {
        self.union_per_layer.iter().sum()
    }

    /// The expert that got the most tokens (lowest layer, then index, on a tie).
    pub fn most_used(&self) -> Option<Slot> {
        let mut best: Option<(u64, Slot)> = None;
        for (layer, row) in self.tokens.iter().enumerate() {
            for (expert, &c) in row.iter().enumerate() {
                if c > 0 && best.is_none_or(|(b, _)| c > b) {
                    best = Some((c, Slot::Expert { layer, expert }));
                }
            }
        }
        best.map(|(_, s)| s)
    }

    /// One line: experts per layer, the two fractions, the union.
    pub fn line(&self) -> String {
        let per: Vec<String> = self
            .experts_per_layer
            .iter()
            .map(|x| format!("{x:.2}"))
            .collect();
        let union: Vec<String> = self.union_per_layer.iter().map(|x| x.to_string()).collect();
        format!(
            "{:<8} {:>3} prompts  experts/layer {} (mean {:.2})  expert bytes {:.3}  model bytes {:.3} (max {:.3})  union/layer {}",
            self.label,
            self.prompts,
            per.join(" "),
            self.mean_experts(),
            self.expert_fraction,
            self.model_fraction,
            self.max_model_fraction,
            union.join(" "),
        )
    }

    /// The numbers as JSON (for train_report.json).
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "label": self.label,
            "prompts": self.prompts,
            "experts_per_layer": self.experts_per_layer,
            "mean_experts_per_layer": self.mean_experts(),
            "expert_fraction": self.expert_fraction,
            "model_fraction": self.model_fraction,
            "max_model_fraction": self.max_model_fraction,
            "union_per_layer": self.union_per_layer,
        })
    }
}

/// A model directory loaded for routing: the CPU reference engine, its
/// tokenizer and the slot sizes.
pub struct Router {
    pub model: CpuModel,
    pub tok: Tokenizer,
    pub sizes: Sizes,
    pub eos: u32,
}

impl Router {
    pub fn load(dir: &Path) -> Result<Self> {
        Self::load_quant(dir, None)
    }

    /// [`Router::load`] with the experts quantized as they load (and sized
    /// as quantized blocks) when `quant` is set.
    pub fn load_quant(dir: &Path, quant: Option<QuantFormat>) -> Result<Self> {
        let files = ModelFiles::read(dir)?;
        let sizes = Sizes::of_quant(&files.config, &files.weights, quant)?;
        let mut model = CpuModel::from_safetensors(files.config.clone(), files.weights.clone())
            .with_context(|| format!("loading {}", dir.display()))?;
        if let Some(format) = quant {
            let inner =
                web_node::model::load::BytesExpertSource::new(files.config.clone(), files.weights)?;
            model.set_source(web_node::model::quant::QuantizingSource { inner, format });
        }
        let tok = load_tokenizer(dir)?;
        let eos = eval::eos_id(&tok)?;
        Ok(Self {
            model,
            tok,
            sizes,
            eos,
        })
    }

    /// Route examples' prompts (greedy answers up to the answer's length + 4
    /// tokens, as the accuracy check does).
    pub fn route_examples(&mut self, ex: &[Tokenized]) -> Result<Vec<PromptRoute>> {
        ex.iter()
            .map(|e| route_prompt(&mut self.model, &e.prompt, e.answer.len() + 4, self.eos))
            .collect()
    }

    /// Route one prompt text.
    pub fn route_text(&mut self, prompt: &str, max_new: usize) -> Result<PromptRoute> {
        let ids = eval::encode(&self.tok, prompt)?;
        route_prompt(&mut self.model, &ids, max_new, self.eos)
    }

    /// Per skill over the held-out prompts, then all of them together.
    pub fn held_out(&mut self) -> Result<Vec<Summary>> {
        let corpus = Corpus::default_corpus();
        let held = eval::tokenize(&self.tok, &corpus.held_out)?;
        let routes = self.route_examples(&held)?;
        let mut out = Vec::new();
        for (skill, unseen) in eval::groups() {
            let of: Vec<&PromptRoute> = held
                .iter()
                .zip(&routes)
                .filter(|(e, _)| e.skill == skill && e.unseen == unseen)
                .map(|(_, r)| r)
                .collect();
            if !of.is_empty() {
                out.push(Summary::of(
                    &eval::group_name(skill, unseen),
                    &of,
                    &self.sizes,
                ));
            }
        }
        let all: Vec<&PromptRoute> = routes.iter().collect();
        out.push(Summary::of("all", &all, &self.sizes));
        Ok(out)
    }

    /// The expert `skill` uses most: tokens routed over its public-eval
    /// examples (prompt and answer, the text the quality gate scores).
    pub fn most_used_expert(&mut self, skill: Skill) -> Result<Slot> {
        let corpus = Corpus::default_corpus();
        let ex = eval::tokenize(
            &self.tok,
            &eval::corpus::of_skill(&corpus.public_eval, skill),
        )?;
        self.model.reset_stats();
        for e in &ex {
            let full = e.full();
            eval::LogitsModel::logits_all(&mut self.model, &full[..full.len() - 1])?;
        }
        let stats = self.model.routing_stats().clone();
        let s = Summary {
            label: skill.name().to_string(),
            prompts: ex.len(),
            experts_per_layer: Vec::new(),
            expert_fraction: 0.0,
            model_fraction: 0.0,
            max_model_fraction: 0.0,
            union_per_layer: Vec::new(),
            tokens: stats.tokens_routed,
        };
        s.most_used()
            .with_context(|| format!("no {skill} example routed to any expert"))
    }
}

/// Per-skill and overall routing of the held-out prompts of a model directory.
pub fn held_out_routes(dir: &Path) -> Result<Vec<Summary>> {
    Router::load(dir)?.held_out()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes() -> Sizes {
        Sizes {
            expert: vec![vec![10, 10], vec![10, 10]],
            all_experts: 40,
            always: 60,
            whole: 100,
        }
    }

    #[test]
    fn fractions_count_each_needed_expert_once() {
        let r = PromptRoute {
            answer: vec![],
            tokens: vec![vec![5, 0], vec![3, 2]],
        };
        assert_eq!(r.distinct(), vec![1, 2]);
        assert_eq!(r.expert_bytes(&sizes()), 30);
        assert!((r.expert_fraction(&sizes()) - 0.75).abs() < 1e-12);
        assert!((r.model_fraction(&sizes()) - 0.9).abs() < 1e-12);
    }

    #[test]
    fn summary_averages_per_prompt_and_unions() {
        let a = PromptRoute {
            answer: vec![],
            tokens: vec![vec![5, 0], vec![3, 0]],
        };
        let b = PromptRoute {
            answer: vec![],
            tokens: vec![vec![0, 1], vec![3, 0]],
        };
        let s = Summary::of("x", &[&a, &b], &sizes());
        assert_eq!(s.experts_per_layer, vec![1.0, 1.0]);
        assert!((s.expert_fraction - 0.5).abs() < 1e-12);
        assert!((s.model_fraction - 0.8).abs() < 1e-12);
        assert_eq!(s.union_per_layer, vec![2, 1]);
        assert_eq!(
            s.most_used(),
            Some(Slot::Expert {
                layer: 1,
                expert: 0
            })
        );
    }
}
