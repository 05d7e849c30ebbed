//! Helpers of `scripts/bench-scale.sh` (not a test):
//!
//! - `bench_scale write DIR`: a random checkpoint of a real MoE shape
//!   (OLMoE-1B-7B by default), written tensor by tensor: the safetensors
//!   header first (every name, shape and offset is known from the config),
//!   then each tensor's random values in 1 MiB pieces. The model is never
//!   in memory. Sizes from the environment: `AIBLOCK_SCALE_LAYERS` (16),
//!   `_EXPERTS` (64), `_TOPK` (8), `_HIDDEN` (2048), `_EXPERT_WIDTH`
//!   (1024), `_VOCAB` (50304), `_FAMILY` (`olmoe` or `mixtral`),
//!   `_DTYPE` (`f16` or `f32`).
//! - `bench_scale compare A B`: two safetensors files tensor by tensor
//!   (the streamed file's layout is not the canonical one `export` writes,
//!   so the files are not byte-identical).
//! - `bench_scale sync URL`: the client core's sync of a relay, timed in
//!   its two phases: listing (both chains, page by page, and the chain-A
//!   payloads) and header verification (every block, natively).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufWriter, Read, Write};
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use web_node::client::{link_has_next, ChainSync, ModelPick, Step};
use web_node::model::random::{config_json, small_config, tokenizer_json};
use web_node::model::{Config, Family, Slot};

fn env(name: &str, default: usize) -> Result<usize> {
    match std::env::var(format!("AIBLOCK_SCALE_{name}")) {
        Ok(v) => v
            .parse()
            .with_context(|| format!("AIBLOCK_SCALE_{name}={v:?} is not a number")),
        Err(_) => Ok(default),
    }
}

/// The benchmark's config: OLMoE-1B-7B's shape, scaled by the environment.
fn config() -> Result<Config> {
    let (layers, experts, topk) = (env("LAYERS", 16)?, env("EXPERTS", 64)?, env("TOPK", 8)?);
    let (hidden, width, vocab) = (
        env("HIDDEN", 2048)?,
        env("EXPERT_WIDTH", 1024)?,
        env("VOCAB", 50304)?,
    );
    // OLMoE: head_dim 128, no grouped KV heads; fewer heads when smaller.
    let heads = (hidden / 128).max(2);
    let mut c = small_config(vocab, hidden, width, layers, heads, heads);
    c.num_local_experts = experts;
    c.num_experts_per_tok = topk;
    c.max_position_embeddings = 4096;
    let family = std::env::var("AIBLOCK_SCALE_FAMILY").unwrap_or_else(|_| "olmoe".into());
    match family.as_str() {
        "olmoe" => {
            c.model_type = Some(Family::Olmoe.model_type().into());
            c.family_fields.num_experts = Some(experts);
            c.family_fields.norm_topk_prob = Some(false);
        }
        "mixtral" => {}
        other => bail!("AIBLOCK_SCALE_FAMILY={other:?}: olmoe or mixtral"),
    }
    c.validate()?;
    Ok(c)
}

/// The random tokenizer, padded with `<padN>` tokens to the model's vocabulary
/// (every id the model can sample decodes).
fn tokenizer(vocab: usize) -> Result<Vec<u8>> {
    let mut t: serde_json::Value = serde_json::from_slice(&tokenizer_json()?)?;
    let v = t["model"]["vocab"]
        .as_object_mut()
        .context("tokenizer without a vocab")?;
    for id in v.len()..vocab {
        v.insert(format!("<pad{id}>"), id.into());
    }
    Ok(serde_json::to_vec(&t)?)
}

/// SplitMix64: fast, deterministic.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn pm1(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

fn write(dir: &Path) -> Result<()> {
    let t0 = Instant::now();
    let cfg = config()?;
    let f16 = match std::env::var("AIBLOCK_SCALE_DTYPE").as_deref() {
        Ok("f32") => false,
        Ok("f16") | Err(_) => true,
        Ok(other) => bail!("AIBLOCK_SCALE_DTYPE={other:?}: f16 or f32"),
    };
    let (dtype, width) = if f16 { ("F16", 2u64) } else { ("F32", 4u64) };
    let mut cfg_out = cfg.clone();
    cfg_out.torch_dtype = Some(if f16 { "float16" } else { "float32" }.into());
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("config.json"), config_json(&cfg_out)?)?;
    std::fs::write(dir.join("tokenizer.json"), tokenizer(cfg.vocab_size)?)?;
    // Every tensor, slot by slot, and its offsets.
    let mut specs = Vec::new();
    for slot in Slot::all(&cfg) {
        for spec in slot.tensors(&cfg) {
            specs.push((slot, spec));
        }
    }
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut offset = 0u64;
    for (_, s) in &specs {
        let n: u64 = s.shape.iter().map(|&d| d as u64).product();
        header.insert(
            s.name.clone(),
            serde_json::json!({"dtype": dtype, "shape": s.shape, "data_offsets": [offset, offset + n * width]}),
        );
        offset += n * width;
    }
    let mut h = serde_json::to_vec(&header)?;
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let file = std::fs::File::create(dir.join("model.safetensors"))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    out.write_all(&(h.len() as u64).to_le_bytes())?;
    out.write_all(&h)?;
    let mut rng = Rng(22);
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
    for (slot, s) in &specs {
        let n: usize = s.shape.iter().product();
        let scale = if s.name.ends_with(".bias") {
            0.1
        } else if s.shape.len() == 1 {
            0.0
        } else if s.name == "model.embed_tokens.weight" {
            1.0
        } else if matches!(slot, Slot::Router { .. }) {
            3.0 / (s.shape[1] as f32).sqrt()
        } else {
            3f32.sqrt() / (s.shape[1] as f32).sqrt()
        };
        let base = if s.shape.len() == 1 && !s.name.ends_with(".bias") {
            1.0
        } else {
            0.0
        };
        let mut left = n;
        while left > 0 {
            let k = left.min((1 << 20) / width as usize);
            buf.clear();
            for _ in 0..k {
                let x = base + scale * rng.pm1() + if scale == 0.0 { 0.1 * rng.pm1() } else { 0.0 };
                if f16 {
                    buf.extend(half::f16::from_f32(x).to_le_bytes());
                } else {
                    buf.extend(x.to_le_bytes());
                }
            }
            out.write_all(&buf)?;
            left -= k;
        }
    }
    out.flush()?;
    let params: u64 = offset / width;
    println!(
        "wrote {} ({} layers x {} experts, top-{}, hidden {}, expert width {}, vocab {}, {dtype}): {} tensors, {:.1} M parameters, {:.1} MB, in {:.1} s",
        dir.display(),
        cfg.num_hidden_layers,
        cfg.num_local_experts,
        cfg.num_experts_per_tok,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.vocab_size,
        specs.len(),
        params as f64 / 1e6,
        (offset + 8 + h.len() as u64) as f64 / 1e6,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

fn sync(relay: &str) -> Result<()> {
    let base = relay.trim_end_matches('/');
    let agent = ureq::AgentBuilder::new().build();
    let get = |url: &str| -> Result<(Vec<u8>, Option<String>)> {
        let r = agent
            .get(url)
            .call()
            .with_context(|| format!("GET {url}"))?;
        let link = r.header("link").map(str::to_string);
        let mut v = Vec::new();
        r.into_reader().read_to_end(&mut v)?;
        Ok((v, link))
    };
    let t0 = Instant::now();
    let mut s = ChainSync::new(1000);
    let (mut pages, mut bytes) = (0usize, 0usize);
    loop {
        match s.next() {
            Step::List(req) => {
                let (body, link) = get(&format!("{base}{}", req.path()))?;
                pages += 1;
                bytes += body.len();
                s.on_page(req.chain, &body, Some(link_has_next(link.as_deref())))?;
            }
            Step::MetaPayload(h) => {
                let (body, _) = get(&format!("{base}/blocks/{h}/payload"))?;
                bytes += body.len();
                s.on_meta_payload(h, Ok(body));
            }
            Step::Done => break,
        }
    }
    let listed = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let synced = s.finish()?;
    let verified = t1.elapsed().as_secs_f64();
    let model = synced.model(&ModelPick::Latest)?;
    println!(
        "listing: {} blocks in {pages} pages + chain-A payloads, {:.1} MB, {:.3} s",
        synced.total(),
        bytes as f64 / 1e6,
        listed
    );
    println!(
        "header verification (native): {} verified, {} failed, {:.3} s ({:.0} blocks/s); model {} with {} slot heads",
        synced.report.verified,
        synced.report.failed,
        verified,
        synced.total() as f64 / verified.max(1e-9),
        model.name,
        model.heads.len()
    );
    if synced.report.failed > 0 {
        bail!("{} blocks failed verification", synced.report.failed);
    }
    Ok(())
}

/// A safetensors file's header: name -> (dtype, shape, data range), and
/// where the data starts.
type Header = (
    std::collections::BTreeMap<String, (String, Vec<u64>, u64, u64)>,
    u64,
);

fn read_header(path: &Path) -> Result<Header> {
    let mut f = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    let mut n = [0u8; 8];
    f.read_exact(&mut n)?;
    let n = u64::from_le_bytes(n);
    if n > 100 << 20 {
        bail!("{}: a header of {n} bytes", path.display());
    }
    let mut h = vec![0u8; n as usize];
    f.read_exact(&mut h)?;
    let v: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&h)?;
    let mut out = std::collections::BTreeMap::new();
    for (name, t) in v {
        if name == "__metadata__" {
            continue;
        }
        let (Some(dtype), Some(shape), Some(off)) = (
            t["dtype"].as_str(),
            t["shape"].as_array(),
            t["data_offsets"].as_array(),
        ) else {
            bail!("{}: bad entry {name}", path.display());
        };
        let shape = shape.iter().filter_map(serde_json::Value::as_u64).collect();
        let (a, b) = (off[0].as_u64().unwrap_or(0), off[1].as_u64().unwrap_or(0));
        out.insert(name, (dtype.to_string(), shape, a, b));
    }
    Ok((out, 8 + n))
}

/// Compare two safetensors files tensor by tensor (names, dtypes, shapes,
/// bytes), streaming 1 MiB at a time.
fn compare(a: &Path, b: &Path) -> Result<()> {
    use std::io::{Seek, SeekFrom};
    let ((ha, da), (hb, db)) = (read_header(a)?, read_header(b)?);
    if ha.keys().ne(hb.keys()) {
        bail!("the tensor names differ");
    }
    let (mut fa, mut fb) = (std::fs::File::open(a)?, std::fs::File::open(b)?);
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut bytes = 0u64;
    for (name, (ta, sa, a0, a1)) in &ha {
        let (tb, sb, b0, b1) = &hb[name];
        if ta != tb || sa != sb || a1 - a0 != b1 - b0 {
            bail!("{name}: {ta} {sa:?} vs {tb} {sb:?}");
        }
        fa.seek(SeekFrom::Start(da + a0))?;
        fb.seek(SeekFrom::Start(db + b0))?;
        let mut left = a1 - a0;
        while left > 0 {
            let k = left.min(1 << 20) as usize;
            fa.read_exact(&mut ba[..k])?;
            fb.read_exact(&mut bb[..k])?;
            if ba[..k] != bb[..k] {
                bail!("{name}: the bytes differ");
            }
            left -= k as u64;
            bytes += k as u64;
        }
    }
    println!("same tensors: {} tensors, {bytes} bytes", ha.len());
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["write", dir] => write(Path::new(dir)),
        ["sync", url] => sync(url),
        ["compare", a, b] => compare(Path::new(a), Path::new(b)),
        _ => bail!("usage: bench_scale write DIR | sync URL | compare A.safetensors B.safetensors"),
    }
}
