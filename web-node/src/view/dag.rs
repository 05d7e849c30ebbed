//! The picture of the DAG as an inline SVG string: chain A (model meta
//! blocks) as a row on top, chain B as one column per slot (shared, then
//! each layer's router and experts), a slot's versions stacked downwards
//! with edges to their parents, and edges from chain-B blocks to the meta
//! block they conform to. Each block is a `g[data-hash]` carrying
//! `data-chain` A|B, `data-held`, `data-used` (an expert the last answer
//! routed to) and `data-head`; every text is escaped.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::chain::{BlockHash, ChainId, Dag, PayloadStatus};
use crate::model::{ExpertId, Slot};

use super::escape_html;

/// One block as the picture needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct DagNode {
    pub hash: BlockHash,
    pub chain: ChainId,
    /// Model name (chain A) or slot name (chain B).
    pub name: String,
    pub parents: Vec<BlockHash>,
    /// Chain-B blocks: their chain-A meta block.
    pub meta: Option<BlockHash>,
    /// The slot's (or model's) current head.
    pub head: bool,
    /// This browser holds the verified payload.
    pub held: bool,
    /// An expert the last answer used.
    pub used: bool,
    /// The payload was fetched and refused.
    pub failed: bool,
}

/// Most slot columns and versions per column drawn (a hostile listing
/// cannot make a huge page); the rest are counted in a note.
pub const MAX_COLUMNS: usize = 512;
pub const MAX_ROWS: usize = 32;
pub const MAX_META: usize = 32;

/// The nodes of every block in `dag`, in acceptance order: `held` names the
/// payloads this browser holds, `used` the experts of the last answer (marked
/// on their slot's head under the latest meta block).
pub fn nodes_from_dag(
    dag: &Dag,
    held: &BTreeSet<BlockHash>,
    used: &BTreeSet<ExpertId>,
) -> Vec<DagNode> {
    let heads: BTreeSet<BlockHash> = dag.heads().map(|(_, h)| *h).collect();
    let latest = dag.latest_meta().map(|e| e.hash);
    let used_heads: BTreeSet<BlockHash> = match latest {
        Some(m) => {
            let slots = dag.slot_heads(&m);
            used.iter()
                .filter_map(|id| slots.get(&format!("layer{}.expert{}", id.layer, id.expert)))
                .copied()
                .collect()
        }
        None => BTreeSet::new(),
    };
    dag.iter()
        .map(|e| DagNode {
            hash: e.hash,
            chain: e.header.chain,
            name: e.header.name.clone(),
            parents: e.header.parents.clone(),
            meta: e.header.meta,
            head: heads.contains(&e.hash),
            held: held.contains(&e.hash),
            used: used_heads.contains(&e.hash),
            failed: matches!(e.payload, PayloadStatus::Failed(_)),
        })
        .collect()
}

/// A column's sort key: (group, layer, position in the layer, name).
type ColumnKey = (u8, usize, usize, String);
/// The slot columns: name and blocks, in column order.
type Columns<'a> = BTreeMap<ColumnKey, (String, Vec<&'a DagNode>)>;

/// Where a slot's column goes: shared first, then per layer the router, the
/// shared expert and the experts, then names that are no slot.
fn column_key(name: &str) -> ColumnKey {
    match Slot::parse(name) {
        Ok(Slot::Shared) => (0, 0, 0, String::new()),
        Ok(Slot::Router { layer }) => (1, layer, 0, String::new()),
        Ok(Slot::SharedExpert { layer }) => (1, layer, 1, String::new()),
        Ok(Slot::Expert { layer, expert }) => (1, layer, expert + 2, String::new()),
        Err(_) => (2, 0, 0, name.to_string()),
    }
}

/// The short label under a column.
fn column_label(name: &str) -> String {
    match Slot::parse(name) {
        Ok(Slot::Shared) => "shared".into(),
        Ok(Slot::Router { .. }) => "R".into(),
        Ok(Slot::SharedExpert { .. }) => "S".into(),
        Ok(Slot::Expert { expert, .. }) => expert.to_string(),
        Err(_) => name.chars().take(8).collect(),
    }
}

// Geometry (SVG user units).
const LEFT: f64 = 64.0;
const COL: f64 = 24.0;
const GAP: f64 = 12.0;
const R: f64 = 8.0;
const A_Y: f64 = 34.0;
const A_STEP: f64 = 150.0;
const GROUP_Y: f64 = 92.0;
const LABEL_Y: f64 = 108.0;
const B_Y: f64 = 128.0;
const ROW: f64 = 26.0;

fn fmt(x: f64) -> String {
    format!("{x:.1}")
}

/// Slot columns up to which every version is drawn; a larger chain is drawn
/// by [`render_layers_svg`].
pub const MAX_DETAILED_COLUMNS: usize = 160;

/// The SVG of `nodes` (as [`nodes_from_dag`] gives them): every version of
/// every slot, or for a chain of more than [`MAX_DETAILED_COLUMNS`] slots
/// one square per slot ([`render_layers_svg`]).
pub fn render_svg(nodes: &[DagNode]) -> String {
    let slots: BTreeSet<&str> = nodes
        .iter()
        .filter(|n| n.chain == ChainId::B)
        .map(|n| n.name.as_str())
        .collect();
    if slots.len() > MAX_DETAILED_COLUMNS {
        return render_layers_svg(nodes);
    }
    render_versions_svg(nodes)
}

// Geometry of the per-layer picture.
const SQ: f64 = 11.0;
const SQ_GAP: f64 = 2.0;
const L_TOP: f64 = 70.0;

/// A large chain as one row per layer and one square per slot (router,
/// shared expert, then each expert), the square standing for the slot's
/// newest version: filled when its payload is held here, ringed when the
/// last answer used it, red when it was refused, with the number of
/// versions in its tooltip. Chain A is a row of model blocks on top. Each
/// square is a `g[data-hash]` of that newest block, so the page contract
/// (data-held, data-used, data-head) holds as in the detailed picture.
pub fn render_layers_svg(nodes: &[DagNode]) -> String {
    let metas: Vec<&DagNode> = nodes
        .iter()
        .filter(|n| n.chain == ChainId::A)
        .take(MAX_META)
        .collect();
    // Newest version per slot (acceptance order) and its version count.
    let mut slots: BTreeMap<ColumnKey, (&DagNode, usize)> = BTreeMap::new();
    for n in nodes.iter().filter(|n| n.chain == ChainId::B) {
        let e = slots.entry(column_key(&n.name)).or_insert((n, 0));
        e.0 = n;
        e.1 += 1;
    }
    let mut rows: BTreeMap<(u8, usize), Vec<(&DagNode, usize)>> = BTreeMap::new();
    for ((kind, layer, _, _), v) in &slots {
        rows.entry((*kind, *layer)).or_default().push(*v);
    }
    let rows: Vec<_> = rows.into_iter().take(MAX_COLUMNS).collect();
    let widest = rows.iter().map(|(_, v)| v.len()).max().unwrap_or(0);
    let width = (LEFT + widest as f64 * (SQ + SQ_GAP) + 20.0)
        .max(LEFT + metas.len() as f64 * A_STEP)
        .max(560.0);
    let legend_y = L_TOP + rows.len() as f64 * (SQ + 4.0) + 12.0;
    let height = legend_y + 40.0;
    let blocks_b = nodes.iter().filter(|n| n.chain == ChainId::B).count();
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"dag layers\" viewBox=\"0 0 {w} {h}\" \
         width=\"{w}\" height=\"{h}\" role=\"img\" aria-label=\"The DAG by layer: one square per slot\" \
         data-blocks=\"{n}\" data-slots=\"{ns}\">",
        w = fmt(width),
        h = fmt(height),
        n = metas.len() + slots.len(),
        ns = slots.len(),
    );
    s.push_str(&format!(
        "<text class=\"row-label\" x=\"4\" y=\"{}\">chain A</text>\
         <text class=\"note\" x=\"{LEFT}\" y=\"{}\">chain B: {blocks_b} blocks in {ns} slots, one square per slot \
         (its newest version), one row per layer: R router, S shared expert, then experts 0, 1, …</text>",
        fmt(A_Y - 12.0),
        fmt(L_TOP - 12.0),
        ns = slots.len(),
    ));
    for (i, m) in metas.iter().enumerate() {
        let cx = LEFT + i as f64 * A_STEP;
        s.push_str(&format!(
            "<g class=\"{cls}\" data-hash=\"{hex}\" data-chain=\"A\" data-held=\"{held}\" data-used=\"false\" \
             data-head=\"{head}\"><title>{t}</title><circle cx=\"{x}\" cy=\"{y}\" r=\"{r}\"/>\
             <text class=\"name\" x=\"{tx}\" y=\"{ty}\">{name}</text></g>",
            cls = node_class(m),
            hex = m.hash.to_hex(),
            held = m.held,
            head = m.head,
            t = escape_html(&format!("chain A: {} ({})", m.name, m.hash.short())),
            x = fmt(cx),
            y = fmt(A_Y),
            r = fmt(R),
            tx = fmt(cx + R + 4.0),
            ty = fmt(A_Y + 4.0),
            name = escape_html(&truncate(&m.name, 20)),
        ));
    }
    for (r, ((kind, layer), cells)) in rows.iter().enumerate() {
        let y = L_TOP + r as f64 * (SQ + 4.0);
        let label = match kind {
            0 => "shared".to_string(),
            1 => format!("layer {layer}"),
            _ => "other".to_string(),
        };
        let held = cells.iter().filter(|(n, _)| n.held).count();
        s.push_str(&format!(
            "<text class=\"group-label\" x=\"4\" y=\"{}\"><title>{label}: {held} of {n} held</title>{label}</text>",
            fmt(y + SQ - 2.0),
            n = cells.len(),
        ));
        for (c, (n, versions)) in cells.iter().enumerate() {
            let x = LEFT + c as f64 * (SQ + SQ_GAP);
            s.push_str(&format!(
                "<g class=\"{cls} sq\" data-hash=\"{hex}\" data-chain=\"B\" data-held=\"{held}\" \
                 data-used=\"{used}\" data-head=\"{head}\"><title>{t}</title>\
                 <rect x=\"{x}\" y=\"{y}\" width=\"{SQ}\" height=\"{SQ}\" rx=\"2\"/></g>",
                cls = node_class(n),
                hex = n.hash.to_hex(),
                held = n.held,
                used = n.used,
                head = n.head,
                t = escape_html(&format!(
                    "{} v{versions} ({}){}{}{}",
                    n.name,
                    n.hash.short(),
                    if n.held {
                        ", held in this browser"
                    } else {
                        ", header only"
                    },
                    if n.used {
                        ", used by the last answer"
                    } else {
                        ""
                    },
                    if n.failed { ", payload refused" } else { "" },
                )),
                x = fmt(x),
                y = fmt(y),
            ));
        }
    }
    let ly = fmt(legend_y + 4.0);
    let lt = fmt(legend_y + 13.0);
    s.push_str(&format!(
        "<g class=\"legend\"><g class=\"node held sq\"><rect x=\"{x0}\" y=\"{ly}\" width=\"{SQ}\" height=\"{SQ}\" rx=\"2\"/></g>\
         <text x=\"{x0t}\" y=\"{lt}\">held here</text>\
         <g class=\"node sq\"><rect x=\"{x1}\" y=\"{ly}\" width=\"{SQ}\" height=\"{SQ}\" rx=\"2\"/></g>\
         <text x=\"{x1t}\" y=\"{lt}\">header only</text>\
         <g class=\"node used sq\"><rect x=\"{x2}\" y=\"{ly}\" width=\"{SQ}\" height=\"{SQ}\" rx=\"2\"/></g>\
         <text x=\"{x2t}\" y=\"{lt}\">used by the last answer</text></g>",
        x0 = fmt(LEFT),
        x0t = fmt(LEFT + 16.0),
        x1 = fmt(LEFT + 90.0),
        x1t = fmt(LEFT + 106.0),
        x2 = fmt(LEFT + 190.0),
        x2t = fmt(LEFT + 206.0),
    ));
    s.push_str("</svg>");
    s
}

fn node_class(n: &DagNode) -> String {
    let mut cls = vec!["node"];
    if n.held {
        cls.push("held");
    }
    if n.used {
        cls.push("used");
    }
    if n.head {
        cls.push("head");
    }
    if n.failed {
        cls.push("failed");
    }
    cls.join(" ")
}

/// Every version of every slot, with parent and meta edges.
fn render_versions_svg(nodes: &[DagNode]) -> String {
    // Chain A: one node per meta block, in the order given.
    let metas: Vec<&DagNode> = nodes
        .iter()
        .filter(|n| n.chain == ChainId::A)
        .take(MAX_META)
        .collect();
    // Chain B: columns by slot name, versions in the order given.
    let mut columns: Columns = BTreeMap::new();
    for n in nodes.iter().filter(|n| n.chain == ChainId::B) {
        columns
            .entry(column_key(&n.name))
            .or_insert_with(|| (n.name.clone(), Vec::new()))
            .1
            .push(n);
    }
    let hidden_cols = columns.len().saturating_sub(MAX_COLUMNS);
    let columns: Vec<_> = columns.into_iter().take(MAX_COLUMNS).collect();

    // Positions.
    let mut pos: HashMap<BlockHash, (f64, f64)> = HashMap::new();
    for (i, m) in metas.iter().enumerate() {
        pos.insert(m.hash, (LEFT + i as f64 * A_STEP, A_Y));
    }
    let mut x = LEFT;
    let mut prev_group: Option<(u8, usize)> = None;
    let mut col_x = Vec::with_capacity(columns.len());
    // Layer groups: (label, first x, last x).
    let mut groups: Vec<(String, f64, f64)> = Vec::new();
    let mut max_rows = 0usize;
    let mut hidden_rows = 0usize;
    for ((kind, layer, _, _), (_, blocks)) in &columns {
        let group = (*kind, *layer);
        if prev_group.is_some() && prev_group != Some(group) {
            x += GAP;
        }
        if *kind == 1 {
            match groups.last_mut() {
                Some(g) if prev_group == Some(group) => g.2 = x,
                _ => groups.push((format!("layer {layer}"), x, x)),
            }
        }
        prev_group = Some(group);
        col_x.push(x);
        for (row, b) in blocks.iter().enumerate().take(MAX_ROWS) {
            pos.insert(b.hash, (x, B_Y + row as f64 * ROW));
        }
        hidden_rows += blocks.len().saturating_sub(MAX_ROWS);
        max_rows = max_rows.max(blocks.len().min(MAX_ROWS));
        x += COL;
    }
    let a_right = LEFT + metas.len().saturating_sub(1) as f64 * A_STEP + A_STEP;
    let width = (x + LEFT / 2.0).max(a_right).max(360.0);
    let legend_y = B_Y + max_rows.max(1) as f64 * ROW + 10.0;
    let height = legend_y + 40.0;

    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"dag\" viewBox=\"0 0 {w} {h}\" \
         width=\"{w}\" height=\"{h}\" role=\"img\" aria-label=\"The DAG: chain A model blocks and \
         chain B parameter blocks\" data-blocks=\"{n}\">",
        w = fmt(width),
        h = fmt(height),
        n = pos.len()
    );
    s.push_str(&format!(
        "<text class=\"row-label\" x=\"4\" y=\"{}\">chain A</text>\
         <text class=\"row-label\" x=\"4\" y=\"{}\">chain B</text>",
        fmt(A_Y + 4.0),
        fmt(B_Y + 4.0)
    ));
    for (label, x0, x1) in &groups {
        s.push_str(&format!(
            "<line class=\"group\" x1=\"{}\" y1=\"{gy}\" x2=\"{}\" y2=\"{gy}\"/>\
             <text class=\"group-label\" x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            fmt(x0 - R),
            fmt(x1 + R),
            fmt((x0 + x1) / 2.0),
            fmt(GROUP_Y - 4.0),
            escape_html(label),
            gy = fmt(GROUP_Y),
        ));
    }
    for (((_, _, _, _), (name, _)), cx) in columns.iter().zip(&col_x) {
        s.push_str(&format!(
            "<text class=\"col-label\" x=\"{}\" y=\"{}\" text-anchor=\"middle\"><title>{t}</title>{}</text>",
            fmt(*cx),
            fmt(LABEL_Y),
            escape_html(&column_label(name)),
            t = escape_html(name),
        ));
    }

    // Edges first, so the nodes cover their ends.
    s.push_str("<g class=\"edges\">");
    let drawn: BTreeSet<BlockHash> = pos.keys().copied().collect();
    for n in nodes.iter().filter(|n| drawn.contains(&n.hash)) {
        let (cx, cy) = pos[&n.hash];
        for p in &n.parents {
            if let Some(&(px, py)) = pos.get(p) {
                s.push_str(&edge("parent", p, &n.hash, (px, py), (cx, cy)));
            }
        }
        // The meta link, drawn where it is not implied by a parent in the
        // same column under the same meta block (a slot's first version).
        if let Some(m) = &n.meta {
            let implied = n.parents.iter().any(|p| {
                nodes
                    .iter()
                    .any(|o| o.hash == *p && o.meta == n.meta && drawn.contains(p))
            });
            if let (false, Some(&(mx, my))) = (implied, pos.get(m)) {
                // Down from the meta block to a bus just above the columns,
                // along it and down into the column: the links of one meta
                // block overlap into one tree instead of crossing the labels.
                let k = metas.iter().position(|x| x.hash == *m).unwrap_or(0) as f64;
                let bus = B_Y - R - 4.0 - 2.0 * k;
                let d = format!(
                    "M{} {}V{}H{}V{}H{}V{}",
                    fmt(mx),
                    fmt(my + R),
                    fmt(A_Y + R + 8.0 + 2.0 * k),
                    fmt(LEFT - 18.0 - 2.0 * k),
                    fmt(bus),
                    fmt(cx),
                    fmt(cy - R)
                );
                s.push_str(&format!(
                    "<path class=\"edge meta\" data-from=\"{}\" data-to=\"{}\" d=\"{d}\"/>",
                    m.to_hex(),
                    n.hash.to_hex()
                ));
            }
        }
    }
    s.push_str("</g>");

    // Nodes.
    let mut version: HashMap<(Option<BlockHash>, &str), usize> = HashMap::new();
    for n in nodes.iter().filter(|n| drawn.contains(&n.hash)) {
        let (cx, cy) = pos[&n.hash];
        let v = version.entry((n.meta, n.name.as_str())).or_insert(0);
        *v += 1;
        let chain = if n.chain == ChainId::A { "A" } else { "B" };
        let state = format!(
            "{}{}{}{}",
            if n.head { ", head" } else { "" },
            if n.held {
                ", held in this browser"
            } else {
                ", header only"
            },
            if n.used {
                ", used by the last answer"
            } else {
                ""
            },
            if n.failed { ", payload refused" } else { "" },
        );
        s.push_str(&format!(
            "<g class=\"{cls}\" data-hash=\"{hex}\" data-chain=\"{chain}\" data-held=\"{held}\" \
             data-used=\"{used}\" data-head=\"{head}\"><title>{title}</title>",
            cls = node_class(n),
            hex = n.hash.to_hex(),
            held = n.held,
            used = n.used,
            head = n.head,
            title = escape_html(&format!(
                "chain {chain}: {} v{v} ({}){state}",
                n.name,
                n.hash.short()
            )),
        ));
        if n.used {
            s.push_str(&format!(
                "<circle class=\"ring\" cx=\"{}\" cy=\"{}\" r=\"{}\"/>",
                fmt(cx),
                fmt(cy),
                fmt(R + 3.5)
            ));
        }
        s.push_str(&format!(
            "<circle cx=\"{}\" cy=\"{}\" r=\"{}\"/><text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{v}</text>",
            fmt(cx),
            fmt(cy),
            fmt(R),
            fmt(cx),
            fmt(cy + 3.0),
        ));
        if n.chain == ChainId::A {
            s.push_str(&format!(
                "<text class=\"name\" x=\"{}\" y=\"{}\">{}</text>",
                fmt(cx + R + 4.0),
                fmt(cy + 4.0),
                escape_html(&truncate(&n.name, 20))
            ));
        }
        s.push_str("</g>");
    }

    // Legend and what was left out.
    let ly = fmt(legend_y + 12.0);
    let lt = fmt(legend_y + 16.0);
    s.push_str(&format!(
        "<g class=\"legend\"><g class=\"node held\"><circle cx=\"{x0}\" cy=\"{ly}\" r=\"6\"/></g>\
         <text x=\"{x0t}\" y=\"{lt}\">held here</text>\
         <g class=\"node\"><circle cx=\"{x1}\" cy=\"{ly}\" r=\"6\"/></g>\
         <text x=\"{x1t}\" y=\"{lt}\">header only</text>\
         <g class=\"node used\"><circle class=\"ring\" cx=\"{x2}\" cy=\"{ly}\" r=\"9\"/><circle cx=\"{x2}\" cy=\"{ly}\" r=\"6\"/></g>\
         <text x=\"{x2t}\" y=\"{lt}\">used by the last answer</text>\
         <g class=\"node head\"><circle cx=\"{x3}\" cy=\"{ly}\" r=\"6\"/></g>\
         <text x=\"{x3t}\" y=\"{lt}\">head (numbers: version)</text></g>",
        x0 = fmt(LEFT),
        x0t = fmt(LEFT + 10.0),
        x1 = fmt(LEFT + 90.0),
        x1t = fmt(LEFT + 100.0),
        x2 = fmt(LEFT + 190.0),
        x2t = fmt(LEFT + 203.0),
        x3 = fmt(LEFT + 360.0),
        x3t = fmt(LEFT + 370.0),
    ));
    let hidden = hidden_cols
        + hidden_rows
        + nodes
            .iter()
            .filter(|n| n.chain == ChainId::A)
            .count()
            .saturating_sub(MAX_META);
    if hidden > 0 {
        s.push_str(&format!(
            "<text class=\"note\" x=\"{}\" y=\"{}\">(+{hidden} blocks or slots not drawn)</text>",
            fmt(LEFT),
            fmt(legend_y + 34.0)
        ));
    }
    s.push_str("</svg>");
    s
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n - 1).collect();
        t.push('…');
        t
    }
}

/// An edge from `from` (a parent) to `to`: a straight line within a row or
/// a column, a curve otherwise.
fn edge(kind: &str, from: &BlockHash, to: &BlockHash, a: (f64, f64), b: (f64, f64)) -> String {
    let d = if (a.1 - b.1).abs() < 0.5 {
        // Same row (chain A): left to right.
        let (l, r) = if a.0 <= b.0 { (a, b) } else { (b, a) };
        format!(
            "M{} {}L{} {}",
            fmt(l.0 + R),
            fmt(l.1),
            fmt(r.0 - R),
            fmt(r.1)
        )
    } else if (a.0 - b.0).abs() < 0.5 {
        format!(
            "M{} {}L{} {}",
            fmt(a.0),
            fmt(a.1 + R),
            fmt(b.0),
            fmt(b.1 - R)
        )
    } else {
        let my = (a.1 + b.1) / 2.0;
        format!(
            "M{} {}C{} {} {} {} {} {}",
            fmt(a.0),
            fmt(a.1 + R),
            fmt(a.0),
            fmt(my),
            fmt(b.0),
            fmt(my),
            fmt(b.0),
            fmt(b.1 - R)
        )
    };
    format!(
        "<path class=\"edge {kind}\" data-from=\"{}\" data-to=\"{}\" d=\"{d}\"/>",
        from.to_hex(),
        to.to_hex()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(i: u8) -> BlockHash {
        BlockHash([i; 32])
    }

    fn node(i: u8, chain: ChainId, name: &str, parents: &[u8], meta: Option<u8>) -> DagNode {
        DagNode {
            hash: h(i),
            chain,
            name: name.into(),
            parents: parents.iter().map(|p| h(*p)).collect(),
            meta: meta.map(h),
            head: false,
            held: false,
            used: false,
            failed: false,
        }
    }

    /// 1 meta, shared, 4 routers, 4×8 experts: the default model.
    fn default_model() -> Vec<DagNode> {
        let mut v = vec![node(1, ChainId::A, "default", &[], None)];
        v.push(node(2, ChainId::B, "shared", &[], Some(1)));
        let mut i = 3u8;
        for l in 0..4 {
            v.push(node(
                i,
                ChainId::B,
                &format!("layer{l}.router"),
                &[],
                Some(1),
            ));
            i += 1;
            for e in 0..8 {
                v.push(node(
                    i,
                    ChainId::B,
                    &format!("layer{l}.expert{e}"),
                    &[],
                    Some(1),
                ));
                i += 1;
            }
        }
        v
    }

    fn count(s: &str, pat: &str) -> usize {
        s.matches(pat).count()
    }

    #[test]
    fn default_model_draws_every_block_and_meta_edge() {
        let nodes = default_model();
        assert_eq!(nodes.len(), 38);
        let svg = render_svg(&nodes);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert_eq!(count(&svg, "<g class=\"node") - 4, 38, "4 in the legend");
        assert_eq!(count(&svg, "data-hash="), 38);
        assert_eq!(count(&svg, "data-chain=\"A\""), 1);
        assert_eq!(count(&svg, "data-chain=\"B\""), 37);
        // Every chain-B block is a slot's first version: one meta edge each.
        assert_eq!(count(&svg, "class=\"edge meta\""), 37);
        assert_eq!(count(&svg, "class=\"edge parent\""), 0);
        assert_eq!(count(&svg, "layer 3</text>"), 1);
        // Columns: shared + 4 × (router + 8 experts), within a page's width.
        assert_eq!(count(&svg, "class=\"col-label\""), 37);
        let w: f64 = svg
            .split("width=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .and_then(|w| w.parse().ok())
            .unwrap();
        assert!(w < 1100.0, "{w}");
    }

    #[test]
    fn versions_stack_with_parent_edges() {
        let mut nodes = default_model();
        // Two new versions of layer0.expert1 (hash 5) and a second meta block.
        nodes.push(node(100, ChainId::B, "layer0.expert1", &[5], Some(1)));
        nodes.push(node(101, ChainId::B, "layer0.expert1", &[100], Some(1)));
        nodes.push(node(102, ChainId::A, "default", &[1], None));
        let svg = render_svg(&nodes);
        assert_eq!(count(&svg, "data-hash="), 41);
        assert_eq!(count(&svg, "class=\"edge parent\""), 3);
        assert_eq!(count(&svg, "class=\"edge meta\""), 37);
        let edge = format!(
            "data-from=\"{}\" data-to=\"{}\"",
            h(100).to_hex(),
            h(101).to_hex()
        );
        assert!(svg.contains(&edge));
        // Stacked: same column, one row lower.
        let nodes_v3 = svg.contains("v3 (");
        assert!(nodes_v3, "third version labelled");
    }

    #[test]
    fn flags_become_attributes() {
        let mut nodes = default_model();
        nodes[0].head = true;
        nodes[0].held = true;
        nodes[5].used = true;
        nodes[5].held = true;
        let svg = render_svg(&nodes);
        assert_eq!(count(&svg, "data-held=\"true\""), 2);
        assert_eq!(count(&svg, "data-used=\"true\""), 1);
        assert_eq!(count(&svg, "data-head=\"true\""), 1);
        assert_eq!(count(&svg, "data-held=\"false\""), 36);
        let g = format!(
            "data-hash=\"{}\" data-chain=\"B\" data-held=\"true\" data-used=\"true\"",
            h(nodes[5].hash.0[0]).to_hex()
        );
        assert!(svg.contains(&g), "{svg}");
    }

    #[test]
    fn text_is_escaped() {
        let nodes = vec![
            node(1, ChainId::A, "<script>alert(1)</script>", &[], None),
            node(2, ChainId::B, "x\"><b>&", &[], Some(1)),
        ];
        let svg = render_svg(&nodes);
        assert!(!svg.contains("<script>"));
        assert!(!svg.contains("<b>"));
        assert!(svg.contains("&lt;script&gt;"));
        assert!(svg.contains("x&quot;&gt;&lt;b&gt;&amp;"));
    }

    #[test]
    fn a_thousand_slots_are_drawn_per_layer() {
        // 16 layers × (router + 64 experts) + shared: 1,041 slots.
        let mut nodes = vec![node(0, ChainId::A, "big", &[], None)];
        let mut i = 0u32;
        let mut push = |name: String, nodes: &mut Vec<DagNode>| {
            i += 1;
            let mut n = node(1, ChainId::B, &name, &[], Some(0));
            n.hash.0[..4].copy_from_slice(&i.to_le_bytes());
            n.held = i.is_multiple_of(3);
            n.used = i.is_multiple_of(7);
            nodes.push(n);
        };
        push("shared".into(), &mut nodes);
        for l in 0..16 {
            push(format!("layer{l}.router"), &mut nodes);
            for e in 0..64 {
                push(format!("layer{l}.expert{e}"), &mut nodes);
            }
        }
        // A second version of one slot: still one square, counted in its title.
        push("layer3.expert5".into(), &mut nodes);
        let svg = render_svg(&nodes);
        assert!(svg.contains("class=\"dag layers\""));
        assert_eq!(count(&svg, "data-chain=\"B\""), 1041);
        assert_eq!(count(&svg, "data-chain=\"A\""), 1);
        assert!(svg.contains("layer3.expert5 v2 ("));
        assert_eq!(count(&svg, "class=\"group-label\""), 17);
        // Readable width: 65 squares a row, not 1,041 columns.
        let w: f64 = svg
            .split("width=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .and_then(|w| w.parse().ok())
            .unwrap();
        assert!(w < 1000.0, "{w}");
        let held = nodes
            .iter()
            .filter(|n| n.held && n.chain == ChainId::B)
            .count();
        // The newest version stands for its slot: one replaced square.
        assert!(count(&svg, "data-held=\"true\"").abs_diff(held) <= 1);
    }

    #[test]
    fn empty_and_huge() {
        let svg = render_svg(&[]);
        assert!(svg.contains("data-blocks=\"0\""));
        let mut nodes = vec![node(0, ChainId::A, "m", &[], None)];
        for i in 0..(MAX_ROWS as u16 + 5) {
            let mut n = node(1, ChainId::B, "shared", &[], Some(0));
            n.hash = BlockHash([(i % 256) as u8; 32]);
            n.hash.0[1] = (i / 256) as u8 + 1;
            nodes.push(n);
        }
        let svg = render_svg(&nodes);
        assert_eq!(count(&svg, "data-hash="), 1 + MAX_ROWS);
        assert!(svg.contains("(+5 blocks or slots not drawn)"));
    }
}
