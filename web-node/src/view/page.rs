//! The page's main HTML, from what the core decided: the [`ChainReport`] of
//! the header-first verification, each block's payload status in the
//! [`Dag`], the fetch counters, the memory budget and the model. Text from
//! the chain (names, addresses, errors) is escaped with [`escape_html`]; no
//! rule is decided here. At a thousand blocks and more the page stays
//! readable: held experts are counted per layer, chain B's table is one
//! collapsed section per layer, the slot grid is compact.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::chain::{BlockHash, ChainId, Dag, PayloadStatus};
use crate::chain_model::ChainModel;
use crate::model::{ExpertId, Slot};
use crate::verify::{ChainReport, VerifyReport};

use super::{escape_html, fmt_bytes};

/// Chain-B blocks up to which every section of the table starts open.
pub const OPEN_SECTIONS_UP_TO: usize = 100;
/// Experts per layer above which the slot grid is drawn compact.
const COMPACT_GRID_FROM: usize = 17;

/// What the page fetched, as the fetch line shows it.
#[derive(Debug, Clone, Default)]
pub struct FetchFacts<'a> {
    /// Every body byte (listings, chunk lists, payloads).
    pub bytes: u64,
    pub payload_bytes: u64,
    pub requests: u64,
    pub payloads: u64,
    /// Experts whose verified payload this session fetched or read.
    pub experts: Option<&'a BTreeSet<ExpertId>>,
    /// Milliseconds spent waiting for payload batches, and cache writes.
    pub fetch_ms: f64,
    pub store_ms: f64,
}

/// What the memory panel shows.
#[derive(Debug, Clone, Default)]
pub struct MemoryFacts<'a> {
    /// wasm linear memory (it only grows: the peak so far).
    pub wasm_bytes: u64,
    pub budget: u64,
    pub budget_why: &'a str,
    pub decoded_experts: usize,
    pub decoded_bytes: u64,
    /// Expert payloads the peer node holds to serve.
    pub served_bytes: u64,
    pub cache_entries: usize,
    pub cache_bytes: u64,
    /// Cache entries evicted this session (budget or quota).
    pub cache_evicted: u64,
    /// Meta, shared and router payloads held for the session.
    pub startup_bytes: u64,
}

/// The memory panel: `(attributes, inner HTML)` for `#memory`.
pub fn memory_panel(m: &MemoryFacts) -> (Vec<(&'static str, String)>, String) {
    let attrs = vec![
        ("data-wasm-bytes", m.wasm_bytes.to_string()),
        ("data-budget", m.budget.to_string()),
        ("data-decoded-experts", m.decoded_experts.to_string()),
        ("data-decoded-bytes", m.decoded_bytes.to_string()),
        ("data-served-bytes", m.served_bytes.to_string()),
        ("data-cache-entries", m.cache_entries.to_string()),
        ("data-cache-bytes", m.cache_bytes.to_string()),
        ("data-cache-evicted", m.cache_evicted.to_string()),
        ("data-startup-bytes", m.startup_bytes.to_string()),
    ];
    let html = format!(
        "<span class=\"label\">Memory</span> budget {b} <span class=\"muted\">({why})</span>\
         <ul><li>wasm memory: {w}</li>\
         <li>decoded experts: {de} ({db}); served to peers: {sb}</li>\
         <li>cache: {ce} blocks, {cb}{ev}</li>\
         <li>model core (meta, shared, routers): {st}</li></ul>",
        b = fmt_bytes(m.budget),
        why = escape_html(m.budget_why),
        w = fmt_bytes(m.wasm_bytes),
        de = m.decoded_experts,
        db = fmt_bytes(m.decoded_bytes),
        sb = fmt_bytes(m.served_bytes),
        ce = m.cache_entries,
        cb = fmt_bytes(m.cache_bytes),
        ev = if m.cache_evicted > 0 {
            format!("; {} evicted", m.cache_evicted)
        } else {
            String::new()
        },
        st = fmt_bytes(m.startup_bytes),
    );
    (attrs, html)
}

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
    /// Verified blocks whose verified payload the page holds now (in
    /// memory or in its cache).
    pub held: usize,
    /// Verified blocks known from their header only (their payload not
    /// fetched yet, or evicted since).
    pub header_only: usize,
}

/// Whether the page holds a verified block's verified payload now: the
/// DAG says the payload passed its checks, `held` that it was not evicted
/// since.
fn holds(r: &VerifyReport, dag: &Dag, held: &BTreeSet<BlockHash>) -> bool {
    matches!(payload(r, dag), Payload::Verified) && held.contains(&r.hash)
}

/// The summary's numbers; `held` is the blocks whose payload the page
/// holds now (a payload verified and then evicted counts as header only).
pub fn counts(report: &ChainReport, dag: &Dag, held: &BTreeSet<BlockHash>) -> Counts {
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
        if holds(r, dag, held) {
            c.held += 1;
        } else {
            c.header_only += 1;
        }
    }
    c
}

/// The summary element the page shows and the browser tests wait for
/// (`data-phase="done"` once the startup payloads are in).
pub fn render_summary(
    report: &ChainReport,
    dag: &Dag,
    held: &BTreeSet<BlockHash>,
    phase: &str,
) -> String {
    let c = counts(report, dag, held);
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

/// Experts counted per layer as plain text: `L0 12, L1 9, …` (layers
/// without one left out).
pub fn per_layer_counts(ids: impl IntoIterator<Item = ExpertId>) -> String {
    let mut per: BTreeMap<usize, BTreeSet<usize>> = BTreeMap::new();
    for id in ids {
        per.entry(id.layer).or_default().insert(id.expert);
    }
    per.iter()
        .map(|(l, es)| format!("L{l} {}", es.len()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Held experts per layer, compact: `L0 12 · L1 9 · …` (layers without
/// one left out), each with its full list as a tooltip.
fn experts_per_layer(experts: &BTreeSet<ExpertId>) -> String {
    let mut per: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for id in experts {
        per.entry(id.layer).or_default().push(id.expert);
    }
    per.iter()
        .map(|(l, es)| {
            let list: Vec<String> = es.iter().map(ToString::to_string).collect();
            format!(
                "<span class=\"layer-held\" data-layer=\"{l}\" data-count=\"{n}\" title=\"layer {l}: experts {t}\">L{l}&nbsp;{n}</span>",
                n = es.len(),
                t = list.join(", ")
            )
        })
        .collect::<Vec<_>>()
        .join(" · ")
}

/// Bytes fetched so far beside the whole model's bytes, and how many
/// experts this session holds per layer (each layer's list as a tooltip;
/// every name in `data-experts`).
pub fn render_fetch_stats(s: &FetchFacts, model_bytes: u64) -> String {
    let empty = BTreeSet::new();
    let ex_set = s.experts.unwrap_or(&empty);
    let experts: Vec<String> = ex_set.iter().map(ToString::to_string).collect();
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
         data-requests=\"{req}\" data-payloads=\"{np}\" data-fetch-ms=\"{fms:.0}\" data-store-ms=\"{sms:.0}\" data-experts=\"{ex}\">\
         fetched {pbt}{of_model} in {np} payloads; {bt} in {req} requests in all \
         (listings and chunk lists included). Experts held: {nex}{list}</div>",
        b = s.bytes,
        pb = s.payload_bytes,
        mb = model_bytes,
        req = s.requests,
        np = s.payloads,
        fms = s.fetch_ms,
        sms = s.store_ms,
        ex = escape_html(&experts.join(",")),
        pbt = fmt_bytes(s.payload_bytes),
        bt = fmt_bytes(s.bytes),
        nex = experts.len(),
        list = if experts.is_empty() {
            " (none yet: an expert is fetched when the router first picks it)".to_string()
        } else {
            format!(" <span class=\"per-layer\">per layer: {}</span>", experts_per_layer(ex_set))
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

fn render_row(
    r: &VerifyReport,
    report: &ChainReport,
    dag: &Dag,
    held_now: &BTreeSet<BlockHash>,
) -> String {
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
    let held = if holds(r, dag, held_now) {
        " <span class=\"tag held\">held</span>"
    } else {
        ""
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

/// The section a chain-B block's row goes in: shared, layer N, or other.
fn section_of(name: Option<&str>) -> (u8, usize) {
    match name.map(Slot::parse) {
        Some(Ok(Slot::Shared)) => (0, 0),
        Some(Ok(s)) => (1, s.layer().unwrap_or(0)),
        _ => (2, 0),
    }
}

const TABLE_HEAD: &str =
    "<thead><tr><th>Slot</th><th>Kind</th><th>Version</th><th>Hash</th><th>Parents</th>\
     <th>Payload</th><th>Spec / loss</th><th>Miner</th><th>Verification</th></tr></thead>";

fn render_chain(
    report: &ChainReport,
    dag: &Dag,
    held_now: &BTreeSet<BlockHash>,
    chain: ChainId,
    title: &str,
) -> String {
    let blocks: Vec<&VerifyReport> = report.blocks.iter().filter(|r| r.chain == chain).collect();
    if blocks.is_empty() {
        return format!(
            "<section class=\"chain\" id=\"chain-{chain:?}\"><h2>{title}</h2><table>{TABLE_HEAD}\
             <tbody><tr><td colspan=\"9\" class=\"muted\">no blocks</td></tr></tbody></table></section>"
        );
    }
    if chain == ChainId::A {
        let rows: String = blocks
            .iter()
            .map(|r| render_row(r, report, dag, held_now))
            .collect();
        return format!(
            "<section class=\"chain\" id=\"chain-{chain:?}\"><h2>{title}</h2><table>{TABLE_HEAD}\
             <tbody>{rows}</tbody></table></section>"
        );
    }
    // Chain B: one collapsible section per layer (shared first), each
    // summarised in its header; all open for a small chain.
    let mut sections: BTreeMap<(u8, usize), Vec<&VerifyReport>> = BTreeMap::new();
    for r in &blocks {
        sections
            .entry(section_of(r.name.as_deref()))
            .or_default()
            .push(r);
    }
    let open = blocks.len() <= OPEN_SECTIONS_UP_TO;
    let mut s = format!(
        "<section class=\"chain\" id=\"chain-{chain:?}\"><h2>{title} <span class=\"muted\">({n} blocks{hint})</span></h2>",
        n = blocks.len(),
        hint = if open { "" } else { "; open a layer to see its blocks" },
    );
    for ((kind, layer), rs) in &sections {
        let label = match kind {
            0 => "shared".to_string(),
            1 => format!("layer {layer}"),
            _ => "other names".to_string(),
        };
        let failed = rs.iter().filter(|r| row_failed(r, dag)).count();
        let held = rs.iter().filter(|r| holds(r, dag, held_now)).count();
        s.push_str(&format!(
            "<details class=\"layer-rows\" data-section=\"{key}\"{o}><summary>{label}: {n} blocks, \
             <span class=\"{cls}\">{v} verified{f}</span>, {held} with their payload</summary>\
             <table>{TABLE_HEAD}<tbody>{rows}</tbody></table></details>",
            key = escape_html(&label),
            o = if open { " open" } else { "" },
            n = rs.len(),
            cls = if failed > 0 { "bad" } else { "ok-text" },
            v = rs.len() - failed,
            f = if failed > 0 {
                format!(", {failed} failed")
            } else {
                String::new()
            },
            rows = rs.iter().map(|r| render_row(r, report, dag, held_now)).collect::<String>(),
        ));
    }
    s.push_str("</section>");
    s
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
fn render_grid(report: &ChainReport, dag: &Dag, held_now: &BTreeSet<BlockHash>) -> String {
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
                    c.held = holds(r, dag, held_now);
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
    let compact = experts >= COMPACT_GRID_FROM;
    let mut s = format!(
        "<section class=\"grid{c}\"><h2>Chain B slots (latest version per slot; \
         <span class=\"cell-key held\">filled</span>: payload fetched and verified, \
         <span class=\"cell-key\">outlined</span>: header only)</h2><div class=\"grid-scroll\"><table><thead><tr><th></th><th>{r}</th>",
        c = if compact { " compact" } else { "" },
        r = if compact { "R" } else { "router" },
    );
    for e in 0..experts {
        if compact {
            s.push_str(&format!("<th title=\"expert{e}\">{e}</th>"));
        } else {
            s.push_str(&format!("<th>expert{e}</th>"));
        }
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
        "</tbody></table></div><div class=\"shared\">shared: <table class=\"inline\"><tr>{}</tr></table></div></section>",
        cell(cells.get(&None))
    ));
    s
}

/// Everything below the chat: slot grid and both chains as tables.
/// `held` is the blocks whose payload the page holds now.
pub fn render_details(report: &ChainReport, dag: &Dag, held: &BTreeSet<BlockHash>) -> String {
    let mut s = render_grid(report, dag, held);
    s.push_str(&render_chain(
        report,
        dag,
        held,
        ChainId::A,
        "Chain A — model (meta) blocks",
    ));
    s.push_str(&render_chain(
        report,
        dag,
        held,
        ChainId::B,
        "Chain B — parameter blocks",
    ));
    s
}

/// The chat section: the form when the model is built, else why not. The
/// engine select starts on `gpu` (the device check's plan; CPU before it ran).
pub fn render_chat(model: Result<&ChainModel, &str>, gpu: bool) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fetch_line_counts_experts_per_layer_not_by_name() {
        let experts: BTreeSet<ExpertId> = (0..16)
            .flat_map(|l| (0..40).map(move |e| ExpertId::new(l, e)))
            .collect();
        let html = render_fetch_stats(
            &FetchFacts {
                bytes: 10,
                payload_bytes: 5 << 20,
                requests: 3,
                payloads: 640,
                experts: Some(&experts),
                ..Default::default()
            },
            10 << 20,
        );
        // Every name stays in the attribute; the text counts per layer.
        assert!(html.contains("layer0.expert0,layer0.expert1,"));
        assert!(html.contains("layer15.expert39\""));
        assert_eq!(html.matches("class=\"layer-held\"").count(), 16);
        assert!(html.contains("data-count=\"40\""));
        assert!(html.contains("(50%)"));
        // The visible text (tags and their tooltips left out) stays short.
        let mut text = String::new();
        let mut in_tag = false;
        for c in html.chars() {
            match c {
                '<' => in_tag = true,
                '>' => in_tag = false,
                _ if !in_tag => text.push(c),
                _ => {}
            }
        }
        assert!(text.len() < 600, "{} chars: {text}", text.len());
        assert!(text.contains("L15&nbsp;40"), "{text}");
        assert_eq!(
            per_layer_counts([
                ExpertId::new(2, 1),
                ExpertId::new(0, 3),
                ExpertId::new(2, 1)
            ]),
            "L0 1, L2 1"
        );
    }

    #[test]
    fn evicted_payloads_are_not_counted_as_held() {
        use crate::test_chain::TinyChain;
        use crate::verify::{verify_chain_dag, FetchedBlock};
        let t = TinyChain::new(4);
        // Every payload fetched and verified once.
        let fetched: Vec<FetchedBlock> = t
            .blocks()
            .iter()
            .map(|(b, p)| FetchedBlock::of(b, Some(p.clone())))
            .collect();
        let (report, dag) = verify_chain_dag(&fetched);
        let all: BTreeSet<BlockHash> = t.blocks().iter().map(|(b, _)| b.hash).collect();
        let c = counts(&report, &dag, &all);
        assert_eq!(
            (c.verified, c.held, c.header_only),
            (all.len(), all.len(), 0)
        );
        // Then the experts were evicted: the page holds the rest only.
        let experts: BTreeSet<BlockHash> = t.experts().iter().map(|(b, _)| b.hash).collect();
        let held: BTreeSet<BlockHash> = all.difference(&experts).copied().collect();
        let c = counts(&report, &dag, &held);
        assert_eq!(c.verified, all.len());
        assert_eq!((c.held, c.header_only), (held.len(), experts.len()));
        let summary = render_summary(&report, &dag, &held, "done");
        assert!(
            summary.contains(&format!("data-held=\"{}\"", held.len())),
            "{summary}"
        );
        assert!(summary.contains(&format!("({} with their payload", held.len())));
        let details = render_details(&report, &dag, &held);
        assert_eq!(details.matches("tag held").count(), held.len());
        // Each layer's section holds its router only, the shared one its block.
        assert_eq!(
            details.matches(", 1 with their payload</summary>").count(),
            t.config.num_hidden_layers + 1
        );
    }

    #[test]
    fn memory_panel_carries_its_numbers() {
        let (attrs, html) = memory_panel(&MemoryFacts {
            wasm_bytes: 64 << 20,
            budget: 4 << 20,
            budget_why: "set by <param>",
            decoded_experts: 3,
            decoded_bytes: 3000,
            served_bytes: 2000,
            cache_entries: 7,
            cache_bytes: 9000,
            cache_evicted: 2,
            startup_bytes: 100,
        });
        let get = |k: &str| attrs.iter().find(|(a, _)| *a == k).map(|(_, v)| v.clone());
        assert_eq!(get("data-budget").as_deref(), Some("4194304"));
        assert_eq!(get("data-cache-evicted").as_deref(), Some("2"));
        assert!(html.contains("64.0 MiB") && html.contains("2 evicted"));
        assert!(html.contains("&lt;param&gt;"));
    }
}
