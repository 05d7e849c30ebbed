//! `aiblock demo`: a relay, three nodes and a distributed chat in one command.

use anyhow::{bail, Result};
use clap::Args;

/// Flags of `aiblock demo`.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// The prompt of the distributed chat.
    #[arg(long, default_value = "12+7=")]
    pub prompt: String,
}

/// Run the demo.
pub fn cli(_a: &DemoArgs) -> Result<()> {
    bail!("aiblock demo is not built yet")
}
