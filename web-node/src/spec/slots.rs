//! Chain-B slots (`shared`, `layerN.router`, `layerN.expertM`) and the exact
//! Hugging Face tensors each one holds under a given [`Config`].

use std::fmt;

use super::{Config, SpecError};

/// One chain-B slot. A slot's versions form a line of blocks; its head is the
/// accepted latest version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Slot {
    /// Embeddings, attention, norms, lm_head.
    Shared,
    /// The router (gate) of one layer.
    Router { layer: usize },
    /// One expert (w1, w2, w3) of one layer.
    Expert { layer: usize, expert: usize },
}

/// A tensor a slot must hold: Hugging Face name and shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

fn parse_index(s: &str) -> Option<usize> {
    // No sign, no leading zeros (except "0"), at most 6 digits: names are canonical.
    if s.is_empty() || s.len() > 6 || (s.len() > 1 && s.starts_with('0')) {
        return None;
    }
    if !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

impl Slot {
    /// Parse a canonical slot name.
    pub fn parse(name: &str) -> Result<Self, SpecError> {
        let err = || SpecError::SlotName(name.to_string());
        if name == "shared" {
            return Ok(Slot::Shared);
        }
        let rest = name.strip_prefix("layer").ok_or_else(err)?;
        let (l, tail) = rest.split_once('.').ok_or_else(err)?;
        let layer = parse_index(l).ok_or_else(err)?;
        if tail == "router" {
            return Ok(Slot::Router { layer });
        }
        let e = tail.strip_prefix("expert").ok_or_else(err)?;
        let expert = parse_index(e).ok_or_else(err)?;
        Ok(Slot::Expert { layer, expert })
    }

    /// The layer this slot belongs to (None for `shared`).
    pub fn layer(&self) -> Option<usize> {
        match *self {
            Slot::Shared => None,
            Slot::Router { layer } | Slot::Expert { layer, .. } => Some(layer),
        }
    }

    /// Check the slot lies within the model's spec.
    pub fn check_in_spec(&self, cfg: &Config) -> Result<(), SpecError> {
        let out = |reason: String| SpecError::SlotOutOfRange {
            slot: self.to_string(),
            reason,
        };
        if let Some(layer) = self.layer() {
            if layer >= cfg.num_hidden_layers {
                return Err(out(format!(
                    "layer {layer} >= num_layers {}",
                    cfg.num_hidden_layers
                )));
            }
        }
        if let Slot::Expert { expert, .. } = *self {
            if expert >= cfg.num_local_experts {
                return Err(out(format!(
                    "expert {expert} >= num_experts {}",
                    cfg.num_local_experts
                )));
            }
        }
        Ok(())
    }

    /// Every slot of a model, in a stable order: shared, then per layer the
    /// router and its experts.
    pub fn all(cfg: &Config) -> Vec<Slot> {
        let mut v = vec![Slot::Shared];
        for layer in 0..cfg.num_hidden_layers {
            v.push(Slot::Router { layer });
            for expert in 0..cfg.num_local_experts {
                v.push(Slot::Expert { layer, expert });
            }
        }
        v
    }

    /// The exact tensors (Hugging Face names and shapes) this slot holds.
    pub fn tensors(&self, cfg: &Config) -> Vec<TensorSpec> {
        let h = cfg.hidden_size;
        let t = |name: String, shape: Vec<usize>| TensorSpec { name, shape };
        match *self {
            Slot::Shared => {
                let mut v = vec![t(
                    "model.embed_tokens.weight".into(),
                    vec![cfg.vocab_size, h],
                )];
                for l in 0..cfg.num_hidden_layers {
                    let p = format!("model.layers.{l}");
                    v.push(t(format!("{p}.input_layernorm.weight"), vec![h]));
                    v.push(t(format!("{p}.post_attention_layernorm.weight"), vec![h]));
                    v.push(t(
                        format!("{p}.self_attn.q_proj.weight"),
                        vec![cfg.q_dim(), h],
                    ));
                    v.push(t(
                        format!("{p}.self_attn.k_proj.weight"),
                        vec![cfg.kv_dim(), h],
                    ));
                    v.push(t(
                        format!("{p}.self_attn.v_proj.weight"),
                        vec![cfg.kv_dim(), h],
                    ));
                    v.push(t(
                        format!("{p}.self_attn.o_proj.weight"),
                        vec![h, cfg.q_dim()],
                    ));
                }
                v.push(t("model.norm.weight".into(), vec![h]));
                if !cfg.tie_word_embeddings {
                    v.push(t("lm_head.weight".into(), vec![cfg.vocab_size, h]));
                }
                v
            }
            Slot::Router { layer } => vec![t(
                format!("model.layers.{layer}.block_sparse_moe.gate.weight"),
                vec![cfg.num_local_experts, h],
            )],
            Slot::Expert { layer, expert } => {
                let p = format!("model.layers.{layer}.block_sparse_moe.experts.{expert}");
                let i = cfg.intermediate_size;
                vec![
                    t(format!("{p}.w1.weight"), vec![i, h]),
                    t(format!("{p}.w2.weight"), vec![h, i]),
                    t(format!("{p}.w3.weight"), vec![i, h]),
                ]
            }
        }
    }

    /// Which slot a Hugging Face tensor name belongs to (None if it is not a
    /// Mixtral tensor).
    pub fn of_tensor(name: &str) -> Option<Slot> {
        if let Some(rest) = name.strip_prefix("model.layers.") {
            let (l, tail) = rest.split_once('.')?;
            let layer = parse_index(l)?;
            if let Some(moe) = tail.strip_prefix("block_sparse_moe.") {
                if moe == "gate.weight" {
                    return Some(Slot::Router { layer });
                }
                let e = moe.strip_prefix("experts.")?;
                let (e, w) = e.split_once('.')?;
                let expert = parse_index(e)?;
                return matches!(w, "w1.weight" | "w2.weight" | "w3.weight")
                    .then_some(Slot::Expert { layer, expert });
            }
            return Some(Slot::Shared);
        }
        matches!(
            name,
            "model.embed_tokens.weight" | "model.norm.weight" | "lm_head.weight"
        )
        .then_some(Slot::Shared)
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Slot::Shared => write!(f, "shared"),
            Slot::Router { layer } => write!(f, "layer{layer}.router"),
            Slot::Expert { layer, expert } => write!(f, "layer{layer}.expert{expert}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in [
            "shared",
            "layer0.router",
            "layer3.expert7",
            "layer12.expert0",
        ] {
            assert_eq!(Slot::parse(s).unwrap().to_string(), s);
        }
        for s in [
            "",
            "layer",
            "layer01.router",
            "layer-1.router",
            "layer0.expert",
            "layer0.gate",
            "layer0.expert1.x",
            "Shared",
            "layer0.expert+1",
            "layer9999999.router",
        ] {
            assert!(Slot::parse(s).is_err(), "{s}");
        }
    }

    #[test]
    fn tensor_names_map_back_to_slots() {
        assert_eq!(
            Slot::of_tensor("model.layers.2.block_sparse_moe.experts.5.w2.weight"),
            Some(Slot::Expert {
                layer: 2,
                expert: 5
            })
        );
        assert_eq!(
            Slot::of_tensor("model.layers.1.block_sparse_moe.gate.weight"),
            Some(Slot::Router { layer: 1 })
        );
        assert_eq!(
            Slot::of_tensor("model.layers.1.self_attn.q_proj.weight"),
            Some(Slot::Shared)
        );
        assert_eq!(Slot::of_tensor("lm_head.weight"), Some(Slot::Shared));
        assert_eq!(Slot::of_tensor("something.else"), None);
    }
}
