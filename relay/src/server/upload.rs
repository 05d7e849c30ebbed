//! Uploads: `POST /blocks` (binary: envelope then payload, streamed) and the
//! seed's `POST /upload_moe_experts` (JSON, base64 payload).
//!
//! Every upload goes through the same steps, cheapest first, and the chain
//! rules are web-node's (the same phases a node runs):
//!
//! 1. Content-Type of the route (415), the client IP's rate (429), the body
//!    size against the limits (413). Nothing has been read yet.
//! 2. The header alone: `check_standalone` (fields, signature), the miner
//!    key's rate (429), `check_context` under a shared chain lock (meta link,
//!    parents, slot, builds on the head), the write rules ([`super::auth`],
//!    403), and a place in the evaluation queue if the gate will evaluate (429).
//!    A binary upload is refused here at its first bytes (bad magic, header).
//! 3. The payload as it streams into a staging file: chunk hashes with
//!    `ChunkHasher`, root and length against the header, then the content
//!    (meta spec, or the tensors of the slot). Never held in memory twice.
//! 4. The gate (bounded concurrency), then the block file is made durable
//!    (fsync, rename) with no lock held.
//! 5. Under the commit lock: re-check that the slot head did not move (409
//!    `not_head` if it did), index (one redb transaction), insert into the
//!    chain under its write lock for the time of one insert.
//!
//! Any failure removes the staged file: nothing is stored.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::Json;
use futures_util::StreamExt as _;
use tempfile::TempPath;
use tokio::sync::OwnedSemaphorePermit;
use web_node::chain::{
    check_context, check_payload_content, check_standalone, check_tensor_header, limits, Block,
    BlockHash, BlockHeader, ChainError, ChainId, ChainView as _, ChunkHasher, MetaPayload,
    ValidatedBlock, BLOCK_MAGIC,
};
use web_node::model::Config;
use web_node::net::api::{codes, ApiError, BlockInfo, SeedUpload};

use crate::auth::{self, MetaWriters};
use crate::gate::{GateContext, PayloadRef};
use crate::http::{blocking, peer_ip, store_err, ApiResult, HttpError};
use crate::state::SharedCore;
use crate::store::{Committed, Expect};

/// Body pieces queued between the connection and the staging writer.
const STAGE_QUEUE: usize = 8;

type Created = (StatusCode, Json<BlockInfo>);

fn too_large(what: &str, max: u64) -> ApiError {
    ApiError::new(
        codes::TOO_LARGE,
        format!("{what} is larger than {max} bytes"),
    )
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Refuse a body whose Content-Type is not `want` (so a web page cannot
/// post a form or `text/plain` to an upload route).
fn check_content_type(headers: &HeaderMap, want: &str) -> Result<(), HttpError> {
    let got = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let mime = got.split(';').next().unwrap_or_default().trim();
    if mime.eq_ignore_ascii_case(want) {
        return Ok(());
    }
    Err(HttpError::unsupported_media(format!(
        "this route takes Content-Type: {want}, not {:?}",
        got
    )))
}

fn take_ip(st: &SharedCore, headers: &axum::http::Extensions) -> Result<(), HttpError> {
    let ip = peer_ip(headers);
    st.rt().rates.ip.take(&ip).map_err(|wait| {
        crate::metrics::refused(crate::metrics::Limit::UploadIpRate);
        HttpError::rate_limited(
            format!(
                "too many uploads from {ip}: at most {} per minute (burst {}); retry in {wait} s",
                st.opts.ip_rate.per_minute, st.opts.ip_rate.burst
            ),
            wait,
        )
    })
}

/// The next body piece; a body idle for `idle` is cut (408).
async fn next_piece<S>(stream: &mut S, idle: Duration) -> Result<Option<Bytes>, HttpError>
where
    S: futures_util::Stream<Item = Result<Bytes, axum::Error>> + Unpin,
{
    match tokio::time::timeout(idle, stream.next()).await {
        Err(_) => Err(HttpError::timeout(format!(
            "no body bytes for {} s: upload cut",
            idle.as_secs_f64()
        ))),
        Ok(None) => Ok(None),
        Ok(Some(Err(e))) => Err(ApiError::malformed(format!("reading the body: {e}")).into()),
        Ok(Some(Ok(b))) => Ok(Some(b)),
    }
}

/// A small body refused after its envelope (write rules, rate limits, a
/// moved head) is read to its end before the answer goes out: closing a
/// socket with unread bytes makes the kernel reset the connection, and the
/// client would see a broken pipe instead of the 403 / 409 / 429. Bodies over
/// [`DRAIN_LIMIT`], or that do not arrive within [`DRAIN_TIME`], are cut.
async fn drain_small<S>(stream: &mut S, declared: Option<u64>)
where
    S: futures_util::Stream<Item = Result<Bytes, axum::Error>> + Unpin,
{
    if declared.is_none_or(|n| n > DRAIN_LIMIT) {
        return;
    }
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        let mut read = 0u64;
        while let Some(Ok(b)) = stream.next().await {
            read += b.len() as u64;
            if read > DRAIN_LIMIT {
                break;
            }
        }
    })
    .await;
}

/// The largest refused body read to its end (see [`drain_small`]).
const DRAIN_LIMIT: u64 = 1 << 20;
/// The longest a refused body is read for.
const DRAIN_TIME: Duration = Duration::from_secs(2);

/// What the header check decided.
struct Admitted {
    config: Option<Config>,
    /// The slot's head when the header was checked.
    head: Option<BlockHash>,
    /// Present when the gate evaluates this block.
    gate: Option<GateTicket>,
}

struct GateTicket {
    slot_heads: BTreeMap<String, BlockHash>,
    _queued: OwnedSemaphorePermit,
}

/// Step 2: the header alone (see the module docs).
async fn admit(st: &SharedCore, block: &Block) -> Result<Admitted, HttpError> {
    check_standalone(block)?;
    let h = &block.header;
    st.rt().rates.key.take(&h.miner).map_err(|wait| {
        crate::metrics::refused(crate::metrics::Limit::UploadKeyRate);
        HttpError::rate_limited(
            format!(
                "miner {} uploads too fast: at most {} per minute (burst {}); retry in {wait} s",
                h.miner_hex(),
                st.opts.key_rate.per_minute,
                st.opts.key_rate.burst
            ),
            wait,
        )
    })?;
    let (config, head, slot_heads) = {
        let chain = st.chain.read().await;
        let config = check_context(block, &chain.dag)?;
        let head = chain.dag.head(h.meta.as_ref(), &h.name);
        let writers = h.meta.as_ref().and_then(|m| chain.meta_writers(m));
        auth::check_write(st.meta_keys(), block, head, writers)?;
        let evaluates = head.is_some() && st.gate().evaluates(block);
        let heads = match (evaluates, &h.meta) {
            (true, Some(m)) => Some(chain.dag.slot_heads(m)),
            (true, None) => Some(BTreeMap::new()),
            _ => None,
        };
        (config, head, heads)
    };
    let gate = match slot_heads {
        None => None,
        Some(slot_heads) => {
            let permit = st
                .rt()
                .eval_queue
                .clone()
                .try_acquire_owned()
                .map_err(|_| {
                    crate::metrics::refused(crate::metrics::Limit::EvalQueue);
                    HttpError::rate_limited(
                        format!(
                            "the quality gate's queue is full ({} uploads waiting for evaluation)",
                            st.opts.eval_queue
                        ),
                        10,
                    )
                })?;
            Some(GateTicket {
                slot_heads,
                _queued: permit,
            })
        }
    };
    Ok(Admitted { config, head, gate })
}

/// A fully received, integrity-checked upload in its staging file.
struct Staged {
    block: Block,
    path: TempPath,
    chunks: Vec<BlockHash>,
    meta: Option<(MetaPayload, Config)>,
    writers: Option<MetaWriters>,
}

/// Compare what streamed in with the header's length and root.
fn check_root(block: &Block, root: BlockHash, len: u64) -> Result<(), ChainError> {
    let h = &block.header;
    if len != h.payload_len {
        return Err(ChainError::PayloadLength {
            header: h.payload_len,
            actual: len,
        });
    }
    if root != h.payload_root {
        return Err(ChainError::PayloadRoot {
            expected: h.payload_root,
            actual: root,
        });
    }
    Ok(())
}

/// What a content check learnt: the parsed meta spec and writers (chain A).
type Content = (Option<(MetaPayload, Config)>, Option<MetaWriters>);

/// What the staging writer returns: the staged file, chunk hashes, root, length.
type Written = (TempPath, Vec<BlockHash>, BlockHash, u64);

/// Step 3's content check of a chain-A upload: the meta spec, read from the
/// staged file (at most [`limits::MAX_META_PAYLOAD_LEN`]). Chain-B tensors are
/// checked from the safetensors header while the payload streams ([`start_sink`]).
fn check_staged_meta(block: &Block, path: &std::path::Path) -> Result<Content, ApiError> {
    let h = &block.header;
    if h.chain != ChainId::A {
        return Ok((None, None));
    }
    let mut payload = std::fs::read(path)
        .map_err(|e| ApiError::internal(format!("reading the staged upload: {e}")))?;
    payload.drain(..block.encoded_len().min(payload.len()));
    let meta = check_payload_content(h, &payload, None)?;
    let writers = MetaWriters::of(block, &payload);
    Ok((meta, Some(writers)))
}

/// The gate's evaluation of a staged block (one at a time, on a blocking
/// thread), reading the payload from the staging file.
async fn run_gate(
    st: &SharedCore,
    block: &std::sync::Arc<Block>,
    path: &std::path::Path,
    ticket: GateTicket,
    head: BlockHash,
    config: Option<Config>,
) -> ApiResult<()> {
    let _running = st
        .rt()
        .eval_run
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| ApiError::internal("evaluation limiter closed"))?;
    let (st2, b2) = (st.clone(), block.clone());
    let p: PathBuf = path.to_path_buf();
    blocking(move || {
        let ctx = GateContext {
            block: &b2,
            payload: PayloadRef::File {
                path: &p,
                offset: b2.encoded_len() as u64,
                len: b2.header.payload_len,
            },
            head,
            config: config.as_ref(),
            slot_heads: &ticket.slot_heads,
            store: st2.store.as_ref(),
        };
        let started = std::time::Instant::now();
        let verdict = st2.gate().check(&ctx);
        crate::metrics::gate_evaluation(
            started.elapsed(),
            verdict.as_ref().err().map(|r| r.code),
        );
        verdict.map_err(|r| {
            tracing::info!(block = %b2.hash, slot = %b2.header.name, reason = %r, "gate rejected block");
            ApiError::from(r)
        })
    })
    .await?;
    Ok(())
}

/// Under the commit lock: refuse a block the chain got meanwhile (409) or
/// whose slot head moved since its header was checked (the placed file is
/// discarded).
async fn recheck_head(
    st: &SharedCore,
    block: &Block,
    expected: Option<BlockHash>,
) -> ApiResult<()> {
    let h = &block.header;
    let moved = {
        let chain = st.chain.read().await;
        if chain.dag.get(&block.hash).is_some() {
            // The same block won a race; its file is the one just placed.
            return Err(ApiError::new(
                codes::DUPLICATE,
                format!("block {} already exists", block.hash),
            )
            .into());
        }
        let now = chain.dag.head(h.meta.as_ref(), &h.name);
        (now != expected).then_some(now)
    };
    if let Some(now) = moved {
        let (store, hash) = (st.store.clone(), block.hash);
        blocking(move || store.discard(&hash).map_err(store_err)).await?;
        return Err(ApiError::new(
            codes::NOT_HEAD,
            format!(
                "slot {}'s head moved to {} while this upload was checked; build on the new head",
                h.name,
                now.map(|x| x.to_hex()).unwrap_or_else(|| "none".into())
            ),
        )
        .into());
    }
    Ok(())
}

/// The store's commit, which settles the head once more (another relay on
/// the same database may have moved it); a refused block's file is discarded.
async fn commit_to_store(
    st: &SharedCore,
    block: &std::sync::Arc<Block>,
    chunks: Vec<BlockHash>,
    expected: Option<BlockHash>,
) -> ApiResult<()> {
    let h = &block.header;
    let (store, b2) = (st.store.clone(), block.clone());
    let expect = Expect::Head(expected);
    let committed = blocking(move || store.commit(&b2, &chunks, expect).map_err(store_err)).await;
    match committed {
        Ok(Committed::Done) => {}
        Ok(Committed::HeadMoved(now)) => {
            let (store, hash) = (st.store.clone(), block.hash);
            let _ = blocking(move || store.discard(&hash).map_err(store_err)).await;
            return Err(ApiError::new(
                codes::NOT_HEAD,
                format!(
                    "slot {}'s head moved to {} (accepted by another relay) while this upload was checked; build on the new head",
                    h.name,
                    now.map(|x| x.to_hex()).unwrap_or_else(|| "none".into())
                ),
            )
            .into());
        }
        Err(e) => {
            if e.code != codes::DUPLICATE {
                let (store, hash) = (st.store.clone(), block.hash);
                let _ = blocking(move || store.discard(&hash).map_err(store_err)).await;
            }
            return Err(e.into());
        }
    }
    Ok(())
}

/// A quantized expert block that names a float block of its slot (in
/// another model) among its parents claims to be that block's quantization:
/// the relay re-derives it and refuses one that differs, naming the tensor
/// and the group. One whose source is unknown goes on like any other block
/// (a new version passes the quality gate).
async fn check_quant_source(
    st: &SharedCore,
    block: &std::sync::Arc<Block>,
    path: &std::path::Path,
    config: Option<Config>,
) -> ApiResult<()> {
    let Some(format) = block.header.dtype.quant() else {
        return Ok(());
    };
    let source = {
        let chain = st.chain.read().await;
        web_node::model::quant_chain::quant_source(block, |h| chain.dag.header(h))
    };
    let Some(source) = source else {
        return Ok(());
    };
    let cfg = config.ok_or_else(|| ApiError::internal("no config for a chain-B block"))?;
    let slot = web_node::model::Slot::parse(&block.header.name)
        .map_err(|e| ApiError::new(codes::INVALID_BLOCK, e.to_string()))?;
    let (store, b2, p) = (st.store.clone(), block.clone(), path.to_path_buf());
    blocking(move || {
        let src = store.payload(&source).map_err(store_err)?;
        let mut payload = std::fs::read(&p)
            .map_err(|e| ApiError::internal(format!("reading the staged upload: {e}")))?;
        payload.drain(..b2.encoded_len().min(payload.len()));
        web_node::model::quant::verify_quantized(&cfg, slot, &src, &payload, format).map_err(|e| {
            tracing::info!(block = %b2.hash, slot = %b2.header.name, source = %source, reason = %e, "quantized block refused");
            ApiError::new(
                codes::REJECTED,
                format!(
                    "{} is not the {format} quantization of its source block {source}: {e}",
                    b2.header.name
                ),
            )
        })
    })
    .await
    .map_err(Into::into)
}

/// Steps 4 and 5 (see the module docs).
async fn finish(st: &SharedCore, adm: Admitted, staged: Staged) -> ApiResult<Created> {
    let Staged {
        block,
        path,
        chunks,
        meta,
        writers,
    } = staged;
    let block = std::sync::Arc::new(block);
    check_quant_source(st, &block, &path, adm.config.clone()).await?;
    if let (Some(ticket), Some(head)) = (adm.gate, adm.head) {
        run_gate(st, &block, &path, ticket, head, adm.config.clone()).await?;
    }
    // Durable file, no lock held.
    let (store, b2) = (st.store.clone(), block.clone());
    blocking(move || {
        store.place_staged(&b2, &path).map_err(store_err)?;
        // Moved into place: the staging name no longer exists.
        let _ = path.keep();
        Ok(())
    })
    .await?;
    // Commit: re-check the head, index, insert.
    let _commit = st.commit.lock().await;
    let h = &block.header;
    recheck_head(st, &block, adm.head).await?;
    // The store settles the head once more: another relay on the same
    // database may have moved it since this relay's chain saw it.
    commit_to_store(st, &block, chunks, adm.head).await?;
    let v = ValidatedBlock {
        block: (*block).clone(),
        meta,
    };
    st.chain.write().await.insert(&v, writers);
    st.block_added(&block);
    if let Some(v) = st.gate().take_verdict(&block.hash) {
        st.usage.record_quality(&block.hash, v.loss, v.incumbent);
    }
    tracing::info!(block = %block.hash, chain = ?h.chain, slot = %h.name, bytes = h.payload_len, "block accepted");
    Ok((
        StatusCode::CREATED,
        Json(BlockInfo::from(&*block).with_head(true)),
    ))
}

/// The staging writer: a blocking task fed body pieces through a bounded
/// channel; writes them after the envelope and hashes them as they pass. For
/// a chain-B block it keeps the payload's first bytes until the safetensors
/// header is complete and checks the tensors then (web-node's
/// `check_tensor_header`): a wrong payload is refused before the rest is read.
struct Sink {
    tx: tokio::sync::mpsc::Sender<Bytes>,
    task: tokio::task::JoinHandle<Result<Written, ApiError>>,
}

/// The safetensors header check of a streaming chain-B payload.
struct TensorCheck {
    header: BlockHeader,
    config: Config,
    prefix: Vec<u8>,
    done: bool,
}

impl TensorCheck {
    /// The safetensors header length, once its 8 bytes are in.
    fn header_len(&self) -> Option<u64> {
        Some(u64::from_le_bytes(self.prefix.get(..8)?.try_into().ok()?))
    }

    /// Bytes of prefix the check needs (8, then 8 + the header length), and
    /// whether it can run now (a header length past the limits or the
    /// payload is refused from its 8 bytes).
    fn need(&self) -> (usize, bool) {
        match self.header_len() {
            None => (8, false),
            Some(n) if n > limits::MAX_SAFETENSORS_HEADER as u64 => (8, true),
            Some(n) if n + 8 > self.header.payload_len => (8, true),
            Some(n) => (8 + n as usize, self.prefix.len() >= 8 + n as usize),
        }
    }

    /// Feed payload bytes; runs the check once the header is in.
    fn feed(&mut self, mut bytes: &[u8]) -> Result<(), ChainError> {
        while !self.done && !bytes.is_empty() {
            let take = self
                .need()
                .0
                .saturating_sub(self.prefix.len())
                .min(bytes.len());
            self.prefix.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.need().1 {
                self.done = true;
                let r = check_tensor_header(&self.header, &self.prefix, &self.config);
                self.prefix = Vec::new();
                return r;
            }
        }
        Ok(())
    }

    /// At the end of the payload: the check must have run.
    fn finish(mut self) -> Result<(), ChainError> {
        if self.done {
            return Ok(());
        }
        self.done = true;
        check_tensor_header(&self.header, &self.prefix, &self.config)
    }
}

fn start_sink(
    dir: PathBuf,
    envelope: Vec<u8>,
    header: &BlockHeader,
    config: Option<Config>,
) -> Sink {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(STAGE_QUEUE);
    let chunk_size = header.chunk_size;
    let mut tensors = match (header.chain, config) {
        (ChainId::B, Some(config)) => Some(TensorCheck {
            header: header.clone(),
            config,
            prefix: Vec::new(),
            done: false,
        }),
        _ => None,
    };
    let task = tokio::task::spawn_blocking(move || {
        use std::io::Write as _;
        let stage = |e: std::io::Error| ApiError::internal(format!("staging the upload: {e}"));
        let tmp = tempfile::Builder::new()
            .prefix("upload-")
            .tempfile_in(&dir)
            .map_err(stage)?;
        let (file, path) = tmp.into_parts();
        let mut w = std::io::BufWriter::with_capacity(256 * 1024, file);
        w.write_all(&envelope).map_err(stage)?;
        let mut hasher = ChunkHasher::new(chunk_size);
        while let Some(piece) = rx.blocking_recv() {
            if let Some(t) = tensors.as_mut() {
                t.feed(&piece)?;
            }
            hasher.update(&piece);
            w.write_all(&piece).map_err(stage)?;
        }
        w.flush().map_err(stage)?;
        let (chunks, root, len) = hasher.finish();
        if let Some(t) = tensors {
            if len == t.header.payload_len {
                t.finish()?;
            }
        }
        Ok((path, chunks, root, len))
    });
    Sink { tx, task }
}

/// Count an upload's outcome ([`crate::metrics::upload`]).
fn counted(route: crate::metrics::UploadRoute, r: ApiResult<Created>) -> ApiResult<Created> {
    let outcome = r.as_ref().map(|_| ()).map_err(|e| e.error.code.as_str());
    crate::metrics::upload(route, outcome);
    r
}

/// `POST /blocks`: envelope then payload, checked as it streams in.
/// `POST /blocks` and the seed's `POST /upload_moe_experts`.
pub(super) fn routes() -> axum::Router<SharedCore> {
    use axum::routing::post;
    axum::Router::new()
        .route("/blocks", post(upload_binary))
        .route("/upload_moe_experts", post(upload_json))
}

pub(super) async fn upload_binary(state: State<SharedCore>, req: Request) -> ApiResult<Created> {
    counted(
        crate::metrics::UploadRoute::Blocks,
        binary(state, req).await,
    )
}

/// Read the envelope (magic, header length, header, signature): refused at
/// the first bytes that cannot start a block. Returns the block, the
/// envelope's length and every byte read so far (the payload's first
/// bytes follow the envelope).
async fn read_envelope<S>(stream: &mut S, idle: Duration) -> ApiResult<(Block, usize, Vec<u8>)>
where
    S: futures_util::Stream<Item = Result<Bytes, axum::Error>> + Unpin,
{
    // The envelope: magic, header length, header, signature. Refused at the
    // first bytes that cannot start a block.
    let mut head: Vec<u8> = Vec::new();
    let mut need = 8usize;
    let (block, used) = loop {
        if head.len() >= need {
            if need == 8 {
                let hlen = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as usize;
                if hlen > limits::MAX_HEADER_LEN {
                    return Err(ChainError::TooLarge {
                        what: "header",
                        len: hlen as u64,
                        max: limits::MAX_HEADER_LEN as u64,
                    }
                    .into());
                }
                need = 8 + hlen + 64;
                continue;
            }
            break Block::decode_prefix(&head)?;
        }
        let Some(piece) = next_piece(stream, idle).await? else {
            return Err(ApiError::malformed(if head.len() < 8 {
                "shorter than the block envelope"
            } else {
                "truncated block envelope"
            })
            .into());
        };
        head.extend_from_slice(&piece);
        let n = head.len().min(4);
        if head[..n] != BLOCK_MAGIC[..n] {
            return Err(ApiError::malformed("bad magic (not an AI-Block block)").into());
        }
    };
    Ok((block, used, head))
}

/// The envelope plus the header's payload length: within `max`, and equal
/// to the Content-Length when one was sent.
fn check_upload_length(declared: Option<u64>, used: usize, plen: u64, max: u64) -> ApiResult<()> {
    let total = used as u64 + plen;
    if total > max {
        return Err(too_large("block upload", max).into());
    }
    if let Some(d) = declared {
        if d != total {
            return Err(ApiError::malformed(format!(
                "Content-Length {d} is not the envelope ({used}) plus the header's payload length ({plen})"
            ))
            .into());
        }
    }
    Ok(())
}

async fn binary(State(st): State<SharedCore>, req: Request) -> ApiResult<Created> {
    let (parts, body) = req.into_parts();
    check_content_type(&parts.headers, "application/octet-stream")?;
    take_ip(&st, &parts.extensions)?;
    let max = st.opts.max_binary_body;
    let declared = content_length(&parts.headers);
    if declared.is_some_and(|n| n > max) {
        return Err(too_large("block upload", max).into());
    }
    let idle = st.opts.body_idle_timeout;
    let mut stream = body.into_data_stream();
    let (block, used, mut head) = read_envelope(&mut stream, idle).await?;
    let plen = block.header.payload_len;
    check_upload_length(declared, used, plen, max)?;
    let adm = match admit(&st, &block).await {
        Ok(a) => a,
        Err(e) => {
            drain_small(&mut stream, declared).await;
            return Err(e);
        }
    };
    let first = Bytes::from(head.split_off(used));
    let sink = start_sink(
        st.opts.staging_dir.clone(),
        head,
        &block.header,
        adm.config.clone(),
    );
    let mut seen: u64 = 0;
    let mut piece = Some(first);
    let streamed: Result<(), HttpError> = async {
        loop {
            let Some(p) = piece.take() else { break };
            seen += p.len() as u64;
            if seen > plen {
                return Err(ApiError::malformed(format!(
                    "body is longer than the envelope plus the header's payload length ({plen})"
                ))
                .into());
            }
            if !p.is_empty() && sink.tx.send(p).await.is_err() {
                break; // the writer failed: its error is returned below
            }
            // Stop reading as soon as the writer refused the payload.
            piece = tokio::select! {
                r = next_piece(&mut stream, idle) => r?,
                _ = sink.tx.closed() => break,
            };
        }
        Ok(())
    }
    .await;
    let Sink { tx, task } = sink;
    drop(tx);
    let written = task
        .await
        .map_err(|e| ApiError::internal(format!("staging task: {e}")))?;
    // A refusal from the writer (tensors) comes before one from the stream:
    // it is why the stream stopped.
    let (path, chunks, root, len) = match (written, streamed) {
        (Err(e), _) => return Err(e.into()),
        (Ok(_), Err(e)) => return Err(e),
        (Ok(w), Ok(())) => w,
    };
    check_root(&block, root, len)?;
    let b2 = block.clone();
    let (path, meta, writers) = blocking(move || {
        let (meta, writers) = check_staged_meta(&b2, &path)?;
        Ok((path, meta, writers))
    })
    .await?;
    let staged = Staged {
        block,
        path,
        chunks,
        meta,
        writers,
    };
    finish(&st, adm, staged).await
}

/// `POST /upload_moe_experts`: the seed's JSON body.
pub(super) async fn upload_json(state: State<SharedCore>, req: Request) -> ApiResult<Created> {
    counted(crate::metrics::UploadRoute::Json, json(state, req).await)
}

async fn json(State(st): State<SharedCore>, req: Request) -> ApiResult<Created> {
    let (parts, body) = req.into_parts();
    check_content_type(&parts.headers, "application/json")?;
    take_ip(&st, &parts.extensions)?;
    let max = st.opts.max_json_body;
    if content_length(&parts.headers).is_some_and(|n| n > max as u64) {
        return Err(too_large("JSON body", max as u64).into());
    }
    // A decoding slot, held until the payload is staged.
    let permit = tokio::time::timeout(
        crate::limits::UPLOAD_QUEUE_WAIT,
        st.rt().json.clone().acquire_owned(),
    )
    .await
    .map_err(|_| {
        crate::metrics::refused(crate::metrics::Limit::JsonUploads);
        HttpError::unavailable(
            format!(
                "{} JSON uploads are being decoded; use POST /blocks or retry",
                st.opts.json_concurrency
            ),
            2,
        )
    })?
    .map_err(|_| ApiError::internal("JSON limiter closed"))?;
    let idle = st.opts.body_idle_timeout;
    let mut buf: Vec<u8> = Vec::new();
    let mut stream = body.into_data_stream();
    while let Some(piece) = next_piece(&mut stream, idle).await? {
        if buf.len() + piece.len() > max {
            return Err(too_large("JSON body", max as u64).into());
        }
        buf.extend_from_slice(&piece);
    }
    let up: SeedUpload = serde_json::from_slice(&buf)
        .map_err(|e| ApiError::malformed(format!("upload body: {e}")))?;
    drop(buf);
    let latest = st.chain.read().await.dag.latest_meta().map(|e| e.hash);
    let (block, payload) = up.to_block(latest)?;
    drop(up);
    let adm = admit(&st, &block).await?;
    let (config, b2, dir) = (
        adm.config.clone(),
        block.clone(),
        st.opts.staging_dir.clone(),
    );
    let (path, chunks, meta, writers) = blocking(move || {
        let h = &b2.header;
        let mut hasher = ChunkHasher::new(h.chunk_size);
        hasher.update(&payload);
        let (chunks, root, len) = hasher.finish();
        check_root(&b2, root, len)?;
        let meta = check_payload_content(h, &payload, config.as_ref())?;
        let writers = (h.chain == ChainId::A).then(|| MetaWriters::of(&b2, &payload));
        use std::io::Write as _;
        let stage = |e: std::io::Error| ApiError::internal(format!("staging the upload: {e}"));
        let mut tmp = tempfile::Builder::new()
            .prefix("upload-")
            .tempfile_in(&dir)
            .map_err(stage)?;
        tmp.write_all(&b2.encode()).map_err(stage)?;
        tmp.write_all(&payload).map_err(stage)?;
        Ok((tmp.into_temp_path(), chunks, meta, writers))
    })
    .await?;
    drop(permit);
    let staged = Staged {
        block,
        path,
        chunks,
        meta,
        writers,
    };
    finish(&st, adm, staged).await
}
