//! Random Mixtral checkpoints for tests and benchmarks: a real Hugging Face
//! directory (`config.json` in Mixtral form, `model.safetensors` in F32 with
//! HF tensor names, `tokenizer.json` built with the `tokenizers` crate),
//! deterministic from a seed.

use safetensors::tensor::{Dtype, TensorView};
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::AddedToken;

use super::sampler::SplitMix64;
use super::{Config, Family, ModelError, Slot};

/// Special tokens of the random tokenizer: ids 0, 1, 2.
pub const BOS: &str = "<s>";
pub const EOS: &str = "</s>";
pub const UNK: &str = "<unk>";
/// 3 special tokens + 256 byte-level tokens.
pub const TOKENIZER_VOCAB: usize = 259;

/// A tiny Mixtral: 4 layers, 8 experts, top-2, hidden 32, 4 heads (2 KV
/// heads), intermediate 48, the random tokenizer's vocabulary.
pub fn tiny_config() -> Config {
    small_config(TOKENIZER_VOCAB, 32, 48, 4, 4, 2)
}

/// A Mixtral config with 8 experts, top-2, RoPE theta 1e4, no sliding window
/// and untied embeddings, for the given sizes.
pub fn small_config(
    vocab: usize,
    hidden: usize,
    intermediate: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
) -> Config {
    Config {
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: intermediate,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: Some(kv_heads),
        head_dim: None,
        max_position_embeddings: 1024,
        rms_norm_eps: 1e-5,
        rope_theta: Some(1e4),
        rope_parameters: None,
        num_experts_per_tok: 2,
        num_local_experts: 8,
        tie_word_embeddings: false,
        sliding_window: None,
        hidden_act: Some("silu".into()),
        bos_token_id: Some(0),
        eos_token_id: Some(1),
        model_type: Some("mixtral".into()),
        torch_dtype: Some("float32".into()),
        dtype: None,
        quantization_config: None,
        family_fields: Default::default(),
    }
}

/// A tiny config of `family` (Mixtral: [`tiny_config`] with 2 layers):
/// 2 layers, 8 experts, top-2, hidden 32, 4 heads (2 KV heads), the random
/// tokenizer's vocabulary. Routed experts are 24 wide for Qwen (48 for
/// Mixtral/OLMoE), the Qwen2-MoE shared expert 40; Qwen3-MoE has
/// head_dim 16 (not hidden / heads) and renormalised top-k, the others
/// `norm_topk_prob: false`.
pub fn tiny_family_config(family: Family) -> Config {
    let mut c = small_config(TOKENIZER_VOCAB, 32, 48, 2, 4, 2);
    c.model_type = Some(family.model_type().into());
    let f = &mut c.family_fields;
    match family {
        Family::Mixtral => {}
        Family::Olmoe => {
            f.num_experts = Some(8);
            f.norm_topk_prob = Some(false);
        }
        Family::Qwen2Moe | Family::Qwen3Moe => {
            f.num_experts = Some(8);
            f.moe_intermediate_size = Some(24);
            f.decoder_sparse_step = Some(1);
            f.mlp_only_layers = Some(Vec::new());
            if family == Family::Qwen2Moe {
                f.shared_expert_intermediate_size = Some(40);
                f.norm_topk_prob = Some(false);
            } else {
                f.norm_topk_prob = Some(true);
                c.head_dim = Some(16);
            }
        }
    }
    c
}

/// `config.json` bytes in the transformers 4.x form of the config's family.
pub fn config_json(cfg: &Config) -> Result<Vec<u8>, ModelError> {
    let mut v = serde_json::to_value(cfg).map_err(|e| ModelError::Config(e.to_string()))?;
    if let Some(m) = v.as_object_mut() {
        // Keep `sliding_window: null` (HF writes it); drop our other unset options.
        m.retain(|k, v| !v.is_null() || k == "sliding_window");
        m.insert(
            "architectures".into(),
            serde_json::json!([cfg.family().architecture()]),
        );
        m.entry("model_type").or_insert_with(|| "mixtral".into());
        m.insert("rope_theta".into(), serde_json::json!(cfg.rope_theta()));
        m.remove("rope_parameters");
        m.insert(
            "num_key_value_heads".into(),
            serde_json::json!(cfg.num_kv_heads()),
        );
    }
    serde_json::to_vec_pretty(&v).map_err(|e| ModelError::Config(e.to_string()))
}

/// GPT-2's byte -> printable char map.
fn byte_chars() -> Vec<char> {
    let mut bs: Vec<u32> = (u32::from(b'!')..=u32::from(b'~')).collect();
    bs.extend(0xA1..=0xAC);
    bs.extend(0xAE..=0xFF);
    let mut out = vec!['\0'; 256];
    for &b in &bs {
        out[b as usize] = char::from_u32(b).unwrap_or('\0');
    }
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            out[b as usize] = char::from_u32(256 + n).unwrap_or('\0');
            n += 1;
        }
    }
    out
}

/// A small real tokenizer: byte-level BPE over the 256 bytes (no merges), so
/// any UTF-8 text round-trips, with `<s>` (0, prepended by the
/// post-processor), `</s>` (1) and `<unk>` (2). Returns `tokenizer.json`.
pub fn tokenizer_json() -> Result<Vec<u8>, ModelError> {
    let terr = |e: String| ModelError::Tokenizer(e);
    let mut vocab = Vocab::default();
    vocab.insert(BOS.into(), 0);
    vocab.insert(EOS.into(), 1);
    vocab.insert(UNK.into(), 2);
    for (b, c) in byte_chars().into_iter().enumerate() {
        vocab.insert(c.to_string(), 3 + b as u32);
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, vec![])
        .unk_token(UNK.into())
        .build()
        .map_err(|e| terr(e.to_string()))?;
    let post = TemplateProcessing::builder()
        .try_single(format!("{BOS} $A"))
        .map_err(terr)?
        .special_tokens(vec![(BOS, 0)])
        .build()
        .map_err(|e| terr(e.to_string()))?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
        .with_decoder(Some(ByteLevel::default()))
        .with_post_processor(Some(post));
    tok.add_special_tokens(&[
        AddedToken::from(BOS, true),
        AddedToken::from(EOS, true),
        AddedToken::from(UNK, true),
    ]);
    tok.to_string(true)
        .map(String::into_bytes)
        .map_err(|e| terr(e.to_string()))
}

/// The three files of a random model, in memory.
#[derive(Debug, Clone)]
pub struct RandomModel {
    pub config_json: Vec<u8>,
    pub safetensors: Vec<u8>,
    pub tokenizer_json: Vec<u8>,
}

/// Random F32 weights for every tensor of `cfg`, deterministic from `seed`.
/// Scales keep activations and logits of order one (uniform with variance
/// `1/fan_in` for projections, 1 ± 0.1 for norms, ± 0.1 for biases).
pub fn random_tensors(cfg: &Config, seed: u64) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut rng = SplitMix64::new(seed);
    let mut out = Vec::new();
    for slot in Slot::all(cfg) {
        for spec in slot.tensors(cfg) {
            let n: usize = spec.shape.iter().product();
            let data: Vec<f32> = if spec.name.ends_with(".bias") {
                (0..n).map(|_| 0.1 * rng.uniform_pm1()).collect()
            } else if spec.shape.len() == 1 {
                (0..n).map(|_| 1.0 + 0.1 * rng.uniform_pm1()).collect()
            } else {
                let fan_in = spec.shape[1] as f32;
                let scale = if spec.name == "model.embed_tokens.weight" {
                    1.0
                } else if matches!(slot, Slot::Router { .. }) {
                    3.0 / fan_in.sqrt()
                } else {
                    3f32.sqrt() / fan_in.sqrt()
                };
                (0..n).map(|_| scale * rng.uniform_pm1()).collect()
            };
            out.push((spec.name, spec.shape, data));
        }
    }
    out
}

/// safetensors bytes (F32) for named tensors.
pub fn safetensors_bytes(
    tensors: &[(String, Vec<usize>, Vec<f32>)],
) -> Result<Vec<u8>, ModelError> {
    let raw: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, d)| {
            (
                n.clone(),
                s.clone(),
                d.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views = raw
        .iter()
        .map(|(n, s, b)| {
            TensorView::new(Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| ModelError::Safetensors(format!("{e:?}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    safetensors::tensor::serialize(views, &None)
        .map_err(|e| ModelError::Safetensors(format!("{e:?}")))
}

/// The files of a random model for `cfg`, deterministic from `seed` (no
/// filesystem needed: works in wasm).
pub fn random_model_bytes(cfg: &Config, seed: u64) -> Result<RandomModel, ModelError> {
    cfg.validate()?;
    Ok(RandomModel {
        config_json: config_json(cfg)?,
        safetensors: safetensors_bytes(&random_tensors(cfg, seed))?,
        tokenizer_json: tokenizer_json()?,
    })
}

/// Write a random model as a Hugging Face directory (created if missing).
#[cfg(not(target_arch = "wasm32"))]
pub fn write_random_model(
    dir: impl AsRef<std::path::Path>,
    cfg: &Config,
    seed: u64,
) -> Result<(), ModelError> {
    let dir = dir.as_ref();
    let m = random_model_bytes(cfg, seed)?;
    let io = |e: std::io::Error| ModelError::Io(format!("{}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(io)?;
    std::fs::write(dir.join("config.json"), &m.config_json).map_err(io)?;
    std::fs::write(dir.join("model.safetensors"), &m.safetensors).map_err(io)?;
    std::fs::write(dir.join("tokenizer.json"), &m.tokenizer_json).map_err(io)?;
    Ok(())
}

/// The safetensors header of an F32 payload for `slot` (the tensor data,
/// zeros or anything, follows it) and the whole payload's length: for
/// streaming large test payloads from a generator.
pub fn slot_safetensors_prefix(cfg: &Config, slot: Slot) -> (Vec<u8>, u64) {
    let mut entries = Vec::new();
    let mut at = 0u64;
    for t in slot.tensors(cfg) {
        let n = t.shape.iter().product::<usize>() as u64 * 4;
        entries.push(format!(
            "{:?}:{{\"dtype\":\"F32\",\"shape\":{:?},\"data_offsets\":[{at},{}]}}",
            t.name,
            t.shape,
            at + n
        ));
        at += n;
    }
    let mut json = format!("{{{}}}", entries.join(",")).into_bytes();
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut prefix = (json.len() as u64).to_le_bytes().to_vec();
    prefix.extend_from_slice(&json);
    let len = prefix.len() as u64 + at;
    (prefix, len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tokenizer::Tokenizer;

    #[test]
    fn tokenizer_round_trips_text() {
        let t = Tokenizer::from_bytes(&tokenizer_json().unwrap()).unwrap();
        assert_eq!(t.vocab_size(), TOKENIZER_VOCAB);
        let ids = t.encode("Hello, wörld!").unwrap();
        assert_eq!(ids[0], 0);
        assert_eq!(ids.len(), 1 + "Hello, wörld!".len());
        assert_eq!(t.decode(&ids).unwrap(), "Hello, wörld!");
        assert_eq!(t.token_to_id(EOS), Some(1));
    }

    #[test]
    fn deterministic_from_seed() {
        let c = tiny_config();
        let a = random_model_bytes(&c, 7).unwrap();
        let b = random_model_bytes(&c, 7).unwrap();
        let d = random_model_bytes(&c, 8).unwrap();
        assert_eq!(a.safetensors, b.safetensors);
        assert_ne!(a.safetensors, d.safetensors);
        assert_eq!(Config::from_json(&a.config_json).unwrap(), c);
    }

    #[test]
    fn family_configs_round_trip_through_config_json() {
        for f in Family::ALL {
            let c = tiny_family_config(f);
            let m = random_model_bytes(&c, 3).unwrap();
            let back = Config::from_json(&m.config_json).unwrap();
            assert_eq!(back, c, "{f:?}");
            assert_eq!(back.family(), f);
            let v: serde_json::Value = serde_json::from_slice(&m.config_json).unwrap();
            assert_eq!(v["architectures"][0], f.architecture());
        }
    }
}
