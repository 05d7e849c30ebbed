//! The operator key and the genesis blocks of a Hugging Face model directory.
//!
//! Genesis = one chain-A meta block (spec + config.json + tokenizer.json) and,
//! when the directory holds `model.safetensors`, one chain-B block per slot
//! (shared, `layerN.router`, `layerN.expertM`), all signed by the operator.
//!
//! Layer: foundation (base). May import: nothing of the crate (the base of the foundation, layer 0 of `scripts/relay_layers.py`).

use std::fs;
use std::io::Write;
use std::path::Path;

use ed25519_dalek::SigningKey;
use web_node::chain::{limits, Block, MetaPayload};
use web_node::model::checkpoint::{plan_checkpoint, Signer};

use crate::RelayError;

/// Display address of operator-signed blocks.
pub const OPERATOR_ADDRESS: &str = "operator";

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Load `data/operator.key` (hex ed25519 secret), creating it (mode 0600) on first start.
pub fn operator_key(data_dir: &Path) -> Result<SigningKey, RelayError> {
    let path = data_dir.join("operator.key");
    if path.exists() {
        let text = fs::read_to_string(&path)?;
        let mut secret = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut secret).map_err(|e| {
            RelayError::Key(format!("{}: not a hex ed25519 secret: {e}", path.display()))
        })?;
        return Ok(SigningKey::from_bytes(&secret));
    }
    let key = SigningKey::generate(&mut rand_core::OsRng);
    let tmp = data_dir.join("operator.key.tmp");
    {
        let mut opts = fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(&tmp)?;
        f.write_all(hex::encode(key.to_bytes()).as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()?;
    }
    fs::rename(&tmp, &path)?;
    tracing::info!(public_key = %hex::encode(key.verifying_key().to_bytes()), path = %path.display(), "operator key created");
    Ok(key)
}

/// The model name of a directory: config `_name_or_path` (last component) or the dir name.
pub fn model_name(dir: &Path, config: &serde_json::Value) -> String {
    let from_cfg = config
        .get("_name_or_path")
        .and_then(|v| v.as_str())
        .and_then(|s| s.trim_end_matches('/').rsplit('/').next())
        .filter(|s| !s.is_empty())
        .map(str::to_string);
    let from_dir = dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    let mut name = from_cfg.or(from_dir).unwrap_or_else(|| "model".into());
    name.truncate(limits::MAX_NAME_LEN);
    name
}

fn signer(key: &SigningKey, timestamp_ms: u64) -> Signer<'_> {
    Signer {
        key,
        address: OPERATOR_ADDRESS.into(),
        timestamp_ms,
        chunk_size: limits::DEFAULT_CHUNK_SIZE,
    }
}

/// The chain-A meta block of a model directory (config.json, optional tokenizer.json).
pub fn meta_block(
    dir: &Path,
    key: &SigningKey,
    timestamp_ms: u64,
) -> Result<(Block, Vec<u8>), RelayError> {
    let g = |m: String| RelayError::Genesis(m);
    let cfg_bytes = fs::read(dir.join("config.json"))
        .map_err(|e| g(format!("{}: {e}", dir.join("config.json").display())))?;
    let config: serde_json::Value =
        serde_json::from_slice(&cfg_bytes).map_err(|e| g(format!("config.json: {e}")))?;
    let tok_path = dir.join("tokenizer.json");
    let tokenizer = if tok_path.is_file() {
        let t = fs::read(&tok_path)?;
        Some(serde_json::from_slice(&t).map_err(|e| g(format!("tokenizer.json: {e}")))?)
    } else {
        None
    };
    let name = model_name(dir, &config);
    let meta = MetaPayload::new(&name, config, tokenizer).map_err(|e| g(e.to_string()))?;
    signer(key, timestamp_ms)
        .meta_block(&meta, None)
        .map_err(|e| g(e.to_string()))
}

/// Genesis blocks of a model directory, one at a time: the meta block,
/// then (if `model.safetensors` exists) one block per slot, split by
/// [`web_node::model::checkpoint::plan_checkpoint`], all signed by `key`.
/// The whole checkpoint is checked before the first block is handed out, so
/// a bad one hands out nothing; then each slot's payload is made, handed to
/// `f` and dropped, so memory holds the checkpoint and one payload, not a
/// copy of the model. `f` returns false to stop. Returns the blocks handed out.
pub fn for_each_genesis_block(
    dir: &Path,
    key: &SigningKey,
    timestamp_ms: u64,
    mut f: impl FnMut(Block, Vec<u8>) -> Result<bool, RelayError>,
) -> Result<usize, RelayError> {
    let (meta, meta_payload) = meta_block(dir, key, timestamp_ms)?;
    let (_, cfg) =
        MetaPayload::parse(&meta_payload).map_err(|e| RelayError::Genesis(e.to_string()))?;
    let ckpt = dir.join("model.safetensors");
    let bytes = if ckpt.is_file() {
        Some(fs::read(&ckpt)?)
    } else {
        None
    };
    let plans = match &bytes {
        Some(b) => plan_checkpoint(&cfg, &[b.as_slice()])
            .map_err(|e| RelayError::Genesis(format!("{}: {e}", ckpt.display())))?,
        None => Vec::new(),
    };
    let meta_hash = meta.hash;
    if !f(meta, meta_payload)? {
        return Ok(1);
    }
    let s = signer(key, timestamp_ms);
    let mut n = 1;
    for plan in plans {
        let slot = plan
            .payload()
            .map_err(|e| RelayError::Genesis(format!("{}: {e}", ckpt.display())))?;
        let (block, payload) = s.slot_block(meta_hash, &slot, Vec::new(), None);
        drop(slot);
        n += 1;
        if !f(block, payload)? {
            break;
        }
    }
    Ok(n)
}
