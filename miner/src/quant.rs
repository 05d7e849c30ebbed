//! `aiblock quantize` and `aiblock verify-quant`: a quantized model as its
//! own chain-A meta block with chain-B blocks that name their source block,
//! and the re-derivation anyone can run against a relay or block files.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use web_node::chain::{Block, BlockHash, BlockKind, MetaPayload};
use web_node::model::quant_chain::{quantize_model, verify_quant_block, BlockWithPayload};
use web_node::model::{Config, QuantFormat};

use crate::blocks::{load_key, parse_block_file, signer, write_block_file};
use crate::client;

/// `aiblock quantize`.
#[derive(Debug, Clone, clap::Args)]
pub struct QuantizeArgs {
    /// Take the source model's current heads from this relay, and publish
    /// the quantized model there.
    #[arg(long, conflicts_with = "blocks")]
    pub relay: Option<String>,
    /// The source model's meta block (default: the relay's only model).
    #[arg(long)]
    pub meta_hash: Option<BlockHash>,
    /// Take the source blocks from a directory of block files (as `genesis`
    /// and `import` write them) instead; the result is only written.
    #[arg(long)]
    pub blocks: Option<PathBuf>,
    /// `q8_0` or `q4_0`.
    #[arg(long, value_parser = crate::infer::parse_quant)]
    pub quant: QuantFormat,
    /// Key to sign with (a relay accepts a new model's meta block from its
    /// operator key or the keys it lists).
    #[arg(long)]
    pub key: PathBuf,
    /// Display address recorded in the block headers.
    #[arg(long, default_value = "operator")]
    pub address: String,
    /// Where to write the block files (default: `blocks-<format>`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// With --relay: write the block files only.
    #[arg(long)]
    pub no_publish: bool,
    /// Threads quantizing experts (the blocks do not depend on it).
    #[arg(long)]
    pub threads: Option<usize>,
}

/// `aiblock verify-quant`.
#[derive(Debug, Clone, clap::Args)]
pub struct VerifyQuantArgs {
    /// Check the quantized model on this relay ...
    #[arg(long, conflicts_with = "blocks")]
    pub relay: Option<String>,
    /// ... whose meta block is this (default: every quantized model listed).
    #[arg(long)]
    pub meta_hash: Option<BlockHash>,
    /// Or check the block files of a directory (sources in the same
    /// directory or in --sources).
    #[arg(long)]
    pub blocks: Option<PathBuf>,
    /// Directory of the source block files (with --blocks).
    #[arg(long)]
    pub sources: Option<PathBuf>,
}

fn read_dir_blocks(dir: &Path) -> Result<Vec<BlockWithPayload>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("block") {
            continue;
        }
        let bytes = std::fs::read(&path)?;
        out.push(parse_block_file(&bytes).with_context(|| format!("{}", path.display()))?);
    }
    out.sort_by(|a, b| a.0.header.name.cmp(&b.0.header.name));
    Ok(out)
}

/// The source meta block and its slot heads, from a relay or a directory.
fn source_model(a: &QuantizeArgs) -> Result<(BlockWithPayload, Vec<BlockWithPayload>)> {
    if let Some(relay) = &a.relay {
        let chain = client::RelayChain::sync(relay)?;
        let model = chain.model(a.meta_hash)?;
        let meta = chain.payload(&model.meta)?;
        let heads = model
            .heads
            .values()
            .map(|h| chain.payload(h))
            .collect::<Result<Vec<_>>>()?;
        return Ok((meta, heads));
    }
    let dir = a
        .blocks
        .as_ref()
        .ok_or_else(|| anyhow!("pass --relay URL or --blocks DIR"))?;
    let all = read_dir_blocks(dir)?;
    let metas: Vec<&BlockWithPayload> = all
        .iter()
        .filter(|(b, _)| b.header.kind == BlockKind::Meta)
        .filter(|(b, _)| a.meta_hash.is_none_or(|h| h == b.hash))
        .collect();
    let meta = match metas.as_slice() {
        [one] => (*one).clone(),
        [] => bail!(
            "{} holds no meta block{}",
            dir.display(),
            a.meta_hash.map(|h| format!(" {h}")).unwrap_or_default()
        ),
        _ => bail!(
            "{} holds {} meta blocks; pass --meta-hash",
            dir.display(),
            metas.len()
        ),
    };
    // The newest version of every slot under it (a block no other names as parent).
    let under: Vec<&BlockWithPayload> = all
        .iter()
        .filter(|(b, _)| b.header.meta == Some(meta.0.hash))
        .collect();
    let parents: std::collections::HashSet<BlockHash> = under
        .iter()
        .flat_map(|(b, _)| b.header.parents.iter().copied())
        .collect();
    let heads: Vec<BlockWithPayload> = under
        .into_iter()
        .filter(|(b, _)| !parents.contains(&b.hash))
        .cloned()
        .collect();
    Ok((meta, heads))
}

/// `aiblock quantize`: returns the new meta block's hash.
pub fn quantize(a: &QuantizeArgs) -> Result<BlockHash> {
    let key = load_key(&a.key)?;
    let (meta, heads) = source_model(a)?;
    let (m, cfg) = MetaPayload::parse(&meta.1)?;
    if cfg.expert_quant()?.is_some() {
        bail!("{} ({}) is already quantized", m.model_name, meta.0.hash);
    }
    let expected = web_node::model::Slot::all(&cfg).len();
    if heads.len() != expected {
        bail!(
            "model {} has {} slot heads, its config implies {expected}",
            m.model_name,
            heads.len()
        );
    }
    let threads = a
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let started = std::time::Instant::now();
    let blocks = quantize_model(&meta, &heads, a.quant, &signer(&key, &a.address), threads)?;
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("blocks-{}", a.quant)));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let (mut before, mut after) = (0u64, 0u64);
    for ((b, p), src) in blocks.iter().skip(1).zip(&heads) {
        if b.header.kind == BlockKind::Expert {
            before += src.1.len() as u64;
            after += p.len() as u64;
        }
    }
    for (b, p) in &blocks {
        write_block_file(&out, b, p)?;
    }
    let new_meta = blocks[0].0.hash;
    println!(
        "quantized {} to {} in {:.1} s: {} blocks in {} (meta {new_meta}); expert blocks {} -> {} bytes ({:.2}x smaller)",
        m.model_name,
        a.quant,
        started.elapsed().as_secs_f64(),
        blocks.len(),
        out.display(),
        before,
        after,
        before as f64 / after.max(1) as f64
    );
    if let (Some(relay), false) = (&a.relay, a.no_publish) {
        client::publish_dir(relay, &out)?;
        println!("published {} blocks to {relay}", blocks.len());
    }
    Ok(new_meta)
}

/// The result of checking one quantized block.
#[derive(Debug)]
pub struct Checked {
    pub name: String,
    pub hash: BlockHash,
    /// `None`: no float parent of the slot is known (a version a miner
    /// made; the quality gate judged it), so there is nothing to re-derive.
    pub result: Option<Result<(), String>>,
}

fn check_all(
    cfg: &Config,
    blocks: &[BlockWithPayload],
    mut source: impl FnMut(&Block) -> Result<Option<BlockWithPayload>>,
) -> Result<Vec<Checked>> {
    let mut out = Vec::new();
    for (b, p) in blocks {
        if b.header.dtype.quant().is_none() {
            continue;
        }
        let result = source(b)?.map(|src| {
            verify_quant_block(cfg, &(b.clone(), p.clone()), &src).map_err(|e| e.to_string())
        });
        out.push(Checked {
            name: b.header.name.clone(),
            hash: b.hash,
            result,
        });
    }
    Ok(out)
}

/// `aiblock verify-quant`: prints one line per quantized block; `Err` if any
/// block is not the quantization of its source.
pub fn verify(a: &VerifyQuantArgs) -> Result<()> {
    let checked = if let Some(relay) = &a.relay {
        let chain = client::RelayChain::sync(relay)?;
        let by_hash: HashMap<BlockHash, &web_node::net::api::BlockInfo> =
            chain.synced.b.iter().map(|i| (i.hash, i)).collect();
        // The model named, or every verified model head of chain A.
        let metas: Vec<BlockHash> = match a.meta_hash {
            Some(m) => vec![m],
            None => chain
                .synced
                .dag
                .heads()
                .filter(|(k, _)| k.0.is_none())
                .map(|(_, h)| *h)
                .collect(),
        };
        let mut all = Vec::new();
        for meta in metas {
            let model = chain.model(Some(meta))?;
            let cfg = &model.config;
            if cfg.expert_quant()?.is_none() {
                if a.meta_hash.is_some() {
                    bail!("model {meta} is not quantized");
                }
                continue;
            }
            let heads: Vec<BlockWithPayload> = model
                .heads
                .iter()
                .filter(|(name, _)| name.contains(".expert"))
                .map(|(_, h)| chain.payload(h))
                .collect::<Result<_>>()?;
            let found = check_all(cfg, &heads, |b| {
                let src = b.header.parents.iter().find_map(|p| {
                    by_hash
                        .get(p)
                        .filter(|i| i.name == b.header.name && i.meta != b.header.meta)
                });
                src.map(|i| chain.payload(&i.hash)).transpose()
            })?;
            all.extend(found);
        }
        all
    } else {
        let dir = a
            .blocks
            .as_ref()
            .ok_or_else(|| anyhow!("pass --relay URL or --blocks DIR"))?;
        let blocks = read_dir_blocks(dir)?;
        let sources = match &a.sources {
            Some(s) => read_dir_blocks(s)?,
            None => blocks.clone(),
        };
        let by_hash: HashMap<BlockHash, &BlockWithPayload> =
            sources.iter().map(|bp| (bp.0.hash, bp)).collect();
        let mut all = Vec::new();
        for (mb, mp) in blocks
            .iter()
            .filter(|(b, _)| b.header.kind == BlockKind::Meta)
        {
            let (_, cfg) = MetaPayload::parse(mp)?;
            if cfg.expert_quant()?.is_none() {
                continue;
            }
            let under: Vec<BlockWithPayload> = blocks
                .iter()
                .filter(|(b, _)| b.header.meta == Some(mb.hash))
                .cloned()
                .collect();
            all.extend(check_all(&cfg, &under, |b| {
                Ok(b.header.parents.iter().find_map(|p| {
                    by_hash
                        .get(p)
                        .filter(|s| s.0.header.name == b.header.name)
                        .map(|s| (*s).clone())
                }))
            })?);
        }
        all
    };
    if checked.is_empty() {
        bail!("no quantized expert block found");
    }
    let mut bad = 0;
    for c in &checked {
        match &c.result {
            Some(Ok(())) => println!("ok        {} {}", c.name, c.hash),
            Some(Err(e)) => {
                bad += 1;
                println!("MISMATCH  {} {}: {e}", c.name, c.hash);
            }
            None => println!(
                "no source {} {}: no float parent of the slot is known (a new version; the quality gate judged it)",
                c.name, c.hash
            ),
        }
    }
    if bad > 0 {
        bail!(
            "{bad} of {} quantized blocks are not the quantization of their source",
            checked.len()
        );
    }
    let derived = checked.iter().filter(|c| c.result.is_some()).count();
    println!("{derived} quantized blocks re-derive exactly from their sources");
    Ok(())
}
