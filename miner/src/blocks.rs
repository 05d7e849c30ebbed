//! Keys, model directories, and a checkpoint split into signed chain blocks.
//!
//! A block file (`NAME.block`) is exactly the body of the relay's binary
//! upload `POST /blocks`: the envelope ([`Block::encode`]) followed by the
//! payload.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use ed25519_dalek::SigningKey;
use web_node::chain::{
    limits::DEFAULT_CHUNK_SIZE, now_ms, validate_block, Block, BlockHash, BlockKind, Dag,
    MetaPayload,
};
use web_node::model::checkpoint::{self, Signer, SlotPayload};
use web_node::model::Config;

/// Generate a key and write its 32-byte secret as hex (file mode 0600 on Unix).
pub fn keygen(path: &Path) -> Result<SigningKey> {
    if path.exists() {
        bail!(
            "{} already exists; refusing to overwrite a key",
            path.display()
        );
    }
    let key = SigningKey::generate(&mut rand_core::OsRng);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    use std::io::Write;
    let mut f = opts
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    writeln!(f, "{}", hex::encode(key.to_bytes()))?;
    Ok(key)
}

/// Read a key written by [`keygen`].
pub fn load_key(path: &Path) -> Result<SigningKey> {
    let s =
        std::fs::read_to_string(path).with_context(|| format!("reading key {}", path.display()))?;
    let mut b = [0u8; 32];
    hex::decode_to_slice(s.trim(), &mut b)
        .map_err(|e| anyhow!("{}: not a 64-hex-character key: {e}", path.display()))?;
    Ok(SigningKey::from_bytes(&b))
}

/// A Hugging Face model directory.
pub struct ModelFiles {
    pub config_json: serde_json::Value,
    pub config: Config,
    pub tokenizer_json: Option<serde_json::Value>,
    pub weights: Vec<u8>,
}

impl ModelFiles {
    /// Read config.json, tokenizer.json (optional) and model.safetensors.
    pub fn read(dir: &Path) -> Result<Self> {
        let cp = dir.join("config.json");
        let bytes = std::fs::read(&cp).with_context(|| format!("reading {}", cp.display()))?;
        let config_json: serde_json::Value =
            serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", cp.display()))?;
        let config = Config::from_value(&config_json).with_context(|| cp.display().to_string())?;
        let tp = dir.join("tokenizer.json");
        let tokenizer_json = if tp.exists() {
            let t = std::fs::read(&tp).with_context(|| format!("reading {}", tp.display()))?;
            Some(serde_json::from_slice(&t).with_context(|| format!("parsing {}", tp.display()))?)
        } else {
            None
        };
        let wp = dir.join("model.safetensors");
        let weights = std::fs::read(&wp).with_context(|| format!("reading {}", wp.display()))?;
        Ok(Self {
            config_json,
            config,
            tokenizer_json,
            weights,
        })
    }
}

/// Split a checkpoint into one payload per slot (see
/// [`web_node::model::checkpoint::split_checkpoint`]): refused unless its
/// tensors are exactly those the config implies.
pub fn split_checkpoint(cfg: &Config, weights: &[u8]) -> Result<Vec<SlotPayload>> {
    checkpoint::split_checkpoint(cfg, &[weights])
        .map_err(|e| anyhow!("checkpoint does not match the meta config: {e}"))
}

/// Join slot payloads back into one checkpoint (tensor bytes unchanged).
pub fn join_payloads(payloads: &[Vec<u8>]) -> Result<Vec<u8>> {
    let refs: Vec<&[u8]> = payloads.iter().map(|p| p.as_slice()).collect();
    Ok(checkpoint::join_slots(&refs)?)
}

/// The signer of a user's blocks: `key`, `address`, now, the default chunk size.
pub fn signer<'a>(key: &'a SigningKey, address: &str) -> Signer<'a> {
    Signer {
        key,
        address: address.to_string(),
        timestamp_ms: now_ms(),
        chunk_size: DEFAULT_CHUNK_SIZE,
    }
}

/// Build and sign the chain-A meta block of a model directory (genesis: no
/// parent) and check it against every standalone and payload rule before
/// anyone sees it.
pub fn meta_block(
    model_name: &str,
    files: &ModelFiles,
    signer: &Signer<'_>,
) -> Result<(Block, Vec<u8>)> {
    let meta = MetaPayload::new(
        model_name,
        files.config_json.clone(),
        files.tokenizer_json.clone(),
    )?;
    let (block, payload) = signer.meta_block(&meta, None)?;
    // An empty chain: the rules that need no other block.
    validate_block(&block, &payload, &Dag::new())?;
    Ok((block, payload))
}

/// The bytes of a block file / binary upload: envelope then payload.
pub fn block_file_bytes(block: &Block, payload: &[u8]) -> Vec<u8> {
    let mut v = block.encode();
    v.extend_from_slice(payload);
    v
}

/// Parse a block file into the block and its payload (checked against the header).
pub fn parse_block_file(bytes: &[u8]) -> Result<(Block, Vec<u8>)> {
    let (block, used) = Block::decode_prefix(bytes)?;
    let payload = bytes[used..].to_vec();
    web_node::chain::check_payload_integrity(&block.header, &payload)?;
    Ok((block, payload))
}

/// Write a block file `DIR/NAME.block`; returns its path.
pub fn write_block_file(dir: &Path, block: &Block, payload: &[u8]) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("{}.block", block.header.name));
    let tmp = dir.join(format!(".{}.block.tmp", block.header.name));
    std::fs::write(&tmp, block_file_bytes(block, payload))?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// Read a meta block file and check it hashes to `expected`; returns its config.
pub fn meta_config_from_file(path: &Path, expected: &BlockHash) -> Result<(Block, Config)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let (block, payload) = parse_block_file(&bytes)?;
    if block.hash != *expected {
        bail!(
            "{} holds block {}, not the --meta-hash {}",
            path.display(),
            block.hash,
            expected
        );
    }
    if block.header.kind != BlockKind::Meta {
        bail!(
            "{} is a {} block, not a meta block",
            path.display(),
            block.header.kind.as_str()
        );
    }
    block.verify_signature()?;
    let (_, cfg) = MetaPayload::parse(&payload)?;
    Ok((block, cfg))
}
