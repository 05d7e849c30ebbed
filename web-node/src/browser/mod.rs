//! wasm-bindgen facade: fetch the chain from the relay that served the page,
//! hand the bytes to [`crate::verify`], put the rendered report into the
//! page, and wire the chat form to [`crate::node::ChainModel`]. Every rule
//! lives in `verify`/`chain`/`node`; this file is fetch and DOM glue.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::JsFuture;

use crate::chain::{BlockHash, ChainId};
use crate::gpu::{Engine, GpuContext};
use crate::model::sampler::SamplerConfig;
use crate::model::{Forward, RunOptions};
use crate::node::{self, ChainModel};
use crate::verify::{self, FetchedBlock};

thread_local! {
    /// The model of the verified chain, once built.
    static MODEL: RefCell<Option<ChainModel>> = const { RefCell::new(None) };
    /// The WebGPU engine over the same weights, built on first use.
    static ENGINE: RefCell<Option<Engine>> = const { RefCell::new(None) };
}

/// Runs when the module loads.
#[wasm_bindgen(start)]
pub fn start() {
    console_error_panic_hook::set_once();
    wasm_bindgen_futures::spawn_local(async {
        match load_and_verify().await {
            Ok(html) => {
                set_html("app", &html);
                wire_chat();
            }
            Err(e) => set_html("app", &verify::render_fetch_error(&e)),
        }
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

fn document() -> Option<web_sys::Document> {
    web_sys::window().and_then(|w| w.document())
}

fn element(id: &str) -> Option<web_sys::Element> {
    document().and_then(|d| d.get_element_by_id(id))
}

fn set_html(id: &str, html: &str) {
    if let Some(el) = element(id) {
        el.set_inner_html(html);
    }
}

fn set_text(id: &str, text: &str) {
    if let Some(el) = element(id) {
        el.set_text_content(Some(text));
    }
}

fn set_attr(id: &str, name: &str, value: &str) {
    if let Some(el) = element(id) {
        let _ = el.set_attribute(name, value);
    }
}

fn set_progress(text: &str) {
    set_text("progress", text);
}

fn now_ms() -> f64 {
    web_sys::window()
        .and_then(|w| w.performance())
        .map_or(0.0, |p| p.now())
}

/// Let the browser paint before a long synchronous step.
async fn next_frame() {
    let p = js_sys::Promise::new(&mut |resolve, _| {
        if let Some(w) = web_sys::window() {
            let _ = w.set_timeout_with_callback_and_timeout_and_arguments_0(&resolve, 0);
        }
    });
    let _ = JsFuture::from(p).await;
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
    next_frame().await;
    let (report, dag) = verify::verify_chain_dag(&fetched);
    let t2 = now_ms();
    let timing = format!(
        "fetched {} blocks ({:.1} MiB) in {:.0} ms, verified in {:.0} ms (wasm)",
        listed.len(),
        bytes as f64 / (1024.0 * 1024.0),
        t1 - t0,
        t2 - t1
    );
    let mut html = verify::render_summary(&report);

    // Only verified payloads go to the model.
    let payloads: HashMap<BlockHash, Arc<[u8]>> = fetched
        .into_iter()
        .filter(|f| report.get(&f.listed_hash).is_some_and(|r| r.verified()))
        .filter_map(|f| f.payload.ok().map(|p| (f.listed_hash, Arc::from(p))))
        .collect();
    set_progress("loading the model…");
    next_frame().await;
    let built = ChainModel::from_verified(&dag, &payloads);
    html.push_str(&node::render_chat(built.as_ref()));
    html.push_str(&verify::render_details(&report));
    if let Ok(m) = built {
        MODEL.with(|cell| *cell.borrow_mut() = Some(m));
    }
    set_progress(&timing);
    Ok(html)
}

fn input_value(id: &str) -> String {
    element(id)
        .and_then(|e| {
            e.dyn_ref::<web_sys::HtmlInputElement>()
                .map(|i| i.value())
                .or_else(|| {
                    e.dyn_ref::<web_sys::HtmlTextAreaElement>()
                        .map(|t| t.value())
                })
                .or_else(|| e.dyn_ref::<web_sys::HtmlSelectElement>().map(|t| t.value()))
        })
        .unwrap_or_default()
}

/// Greedy generation on the WebGPU engine (built on first use from the
/// verified payloads). Returns (prompt tokens, generated tokens, text, adapter).
async fn run_gpu(
    prompt: &str,
    max_tokens: usize,
    opts: &RunOptions,
) -> Result<(usize, Vec<u32>, String, String), String> {
    let (ids, eos) = MODEL.with(|cell| {
        let guard = cell.borrow();
        let m = guard.as_ref().ok_or("no model")?;
        let ids = m.tokenizer.encode(prompt).map_err(|e| e.to_string())?;
        Ok::<_, String>((ids, m.model.config().eos_token_id))
    })?;
    if ids.is_empty() {
        return Err("empty prompt".into());
    }
    let mut engine = match ENGINE.with(|c| c.borrow_mut().take()) {
        Some(e) => e,
        None => {
            let (cfg, shared, routers, source) = MODEL.with(|cell| {
                let guard = cell.borrow();
                let m = guard.as_ref().ok_or("no model".to_string())?;
                m.engine_parts().map_err(|e| e.to_string())
            })?;
            let ctx = GpuContext::new().await.map_err(|e| e.to_string())?;
            // The engine's API takes an Arc (shared with native threads); wasm has one thread.
            #[allow(clippy::arc_with_non_send_sync)]
            let ctx = Arc::new(ctx);
            Engine::new(ctx, &cfg, &shared, &routers, Box::new(source))
                .map_err(|e| e.to_string())?
        }
    };
    let info = &engine.context().info;
    let adapter = if info.name.is_empty() {
        format!("{} adapter", info.backend)
    } else {
        format!("{}, {}", info.name, info.backend)
    };
    let max_seq = engine.options().max_seq;
    engine.reset();
    let mut out: Vec<u32> = Vec::new();
    let mut result = Ok(());
    let mut feed = ids.clone();
    while out.len() < max_tokens && ids.len() + out.len() < max_seq {
        match engine.next_token_async(&feed, opts).await {
            Ok(t) if Some(t) == eos => break,
            Ok(t) => {
                out.push(t);
                feed = vec![t];
            }
            Err(e) => {
                result = Err(e.to_string());
                break;
            }
        }
    }
    ENGINE.with(|c| *c.borrow_mut() = Some(engine));
    result?;
    let text = MODEL.with(|cell| {
        let guard = cell.borrow();
        let m = guard.as_ref().ok_or("no model".to_string())?;
        m.tokenizer.decode(&out).map_err(|e| e.to_string())
    })?;
    Ok((ids.len(), out, text, adapter))
}

fn wire_chat() {
    let Some(form) = element("chat-form") else {
        return;
    };
    let on_submit = Closure::<dyn FnMut(web_sys::Event)>::new(move |ev: web_sys::Event| {
        ev.prevent_default();
        wasm_bindgen_futures::spawn_local(run_chat());
    });
    let _ = form.add_event_listener_with_callback("submit", on_submit.as_ref().unchecked_ref());
    // The page lives as long as the form: keep the handler.
    on_submit.forget();
}

async fn run_chat() {
    let prompt = input_value("prompt");
    let max_tokens = input_value("max-tokens").parse::<usize>().unwrap_or(32);
    let temperature = input_value("temperature").parse::<f32>().unwrap_or(0.0);
    let top_k = input_value("top-k").parse::<usize>().ok();
    set_attr("reply", "data-state", "running");
    set_text("reply", "");
    set_text("chat-stats", "generating…");
    next_frame().await;
    let t0 = now_ms();
    if input_value("device") == "gpu" {
        let opts = RunOptions {
            top_k,
            use_moe: true,
        };
        let r = run_gpu(&prompt, max_tokens, &opts).await;
        let ms = now_ms() - t0;
        match r {
            Ok((n_prompt, tokens, text, adapter)) => {
                set_text("reply", &text);
                set_attr("reply", "data-tokens", &tokens.len().to_string());
                set_attr("reply", "data-engine", "gpu");
                set_attr("reply", "data-state", "done");
                set_text(
                    "chat-stats",
                    &format!(
                        "GPU ({adapter}): {n_prompt} prompt + {} generated tokens in {ms:.0} ms \
                         (first run includes uploading the weights)",
                        tokens.len()
                    ),
                );
            }
            Err(e) => {
                set_text("reply", &format!("error: {e}"));
                set_attr("reply", "data-state", "error");
                set_text("chat-stats", "");
            }
        }
        return;
    }
    let result = MODEL.with(|cell| {
        let mut guard = cell.borrow_mut();
        let Some(m) = guard.as_mut() else {
            return Err("no model".to_string());
        };
        let sampler = SamplerConfig {
            temperature,
            top_p: 1.0,
            seed: 0,
        };
        let opts = RunOptions {
            top_k,
            use_moe: true,
        };
        m.chat(&prompt, max_tokens, sampler, &opts, |_, _| true)
            .map_err(|e| e.to_string())
    });
    let ms = now_ms() - t0;
    match result {
        Ok(g) => {
            set_text("reply", &g.text);
            set_attr("reply", "data-tokens", &g.tokens.len().to_string());
            set_attr("reply", "data-engine", "cpu");
            set_attr("reply", "data-state", "done");
            set_text(
                "chat-stats",
                &format!(
                    "{} prompt + {} generated tokens in {:.0} ms ({:.1} tokens/s), stop: {:?}",
                    g.prompt_tokens.len(),
                    g.tokens.len(),
                    ms,
                    g.tokens.len() as f64 * 1000.0 / ms.max(1.0),
                    g.stop
                ),
            );
        }
        Err(e) => {
            set_text("reply", &format!("error: {e}"));
            set_attr("reply", "data-state", "error");
            set_text("chat-stats", "");
        }
    }
}
