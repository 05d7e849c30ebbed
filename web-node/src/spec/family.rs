//! Model families: which Hugging Face MoE layout a checkpoint uses, read from
//! `config.json`'s `model_type` (absent means Mixtral). Each family fixes
//! the tensor names of its slots, the config fields it reads and the pieces
//! of its forward (q/k bias, q/k RMSNorm, shared expert, top-k rule).
//!
//! | family      | `model_type` | MoE tensors                        | attention extras                |
//! |-------------|--------------|------------------------------------|---------------------------------|
//! | Mixtral     | `mixtral`    | `block_sparse_moe.{gate,experts.E.w1/w2/w3}` | none                  |
//! | OLMoE       | `olmoe`      | `mlp.{gate,experts.E.gate/up/down_proj}`     | q/k RMSNorm over the whole projection |
//! | Qwen2-MoE   | `qwen2_moe`  | as OLMoE + `mlp.shared_expert.*`, `mlp.shared_expert_gate` | q/k/v bias |
//! | Qwen3-MoE   | `qwen3_moe`  | as OLMoE                                     | q/k RMSNorm per head  |

use serde::{Deserialize, Serialize};

use super::SpecError;

/// A supported MoE family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    Mixtral,
    Olmoe,
    Qwen2Moe,
    Qwen3Moe,
}

/// How a family normalises queries and keys before RoPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNorm {
    /// No q/k norm (Mixtral, Qwen2-MoE).
    None,
    /// One RMSNorm over the whole q (`[heads * head_dim]`) and the whole k
    /// (`[kv_heads * head_dim]`) projection output (OLMoE).
    Whole,
    /// RMSNorm over each head (`[head_dim]`), one weight shared by all heads
    /// (Qwen3-MoE).
    PerHead,
}

impl Family {
    pub const ALL: [Family; 4] = [
        Family::Mixtral,
        Family::Olmoe,
        Family::Qwen2Moe,
        Family::Qwen3Moe,
    ];

    /// The family of a `model_type` (None: Mixtral, as before families).
    pub fn from_model_type(model_type: Option<&str>) -> Result<Self, SpecError> {
        match model_type {
            None | Some("mixtral") => Ok(Family::Mixtral),
            Some("olmoe") => Ok(Family::Olmoe),
            Some("qwen2_moe") => Ok(Family::Qwen2Moe),
            Some("qwen3_moe") => Ok(Family::Qwen3Moe),
            Some(other) => Err(SpecError::Config(format!(
                "model_type {other:?} is not supported (mixtral, olmoe, qwen2_moe, qwen3_moe)"
            ))),
        }
    }

    pub fn model_type(&self) -> &'static str {
        match self {
            Family::Mixtral => "mixtral",
            Family::Olmoe => "olmoe",
            Family::Qwen2Moe => "qwen2_moe",
            Family::Qwen3Moe => "qwen3_moe",
        }
    }

    /// The transformers class name (`architectures` in `config.json`).
    pub fn architecture(&self) -> &'static str {
        match self {
            Family::Mixtral => "MixtralForCausalLM",
            Family::Olmoe => "OlmoeForCausalLM",
            Family::Qwen2Moe => "Qwen2MoeForCausalLM",
            Family::Qwen3Moe => "Qwen3MoeForCausalLM",
        }
    }

    /// The module holding a layer's router and experts.
    pub fn moe_module(&self) -> &'static str {
        match self {
            Family::Mixtral => "block_sparse_moe",
            _ => "mlp",
        }
    }

    /// Names of a routed expert's (gate, down, up) projections: Mixtral's
    /// (w1, w2, w3).
    pub fn expert_proj_names(&self) -> [&'static str; 3] {
        match self {
            Family::Mixtral => ["w1", "w2", "w3"],
            _ => ["gate_proj", "down_proj", "up_proj"],
        }
    }

    /// Whether each MoE layer has a shared expert with a sigmoid gate.
    pub fn has_shared_expert(&self) -> bool {
        matches!(self, Family::Qwen2Moe)
    }

    pub fn qk_norm(&self) -> QkNorm {
        match self {
            Family::Olmoe => QkNorm::Whole,
            Family::Qwen3Moe => QkNorm::PerHead,
            Family::Mixtral | Family::Qwen2Moe => QkNorm::None,
        }
    }

    /// Whether the family reads the expert count from `num_experts` (HF
    /// Qwen/OLMoE) rather than `num_local_experts` (Mixtral); both are
    /// accepted for every family.
    fn uses_moe_intermediate(&self) -> bool {
        matches!(self, Family::Qwen2Moe | Family::Qwen3Moe)
    }
}

/// The `config.json` fields beyond Mixtral's that the families read. All
/// optional: a Mixtral config has none of them and serialises unchanged.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FamilyFields {
    /// Qwen/OLMoE name of `num_local_experts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_experts: Option<usize>,
    /// Qwen: the routed experts' intermediate size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moe_intermediate_size: Option<usize>,
    /// Qwen2-MoE: the shared expert's intermediate size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_expert_intermediate_size: Option<usize>,
    /// Renormalise the top-k routing weights (OLMoE/Qwen; default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub norm_topk_prob: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decoder_sparse_step: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlp_only_layers: Option<Vec<usize>>,
    /// OLMoE/Qwen3-MoE: bias on q/k/v/o (only false is supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_bias: Option<bool>,
    /// Qwen2-MoE: bias on q/k/v (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qkv_bias: Option<bool>,
    /// OLMoE: clamp q/k/v (only null is supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_qkv: Option<f64>,
    /// Qwen: sliding-window attention (only false is supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_sliding_window: Option<bool>,
    /// transformers 4.x RoPE scaling (only null is supported for the new
    /// families).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
}

fn refuse(field: &str, why: String) -> SpecError {
    SpecError::Config(format!("{field}: {why}"))
}

/// Family-level facts of a parsed config (what [`super::Config`] exposes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FamilyShape {
    pub family: Family,
    /// Intermediate size of a routed expert.
    pub expert_intermediate: usize,
    /// Intermediate size of the shared expert (Qwen2-MoE).
    pub shared_intermediate: Option<usize>,
    /// Whether q/k/v projections have biases.
    pub qkv_bias: bool,
    /// Whether the top-k routing weights are renormalised to sum to one.
    pub renormalize: bool,
}

impl FamilyFields {
    /// The expert count given by `num_experts` / `num_local_experts` (0 when
    /// neither); both present and different is an error naming both.
    pub fn expert_count(&self, num_local_experts: Option<usize>) -> Result<usize, SpecError> {
        match (num_local_experts, self.num_experts) {
            (Some(a), Some(b)) if a != b => Err(SpecError::Config(format!(
                "num_local_experts {a} and num_experts {b} disagree"
            ))),
            (Some(a), _) | (None, Some(a)) => Ok(a),
            (None, None) => Err(SpecError::Config(
                "num_local_experts (or num_experts) is missing".into(),
            )),
        }
    }

    /// Check the fields against the family and derive its shape. Every
    /// layout transformers would build that this engine does not run is
    /// refused with an error naming the field.
    pub fn shape(
        &self,
        family: Family,
        intermediate_size: usize,
        num_layers: usize,
        hidden: usize,
        heads: usize,
        head_dim: Option<usize>,
    ) -> Result<FamilyShape, SpecError> {
        use super::config::limits::MAX_INTERMEDIATE;
        let in_range = |field: &str, v: usize| {
            if v == 0 || v > MAX_INTERMEDIATE {
                Err(refuse(
                    field,
                    format!("{v} out of range 1..={MAX_INTERMEDIATE}"),
                ))
            } else {
                Ok(v)
            }
        };
        if family == Family::Mixtral {
            return Ok(FamilyShape {
                family,
                expert_intermediate: intermediate_size,
                shared_intermediate: None,
                qkv_bias: false,
                renormalize: true,
            });
        }
        // Which layers are sparse (transformers): layer l is an MoE layer iff
        // l is not in mlp_only_layers and (l + 1) % decoder_sparse_step == 0;
        // a dense-MLP layer is not supported.
        if family != Family::Olmoe {
            match self.decoder_sparse_step {
                None | Some(1) => {}
                Some(s) => {
                    return Err(refuse(
                        "decoder_sparse_step",
                        format!("{s} would make some layers dense MLPs; only 1 is supported"),
                    ))
                }
            }
            if let Some(l) = self
                .mlp_only_layers
                .iter()
                .flatten()
                .find(|&&l| l < num_layers)
            {
                return Err(refuse(
                    "mlp_only_layers",
                    format!("layer {l} would be a dense MLP; only [] is supported"),
                ));
            }
        }
        if family == Family::Olmoe {
            if let Some(c) = self.clip_qkv {
                return Err(refuse(
                    "clip_qkv",
                    format!("{c} is not supported (only null)"),
                ));
            }
        }
        if matches!(family, Family::Olmoe | Family::Qwen3Moe) && self.attention_bias == Some(true) {
            return Err(refuse(
                "attention_bias",
                "true is not supported (only false)".into(),
            ));
        }
        if self.use_sliding_window == Some(true) {
            return Err(refuse(
                "use_sliding_window",
                "true is not supported (only false)".into(),
            ));
        }
        if self.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(refuse(
                "rope_scaling",
                "RoPE scaling is not supported (only null)".into(),
            ));
        }
        // OLMoE and Qwen2-MoE derive head_dim from hidden / heads.
        if matches!(family, Family::Olmoe | Family::Qwen2Moe) {
            if let Some(hd) = head_dim {
                if heads == 0 || hd * heads != hidden {
                    return Err(refuse(
                        "head_dim",
                        format!(
                            "{hd} must equal hidden_size / num_attention_heads for {}",
                            family.model_type()
                        ),
                    ));
                }
            }
        }
        let expert_intermediate = if family.uses_moe_intermediate() {
            in_range(
                "moe_intermediate_size",
                self.moe_intermediate_size.ok_or_else(|| {
                    refuse(
                        "moe_intermediate_size",
                        format!("missing (required for {})", family.model_type()),
                    )
                })?,
            )?
        } else {
            intermediate_size
        };
        let shared_intermediate = if family.has_shared_expert() {
            Some(in_range(
                "shared_expert_intermediate_size",
                self.shared_expert_intermediate_size.ok_or_else(|| {
                    refuse(
                        "shared_expert_intermediate_size",
                        format!("missing (required for {})", family.model_type()),
                    )
                })?,
            )?)
        } else {
            None
        };
        Ok(FamilyShape {
            family,
            expert_intermediate,
            shared_intermediate,
            qkv_bias: family == Family::Qwen2Moe && self.qkv_bias.unwrap_or(true),
            renormalize: self.norm_topk_prob.unwrap_or(false),
        })
    }
}

/// The extra per-layer attention tensors of the config's family, as
/// (name under `self_attn.`, length), in the order the `shared` slot lists
/// them after `o_proj`: q/k norms (OLMoE whole-projection, Qwen3-MoE per
/// head) or q/k/v biases (Qwen2-MoE).
pub fn attention_extras(cfg: &super::Config) -> Vec<(&'static str, usize)> {
    let mut v = Vec::new();
    match cfg.family().qk_norm() {
        QkNorm::None => {}
        QkNorm::Whole => {
            v.push(("q_norm.weight", cfg.q_dim()));
            v.push(("k_norm.weight", cfg.kv_dim()));
        }
        QkNorm::PerHead => {
            v.push(("q_norm.weight", cfg.head_dim()));
            v.push(("k_norm.weight", cfg.head_dim()));
        }
    }
    if cfg.qkv_bias() {
        v.push(("q_proj.bias", cfg.q_dim()));
        v.push(("k_proj.bias", cfg.kv_dim()));
        v.push(("v_proj.bias", cfg.kv_dim()));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_types_round_trip_and_unknown_is_refused() {
        for f in Family::ALL {
            assert_eq!(Family::from_model_type(Some(f.model_type())).unwrap(), f);
        }
        assert_eq!(Family::from_model_type(None).unwrap(), Family::Mixtral);
        let e = Family::from_model_type(Some("llama"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("model_type") && e.contains("llama"), "{e}");
    }
}
