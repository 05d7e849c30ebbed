//! The page's HTML, from what the core decided: the [`ChainReport`] of the
//! header-first verification, each block's payload status in the [`Dag`],
//! the fetch counters and the model. Text from the chain (names, addresses,
//! errors) is escaped with [`escape_html`]; no rule is decided here.

use std::collections::HashMap;

use crate::chain::{BlockHash, ChainId, Dag, PayloadStatus};
use crate::chain_model::ChainModel;
use crate::model::Slot;
use crate::verify::{ChainReport, VerifyReport};

use super::fetch::FetchStats;

pub use crate::view::{escape_html, fmt_bytes};

/// A block's payload as the page shows it.
enum Payload<'a> {
    /// The header failed: no payload status.
    None,
    Absent,
    Partial,
    Verified,
    Failed(&'a str),
}

impl Payload<'_> {
    fn attr(&self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Absent => "absent",
            Self::Partial => "partial",
            Self::Verified => "verified",
            Self::Failed(_) => "failed",
        }
    }
}

fn payload<'a>(r: &VerifyReport, dag: &'a Dag) -> Payload<'a> {
    if !r.verified() {
        return Payload::None;
    }
    match dag.get(&r.hash).map(|e| &e.payload) {
        None => Payload::None,
        Some(PayloadStatus::Absent) => Payload::Absent,
        Some(PayloadStatus::Partial { .. }) => Payload::Partial,
        Some(PayloadStatus::Verified) => Payload::Verified,
        Some(PayloadStatus::Failed(e)) => Payload::Failed(e),
    }
}

/// A block counts as failed when its header or its payload failed.
fn row_failed(r: &VerifyReport, dag: &Dag) -> bool {
    !r.verified() || matches!(payload(r, dag), Payload::Failed(_))
}

/// What the summary counts.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counts {
    pub verified: usize,
    pub failed: usize,
    pub total: usize,
    /// Verified blocks whose payload is held and verified too.
    pub held: usize,
    /// Verified blocks known from their header only.
    pub header_only: usize,
}

pub fn counts(report: &ChainReport, dag: &Dag) -> Counts {
    let mut c = Counts {
        total: report.total(),
        ..Counts::default()
    };
    for r in &report.blocks {
        if row_failed(r, dag) {
            c.failed += 1;
            continue;
        }
        c.verified += 1;
        match payload(r, dag) {
            Payload::Verified => c.held += 1,
            _ => c.header_only += 1,
        }
    }
    c
}

/// The summary element the page shows and the browser tests wait for
/// (`data-phase="done"` once the startup payloads are in).
pub fn render_summary(report: &ChainReport, dag: &Dag, phase: &str) -> String {
    let c = counts(report, dag);
    let all_ok = c.failed == 0 && c.total > 0;
    format!(
        "<div id=\"summary\" class=\"summary {cls}\" data-verified=\"{v}\" data-failed=\"{f}\" \
         data-total=\"{t}\" data-held=\"{held}\" data-header-only=\"{ho}\" data-phase=\"{phase}\">\
         {v} of {t} blocks verified in this browser{tail} \
         <span class=\"muted\">({held} with their payload, {ho} from the header alone)</span></div>",
        cls = if all_ok { "ok" } else { "bad" },
        v = c.verified,
        f = c.failed,
        t = c.total,
        held = c.held,
        ho = c.header_only,
        phase = escape_html(phase),
        tail = if c.failed > 0 {
            format!(", {} failed", c.failed)
        } else {
            String::new()
        },
    )
}

/// The summary element for a chain that could not be fetched at all.
pub fn render_fetch_error(error: &str) -> String {
    format!(
        "<div id=\"summary\" class=\"summary bad\" data-verified=\"0\" data-failed=\"0\" data-total=\"0\" \
         data-phase=\"done\" data-error=\"{e}\">Could not fetch the chain: {e}</div>",
        e = escape_html(error)
    )
}

/// Bytes fetched so far beside the whole model's bytes, and which experts
/// this session holds.
pub fn render_fetch_stats(s: &FetchStats, model_bytes: u64) -> String {
    let experts: Vec<String> = s.experts.iter().map(ToString::to_string).collect();
    let of_model = if model_bytes > 0 {
        format!(
            " of the model's {} ({:.0}%)",
            fmt_bytes(model_bytes),
            100.0 * s.payload_bytes as f64 / model_bytes as f64
        )
    } else {
        String::new()
    };
    format!(
        "<div id=\"fetch-stats\" data-bytes=\"{b}\" data-payload-bytes=\"{pb}\" data-model-bytes=\"{mb}\" \
         data-requests=\"{req}\" data-payloads=\"{np}\" data-experts=\"{ex}\">\
         fetched {pbt}{of_model} in {np} payloads; {bt} in {req} requests in all \
         (listings and chunk lists included). Experts held: {nex}{list}</div>",
        b = s.bytes,
        pb = s.payload_bytes,
        mb = model_bytes,
        req = s.requests,
        np = s.payloads,
        ex = escape_html(&experts.join(",")),
        pbt = fmt_bytes(s.payload_bytes),
        bt = fmt_bytes(s.bytes),
        nex = experts.len(),
        list = if experts.is_empty() {
            " (none yet: an expert is fetched when the router first picks it)".to_string()
        } else {
            format!(" ({})", escape_html(&experts.join(", ")))
        },
    )
}

fn short_list(hashes: &[BlockHash], report: &ChainReport) -> String {
    if hashes.is_empty() {
        return "—".into();
    }
    hashes
        .iter()
        .map(|h| {
            let label = report
                .get(h)
                .and_then(|r| {
                    r.name.as_ref().map(|n| {
                        format!("{n} v{}", r.version.map_or("?".into(), |v| v.to_string()))
                    })
                })
                .unwrap_or_else(|| "unknown".into());
            format!(
                "<a href=\"#b-{hex}\" class=\"hash\" title=\"{hex}\">{short}</a> <span class=\"muted\">{label}</span>",
                hex = h.to_hex(),
                short = h.short(),
                label = escape_html(&label)
            )
        })
        .collect::<Vec<_>>()
        .join("<br>")
}

/// "head" tag, and a warning when the relay's head claim disagrees.
fn head_tags(r: &VerifyReport) -> String {
    let mut s = String::new();
    if r.head {
        s.push_str(" <span class=\"tag\">head</span>");
    }
    if let Some(claim) = r.relay_head_disagrees {
        s.push_str(&format!(
            " <span class=\"tag warn\" data-head-disagrees=\"true\">relay says {}head</span>",
            if claim { "" } else { "not " }
        ));
    }
    s
}

fn render_row(r: &VerifyReport, report: &ChainReport, dag: &Dag) -> String {
    let p = payload(r, dag);
    let status = if row_failed(r, dag) {
        "failed"
    } else {
        "verified"
    };
    let name = r.name.as_deref().unwrap_or("?");
    let result = match (&r.error, &p) {
        (Some(e), _) => format!("✘ {}", escape_html(e)),
        (None, Payload::Failed(e)) => {
            format!("✘ header verified, payload refused: {}", escape_html(e))
        }
        (None, Payload::Verified) => "✔ header and payload verified".to_string(),
        (None, Payload::Partial) => "✔ header verified, payload arriving".to_string(),
        (None, _) => {
            "✔ header verified <span class=\"muted\">(payload not fetched)</span>".to_string()
        }
    };
    let extra = match (&r.spec, r.candidate_loss) {
        (Some(s), _) => escape_html(s),
        (None, Some(l)) => format!("loss {l:.4}"),
        (None, None) => String::new(),
    };
    let size = r.payload_len.map_or("?".into(), fmt_bytes);
    let held = match p {
        Payload::Verified => " <span class=\"tag held\">held</span>",
        _ => "",
    };
    format!(
        "<tr id=\"b-{hex}\" class=\"block {status} payload-{pa}\" data-hash=\"{hex}\" data-chain=\"{chain:?}\" data-slot=\"{slot}\" \
         data-version=\"{ver}\" data-head=\"{head}\" data-status=\"{status}\" data-payload=\"{pa}\" data-parents=\"{plist}\" data-meta=\"{meta}\">\
         <td>{slot}{headmark}</td><td>{kind}</td><td>{ver_txt}</td>\
         <td><span class=\"hash\" title=\"{hex}\">{short}</span></td><td>{parents}</td>\
         <td>{size}{held}</td><td>{extra}</td><td class=\"addr\">{addr}</td><td class=\"result\">{result}</td></tr>",
        hex = r.hash.to_hex(),
        chain = r.chain,
        slot = escape_html(name),
        pa = p.attr(),
        ver = r.version.map_or(String::new(), |v| v.to_string()),
        ver_txt = r.version.map_or("—".into(), |v| format!("v{v}")),
        head = r.head,
        headmark = head_tags(r),
        kind = r.kind.map_or("?", |k| k.as_str()),
        short = r.hash.short(),
        parents = short_list(&r.parents, report),
        addr = escape_html(r.address.as_deref().unwrap_or("")),
        plist = r.parents.iter().map(BlockHash::to_hex).collect::<Vec<_>>().join(","),
        meta = r.meta.map(|m| m.to_hex()).unwrap_or_default(),
    )
}

fn render_chain(report: &ChainReport, dag: &Dag, chain: ChainId, title: &str) -> String {
    let rows: Vec<String> = report
        .blocks
        .iter()
        .filter(|r| r.chain == chain)
        .map(|r| render_row(r, report, dag))
        .collect();
    let body = if rows.is_empty() {
        "<tr><td colspan=\"9\" class=\"muted\">no blocks</td></tr>".to_string()
    } else {
        rows.concat()
    };
    format!(
        "<section class=\"chain\" id=\"chain-{chain:?}\"><h2>{title}</h2><table>\
         <thead><tr><th>Slot</th><th>Kind</th><th>Version</th><th>Hash</th><th>Parents</th>\
         <th>Payload</th><th>Spec / loss</th><th>Miner</th><th>Verification</th></tr></thead>\
         <tbody>{body}</tbody></table></section>"
    )
}

/// One grid cell: latest verified version, failures, whether its payload is held.
#[derive(Default)]
struct Cell {
    version: u32,
    failed: usize,
    held: bool,
}

/// A grid of chain-B slot heads: one row per layer, router and experts as
/// columns, each cell the slot's latest verified version, green when its
/// payload is held.
fn render_grid(report: &ChainReport, dag: &Dag) -> String {
    let mut cells: HashMap<Option<Slot>, Cell> = HashMap::new();
    let (mut layers, mut experts) = (0usize, 0usize);
    for r in report.blocks.iter().filter(|r| r.chain == ChainId::B) {
        let Some(slot) = r.name.as_deref().and_then(|n| Slot::parse(n).ok()) else {
            continue;
        };
        if let Some(layer) = slot.layer() {
            layers = layers.max(layer + 1);
        }
        if let Slot::Expert { expert, .. } = slot {
            experts = experts.max(expert + 1);
        }
        let key = (slot != Slot::Shared).then_some(slot);
        let c = cells.entry(key).or_default();
        match r.version {
            Some(v) if !row_failed(r, dag) => {
                if v >= c.version {
                    c.version = v;
                    c.held = matches!(payload(r, dag), Payload::Verified);
                }
            }
            _ => c.failed += 1,
        }
    }
    if cells.is_empty() {
        return String::new();
    }
    // Cap the drawing so a hostile listing cannot make a huge page.
    let (layers, experts) = (layers.min(256), experts.min(256));
    let cell = |c: Option<&Cell>| match c {
        None => "<td class=\"cell missing\">·</td>".to_string(),
        Some(c) if c.failed == 0 => format!(
            "<td class=\"cell verified{h}\" data-payload=\"{p}\">v{v}</td>",
            h = if c.held { " held" } else { "" },
            p = if c.held { "verified" } else { "absent" },
            v = c.version
        ),
        Some(c) if c.version == 0 => format!("<td class=\"cell failed\">✘{}</td>", c.failed),
        Some(c) => format!(
            "<td class=\"cell failed\">v{} ✘{}</td>",
            c.version, c.failed
        ),
    };
    let mut s = String::from(
        "<section class=\"grid\"><h2>Chain B slots (latest version per slot; \
         <span class=\"cell-key held\">filled</span>: payload fetched and verified, \
         <span class=\"cell-key\">outlined</span>: header only)</h2><table><thead><tr><th></th><th>router</th>",
    );
    for e in 0..experts {
        s.push_str(&format!("<th>expert{e}</th>"));
    }
    s.push_str("</tr></thead><tbody>");
    for l in 0..layers {
        s.push_str(&format!(
            "<tr><th>layer{l}</th>{}",
            cell(cells.get(&Some(Slot::Router { layer: l })))
        ));
        for e in 0..experts {
            s.push_str(&cell(cells.get(&Some(Slot::Expert {
                layer: l,
                expert: e,
            }))));
        }
        s.push_str("</tr>");
    }
    s.push_str(&format!(
        "</tbody></table><div class=\"shared\">shared: <table class=\"inline\"><tr>{}</tr></table></div></section>",
        cell(cells.get(&None))
    ));
    s
}

/// Everything below the chat: slot grid and both chains as tables.
pub fn render_details(report: &ChainReport, dag: &Dag) -> String {
    let mut s = render_grid(report, dag);
    s.push_str(&render_chain(
        report,
        dag,
        ChainId::A,
        "Chain A — model (meta) blocks",
    ));
    s.push_str(&render_chain(
        report,
        dag,
        ChainId::B,
        "Chain B — parameter blocks",
    ));
    s
}

/// The chat section: the form when the model is built, else why not.
/// The engine select starts on the device check's plan (CPU before it ran).
pub fn render_chat(model: Result<&ChainModel, &str>) -> String {
    render_chat_for(model, super::panels::planned_gpu().unwrap_or(false))
}

fn render_chat_for(model: Result<&ChainModel, &str>, gpu: bool) -> String {
    match model {
        Err(e) => format!(
            "<section id=\"chat\" data-state=\"unavailable\"><h2>Chat</h2>\
             <p class=\"muted\">No model to chat with: {}</p></section>",
            escape_html(e)
        ),
        Ok(m) => {
            let cfg = &m.config;
            let sel = |on: bool| if on { " selected" } else { "" };
            format!(
                "<section id=\"chat\" data-state=\"ready\"><h2>Chat with {name}</h2>\
                 <p class=\"muted\">Runs in this browser on the verified heads of meta block \
                 <span class=\"hash\">{meta}</span>: {layers} layers × {experts} experts, top-{k}. \
                 An expert's payload is fetched, chunk by chunk, and verified the first time the \
                 router picks it.</p>\
                 <form id=\"chat-form\"><textarea id=\"prompt\" rows=\"2\" cols=\"60\" \
                 placeholder=\"Q: copy bado kuzi fe A:   (any words of your own; also Q: reverse red sun owl A:, Q: sort pen cat owl A:, Q: count mo bavi ke A:, Q: 38+45=? A:, Q: capital of France? A:)\"></textarea>\
                 <div class=\"controls\">\
                 <label>max tokens <input id=\"max-tokens\" type=\"number\" min=\"1\" max=\"512\" value=\"32\"></label>\
                 <label title=\"0: greedy (the most likely token each time)\">temperature \
                 <input id=\"temperature\" type=\"number\" min=\"0\" max=\"5\" step=\"0.1\" value=\"0\"></label>\
                 <label title=\"nucleus sampling: keep the smallest set of tokens with this much probability\">top-p \
                 <input id=\"top-p\" type=\"number\" min=\"0.05\" max=\"1\" step=\"0.05\" value=\"1\"></label>\
                 <label title=\"experts each token is routed to in every layer (top_k)\">experts per token \
                 <input id=\"top-k\" type=\"number\" min=\"1\" max=\"{experts}\" value=\"{k}\"></label>\
                 <label>engine <select id=\"engine\"><option value=\"cpu\"{cpu_sel}>CPU (wasm)</option>\
                 <option value=\"gpu\"{gpu_sel}>GPU (WebGPU)</option></select></label>\
                 <button id=\"send\" type=\"submit\">Generate</button>\
                 <button id=\"stop\" type=\"button\" disabled>Stop</button></div></form>\
                 <pre id=\"reply\" data-state=\"idle\" aria-live=\"polite\"></pre>\
                 <div id=\"chat-stats\" class=\"muted\"></div></section>",
                name = escape_html(&m.name),
                meta = m.meta.short(),
                layers = cfg.num_hidden_layers,
                experts = cfg.num_local_experts,
                k = cfg.num_experts_per_tok,
                cpu_sel = sel(!gpu),
                gpu_sel = sel(gpu),
            )
        }
    }
}
