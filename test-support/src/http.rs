//! A blocking HTTP client for tests (ureq): every reply, error statuses
//! included, as a [`Resp`]; raw request bytes for paths no client would
//! send; the chain listings.

use std::io::{Read, Write};
use std::net::TcpStream;

use web_node::net::api::{ApiError, BlockInfo};

/// A response: status, content-type, Content-Range, Link, Retry-After, body.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub content_type: String,
    pub content_range: Option<String>,
    pub link: Option<String>,
    pub retry_after: Option<String>,
    pub body: Vec<u8>,
}

impl Resp {
    /// The body as JSON; panics (with the body) when it is not `T`.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> T {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }

    /// The JSON error body; asserts the status.
    pub fn error(&self, status: u16) -> ApiError {
        assert_eq!(
            self.status,
            status,
            "body: {}",
            String::from_utf8_lossy(&self.body)
        );
        assert!(
            self.content_type.starts_with("application/json"),
            "{}",
            self.content_type
        );
        let e: ApiError = self.json();
        assert_eq!(e.status(), status, "{e:?}");
        e
    }
}

/// A ureq result as a [`Resp`] (an error status is a reply too); panics on
/// a transport error.
pub fn to_resp(r: Result<ureq::Response, ureq::Error>) -> Resp {
    let r = match r {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("transport error: {e}"),
    };
    let status = r.status();
    let content_type = r.header("content-type").unwrap_or_default().to_string();
    let content_range = r.header("content-range").map(str::to_string);
    let link = r.header("link").map(str::to_string);
    let retry_after = r.header("retry-after").map(str::to_string);
    let mut body = Vec::new();
    if let Err(e) = r.into_reader().read_to_end(&mut body) {
        panic!("reading the body: {e}");
    }
    Resp {
        status,
        content_type,
        content_range,
        link,
        retry_after,
        body,
    }
}

pub fn get(url: &str) -> Resp {
    to_resp(ureq::get(url).call())
}

pub fn get_with(url: &str, header: &str, value: &str) -> Resp {
    to_resp(ureq::get(url).set(header, value).call())
}

/// `GET url`, asserting 200, the body as JSON.
pub fn get_json<T: serde::de::DeserializeOwned>(url: &str) -> T {
    let r = get(url);
    assert_eq!(
        r.status,
        200,
        "GET {url}: {}",
        String::from_utf8_lossy(&r.body)
    );
    r.json()
}

/// `GET url`, asserting 200, the body.
pub fn get_bytes(url: &str) -> Vec<u8> {
    let r = get(url);
    assert_eq!(r.status, 200, "GET {url}");
    r.body
}

pub fn post_json(url: &str, body: &[u8]) -> Resp {
    to_resp(
        ureq::post(url)
            .set("content-type", "application/json")
            .send_bytes(body),
    )
}

pub fn post_bin(url: &str, body: &[u8]) -> Resp {
    to_resp(
        ureq::post(url)
            .set("content-type", "application/octet-stream")
            .send_bytes(body),
    )
}

/// Send raw request bytes (paths no client would normalise) and read the
/// reply: (status, the whole reply as text).
pub fn raw(addr: &str, request: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    if let Err(e) = s.write_all(request) {
        panic!("write to {addr}: {e}");
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}

/// Chain `chain`'s whole listing (`A` or `B`), every page, through the
/// client core's pager (the one every client uses).
pub fn list(url: &str, chain: &str) -> Vec<BlockInfo> {
    use web_node::client::listing::{link_has_next, Pager, MAX_PAGE};
    let id = match chain {
        "A" => web_node::chain::ChainId::A,
        "B" => web_node::chain::ChainId::B,
        other => panic!("no chain {other:?}"),
    };
    let mut p = Pager::new(id, MAX_PAGE);
    while let Some(req) = p.next_request() {
        let r = get(&format!("{url}{}", req.path()));
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let more = link_has_next(r.link.as_deref());
        p.on_page_body(&r.body, Some(more))
            .unwrap_or_else(|e| panic!("listing {chain}: {e}"));
    }
    p.finish()
        .unwrap_or_else(|e| panic!("listing {chain}: {e}"))
}

/// The current head of slot `name` on chain B.
pub fn head(url: &str, name: &str) -> BlockInfo {
    list(url, "B")
        .into_iter()
        .find(|i| i.is_head && i.name == name)
        .unwrap_or_else(|| panic!("no head for {name}"))
}
