//! HTTP errors and helpers every feature's handlers share: [`HttpError`]
//! (the JSON [`ApiError`] with its status and Retry-After), [`ApiResult`],
//! [`store_err`] (a store failure as the API reports it), [`blocking`] and
//! [`peer_ip`].
//!
//! Layer: foundation. Imports only [`crate::metrics`] (store error
//! counters); every handler module imports it, it imports no feature.
//!
//! May import: the foundation's base (`metrics`, `pg`, `auth`, `limits`, `gate`, `compute`, `genesis`).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use axum::extract::ConnectInfo;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use web_node::net::api::{codes, ApiError};
use web_node::store::StoreError;

/// An error response: the JSON [`ApiError`], its status (from the code
/// unless set), and a Retry-After for load shedding.
#[derive(Debug)]
pub struct HttpError {
    pub error: ApiError,
    pub status: Option<StatusCode>,
    pub retry_after: Option<u64>,
}

/// Error codes of the relay's own limits (in web-node's [`codes`] table, so
/// clients map them to the right status too).
pub mod relay_codes {
    pub use web_node::net::api::codes::{
        CORRUPT, METHOD_NOT_ALLOWED, TIMEOUT, UNAVAILABLE, UNSUPPORTED_MEDIA_TYPE,
    };
}

impl HttpError {
    pub fn with_status(error: ApiError, status: StatusCode) -> Self {
        Self {
            error,
            status: Some(status),
            retry_after: None,
        }
    }

    /// 429 with Retry-After.
    pub fn rate_limited(message: impl Into<String>, retry_after: u64) -> Self {
        Self {
            error: ApiError::new(codes::RATE_LIMITED, message),
            status: None,
            retry_after: Some(retry_after.max(1)),
        }
    }

    /// 503 with Retry-After.
    pub fn unavailable(message: impl Into<String>, retry_after: u64) -> Self {
        Self {
            error: ApiError::new(relay_codes::UNAVAILABLE, message),
            status: Some(StatusCode::SERVICE_UNAVAILABLE),
            retry_after: Some(retry_after.max(1)),
        }
    }

    pub fn unsupported_media(message: impl Into<String>) -> Self {
        Self::with_status(
            ApiError::new(relay_codes::UNSUPPORTED_MEDIA_TYPE, message),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        )
    }

    pub fn timeout(message: impl Into<String>) -> Self {
        Self::with_status(
            ApiError::new(relay_codes::TIMEOUT, message),
            StatusCode::REQUEST_TIMEOUT,
        )
    }
}

impl From<ApiError> for HttpError {
    fn from(error: ApiError) -> Self {
        Self {
            error,
            status: None,
            retry_after: None,
        }
    }
}

impl From<web_node::chain::ChainError> for HttpError {
    fn from(e: web_node::chain::ChainError) -> Self {
        ApiError::from(e).into()
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status = self.status.unwrap_or_else(|| {
            StatusCode::from_u16(self.error.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
        });
        let mut r = (status, Json(self.error)).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

pub type ApiResult<T> = Result<T, HttpError>;

pub fn store_err(e: StoreError) -> ApiError {
    crate::metrics::store_error(&e);
    match e {
        StoreError::NotFound(h) => ApiError::not_found(format!("block {h} not found")),
        StoreError::Duplicate(h) => {
            ApiError::new(codes::DUPLICATE, format!("block {h} already exists"))
        }
        StoreError::Range { .. } => ApiError::new(codes::RANGE_NOT_SATISFIABLE, e.to_string()),
        StoreError::Corrupt(m) => ApiError::new(relay_codes::CORRUPT, m),
        e => {
            tracing::error!(error = %e, "store failure");
            ApiError::internal(e.to_string())
        }
    }
}

pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("task failed: {e}")))?
}

/// The client's address ([`crate::server::serve`] and `into_make_service_with_connect_info`
/// set it; otherwise every client shares one rate bucket).
pub fn peer_ip(ext: &axum::http::Extensions) -> IpAddr {
    ext.get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
}
