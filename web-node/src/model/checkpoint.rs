//! Checkpoint <-> blocks: split a Hugging Face Mixtral safetensors
//! checkpoint into one payload per slot (exactly the tensors
//! [`Slot::tensors`] names, bytes untouched), join slot payloads back into
//! one checkpoint, and sign blocks for them.

use std::collections::{BTreeMap, HashMap};

use ed25519_dalek::SigningKey;
use safetensors::tensor::TensorView;
use safetensors::SafeTensors;

use super::{Config, ModelError, Slot, TensorSpec};
use crate::chain::{
    parse_safetensors, payload_dtype_of, Block, BlockBuilder, BlockHash, ChainError, MetaPayload,
    PayloadDtype,
};

/// One slot's payload (a safetensors file holding exactly the slot's tensors).
#[derive(Debug, Clone, PartialEq)]
pub struct SlotPayload {
    pub slot: Slot,
    pub dtype: PayloadDtype,
    pub tensors: Vec<TensorSpec>,
    pub bytes: Vec<u8>,
}

fn st_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Safetensors(e.to_string())
}

fn parse(bytes: &[u8]) -> Result<SafeTensors<'_>, ModelError> {
    parse_safetensors(bytes).map_err(st_err)
}

/// Split checkpoint shards into per-slot payloads, in [`Slot::all`] order.
/// Refuses tensors that are not Mixtral tensors, slots outside the config,
/// missing tensors, shapes that differ from what the config implies, and
/// unsupported or mixed dtypes within a slot.
pub fn split_checkpoint(cfg: &Config, shards: &[&[u8]]) -> Result<Vec<SlotPayload>, ModelError> {
    plan_checkpoint(cfg, shards)?
        .into_iter()
        .map(SlotPlan::payload)
        .collect()
}

/// One slot of a checked checkpoint: its tensors as views into the shards,
/// not yet copied into a payload.
#[derive(Debug)]
pub struct SlotPlan<'a> {
    pub slot: Slot,
    dtype: PayloadDtype,
    tensors: Vec<TensorSpec>,
    views: Vec<(String, TensorView<'a>)>,
}

impl SlotPlan<'_> {
    /// The slot's payload (the only copy of its bytes).
    pub fn payload(self) -> Result<SlotPayload, ModelError> {
        let bytes = safetensors::serialize(self.views, &None).map_err(st_err)?;
        Ok(SlotPayload {
            slot: self.slot,
            dtype: self.dtype,
            tensors: self.tensors,
            bytes,
        })
    }
}

/// Check checkpoint shards against `cfg` as [`split_checkpoint`] does, every
/// slot, without copying a tensor: a caller can then make one slot's
/// payload at a time ([`SlotPlan::payload`]) and hold at most one in memory,
/// knowing that no slot will fail half-way.
pub fn plan_checkpoint<'a>(
    cfg: &Config,
    shards: &[&'a [u8]],
) -> Result<Vec<SlotPlan<'a>>, ModelError> {
    let parsed: Vec<SafeTensors<'_>> = shards.iter().map(|b| parse(b)).collect::<Result<_, _>>()?;
    let mut by_slot: BTreeMap<Slot, HashMap<String, TensorView<'_>>> = BTreeMap::new();
    for st in &parsed {
        for (name, view) in st.tensors() {
            let slot = Slot::of_tensor(&name).ok_or_else(|| ModelError::Tensor {
                name: name.clone(),
                reason: "not a Mixtral tensor".into(),
            })?;
            slot.check_in_spec(cfg)?;
            if by_slot
                .entry(slot)
                .or_default()
                .insert(name.clone(), view)
                .is_some()
            {
                return Err(ModelError::Tensor {
                    name,
                    reason: "appears in two shards".into(),
                });
            }
        }
    }
    let mut out = Vec::new();
    for slot in Slot::all(cfg) {
        let mut have = by_slot.remove(&slot).unwrap_or_default();
        let specs = slot.tensors(cfg);
        let mut dtype = None;
        let mut views = Vec::with_capacity(specs.len());
        for spec in &specs {
            let view = have.remove(&spec.name).ok_or_else(|| ModelError::Tensor {
                name: spec.name.clone(),
                reason: format!("missing from the checkpoint (slot {slot})"),
            })?;
            if view.shape() != spec.shape.as_slice() {
                return Err(ModelError::Tensor {
                    name: spec.name.clone(),
                    reason: format!(
                        "shape {:?} does not match the config, which implies {:?}",
                        view.shape(),
                        spec.shape
                    ),
                });
            }
            let d = payload_dtype_of(view.dtype()).ok_or_else(|| ModelError::Tensor {
                name: spec.name.clone(),
                reason: format!("dtype {:?} is not F32, F16 or BF16", view.dtype()),
            })?;
            if dtype.is_some_and(|x| x != d) {
                return Err(ModelError::Tensor {
                    name: spec.name.clone(),
                    reason: format!("dtype {d:?} differs from the rest of slot {slot}"),
                });
            }
            dtype = Some(d);
            views.push((spec.name.clone(), view));
        }
        if let Some(extra) = have.keys().next() {
            return Err(ModelError::Tensor {
                name: extra.clone(),
                reason: format!("not a tensor the config implies for slot {slot}"),
            });
        }
        out.push(SlotPlan {
            slot,
            dtype: dtype.unwrap_or(PayloadDtype::F32),
            tensors: specs,
            views,
        });
    }
    Ok(out)
}

/// Join slot payloads back into one checkpoint (tensor bytes untouched).
pub fn join_slots(payloads: &[&[u8]]) -> Result<Vec<u8>, ModelError> {
    let parsed: Vec<SafeTensors<'_>> = payloads
        .iter()
        .map(|b| parse(b))
        .collect::<Result<_, _>>()?;
    let mut all: BTreeMap<String, TensorView<'_>> = BTreeMap::new();
    for st in &parsed {
        for (name, view) in st.tensors() {
            if all.insert(name.clone(), view).is_some() {
                return Err(ModelError::Tensor {
                    name,
                    reason: "appears in two payloads".into(),
                });
            }
        }
    }
    safetensors::serialize(all, &None).map_err(st_err)
}

/// What signing a block needs besides the header fields of the payload.
#[derive(Debug, Clone)]
pub struct Signer<'a> {
    pub key: &'a SigningKey,
    pub address: String,
    pub timestamp_ms: u64,
    pub chunk_size: u32,
}

impl Signer<'_> {
    fn builder(&self, b: BlockBuilder) -> BlockBuilder {
        b.address(self.address.clone())
            .timestamp_ms(self.timestamp_ms)
            .chunk_size(self.chunk_size)
    }

    /// A chain-A meta block (genesis when `parent` is None).
    pub fn meta_block(
        &self,
        meta: &MetaPayload,
        parent: Option<BlockHash>,
    ) -> Result<(Block, Vec<u8>), ChainError> {
        meta.check()?;
        let payload = meta.to_json();
        let b = self.builder(BlockBuilder::meta(meta.model_name.clone()).parents(parent));
        Ok((b.sign(&payload, self.key), payload))
    }

    /// A chain-B block for one slot payload.
    pub fn slot_block(
        &self,
        meta: BlockHash,
        slot: &SlotPayload,
        parents: Vec<BlockHash>,
        candidate_loss: Option<f32>,
    ) -> (Block, Vec<u8>) {
        let b = self.builder(
            BlockBuilder::slot(meta, slot.slot, slot.dtype)
                .parents(parents)
                .candidate_loss(candidate_loss),
        );
        (b.sign(&slot.bytes, self.key), slot.bytes.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::{validate_block, Dag};
    use safetensors::Dtype;

    fn cfg() -> Config {
        Config::from_json(
            br#"{"vocab_size":11,"hidden_size":8,"intermediate_size":6,"num_hidden_layers":2,
            "num_attention_heads":2,"num_key_value_heads":1,"num_experts_per_tok":2,"num_local_experts":3}"#,
        )
        .unwrap()
    }

    fn checkpoint(cfg: &Config, skip: Option<&str>, reshape: Option<&str>) -> Vec<u8> {
        let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        let mut x = 0u32;
        for slot in Slot::all(cfg) {
            for t in slot.tensors(cfg) {
                if Some(t.name.as_str()) == skip {
                    continue;
                }
                let mut shape = t.shape.clone();
                if Some(t.name.as_str()) == reshape {
                    shape[0] += 1;
                }
                let n: usize = shape.iter().product();
                let data: Vec<u8> = (0..n)
                    .flat_map(|_| {
                        x = x.wrapping_mul(1664525).wrapping_add(1013904223);
                        ((x >> 8) as f32 / 16777216.0).to_le_bytes()
                    })
                    .collect();
                tensors.push((t.name, shape, data));
            }
        }
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(n, s, d)| {
                (
                    n.clone(),
                    TensorView::new(Dtype::F32, s.clone(), d).unwrap(),
                )
            })
            .collect();
        safetensors::serialize(views, &None).unwrap()
    }

    #[test]
    fn split_then_join_is_bit_identical() {
        let cfg = cfg();
        let ck = checkpoint(&cfg, None, None);
        let slots = split_checkpoint(&cfg, &[&ck]).unwrap();
        assert_eq!(slots.len(), 1 + 2 * (1 + 3));
        let joined =
            join_slots(&slots.iter().map(|s| s.bytes.as_slice()).collect::<Vec<_>>()).unwrap();
        let a = SafeTensors::deserialize(&ck).unwrap();
        let b = SafeTensors::deserialize(&joined).unwrap();
        assert_eq!(a.len(), b.len());
        for (name, v) in a.tensors() {
            let w = b.tensor(&name).unwrap();
            assert_eq!(v.data(), w.data(), "{name}");
            assert_eq!(v.shape(), w.shape());
        }
        // Deterministic: splitting again gives the same payloads.
        assert_eq!(split_checkpoint(&cfg, &[&ck]).unwrap(), slots);
    }

    #[test]
    fn split_refuses_mismatches() {
        let cfg = cfg();
        let missing = checkpoint(
            &cfg,
            Some("model.layers.1.block_sparse_moe.experts.2.w3.weight"),
            None,
        );
        let e = split_checkpoint(&cfg, &[&missing]).unwrap_err().to_string();
        assert!(e.contains("missing"), "{e}");
        let shaped = checkpoint(&cfg, None, Some("model.layers.0.self_attn.k_proj.weight"));
        let e = split_checkpoint(&cfg, &[&shaped]).unwrap_err().to_string();
        assert!(e.contains("shape"), "{e}");
        let mut small = cfg.clone();
        small.num_local_experts = 2;
        small.num_experts_per_tok = 1;
        let ck = checkpoint(&cfg, None, None);
        let e = split_checkpoint(&small, &[&ck]).unwrap_err().to_string();
        assert!(e.contains("outside the spec"), "{e}");
        assert!(split_checkpoint(&cfg, &[b"garbage"]).is_err());
        assert!(split_checkpoint(&cfg, &[&[0xff; 16]]).is_err());
    }

    #[test]
    fn signed_blocks_validate_into_a_dag() {
        let cfg = cfg();
        let key = SigningKey::from_bytes(&[3; 32]);
        let signer = Signer {
            key: &key,
            address: "op".into(),
            timestamp_ms: 1,
            chunk_size: 4096,
        };
        let cfg_json: serde_json::Value = serde_json::to_value(&cfg).unwrap();
        let meta = MetaPayload::new("tiny", cfg_json, None).unwrap();
        let (mb, mp) = signer.meta_block(&meta, None).unwrap();
        let mut dag = Dag::new();
        dag.insert(&validate_block(&mb, &mp, &dag).unwrap());
        let ck = checkpoint(&cfg, None, None);
        for s in split_checkpoint(&cfg, &[&ck]).unwrap() {
            let (b, p) = signer.slot_block(mb.hash, &s, vec![], None);
            dag.insert(&validate_block(&b, &p, &dag).unwrap());
        }
        assert_eq!(dag.len(), 10);
        assert_eq!(dag.slot_heads(&mb.hash).len(), 9);
    }
}
