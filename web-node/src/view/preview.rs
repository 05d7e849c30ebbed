//! A static preview of the panels and the DAG picture with index.html's
//! styles, for looking at the page without a browser build:
//! `AIBLOCK_VIEW_PREVIEW=/tmp/preview.html cargo test -p web-node --lib view::preview -- --ignored`.

use std::collections::BTreeSet;

use crate::chain::{BlockHash, ChainId};
use crate::node::{NodeStats, Source};

use super::dag::{render_svg, DagNode};
use super::panels::*;

fn sample_nodes() -> Vec<DagNode> {
    let h = |i: u16| {
        let mut b = [0u8; 32];
        b[0] = (i >> 8) as u8;
        b[1] = i as u8;
        b[2] = 0xab;
        BlockHash(b)
    };
    let node = |i: u16, chain, name: String, parents: Vec<BlockHash>, meta| DagNode {
        hash: h(i),
        chain,
        name,
        parents,
        meta,
        head: true,
        held: false,
        used: false,
        failed: false,
    };
    let mut v = vec![node(1, ChainId::A, "default-moe".into(), vec![], None)];
    v.push(node(2, ChainId::B, "shared".into(), vec![], Some(h(1))));
    let mut i = 3;
    for l in 0..4 {
        v.push(node(
            i,
            ChainId::B,
            format!("layer{l}.router"),
            vec![],
            Some(h(1)),
        ));
        i += 1;
        for e in 0..8 {
            v.push(node(
                i,
                ChainId::B,
                format!("layer{l}.expert{e}"),
                vec![],
                Some(h(1)),
            ));
            i += 1;
        }
    }
    // Held: meta, shared, routers, some experts; used: a few experts.
    let used: BTreeSet<usize> = [3, 5, 13, 16, 24, 29].into();
    for (k, n) in v.iter_mut().enumerate() {
        n.held = !n.name.contains("expert") || used.contains(&k) || k == 7;
        n.used = used.contains(&k);
    }
    // Two new versions of one expert, one of another, a second meta block.
    let p = v[5].hash;
    v[5].head = false;
    v.push(node(
        200,
        ChainId::B,
        "layer0.expert2".into(),
        vec![p],
        Some(h(1)),
    ));
    let last = v.len() - 1;
    v[last].head = false;
    v.push(node(
        201,
        ChainId::B,
        "layer0.expert2".into(),
        vec![h(200)],
        Some(h(1)),
    ));
    let p = v[20].hash;
    v[20].head = false;
    v.push(node(
        202,
        ChainId::B,
        v[20].name.clone(),
        vec![p],
        Some(h(1)),
    ));
    v.push(node(
        203,
        ChainId::A,
        "default-moe-<v2>".into(),
        vec![h(1)],
        None,
    ));
    v[0].head = false;
    v
}

#[test]
#[ignore = "writes a preview page; run by hand"]
fn preview() {
    let Ok(path) = std::env::var("AIBLOCK_VIEW_PREVIEW") else {
        return;
    };
    let index = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../index.html"))
        .unwrap_or_default();
    let style = index
        .split_once("<style>")
        .and_then(|(_, r)| r.split_once("</style>"))
        .map_or("", |(s, _)| s);
    let mut stats = NodeStats::default();
    stats.bytes_received.insert(Source::Relay, 3 << 20);
    stats
        .bytes_received
        .insert(Source::Peer([7; 32]), 900 << 10);
    stats.bad_chunks.insert(Source::Peer([9; 32]), 2);
    stats.bytes_served = 512 << 10;
    stats.chunks_served = 2;
    let dev = device_panel(&DeviceFacts {
        webgpu: true,
        adapter: "SwiftShader Device (Subzero)",
        f16: false,
        max_storage_buffer: 128 << 20,
        max_buffer: 256 << 20,
        memory_gib: Some(8.0),
        plan_gpu: true,
        message: "WebGPU: SwiftShader Device (Subzero) (f16: no), storage buffers up to 128.0 MiB: answers run on the GPU.",
    });
    let net = net_panel(&NetFacts {
        status: NetStatus::Online,
        relay_url: "ws://127.0.0.1:8080/ws",
        peer_id: "3f9a0c21d4e5b6a7c8d9e0f1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5",
        stats: &stats,
        held: 12,
        fetching: vec![(BlockHash([5; 32]), "layer2.expert6".into(), 1, 2)],
        last_error: None,
    });
    let cache = cache_panel(12, 5 << 20, "re-verified on load; dropped 1 corrupt entry");
    let mut alerts = Vec::new();
    set_alert(
        &mut alerts,
        "cache-corrupt",
        "A cached block (layer1.expert3) failed its check and was fetched again.",
    );
    set_alert(
        &mut alerts,
        "peer-banned",
        "Peer 09090909 sent 2 bad chunks and was banned by the relay.",
    );
    let peers = serde_json::json!({"nodes": [
        {"node_id": "3f9a0c21d4e5b6a7c8d9e0f1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5", "kind": "ws",
         "agent": "aiblock-web/0.1", "available_experts": ["a", "b"], "bytes_served": 524288, "chunks_served": 2, "latency_ms": 4.0},
        {"node_id": "0707070707070707", "kind": "ws", "agent": "aiblock-peer/0.1", "available_experts": ["a"],
         "bytes_served": 921600, "latency_ms": 9.0},
        {"node_id": "0909090909090909", "kind": "ws", "agent": "evil", "banned": true}
    ]});
    let peers = peers_panel(
        Ok(&peers),
        "3f9a0c21d4e5b6a7c8d9e0f1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5",
    );
    let top = serde_json::json!({"experts": [
        {"rank": 1, "expert": "layer0.expert2", "versions": 3, "reward_units": 40, "tokens_routed": 812, "bytes_served": 1048576},
        {"rank": 2, "expert": "layer1.expert5", "versions": 1, "reward_units": 22, "tokens_routed": 400, "bytes_served": 524288}
    ]});
    let rewards = serde_json::json!({"total_uc": 1200, "peer_uc": 1200, "miner_uc": 0});
    let lb = leaderboard_panel(Ok(&top), Ok(&rewards));
    let attrs = |p: &Panel| {
        p.attrs
            .iter()
            .map(|(k, v)| format!(" {k}=\"{}\"", super::escape_html(v)))
            .collect::<String>()
    };
    let html = format!(
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><style>{style}</style></head><body>\
         <h1>AI-Block</h1><p class=\"lead\">Preview of the panels (static sample data).</p>\
         <div id=\"alerts\">{alerts}</div><div class=\"panels\">\
         <div id=\"device\" class=\"panel\"{da}>{dh}</div><div id=\"net\" class=\"panel\"{na}>{nh}</div>\
         <div id=\"cache\" class=\"panel\"{ca}><span id=\"cache-body\">{ch}</span> <button id=\"clear-cache\">Clear cache</button></div></div>\
         <div id=\"progress\">listed 38 blocks…</div><div id=\"app\"><div id=\"status\"></div>\
         <div id=\"chat-box\"><section id=\"chat\"><h2>Chat with default-moe</h2><form id=\"chat-form\">\
         <textarea id=\"prompt\" rows=\"2\" cols=\"60\">Q: 38+45=? A:</textarea><div class=\"controls\">\
         <label>max tokens <input id=\"max-tokens\" type=\"number\" value=\"32\"></label>\
         <label>temperature <input id=\"temperature\" type=\"number\" value=\"0\"></label>\
         <label>top-p <input id=\"top-p\" type=\"number\" value=\"1\"></label>\
         <label>experts per token <input id=\"top-k\" type=\"number\" value=\"2\"></label>\
         <label>engine <select id=\"engine\"><option>GPU (WebGPU)</option></select></label>\
         <button id=\"send\" disabled>Generate</button><button id=\"stop\">Stop</button></div></form>\
         <pre id=\"reply\" data-state=\"running\"> 83</pre></section></div>\
         <section class=\"dag-box\"><h2>The DAG</h2><div id=\"dag\">{svg}</div></section>\
         <div class=\"network\"><section id=\"peers\"{pa}>{ph}</section><section id=\"leaderboard\"{la}>{lh}</section></div>\
         </div></body></html>",
        alerts = alerts_html(&alerts),
        da = attrs(&dev),
        dh = dev.html,
        na = attrs(&net),
        nh = net.html,
        ca = attrs(&cache),
        ch = cache.html,
        svg = render_svg(&sample_nodes()),
        pa = attrs(&peers),
        ph = peers.html,
        la = attrs(&lb),
        lh = lb.html,
    );
    std::fs::write(path, html).unwrap();
}
