//! The page's panels as HTML: device, network, cache, alerts, peers and the
//! leaderboard. Each returns a [`Panel`]: the data attributes the container
//! element carries (a contract with the browser tests) and its inner HTML.
//! Text from the relay or the chain is escaped.

use crate::chain::BlockHash;
use crate::node::{NodeStats, Source};

use super::{escape_html, fmt_bytes};

/// A container's data attributes and inner HTML.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Panel {
    pub attrs: Vec<(&'static str, String)>,
    pub html: String,
}

impl Panel {
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// What the device check found (a mirror of `browser::device::DeviceCheck`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DeviceFacts<'a> {
    pub webgpu: bool,
    pub adapter: &'a str,
    pub f16: bool,
    pub max_storage_buffer: u64,
    pub max_buffer: u64,
    pub memory_gib: Option<f64>,
    pub plan_gpu: bool,
    pub message: &'a str,
}

/// `#device`: data-webgpu yes|no, data-f16 yes|no, data-plan gpu|cpu.
pub fn device_panel(d: &DeviceFacts) -> Panel {
    let mut facts = Vec::new();
    if d.webgpu && d.max_buffer > 0 {
        facts.push(format!("max buffer {}", fmt_bytes(d.max_buffer)));
    }
    if let Some(m) = d.memory_gib {
        facts.push(format!("device memory about {m} GiB"));
    }
    let facts = if facts.is_empty() {
        String::new()
    } else {
        format!(" <span class=\"muted\">({})</span>", facts.join("; "))
    };
    Panel {
        attrs: vec![
            ("data-webgpu", yes_no(d.webgpu).into()),
            ("data-f16", yes_no(d.f16).into()),
            ("data-plan", if d.plan_gpu { "gpu" } else { "cpu" }.into()),
        ],
        html: format!(
            "<span class=\"label\">Device</span> <span class=\"plan {plan}\">{plan_txt}</span> {msg}{facts}",
            plan = if d.plan_gpu { "gpu" } else { "cpu" },
            plan_txt = if d.plan_gpu { "GPU" } else { "CPU" },
            msg = escape_html(d.message),
        ),
    }
}

/// The connection state as the network panel shows it.
#[derive(Debug, Clone, PartialEq)]
pub enum NetStatus<'a> {
    Connecting,
    Online,
    Offline { reason: &'a str, retry_in_ms: u64 },
    Refused(&'a str),
}

impl NetStatus<'_> {
    pub fn attr(&self) -> &'static str {
        match self {
            Self::Connecting => "connecting",
            Self::Online => "online",
            Self::Offline { .. } => "offline",
            Self::Refused(_) => "refused",
        }
    }
}

/// What the network panel needs (a mirror of `browser::net::NetView`).
#[derive(Debug, Clone)]
pub struct NetFacts<'a> {
    pub status: NetStatus<'a>,
    pub relay_url: &'a str,
    pub peer_id: &'a str,
    pub stats: &'a NodeStats,
    pub held: usize,
    /// Fetches in progress: (block, label, chunks verified, chunks in all).
    pub fetching: Vec<(BlockHash, String, u64, u64)>,
    pub last_error: Option<&'a str>,
}

fn short_peer(id: &[u8; 32]) -> String {
    hex::encode(&id[..4])
}

/// Bytes received from peers (any peer) and from the relay's store.
pub fn bytes_by_origin(s: &NodeStats) -> (u64, u64) {
    let mut peers = 0;
    let mut relay = 0;
    for (src, b) in &s.bytes_received {
        match src {
            Source::Relay => relay += b,
            _ => peers += b,
        }
    }
    (peers, relay)
}

/// `#net`: data-state, data-peer-id, data-bytes-from-peers,
/// data-bytes-from-relay, data-bytes-served, data-chunks-served,
/// data-bad-chunks, data-bytes-direct (received over WebRTC, part of
/// data-bytes-from-peers), data-bytes-served-direct, data-direct-fallbacks,
/// data-proofs-sent.
pub fn net_panel(n: &NetFacts) -> Panel {
    let s = n.stats;
    let (from_peers, from_relay) = bytes_by_origin(s);
    let state = match &n.status {
        NetStatus::Connecting => format!("connecting to {}…", escape_html(n.relay_url)),
        NetStatus::Online => format!("online at {}", escape_html(n.relay_url)),
        NetStatus::Offline {
            reason,
            retry_in_ms,
        } => format!(
            "offline ({}); retrying in {:.0} s, fetching from the relay's REST API meanwhile",
            escape_html(reason),
            *retry_in_ms as f64 / 1000.0
        ),
        NetStatus::Refused(why) => format!(
            "refused by the relay ({}); fetching from its REST API only",
            escape_html(why)
        ),
    };
    let mut sources: Vec<String> = s
        .bytes_received
        .iter()
        .map(|(src, b)| {
            let who = match src {
                Source::Relay => "relay store".to_string(),
                Source::Peer(p) => format!("peer <span class=\"hash\">{}</span>", short_peer(p)),
                Source::Other => "other".to_string(),
            };
            let bad = s.bad_chunks.get(src).copied().unwrap_or(0);
            let bad = if bad > 0 {
                format!(" <span class=\"bad\">({bad} bad chunks)</span>")
            } else {
                String::new()
            };
            format!(
                "<li data-source=\"{}\">{who}: {}{bad}</li>",
                source_attr(src),
                fmt_bytes(*b)
            )
        })
        .collect();
    // Sources that only sent bad chunks.
    for (src, bad) in &s.bad_chunks {
        if !s.bytes_received.contains_key(src) {
            sources.push(format!(
                "<li data-source=\"{}\">{}: <span class=\"bad\">{bad} bad chunks</span></li>",
                source_attr(src),
                match src {
                    Source::Peer(p) =>
                        format!("peer <span class=\"hash\">{}</span>", short_peer(p)),
                    Source::Relay => "relay store".into(),
                    Source::Other => "other".into(),
                }
            ));
        }
    }
    let sources = if sources.is_empty() {
        String::new()
    } else {
        format!("<ul class=\"sources\">{}</ul>", sources.concat())
    };
    let fetching: Vec<String> = n
        .fetching
        .iter()
        .map(|(h, label, done, all)| {
            format!(
                "<li data-fetching=\"{}\">{} <progress max=\"{all}\" value=\"{done}\"></progress> {done}/{all} chunks</li>",
                h.to_hex(),
                escape_html(label)
            )
        })
        .collect();
    let fetching = if fetching.is_empty() {
        String::new()
    } else {
        format!("<ul class=\"fetching\">{}</ul>", fetching.concat())
    };
    let err = n.last_error.map_or(String::new(), |e| {
        format!(
            "<div class=\"muted\">last relay error: {}</div>",
            escape_html(e)
        )
    });
    let me = if n.peer_id.is_empty() {
        String::new()
    } else {
        format!(
            " as <span class=\"hash\" title=\"{id}\">{short}</span>",
            id = escape_html(n.peer_id),
            short = escape_html(&n.peer_id.chars().take(8).collect::<String>())
        )
    };
    Panel {
        attrs: vec![
            ("data-state", n.status.attr().into()),
            ("data-peer-id", n.peer_id.into()),
            ("data-bytes-from-peers", from_peers.to_string()),
            ("data-bytes-from-relay", from_relay.to_string()),
            ("data-bytes-served", s.bytes_served.to_string()),
            ("data-chunks-served", s.chunks_served.to_string()),
            ("data-bad-chunks", s.total_bad().to_string()),
            ("data-bytes-direct", s.direct_bytes_received.to_string()),
            ("data-bytes-served-direct", s.direct_bytes_served.to_string()),
            ("data-direct-fallbacks", s.direct_fallbacks.to_string()),
            ("data-proofs-sent", s.direct_proofs_sent.to_string()),
        ],
        html: format!(
            "<span class=\"label\">Network</span> <span class=\"state {attr}\">{state}</span>{me}. \
             Received {recv} ({fp} from peers, {fr} from the relay){direct}; served {served} in {cs} chunks \
             to other nodes through the relay{direct_served}; holds {held} payloads{bad}.{sources}{fetching}{err}",
            direct = match s.direct_bytes_received {
                0 => String::new(),
                b => format!(", <span class=\"direct\">{} directly from browsers</span>", fmt_bytes(b)),
            },
            direct_served = match s.direct_bytes_served {
                0 => String::new(),
                b => format!(" and {} directly", fmt_bytes(b)),
            },
            attr = n.status.attr(),
            recv = fmt_bytes(s.total_received()),
            fp = fmt_bytes(from_peers),
            fr = fmt_bytes(from_relay),
            served = fmt_bytes(s.bytes_served),
            cs = s.chunks_served,
            held = n.held,
            bad = match s.total_bad() {
                0 => String::new(),
                b => format!("; <span class=\"bad\">{b} bad chunks dropped</span>"),
            },
        ),
    }
}

fn source_attr(s: &Source) -> String {
    match s {
        Source::Relay => "relay".into(),
        Source::Peer(p) => hex::encode(p),
        Source::Other => "other".into(),
    }
}

/// `#cache` (its inner text; the clear button is a sibling the page keeps):
/// data-entries, data-bytes, data-note.
pub fn cache_panel(entries: u64, bytes: u64, note: &str) -> Panel {
    let note_html = if note.is_empty() {
        String::new()
    } else {
        format!(" <span class=\"muted\">{}</span>", escape_html(note))
    };
    Panel {
        attrs: vec![
            ("data-entries", entries.to_string()),
            ("data-bytes", bytes.to_string()),
            ("data-note", note.into()),
        ],
        html: format!(
            "<span class=\"label\">Cache</span> {entries} verified block{s} in this browser ({b}).{note_html}",
            s = if entries == 1 { "" } else { "s" },
            b = fmt_bytes(bytes),
        ),
    }
}

/// Alert kinds the page knows; anything else shows as `other`.
pub const ALERT_KINDS: [&str; 7] = [
    "relay-down",
    "no-webgpu",
    "bad-block",
    "peer-banned",
    "peer-lied",
    "cache-corrupt",
    "other",
];

/// A known kind, or `other`.
pub fn alert_kind(kind: &str) -> &'static str {
    ALERT_KINDS
        .iter()
        .find(|k| **k == kind)
        .copied()
        .unwrap_or("other")
}

/// info (no WebGPU: the CPU answers), warn (the node works on, degraded)
/// or error.
pub fn alert_level(kind: &str) -> &'static str {
    match alert_kind(kind) {
        "no-webgpu" => "info",
        "relay-down" | "peer-banned" | "peer-lied" | "cache-corrupt" => "warn",
        _ => "error",
    }
}

fn alert_title(kind: &str) -> &'static str {
    match alert_kind(kind) {
        "relay-down" => "Relay unreachable",
        "no-webgpu" => "No WebGPU",
        "bad-block" => "Bad block refused",
        "peer-banned" => "Peer banned",
        "peer-lied" => "Peer caught lying",
        "cache-corrupt" => "Cache entry corrupt",
        _ => "Problem",
    }
}

/// What follows from an alert of this kind, said after its message.
fn alert_hint(kind: &str) -> &'static str {
    match alert_kind(kind) {
        "relay-down" => "Blocks already verified stay usable; the page reconnects by itself.",
        "bad-block" => "It was refused and nothing from it is used.",
        "peer-banned" => "Its chunks are not used; other holders and the relay's store serve them.",
        "peer-lied" => "Its chunk was refused; the block comes through the relay instead.",
        "cache-corrupt" => "The entry was dropped and the block is fetched and verified again.",
        _ => "",
    }
}

/// `#alerts`: one `.alert[data-kind]` per kind, in the order given.
pub fn alerts_html(alerts: &[(String, String)]) -> String {
    alerts
        .iter()
        .map(|(kind, msg)| {
            let k = alert_kind(kind);
            format!(
                "<div class=\"alert {level}\" data-kind=\"{k}\" role=\"{role}\"><strong>{title}:</strong> \
                 {msg}{hint}</div>",
                level = alert_level(k),
                role = if alert_level(k) == "error" { "alert" } else { "status" },
                title = alert_title(k),
                msg = escape_html(msg),
                hint = match alert_hint(k) {
                    "" => String::new(),
                    h => format!(" <span class=\"hint\">{h}</span>"),
                },
            )
        })
        .collect()
}

/// Set or replace the message of one kind (unknown kinds become `other`).
pub fn set_alert(alerts: &mut Vec<(String, String)>, kind: &str, message: &str) {
    let k = alert_kind(kind);
    match alerts.iter_mut().find(|(kk, _)| kk == k) {
        Some(a) => a.1 = message.to_string(),
        None => alerts.push((k.to_string(), message.to_string())),
    }
}

/// Remove the alert of one kind.
pub fn remove_alert(alerts: &mut Vec<(String, String)>, kind: &str) {
    let k = alert_kind(kind);
    alerts.retain(|(kk, _)| kk != k);
}

fn json_u64(v: &serde_json::Value, key: &str) -> u64 {
    v.get(key).and_then(serde_json::Value::as_u64).unwrap_or(0)
}

fn json_str<'a>(v: &'a serde_json::Value, key: &str) -> &'a str {
    v.get(key).and_then(serde_json::Value::as_str).unwrap_or("")
}

/// Most rows a panel shows from a relay answer.
pub const MAX_ROWS: usize = 50;

/// `#peers` from `GET /p2p/nodes` (or the error): one `tr[data-peer]` per
/// node, this browser's own row marked `data-self="true"`.
pub fn peers_panel(nodes: Result<&serde_json::Value, &str>, my_key_hex: &str) -> Panel {
    let nodes = match nodes {
        Err(e) => {
            return Panel {
                attrs: vec![("data-count", "0".into()), ("data-error", e.into())],
                html: format!(
                    "<h2>Peers</h2><p class=\"bad\">Could not list the peers: {}</p>",
                    escape_html(e)
                ),
            }
        }
        Ok(v) => v,
    };
    let list: &[serde_json::Value] = nodes
        .get("nodes")
        .and_then(serde_json::Value::as_array)
        .map_or(&[], Vec::as_slice);
    let mut mine = (0u64, 0u64);
    let rows: Vec<String> = list
        .iter()
        .take(MAX_ROWS)
        .map(|n| {
            let id = json_str(n, "node_id");
            let me = !my_key_hex.is_empty() && id.eq_ignore_ascii_case(my_key_hex);
            if me {
                mine = (json_u64(n, "bytes_served"), json_u64(n, "chunks_served"));
            }
            let experts = n
                .get("available_experts")
                .and_then(serde_json::Value::as_array)
                .map_or(0, Vec::len);
            let banned = n.get("banned").and_then(serde_json::Value::as_bool) == Some(true);
            let what = match (json_str(n, "kind"), n.get("host").and_then(|h| h.as_str())) {
                ("ws", _) => escape_html(json_str(n, "agent")),
                (_, Some(h)) => format!(
                    "registered {}:{}",
                    escape_html(h),
                    json_u64(n, "port")
                ),
                (k, None) => escape_html(k),
            };
            let latency = n
                .get("latency_ms")
                .and_then(serde_json::Value::as_f64)
                .map_or("—".to_string(), |l| format!("{l:.0} ms"));
            format!(
                "<tr data-peer=\"{idh}\" data-self=\"{me}\" data-banned=\"{banned}\" class=\"{cls}\">\
                 <td><span class=\"hash\" title=\"{idh}\">{short}</span>{tag}</td><td>{what}</td>\
                 <td>{experts}</td><td>{served}</td><td>{latency}</td></tr>",
                idh = escape_html(id),
                short = escape_html(&id.chars().take(8).collect::<String>()),
                tag = match (me, banned) {
                    (true, _) => " <span class=\"tag\">this browser</span>",
                    (_, true) => " <span class=\"tag warn\">banned</span>",
                    _ => "",
                },
                cls = if banned { "banned" } else { "" },
                served = fmt_bytes(json_u64(n, "bytes_served")),
            )
        })
        .collect();
    let body = if rows.is_empty() {
        "<tr><td colspan=\"5\" class=\"muted\">no peers connected</td></tr>".to_string()
    } else {
        rows.concat()
    };
    let more = list.len().saturating_sub(MAX_ROWS);
    Panel {
        attrs: vec![
            ("data-count", list.len().to_string()),
            ("data-my-bytes-served", mine.0.to_string()),
            ("data-my-chunks-served", mine.1.to_string()),
        ],
        html: format!(
            "<h2>Peers <span class=\"muted\">({n} connected or registered; this browser served \
             {mb} in {mc} chunks, by the relay's count)</span></h2>\
             <table><thead><tr><th>Node</th><th>Agent</th><th>Blocks</th><th>Served</th>\
             <th>Latency</th></tr></thead><tbody>{body}</tbody></table>{more}",
            n = list.len(),
            mb = fmt_bytes(mine.0),
            mc = mine.1,
            more = if more > 0 {
                format!("<p class=\"muted\">and {more} more</p>")
            } else {
                String::new()
            },
        ),
    }
}

/// `#leaderboard` from `GET /experts/top` and `GET /rewards/{key}` (or
/// their errors): the top experts by reward, and this browser's rewards.
pub fn leaderboard_panel(
    top: Result<&serde_json::Value, &str>,
    rewards: Result<&serde_json::Value, &str>,
) -> Panel {
    let mut attrs = Vec::new();
    let table = match top {
        Err(e) => {
            attrs.push(("data-error", e.to_string()));
            format!(
                "<p class=\"bad\">Could not read the leaderboard: {}</p>",
                escape_html(e)
            )
        }
        Ok(v) => {
            let rows: Vec<String> = v
                .get("experts")
                .and_then(serde_json::Value::as_array)
                .map_or(&[][..], Vec::as_slice)
                .iter()
                .take(MAX_ROWS)
                .map(|r| {
                    format!(
                        "<tr data-expert=\"{name}\"><td>{rank}</td><td>{name}</td><td>{ver}</td>\
                         <td>{reward}</td><td>{tokens}</td><td>{served}</td></tr>",
                        rank = json_u64(r, "rank"),
                        name = escape_html(json_str(r, "expert")),
                        ver = json_u64(r, "versions"),
                        reward = json_u64(r, "reward_units"),
                        tokens = json_u64(r, "tokens_routed"),
                        served = fmt_bytes(json_u64(r, "bytes_served")),
                    )
                })
                .collect();
            attrs.push(("data-count", rows.len().to_string()));
            let body = if rows.is_empty() {
                "<tr><td colspan=\"6\" class=\"muted\">no experts yet</td></tr>".to_string()
            } else {
                rows.concat()
            };
            format!(
                "<table><thead><tr><th>#</th><th>Expert</th><th>Versions</th><th>Reward units</th>\
                 <th>Tokens routed</th><th>Bytes served</th></tr></thead><tbody>{body}</tbody></table>"
            )
        }
    };
    let mine = match rewards {
        Err(e) => format!(
            "<p class=\"muted\">This browser's rewards: unavailable ({})</p>",
            escape_html(e)
        ),
        Ok(v) => {
            let (total, peer, miner) = (
                json_u64(v, "total_uc"),
                json_u64(v, "peer_uc"),
                json_u64(v, "miner_uc"),
            );
            attrs.push(("data-my-rewards", total.to_string()));
            format!(
                "<p>This browser's rewards: <strong>{total}</strong> µc ({peer} for serving blocks, \
                 {miner} as a miner).</p>"
            )
        }
    };
    Panel {
        attrs,
        html: format!("<h2>Leaderboard</h2>{table}{mine}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_attrs() {
        let p = device_panel(&DeviceFacts {
            webgpu: true,
            adapter: "Swift<Shader>",
            f16: false,
            max_storage_buffer: 128 << 20,
            max_buffer: 256 << 20,
            memory_gib: Some(8.0),
            plan_gpu: true,
            message: "WebGPU: Swift<Shader>",
        });
        assert_eq!(p.attr("data-webgpu"), Some("yes"));
        assert_eq!(p.attr("data-f16"), Some("no"));
        assert_eq!(p.attr("data-plan"), Some("gpu"));
        assert!(p.html.contains("max buffer 256.0 MiB"));
        assert!(!p.html.contains("<Shader>"));
        assert!(p.html.contains("Swift&lt;Shader&gt;"));
        let p = device_panel(&DeviceFacts::default());
        assert_eq!(p.attr("data-webgpu"), Some("no"));
        assert_eq!(p.attr("data-plan"), Some("cpu"));
    }

    #[test]
    fn net_counts_peers_and_relay() {
        let mut s = NodeStats::default();
        s.bytes_received.insert(Source::Relay, 100);
        s.bytes_received.insert(Source::Peer([7; 32]), 300);
        s.bytes_received.insert(Source::Peer([8; 32]), 20);
        s.bad_chunks.insert(Source::Peer([9; 32]), 2);
        s.bytes_served = 55;
        s.chunks_served = 3;
        s.direct_bytes_received = 300 << 20;
        let p = net_panel(&NetFacts {
            status: NetStatus::Offline {
                reason: "<closed>",
                retry_in_ms: 2000,
            },
            relay_url: "ws://x/ws",
            peer_id: "abcd",
            stats: &s,
            held: 4,
            fetching: vec![(BlockHash([1; 32]), "layer0.expert1".into(), 1, 3)],
            last_error: Some("bad & worse"),
        });
        assert_eq!(p.attr("data-state"), Some("offline"));
        assert_eq!(p.attr("data-peer-id"), Some("abcd"));
        assert_eq!(p.attr("data-bytes-from-peers"), Some("320"));
        assert_eq!(p.attr("data-bytes-from-relay"), Some("100"));
        assert_eq!(p.attr("data-bytes-served"), Some("55"));
        assert_eq!(p.attr("data-chunks-served"), Some("3"));
        assert_eq!(p.attr("data-bad-chunks"), Some("2"));
        assert_eq!(
            p.attr("data-bytes-direct"),
            Some((300u64 << 20).to_string().as_str())
        );
        assert!(
            p.html.contains("300.0 MiB directly from browsers"),
            "{}",
            p.html
        );
        assert!(p.html.contains("&lt;closed&gt;"));
        assert!(p.html.contains("bad &amp; worse"));
        assert!(p.html.contains("2 bad chunks"));
        assert!(p.html.contains("1/3 chunks"));
        assert!(!p.html.contains("<closed>"));
    }

    #[test]
    fn net_states() {
        let s = NodeStats::default();
        for (st, want) in [
            (NetStatus::Connecting, "connecting"),
            (NetStatus::Online, "online"),
            (NetStatus::Refused("banned"), "refused"),
        ] {
            let p = net_panel(&NetFacts {
                status: st,
                relay_url: "",
                peer_id: "",
                stats: &s,
                held: 0,
                fetching: Vec::new(),
                last_error: None,
            });
            assert_eq!(p.attr("data-state"), Some(want));
        }
    }

    #[test]
    fn cache_attrs() {
        let p = cache_panel(3, 4096, "dropped 1 <corrupt> entry");
        assert_eq!(p.attr("data-entries"), Some("3"));
        assert_eq!(p.attr("data-bytes"), Some("4096"));
        assert_eq!(p.attr("data-note"), Some("dropped 1 <corrupt> entry"));
        assert!(p.html.contains("&lt;corrupt&gt;"));
    }

    #[test]
    fn alerts_replace_and_clear() {
        let mut a = Vec::new();
        set_alert(&mut a, "relay-down", "first");
        set_alert(&mut a, "relay-down", "second <b>");
        set_alert(&mut a, "no-webgpu", "cpu");
        set_alert(&mut a, "weird", "x");
        assert_eq!(a.len(), 3);
        let html = alerts_html(&a);
        assert_eq!(html.matches("class=\"alert").count(), 3);
        assert!(html.contains("data-kind=\"relay-down\""));
        assert!(html.contains("second &lt;b&gt;"));
        assert!(html.contains("class=\"alert info\" data-kind=\"no-webgpu\""));
        assert!(html.contains("data-kind=\"other\""));
        remove_alert(&mut a, "relay-down");
        assert!(!alerts_html(&a).contains("relay-down"));
    }

    #[test]
    fn peers_mark_self_and_escape() {
        let v = serde_json::json!({"nodes": [
            {"node_id": "aa11", "kind": "ws", "agent": "<b>", "bytes_served": 2048, "chunks_served": 2,
             "available_experts": ["layer0.expert1"], "banned": false, "latency_ms": 3.2},
            {"node_id": "bb22", "kind": "ws", "agent": "web", "bytes_served": 0, "banned": true},
            {"node_id": "cc", "kind": "registered", "host": "h", "port": 9}
        ], "registered": 1, "ws_peers": 2});
        let p = peers_panel(Ok(&v), "AA11");
        assert_eq!(p.attr("data-count"), Some("3"));
        assert_eq!(p.attr("data-my-bytes-served"), Some("2048"));
        assert!(p.html.contains("data-self=\"true\""));
        assert!(p.html.contains("data-banned=\"true\""));
        assert!(p.html.contains("&lt;b&gt;"));
        assert!(p.html.contains("registered h:9"));
        let e = peers_panel(Err("HTTP 500 <x>"), "");
        assert!(e.html.contains("HTTP 500 &lt;x&gt;"));
    }

    #[test]
    fn leaderboard_rows_and_rewards() {
        let top = serde_json::json!({"experts": [
            {"rank": 1, "expert": "layer0.expert3", "versions": 2, "reward_units": 9,
             "tokens_routed": 40, "bytes_served": 1024}
        ]});
        let r = serde_json::json!({"total_uc": 12, "peer_uc": 10, "miner_uc": 2});
        let p = leaderboard_panel(Ok(&top), Ok(&r));
        assert_eq!(p.attr("data-count"), Some("1"));
        assert_eq!(p.attr("data-my-rewards"), Some("12"));
        assert!(p.html.contains("data-expert=\"layer0.expert3\""));
        let p = leaderboard_panel(Err("down"), Err("down too"));
        assert_eq!(p.attr("data-error"), Some("down"));
        assert!(p.html.contains("down too"));
    }
}
