//! wasm-bindgen facade of the web page: glue only. Header-first and lazy:
//! list both chains, fetch the chain-A payloads, verify every header
//! ([`crate::verify`]), fetch the payloads the model needs to start
//! ([`crate::chain_model::startup_blocks`]) chunk by chunk, build the
//! [`ChainModel`] and show the chat; an expert's payload is fetched when the
//! router first picks it ([`fetch::ChainSupply`]).
//!
//! * [`dom`]: elements, text, attributes, events.
//! * [`fetch`]: REST, payloads chunk by chunk, the engine's supply.
//! * HTML: [`crate::view`] (plain Rust, native tests).
//! * [`chat`]: the chat form on [`crate::model::generate::generate_async`].
//! * [`bench`]: `bench_decode`, the fixed-length decode benchmark's entry point.

mod bench;
mod cache;
mod chat;
mod device;
mod dom;
mod fetch;
mod net;
mod panels;
mod rtc;

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;

use crate::chain::{BlockHash, ChainId, PayloadStatus};
use crate::chain_model::{select_meta, startup_blocks_of, ChainModel};
use crate::model::{ExpertId, Slot};
use crate::verify::{self, ChainReport, FetchedBlock};
use crate::view::budget::{budget_bytes, query_param, ByteLru};
use crate::view::page;

use dom::{next_frame, now_ms, set_html, set_progress};
use fetch::{FetchStats, VerifiedChain};

/// The page's node: what it verified and holds, and the model.
struct Node {
    store: VerifiedChain,
    report: ChainReport,
    model: ChainModel,
    /// The WebGPU engine over the same weights, built on first use.
    gpu: Option<crate::gpu::Engine>,
    /// Payload bytes of the whole model (meta, shared, routers, experts).
    model_bytes: u64,
    /// The decoded experts the CPU engine holds (within half the budget).
    decoded: ByteLru<ExpertId>,
}

thread_local! {
    /// The node once the model is built; taken out while a chat runs.
    static NODE: RefCell<Option<Node>> = const { RefCell::new(None) };
    /// Where the budget came from, for the memory panel.
    static BUDGET_WHY: RefCell<&'static str> = const { RefCell::new("") };
}

/// The page address's query string (`?model=..&budget_mb=..`).
fn page_search() -> String {
    web_sys::window()
        .and_then(|w| w.location().search().ok())
        .unwrap_or_default()
}

/// Bytes of wasm linear memory (it only grows: the peak so far).
fn wasm_memory_bytes() -> u64 {
    wasm_bindgen::memory()
        .dyn_into::<js_sys::WebAssembly::Memory>()
        .ok()
        .and_then(|m| m.buffer().dyn_into::<js_sys::ArrayBuffer>().ok())
        .map_or(0, |b| b.byte_length() as u64)
}

/// The memory panel: wasm memory, the budget and what each part of it holds.
fn show_memory_of(store: &VerifiedChain, decoded: &ByteLru<ExpertId>) {
    let why = BUDGET_WHY.with(|w| *w.borrow());
    panels::show_memory(&crate::view::page::MemoryFacts {
        wasm_bytes: wasm_memory_bytes(),
        budget: store.budget,
        budget_why: why,
        decoded_experts: decoded.len(),
        decoded_bytes: decoded.total(),
        served_bytes: store.served.total(),
        cache_entries: store.cached.len(),
        cache_bytes: store.cached.total(),
        cache_evicted: store.evicted,
        startup_bytes: store.payloads.values().map(|p| p.len() as u64).sum(),
    });
}

/// Runs when the module loads.
#[wasm_bindgen(start)]
pub fn start() {
    console_error_panic_hook::set_once();
    wasm_bindgen_futures::spawn_local(async {
        if let Err(e) = load().await {
            set_html("status", &page::render_fetch_error(&e));
        }
    });
}

/// Summary and fetch counters (re-rendered as payloads arrive).
fn show_status(store: &VerifiedChain, report: &ChainReport, model_bytes: u64, phase: &str) {
    let mut html = page::render_summary(report, &store.dag, &store.held_blocks(), phase);
    let s = &store.stats;
    let held = store.held_experts();
    html.push_str(&page::render_fetch_stats(
        &page::FetchFacts {
            bytes: s.bytes,
            payload_bytes: s.payload_bytes,
            requests: s.requests,
            payloads: s.payloads,
            experts: Some(&held),
            fetch_ms: s.fetch_ms,
            store_ms: s.store_ms,
        },
        model_bytes,
    ));
    set_html("status", &html);
}

fn show_details(store: &VerifiedChain, report: &ChainReport) {
    set_html(
        "details",
        &page::render_details(report, &store.dag, &store.held_blocks()),
    );
}

async fn load() -> Result<(), String> {
    let t0 = now_ms();
    // The peer node connects while the chain is listed and verified.
    net::start();
    let cache = match cache::Cache::open().await {
        Ok(c) => Some(c),
        Err(e) => {
            panels::alert(
                "cache-corrupt",
                &format!("No block cache in this browser ({e}): every visit downloads again."),
            );
            None
        }
    };
    let mut stats = FetchStats::default();
    let mut fetched = Vec::new();
    let mut infos = Vec::new();
    // Chain-A payloads taken from the cache (not written back).
    let mut from_cache = std::collections::HashSet::new();
    for chain in [ChainId::A, ChainId::B] {
        set_progress(&format!("listing chain {chain:?}…"));
        for info in fetch::list_chain(chain, &mut stats).await? {
            let mut f = FetchedBlock::from_listing(&info, chain);
            if chain == ChainId::A {
                // The meta payload gives the config chain-B headers are checked against.
                set_progress(&format!("fetching meta block {}…", info.hash.short()));
                let (payload, cached) = meta_payload(&info, cache.as_ref(), &mut stats).await;
                if cached {
                    from_cache.insert(info.hash);
                }
                f.payload = Some(payload);
            }
            fetched.push(f);
            infos.push(info);
        }
    }
    set_progress(&format!("verifying {} headers…", fetched.len()));
    next_frame().await;
    let t1 = now_ms();
    // In steps, the event loop running between them: at 1,000+ blocks one
    // call blocked the page for about 0.2 s.
    let mut verifier = verify::ChainVerifier::new(&fetched);
    let mut looked = 0;
    while !verifier.step(VERIFY_STEP) {
        looked += VERIFY_STEP;
        set_progress(&format!(
            "verifying {} headers… ({} checked)",
            verifier.total(),
            looked.min(verifier.total())
        ));
        sleep_ms(0).await;
    }
    let (report, dag) = verifier.finish();
    let t2 = now_ms();
    let verified = |h: &BlockHash| report.get(h).is_some_and(|r| r.verified());
    let blocks: HashMap<_, _> = infos
        .iter()
        .filter(|i| verified(&i.hash))
        .filter_map(|i| i.to_block().ok().map(|b| (b.hash, b)))
        .collect();
    let payloads = fetched
        .into_iter()
        .filter(|f| verified(&f.listed_hash))
        .filter(|f| {
            dag.get(&f.listed_hash)
                .is_some_and(|e| e.payload.is_verified())
        })
        .filter_map(|f| match f.payload {
            Some(Ok(p)) => Some((f.listed_hash, p.into())),
            _ => None,
        })
        .collect::<HashMap<_, Arc<[u8]>>>();
    // Verified meta payloads: cached (when downloaded) and served like any other.
    for (h, p) in &payloads {
        if let Some(b) = blocks.get(h) {
            if let Some(c) = cache.as_ref().filter(|_| !from_cache.contains(h)) {
                let _ = c.put(h, p).await;
            }
            net::hold(*h, p.clone(), b.header.chunk_size);
        }
    }
    let mut store = VerifiedChain {
        blocks,
        dag,
        payloads,
        stats,
        cache: cache.map(std::rc::Rc::new),
        cached: ByteLru::new(),
        served: ByteLru::new(),
        budget: 0,
        evicted: 0,
        ahead: Default::default(),
        unwritten: Vec::new(),
    };
    show_status(&store, &report, 0, "payloads");
    show_details(&store, &report);

    // The model to run: `?model=<name or meta hash>` in the page's address,
    // else the newest.
    let selected = model_param();
    // Before downloading the model: what this device can run.
    let pool = expert_pool_bytes(&store.dag, selected.as_deref());
    let device = device::check(pool).await;
    panels::show_device(&device);
    let search = page_search();
    let (budget, why) = budget_bytes(query_param(&search, "budget_mb"), device.memory_gib);
    store.budget = budget;
    BUDGET_WHY.with(|w| *w.borrow_mut() = why);
    if !device.plan_gpu {
        panels::alert("no-webgpu", &device.message);
    }

    // The cache, re-verified against the headers: held and served again.
    set_progress("checking the block cache…");
    let (kept, dropped) = store.load_cache().await;
    show_cache(
        &store,
        &format!("{kept} verified at load, {dropped} dropped"),
    )
    .await;

    // The payloads the model needs to start, chunk by chunk.
    let start = startup_blocks_of(&store.dag, selected.as_deref()).map_err(|e| e.to_string());
    if let Ok(list) = &start {
        for h in list {
            let name = store
                .dag
                .get(h)
                .map_or_else(|| h.short(), |e| e.header.name.clone());
            // A failure is recorded in the DAG and shown in the block's row.
            if let Err(e) = store.payload(h, &name).await {
                panels::alert("bad-block", &format!("{name} ({}): {e}", h.short()));
            }
            show_status(&store, &report, 0, "payloads");
        }
    }
    store.flush_cache().await;
    let t3 = now_ms();
    set_progress("building the model…");
    next_frame().await;
    let meta_sel = select_meta(&store.dag, selected.as_deref())
        .map(|e| e.hash)
        .ok();
    let built = start.and_then(|_| {
        ChainModel::from_verified_meta(&store.dag, meta_sel, |h| {
            // Only payloads that passed every rule reach the model.
            store
                .dag
                .get(h)
                .filter(|e| e.payload == PayloadStatus::Verified)
                .and_then(|_| store.payloads.get(h).cloned())
        })
        .map_err(|e| e.to_string())
    });
    set_html(
        "chat-box",
        &page::render_chat(
            built.as_ref().map_err(String::as_str),
            panels::planned_gpu().unwrap_or(false),
        ),
    );
    set_select("engine", if device.plan_gpu { "gpu" } else { "cpu" });
    show_details(&store, &report);
    show_cache(&store, "").await;
    let model_bytes = match &built {
        Ok(cm) => {
            let startup: u64 = startup_blocks_of(&store.dag, selected.as_deref())
                .unwrap_or_default()
                .iter()
                .filter_map(|h| store.dag.get(h))
                .map(|e| e.header.payload_len)
                .sum();
            startup + cm.all_expert_bytes(&store.dag)
        }
        Err(_) => 0,
    };
    show_status(&store, &report, model_bytes, "done");
    let held = store.held_blocks();
    panels::show_dag(&store.dag, &held, &Default::default());
    show_memory_of(&store, &ByteLru::new());
    set_progress(&format!(
        "listed {} blocks and fetched the meta payloads in {:.0} ms, verified the headers in {:.0} ms, \
         fetched and verified the shared and router payloads in {:.0} ms (wasm)",
        report.total(),
        t1 - t0,
        t2 - t1,
        t3 - t2
    ));
    // The same timings for the scale benchmark (tests/e2e/scale_page.mjs).
    for (name, ms) in [
        ("data-list-ms", t1 - t0),
        ("data-verify-ms", t2 - t1),
        ("data-startup-ms", t3 - t2),
    ] {
        dom::set_attr("progress", name, &format!("{ms:.0}"));
    }
    dom::set_attr("progress", "data-blocks", &report.total().to_string());
    if let Some(key) = net::peer_id() {
        wasm_bindgen_futures::spawn_local(async move {
            loop {
                panels::refresh_network(&key).await;
                sleep_ms(NETWORK_REFRESH_MS).await;
            }
        });
    }
    dom::on_click("clear-cache", || {
        wasm_bindgen_futures::spawn_local(clear_cache())
    });
    if let Ok(model) = built {
        NODE.with(|cell| {
            *cell.borrow_mut() = Some(Node {
                store,
                report,
                model,
                gpu: None,
                model_bytes,
                decoded: ByteLru::new(),
            })
        });
        dom::on_submit("chat-form", || {
            wasm_bindgen_futures::spawn_local(chat::run_chat())
        });
    }
    Ok(())
}

/// Blocks verified between two yields to the event loop (about 20 ms of
/// signature checks in wasm).
const VERIFY_STEP: usize = 96;

/// How often the peers and leaderboard panels are refreshed.
const NETWORK_REFRESH_MS: i32 = 10_000;

/// A chain-A payload: from the cache when it passes the checks a download
/// would, else over REST (checked with the rest of the chain by
/// [`verify::verify_chain_dag`]). Says whether it came from the cache.
async fn meta_payload(
    info: &crate::net::api::BlockInfo,
    cache: Option<&cache::Cache>,
    stats: &mut FetchStats,
) -> (Result<Vec<u8>, String>, bool) {
    if let (Some(c), Ok(block)) = (cache, info.to_block()) {
        if let Some(bytes) = fetch::cached_payload(c, &block, None, stats).await {
            return (Ok(bytes), true);
        }
    }
    (fetch::get_payload(&info.hash, stats).await, false)
}

/// The `model` parameter of the page's address (`/?model=default-q8_0`).
fn model_param() -> Option<String> {
    let search = page_search();
    query_param(&search, "model")
        .map(|v| js_sys::decode_uri_component(v).map_or_else(|_| v.to_string(), String::from))
        .filter(|v| !v.is_empty())
}

/// Bytes of every expert payload of the selected model (the pool the
/// engine may hold).
fn expert_pool_bytes(dag: &crate::chain::Dag, sel: Option<&str>) -> u64 {
    let Ok(meta) = select_meta(dag, sel) else {
        return 0;
    };
    dag.slot_heads(&meta.hash)
        .iter()
        .filter(|(name, _)| matches!(Slot::parse(name), Ok(Slot::Expert { .. })))
        .filter_map(|(_, h)| dag.get(h))
        .map(|e| e.header.payload_len)
        .sum()
}

/// The cache panel: entries and bytes stored in this browser.
async fn show_cache(store: &VerifiedChain, note: &str) {
    let (entries, bytes) = match &store.cache {
        Some(c) => c.usage().await.unwrap_or((0, 0)),
        None => (0, 0),
    };
    let note = if store.cache.is_none() {
        "no cache in this browser".to_string()
    } else if note.is_empty() {
        format!(
            "{} taken from the cache, {} dropped this session",
            store.stats.cache_hits, store.stats.cache_dropped
        )
    } else {
        note.to_string()
    };
    panels::show_cache(entries, bytes, &note);
}

/// The "Clear cache" button: empties the persistent cache (this session
/// keeps what it holds in memory and goes on serving it).
async fn clear_cache() {
    let (note, (entries, bytes)) = match cache::Cache::open().await {
        Ok(c) => {
            let note = match c.clear().await {
                Ok(()) => "cleared: the next visit downloads what it needs again".to_string(),
                Err(e) => format!("could not clear the cache: {e}"),
            };
            (note, c.usage().await.unwrap_or((0, 0)))
        }
        Err(e) => (format!("no cache in this browser: {e}"), (0, 0)),
    };
    panels::show_cache(entries, bytes, &note);
}

/// Select an option of a `<select>` (when it has that value).
fn set_select(id: &str, value: &str) {
    if let Some(sel) =
        dom::element(id).and_then(|e| e.dyn_into::<web_sys::HtmlSelectElement>().ok())
    {
        sel.set_value(value);
    }
}

/// Resolve after `ms` milliseconds.
async fn sleep_ms(ms: i32) {
    let p = js_sys::Promise::new(&mut |resolve, _| {
        if let Some(w) = web_sys::window() {
            let _ = w.set_timeout_with_callback_and_timeout_and_arguments_0(&resolve, ms);
        }
    });
    let _ = wasm_bindgen_futures::JsFuture::from(p).await;
}
