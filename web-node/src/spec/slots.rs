//! Chain-B slots (`shared`, `layerN.router`, `layerN.expertM`, and for
//! families with one `layerN.shared_expert`) and the exact Hugging Face
//! tensors each one holds under a given [`Config`] (names per
//! [`super::Family`]).

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
    /// The shared expert of one layer and its sigmoid gate (Qwen2-MoE): it
    /// runs for every token, so a node holds it with the router.
    SharedExpert { layer: usize },
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
        if tail == "shared_expert" {
            return Ok(Slot::SharedExpert { layer });
        }
        let e = tail.strip_prefix("expert").ok_or_else(err)?;
        let expert = parse_index(e).ok_or_else(err)?;
        Ok(Slot::Expert { layer, expert })
    }

    /// The layer this slot belongs to (None for `shared`).
    pub fn layer(&self) -> Option<usize> {
        match *self {
            Slot::Shared => None,
            Slot::Router { layer } | Slot::Expert { layer, .. } | Slot::SharedExpert { layer } => {
                Some(layer)
            }
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
        if matches!(self, Slot::SharedExpert { .. }) && !cfg.family().has_shared_expert() {
            return Err(out(format!(
                "model_type {} has no shared expert",
                cfg.family().model_type()
            )));
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
    /// router, the shared expert (families with one) and the experts.
    pub fn all(cfg: &Config) -> Vec<Slot> {
        let shared_expert = cfg.family().has_shared_expert();
        let mut v = vec![Slot::Shared];
        for layer in 0..cfg.num_hidden_layers {
            v.push(Slot::Router { layer });
            if shared_expert {
                v.push(Slot::SharedExpert { layer });
            }
            for expert in 0..cfg.num_local_experts {
                v.push(Slot::Expert { layer, expert });
            }
        }
        v
    }

    /// The slots a node needs before it can run (everything but the routed
    /// experts), in [`Slot::all`] order.
    pub fn always_needed(cfg: &Config) -> Vec<Slot> {
        Slot::all(cfg)
            .into_iter()
            .filter(|s| !matches!(s, Slot::Expert { .. }))
            .collect()
    }

    /// The exact tensors (Hugging Face names and shapes) this slot holds
    /// (empty for a slot the config's family does not have; see
    /// [`Slot::check_in_spec`]).
    pub fn tensors(&self, cfg: &Config) -> Vec<TensorSpec> {
        let h = cfg.hidden_size;
        let family = cfg.family();
        let moe = family.moe_module();
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
                    for (name, shape) in super::family::attention_extras(cfg) {
                        v.push(t(format!("{p}.self_attn.{name}"), vec![shape]));
                    }
                }
                v.push(t("model.norm.weight".into(), vec![h]));
                if !cfg.tie_word_embeddings {
                    v.push(t("lm_head.weight".into(), vec![cfg.vocab_size, h]));
                }
                v
            }
            Slot::Router { layer } => vec![t(
                format!("model.layers.{layer}.{moe}.gate.weight"),
                vec![cfg.num_local_experts, h],
            )],
            Slot::Expert { layer, expert } => {
                let p = format!("model.layers.{layer}.{moe}.experts.{expert}");
                let i = cfg.expert_intermediate_size();
                let [gate, down, up] = family.expert_proj_names();
                vec![
                    t(format!("{p}.{gate}.weight"), vec![i, h]),
                    t(format!("{p}.{down}.weight"), vec![h, i]),
                    t(format!("{p}.{up}.weight"), vec![i, h]),
                ]
            }
            Slot::SharedExpert { layer } => {
                let Some(i) = cfg.shared_expert_intermediate_size() else {
                    return Vec::new();
                };
                let p = format!("model.layers.{layer}.{moe}");
                vec![
                    t(format!("{p}.shared_expert.gate_proj.weight"), vec![i, h]),
                    t(format!("{p}.shared_expert.down_proj.weight"), vec![h, i]),
                    t(format!("{p}.shared_expert.up_proj.weight"), vec![i, h]),
                    t(format!("{p}.shared_expert_gate.weight"), vec![1, h]),
                ]
            }
        }
    }

    /// Which slot a Hugging Face tensor name belongs to, for any family
    /// (None if it is no family's tensor). Whether the name is one the
    /// config's family has is [`Slot::tensors`]' business.
    pub fn of_tensor(name: &str) -> Option<Slot> {
        if let Some(rest) = name.strip_prefix("model.layers.") {
            let (l, tail) = rest.split_once('.')?;
            let layer = parse_index(l)?;
            if let Some(moe) = tail.strip_prefix("mlp.") {
                if moe == "gate.weight" {
                    return Some(Slot::Router { layer });
                }
                if moe == "shared_expert_gate.weight" {
                    return Some(Slot::SharedExpert { layer });
                }
                if let Some(w) = moe.strip_prefix("shared_expert.") {
                    return matches!(
                        w,
                        "gate_proj.weight" | "up_proj.weight" | "down_proj.weight"
                    )
                    .then_some(Slot::SharedExpert { layer });
                }
                let e = moe.strip_prefix("experts.")?;
                let (e, w) = e.split_once('.')?;
                let expert = parse_index(e)?;
                return matches!(
                    w,
                    "gate_proj.weight" | "up_proj.weight" | "down_proj.weight"
                )
                .then_some(Slot::Expert { layer, expert });
            }
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
            Slot::SharedExpert { layer } => write!(f, "layer{layer}.shared_expert"),
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
            "layer0.shared_expert",
            "layer5.shared_expert",
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
            "layer0.shared_expert0",
            "layer01.shared_expert",
            "layer0.shared",
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
        assert_eq!(
            Slot::of_tensor("model.layers.3.mlp.experts.7.down_proj.weight"),
            Some(Slot::Expert {
                layer: 3,
                expert: 7
            })
        );
        assert_eq!(
            Slot::of_tensor("model.layers.0.mlp.gate.weight"),
            Some(Slot::Router { layer: 0 })
        );
        for n in [
            "model.layers.4.mlp.shared_expert.up_proj.weight",
            "model.layers.4.mlp.shared_expert_gate.weight",
        ] {
            assert_eq!(Slot::of_tensor(n), Some(Slot::SharedExpert { layer: 4 }));
        }
        assert_eq!(
            Slot::of_tensor("model.layers.1.self_attn.q_norm.weight"),
            Some(Slot::Shared)
        );
        assert_eq!(
            Slot::of_tensor("model.layers.1.mlp.experts.2.w1.weight"),
            None
        );
        assert_eq!(Slot::of_tensor("model.layers.1.mlp.shared_expert.x"), None);
        assert_eq!(Slot::of_tensor("something.else"), None);
    }
}
