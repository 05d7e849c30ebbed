//! wasm-bindgen facade of the web page: glue only. Header-first and lazy:
//! list both chains, fetch the chain-A payloads, verify every header
//! ([`crate::verify`]), fetch the payloads the model needs to start
//! ([`crate::chain_model::startup_blocks`]) chunk by chunk, build the
//! [`ChainModel`] and show the chat; an expert's payload is fetched when the
//! router first picks it ([`fetch::RestSupply`]).
//!
//! * [`dom`]: elements, text, attributes, events.
//! * [`fetch`]: REST, payloads chunk by chunk, the engine's supply.
//! * [`render`]: the page's HTML.
//! * [`chat`]: the chat form on [`crate::model::generate::generate_async`].

mod chat;
mod dom;
mod fetch;
mod net;
mod render;

use std::cell::RefCell;
use std::collections::HashMap;

use wasm_bindgen::prelude::*;

use crate::chain::{BlockHash, ChainId, PayloadStatus};
use crate::chain_model::{startup_blocks, ChainModel};
use crate::verify::{self, ChainReport, FetchedBlock};

use dom::{next_frame, now_ms, set_html, set_progress};
use fetch::{FetchStats, Store};

/// The page's node: what it verified and holds, and the model.
struct Node {
    store: Store,
    report: ChainReport,
    model: ChainModel,
    /// The WebGPU engine over the same weights, built on first use.
    gpu: Option<crate::gpu::Engine>,
    /// Payload bytes of the whole model (meta, shared, routers, experts).
    model_bytes: u64,
}

thread_local! {
    /// The node once the model is built; taken out while a chat runs.
    static NODE: RefCell<Option<Node>> = const { RefCell::new(None) };
}

/// Runs when the module loads.
#[wasm_bindgen(start)]
pub fn start() {
    console_error_panic_hook::set_once();
    wasm_bindgen_futures::spawn_local(async {
        if let Err(e) = load().await {
            set_html("app", &render::render_fetch_error(&e));
        }
    });
}

/// Summary and fetch counters (re-rendered as payloads arrive).
fn show_status(store: &Store, report: &ChainReport, model_bytes: u64, phase: &str) {
    let mut html = render::render_summary(report, &store.dag, phase);
    html.push_str(&render::render_fetch_stats(&store.stats, model_bytes));
    set_html("status", &html);
}

fn show_details(store: &Store, report: &ChainReport) {
    set_html("details", &render::render_details(report, &store.dag));
}

async fn load() -> Result<(), String> {
    let t0 = now_ms();
    let mut stats = FetchStats::default();
    let mut fetched = Vec::new();
    let mut infos = Vec::new();
    for chain in [ChainId::A, ChainId::B] {
        set_progress(&format!("listing chain {chain:?}…"));
        for info in fetch::list_chain(chain, &mut stats).await? {
            let mut f = FetchedBlock::from_listing(&info, chain);
            if chain == ChainId::A {
                // The meta payload gives the config chain-B headers are checked against.
                set_progress(&format!("fetching meta block {}…", info.hash.short()));
                f.payload = Some(fetch::get_payload(&info.hash, &mut stats).await);
            }
            fetched.push(f);
            infos.push(info);
        }
    }
    set_progress(&format!("verifying {} headers…", fetched.len()));
    next_frame().await;
    let t1 = now_ms();
    let (report, dag) = verify::verify_chain_dag(&fetched);
    let t2 = now_ms();
    let verified = |h: &BlockHash| report.get(h).is_some_and(|r| r.verified());
    let blocks = infos
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
        .collect::<HashMap<_, _>>();
    let mut store = Store {
        blocks,
        dag,
        payloads,
        stats,
    };
    set_html(
        "app",
        "<div id=\"status\"></div><div id=\"chat-box\"></div><div id=\"details\"></div>",
    );
    show_status(&store, &report, 0, "payloads");
    show_details(&store, &report);

    // The payloads the model needs to start, chunk by chunk.
    let start = startup_blocks(&store.dag).map_err(|e| e.to_string());
    if let Ok(list) = &start {
        for h in list {
            let name = store
                .dag
                .get(h)
                .map_or_else(|| h.short(), |e| e.header.name.clone());
            // A failure is recorded in the DAG and shown in the block's row.
            let _ = store.payload(h, &name).await;
            show_status(&store, &report, 0, "payloads");
        }
    }
    let t3 = now_ms();
    set_progress("building the model…");
    next_frame().await;
    let built = start.and_then(|_| {
        ChainModel::from_verified(&store.dag, |h| {
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
        &render::render_chat(built.as_ref().map_err(String::as_str)),
    );
    show_details(&store, &report);
    let model_bytes = match &built {
        Ok(cm) => {
            let startup: u64 = startup_blocks(&store.dag)
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
    set_progress(&format!(
        "listed {} blocks and fetched the meta payloads in {:.0} ms, verified the headers in {:.0} ms, \
         fetched and verified the shared and router payloads in {:.0} ms (wasm)",
        report.total(),
        t1 - t0,
        t2 - t1,
        t3 - t2
    ));
    if let Ok(model) = built {
        NODE.with(|cell| {
            *cell.borrow_mut() = Some(Node {
                store,
                report,
                model,
                gpu: None,
                model_bytes,
            })
        });
        dom::on_submit("chat-form", || {
            wasm_bindgen_futures::spawn_local(chat::run_chat())
        });
    }
    Ok(())
}
