//! `aiblock peer`: a native node on the relay's `/ws` network.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

/// Flags of `aiblock peer`.
#[derive(Debug, Clone, Args)]
pub struct PeerArgs {
    /// The relay's WebSocket URL, e.g. ws://127.0.0.1:8080/ws.
    #[arg(long)]
    pub relay: String,
    /// Directory for the node's verified payloads (and its key by default).
    #[arg(long)]
    pub data: PathBuf,
    /// Comma-separated globs of the slots to hold, e.g. 'layer0.*,layer1.*'
    /// (default: every expert).
    #[arg(long)]
    pub experts: Option<String>,
    /// Run expert computations for the relay on the held experts.
    #[arg(long)]
    pub serve_compute: bool,
    /// The node's key file (created, mode 0600, if missing; default DATA/peer.key).
    #[arg(long)]
    pub key: Option<PathBuf>,
}

/// Run `aiblock peer` until Ctrl-C.
pub fn cli(_a: &PeerArgs) -> Result<()> {
    bail!("aiblock peer is not built yet")
}
