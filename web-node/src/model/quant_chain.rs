//! A quantized model as blocks: its own chain-A meta block (the source's
//! config with a `quantization_config`, parent = the source meta block) and
//! one chain-B block per slot whose `parents` name the block it was made
//! from. Expert blocks are quantized; shared and router blocks keep their
//! payload bytes. Deterministic: the same source blocks, signer and format
//! give the same block hashes with any number of threads.

use crate::chain::{
    Block, BlockBuilder, BlockHash, BlockKind, ChainError, MetaPayload, PayloadDtype,
};
use crate::spec::quant::{QuantFormat, GROUP};

use super::checkpoint::Signer;
use super::quant::{quantize_payload, verify_quantized, QuantMismatch};
use super::{Config, ModelError, Slot};

/// One block with its payload.
pub type BlockWithPayload = (Block, Vec<u8>);

/// One expert's quantization: its index in the heads and the payload.
type Quantized = (usize, Result<Vec<u8>, ModelError>);

/// The name of the quantized model of `source_name`.
pub fn quantized_model_name(source_name: &str, format: QuantFormat) -> String {
    format!("{source_name}-{format}")
}

/// The `config.json` of the quantized model: the source's, plus
/// `quantization_config` naming the format and the source meta block (when
/// the source is on the chain).
pub fn quantized_config(
    source_config: &serde_json::Value,
    format: QuantFormat,
    source_meta: Option<&BlockHash>,
) -> Result<serde_json::Value, ModelError> {
    let mut v = source_config.clone();
    let obj = v
        .as_object_mut()
        .ok_or_else(|| ModelError::Config("config.json is not an object".into()))?;
    if obj.contains_key("quantization_config") {
        return Err(ModelError::Config(
            "the source model is already quantized (quantization_config is set)".into(),
        ));
    }
    let mut q = serde_json::json!({
        "quant_method": "aiblock",
        "format": format.as_str(),
        "group_size": GROUP,
    });
    if let Some(m) = source_meta {
        q["source_meta"] = serde_json::Value::String(m.to_hex());
    }
    obj.insert("quantization_config".into(), q);
    Ok(v)
}

/// Quantize a model: `meta` is the source meta block and its payload,
/// `heads` every slot's head block (with payload) under it. Returns the new
/// meta block first, then one block per slot in the order of `heads`.
/// Experts are quantized on `threads` threads; the result does not depend
/// on the count.
pub fn quantize_model(
    meta: &BlockWithPayload,
    heads: &[BlockWithPayload],
    format: QuantFormat,
    signer: &Signer<'_>,
    threads: usize,
) -> Result<Vec<BlockWithPayload>, ModelError> {
    let (meta_block, meta_payload) = meta;
    let (m, cfg) = MetaPayload::parse(meta_payload).map_err(chain_err)?;
    let config = quantized_config(&m.config, format, Some(&meta_block.hash))?;
    let qmeta = MetaPayload::new(
        &quantized_model_name(&m.model_name, format),
        config,
        m.tokenizer.clone(),
    )
    .map_err(chain_err)?;
    let (new_meta, new_meta_payload) = signer
        .meta_block(&qmeta, Some(meta_block.hash))
        .map_err(chain_err)?;
    // Quantize the experts, `threads` at a time; results land by index.
    let jobs: Vec<usize> = (0..heads.len())
        .filter(|&i| heads[i].0.header.kind == BlockKind::Expert)
        .collect();
    let mut quantized: Vec<Option<Result<Vec<u8>, ModelError>>> =
        (0..heads.len()).map(|_| None).collect();
    let run = |i: usize| -> Result<Vec<u8>, ModelError> {
        let (b, p) = &heads[i];
        if b.header.dtype.quant().is_some() {
            return Err(ModelError::Input(format!(
                "{} is already quantized ({})",
                b.header.name,
                b.header.dtype.as_str()
            )));
        }
        let slot = Slot::parse(&b.header.name)?;
        quantize_payload(&cfg, slot, p, format)
            .map_err(|e| ModelError::Input(format!("{}: {e}", b.header.name)))
    };
    let threads = threads.clamp(1, jobs.len().max(1));
    if threads <= 1 || cfg!(target_arch = "wasm32") {
        for &i in &jobs {
            quantized[i] = Some(run(i));
        }
    } else {
        let per = jobs.len().div_ceil(threads);
        let results: Vec<Vec<Quantized>> = std::thread::scope(|s| {
            let handles: Vec<_> = jobs
                .chunks(per)
                .map(|part| s.spawn(move || part.iter().map(|&i| (i, run(i))).collect::<Vec<_>>()))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_default())
                .collect()
        });
        for (i, r) in results.into_iter().flatten() {
            quantized[i] = Some(r);
        }
    }
    let mut out = vec![(new_meta.clone(), new_meta_payload)];
    for (i, (b, p)) in heads.iter().enumerate() {
        if b.header.meta != Some(meta_block.hash) {
            return Err(ModelError::Input(format!(
                "{} ({}) is not a block of the source model",
                b.header.name, b.hash
            )));
        }
        let slot = Slot::parse(&b.header.name)?;
        let (dtype, payload) = match quantized[i].take() {
            Some(r) => (PayloadDtype::of_quant(format), r?),
            None if b.header.kind == BlockKind::Expert => {
                return Err(ModelError::Input(format!(
                    "{}: a quantization thread failed",
                    b.header.name
                )))
            }
            None => (b.header.dtype, p.clone()),
        };
        let block = BlockBuilder::slot(new_meta.hash, slot, dtype)
            .parents(vec![b.hash])
            .address(signer.address.clone())
            .timestamp_ms(signer.timestamp_ms)
            .chunk_size(signer.chunk_size)
            .sign(&payload, signer.key);
        out.push((block, payload));
    }
    Ok(out)
}

fn chain_err(e: ChainError) -> ModelError {
    ModelError::Input(e.to_string())
}

/// Re-derive a quantized expert block from its source block (the parent it
/// names): the source's payload quantized in the block's format must equal
/// the block's payload byte for byte. `cfg` is the quantized model's config.
pub fn verify_quant_block(
    cfg: &Config,
    block: &BlockWithPayload,
    source: &BlockWithPayload,
) -> Result<(), QuantMismatch> {
    let (b, p) = block;
    let (s, sp) = source;
    let Some(format) = b.header.dtype.quant() else {
        return Err(QuantMismatch::Payload(format!(
            "{} is not a quantized block ({})",
            b.header.name,
            b.header.dtype.as_str()
        )));
    };
    if s.header.name != b.header.name || s.header.dtype.quant().is_some() {
        return Err(QuantMismatch::Source(format!(
            "{} ({}) is not a float block of slot {}",
            s.hash, s.header.name, b.header.name
        )));
    }
    let slot = Slot::parse(&b.header.name).map_err(|e| QuantMismatch::Source(e.to_string()))?;
    verify_quantized(cfg, slot, sp, p, format)
}

/// The float source a quantized chain-B block names among its parents: the
/// parent of the same slot name that is not quantized, if its header is
/// known (`header_of`).
pub fn quant_source(
    block: &Block,
    header_of: impl Fn(&BlockHash) -> Option<crate::chain::BlockHeader>,
) -> Option<BlockHash> {
    block.header.dtype.quant()?;
    block.header.parents.iter().copied().find(|p| {
        header_of(p).is_some_and(|h| {
            h.name == block.header.name
                && h.kind == block.header.kind
                && h.dtype.quant().is_none()
                && h.meta != block.header.meta
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::{validate_block, Dag};

    #[test]
    fn quantized_model_validates_and_is_deterministic() {
        let cfg = crate::model::random::small_config(
            crate::model::random::TOKENIZER_VOCAB,
            32,
            64,
            2,
            4,
            2,
        );
        let chain = crate::test_chain::TinyChain::with_config(3, cfg);
        let key = crate::test_chain::tiny_chain_key();
        let signer = Signer {
            key: &key,
            address: "q".into(),
            timestamp_ms: 1,
            chunk_size: crate::chain::limits::MIN_CHUNK_SIZE,
        };
        let meta = chain.meta.clone();
        let heads = chain.slots.clone();
        let mut dag = Dag::new();
        for (b, p) in chain.blocks() {
            dag.insert(&validate_block(&b, &p, &dag).unwrap());
        }
        for f in QuantFormat::ALL {
            let one = quantize_model(&meta, &heads, f, &signer, 1).unwrap();
            let two = quantize_model(&meta, &heads, f, &signer, 2).unwrap();
            let h1: Vec<_> = one.iter().map(|(b, _)| b.hash).collect();
            let h2: Vec<_> = two.iter().map(|(b, _)| b.hash).collect();
            assert_eq!(h1, h2, "{f}: thread count changed a block");
            for (b, p) in &one {
                let v = validate_block(b, p, &dag)
                    .unwrap_or_else(|e| panic!("{f} {}: {e}", b.header.name));
                dag.insert(&v);
            }
            let cfg = Config::from_value(&MetaPayload::parse(&one[0].1).unwrap().0.config).unwrap();
            for (b, p) in one.iter().skip(1) {
                if b.header.kind != BlockKind::Expert {
                    continue;
                }
                let src = heads
                    .iter()
                    .find(|(s, _)| s.hash == b.header.parents[0])
                    .unwrap();
                verify_quant_block(&cfg, &(b.clone(), p.clone()), src).unwrap();
            }
        }
    }

    /// The tiny chain (sizes fit the groups) and its q8_0 model, validated.
    fn quantized() -> (crate::test_chain::TinyChain, Vec<BlockWithPayload>, Dag) {
        let cfg = crate::model::random::small_config(
            crate::model::random::TOKENIZER_VOCAB,
            32,
            64,
            2,
            4,
            2,
        );
        let chain = crate::test_chain::TinyChain::with_config(4, cfg);
        let key = crate::test_chain::tiny_chain_key();
        let signer = Signer {
            key: &key,
            address: "q".into(),
            timestamp_ms: 1,
            chunk_size: crate::chain::limits::MIN_CHUNK_SIZE,
        };
        let q = quantize_model(&chain.meta, &chain.slots, QuantFormat::Q8_0, &signer, 1).unwrap();
        let mut dag = Dag::new();
        for (b, p) in chain.blocks() {
            dag.insert(&validate_block(&b, &p, &dag).unwrap());
        }
        (chain, q, dag)
    }

    fn resign(b: &Block, dtype: PayloadDtype, payload: &[u8]) -> Block {
        let key = crate::test_chain::tiny_chain_key();
        let slot = Slot::parse(&b.header.name).unwrap();
        BlockBuilder::slot(b.header.meta.unwrap(), slot, dtype)
            .parents(b.header.parents.clone())
            .address("q".to_string())
            .timestamp_ms(2)
            .chunk_size(b.header.chunk_size)
            .sign(payload, &key)
    }

    #[test]
    fn an_altered_scale_is_named_by_tensor_and_group() {
        let (chain, q, _) = quantized();
        let cfg = Config::from_value(&MetaPayload::parse(&q[0].1).unwrap().0.config).unwrap();
        let (b, p) = q
            .iter()
            .find(|(b, _)| b.header.name == "layer1.expert2")
            .unwrap()
            .clone();
        let src = chain
            .slots
            .iter()
            .find(|(s, _)| s.hash == b.header.parents[0])
            .unwrap();
        // Flip one bit of one scale of w2 (shape [32, 64]: 2 groups a row).
        let st = safetensors::SafeTensors::deserialize(&p).unwrap();
        let name = "model.layers.1.block_sparse_moe.experts.2.w2.weight";
        let scales = st.tensor(&crate::spec::quant::scales_name(name)).unwrap();
        let start = scales.data().as_ptr() as usize - p.as_ptr() as usize;
        let mut bad = p.clone();
        let at = start + 2 * (5 * 2 + 1); // row 5, group 1
        bad[at] ^= 1;
        let e = verify_quant_block(&cfg, &(resign(&b, b.header.dtype, &bad), bad.clone()), src)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(name) && e.contains("group 1") && e.contains("row 5") && e.contains("scale"),
            "{e}"
        );
        // One value changed instead.
        let vals = st.tensor(name).unwrap();
        let vstart = vals.data().as_ptr() as usize - p.as_ptr() as usize;
        let mut bad = p.clone();
        bad[vstart + 64 * 3 + 40] ^= 1; // row 3, column 40: group 1
        let e = verify_quant_block(&cfg, &(b.clone(), bad), src)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(name)
                && e.contains("row 3")
                && e.contains("group 1")
                && e.contains("values"),
            "{e}"
        );
        // The honest block passes; a wrong source is refused.
        verify_quant_block(&cfg, &(b.clone(), p.clone()), src).unwrap();
        let other = chain
            .slots
            .iter()
            .find(|(s, _)| s.header.name == "layer0.expert0")
            .unwrap();
        assert!(verify_quant_block(&cfg, &(b, p), other).is_err());
    }

    #[test]
    fn validation_refuses_wrong_formats_and_layouts() {
        let (chain, q, mut dag) = quantized();
        for (b, p) in &q[..1] {
            dag.insert(&validate_block(b, p, &dag).unwrap());
        }
        let expert = q
            .iter()
            .find(|(b, _)| b.header.name == "layer0.expert1")
            .unwrap();
        let err = |b: &Block, p: &[u8]| validate_block(b, p, &dag).unwrap_err().to_string();
        // A float payload under the quantized model.
        let float = chain
            .slots
            .iter()
            .find(|(b, _)| b.header.name == "layer0.expert1")
            .unwrap();
        let b = resign(&expert.0, PayloadDtype::F32, &float.1);
        assert!(err(&b, &float.1).contains("q8_0"), "{}", err(&b, &float.1));
        // q4_0 bytes under a q8_0 model.
        let cfg = chain.config.clone();
        let q4 = super::super::quant::quantize_payload(
            &cfg,
            Slot::Expert {
                layer: 0,
                expert: 1,
            },
            &float.1,
            QuantFormat::Q4_0,
        )
        .unwrap();
        let b = resign(&expert.0, PayloadDtype::Q4_0, &q4);
        assert!(err(&b, &q4).contains("Q4_0"), "{}", err(&b, &q4));
        // A header that says Q8_0 over q4 bytes.
        let b = resign(&expert.0, PayloadDtype::Q8_0, &q4);
        assert!(err(&b, &q4).contains("shape"), "{}", err(&b, &q4));
        // A quantized router block is refused before any payload is read.
        let router = q
            .iter()
            .find(|(b, _)| b.header.name == "layer0.router")
            .unwrap();
        let b = resign(&router.0, PayloadDtype::Q8_0, &router.1);
        assert!(
            err(&b, &router.1).contains("only expert blocks are quantized"),
            "{}",
            err(&b, &router.1)
        );
        // A quantized expert under the float source model.
        let mut hdr = expert.0.header.clone();
        hdr.meta = Some(chain.meta.0.hash);
        hdr.parents = vec![float.0.hash];
        let b = Block::sign(hdr, &crate::test_chain::tiny_chain_key());
        assert!(
            err(&b, &expert.1).contains("quantized model"),
            "{}",
            err(&b, &expert.1)
        );
        // The honest block validates.
        validate_block(&expert.0, &expert.1, &dag).unwrap();
    }
}
