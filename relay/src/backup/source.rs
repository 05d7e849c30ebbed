//! `relay backup --relay URL`: a serving relay's REST API as the source,
//! and the merge of both chains' listings into one order.

use std::collections::HashSet;
use std::io::Read;
use std::path::Path;
use std::time::Duration;

use web_node::chain::{check_payload_integrity, Block, BlockHash, ChainError, ChainId};
use web_node::client::{link_has_next, ListError, Pager};
use web_node::net::api::{ApiError, BlockInfo};

use super::archive::write_archive;
use super::{BackupError, Summary, MAX_ENVELOPE, MAX_PAGE};

/// A serving relay's REST API.
struct RelayClient {
    base: String,
    agent: ureq::Agent,
}

impl RelayClient {
    fn new(url: &str) -> Self {
        let url = url.trim().trim_end_matches('/');
        let base = if url.contains("://") {
            url.to_string()
        } else {
            format!("http://{url}")
        };
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(10))
            .timeout_read(Duration::from_secs(120))
            .build();
        Self { base, agent }
    }

    /// GET `path`, at most `max` bytes of body.
    fn get(&self, path: &str, max: u64) -> Result<Vec<u8>, BackupError> {
        self.get_with_link(path, max).map(|(body, _)| body)
    }

    /// GET `path`: at most `max` bytes of body, and the `Link` header.
    fn get_with_link(
        &self,
        path: &str,
        max: u64,
    ) -> Result<(Vec<u8>, Option<String>), BackupError> {
        let url = format!("{}{path}", self.base);
        let fail = |message: String| BackupError::Http {
            url: url.clone(),
            message,
        };
        let resp = match self.agent.get(&url).call() {
            Ok(r) => r,
            Err(ureq::Error::Status(code, r)) => {
                let body = r.into_string().unwrap_or_default();
                let msg = serde_json::from_str::<ApiError>(&body)
                    .map(|e| format!("{} ({})", e.message, e.code))
                    .unwrap_or(body);
                return Err(fail(format!("HTTP {code}: {msg}")));
            }
            Err(e) => return Err(fail(e.to_string())),
        };
        let link = resp.header("link").map(str::to_string);
        let mut body = Vec::new();
        resp.into_reader()
            .take(max.saturating_add(1))
            .read_to_end(&mut body)
            .map_err(|e| fail(format!("reading the response: {e}")))?;
        if body.len() as u64 > max {
            return Err(fail(format!("the response is larger than {max} bytes")));
        }
        Ok((body, link))
    }

    /// Every block of a chain, page by page: the client core's [`Pager`]
    /// (its stop rule, bounds and checks against a repeating relay).
    fn list(&self, chain: ChainId, page: u16) -> Result<Vec<BlockInfo>, BackupError> {
        let listing = |e: ListError| BackupError::Listing(e.to_string());
        let mut pager = Pager::new(chain, usize::from(page.clamp(1, MAX_PAGE)));
        while let Some(req) = pager.next_request() {
            let (body, link) = self.get_with_link(&req.path(), 64 << 20)?;
            pager
                .on_page_body(&body, Some(link_has_next(link.as_deref())))
                .map_err(listing)?;
        }
        pager.finish().map_err(listing)
    }

    /// One block (its envelope, checked against the listed hash) and its
    /// payload (checked against the header's length and chunk root).
    fn fetch(&self, info: &BlockInfo) -> Result<(Block, Vec<u8>), BackupError> {
        let h = info.hash;
        let env = self.get(&format!("/blocks/{h}?format=bin"), MAX_ENVELOPE)?;
        let invalid = |error: ChainError| BackupError::SourceInvalid {
            hash: h,
            name: info.name.clone(),
            error: Box::new(error),
        };
        let block = Block::decode(&env).map_err(invalid)?;
        block.check_hash(&h).map_err(invalid)?;
        block.verify_signature().map_err(invalid)?;
        let payload = self.get(&format!("/blocks/{h}/payload"), block.header.payload_len)?;
        check_payload_integrity(&block.header, &payload).map_err(invalid)?;
        Ok((block, payload))
    }
}

/// One order for both chains' listings: each chain's order kept, every block
/// after its meta block and its parents (a meta block before its B blocks).
fn merge_listings(a: Vec<BlockInfo>, b: Vec<BlockInfo>) -> Result<Vec<BlockInfo>, BackupError> {
    let mut done: HashSet<BlockHash> = HashSet::new();
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut a, mut b) = (a.into_iter().peekable(), b.into_iter().peekable());
    let ready = |i: &BlockInfo, done: &HashSet<BlockHash>| {
        i.meta
            .iter()
            .chain(i.parents.iter())
            .all(|d| done.contains(d))
    };
    loop {
        let next = match (a.peek(), b.peek()) {
            (None, None) => return Ok(out),
            (Some(x), _) if ready(x, &done) => a.next(),
            (_, Some(y)) if ready(y, &done) => b.next(),
            (x, y) => {
                let stuck = x.or(y).map(|i| {
                    let missing = i
                        .meta
                        .iter()
                        .chain(i.parents.iter())
                        .find(|d| !done.contains(*d))
                        .map(|d| d.to_hex())
                        .unwrap_or_default();
                    format!(
                        "block {} ({}) depends on {missing}, which the relay did not list before it",
                        i.hash, i.name
                    )
                });
                return Err(BackupError::Listing(stuck.unwrap_or_default()));
            }
        };
        if let Some(i) = next {
            if !done.insert(i.hash) {
                return Err(BackupError::Listing(format!(
                    "block {} is listed twice",
                    i.hash
                )));
            }
            out.push(i);
        }
    }
}

/// Back up a serving relay over its REST API (see the module docs).
pub fn backup_relay(url: &str, page: u16, out: &Path) -> Result<Summary, BackupError> {
    let client = RelayClient::new(url);
    // B first: every meta block a listed B block links to was accepted
    // before it, so the later A listing holds it.
    let b = client.list(ChainId::B, page)?;
    let a = client.list(ChainId::A, page)?;
    let order = merge_listings(a, b)?;
    let client = &client;
    write_archive(out, order.iter().map(|i| client.fetch(i)))
}
