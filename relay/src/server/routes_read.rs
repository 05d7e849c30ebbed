//! Read routes. None waits on an upload: the chain lock is held shared for
//! the time it takes to copy a page out of memory, and uploads hold it
//! exclusively only to insert one block.

use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path as UrlPath, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use web_node::chain::{Block, BlockHash, ChainId};
use web_node::net::api::{codes, ApiError, ChunkList, SlotHead};

use crate::http::{blocking, store_err, ApiResult, HttpError};
use crate::state::SharedCore;

/// Bytes read from the store per piece of a streamed payload response
/// (rounded up to whole chunks: every piece is checked against the chunk list).
const PAYLOAD_PIECE: u64 = 1024 * 1024;

fn parse_hash(p: Result<UrlPath<String>, PathRejection>) -> Result<BlockHash, ApiError> {
    let UrlPath(s) = p.map_err(|e| ApiError::malformed(e.body_text()))?;
    BlockHash::from_hex(&s)
        .map_err(|_| ApiError::malformed(format!("{s:?} is not a block hash (64 hex characters)")))
}

fn query_param<'a>(query: &'a Option<String>, key: &str) -> Option<&'a str> {
    query
        .as_deref()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

async fn get_block_of(st: &SharedCore, hash: BlockHash) -> Result<Block, ApiError> {
    let store = st.store.clone();
    blocking(move || store.get(&hash).map_err(store_err))
        .await?
        .ok_or_else(|| ApiError::not_found(format!("block {hash} not found")))
}

/// `GET /chain/{A|B}/blocks[?after=<hash>][&limit=N]`: blocks in acceptance
/// order, at most `limit` (default and maximum in [`super::limits`]) after
/// `after`. When more follow, a `Link: <...?after=<last>&limit=N>; rel="next"`
/// header points at the next page. Without parameters this is the seed's
/// listing (complete for chains up to the default page).
/// The read side of the REST API: listings, blocks, payloads, chunk lists, heads.
pub(super) fn routes() -> axum::Router<SharedCore> {
    use axum::routing::get;
    axum::Router::new()
        .route("/chain/{chain}/blocks", get(list_chain))
        .route("/blocks/{hash}", get(get_block))
        .route("/blocks/{hash}/payload", get(get_payload))
        .route("/blocks/{hash}/chunks", get(get_chunks))
        .route("/heads", get(get_heads))
}

pub(super) async fn list_chain(
    State(st): State<SharedCore>,
    chain: Result<UrlPath<String>, PathRejection>,
    RawQuery(query): RawQuery,
) -> ApiResult<Response> {
    let UrlPath(c) = chain.map_err(|e| ApiError::malformed(e.body_text()))?;
    let chain = ChainId::parse(&c)
        .ok_or_else(|| ApiError::not_found(format!("no chain {c:?} (A or B)")))?;
    let after = match query_param(&query, "after") {
        None | Some("") => None,
        Some(s) => Some(BlockHash::from_hex(s).map_err(|_| {
            ApiError::malformed(format!(
                "after={s:?} is not a block hash (64 hex characters)"
            ))
        })?),
    };
    let limit = match query_param(&query, "limit") {
        None | Some("") => st.opts.default_page,
        Some(s) => s
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=st.opts.max_page).contains(n))
            .ok_or_else(|| {
                ApiError::malformed(format!(
                    "limit={s:?} must be a number in 1..={}",
                    st.opts.max_page
                ))
            })?,
    };
    let (infos, more) = st.chain.read().await.page(chain, after.as_ref(), limit)?;
    let next = match (more, infos.last()) {
        (true, Some(last)) => Some(format!(
            "</chain/{c}/blocks?after={}&limit={limit}>; rel=\"next\"",
            last.hash
        )),
        _ => None,
    };
    let mut resp = Json(infos).into_response();
    if let Some(v) = next.and_then(|n| HeaderValue::from_str(&n).ok()) {
        resp.headers_mut().insert(header::LINK, v);
    }
    Ok(resp)
}

fn wants_binary(query: &Option<String>, headers: &HeaderMap) -> bool {
    if query_param(query, "format") == Some("bin") {
        return true;
    }
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/octet-stream"))
}

pub(super) async fn get_block(
    State(st): State<SharedCore>,
    hash: Result<UrlPath<String>, PathRejection>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let hash = parse_hash(hash)?;
    if wants_binary(&query, &headers) {
        let b = get_block_of(&st, hash).await?;
        return Ok((
            [(header::CONTENT_TYPE, "application/octet-stream")],
            b.encode(),
        )
            .into_response());
    }
    let info = st.chain.read().await.info(&hash);
    match info {
        Some(i) => Ok(Json(i).into_response()),
        None => Err(ApiError::not_found(format!("block {hash} not found")).into()),
    }
}

/// A parsed single `Range: bytes=...` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RangeSpec {
    From(u64, Option<u64>),
    Suffix(u64),
}

/// Parse a single byte range; None for absent, multiple or unparsable ranges
/// (which are ignored: the whole payload is served).
fn parse_range(headers: &HeaderMap) -> Option<RangeSpec> {
    let v = headers.get(header::RANGE)?.to_str().ok()?.trim();
    let spec = v.strip_prefix("bytes=")?.trim();
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        return Some(RangeSpec::Suffix(b.parse().ok()?));
    }
    let start: u64 = a.parse().ok()?;
    let end = if b.is_empty() {
        None
    } else {
        Some(b.parse().ok()?)
    };
    if end.is_some_and(|e| e < start) {
        return None;
    }
    Some(RangeSpec::From(start, end))
}

/// Resolve a range against a length: Ok(start, end_exclusive), Err if unsatisfiable.
fn resolve_range(r: RangeSpec, len: u64) -> Result<(u64, u64), ()> {
    match r {
        RangeSpec::From(s, e) => {
            if s >= len {
                return Err(());
            }
            Ok((s, e.map_or(len, |e| e.saturating_add(1).min(len))))
        }
        RangeSpec::Suffix(n) => {
            if n == 0 || len == 0 {
                return Err(());
            }
            Ok((len - n.min(len), len))
        }
    }
}

/// End of the piece that starts at `pos`: the next multiple of the piece
/// size (a whole number of chunks), capped at `end`.
fn piece_end(pos: u64, end: u64, chunk_size: u32) -> u64 {
    let cs = u64::from(chunk_size.max(1));
    let piece = PAYLOAD_PIECE.div_ceil(cs) * cs;
    ((pos / piece + 1) * piece).min(end)
}

pub(super) async fn get_payload(
    State(st): State<SharedCore>,
    hash: Result<UrlPath<String>, PathRejection>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let hash = parse_hash(hash)?;
    let b = get_block_of(&st, hash).await?;
    let len = b.header.payload_len;
    let cs = b.header.chunk_size;
    let (status, start, end) = match parse_range(&headers) {
        None => (StatusCode::OK, 0, len),
        Some(r) => match resolve_range(r, len) {
            Ok((s, e)) => (StatusCode::PARTIAL_CONTENT, s, e),
            Err(()) => {
                let mut resp = HttpError::from(ApiError::new(
                    codes::RANGE_NOT_SATISFIABLE,
                    format!("range outside the payload of {len} bytes"),
                ))
                .into_response();
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                    resp.headers_mut().insert(header::CONTENT_RANGE, v);
                }
                return Ok(resp);
            }
        },
    };
    // The first piece is read (and checked) before the status is sent, so a
    // corrupted or quarantined payload gets an error, not a 200.
    let store = st.store.clone();
    let first_end = piece_end(start, end, cs);
    let first = if start < end {
        let s = store.clone();
        blocking(move || {
            s.read_payload(&hash, start, first_end - start)
                .map_err(store_err)
        })
        .await?
    } else {
        Vec::new()
    };
    crate::metrics::payload_bytes(first.len() as u64);
    let head =
        futures_util::stream::once(async move { Ok::<_, std::io::Error>(Bytes::from(first)) });
    let rest = futures_util::stream::unfold(first_end, move |pos| {
        let store = store.clone();
        async move {
            if pos >= end {
                return None;
            }
            let to = piece_end(pos, end, cs);
            let r =
                tokio::task::spawn_blocking(move || store.read_payload(&hash, pos, to - pos)).await;
            let item = match r {
                Ok(Ok(v)) => {
                    crate::metrics::payload_bytes(v.len() as u64);
                    Ok(Bytes::from(v))
                }
                Ok(Err(e)) => Err(std::io::Error::other(e.to_string())),
                Err(e) => Err(std::io::Error::other(e.to_string())),
            };
            // After an error, end the stream (the client sees a short body).
            let next = if item.is_ok() { to } else { end };
            Some((item, next))
        }
    });
    use futures_util::StreamExt as _;
    let mut resp = Response::new(Body::from_stream(head.chain(rest)));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
    if status == StatusCode::PARTIAL_CONTENT {
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{}/{len}", end - 1)) {
            h.insert(header::CONTENT_RANGE, v);
        }
    }
    Ok(resp)
}

/// `GET /blocks/{hash}/chunks`: the chunk list stored when the block was accepted.
pub(super) async fn get_chunks(
    State(st): State<SharedCore>,
    hash: Result<UrlPath<String>, PathRejection>,
) -> ApiResult<Json<ChunkList>> {
    let hash = parse_hash(hash)?;
    let b = get_block_of(&st, hash).await?;
    let store = st.store.clone();
    let chunks = blocking(move || store.chunk_list(&hash).map_err(store_err)).await?;
    let h = &b.header;
    Ok(Json(ChunkList {
        hash,
        payload_len: h.payload_len,
        chunk_size: h.chunk_size,
        payload_root: h.payload_root,
        chunks,
    }))
}

pub(super) async fn get_heads(State(st): State<SharedCore>) -> Json<Vec<SlotHead>> {
    let chain = st.chain.read().await;
    Json(
        chain
            .dag
            .heads()
            .map(|((meta, name), hash)| SlotHead {
                meta: *meta,
                name: name.clone(),
                hash: *hash,
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hm(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::RANGE, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn ranges_parse_and_resolve() {
        assert_eq!(
            parse_range(&hm("bytes=0-9")),
            Some(RangeSpec::From(0, Some(9)))
        );
        assert_eq!(parse_range(&hm("bytes=5-")), Some(RangeSpec::From(5, None)));
        assert_eq!(parse_range(&hm("bytes=-3")), Some(RangeSpec::Suffix(3)));
        assert_eq!(parse_range(&hm("bytes=0-1,4-5")), None);
        assert_eq!(parse_range(&hm("bytes=9-1")), None);
        assert_eq!(parse_range(&hm("items=0-1")), None);
        assert_eq!(resolve_range(RangeSpec::From(0, Some(9)), 5), Ok((0, 5)));
        assert_eq!(resolve_range(RangeSpec::From(5, None), 5), Err(()));
        assert_eq!(resolve_range(RangeSpec::Suffix(3), 10), Ok((7, 10)));
        assert_eq!(resolve_range(RangeSpec::Suffix(30), 10), Ok((0, 10)));
        assert_eq!(
            resolve_range(RangeSpec::From(0, Some(u64::MAX)), 10),
            Ok((0, 10))
        );
    }

    #[test]
    fn pieces_are_whole_chunks() {
        assert_eq!(piece_end(0, 10 << 20, 4096), 1 << 20);
        assert_eq!(piece_end(100, 10 << 20, 4096), 1 << 20);
        assert_eq!(piece_end(1 << 20, 10 << 20, 4096), 2 << 20);
        assert_eq!(piece_end(0, 500, 4096), 500);
        // Chunks larger than the piece: one chunk per piece.
        assert_eq!(piece_end(0, 100 << 20, 3 << 20), 3 << 20);
    }
}
