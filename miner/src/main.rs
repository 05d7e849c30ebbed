//! `aiblock`: the AI-Block miner CLI.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "aiblock",
    version,
    about = "AI-Block miner: train, import, publish, export, improve"
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
    /// Train the default model from scratch (deterministic from --seed).
    Train {
        #[arg(long, default_value = "models/default")]
        out: PathBuf,
        #[arg(long, default_value_t = web_node::eval::DEFAULT_SEED)]
        seed: u64,
        #[arg(long, default_value_t = 3000)]
        steps: usize,
        #[arg(long, default_value_t = 32)]
        batch: usize,
        #[arg(long, default_value_t = 3e-3)]
        lr: f64,
        #[arg(long, default_value_t = 128)]
        hidden: usize,
        #[arg(long, default_value_t = 256)]
        intermediate: usize,
        #[arg(long, default_value_t = 400)]
        vocab: usize,
        #[arg(long, default_value_t = 0.01)]
        aux_coef: f64,
        #[arg(long, default_value_t = 500)]
        checkpoint_every: usize,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Chat(a) => miner::infer::chat(&a),
        Cmd::Logits(a) => miner::infer::logits(&a),
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
            checkpoint_every,
        } => {
            let args = miner::train::TrainArgs {
                seed,
                steps,
                batch,
                lr,
                hidden,
                intermediate,
                vocab,
                aux_coef,
                checkpoint_every,
            };
            miner::train::run(&args, &out)
        }
    }
}
