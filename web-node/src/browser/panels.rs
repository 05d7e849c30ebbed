//! The page's panels: put the HTML of [`crate::view`] into the static
//! containers of index.html (`#device`, `#net`, `#cache`, `#alerts`, `#dag`,
//! `#peers`, `#leaderboard`) and set their data attributes.

use std::cell::RefCell;
use std::collections::BTreeSet;

use crate::chain::{BlockHash, Dag};
use crate::model::ExpertId;
use crate::view::panels::{self as view, DeviceFacts, NetFacts, NetStatus, Panel};

use super::device::DeviceCheck;
use super::dom::{element, set_html};
use super::net::{NetState, NetView};

thread_local! {
    /// The alerts shown, by kind, in the order they came.
    static ALERTS: RefCell<Vec<(String, String)>> = const { RefCell::new(Vec::new()) };
    /// The engine the device check chose ("gpu" or "cpu"), for the chat's default.
    static PLAN: RefCell<Option<bool>> = const { RefCell::new(None) };
}

/// Put a panel into the element `id` (its attributes, then its HTML into
/// `inner`, which may be the same element or a child).
fn apply(id: &str, inner: &str, p: &Panel) {
    if let Some(el) = element(id) {
        for (k, v) in &p.attrs {
            let _ = el.set_attribute(k, v);
        }
    }
    set_html(inner, &p.html);
}

/// The engine the device check chose, if it ran: true for the GPU.
pub fn planned_gpu() -> Option<bool> {
    PLAN.with(|p| *p.borrow())
}

pub fn show_device(d: &DeviceCheck) {
    PLAN.with(|p| *p.borrow_mut() = Some(d.plan_gpu));
    let p = view::device_panel(&DeviceFacts {
        webgpu: d.webgpu,
        adapter: &d.adapter,
        f16: d.f16,
        max_storage_buffer: d.max_storage_buffer,
        max_buffer: d.max_buffer,
        memory_gib: d.memory_gib,
        plan_gpu: d.plan_gpu,
        message: &d.message,
    });
    apply("device", "device", &p);
    if d.plan_gpu {
        clear_alert("no-webgpu");
    } else if !d.webgpu {
        alert("no-webgpu", &d.message);
    }
    // The chat's engine select follows the plan once it exists.
    if let Some(sel) = element("engine")
        .and_then(|e| wasm_bindgen::JsCast::dyn_into::<web_sys::HtmlSelectElement>(e).ok())
    {
        sel.set_value(if d.plan_gpu { "gpu" } else { "cpu" });
    }
}

pub fn show_net(v: &NetView) {
    let status = match &v.state {
        NetState::Connecting => NetStatus::Connecting,
        NetState::Online => NetStatus::Online,
        NetState::Offline {
            reason,
            retry_in_ms,
        } => NetStatus::Offline {
            reason,
            retry_in_ms: *retry_in_ms,
        },
        NetState::Refused(why) => NetStatus::Refused(why),
    };
    let p = view::net_panel(&NetFacts {
        status,
        relay_url: &v.relay_url,
        peer_id: &v.peer_id,
        stats: &v.stats,
        held: v.held,
        fetching: v
            .fetching
            .iter()
            .map(|(h, done, all)| (*h, h.short(), *done, *all))
            .collect(),
        last_error: v.last_error.as_deref(),
    });
    apply("net", "net", &p);
}

pub fn show_memory(m: &crate::view::page::MemoryFacts) {
    let (attrs, html) = crate::view::page::memory_panel(m);
    if let Some(el) = element("memory") {
        for (k, v) in &attrs {
            let _ = el.set_attribute(k, v);
        }
    }
    set_html("memory", &html);
}

pub fn show_cache(entries: u64, bytes: u64, note: &str) {
    apply(
        "cache",
        "cache-body",
        &view::cache_panel(entries, bytes, note),
    );
}

pub fn show_dag(dag: &Dag, held: &BTreeSet<BlockHash>, used: &BTreeSet<ExpertId>) {
    let nodes = crate::view::dag::nodes_from_dag(dag, held, used);
    set_html("dag", &crate::view::dag::render_svg(&nodes));
}

/// Peers and leaderboard from the relay; errors are shown in the panels.
pub async fn refresh_network(my_key_hex: &str) {
    let nodes = super::fetch::get_json::<serde_json::Value>("/p2p/nodes").await;
    let p = view::peers_panel(nodes.as_ref().map_err(String::as_str), my_key_hex);
    apply("peers", "peers", &p);
    let top = super::fetch::get_json::<serde_json::Value>("/experts/top?limit=8").await;
    let rewards = if my_key_hex.is_empty() {
        Err("no node key yet".to_string())
    } else {
        super::fetch::get_json::<serde_json::Value>(&format!("/rewards/{my_key_hex}")).await
    };
    let p = view::leaderboard_panel(
        top.as_ref().map_err(String::as_str),
        rewards.as_ref().map_err(String::as_str),
    );
    apply("leaderboard", "leaderboard", &p);
}

fn show_alerts() {
    ALERTS.with(|a| set_html("alerts", &view::alerts_html(&a.borrow())));
}

/// Show (or replace) the alert of one kind: relay-down, no-webgpu,
/// bad-block, peer-banned, cache-corrupt, other.
pub fn alert(kind: &str, message: &str) {
    ALERTS.with(|a| view::set_alert(&mut a.borrow_mut(), kind, message));
    show_alerts();
}

pub fn clear_alert(kind: &str) {
    ALERTS.with(|a| view::remove_alert(&mut a.borrow_mut(), kind));
    show_alerts();
}
