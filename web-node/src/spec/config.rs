//! Hugging Face MoE `config.json` (Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE;
//! see [`super::family`]), read as it is (transformers 4.x and 5.x forms).

use serde::{Deserialize, Serialize};

use super::family::{Family, FamilyFields, FamilyShape};
use super::SpecError;

fn default_rope_theta() -> f64 {
    1e6
}
fn default_rms_eps() -> f64 {
    1e-5
}
fn default_max_pos() -> usize {
    4096
}
fn default_top_k() -> usize {
    2
}

/// transformers 5.x nests the RoPE base here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeParameters {
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_type: Option<String>,
}

/// The fields of a Mixtral `config.json` the engine needs. Unknown fields are
/// ignored here; the verbatim JSON travels in the chain-A meta block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// `null` in transformers 5.x means `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    /// transformers 4.x: top level.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// transformers 5.x: `rope_parameters.rope_theta`.
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    #[serde(default = "default_top_k")]
    pub num_experts_per_tok: usize,
    /// Experts per layer. Qwen/OLMoE configs call it `num_experts`
    /// ([`FamilyFields::num_experts`]); [`Config::from_json`] fills this
    /// field from either.
    #[serde(default)]
    pub num_local_experts: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub hidden_act: Option<String>,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    #[serde(default)]
    pub model_type: Option<String>,
    /// transformers 4.x: `torch_dtype`; 5.x: `dtype`.
    #[serde(default)]
    pub torch_dtype: Option<String>,
    #[serde(default)]
    pub dtype: Option<String>,
    /// transformers' field for quantized checkpoints. AI-Block's quantized
    /// models carry `{"quant_method": "aiblock", "format": "q8_0" | "q4_0",
    /// "group_size": 32, "source_meta": "<hex>"}`: their expert blocks are in
    /// that format, everything else stays float. Any other method is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization_config: Option<serde_json::Value>,
    /// The fields only the non-Mixtral families read (all absent for Mixtral).
    #[serde(flatten)]
    pub family_fields: FamilyFields,
}

/// Upper bounds a config must respect before anything is allocated from it.
pub mod limits {
    /// Largest vocabulary accepted (Mixtral has 32 000, newer tokenizers ~256 k).
    pub const MAX_VOCAB: usize = 1 << 20;
    /// Largest hidden size accepted (Mixtral 8x22B uses 6 144).
    pub const MAX_HIDDEN: usize = 1 << 16;
    /// Largest expert intermediate size accepted.
    pub const MAX_INTERMEDIATE: usize = 1 << 18;
    /// Most layers accepted.
    pub const MAX_LAYERS: usize = 1024;
    /// Most experts per layer accepted.
    pub const MAX_EXPERTS: usize = 1024;
    /// Most attention heads accepted.
    pub const MAX_HEADS: usize = 1024;
}

impl Config {
    /// Parse `config.json` bytes and check that the shapes are consistent.
    pub fn from_json(bytes: &[u8]) -> Result<Self, SpecError> {
        let cfg: Config =
            serde_json::from_slice(bytes).map_err(|e| SpecError::Config(e.to_string()))?;
        cfg.normalized()
    }

    /// Parse an already decoded JSON value.
    pub fn from_value(v: &serde_json::Value) -> Result<Self, SpecError> {
        let cfg: Config = Config::deserialize(v).map_err(|e| SpecError::Config(e.to_string()))?;
        cfg.normalized()
    }

    /// Fill `num_local_experts` from `num_experts` (Qwen/OLMoE name), then
    /// validate.
    fn normalized(mut self) -> Result<Self, SpecError> {
        let given = (self.num_local_experts != 0).then_some(self.num_local_experts);
        self.num_local_experts = self.family_fields.expert_count(given)?;
        self.validate()?;
        Ok(self)
    }

    /// The model family (`model_type`). On a config that failed
    /// [`Config::validate`] an unknown `model_type` reads as Mixtral.
    pub fn family(&self) -> Family {
        Family::from_model_type(self.model_type.as_deref()).unwrap_or(Family::Mixtral)
    }

    /// The family and the sizes and rules it implies, checked.
    pub fn family_shape(&self) -> Result<FamilyShape, SpecError> {
        let family = Family::from_model_type(self.model_type.as_deref())?;
        self.family_fields.shape(
            family,
            self.intermediate_size,
            self.num_hidden_layers,
            self.hidden_size,
            self.num_attention_heads,
            self.head_dim,
        )
    }

    /// Intermediate size of one routed expert (`moe_intermediate_size` for
    /// Qwen, `intermediate_size` otherwise).
    pub fn expert_intermediate_size(&self) -> usize {
        self.family_shape()
            .map_or(self.intermediate_size, |s| s.expert_intermediate)
    }

    /// Intermediate size of the shared expert (Qwen2-MoE), None otherwise.
    pub fn shared_expert_intermediate_size(&self) -> Option<usize> {
        self.family_shape().ok().and_then(|s| s.shared_intermediate)
    }

    /// Whether q/k/v projections carry biases (Qwen2-MoE).
    pub fn qkv_bias(&self) -> bool {
        self.family_shape().is_ok_and(|s| s.qkv_bias)
    }

    /// Whether the top-k routing weights are renormalised to sum to one
    /// (always for Mixtral, `norm_topk_prob` for the others).
    pub fn renormalize_top_k(&self) -> bool {
        self.family_shape().map_or(true, |s| s.renormalize)
    }

    pub fn validate(&self) -> Result<(), SpecError> {
        use limits::*;
        let bad = |m: String| Err(SpecError::Config(m));
        if self.vocab_size == 0 || self.vocab_size > MAX_VOCAB {
            return bad(format!(
                "vocab_size {} out of range 1..={MAX_VOCAB}",
                self.vocab_size
            ));
        }
        if self.hidden_size == 0 || self.hidden_size > MAX_HIDDEN {
            return bad(format!("hidden_size {} out of range", self.hidden_size));
        }
        if self.intermediate_size == 0 || self.intermediate_size > MAX_INTERMEDIATE {
            return bad(format!(
                "intermediate_size {} out of range",
                self.intermediate_size
            ));
        }
        if self.num_hidden_layers == 0 || self.num_hidden_layers > MAX_LAYERS {
            return bad(format!(
                "num_hidden_layers {} out of range",
                self.num_hidden_layers
            ));
        }
        if self.num_local_experts == 0 || self.num_local_experts > MAX_EXPERTS {
            return bad(format!(
                "num_local_experts (or num_experts) {} out of range 1..={MAX_EXPERTS}",
                self.num_local_experts
            ));
        }
        if let Some(n) = self.family_fields.num_experts {
            if n != self.num_local_experts {
                return bad(format!(
                    "num_experts {n} and num_local_experts {} disagree",
                    self.num_local_experts
                ));
            }
        }
        if self.num_experts_per_tok == 0 || self.num_experts_per_tok > self.num_local_experts {
            return bad(format!(
                "num_experts_per_tok {} must be in 1..={}",
                self.num_experts_per_tok, self.num_local_experts
            ));
        }
        if self.num_attention_heads == 0 || self.num_attention_heads > MAX_HEADS {
            return bad(format!(
                "num_attention_heads {} out of range",
                self.num_attention_heads
            ));
        }
        let kv = self.num_kv_heads();
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            return bad(format!(
                "num_key_value_heads {kv} must divide num_attention_heads {}",
                self.num_attention_heads
            ));
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad("hidden_size must be a multiple of num_attention_heads".into());
        }
        let hd = self.head_dim();
        if hd == 0 || !hd.is_multiple_of(2) || hd > MAX_HIDDEN {
            return bad(format!("head_dim {hd} must be even and non-zero"));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return bad("rms_norm_eps must be positive".into());
        }
        let theta = self.rope_theta();
        if !(theta.is_finite() && theta > 1.0) {
            return bad(format!("rope_theta {theta} must be > 1"));
        }
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                return bad(format!("hidden_act {act:?} is not supported (only silu)"));
            }
        }
        self.expert_quant()?;
        if self.family_shape()?.family != Family::Mixtral {
            let rope_type = self
                .rope_parameters
                .as_ref()
                .and_then(|p| p.rope_type.as_deref());
            if let Some(t) = rope_type.filter(|t| *t != "default") {
                return bad(format!(
                    "rope_parameters.rope_type {t:?} is not supported (only \"default\")"
                ));
            }
        }
        Ok(())
    }

    /// The format of this model's expert blocks: `None` for float models,
    /// `Some` for AI-Block quantized ones (see `quantization_config`).
    pub fn expert_quant(&self) -> Result<Option<super::quant::QuantFormat>, SpecError> {
        let Some(q) = &self.quantization_config else {
            return Ok(None);
        };
        let bad = |m: String| Err(SpecError::Config(m));
        let field = |k: &str| q.get(k).and_then(|v| v.as_str());
        match field("quant_method") {
            Some("aiblock") => {}
            other => {
                return bad(format!(
                    "quantization_config.quant_method {other:?} is not supported (only \"aiblock\": q8_0 or q4_0 expert blocks)"
                ))
            }
        }
        let Some(format) = field("format").and_then(super::quant::QuantFormat::parse) else {
            return bad(format!(
                "quantization_config.format {:?} is not q8_0 or q4_0",
                q.get("format")
            ));
        };
        if q.get("group_size").and_then(|v| v.as_u64()) != Some(super::quant::GROUP as u64) {
            return bad(format!(
                "quantization_config.group_size {:?} must be {}",
                q.get("group_size"),
                super::quant::GROUP
            ));
        }
        for (what, cols) in [
            ("hidden_size", self.hidden_size),
            (
                "the expert intermediate size",
                self.expert_intermediate_size(),
            ),
        ] {
            if !cols.is_multiple_of(super::quant::GROUP) {
                return bad(format!(
                    "{what} {cols} is not a multiple of the quantization group size {}",
                    super::quant::GROUP
                ));
            }
        }
        Ok(Some(format))
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    pub fn rope_theta(&self) -> f64 {
        self.rope_theta
            .or_else(|| self.rope_parameters.as_ref().and_then(|p| p.rope_theta))
            .unwrap_or_else(default_rope_theta)
    }

    /// Width of the query projection output.
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim()
    }

    /// Width of each of the key/value projection outputs.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads() * self.head_dim()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V4: &str = r#"{"architectures":["MixtralForCausalLM"],"model_type":"mixtral",
        "vocab_size":32000,"hidden_size":4096,"intermediate_size":14336,"num_hidden_layers":32,
        "num_attention_heads":32,"num_key_value_heads":8,"max_position_embeddings":32768,
        "rms_norm_eps":1e-5,"rope_theta":1000000.0,"num_experts_per_tok":2,"num_local_experts":8,
        "tie_word_embeddings":false,"sliding_window":null,"torch_dtype":"bfloat16","hidden_act":"silu",
        "router_aux_loss_coef":0.02}"#;
    const V5: &str = r#"{"architectures":["MixtralForCausalLM"],"model_type":"mixtral",
        "vocab_size":100,"hidden_size":64,"intermediate_size":96,"num_hidden_layers":4,
        "num_attention_heads":4,"num_key_value_heads":2,"head_dim":null,
        "rope_parameters":{"rope_theta":10000.0,"rope_type":"default"},"dtype":"float32",
        "num_experts_per_tok":2,"num_local_experts":8}"#;

    #[test]
    fn reads_transformers_4_config() {
        let c = Config::from_json(V4.as_bytes()).unwrap();
        assert_eq!(c.head_dim(), 128);
        assert_eq!(c.kv_dim(), 1024);
        assert_eq!(c.rope_theta(), 1e6);
    }

    #[test]
    fn reads_transformers_5_config() {
        let c = Config::from_json(V5.as_bytes()).unwrap();
        assert_eq!(c.head_dim(), 16);
        assert_eq!(c.rope_theta(), 1e4);
        assert_eq!(c.num_kv_heads(), 2);
    }

    #[test]
    fn rejects_inconsistent_heads() {
        let bad = V5.replace("\"num_key_value_heads\":2", "\"num_key_value_heads\":3");
        assert!(Config::from_json(bad.as_bytes()).is_err());
        let bad = V5.replace("\"num_experts_per_tok\":2", "\"num_experts_per_tok\":9");
        assert!(Config::from_json(bad.as_bytes()).is_err());
        assert!(Config::from_json(b"{not json").is_err());
    }
}
