//! `POST /chat` and `POST /chat/distributed`: the seed's bodies and the
//! relay's answer (JSON), and the server-sent events of a streamed answer.
//!
//! ```text
//! {"prompt": "Explain quantum computing", "use_moe": true, "top_k_experts": 2}
//!   ──► {"response": "...", "tokens": [..], "experts": [[{expert, tokens}], ..],
//!        "step_experts": [..], "timings": {..}, "model": "<meta hash>", ..}
//! ```
//!
//! With `"stream": true` the answer is `text/event-stream`: one
//! [`EVENT_TOKEN`] event per generated token ([`TokenEvent`]), then one
//! [`EVENT_DONE`] event holding the whole [`ChatResponse`], or one
//! [`EVENT_ERROR`] event holding an [`ApiError`](super::api::ApiError).

use serde::{Deserialize, Serialize};

/// SSE event name of one generated token.
pub const EVENT_TOKEN: &str = "token";
/// SSE event name of the final answer.
pub const EVENT_DONE: &str = "done";
/// SSE event name of a failure after the stream began.
pub const EVENT_ERROR: &str = "error";

/// The body of `POST /chat` and `POST /chat/distributed`. Unknown fields
/// are refused (a misspelt option is an error, not silently ignored).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    /// The text to complete (required, non-empty).
    pub prompt: String,
    /// `false`: dense mixture, every expert weighted by the router (the
    /// seed's "standard inference"). Default `true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_moe: Option<bool>,
    /// Experts per token, `1..=num_experts`; default: the model's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k_experts: Option<usize>,
    /// Tokens to generate at most (the relay caps it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<usize>,
    /// 0 (default) is greedy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// Nucleus mass in `(0, 1]` (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// Sampling seed (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Answer as server-sent events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    /// `/chat/distributed` only: compute an expert on the relay when no peer
    /// answers (default `true`); `false` answers 503 instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_fallback: Option<bool>,
    /// Which model of the chain answers: a meta block's hash, or a model
    /// name (its current meta block), e.g. `"default-q8_0"`. Default: the
    /// newest model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

/// One expert's use in one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpertUse {
    pub expert: usize,
    /// Token evaluations routed to it (prompt and generated tokens).
    pub tokens: u64,
}

/// Where the time went, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatTimings {
    /// Waiting for the model to be (re)built from the chain's heads.
    pub load_ms: f64,
    /// The prompt's step and the first token.
    pub prefill_ms: f64,
    /// Every later token.
    pub decode_ms: f64,
    pub total_ms: f64,
    /// Generated tokens after the first, per second of decode.
    pub decode_tokens_per_s: f64,
}

/// Who computed one expert of one layer in `/chat/distributed`, and how
/// often (an expert can be computed by several peers over the steps).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComputedBy {
    pub layer: usize,
    pub expert: usize,
    /// The expert's block (the slot's head) that was computed.
    pub block: String,
    /// The peer id (hex public key), or [`RELAY`] for local computation.
    pub by: String,
    /// Computations (one per step that routed tokens to it).
    pub calls: u64,
    /// Token rows computed.
    pub rows: u64,
}

/// `by` of a computation the relay ran itself.
pub const RELAY: &str = "relay";

/// A peer that was tried for an expert and failed, before another peer or
/// the relay computed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failover {
    pub layer: usize,
    pub expert: usize,
    /// Hex peer id.
    pub peer: String,
    pub reason: String,
    /// Times this peer failed for this expert.
    pub count: u64,
}

/// The answer of `POST /chat` and `POST /chat/distributed`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatResponse {
    /// The generated text (the seed's field).
    pub response: String,
    /// Generated token ids (without EOS).
    pub tokens: Vec<u32>,
    pub prompt_tokens: usize,
    /// Why generation stopped: `eos`, `max_tokens`, `context_full`, `cancelled`.
    pub stop: String,
    /// Per layer, the experts used and how many token evaluations each had.
    pub experts: Vec<Vec<ExpertUse>>,
    /// Per step (0 is the prompt, step `i` feeds generated token `i - 1`),
    /// per layer, the experts it routed to.
    pub step_experts: Vec<Vec<Vec<usize>>>,
    pub use_moe: bool,
    /// Experts per token (all of them when `use_moe` is false).
    pub experts_per_token: usize,
    pub timings: ChatTimings,
    /// Hash (hex) of the chain-A meta block the model conforms to.
    pub model: String,
    pub model_name: String,
    /// `/chat/distributed`: who computed which expert.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub computed_by: Option<Vec<ComputedBy>>,
    /// `/chat/distributed`: peers that failed before another computed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failovers: Option<Vec<Failover>>,
}

/// One [`EVENT_TOKEN`] event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenEvent {
    pub id: u32,
    /// The token's text piece (may be empty while a UTF-8 sequence is incomplete).
    pub text: String,
}
