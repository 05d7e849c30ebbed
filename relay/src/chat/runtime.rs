//! The chat feature's runtime, which [`crate::server::AppState`] holds: its
//! options with their limits (each a named constant, documented with the
//! reason for its value), the generation slots, the per-IP rate table and
//! the model cache.
//!
//! Layer: feature runtime, above the state. Imports the foundation only
//! (`chain_index`, `store`, `http`, `limits`) and [`super::model`].

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{RwLock, Semaphore};

use super::model::{self, LoadedModel};
use crate::chain_index::ChainState;
use crate::http::HttpError;
use crate::limits::{Rate, RateTable, RATE_TABLE_CAPACITY};
use crate::store::RelayStore;

/// Generations running at once. Each is CPU bound (one core or more), so
/// on the 2-core reference machine two keep it busy; more would only make
/// every answer slower. Beyond it: 429 with Retry-After.
pub const MAX_CONCURRENT_CHATS: usize = 2;
/// `max_tokens` when the body gives none.
pub const DEFAULT_MAX_TOKENS: usize = 64;
/// Largest `max_tokens` (400 above): bounds one request's CPU time (the
/// default model decodes a few hundred tokens per second per core).
pub const MAX_TOKENS_CAP: usize = 256;
/// Longest prompt in characters (413 above); the default model's context is
/// 256 tokens, so a longer prompt could not run anyway.
pub const MAX_PROMPT_CHARS: usize = 4096;
/// Largest request body (413 above): a prompt at the cap in 4-byte UTF-8
/// plus the options.
pub const MAX_CHAT_BODY: usize = 4 * MAX_PROMPT_CHARS + 4096;
/// Chat requests per client IP in a burst.
pub const CHAT_IP_BURST: u32 = 30;
/// Sustained chat requests per minute per client IP.
pub const CHAT_IP_PER_MINUTE: u32 = 60;
/// Retry-After (seconds) of a 429 when every generation slot is busy.
pub const BUSY_RETRY_AFTER: u64 = 1;
/// A request body that sends no byte for this long gets 408.
pub const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(15);

/// The chat limits (defaults: the constants above); changed with the
/// setters ([`ChatOptions::with`], [`ChatOptions::max_concurrent`] ...).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ChatOptions {
    /// Generations running at once ([`MAX_CONCURRENT_CHATS`]); more get 429.
    pub max_concurrent: usize,
    /// `max_tokens` of a request that gives none ([`DEFAULT_MAX_TOKENS`]).
    pub default_max_tokens: usize,
    /// Largest `max_tokens` a request may ask for ([`MAX_TOKENS_CAP`]).
    pub max_tokens_cap: usize,
    /// Longest prompt in characters ([`MAX_PROMPT_CHARS`]; 413 above).
    pub max_prompt_chars: usize,
    /// Largest request body ([`MAX_CHAT_BODY`]; 413 above).
    pub max_body: usize,
    /// Chat requests per client IP ([`CHAT_IP_BURST`], [`CHAT_IP_PER_MINUTE`]).
    pub ip_rate: Rate,
    /// Entries the per-IP rate table holds at most.
    pub rate_table_capacity: usize,
    /// A request body that sends no byte for this long gets 408
    /// ([`BODY_IDLE_TIMEOUT`]).
    pub body_idle_timeout: Duration,
}

crate::limits::option_setters!(ChatOptions {
    max_concurrent: usize,
    default_max_tokens: usize,
    max_tokens_cap: usize,
    max_prompt_chars: usize,
    max_body: usize,
    ip_rate: Rate,
    rate_table_capacity: usize,
    body_idle_timeout: Duration,
});

impl Default for ChatOptions {
    fn default() -> Self {
        Self {
            max_concurrent: MAX_CONCURRENT_CHATS,
            default_max_tokens: DEFAULT_MAX_TOKENS,
            max_tokens_cap: MAX_TOKENS_CAP,
            max_prompt_chars: MAX_PROMPT_CHARS,
            max_body: MAX_CHAT_BODY,
            ip_rate: Rate {
                burst: CHAT_IP_BURST,
                per_minute: CHAT_IP_PER_MINUTE,
            },
            rate_table_capacity: RATE_TABLE_CAPACITY,
            body_idle_timeout: BODY_IDLE_TIMEOUT,
        }
    }
}

/// Chat state: the cached model, the generation slots, the rate table.
pub struct ChatRuntime {
    pub(crate) opts: ChatOptions,
    pub(crate) slots: Arc<Semaphore>,
    pub(crate) rates: RateTable<IpAddr>,
    model: model::ModelCache,
}

impl std::fmt::Debug for ChatRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatRuntime")
            .field("opts", &self.opts)
            .field("free_slots", &self.slots.available_permits())
            .finish_non_exhaustive()
    }
}

impl Default for ChatRuntime {
    fn default() -> Self {
        Self::new(ChatOptions::default())
    }
}

impl ChatRuntime {
    pub fn new(opts: ChatOptions) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(opts.max_concurrent.max(1))),
            rates: RateTable::new(opts.ip_rate, opts.rate_table_capacity),
            model: model::ModelCache::default(),
            opts,
        }
    }

    pub fn options(&self) -> &ChatOptions {
        &self.opts
    }

    /// Generations running now.
    pub fn running(&self) -> usize {
        self.opts
            .max_concurrent
            .max(1)
            .saturating_sub(self.slots.available_permits())
    }

    /// The model of the chain's current heads (built or rebuilt if needed).
    /// `model`: a meta block hash or model name (None: the newest model).
    pub async fn model(
        &self,
        chain: &Arc<RwLock<ChainState>>,
        store: &Arc<dyn RelayStore>,
        model: Option<&str>,
    ) -> Result<Arc<LoadedModel>, HttpError> {
        self.model.get(chain, store, model).await
    }
}
