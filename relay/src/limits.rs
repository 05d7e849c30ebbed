//! The limits of the HTTP server and of the cluster, each a named constant
//! with the reason for its value, the options that carry them (each is a
//! `relay serve` flag), and the bounded per-key / per-IP token buckets.
//! A feature's own limits live with it (listed below, before [`Rate`]).
//!
//! Layer: foundation. Imports nothing of the crate.
//!
//! May import: nothing of the crate (the base of the foundation, layer 0 of `scripts/relay_layers.py`).

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use web_node::chain::limits;

/// Largest binary `POST /blocks` body: envelope plus the largest payload.
pub const MAX_BINARY_UPLOAD: u64 = 8 + limits::MAX_HEADER_LEN as u64 + 64 + limits::MAX_PAYLOAD_LEN;
/// Largest JSON `POST /upload_moe_experts` body. Lower than web-node's
/// `MAX_JSON_UPLOAD` (64 MiB): a JSON body is decoded in memory (base64 makes
/// it 4/3 of the payload), so large blocks go through the streaming binary
/// upload instead. 16 MiB holds any slot of the default model many times over.
pub const MAX_JSON_UPLOAD: usize = 16 * 1024 * 1024;
/// JSON uploads decoded at the same time (each may hold ~2x its body in
/// memory); more wait for [`UPLOAD_QUEUE_WAIT`], then get 503.
pub const JSON_CONCURRENCY: usize = 2;
/// Gate evaluations (the quality gate's eval run, CPU bound) at the same time.
pub const EVAL_CONCURRENCY: usize = 1;
/// Uploads that need an evaluation, admitted (from their header on) while
/// others evaluate: more get 429 with Retry-After before their payload is read.
pub const EVAL_QUEUE: usize = 4;
/// How long a JSON upload waits for a decoding slot before 503.
pub const UPLOAD_QUEUE_WAIT: Duration = Duration::from_secs(2);
/// Uploads per miner key in a burst (a model import publishes one block per
/// slot: the default model has 37).
pub const KEY_BURST: u32 = 64;
/// Sustained uploads per minute per miner key.
pub const KEY_PER_MINUTE: u32 = 30;
/// Upload requests per client IP in a burst (counted before the body is read).
pub const IP_BURST: u32 = 128;
/// Sustained upload requests per minute per client IP.
pub const IP_PER_MINUTE: u32 = 60;
/// Entries each rate table (per key, per IP) holds at most: idle (refilled)
/// entries are dropped first, then the least recently used.
pub const RATE_TABLE_CAPACITY: usize = 4096;
/// Default `limit` of `GET /chain/{A|B}/blocks` (the unpaged form returns this many).
pub const DEFAULT_PAGE: usize = 1000;
/// Largest `limit` of `GET /chain/{A|B}/blocks`.
pub const MAX_PAGE: usize = 1000;

/// Time a client has to send a whole request header, counted from the
/// connection's start or the end of the previous response (slowloris).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// An idle keep-alive connection (no request in flight, no bytes moving) is closed after this.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// An upload whose body sends no byte for this long is cut and its staged file removed.
pub const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(15);
/// A response write that makes no progress for this long closes the connection
/// (a client that stops reading).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Open connections in total; also capped below the process's file-descriptor
/// limit (minus [`FD_RESERVE`]) so files and the index can always be opened.
pub const MAX_CONNECTIONS: usize = 1024;
/// Open connections per client IP.
pub const MAX_CONNECTIONS_PER_IP: usize = 64;
/// Descriptors kept free for block files, staging files, the index and logs.
pub const FD_RESERVE: u64 = 64;
/// Listen backlog: connections the kernel queues before `accept` (bursts of
/// page loads). Linux caps it at `net.core.somaxconn`.
pub const LISTEN_BACKLOG: u32 = 4096;
/// How long graceful shutdown waits for open connections (requests in
/// flight, uploads included) before cutting them (`--shutdown-timeout`).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Connections answered 503 at the same time (each holds a descriptor for at
/// most [`REFUSE_TIMEOUT`], out of [`FD_RESERVE`]); beyond, they are just closed.
pub const MAX_REFUSING: usize = 16;
/// How long a refused connection may take to read its 503 before it is closed.
pub const REFUSE_TIMEOUT: Duration = Duration::from_secs(1);
/// Out of file descriptors, `accept` pauses this long before trying again
/// (connections wait in the listen backlog meanwhile).
pub const ACCEPT_PAUSE: Duration = Duration::from_millis(50);
/// At most one "out of file descriptors" warning per this long.
pub const EMFILE_LOG_EVERY: Duration = Duration::from_secs(5);

// Several relays on one database (`crate::cluster`, `crate::peers::cluster`).

/// How often a relay refreshes its row in `relays` and reads the live relays
/// (`ClusterOptions::heartbeat`'s default; every relay of a database should
/// use the same).
pub const CLUSTER_HEARTBEAT: Duration = Duration::from_secs(5);
/// A relay row not refreshed this long is dead (well above
/// [`CLUSTER_HEARTBEAT`]; `ClusterOptions::dead_after`'s default).
pub const CLUSTER_DEAD_AFTER: Duration = Duration::from_secs(30);
/// Presence changes queued for the writer; past it the queue is dropped and
/// the next write rewrites this relay's presence whole.
pub const PRESENCE_QUEUE: usize = 4096;
/// Changes written in one transaction at most.
pub const PRESENCE_BATCH: usize = 1024;
/// The writer waits this long after a change for more to batch with it.
pub const PRESENCE_DELAY: Duration = Duration::from_millis(50);
/// Blocks queued for lookup; past it a lookup is answered "nobody" at once
/// (the request goes to the store).
pub const LOOKUP_QUEUE: usize = 1024;
/// Blocks looked up in one query at most.
pub const LOOKUP_BATCH: usize = 256;
/// One database step (a query, a batch) may take this long; then it counts
/// as failed.
pub const DB_TIMEOUT: Duration = Duration::from_secs(5);
/// First wait before retrying a failed registration or presence write
/// (doubling up to [`MAX_RETRY`]).
pub const FIRST_RETRY: Duration = Duration::from_millis(200);
/// Longest wait before retrying a failed registration or presence write.
pub const MAX_RETRY: Duration = Duration::from_secs(10);
/// How long a login that says it is a relay may spend on the database check.
pub const LOGIN_CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// A link to another relay: TCP connect plus the WebSocket handshake.
pub const LINK_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A closing link waits this long for the close handshake.
pub const LINK_CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

// Limits that live with their feature: the `/ws` protocol's own limits are
// web-node's `net::peer::limits` (both ends share them); `/chat`'s are in
// `crate::chat` (`MAX_CONCURRENT_CHATS` ...), `/p2p/*`'s in
// `crate::peer_api::p2p` (`MAX_REGISTERED` ...), the peer layer's timing in
// `crate::peers::PeerOptions` and the chunk core's in its `ChunkConfig`:
// each is documented there, next to the code it bounds, and carried by that
// feature's options.

/// The builder methods of an options struct: `with` (change several fields
/// in a closure) and one setter per listed field, so that code outside the
/// crate (the options are `#[non_exhaustive]`) starts from `Default` and
/// changes what it needs: `ServeOptions::default().max_connections(8)`.
macro_rules! option_setters {
    ($ty:ident { $($field:ident: $t:ty),* $(,)? }) => {
        impl $ty {
            /// These options, changed by `f` (several fields at once).
            #[must_use]
            pub fn with(mut self, f: impl FnOnce(&mut Self)) -> Self {
                f(&mut self);
                self
            }
            $(
                #[doc = concat!("These options with [`", stringify!($field), "`](field@", stringify!($ty), "::", stringify!($field), ") set to `v`.")]
                #[must_use]
                pub fn $field(mut self, v: $t) -> Self {
                    self.$field = v;
                    self
                }
            )*
        }
    };
}
pub(crate) use option_setters;

/// A token-bucket rate: `burst` at once, `per_minute` sustained.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub burst: u32,
    pub per_minute: u32,
}

/// Request-level settings of the relay (the REST handlers). Defaults: the
/// constants above; built with [`RelayOptions::new`] or `Default` and the
/// setters ([`RelayOptions::with`], [`RelayOptions::web_dir`] ...).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RelayOptions {
    /// Largest JSON upload body (413 above).
    pub max_json_body: usize,
    /// Largest binary upload body (413 above).
    pub max_binary_body: u64,
    /// Static files of the web app (trunk's `dist/`); None serves none.
    pub web_dir: Option<PathBuf>,
    /// Where binary uploads are staged while they stream in.
    pub staging_dir: PathBuf,
    /// JSON uploads decoded at once.
    pub json_concurrency: usize,
    /// Gate evaluations at once.
    pub eval_concurrency: usize,
    /// Uploads admitted to wait for an evaluation.
    pub eval_queue: usize,
    /// Per miner key upload rate.
    pub key_rate: Rate,
    /// Per client IP upload rate.
    pub ip_rate: Rate,
    /// Capacity of each rate table.
    pub rate_table_capacity: usize,
    /// Cut an upload whose body is idle this long.
    pub body_idle_timeout: Duration,
    /// Default page of chain listings (the unpaged form returns this many).
    pub default_page: usize,
    /// Largest page of chain listings.
    pub max_page: usize,
}

impl Default for RelayOptions {
    /// The defaults, staging in the system's temporary directory (a served
    /// relay stages in its store's staging directory: [`RelayOptions::new`]).
    fn default() -> Self {
        Self::new(std::env::temp_dir())
    }
}

option_setters!(RelayOptions {
    max_json_body: usize,
    max_binary_body: u64,
    web_dir: Option<PathBuf>,
    staging_dir: PathBuf,
    json_concurrency: usize,
    eval_concurrency: usize,
    eval_queue: usize,
    key_rate: Rate,
    ip_rate: Rate,
    rate_table_capacity: usize,
    body_idle_timeout: Duration,
    default_page: usize,
    max_page: usize,
});

impl RelayOptions {
    /// The defaults, staging binary uploads in `staging_dir` (which must be on
    /// the store's file system: a staged upload is renamed into it).
    pub fn new(staging_dir: PathBuf) -> Self {
        Self {
            max_json_body: MAX_JSON_UPLOAD,
            max_binary_body: MAX_BINARY_UPLOAD,
            web_dir: None,
            staging_dir,
            json_concurrency: JSON_CONCURRENCY,
            eval_concurrency: EVAL_CONCURRENCY,
            eval_queue: EVAL_QUEUE,
            key_rate: Rate {
                burst: KEY_BURST,
                per_minute: KEY_PER_MINUTE,
            },
            ip_rate: Rate {
                burst: IP_BURST,
                per_minute: IP_PER_MINUTE,
            },
            rate_table_capacity: RATE_TABLE_CAPACITY,
            body_idle_timeout: BODY_IDLE_TIMEOUT,
            default_page: DEFAULT_PAGE,
            max_page: MAX_PAGE,
        }
    }
}

/// Connection-level settings of [`crate::server::serve`]. Defaults: the
/// constants above; changed with the setters ([`ServeOptions::with`],
/// [`ServeOptions::header_timeout`] ...).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServeOptions {
    /// Time a client has to send a whole request header ([`HEADER_TIMEOUT`]).
    pub header_timeout: Duration,
    /// An idle keep-alive connection is closed after this ([`KEEPALIVE_TIMEOUT`]).
    pub keepalive_timeout: Duration,
    /// A response write without progress this long closes the connection
    /// ([`WRITE_TIMEOUT`]).
    pub write_timeout: Duration,
    /// Open connections in total, lowered under the descriptor limit
    /// ([`MAX_CONNECTIONS`], [`effective_max_connections`]).
    pub max_connections: usize,
    /// Open connections per client IP ([`MAX_CONNECTIONS_PER_IP`]).
    pub max_connections_per_ip: usize,
    /// Listen backlog ([`LISTEN_BACKLOG`]).
    pub backlog: u32,
    /// After the shutdown signal: how long requests in flight may take to
    /// finish before their connections are cut (`--shutdown-timeout`).
    pub shutdown_timeout: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            header_timeout: HEADER_TIMEOUT,
            keepalive_timeout: KEEPALIVE_TIMEOUT,
            write_timeout: WRITE_TIMEOUT,
            max_connections: MAX_CONNECTIONS,
            max_connections_per_ip: MAX_CONNECTIONS_PER_IP,
            backlog: LISTEN_BACKLOG,
            shutdown_timeout: SHUTDOWN_GRACE,
        }
    }
}

option_setters!(ServeOptions {
    header_timeout: Duration,
    keepalive_timeout: Duration,
    write_timeout: Duration,
    max_connections: usize,
    max_connections_per_ip: usize,
    backlog: u32,
    shutdown_timeout: Duration,
});

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets by key, at most `capacity` of them. A bucket that has
/// refilled to its burst is the same as no bucket, so those go first when the
/// table is full; then the least recently used. Evicting a throttled key
/// resets it, which the per-IP table (checked first) bounds.
pub struct RateTable<K> {
    rate: Rate,
    capacity: usize,
    buckets: Mutex<HashMap<K, Bucket>>,
}

impl<K: Eq + Hash + Clone> RateTable<K> {
    pub fn new(rate: Rate, capacity: usize) -> Self {
        Self {
            rate,
            capacity: capacity.max(1),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    fn per_sec(&self) -> f64 {
        f64::from(self.rate.per_minute) / 60.0
    }

    /// Take one token; Err(seconds until one is available).
    pub fn take(&self, key: &K) -> Result<(), u64> {
        let now = Instant::now();
        let burst = f64::from(self.rate.burst);
        let per_sec = self.per_sec();
        let Ok(mut t) = self.buckets.lock() else {
            return Err(1);
        };
        if !t.contains_key(key) && t.len() >= self.capacity {
            Self::make_room(&mut t, now, burst, per_sec, self.capacity);
        }
        let b = t.entry(key.clone()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * per_sec).min(burst);
        b.at = now;
        if b.tokens < 1.0 {
            let wait = if per_sec > 0.0 {
                ((1.0 - b.tokens) / per_sec).ceil() as u64
            } else {
                3600
            };
            return Err(wait.max(1));
        }
        b.tokens -= 1.0;
        Ok(())
    }

    fn make_room(t: &mut HashMap<K, Bucket>, now: Instant, burst: f64, per_sec: f64, cap: usize) {
        t.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * per_sec < burst);
        if t.len() < cap {
            return;
        }
        // Still full of throttled keys: drop the least recently used eighth.
        let mut ages: Vec<Instant> = t.values().map(|b| b.at).collect();
        ages.sort_unstable();
        let cut = ages[(ages.len() / 8).min(ages.len() - 1)];
        t.retain(|_, b| b.at > cut);
    }

    /// Entries held now.
    pub fn len(&self) -> usize {
        self.buckets.lock().map(|t| t.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The relay's upload rate limits: per client IP (first, before the body is
/// read) and per miner key (once the header's signature verified).
pub struct RateLimits {
    pub ip: RateTable<IpAddr>,
    pub key: RateTable<[u8; 32]>,
}

impl RateLimits {
    pub fn new(opts: &RelayOptions) -> Self {
        Self {
            ip: RateTable::new(opts.ip_rate, opts.rate_table_capacity),
            key: RateTable::new(opts.key_rate, opts.rate_table_capacity),
        }
    }
}

/// The soft limit on open file descriptors of this process (Linux
/// `/proc/self/limits`); None where unknown.
pub fn fd_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// The connection cap: the configured total, lowered to leave [`FD_RESERVE`]
/// descriptors free under the process's limit.
pub fn effective_max_connections(configured: usize) -> usize {
    match fd_limit() {
        Some(n) => {
            let room = n.saturating_sub(FD_RESERVE).max(8) as usize;
            configured.min(room)
        }
        None => configured,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_limits_and_refuses_with_a_wait() {
        let t = RateTable::new(
            Rate {
                burst: 2,
                per_minute: 6,
            },
            16,
        );
        assert!(t.take(&1).is_ok());
        assert!(t.take(&1).is_ok());
        let wait = t.take(&1).unwrap_err();
        assert!((1..=10).contains(&wait), "{wait}");
        assert!(t.take(&2).is_ok(), "another key has its own bucket");
    }

    #[test]
    fn table_stays_bounded_and_keeps_throttled_keys_first() {
        let t = RateTable::new(
            Rate {
                burst: 1,
                per_minute: 1,
            },
            100,
        );
        for k in 0..10_000u32 {
            let _ = t.take(&k);
            assert!(t.len() <= 100);
        }
        // Drained keys (no refill) are evicted least recently used first.
        let t = RateTable::new(
            Rate {
                burst: 1,
                per_minute: 0,
            },
            10,
        );
        for k in 0..1000u32 {
            t.take(&k).unwrap();
        }
        assert!(t.len() <= 10);
    }
}
