//! The AI-Block miner: training the default model, fine-tuning one expert,
//! importing checkpoints as signed blocks and talking to a relay.

pub mod infer;
pub mod mixtral;
pub mod train;
