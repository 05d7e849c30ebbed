//! PostgreSQL: what `relay serve --database postgres://...` keeps there, and
//! how the relay's sync code reaches it.
//!
//! * [`Pg`]: a connection pool (deadpool-postgres over tokio-postgres) on a
//!   small tokio runtime of its own. The store and usage traits are sync and
//!   are called from blocking tasks and, for short reads, from async code;
//!   [`Pg::run`] hands the query to that runtime and waits on a channel, which
//!   works from either (a `block_on` would panic inside the caller's runtime).
//! * Migrations: `relay/migrations/NNNN_*.sql`, applied in order at start in
//!   one transaction each, under an advisory lock so that relays starting
//!   together apply each once; `schema_migrations` records them. A database
//!   migrated by a newer relay is refused.
//!
//! Layer: foundation (base). May import: nothing of the crate (the base of the foundation, layer 0 of `scripts/relay_layers.py`).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{ManagerConfig, PoolConfig, RecyclingMethod};
pub use deadpool_postgres::{Object as Client, Pool};
pub use tokio_postgres::NoTls;

/// The schema, one migration per file, in order. Never edit a released one:
/// add the next.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "store", include_str!("../../migrations/0001_store.sql")),
    (2, "usage", include_str!("../../migrations/0002_usage.sql")),
    (
        3,
        "cluster",
        include_str!("../../migrations/0003_cluster.sql"),
    ),
];

/// Advisory lock key of the migration step ("AIBM").
const MIGRATION_LOCK: i64 = 0x4149_424d;

/// Connections in the pool (PostgreSQL's default max is 100; several relays share it).
pub const POOL_SIZE: usize = 16;
/// How long a query waits for a free connection or a new one.
pub const POOL_WAIT: Duration = Duration::from_secs(10);

/// Errors of the PostgreSQL layer (a message: callers map them into their
/// own error types).
#[derive(Debug, thiserror::Error)]
#[error("postgres: {0}")]
pub struct PgError(pub String);

impl PgError {
    pub fn new(m: impl Into<String>) -> Self {
        Self(m.into())
    }
}

impl From<tokio_postgres::Error> for PgError {
    fn from(e: tokio_postgres::Error) -> Self {
        // The server's message, not only "db error".
        match e.as_db_error() {
            Some(d) => Self(format!("{}: {}", d.code().code(), d.message())),
            None => Self(e.to_string()),
        }
    }
}

impl From<deadpool_postgres::PoolError> for PgError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(b) => b.into(),
            e => Self(format!("connection pool: {e}")),
        }
    }
}

/// The SQLSTATE of a failed query (None for a connection error).
pub fn sqlstate(e: &tokio_postgres::Error) -> Option<&str> {
    e.as_db_error().map(|d| d.code().code())
}

/// The pool and its runtime. See the module docs.
pub struct Pg {
    rt: Option<tokio::runtime::Runtime>,
    pool: Pool,
    url: String,
}

impl std::fmt::Debug for Pg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pg")
            .field("url", &redact(&self.url))
            .finish_non_exhaustive()
    }
}

/// `postgres://user:secret@host/db` with the password replaced, for logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let cred = &url[s + 3..at];
            match cred.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

impl Pg {
    /// Connect (checking that the server answers) and apply the migrations.
    /// Blocking; call it outside async code or in a blocking task.
    pub fn connect(url: &str) -> Result<Arc<Self>, PgError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("aiblock-pg")
            .enable_all()
            .build()
            .map_err(|e| PgError(format!("runtime: {e}")))?;
        let cfg = deadpool_postgres::Config {
            url: Some(url.to_string()),
            manager: Some(ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            }),
            pool: Some({
                let mut p = PoolConfig::new(POOL_SIZE);
                p.timeouts.wait = Some(POOL_WAIT);
                p.timeouts.create = Some(POOL_WAIT);
                p
            }),
            ..Default::default()
        };
        let pool = {
            let _g = rt.enter();
            cfg.create_pool(Some(deadpool_postgres::Runtime::Tokio1), NoTls)
                .map_err(|e| PgError(format!("{}: {e}", redact(url))))?
        };
        let pg = Self {
            rt: Some(rt),
            pool,
            url: url.to_string(),
        };
        let u = redact(url);
        pg.run(|pool| async move {
            let mut c = pool
                .get()
                .await
                .map_err(|e| PgError(format!("cannot connect to {u}: {}", PgError::from(e))))?;
            migrate(&mut c).await
        })?;
        Ok(Arc::new(pg))
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Run `f(pool)` on the pool's runtime and wait for it (from any thread,
    /// inside or outside another runtime).
    pub fn run<T, E, F, Fut>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(Pool) -> Fut,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
        T: Send + 'static,
        E: From<PgError> + Send + 'static,
    {
        let rt = self
            .rt
            .as_ref()
            .ok_or_else(|| PgError::new("the PostgreSQL runtime is shut down"))?;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let fut = f(self.pool.clone());
        rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv()
            .map_err(|_| PgError::new("the PostgreSQL task failed"))?
    }

    /// Whether the server answers `SELECT 1` within `timeout` (readiness probes).
    pub fn ping(&self, timeout: Duration) -> Result<(), PgError> {
        self.run(move |pool| async move {
            let q = async {
                let c = pool.get().await?;
                c.simple_query("SELECT 1").await?;
                Ok::<(), PgError>(())
            };
            match tokio::time::timeout(timeout, q).await {
                Ok(r) => r,
                Err(_) => Err(PgError::new(format!(
                    "no answer within {} ms",
                    timeout.as_millis()
                ))),
            }
        })
    }

    /// Run `f(client)` with one pooled connection.
    pub fn with<T, E, F, Fut>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(Client) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
        T: Send + 'static,
        E: From<PgError> + Send + 'static,
    {
        self.run(|pool| async move {
            let c = pool.get().await.map_err(|e| E::from(PgError::from(e)))?;
            f(c).await
        })
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        // Dropping a runtime inside another one panics; let it go in the background.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Apply the migrations this database lacks (see the module docs). The
/// advisory lock comes first: relays starting together wait for each other
/// instead of racing to create `schema_migrations`.
pub async fn migrate(c: &mut Client) -> Result<(), PgError> {
    c.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    let r = async {
        c.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                version integer PRIMARY KEY,
                name text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )",
        )
        .await?;
        apply(c).await
    }
    .await;
    c.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await?;
    r
}

async fn apply(c: &mut Client) -> Result<(), PgError> {
    let rows = c
        .query("SELECT version FROM schema_migrations", &[])
        .await?;
    let have: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    let newest = MIGRATIONS.last().map(|m| m.0).unwrap_or(0);
    if let Some(v) = have.iter().find(|v| **v > newest) {
        return Err(PgError(format!(
            "the database schema is at version {v}, newer than this relay knows ({newest}): upgrade the relay"
        )));
    }
    for (v, name, sql) in MIGRATIONS {
        if have.contains(v) {
            continue;
        }
        let t = c.transaction().await?;
        t.batch_execute(sql)
            .await
            .map_err(|e| PgError(format!("migration {v} ({name}): {}", PgError::from(e))))?;
        t.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            &[v, name],
        )
        .await?;
        t.commit().await?;
        tracing::info!(version = v, name, "database migrated");
    }
    Ok(())
}

/// `bytea` of a 32-byte hash or key, back.
pub fn hash32(v: &[u8]) -> Result<[u8; 32], PgError> {
    v.try_into().map_err(|_| {
        PgError(format!(
            "expected 32 bytes in the database, found {}",
            v.len()
        ))
    })
}

/// u64 counters are stored as bigint: values past i64::MAX are refused, not wrapped.
pub fn to_i64(v: u64) -> Result<i64, PgError> {
    i64::try_from(v).map_err(|_| PgError(format!("{v} does not fit a bigint")))
}

/// A bigint read back as u64 (a negative value is corrupt data).
pub fn to_u64(v: i64) -> Result<u64, PgError> {
    u64::try_from(v).map_err(|_| PgError(format!("negative counter {v} in the database")))
}
