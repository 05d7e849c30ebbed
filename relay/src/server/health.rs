//! Probes for load balancers and orchestrators.
//!
//! * `GET /healthz`: 200 `{"status":"ok"}` while the process serves HTTP
//!   (liveness: nothing is checked, so a slow database never restarts it).
//! * `GET /readyz`: 200 only when the relay can do its work: the store
//!   answers a read, the chain is loaded, and with `--database` PostgreSQL
//!   answers `SELECT 1`, each within [`PROBE_TIMEOUT`]; and the relay is not
//!   shutting down. Otherwise 503 with the failing checks and a `reason`.
//!   One probe runs at a time; a probe arriving while one runs gets the
//!   last answer (a stopped database cannot pile up blocked probes).

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use web_node::chain::BlockHash;

use crate::state::SharedCore;

/// How long each readiness check may take before it counts as failed.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

pub use crate::state::Readiness;

/// `/healthz` and `/readyz`.
pub(super) fn routes() -> axum::Router<SharedCore> {
    axum::Router::new()
        .route("/healthz", axum::routing::get(healthz))
        .route("/readyz", axum::routing::get(readyz))
}

pub(super) async fn healthz() -> Response {
    (StatusCode::OK, Json(serde_json::json!({"status": "ok"}))).into_response()
}

async fn check_blocking<F>(f: F) -> String
where
    F: FnOnce() -> Result<(), String> + Send + 'static,
{
    let task = tokio::task::spawn_blocking(f);
    match tokio::time::timeout(PROBE_TIMEOUT, task).await {
        Ok(Ok(Ok(()))) => "ok".into(),
        Ok(Ok(Err(e))) => e,
        Ok(Err(e)) => format!("check failed: {e}"),
        Err(_) => format!("no answer within {} ms", PROBE_TIMEOUT.as_millis()),
    }
}

async fn probe(st: &SharedCore) -> Readiness {
    let store = st.store.clone();
    let store = check_blocking(move || {
        store
            .contains(&BlockHash::default())
            .map(|_| ())
            .map_err(|e| format!("store: {e}"))
    })
    .await;
    let database = match &st.pg {
        None => "not configured".to_string(),
        Some(pg) => {
            let pg = pg.clone();
            check_blocking(move || pg.ping(PROBE_TIMEOUT).map_err(|e| format!("database: {e}")))
                .await
        }
    };
    let chain_blocks = st.chain.read().await.len();
    let shutting_down = st.draining.load(Ordering::SeqCst);
    // The database first: with --database the store lives there too.
    let reason = if shutting_down {
        Some("shutting down".to_string())
    } else if st.pg.is_some() && database != "ok" {
        Some(database.clone())
    } else if store != "ok" {
        Some(store.clone())
    } else {
        None
    };
    Readiness {
        ready: reason.is_none(),
        store,
        chain_blocks,
        database,
        shutting_down,
        reason,
    }
}

pub(super) async fn readyz(State(st): State<SharedCore>) -> Response {
    let r = match st.readiness.try_lock() {
        Ok(mut last) => {
            let r = probe(&st).await;
            *last = Some(r.clone());
            r
        }
        // A probe is running: answer with the last result (not ready if none yet).
        Err(_) => st.readiness.lock().await.clone().unwrap_or(Readiness {
            ready: false,
            store: "checking".into(),
            chain_blocks: 0,
            database: "checking".into(),
            shutting_down: st.draining.load(Ordering::SeqCst),
            reason: Some("the first readiness check is still running".into()),
        }),
    };
    let status = if r.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(r)).into_response()
}
