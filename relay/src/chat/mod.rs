//! The chat feature's runtime: what [`crate::server::AppState`] holds for
//! `POST /chat` and `POST /chat/distributed` (whose handlers live in
//! [`crate::chat_api`]).
//!
//! * [`runtime`]: the [`ChatRuntime`] (options with their limits, each a
//!   named constant; the generation slots, the per-IP rate table, the model
//!   cache).
//! * `model`: the [`LoadedModel`] built from the store's current heads
//!   ([`ChainModel`](web_node::chain_model::ChainModel): latest meta block,
//!   shared block, routers), cached, and rebuilt when a head moves; expert
//!   weights read from the store (a verified read) the first time they are
//!   routed and kept for later requests.
//!
//! Layer: feature runtime, above [`crate::state`] (which imports no feature).
//! May import: the foundation (`chain_index`, `store`, `http`, `limits`).

mod model;
pub mod runtime;

pub use model::LoadedModel;
pub use runtime::{
    ChatOptions, ChatRuntime, BODY_IDLE_TIMEOUT, BUSY_RETRY_AFTER, CHAT_IP_BURST,
    CHAT_IP_PER_MINUTE, DEFAULT_MAX_TOKENS, MAX_CHAT_BODY, MAX_CONCURRENT_CHATS, MAX_PROMPT_CHARS,
    MAX_TOKENS_CAP,
};
