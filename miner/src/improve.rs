//! Fine-tune one expert (everything else frozen) and measure the public-eval
//! loss of the whole model with it.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::Device;
use tokenizers::Tokenizer;
use web_node::eval::{self, Corpus, Skill};
use web_node::model::Slot;

use crate::blocks::{self, ModelFiles};
use crate::mixtral::Mixtral;
use crate::train::{tokenized_splits, train_loop, RoutingWeights, Source};
use web_node::eval::corpus::FreshSampler;
use web_node::model::checkpoint::SlotPayload;

/// Result of a fine-tuning run.
pub struct Improved {
    pub baseline_loss: f64,
    pub loss: f64,
    pub payload: SlotPayload,
}

/// Load a tokenizer.json.
pub fn load_tokenizer(dir: &Path) -> Result<Tokenizer> {
    let p = dir.join("tokenizer.json");
    Tokenizer::from_file(&p).map_err(|e| anyhow!("{}: {e}", p.display()))
}

/// Public-eval loss of the model in `dir`.
pub fn public_loss(model: &mut Mixtral, tok: &Tokenizer, corpus: &Corpus) -> Result<f64> {
    let public = eval::tokenize(tok, &corpus.public_eval)?;
    Ok(eval::eval_loss(model, &public)?)
}

/// The whole checkpoint of a candle model as F32 safetensors bytes.
pub fn checkpoint_bytes(model: &Mixtral) -> Result<Vec<u8>> {
    let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, v) in &model.vars {
        let vals = v.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        data.push((
            name.clone(),
            v.dims().to_vec(),
            vals.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
        .iter()
        .map(|(n, s, b)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| anyhow!("{n}: {e}"))
        })
        .collect::<Result<_>>()?;
    safetensors::serialize(views, &None).map_err(|e| anyhow!("{e}"))
}

/// Public-eval loss measured by the CPU reference engine (the code the
/// relay's quality gate runs) on a whole checkpoint.
pub fn reference_loss(
    cfg: &web_node::model::Config,
    weights: Vec<u8>,
    tok: &Tokenizer,
) -> Result<f64> {
    let mut m = web_node::model::reference::CpuModel::from_safetensors(cfg.clone(), weights)?;
    Ok(eval::public_eval_loss(&mut m, tok)?)
}

/// Fine-tune `slot` (an expert) of the model in `dir` on `skill`.
pub fn improve(
    dir: &Path,
    slot: Slot,
    skill: Skill,
    steps: usize,
    lr: f64,
    seed: u64,
) -> Result<Improved> {
    if !matches!(slot, Slot::Expert { .. }) {
        bail!("--expert must name an expert slot (layerN.expertM), not {slot}");
    }
    let files = ModelFiles::read(dir)?;
    slot.check_in_spec(&files.config)?;
    let device = Device::Cpu;
    let model = Mixtral::load(&files.config, &dir.join("model.safetensors"), &device)?;
    let tok = load_tokenizer(dir)?;
    let corpus = Corpus::default_corpus();
    let splits = tokenized_splits(&tok, &corpus)?;
    let baseline_loss = reference_loss(&files.config, files.weights.clone(), &tok)?;
    tracing::info!("baseline public-eval loss {baseline_loss:.5}");
    let idx = Skill::ALL.iter().position(|s| *s == skill).unwrap_or(0);
    let data = vec![splits.by_skill[idx].clone()];
    let fresh = FreshSampler::new(&corpus);
    let source = Source {
        skills: vec![skill],
        weights: vec![1],
        by_skill: &data,
        fresh: Some((&fresh, &tok)),
    };
    let vars = model.slot_vars(slot);
    // Keep the expert's best state by public-eval loss, checked every tenth of the run.
    let mut best: Option<(f64, Vec<candle_core::Tensor>)> = None;
    let snap = vars.clone();
    train_loop(
        &model,
        vars,
        &source,
        &splits.public,
        steps,
        32,
        lr,
        &RoutingWeights::default(),
        0.0,
        seed,
        |_, pl| {
            if best.as_ref().is_none_or(|(b, _)| pl < *b) {
                let t = snap
                    .iter()
                    .map(|v| v.as_tensor().copy())
                    .collect::<candle_core::Result<_>>()?;
                best = Some((pl, t));
            }
            Ok(())
        },
        (steps / 10).max(1),
        |_| Ok(()),
    )?;
    if let Some((pl, tensors)) = &best {
        tracing::info!("best public-eval loss during fine-tuning: {pl:.5}");
        for (v, t) in model.slot_vars(slot).iter().zip(tensors) {
            v.set(t)?;
        }
    }
    let weights = checkpoint_bytes(&model)?;
    let loss = reference_loss(&files.config, weights.clone(), &tok)?;
    tracing::info!("public-eval loss with the fine-tuned {slot}: {loss:.5}");
    let payload = blocks::split_checkpoint(&files.config, &weights)?
        .into_iter()
        .find(|p| p.slot == slot)
        .with_context(|| format!("no payload for {slot}"))?;
    Ok(Improved {
        baseline_loss,
        loss,
        payload,
    })
}
