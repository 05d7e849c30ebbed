//! wasm-bindgen facade: fetch the chain from the relay that served the page,
//! hand the bytes to [`crate::verify`], and put the rendered report into the
//! page. Every rule lives in `verify`/`chain`; this file is fetch and DOM glue.

use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::JsFuture;

use crate::chain::{BlockHash, ChainId};
use crate::verify::{self, FetchedBlock};

/// Runs when the module loads.
#[wasm_bindgen(start)]
pub fn start() {
    console_error_panic_hook::set_once();
    wasm_bindgen_futures::spawn_local(async {
        let html = match load_and_verify().await {
            Ok(html) => html,
            Err(e) => verify::render_fetch_error(&e),
        };
        set_html("app", &html);
    });
}

fn js_err(v: JsValue) -> String {
    v.as_string()
        .or_else(|| {
            v.dyn_ref::<js_sys::Error>()
                .map(|e| String::from(e.message()))
        })
        .unwrap_or_else(|| format!("{v:?}"))
}

fn set_html(id: &str, html: &str) {
    if let Some(el) = web_sys::window()
        .and_then(|w| w.document())
        .and_then(|d| d.get_element_by_id(id))
    {
        el.set_inner_html(html);
    }
}

fn set_progress(text: &str) {
    set_html("progress", &verify::escape_html(text));
}

fn now_ms() -> f64 {
    web_sys::window()
        .and_then(|w| w.performance())
        .map_or(0.0, |p| p.now())
}

/// GET a URL relative to the page; non-2xx answers are errors with the relay's message.
async fn fetch_bytes(url: &str) -> Result<Vec<u8>, String> {
    let window = web_sys::window().ok_or("no window")?;
    let resp: web_sys::Response = JsFuture::from(window.fetch_with_str(url))
        .await
        .map_err(js_err)?
        .dyn_into()
        .map_err(js_err)?;
    if !resp.ok() {
        let body = match resp.text() {
            Ok(p) => JsFuture::from(p)
                .await
                .ok()
                .and_then(|t| t.as_string())
                .unwrap_or_default(),
            Err(_) => String::new(),
        };
        let body: String = body.chars().take(300).collect();
        return Err(format!("HTTP {} for {url}: {body}", resp.status()));
    }
    let buf = JsFuture::from(resp.array_buffer().map_err(js_err)?)
        .await
        .map_err(js_err)?;
    Ok(js_sys::Uint8Array::new(&buf).to_vec())
}

async fn load_and_verify() -> Result<String, String> {
    let mut listed: Vec<(BlockHash, ChainId, Option<bool>)> = Vec::new();
    for (chain, path) in [
        (ChainId::A, "/chain/A/blocks"),
        (ChainId::B, "/chain/B/blocks"),
    ] {
        set_progress(&format!("listing chain {chain:?}…"));
        let body = fetch_bytes(path).await?;
        let infos = verify::parse_listing(&body).map_err(|e| format!("{path}: {e}"))?;
        listed.extend(verify::listed(&infos, chain));
    }

    let t0 = now_ms();
    let mut fetched = Vec::with_capacity(listed.len());
    let mut bytes = 0usize;
    for (i, (hash, chain, head)) in listed.iter().enumerate() {
        set_progress(&format!("fetching block {} of {}…", i + 1, listed.len()));
        let hex = hash.to_hex();
        let envelope = fetch_bytes(&format!("/blocks/{hex}?format=bin")).await;
        let payload = fetch_bytes(&format!("/blocks/{hex}/payload")).await;
        bytes += payload.as_ref().map_or(0, Vec::len);
        fetched.push(FetchedBlock {
            listed_hash: *hash,
            listed_chain: *chain,
            listed_head: *head,
            envelope,
            payload,
        });
    }
    let t1 = now_ms();
    set_progress("verifying…");
    let report = verify::verify_chain(&fetched);
    let t2 = now_ms();
    set_progress(&format!(
        "fetched {} blocks ({:.1} MiB) in {:.0} ms, verified in {:.0} ms (wasm)",
        listed.len(),
        bytes as f64 / (1024.0 * 1024.0),
        t1 - t0,
        t2 - t1
    ));
    Ok(verify::render_html(&report))
}
