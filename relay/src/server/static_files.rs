//! The web app (trunk's `dist/`) through tower-http's `ServeDir`: ranges,
//! conditional requests, precompressed `.br`/`.gz` siblings when present
//! (scripts/lib.sh writes `.gz` ones), otherwise brotli or gzip on the fly.
//! Paths with `..`, `.`, backslashes, NUL or `:` in a decoded segment are
//! refused first; every miss is a JSON error.

use std::convert::Infallible;
use std::path::Path;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{Method, StatusCode};
use axum::response::Response;
use tower::util::BoxCloneSyncService;
use tower::{ServiceBuilder, ServiceExt as _};
use tower_http::compression::{CompressionLayer, CompressionLevel};
use tower_http::services::ServeDir;
use web_node::net::api::ApiError;

use crate::http::ApiResult;

/// Compression quality for responses compressed on the fly: brotli and gzip
/// level 5 cost a few tens of milliseconds on a 3 MB wasm bundle.
const COMPRESSION: CompressionLevel = CompressionLevel::Precise(5);

/// The static file service.
#[derive(Clone)]
pub(super) struct StaticFiles {
    svc: BoxCloneSyncService<Request, Response, Infallible>,
}

impl StaticFiles {
    pub(super) fn new(dir: &Path) -> Self {
        let serve = ServeDir::new(dir)
            .append_index_html_on_directories(true)
            .precompressed_br()
            .precompressed_gzip();
        let svc = ServiceBuilder::new()
            .map_request(|r: Request| r)
            .map_response(|r: Response<_>| r.map(Body::new))
            .layer(
                CompressionLayer::new()
                    .br(true)
                    .gzip(true)
                    .quality(COMPRESSION),
            )
            .service(serve);
        Self {
            svc: BoxCloneSyncService::new(svc),
        }
    }
}

/// Percent-decode a URL path; None if it is not valid UTF-8 or escapes are broken.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

pub(super) async fn static_file(web: Option<StaticFiles>, req: Request) -> ApiResult<Response> {
    let path = req.uri().path().to_string();
    let not_found = || ApiError::not_found(format!("no such resource: {path}"));
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Err(not_found().into());
    }
    let decoded =
        percent_decode(&path).ok_or_else(|| ApiError::malformed("bad percent-encoding in path"))?;
    for seg in decoded.split('/') {
        if seg == "."
            || seg == ".."
            || seg.contains('\\')
            || seg.contains('\0')
            || seg.contains(':')
        {
            return Err(ApiError::malformed("path traversal refused").into());
        }
    }
    let Some(web) = web else {
        return Err(not_found().into());
    };
    let resp = match web.svc.oneshot(req).await {
        Ok(r) => r,
        Err(never) => match never {},
    };
    match resp.status() {
        StatusCode::NOT_FOUND => Err(not_found().into()),
        StatusCode::METHOD_NOT_ALLOWED => Err(not_found().into()),
        _ => Ok(resp),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("/a%2F..%2fb").as_deref(), Some("/a/../b"));
        assert_eq!(percent_decode("/%zz"), None);
        assert_eq!(percent_decode("/%"), None);
        assert_eq!(percent_decode("/%ff"), None);
    }
}
