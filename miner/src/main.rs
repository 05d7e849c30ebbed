//! `aiblock`: the AI-Block miner CLI.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use web_node::chain::BlockHash;
use web_node::eval::{self, Corpus, Skill};
use web_node::model::Slot;

use miner::blocks::{self, BlockOpts, ModelFiles};
use miner::{client, improve, train};

#[derive(Parser)]
#[command(
    name = "aiblock",
    version,
    about = "AI-Block miner: keys, genesis, import, publish, export, eval, improve, train"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate text from a prompt with a model directory.
    Chat(miner::infer::ChatArgs),
    /// Print the last position's logits for token ids as a JSON array.
    Logits(miner::infer::LogitsArgs),
    /// Create a miner key (ed25519 secret as hex, mode 0600) and print its public key.
    Keygen {
        #[arg(long, default_value = "key")]
        out: PathBuf,
    },
    /// Build a chain-A meta block (spec + config.json + tokenizer.json) for a model directory.
    Genesis {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        key: PathBuf,
        /// Model name in the spec (default: the directory's name).
        #[arg(long)]
        name: Option<String>,
        #[arg(long, default_value = "operator")]
        address: String,
        /// Where to write the block file (publish it with `publish --dir`).
        #[arg(long, default_value = "blocks")]
        out: PathBuf,
    },
    /// Split a checkpoint into signed chain-B blocks (one per slot).
    Import {
        #[arg(long)]
        model: PathBuf,
        /// The chain-A meta block the blocks conform to.
        #[arg(long)]
        meta_hash: BlockHash,
        #[arg(long)]
        address: String,
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        candidate_loss: Option<f32>,
        /// Print each block (name, kind, tensors and shapes, size, hash); write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Read the meta config from this relay (and use its slot heads as parents).
        #[arg(long)]
        relay: Option<String>,
        /// Read the meta config from a meta block file (as `genesis` writes it).
        #[arg(long)]
        meta_file: Option<PathBuf>,
        #[arg(long, default_value = "blocks")]
        out: PathBuf,
    },
    /// Upload every block file of a directory (binary `POST /blocks`).
    Publish {
        #[arg(long)]
        relay: String,
        #[arg(long, default_value = "blocks")]
        dir: PathBuf,
    },
    /// Write the chain's current heads back as a Hugging Face directory.
    Export {
        #[arg(long)]
        relay: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        meta_hash: Option<BlockHash>,
    },
    /// Held-out accuracy per skill and public-eval loss of a model directory.
    Eval {
        #[arg(long, default_value = "models/default")]
        model: PathBuf,
        /// Also print every wrong held-out answer.
        #[arg(long)]
        show_errors: bool,
    },
    /// Which experts the router picks for a skill's public-eval prompts
    /// (a guide for choosing `improve --expert`).
    Routes {
        #[arg(long, default_value = "models/default")]
        model: PathBuf,
        #[arg(long)]
        skill: String,
    },
    /// Fine-tune one expert (all else frozen) on a skill, measure the public-eval
    /// loss of the whole model with it, and publish it as the slot's next version.
    Improve {
        /// Take the model from the relay's current heads (and publish there).
        #[arg(long, conflicts_with = "model")]
        relay: Option<String>,
        /// Take the model from a directory (the block is only written).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Slot to improve, e.g. layer1.expert3.
        #[arg(long)]
        expert: String,
        /// Skill to train on (add, sub, copy, reverse, sort, count, capital).
        #[arg(long)]
        skill: String,
        #[arg(long)]
        key: PathBuf,
        #[arg(long, default_value = "miner")]
        address: String,
        /// With --model: the meta block hash for the new block.
        #[arg(long)]
        meta_hash: Option<BlockHash>,
        /// With --model: the slot's current head.
        #[arg(long)]
        parent: Option<BlockHash>,
        #[arg(long, default_value_t = 100)]
        steps: usize,
        #[arg(long, default_value_t = 5e-4)]
        lr: f64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Claim this loss instead of the measured one (for testing the relay's gate).
        #[arg(long, hide = true)]
        claim: Option<f32>,
        /// Publish even if the measured loss is not lower than the current one.
        #[arg(long)]
        force: bool,
        #[arg(long, default_value = "blocks")]
        out: PathBuf,
    },
    /// Train the default model from scratch (deterministic from --seed).
    Train {
        #[arg(long, default_value = "models/default")]
        out: PathBuf,
        #[arg(long, default_value_t = web_node::eval::DEFAULT_SEED)]
        seed: u64,
        #[arg(long, default_value_t = 9000)]
        steps: usize,
        #[arg(long, default_value_t = 64)]
        batch: usize,
        #[arg(long, default_value_t = 2e-3)]
        lr: f64,
        #[arg(long, default_value_t = 128)]
        hidden: usize,
        #[arg(long, default_value_t = 256)]
        intermediate: usize,
        #[arg(long, default_value_t = 512)]
        vocab: usize,
        #[arg(long, default_value_t = 0.01)]
        aux_coef: f64,
        #[arg(long, default_value_t = 0.05)]
        weight_decay: f64,
        #[arg(long, default_value_t = 1000)]
        checkpoint_every: usize,
    },
}

fn dir_name(p: &Path) -> String {
    p.canonicalize()
        .ok()
        .and_then(|c| c.file_name().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "model".into())
}

#[allow(clippy::too_many_arguments)]
fn cmd_import(
    model: &Path,
    meta_hash: BlockHash,
    address: &str,
    key: &Path,
    candidate_loss: Option<f32>,
    dry_run: bool,
    relay: Option<&str>,
    meta_file: Option<&Path>,
    out: &Path,
) -> Result<()> {
    let cfg = match (relay, meta_file) {
        (_, Some(f)) => blocks::meta_config_from_file(f, &meta_hash)?.1,
        (Some(r), None) => client::pick_meta(r, Some(meta_hash))?.2,
        (None, None) => {
            bail!("need --relay URL or --meta-file FILE to read the meta config of {meta_hash}")
        }
    };
    let files = ModelFiles::read(model)?;
    let slots = blocks::split_checkpoint(&cfg, &files.weights).with_context(|| {
        format!(
            "importing {} against meta {}",
            model.display(),
            meta_hash.short()
        )
    })?;
    let key = blocks::load_key(key)?;
    let heads = match relay {
        Some(r) => client::slot_heads(r, &meta_hash)?,
        None => Vec::new(),
    };
    let mut total = 0usize;
    for sp in &slots {
        let name = sp.slot.to_string();
        let parents = heads
            .iter()
            .filter(|h| h.name == name)
            .map(|h| h.hash)
            .collect();
        let opts = BlockOpts {
            meta: meta_hash,
            parents,
            candidate_loss,
            address: address.to_string(),
        };
        let block = blocks::slot_block(sp.slot, sp.dtype, &sp.bytes, &opts, &key);
        total += sp.bytes.len();
        println!(
            "{:<18} {:<7} {:>10} bytes  {}",
            name,
            block.header.kind.as_str(),
            sp.bytes.len(),
            block.hash
        );
        for t in &sp.tensors {
            println!("    {:<60} {:?} {}", t.name, t.shape, sp.dtype.as_str());
        }
        if !dry_run {
            blocks::write_block_file(out, &block, &sp.bytes)?;
        }
    }
    if dry_run {
        println!(
            "dry run: {} blocks, {total} payload bytes; nothing written",
            slots.len()
        );
    } else {
        println!(
            "wrote {} blocks ({total} payload bytes) to {}",
            slots.len(),
            out.display()
        );
    }
    Ok(())
}

fn cmd_routes(model: &Path, skill: &str) -> Result<()> {
    let skill = Skill::parse(skill).with_context(|| format!("unknown skill {skill:?}"))?;
    let dir = web_node::model::load::ModelDir::load(model)?;
    let mut m = web_node::model::reference::CpuModel::from_model_dir(&dir)?;
    let tok = dir.tokenizer.inner().clone();
    let corpus = Corpus::default_corpus();
    let ex = eval::tokenize(&tok, &eval::corpus::of_skill(&corpus.public_eval, skill))?;
    m.reset_stats();
    for e in &ex {
        eval::LogitsModel::logits_all(&mut m, &e.full())?;
    }
    let stats = m.routing_stats().clone();
    println!(
        "tokens routed per expert for {skill} ({} tokens, top-{}):",
        stats.tokens, dir.config.num_experts_per_tok
    );
    for (l, row) in stats.tokens_routed.iter().enumerate() {
        let mut v: Vec<(usize, u64)> = row.iter().copied().enumerate().collect();
        v.sort_by_key(|a| std::cmp::Reverse(a.1));
        let line: Vec<String> = v
            .iter()
            .map(|(e, c)| format!("layer{l}.expert{e}={c}"))
            .collect();
        println!("  {}", line.join(" "));
    }
    Ok(())
}

fn cmd_eval(model: &Path, show_errors: bool) -> Result<()> {
    let dir = web_node::model::load::ModelDir::load(model)?;
    let mut m = web_node::model::reference::CpuModel::from_model_dir(&dir)?;
    let tok = dir.tokenizer.inner().clone();
    let corpus = Corpus::default_corpus();
    let public = eval::tokenize(&tok, &corpus.public_eval)?;
    let loss = eval::eval_loss(&mut m, &public)?;
    let held = eval::tokenize(&tok, &corpus.held_out)?;
    let acc = eval::accuracy(&mut m, &tok, &held)?;
    if show_errors {
        let eos = eval::eos_id(&tok)?;
        for ex in &held {
            let out = eval::greedy(&mut m, &ex.prompt, ex.answer.len() + 4, eos)?;
            if !eval::is_correct(&tok, ex, &out, eos)? {
                let p = tok.decode(&ex.prompt, false).unwrap_or_default();
                let g = tok.decode(&out, false).unwrap_or_default();
                println!("  wrong: {p}{g:?} (expected {:?})", ex.answer_text);
            }
        }
    }
    println!(
        "public-eval loss: {loss:.5} nats/token ({} examples)",
        corpus.public_eval.len()
    );
    println!("held-out accuracy (greedy, CPU reference engine):");
    for a in &acc {
        println!(
            "  {:<8} {:>3}/{:<3} {:>6.1}%",
            a.skill.name(),
            a.correct,
            a.total,
            100.0 * a.fraction()
        );
    }
    let (c, t) = acc
        .iter()
        .fold((0, 0), |(c, t), a| (c + a.correct, t + a.total));
    println!(
        "  {:<8} {:>3}/{:<3} {:>6.1}%",
        "all",
        c,
        t,
        100.0 * c as f64 / t.max(1) as f64
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn cmd_improve(
    relay: Option<&str>,
    model: Option<&Path>,
    expert: &str,
    skill: &str,
    key: &Path,
    address: &str,
    meta_hash: Option<BlockHash>,
    parent: Option<BlockHash>,
    steps: usize,
    lr: f64,
    seed: u64,
    claim: Option<f32>,
    force: bool,
    out: &Path,
) -> Result<()> {
    let slot = Slot::parse(expert)?;
    let skill = Skill::parse(skill).with_context(|| {
        let names: Vec<_> = Skill::ALL.iter().map(|s| s.name()).collect();
        format!("unknown skill {skill:?}; one of {}", names.join(", "))
    })?;
    let key = blocks::load_key(key)?;
    let tmp;
    let (dir, meta, parents) = match (relay, model) {
        (Some(r), _) => {
            tmp = tempfile::tempdir()?;
            let meta = client::export(r, meta_hash, tmp.path())?;
            let head = client::slot_head(r, &meta, slot)?
                .with_context(|| format!("the relay has no head for {slot}"))?;
            (tmp.path().to_path_buf(), meta, vec![head.hash])
        }
        (None, Some(m)) => {
            let meta = meta_hash.context("--model needs --meta-hash")?;
            (m.to_path_buf(), meta, parent.into_iter().collect())
        }
        (None, None) => bail!("give --relay URL or --model DIR"),
    };
    let res = improve::improve(&dir, slot, skill, steps, lr, seed)?;
    println!(
        "{slot} on {skill}: public-eval loss {:.5} -> {:.5} ({:+.5})",
        res.baseline_loss,
        res.loss,
        res.loss - res.baseline_loss
    );
    if res.loss >= res.baseline_loss && !force {
        bail!(
            "no improvement: public-eval loss {:.5} is not below the current {:.5}; nothing published \
             (try another --expert, --skill, --steps or --lr)",
            res.loss,
            res.baseline_loss
        );
    }
    let claimed = claim.unwrap_or(res.loss as f32);
    let opts = BlockOpts {
        meta,
        parents,
        candidate_loss: Some(claimed),
        address: address.to_string(),
    };
    let block = blocks::slot_block(slot, res.payload.dtype, &res.payload.bytes, &opts, &key);
    let path = blocks::write_block_file(out, &block, &res.payload.bytes)?;
    println!(
        "block {} ({}) written to {}",
        block.hash,
        slot,
        path.display()
    );
    if let Some(r) = relay {
        let body = blocks::block_file_bytes(&block, &res.payload.bytes);
        let answer = client::post_block(r, &body)?;
        println!("published: {answer}");
    }
    Ok(())
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Chat(a) => miner::infer::chat(&a),
        Cmd::Logits(a) => miner::infer::logits(&a),
        Cmd::Keygen { out } => {
            let key = blocks::keygen(&out)?;
            println!("{}", hex::encode(key.verifying_key().to_bytes()));
            eprintln!("secret key written to {}", out.display());
            Ok(())
        }
        Cmd::Genesis {
            model,
            key,
            name,
            address,
            out,
        } => {
            let files = ModelFiles::read(&model)?;
            let key = blocks::load_key(&key)?;
            let name = name.unwrap_or_else(|| dir_name(&model));
            let (block, payload) = blocks::meta_block(&name, &files, &address, &key)?;
            let path = blocks::write_block_file(&out, &block, &payload)?;
            println!("{}", block.hash);
            eprintln!(
                "meta block {name}: {} layers, {} experts, top{}; {} bytes; written to {}",
                files.config.num_hidden_layers,
                files.config.num_local_experts,
                files.config.num_experts_per_tok,
                payload.len(),
                path.display()
            );
            Ok(())
        }
        Cmd::Import {
            model,
            meta_hash,
            address,
            key,
            candidate_loss,
            dry_run,
            relay,
            meta_file,
            out,
        } => cmd_import(
            &model,
            meta_hash,
            &address,
            &key,
            candidate_loss,
            dry_run,
            relay.as_deref(),
            meta_file.as_deref(),
            &out,
        ),
        Cmd::Publish { relay, dir } => {
            let hashes = client::publish_dir(&relay, &dir)?;
            println!("published {} blocks to {relay}", hashes.len());
            Ok(())
        }
        Cmd::Export {
            relay,
            out,
            meta_hash,
        } => {
            let meta = client::export(&relay, meta_hash, &out)?;
            println!("exported the heads of meta {meta} to {}", out.display());
            Ok(())
        }
        Cmd::Routes { model, skill } => cmd_routes(&model, &skill),
        Cmd::Eval { model, show_errors } => cmd_eval(&model, show_errors),
        Cmd::Improve {
            relay,
            model,
            expert,
            skill,
            key,
            address,
            meta_hash,
            parent,
            steps,
            lr,
            seed,
            claim,
            force,
            out,
        } => cmd_improve(
            relay.as_deref(),
            model.as_deref(),
            &expert,
            &skill,
            &key,
            &address,
            meta_hash,
            parent,
            steps,
            lr,
            seed,
            claim,
            force,
            &out,
        ),
        Cmd::Train {
            out,
            seed,
            steps,
            batch,
            lr,
            hidden,
            intermediate,
            vocab,
            aux_coef,
            weight_decay,
            checkpoint_every,
        } => {
            let args = train::TrainArgs {
                seed,
                steps,
                batch,
                lr,
                hidden,
                intermediate,
                vocab,
                aux_coef,
                weight_decay,
                checkpoint_every,
            };
            train::run(&args, &out)
        }
    }
}
