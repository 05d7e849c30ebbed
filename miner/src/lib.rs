//! The AI-Block miner: training the default model, fine-tuning one expert,
//! importing checkpoints as signed blocks, talking to a relay, and local
//! inference (`chat`, `logits`).

pub mod blocks;
pub mod client;
pub mod demo;
pub mod improve;
pub mod infer;
pub mod mixtral;
pub mod peer;
pub mod quant;
pub mod routes;
pub mod train;
