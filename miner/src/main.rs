//! `aiblock`: the AI-Block miner CLI.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use web_node::chain::BlockHash;
use web_node::eval::{self, Corpus, Skill};
use web_node::model::Slot;

use miner::blocks::{self, ModelFiles};
use miner::{client, improve, routes, train};

#[derive(Parser)]
#[command(
    name = "aiblock",
    version,
    about = "AI-Block miner: keys, genesis, import, publish, export, chat, eval, improve, train",
    long_about = "AI-Block miner: keys, genesis, import, publish, export, chat, eval, improve, train.\n\n\
        A typical session: `aiblock keygen`, then `aiblock improve --relay URL --expert \
        layer1.expert3 --skill add --key key` fine-tunes one expert and publishes it \
        through the relay's quality gate. A new model: `genesis` (meta block), `import` \
        (one block per slot), `publish`."
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
    Keygen(KeygenArgs),
    /// Build a chain-A meta block (spec + config.json + tokenizer.json) for a model directory.
    Genesis(GenesisArgs),
    /// Split a checkpoint into signed chain-B blocks (one per slot).
    Import(ImportArgs),
    /// Upload every block file of a directory (binary `POST /blocks`).
    Publish(PublishArgs),
    /// Write the chain's current heads back as a Hugging Face directory.
    Export(ExportArgs),
    /// Held-out accuracy per skill and public-eval loss of a model directory.
    Eval(EvalArgs),
    /// Which experts the held-out prompts of each skill (or one --prompt) need
    /// when answered greedily, and the share of the model's bytes they cost.
    Routes(RoutesArgs),
    /// Fine-tune one expert (all else frozen) on a skill, measure the public-eval
    /// loss of the whole model with it, and publish it as the slot's next version.
    Improve(ImproveArgs),
    /// Train the default model from scratch (deterministic from --seed).
    Train(train::TrainArgs),
    /// Run a node on a relay's peer network: hold, share and compute experts.
    Peer(miner::peer::PeerArgs),
    /// Start a relay and three nodes, run a distributed chat, print who computed what.
    Demo(miner::demo::DemoArgs),
    /// Quantize a model's experts (q8_0 or q4_0) into a new model on the
    /// chain: its own meta block, every block naming the block it came from.
    Quantize(miner::quant::QuantizeArgs),
    /// Re-derive every quantized expert block from its source block and
    /// report any that differ (by tensor and group).
    VerifyQuant(miner::quant::VerifyQuantArgs),
}

#[derive(Debug, Clone, Args)]
struct KeygenArgs {
    /// Where to write the secret key (refuses to overwrite a file).
    #[arg(long, default_value = "key")]
    out: PathBuf,
}

#[derive(Debug, Clone, Args)]
struct GenesisArgs {
    /// Hugging Face-style model directory (config.json, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// Key file to sign with (as `keygen` writes it); a relay accepts meta
    /// blocks only from its operator key or keys it lists.
    #[arg(long)]
    key: PathBuf,
    /// Model name in the spec (default: the directory's name).
    #[arg(long)]
    name: Option<String>,
    /// Display address recorded in the block header.
    #[arg(long, default_value = "operator")]
    address: String,
    /// Where to write the block file (publish it with `publish --dir`).
    #[arg(long, default_value = "blocks")]
    out: PathBuf,
    /// A quantized model (`q8_0` or `q4_0`): the config gains its
    /// `quantization_config`, and `import` then quantizes the experts.
    #[arg(long, value_parser = miner::infer::parse_quant)]
    quant: Option<web_node::model::QuantFormat>,
}

#[derive(Debug, Clone, Args)]
struct ImportArgs {
    /// Hugging Face-style model directory (config.json, model.safetensors).
    #[arg(long)]
    model: PathBuf,
    /// The chain-A meta block the blocks conform to.
    #[arg(long)]
    meta_hash: BlockHash,
    /// Display address recorded in every block header.
    #[arg(long)]
    address: String,
    /// Key file to sign with (as `keygen` writes it). A relay takes a slot's
    /// first version only from the meta block's signer or the writers it lists.
    #[arg(long)]
    key: PathBuf,
    /// Public-eval loss the blocks claim (checked by a relay's quality gate).
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
    /// Where to write the block files.
    #[arg(long, default_value = "blocks")]
    out: PathBuf,
    /// Quantize the experts (`q8_0` or `q4_0`); the meta block must be a
    /// quantized model of that format (`genesis --quant`). A quantized meta
    /// block's experts are always quantized in its format.
    #[arg(long, value_parser = miner::infer::parse_quant)]
    quant: Option<web_node::model::QuantFormat>,
}

#[derive(Debug, Clone, Args)]
struct PublishArgs {
    /// Relay base URL, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    relay: String,
    /// Directory of `.block` files (meta blocks are sent first).
    #[arg(long, default_value = "blocks")]
    dir: PathBuf,
}

#[derive(Debug, Clone, Args)]
struct ExportArgs {
    /// Relay base URL.
    #[arg(long)]
    relay: String,
    /// Directory to write (config.json, tokenizer.json, model.safetensors).
    #[arg(long)]
    out: PathBuf,
    /// The model's meta block (default: the relay's only model).
    #[arg(long)]
    meta_hash: Option<BlockHash>,
}

#[derive(Debug, Clone, Args)]
struct EvalArgs {
    /// Hugging Face-style model directory.
    #[arg(long, default_value = "models/default")]
    model: PathBuf,
    /// Also print every wrong held-out answer.
    #[arg(long)]
    show_errors: bool,
    /// Quantize the experts as they load (`q8_0` or `q4_0`).
    #[arg(long, value_parser = miner::infer::parse_quant)]
    quant: Option<web_node::model::QuantFormat>,
}

#[derive(Debug, Clone, Args)]
struct RoutesArgs {
    /// Hugging Face-style model directory.
    #[arg(long, default_value = "models/default")]
    model: PathBuf,
    /// Only this skill (add, sub, copy, reverse, sort, count, capital), with
    /// the tokens routed to each expert; default: every skill and all.
    #[arg(long, conflicts_with = "prompt")]
    skill: Option<String>,
    /// Route one prompt instead (answered greedily), e.g. "Q: 23+45=? A:".
    #[arg(long)]
    prompt: Option<String>,
    /// With --prompt: the most answer tokens to generate.
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// Quantize the experts as they load (`q8_0` or `q4_0`); the byte
    /// fractions are then those of the quantized blocks.
    #[arg(long, value_parser = miner::infer::parse_quant)]
    quant: Option<web_node::model::QuantFormat>,
}

#[derive(Debug, Clone, Args)]
struct ImproveArgs {
    /// Take the model from the relay's current heads (and publish there).
    #[arg(long, conflicts_with = "model")]
    relay: Option<String>,
    /// Take the model from a directory (the block is only written).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Slot to improve, e.g. layer1.expert3 (default: the expert the skill's
    /// public-eval examples are routed to most, as `routes --skill` prints).
    #[arg(long)]
    expert: Option<String>,
    /// Skill to train on (add, sub, copy, reverse, sort, count, capital).
    #[arg(long)]
    skill: String,
    /// Key file to sign with (as `keygen` writes it).
    #[arg(long)]
    key: PathBuf,
    /// Display address recorded in the block header.
    #[arg(long, default_value = "miner")]
    address: String,
    /// The model's meta block: required with --model; with --relay, picks
    /// one of several models.
    #[arg(long)]
    meta_hash: Option<BlockHash>,
    /// With --model: the slot's current head.
    #[arg(long)]
    parent: Option<BlockHash>,
    /// Fine-tuning steps.
    #[arg(long, default_value_t = 100)]
    steps: usize,
    /// AdamW learning rate.
    #[arg(long, default_value_t = 5e-4)]
    lr: f64,
    /// Seed of the training batches.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Claim this loss instead of the measured one (for testing the relay's gate).
    #[arg(long, hide = true)]
    claim: Option<f32>,
    /// Publish even if the measured loss is not lower than the current one.
    #[arg(long)]
    force: bool,
    /// Where to write the block file.
    #[arg(long, default_value = "blocks")]
    out: PathBuf,
}

fn dir_name(p: &Path) -> String {
    p.canonicalize()
        .ok()
        .and_then(|c| c.file_name().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "model".into())
}

fn cmd_genesis(a: &GenesisArgs) -> Result<()> {
    let mut files = ModelFiles::read(&a.model)?;
    let key = blocks::load_key(&a.key)?;
    let name = a.name.clone().unwrap_or_else(|| dir_name(&a.model));
    if let Some(q) = a.quant {
        files.config_json =
            web_node::model::quant_chain::quantized_config(&files.config_json, q, None)?;
    }
    let (block, payload) = blocks::meta_block(&name, &files, &blocks::signer(&key, &a.address))?;
    let path = blocks::write_block_file(&a.out, &block, &payload)?;
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

fn cmd_import(a: &ImportArgs) -> Result<()> {
    let meta_hash = a.meta_hash;
    let relay = a.relay.as_deref();
    let chain = relay.map(client::RelayChain::sync).transpose()?;
    let cfg = match (&chain, &a.meta_file) {
        (_, Some(f)) => blocks::meta_config_from_file(f, &meta_hash)?.1,
        (Some(c), None) => c.model(Some(meta_hash))?.config,
        (None, None) => {
            bail!("need --relay URL or --meta-file FILE to read the meta config of {meta_hash}")
        }
    };
    let files = ModelFiles::read(&a.model)?;
    let mut slots = blocks::split_checkpoint(&cfg, &files.weights).with_context(|| {
        format!(
            "importing {} against meta {}",
            a.model.display(),
            meta_hash.short()
        )
    })?;
    match (cfg.expert_quant()?, a.quant) {
        (None, Some(q)) => bail!(
            "meta {} is a float model; a {q} model needs its own meta block (`genesis --quant {q}`, or `aiblock quantize` for a model on a relay)",
            meta_hash.short()
        ),
        (Some(m), Some(q)) if m != q => bail!("meta {} is a {m} model, not {q}", meta_hash.short()),
        (Some(q), _) => {
            for sp in slots.iter_mut() {
                if let web_node::model::Slot::Expert { .. } = sp.slot {
                    sp.bytes = web_node::model::quant::quantize_payload(&cfg, sp.slot, &sp.bytes, q)?;
                    sp.dtype = web_node::chain::PayloadDtype::of_quant(q);
                }
            }
        }
        (None, None) => {}
    }
    let key = blocks::load_key(&a.key)?;
    let signer = blocks::signer(&key, &a.address);
    // The verified head of every slot of this model on the relay (none
    // for a model it does not have yet).
    let heads = chain
        .as_ref()
        .map(|c| c.synced.dag.slot_heads(&meta_hash))
        .unwrap_or_default();
    let mut total = 0usize;
    for sp in &slots {
        let name = sp.slot.to_string();
        let parents = heads.get(&name).into_iter().copied().collect();
        let (block, payload) = signer.slot_block(meta_hash, sp, parents, a.candidate_loss);
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
        if !a.dry_run {
            blocks::write_block_file(&a.out, &block, &payload)?;
        }
    }
    if a.dry_run {
        println!(
            "dry run: {} blocks, {total} payload bytes; nothing written",
            slots.len()
        );
    } else {
        println!(
            "wrote {} blocks ({total} payload bytes) to {}",
            slots.len(),
            a.out.display()
        );
    }
    Ok(())
}

fn parse_skill(name: &str) -> Result<Skill> {
    Skill::parse(name).with_context(|| {
        let names: Vec<_> = Skill::ALL.iter().map(|s| s.name()).collect();
        format!("unknown skill {name:?}; one of {}", names.join(", "))
    })
}

fn print_route_header(r: &routes::Router) {
    let s = &r.sizes;
    println!(
        "bytes: shared + routers {}, experts {} ({} each), whole model {}",
        s.always,
        s.all_experts,
        s.expert
            .first()
            .and_then(|l| l.first())
            .copied()
            .unwrap_or(0),
        s.whole
    );
    println!(
        "per prompt (greedy answer, CPU reference engine): distinct experts used per layer, \
         needed expert bytes / all expert bytes, (shared + routers + needed experts) / whole model; \
         averages over prompts"
    );
}

fn cmd_routes(a: &RoutesArgs) -> Result<()> {
    let mut r = routes::Router::load_quant(&a.model, a.quant)?;
    print_route_header(&r);
    if let Some(p) = &a.prompt {
        let route = r.route_text(p, a.max_tokens)?;
        let answer = r.tok.decode(&route.answer, true).unwrap_or_default();
        println!("{p:?} -> {answer:?}");
        let s = routes::Summary::of("prompt", &[&route], &r.sizes);
        println!("  {}", s.line());
        for (l, row) in route.tokens.iter().enumerate() {
            let used: Vec<String> = row
                .iter()
                .enumerate()
                .filter(|(_, &c)| c > 0)
                .map(|(e, c)| format!("expert{e}={c}"))
                .collect();
            println!("  layer{l}: {}", used.join(" "));
        }
        return Ok(());
    }
    let skill = a.skill.as_deref().map(parse_skill).transpose()?;
    let corpus = Corpus::default_corpus();
    let held = eval::tokenize(&r.tok, &corpus.held_out)?;
    let mut all = Vec::new();
    for (s, unseen) in eval::groups() {
        if skill.is_some_and(|k| k != s) {
            continue;
        }
        let ex: Vec<_> = held
            .iter()
            .filter(|e| e.skill == s && e.unseen == unseen)
            .cloned()
            .collect();
        let routes = r.route_examples(&ex)?;
        let refs: Vec<_> = routes.iter().collect();
        println!(
            "  {}",
            routes::Summary::of(&eval::group_name(s, unseen), &refs, &r.sizes).line()
        );
        all.extend(routes);
    }
    if let Some(s) = skill {
        let refs: Vec<_> = all.iter().collect();
        let sum = routes::Summary::of(s.name(), &refs, &r.sizes);
        println!("tokens routed per expert for {s} (held-out prompts and greedy answers):");
        for (l, row) in sum.tokens.iter().enumerate() {
            let mut v: Vec<(usize, u64)> = row.iter().copied().enumerate().collect();
            v.sort_by_key(|a| std::cmp::Reverse(a.1));
            let line: Vec<String> = v
                .iter()
                .map(|(e, c)| format!("layer{l}.expert{e}={c}"))
                .collect();
            println!("  {}", line.join(" "));
        }
        println!(
            "improve --skill {s} picks by default: {}",
            r.most_used_expert(s)?
        );
    } else {
        let refs: Vec<_> = all.iter().collect();
        println!("  {}", routes::Summary::of("all", &refs, &r.sizes).line());
    }
    Ok(())
}

fn cmd_eval(a: &EvalArgs) -> Result<()> {
    let dir = web_node::model::load::ModelDir::load(&a.model)?;
    let mut m = web_node::model::reference::CpuModel::from_model_dir(&dir)?;
    if a.quant.is_some() {
        m.set_source(miner::infer::expert_source(&dir, a.quant)?);
    }
    let tok = dir.tokenizer.inner().clone();
    let corpus = Corpus::default_corpus();
    let public = eval::tokenize(&tok, &corpus.public_eval)?;
    let loss = eval::eval_loss(&mut m, &public)?;
    let held = eval::tokenize(&tok, &corpus.held_out)?;
    let acc = eval::accuracy(&mut m, &tok, &held)?;
    if a.show_errors {
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
            "  {:<11} {:>3}/{:<3} {:>6.1}%",
            a.name(),
            a.correct,
            a.total,
            100.0 * a.fraction()
        );
    }
    let (c, t) = acc
        .iter()
        .fold((0, 0), |(c, t), a| (c + a.correct, t + a.total));
    println!(
        "  {:<11} {:>3}/{:<3} {:>6.1}%",
        "all",
        c,
        t,
        100.0 * c as f64 / t.max(1) as f64
    );
    Ok(())
}

fn cmd_improve(a: &ImproveArgs) -> Result<()> {
    let skill = parse_skill(&a.skill)?;
    let key = blocks::load_key(&a.key)?;
    let tmp;
    let given = a.expert.as_deref().map(Slot::parse).transpose()?;
    let (dir, meta, model) = match (a.relay.as_deref(), &a.model) {
        (Some(r), _) => {
            tmp = tempfile::tempdir()?;
            let chain = client::RelayChain::sync(r)?;
            let model = client::export_from(&chain, a.meta_hash, tmp.path())?;
            (tmp.path().to_path_buf(), model.meta, Some(model))
        }
        (None, Some(m)) => {
            let meta = a.meta_hash.context("--model needs --meta-hash")?;
            (m.clone(), meta, None)
        }
        (None, None) => bail!("give --relay URL or --model DIR"),
    };
    let slot = match given {
        Some(s) => s,
        None => {
            let s = routes::Router::load(&dir)?.most_used_expert(skill)?;
            println!("{skill} is routed most to {s}: improving it (choose another with --expert)");
            s
        }
    };
    let parents = match &model {
        Some(m) => {
            let head = m
                .head(slot)
                .with_context(|| format!("the relay has no head for {slot}"))?;
            vec![head]
        }
        None => a.parent.into_iter().collect(),
    };
    let res = improve::improve(&dir, slot, skill, a.steps, a.lr, a.seed)?;
    println!(
        "{slot} on {skill}: public-eval loss {:.5} -> {:.5} ({:+.5})",
        res.baseline_loss,
        res.loss,
        res.loss - res.baseline_loss
    );
    if res.loss >= res.baseline_loss && !a.force {
        bail!(
            "no improvement: public-eval loss {:.5} is not below the current {:.5}; nothing published \
             (try another --expert, --skill, --steps or --lr)",
            res.loss,
            res.baseline_loss
        );
    }
    let claimed = a.claim.unwrap_or(res.loss as f32);
    let (block, payload) =
        blocks::signer(&key, &a.address).slot_block(meta, &res.payload, parents, Some(claimed));
    let path = blocks::write_block_file(&a.out, &block, &payload)?;
    println!(
        "block {} ({}) written to {}",
        block.hash,
        slot,
        path.display()
    );
    if let Some(r) = &a.relay {
        let body = blocks::block_file_bytes(&block, &payload);
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
    match &cli.cmd {
        Cmd::Chat(a) => miner::infer::chat(a),
        Cmd::Logits(a) => miner::infer::logits(a),
        Cmd::Keygen(a) => {
            let key = blocks::keygen(&a.out)?;
            println!("{}", hex::encode(key.verifying_key().to_bytes()));
            eprintln!("secret key written to {}", a.out.display());
            Ok(())
        }
        Cmd::Genesis(a) => cmd_genesis(a),
        Cmd::Import(a) => cmd_import(a),
        Cmd::Publish(a) => {
            let hashes = client::publish_dir(&a.relay, &a.dir)?;
            println!("published {} blocks to {}", hashes.len(), a.relay);
            Ok(())
        }
        Cmd::Export(a) => {
            let meta = client::export(&a.relay, a.meta_hash, &a.out)?;
            println!("exported the heads of meta {meta} to {}", a.out.display());
            Ok(())
        }
        Cmd::Routes(a) => cmd_routes(a),
        Cmd::Eval(a) => cmd_eval(a),
        Cmd::Improve(a) => cmd_improve(a),
        Cmd::Train(a) => train::run(a),
        Cmd::Peer(a) => miner::peer::cli(a),
        Cmd::Demo(a) => miner::demo::cli(a),
        Cmd::Quantize(a) => miner::quant::quantize(a).map(|_| ()),
        Cmd::VerifyQuant(a) => miner::quant::verify(a),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn every_command_parses_and_documents_its_flags() {
        Cli::command().debug_assert();
        for sub in Cli::command().get_subcommands() {
            for arg in sub.get_arguments() {
                assert!(
                    arg.get_help().is_some(),
                    "aiblock {} --{}: no help text",
                    sub.get_name(),
                    arg.get_id()
                );
            }
        }
    }
}
