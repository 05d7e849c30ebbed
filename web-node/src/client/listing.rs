//! Paged chain listing (`GET /chain/{A|B}/blocks?after=<hash>&limit=N`),
//! sans-IO: [`Pager::next_request`] says which page to get,
//! [`Pager::on_page`] takes its answer, [`Pager::finish`] gives every block
//! in the relay's order.
//!
//! The cursor is this client's own (the hash of the last block it
//! accepted), not a URL the relay hands out, so a relay cannot send it
//! elsewhere. Nothing in a page is trusted: a page larger than asked, a
//! block listed twice, a page that does not move past the cursor, a block
//! on the wrong chain, or more blocks than [`Pager::max_blocks`] is a clear
//! [`ListError`], never a loop or an unbounded allocation.

use std::collections::HashSet;

use crate::chain::{BlockHash, ChainId};
use crate::net::api::BlockInfo;

/// The relay's largest page (`limit` above it is refused with 400).
pub const MAX_PAGE: usize = 1000;
/// Most blocks one listing accepts by default: far past any chain a relay
/// holds today (a 16 × 64 model is 1,042 blocks; every expert improved a
/// hundred times is ~100,000), small enough to bound a hostile relay.
pub const DEFAULT_MAX_BLOCKS: usize = 4_000_000;

/// Why a listing could not be completed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ListError {
    #[error("chain {chain:?}: the page after {after} is not a block listing: {reason}")]
    Malformed {
        chain: ChainId,
        after: String,
        reason: String,
    },
    #[error("chain {chain:?}: the relay sent {got} blocks in a page of at most {limit}")]
    OversizedPage {
        chain: ChainId,
        got: usize,
        limit: usize,
    },
    #[error("chain {chain:?}: block {hash} is listed twice")]
    Duplicate { chain: ChainId, hash: BlockHash },
    #[error(
        "chain {chain:?}: the page after {after} does not advance (the relay ignores the cursor)"
    )]
    NotAdvancing { chain: ChainId, after: String },
    #[error("chain {chain:?}: block {hash} ({name}) is listed on the wrong chain")]
    WrongChain {
        chain: ChainId,
        hash: BlockHash,
        name: String,
    },
    #[error("chain {chain:?}: more than {max} blocks listed; giving up")]
    TooMany { chain: ChainId, max: usize },
    #[error("chain {chain:?}: the listing is not finished")]
    Unfinished { chain: ChainId },
}

/// One page to get.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRequest {
    pub chain: ChainId,
    /// Blocks after this one (None: from the start).
    pub after: Option<BlockHash>,
    pub limit: usize,
}

impl PageRequest {
    /// The path and query, relative to the relay's base URL.
    pub fn path(&self) -> String {
        let c = chain_letter(self.chain);
        match &self.after {
            None => format!("/chain/{c}/blocks?limit={}", self.limit),
            Some(h) => format!(
                "/chain/{c}/blocks?after={}&limit={}",
                h.to_hex(),
                self.limit
            ),
        }
    }
}

/// `A` or `B`, as the REST paths spell it.
pub fn chain_letter(chain: ChainId) -> &'static str {
    match chain {
        ChainId::A => "A",
        ChainId::B => "B",
    }
}

/// Whether a `Link` header announces a next page (`rel="next"`).
pub fn link_has_next(link: Option<&str>) -> bool {
    link.is_some_and(|l| {
        l.split(',').any(|part| {
            part.split(';')
                .skip(1)
                .any(|p| matches!(p.trim(), "rel=\"next\"" | "rel=next"))
        })
    })
}

/// A paged listing of one chain.
#[derive(Debug, Clone)]
pub struct Pager {
    chain: ChainId,
    limit: usize,
    max_blocks: usize,
    seen: HashSet<BlockHash>,
    out: Vec<BlockInfo>,
    done: bool,
    pages: usize,
}

impl Pager {
    /// A listing of `chain`, `page` blocks a request (clamped to 1..=[`MAX_PAGE`]).
    pub fn new(chain: ChainId, page: usize) -> Self {
        Self {
            chain,
            limit: page.clamp(1, MAX_PAGE),
            max_blocks: DEFAULT_MAX_BLOCKS,
            seen: HashSet::new(),
            out: Vec::new(),
            done: false,
            pages: 0,
        }
    }

    /// At most `max` blocks in all (more is [`ListError::TooMany`]).
    pub fn with_max_blocks(mut self, max: usize) -> Self {
        self.max_blocks = max;
        self
    }

    pub fn chain(&self) -> ChainId {
        self.chain
    }

    pub fn max_blocks(&self) -> usize {
        self.max_blocks
    }

    /// Pages answered so far.
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// Blocks accepted so far.
    pub fn listed(&self) -> usize {
        self.out.len()
    }

    pub fn is_done(&self) -> bool {
        self.done
    }

    /// The page to get next; None once the listing is complete.
    pub fn next_request(&self) -> Option<PageRequest> {
        (!self.done).then(|| PageRequest {
            chain: self.chain,
            after: self.out.last().map(|i| i.hash),
            limit: self.limit,
        })
    }

    /// The answer to [`Pager::next_request`]: the body of a 2xx response and
    /// whether its `Link` header announced a next page (None when the
    /// driver cannot tell; a short page then ends the listing).
    pub fn on_page_body(&mut self, body: &[u8], more: Option<bool>) -> Result<(), ListError> {
        let page: Vec<BlockInfo> =
            serde_json::from_slice(body).map_err(|e| ListError::Malformed {
                chain: self.chain,
                after: self.cursor_text(),
                reason: e.to_string(),
            })?;
        self.on_page(page, more)
    }

    /// [`Pager::on_page_body`] for a page already parsed.
    pub fn on_page(&mut self, page: Vec<BlockInfo>, more: Option<bool>) -> Result<(), ListError> {
        let chain = self.chain;
        if self.done {
            return Ok(());
        }
        if page.len() > self.limit {
            return Err(ListError::OversizedPage {
                chain,
                got: page.len(),
                limit: self.limit,
            });
        }
        if page.is_empty() && more == Some(true) {
            return Err(ListError::NotAdvancing {
                chain,
                after: self.cursor_text(),
            });
        }
        if self.out.len() + page.len() > self.max_blocks {
            return Err(ListError::TooMany {
                chain,
                max: self.max_blocks,
            });
        }
        let n = page.len();
        for info in page {
            if info.chain != chain {
                return Err(ListError::WrongChain {
                    chain,
                    hash: info.hash,
                    name: info.name,
                });
            }
            if !self.seen.insert(info.hash) {
                // The whole first entry again is a relay that ignores `after`.
                if self.out.first().map(|f| f.hash) == Some(info.hash) && self.pages > 0 {
                    return Err(ListError::NotAdvancing {
                        chain,
                        after: self.cursor_text(),
                    });
                }
                return Err(ListError::Duplicate {
                    chain,
                    hash: info.hash,
                });
            }
            self.out.push(info);
        }
        self.pages += 1;
        self.done = match more {
            Some(m) => !m || n == 0,
            None => n < self.limit,
        };
        Ok(())
    }

    /// Every block listed, in the relay's order.
    pub fn finish(self) -> Result<Vec<BlockInfo>, ListError> {
        if !self.done {
            return Err(ListError::Unfinished { chain: self.chain });
        }
        Ok(self.out)
    }

    fn cursor_text(&self) -> String {
        self.out
            .last()
            .map_or_else(|| "the start".to_string(), |i| i.hash.to_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::{BlockBuilder, BlockKind, PayloadDtype};
    use ed25519_dalek::SigningKey;

    fn infos(chain: ChainId, n: usize) -> Vec<BlockInfo> {
        let key = SigningKey::from_bytes(&[7; 32]);
        (0..n)
            .map(|i| {
                let b = match chain {
                    ChainId::A => BlockBuilder::meta(format!("m{i}")),
                    ChainId::B => BlockBuilder::new(
                        BlockKind::Expert,
                        format!("layer0.expert{i}"),
                        Some(BlockHash([1; 32])),
                        PayloadDtype::F32,
                    ),
                };
                BlockInfo::from(&b.timestamp_ms(i as u64).sign(&[i as u8; 3], &key))
            })
            .collect()
    }

    /// Answer a pager from `all` as a relay does, `more` from the Link header.
    fn serve(p: &mut Pager, all: &[BlockInfo]) -> Result<Vec<BlockInfo>, ListError> {
        let mut requests = 0;
        while let Some(req) = p.next_request() {
            requests += 1;
            assert!(requests < 100, "the pager loops");
            let start = match req.after {
                None => 0,
                Some(h) => all.iter().position(|i| i.hash == h).expect("cursor") + 1,
            };
            let end = (start + req.limit).min(all.len());
            let body = serde_json::to_vec(&all[start..end]).expect("json");
            p.on_page_body(&body, Some(end < all.len()))?;
        }
        p.clone().finish()
    }

    #[test]
    fn every_page_is_followed_to_the_end() {
        let all = infos(ChainId::B, 25);
        for page in [1, 7, 10, 25, 1000] {
            let mut p = Pager::new(ChainId::B, page);
            let got = serve(&mut p, &all).expect("lists");
            assert_eq!(got, all, "page {page}");
            assert_eq!(p.pages(), 25usize.div_ceil(page).max(1), "page {page}");
        }
        // Without Link information a short page ends it.
        let mut p = Pager::new(ChainId::B, 10);
        p.on_page(all[..10].to_vec(), None).expect("page 1");
        assert_eq!(p.next_request().expect("more").after, Some(all[9].hash));
        assert!(p
            .next_request()
            .expect("more")
            .path()
            .ends_with(&format!("after={}&limit=10", all[9].hash.to_hex())));
        p.on_page(all[10..13].to_vec(), None).expect("page 2");
        assert!(p.next_request().is_none());
        assert_eq!(p.finish().expect("done").len(), 13);
        // An empty chain is one empty page.
        let mut p = Pager::new(ChainId::A, 1000);
        assert_eq!(serve(&mut p, &[]).expect("empty"), vec![]);
        assert_eq!(
            Pager::new(ChainId::A, 5000)
                .next_request()
                .expect("first")
                .path(),
            "/chain/A/blocks?limit=1000"
        );
    }

    #[test]
    fn hostile_pages_are_clear_errors() {
        let all = infos(ChainId::B, 12);
        // Larger than asked.
        let mut p = Pager::new(ChainId::B, 5);
        assert!(matches!(
            p.on_page(all[..6].to_vec(), Some(true)),
            Err(ListError::OversizedPage {
                got: 6,
                limit: 5,
                ..
            })
        ));
        // A relay that ignores `after` sends page one again.
        let mut p = Pager::new(ChainId::B, 5);
        p.on_page(all[..5].to_vec(), Some(true)).expect("page 1");
        let e = p.on_page(all[..5].to_vec(), Some(true)).unwrap_err();
        assert!(matches!(e, ListError::NotAdvancing { .. }), "{e}");
        assert!(e.to_string().contains("does not advance"), "{e}");
        // An empty page that claims more.
        let mut p = Pager::new(ChainId::B, 5);
        p.on_page(all[..5].to_vec(), Some(true)).expect("page 1");
        assert!(matches!(
            p.on_page(vec![], Some(true)),
            Err(ListError::NotAdvancing { .. })
        ));
        // One block twice.
        let mut p = Pager::new(ChainId::B, 5);
        p.on_page(all[..5].to_vec(), Some(true)).expect("page 1");
        let mut dup = all[5..9].to_vec();
        dup.push(all[2].clone());
        let e = p.on_page(dup, Some(true)).unwrap_err();
        assert_eq!(
            e,
            ListError::Duplicate {
                chain: ChainId::B,
                hash: all[2].hash
            }
        );
        // More than the bound.
        let mut p = Pager::new(ChainId::B, 5).with_max_blocks(8);
        p.on_page(all[..5].to_vec(), Some(true)).expect("page 1");
        assert!(matches!(
            p.on_page(all[5..10].to_vec(), Some(true)),
            Err(ListError::TooMany { max: 8, .. })
        ));
        // A chain-A block in a chain-B listing.
        let mut p = Pager::new(ChainId::B, 5);
        let e = p.on_page(infos(ChainId::A, 1), Some(false)).unwrap_err();
        assert!(matches!(e, ListError::WrongChain { .. }), "{e}");
        // Not JSON.
        let mut p = Pager::new(ChainId::B, 5);
        let e = p.on_page_body(b"<html>", Some(false)).unwrap_err();
        assert!(e.to_string().contains("not a block listing"), "{e}");
        // Unfinished.
        let mut p = Pager::new(ChainId::B, 5);
        p.on_page(all[..5].to_vec(), Some(true)).expect("page 1");
        assert!(matches!(p.finish(), Err(ListError::Unfinished { .. })));
    }

    #[test]
    fn link_headers_announce_the_next_page() {
        assert!(link_has_next(Some(
            r#"</chain/B/blocks?after=ab&limit=10>; rel="next""#
        )));
        assert!(link_has_next(Some("<http://x/y>; rel=next")));
        assert!(link_has_next(Some(r#"</a>; rel="prev", </b>; rel="next""#)));
        assert!(!link_has_next(Some(r#"</a>; rel="prev""#)));
        assert!(!link_has_next(Some("garbage")));
        assert!(!link_has_next(None));
    }
}
