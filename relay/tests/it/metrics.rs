//! `GET /metrics` of the real `relay` binary (the recorder is process-wide:
//! only the binary installs it), read with a strict parser of the Prometheus
//! text format (0.0.4): a chat, chunks a peer gets from the relay's store and
//! from another peer, accepted and refused uploads, each moving its counters;
//! and `--metrics-addr`, which moves the scrape to a listener of its own.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::ws::{announce, fetch_chunk, login_as, serve_chunks};
use crate::common::*;
use web_node::chain::BlockHash;
use web_node::model::Slot;
use web_node::net::api::{codes, ApiError, BlockInfo};
use web_node::net::peer::ChunkSource;

// ---------------------------------------------------------------------------
// A strict parser of the text exposition format, version 0.0.4
// (https://prometheus.io/docs/instrumenting/exposition_formats/): every line
// is a HELP, a TYPE, another comment, empty, or a sample, each checked
// against the grammar; a family's TYPE and HELP come once and before its
// samples, a family's lines are contiguous, no series repeats, and each
// histogram's buckets are cumulative, end at +Inf and agree with _count.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
    Summary,
    Untyped,
}

#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

#[derive(Debug)]
struct Family {
    name: String,
    kind: Kind,
    typed: bool,
    help: Option<String>,
    samples: Vec<Sample>,
}

#[derive(Debug, Default)]
struct Exposition {
    families: Vec<Family>,
}

fn is_metric_name(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(f) if f.is_ascii_alphabetic() || f == '_' || f == ':')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_' || x == ':')
}

fn is_label_name(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(f) if f.is_ascii_alphabetic() || f == '_')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
        && !s.starts_with("__")
}

/// A sample value or `le` bound: Go float syntax as Prometheus writes it.
fn parse_float(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" | "Inf" => return Ok(f64::INFINITY),
        "-Inf" => return Ok(f64::NEG_INFINITY),
        "NaN" => return Ok(f64::NAN),
        _ => {}
    }
    let body = s.strip_prefix(['+', '-']).unwrap_or(s);
    let (mantissa, exp) = match body.find(['e', 'E']) {
        Some(i) => (&body[..i], Some(&body[i + 1..])),
        None => (body, None),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = |d: &str| d.chars().all(|c| c.is_ascii_digit());
    let ok_mantissa = digits(int) && digits(frac) && !(int.is_empty() && frac.is_empty());
    let ok_exp = exp.is_none_or(|e| {
        let e = e.strip_prefix(['+', '-']).unwrap_or(e);
        !e.is_empty() && digits(e)
    });
    if !(ok_mantissa && ok_exp) {
        return Err(format!("{s:?} is not a float"));
    }
    s.parse::<f64>().map_err(|e| format!("{s:?}: {e}"))
}

/// A HELP docstring: only `\\` and `\n` escapes.
fn unescape_help(s: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut c = s.chars();
    while let Some(x) = c.next() {
        if x != '\\' {
            out.push(x);
            continue;
        }
        match c.next() {
            Some('\\') => out.push('\\'),
            Some('n') => out.push('\n'),
            other => return Err(format!("bad escape \\{other:?} in HELP {s:?}")),
        }
    }
    Ok(out)
}

fn skip_blanks(s: &str) -> &str {
    s.trim_start_matches([' ', '\t'])
}

/// `{name="value",...}` (the text after the metric name, starting at `{`):
/// the labels and what follows the closing brace.
fn parse_labels(s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let mut rest = skip_blanks(&s[1..]);
    loop {
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((labels, r));
        }
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .ok_or("unterminated label set")?;
        let name = &rest[..end];
        if !is_label_name(name) {
            return Err(format!("bad label name {name:?}"));
        }
        rest = skip_blanks(&rest[end..]);
        rest = skip_blanks(
            rest.strip_prefix('=')
                .ok_or("expected '=' after a label name")?,
        );
        rest = rest
            .strip_prefix('"')
            .ok_or("a label value must be quoted")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let close = loop {
            match chars.next() {
                None => return Err("unterminated label value".into()),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => return Err(format!("bad escape in a label value: {other:?}")),
                },
                Some((_, c)) => value.push(c),
            }
        };
        rest = skip_blanks(&rest[close + 1..]);
        if labels.insert(name.to_string(), value).is_some() {
            return Err(format!("label {name:?} twice"));
        }
        if let Some(r) = rest.strip_prefix(',') {
            rest = skip_blanks(r);
        } else if !rest.starts_with('}') {
            return Err(format!("expected ',' or '}}' at {rest:?}"));
        }
    }
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let end = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(line.len());
    let name = &line[..end];
    if !is_metric_name(name) {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut rest = &line[end..];
    let mut labels = BTreeMap::new();
    if skip_blanks(rest).starts_with('{') {
        let (l, r) = parse_labels(skip_blanks(rest))?;
        labels = l;
        rest = r;
    }
    if !rest.starts_with([' ', '\t']) {
        return Err("expected a blank before the value".into());
    }
    let fields: Vec<&str> = rest.split([' ', '\t']).filter(|f| !f.is_empty()).collect();
    let value = match fields.as_slice() {
        [v] => parse_float(v)?,
        [v, ts] => {
            ts.parse::<i64>()
                .map_err(|_| format!("bad timestamp {ts:?}"))?;
            parse_float(v)?
        }
        _ => {
            return Err(format!(
                "expected a value and an optional timestamp: {rest:?}"
            ))
        }
    };
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// Whether sample `name` belongs to family `fam` of `kind`.
fn belongs(fam: &str, kind: Kind, name: &str) -> bool {
    let suffix = |s: &str| name.strip_prefix(fam) == Some(s);
    match kind {
        Kind::Histogram => suffix("_bucket") || suffix("_sum") || suffix("_count"),
        Kind::Summary => name == fam || suffix("_sum") || suffix("_count"),
        _ => name == fam,
    }
}

fn parse_exposition(text: &str) -> Result<Exposition, String> {
    if !text.is_empty() && !text.ends_with('\n') {
        return Err("the exposition must end with a newline".into());
    }
    let mut out = Exposition::default();
    // Family names already closed (another family came after them).
    let mut closed: Vec<String> = Vec::new();
    let mut series: HashSet<(String, BTreeMap<String, String>)> = HashSet::new();
    let mut open_family = |out: &mut Exposition, name: &str| -> Result<(), String> {
        if out.families.last().is_some_and(|f| f.name == name) {
            return Ok(());
        }
        if closed.iter().any(|c| c == name) || out.families.iter().any(|f| f.name == name) {
            return Err(format!("the lines of family {name} are not contiguous"));
        }
        if let Some(f) = out.families.last() {
            closed.push(f.name.clone());
        }
        out.families.push(Family {
            name: name.to_string(),
            kind: Kind::Untyped,
            typed: false,
            help: None,
            samples: Vec::new(),
        });
        Ok(())
    };
    let body = text.strip_suffix('\n').unwrap_or(text);
    for (n, line) in body.split('\n').enumerate() {
        let at = |e: String| format!("line {}: {e}: {line:?}", n + 1);
        if line.contains('\r') {
            return Err(at("carriage return".into()));
        }
        if line.trim().is_empty() {
            continue;
        }
        if let Some(c) = line.strip_prefix('#') {
            let c = skip_blanks(c);
            let (word, rest) = c.split_once([' ', '\t']).unwrap_or((c, ""));
            if word != "HELP" && word != "TYPE" {
                continue; // a comment
            }
            let rest = skip_blanks(rest);
            let (name, arg) = rest.split_once([' ', '\t']).unwrap_or((rest, ""));
            if !is_metric_name(name) {
                return Err(at(format!("bad metric name {name:?} in {word}")));
            }
            open_family(&mut out, name).map_err(at)?;
            let f = out
                .families
                .last_mut()
                .ok_or_else(|| at("no family".into()))?;
            if word == "HELP" {
                if f.help.is_some() {
                    return Err(at("second HELP".into()));
                }
                f.help = Some(unescape_help(arg).map_err(at)?);
            } else {
                if f.typed {
                    return Err(at("second TYPE".into()));
                }
                if !f.samples.is_empty() {
                    return Err(at("TYPE after the family's samples".into()));
                }
                f.kind = match arg.trim_end_matches([' ', '\t']) {
                    "counter" => Kind::Counter,
                    "gauge" => Kind::Gauge,
                    "histogram" => Kind::Histogram,
                    "summary" => Kind::Summary,
                    "untyped" => Kind::Untyped,
                    t => return Err(at(format!("unknown type {t:?}"))),
                };
                f.typed = true;
            }
            continue;
        }
        let s = parse_sample(line).map_err(at)?;
        let current = out
            .families
            .last()
            .filter(|f| belongs(&f.name, f.kind, &s.name))
            .map(|f| f.name.clone());
        match current {
            Some(_) => {}
            None => open_family(&mut out, &s.name).map_err(at)?,
        }
        let f = out
            .families
            .last_mut()
            .ok_or_else(|| at("no family".into()))?;
        match f.kind {
            Kind::Histogram => {
                let bucket = s.name.ends_with("_bucket");
                if bucket != s.labels.contains_key("le") {
                    return Err(at("`le` belongs on _bucket samples, and only there".into()));
                }
                if let Some(le) = s.labels.get("le") {
                    parse_float(le).map_err(at)?;
                }
            }
            Kind::Summary => {
                let q = s.name == f.name;
                if q != s.labels.contains_key("quantile") {
                    return Err(at("`quantile` belongs on quantile samples only".into()));
                }
            }
            Kind::Counter if s.value.is_nan() || s.value < 0.0 => {
                return Err(at("a counter below zero".into()));
            }
            _ => {}
        }
        if !series.insert((s.name.clone(), s.labels.clone())) {
            return Err(at("the same series twice".into()));
        }
        f.samples.push(s);
    }
    for f in &out.families {
        if f.kind == Kind::Histogram {
            check_histogram(f)?;
        }
    }
    Ok(out)
}

/// Buckets cumulative and ending at +Inf, whose count is `_count`; `_sum` present.
fn check_histogram(f: &Family) -> Result<(), String> {
    /// A series' labels without `le`.
    type Group = BTreeMap<String, String>;
    let mut buckets: BTreeMap<Group, Vec<(f64, f64)>> = BTreeMap::new();
    let mut sums: BTreeMap<Group, f64> = BTreeMap::new();
    let mut counts: BTreeMap<Group, f64> = BTreeMap::new();
    let key = |l: &Group| -> Group {
        let mut g = l.clone();
        g.remove("le");
        g
    };
    for s in &f.samples {
        let k = key(&s.labels);
        if s.name.ends_with("_bucket") {
            let le = parse_float(&s.labels["le"])?;
            buckets.entry(k).or_default().push((le, s.value));
        } else if s.name.ends_with("_sum") {
            sums.insert(k, s.value);
        } else {
            counts.insert(k, s.value);
        }
    }
    let groups: std::collections::BTreeSet<_> = buckets
        .keys()
        .chain(sums.keys())
        .chain(counts.keys())
        .cloned()
        .collect();
    for g in groups {
        let mut b = buckets
            .get(&g)
            .cloned()
            .ok_or_else(|| format!("{}{g:?}: no buckets", f.name))?;
        b.sort_by(|x, y| x.0.total_cmp(&y.0));
        if b.windows(2).any(|w| w[0].0 == w[1].0 || w[1].1 < w[0].1) {
            return Err(format!("{}{g:?}: buckets not cumulative: {b:?}", f.name));
        }
        let last = b.last().copied().unwrap_or((0.0, 0.0));
        if last.0 != f64::INFINITY {
            return Err(format!("{}{g:?}: no +Inf bucket", f.name));
        }
        let count = counts
            .get(&g)
            .ok_or_else(|| format!("{}{g:?}: no _count", f.name))?;
        if *count != last.1 {
            return Err(format!(
                "{}{g:?}: _count {count} is not the +Inf bucket {}",
                f.name, last.1
            ));
        }
        if !sums.contains_key(&g) {
            return Err(format!("{}{g:?}: no _sum", f.name));
        }
    }
    Ok(())
}

impl Exposition {
    fn family(&self, name: &str) -> Option<&Family> {
        self.families.iter().find(|f| f.name == name)
    }

    /// The sum of the samples named `name` that carry every label of `labels`
    /// (0 when there is none: a counter not incremented yet).
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.families
            .iter()
            .flat_map(|f| &f.samples)
            .filter(|s| s.name == name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .sum()
    }
}

// ---------------------------------------------------------------------------

/// Fetch and strictly parse `{base}/metrics`; also checks the relay's own
/// conventions (every family typed and described, names prefixed, counters
/// ending in `_total`).
fn scrape(base: &str) -> Exposition {
    let r = get(&format!("{base}/metrics"));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(
        r.content_type.starts_with("text/plain; version=0.0.4"),
        "{}",
        r.content_type
    );
    let text = String::from_utf8(r.body).unwrap();
    let e = parse_exposition(&text).unwrap_or_else(|err| panic!("{err}\n{text}"));
    for f in &e.families {
        assert!(f.typed && f.help.is_some(), "{} lacks TYPE or HELP", f.name);
        assert!(f.name.starts_with("aiblock_"), "{}", f.name);
        if f.kind == Kind::Counter {
            assert!(f.name.ends_with("_total"), "{}", f.name);
        }
    }
    e
}

/// `after - before` of one series.
fn moved(before: &Exposition, after: &Exposition, name: &str, labels: &[(&str, &str)]) -> f64 {
    after.get(name, labels) - before.get(name, labels)
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn head(url: &str, name: &str) -> BlockInfo {
    list(url, "B")
        .into_iter()
        .find(|b| b.name == name && b.is_head)
        .unwrap_or_else(|| panic!("no head for {name}"))
}

#[test]
fn counters_move_with_chat_peer_transfers_and_uploads() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir(tmp.path());
    let relay = ChildRelay::start(&tmp.path().join("data"), &model, &tmp.path().join("web"));
    exercise(&relay.url, &relay.url);
}

/// Chat, peer transfers and uploads on the relay at `url`; the counters
/// they move, scraped from `metrics`.
fn exercise(url: &str, metrics: &str) {
    let url = url.to_string();
    let block = head(&url, "layer0.expert0");
    let cs = block.chunk_size as usize;
    let before = scrape(metrics);

    // A REST payload read: bytes from the store.
    let payload = get(&format!("{url}/blocks/{}/payload", block.hash));
    assert_eq!(payload.status, 200);
    let payload = payload.body;
    let chunk0 = payload[..cs.min(payload.len())].to_vec();

    // A chat.
    let r = post_json(
        &format!("{url}/chat"),
        br#"{"prompt":"Q: 1+1=? A:","max_tokens":4}"#,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let chat: serde_json::Value = r.json();
    let tokens = chat["tokens"].as_array().unwrap().len();
    assert!((1..=4).contains(&tokens), "{chat}");

    // Peers: B gets chunk 0 from the relay's store (nobody holds it), then
    // from A once A holds the block.
    let (ka, kb) = (miner_key(21), miner_key(22));
    let id_a = ka.verifying_key().to_bytes();
    let addr = url.trim_start_matches("http://").to_string();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let during = rt.block_on(async {
        let mut wa = login_as(&addr, &ka).await;
        let mut wb = login_as(&addr, &kb).await;
        let (data, from) = fetch_chunk(&mut wb, 1, block.hash, 0).await.unwrap();
        assert_eq!(
            (data.as_slice(), from),
            (chunk0.as_slice(), ChunkSource::Relay)
        );
        announce(&mut wa, 0, false, vec![block.hash]).await;
        let (u, h) = (url.clone(), block.hash);
        tokio::task::spawn_blocking(move || wait_for("A's Have", || holds(&u, &id_a, &h)))
            .await
            .unwrap();
        let served = tokio::spawn(serve_chunks(wa, payload.clone().into(), cs, false));
        let (data, from) = fetch_chunk(&mut wb, 2, block.hash, 0).await.unwrap();
        assert_eq!(
            (data.as_slice(), from),
            (chunk0.as_slice(), ChunkSource::Peer(id_a))
        );
        let u = metrics.to_string();
        let during = tokio::task::spawn_blocking(move || scrape(&u))
            .await
            .unwrap();
        drop(wb);
        served.abort();
        during
    });
    drop(rt);
    assert_eq!(during.get("aiblock_ws_peers", &[]), 2.0);
    assert_eq!(during.get("aiblock_ws_connections", &[]), 2.0);
    wait_for("the peers to be gone from the gauges", || {
        let m = scrape(metrics);
        m.get("aiblock_ws_peers", &[]) == 0.0 && m.get("aiblock_ws_connections", &[]) == 0.0
    });

    // Uploads: one accepted, one with a broken signature refused.
    let cfg = test_config();
    let meta = list(&url, "A")[0].hash;
    let slot = Slot::Expert {
        layer: 1,
        expert: 2,
    };
    let parent = head(&url, &slot.to_string()).hash;
    let p = slot_payload(&cfg, slot, 77);
    let (up, _) = upload(slot, &p, vec![parent], Some(meta), &miner_key(9));
    let ok = post_json(&format!("{url}/upload_moe_experts"), &seed_json(&up));
    assert_eq!(ok.status, 201, "{}", String::from_utf8_lossy(&ok.body));
    let accepted: BlockInfo = ok.json();
    let p2 = slot_payload(&cfg, slot, 78);
    let (mut bad, _) = upload(slot, &p2, vec![accepted.hash], Some(meta), &miner_key(9));
    let flipped = if bad.payload_sig.starts_with('0') {
        "1"
    } else {
        "0"
    };
    bad.payload_sig.replace_range(0..1, flipped);
    let refused = post_json(&format!("{url}/upload_moe_experts"), &seed_json(&bad));
    let e: ApiError = refused.json();
    assert_eq!(e.code, codes::BAD_SIGNATURE, "{e:?}");
    let refused_status = refused.status.to_string();
    // An unmatched path: the "static" route.
    assert_eq!(get(&format!("{url}/no/such/page")).status, 404);

    let after = scrape(metrics);
    let m = |name: &str, labels: &[(&str, &str)]| moved(&before, &after, name, labels);
    // Chat.
    let local = [("mode", "local")];
    assert_eq!(
        m(
            "aiblock_chat_requests_total",
            &[("mode", "local"), ("outcome", "ok")]
        ),
        1.0
    );
    assert_eq!(m("aiblock_chat_tokens_total", &local), tokens as f64);
    assert_eq!(
        m("aiblock_chat_generation_duration_seconds_count", &local),
        1.0
    );
    assert!(m("aiblock_chat_generation_duration_seconds_sum", &local) > 0.0);
    // Chunks: one from the store to B plus the REST read; one from A.
    let store = [("path", "store")];
    let peer = [("path", "peer")];
    assert_eq!(
        m("aiblock_chunk_bytes_total", &store),
        (payload.len() + chunk0.len()) as f64
    );
    assert_eq!(m("aiblock_chunks_total", &store), 1.0);
    assert_eq!(m("aiblock_chunk_bytes_total", &peer), chunk0.len() as f64);
    assert_eq!(m("aiblock_chunks_total", &peer), 1.0);
    assert_eq!(m("aiblock_bad_chunks_total", &[]), 0.0);
    // Uploads.
    let json_route = ("route", "upload_moe_experts");
    assert_eq!(m("aiblock_uploads_accepted_total", &[json_route]), 1.0);
    assert_eq!(
        m(
            "aiblock_uploads_refused_total",
            &[json_route, ("reason", "bad_signature")]
        ),
        1.0
    );
    assert_eq!(m("aiblock_uploads_refused_total", &[]), 1.0);
    // HTTP, by route pattern.
    let http = "aiblock_http_requests_total";
    let post = ("method", "POST");
    assert_eq!(m(http, &[("route", "/chat"), post, ("status", "200")]), 1.0);
    assert_eq!(
        m(
            "aiblock_http_request_duration_seconds_count",
            &[("route", "/chat"), post]
        ),
        1.0
    );
    let upload_route = ("route", "/upload_moe_experts");
    assert_eq!(m(http, &[upload_route, post, ("status", "201")]), 1.0);
    assert_eq!(
        m(http, &[upload_route, post, ("status", &refused_status)]),
        1.0
    );
    assert_eq!(
        m(
            http,
            &[
                ("route", "/blocks/{hash}/payload"),
                ("method", "GET"),
                ("status", "200")
            ]
        ),
        1.0
    );
    assert_eq!(m(http, &[("route", "/ws"), ("status", "101")]), 2.0);
    assert!(m(http, &[("route", "static"), ("status", "404")]) >= 1.0);
    // Every family the spec names that has moved is there, typed.
    for (name, kind) in [
        ("aiblock_http_requests_total", Kind::Counter),
        ("aiblock_http_request_duration_seconds", Kind::Histogram),
        ("aiblock_chat_generation_duration_seconds", Kind::Histogram),
        ("aiblock_ws_peers", Kind::Gauge),
        ("aiblock_chunk_bytes_total", Kind::Counter),
        ("aiblock_uploads_refused_total", Kind::Counter),
    ] {
        assert_eq!(after.family(name).map(|f| f.kind), Some(kind), "{name}");
    }
}

/// Whether `/p2p/nodes` lists peer `id` as holding `block`.
fn holds(url: &str, id: &[u8; 32], block: &BlockHash) -> bool {
    let nodes: serde_json::Value = get(&format!("{url}/p2p/nodes")).json();
    let (id, block) = (hex::encode(id), block.to_hex());
    nodes["nodes"].as_array().is_some_and(|ns| {
        ns.iter().any(|n| {
            n["node_id"] == id.as_str()
                && n["blocks"]
                    .as_array()
                    .is_some_and(|b| b.iter().any(|h| h == block.as_str()))
        })
    })
}

#[test]
fn metrics_addr_moves_the_scrape_off_the_main_address() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir(tmp.path());
    let (relay, metrics) = ChildRelay::start_metrics_listener(
        &tmp.path().join("data"),
        &model,
        Path::new("dist-none"),
        &[],
    );
    assert_ne!(relay.url, metrics);
    assert_eq!(get(&format!("{}/heads", relay.url)).status, 200);
    assert_eq!(get(&format!("{}/metrics", relay.url)).status, 404);
    let m = scrape(&metrics);
    assert!(
        m.get(
            "aiblock_http_requests_total",
            &[("route", "/heads"), ("method", "GET"), ("status", "200")]
        ) >= 1.0
    );
}

// ---------------------------------------------------------------------------
// The parser itself: what it accepts and what it refuses.

const GOOD: &str = r#"# HELP a_total Things, with a \\ and a \n in the help.
# TYPE a_total counter
a_total{path="x\"y\\z\nw",b="2"} 3
a_total 1.5e3 1700000000000
# a comment
# TYPE g gauge
g -Inf
g{x=""} NaN
# HELP h_seconds Latency.
# TYPE h_seconds histogram
h_seconds_bucket{r="/",le="0.5"} 1
h_seconds_bucket{r="/",le="+Inf"} 2
h_seconds_sum{r="/"} 0.75
h_seconds_count{r="/"} 2
"#;

#[test]
fn the_parser_reads_a_valid_exposition() {
    let e = parse_exposition(GOOD).unwrap();
    assert_eq!(e.families.len(), 3);
    assert_eq!(e.get("a_total", &[("path", "x\"y\\z\nw")]), 3.0);
    assert_eq!(e.get("a_total", &[]), 1503.0);
    assert_eq!(
        e.family("a_total").unwrap().help.as_deref(),
        Some("Things, with a \\ and a \n in the help.")
    );
    assert_eq!(e.family("h_seconds").unwrap().kind, Kind::Histogram);
    assert_eq!(e.get("h_seconds_count", &[("r", "/")]), 2.0);
}

#[test]
fn the_parser_refuses_malformed_lines() {
    let h = "# TYPE h histogram\n";
    for bad in [
        "a 1",                                  // no final newline
        "1a 1\n",                               // name
        "a-b 1\n",                              // name
        "a{1b=\"x\"} 1\n",                      // label name
        "a{__x=\"x\"} 1\n",                     // reserved label name
        "a{b=x} 1\n",                           // unquoted value
        "a{b=\"x} 1\n",                         // unterminated value
        "a{b=\"\\x\"} 1\n",                     // bad escape
        "a{b=\"x\" c=\"y\"} 1\n",               // missing comma
        "a{b=\"x\",b=\"y\"} 1\n",               // label twice
        "a{b=\"x\"}1\n",                        // no blank before the value
        "a\n",                                  // no value
        "a 1,5\n",                              // value
        "a 0x10\n",                             // value
        "a 1 2 3\n",                            // trailing field
        "a 1 1.5\n",                            // timestamp
        "a 1\na 2\n",                           // series twice
        "a 1\nb 1\na 2\n",                      // family not contiguous
        "a 1\n# TYPE a counter\n",              // TYPE after samples
        "# TYPE a counter\n# TYPE a counter\n", // TYPE twice
        "# TYPE a counters\n",                  // unknown type
        "# HELP a x\n# HELP a y\n",             // HELP twice
        "# HELP a bad \\t escape\n",            // HELP escape
        "# TYPE a counter\na -1\n",             // counter below zero
        "a 1\r\n",                              // carriage return
    ] {
        assert!(parse_exposition(bad).is_err(), "accepted {bad:?}");
    }
    for bad_histogram in [
        "h_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n", // no +Inf
        "h_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n", // not cumulative
        "h_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 3\n", // count differs
        "h_bucket{le=\"+Inf\"} 2\nh_count 2\n",       // no sum
        "h_bucket{le=\"x\"} 2\nh_sum 1\nh_count 2\n", // le not a float
        "h_bucket 2\nh_sum 1\nh_count 2\n",           // no le
        "h_sum{le=\"1\"} 1\n",                        // le off a bucket
        "h 1\n",                                      // bare name
    ] {
        let text = format!("{h}{bad_histogram}");
        assert!(parse_exposition(&text).is_err(), "accepted {text:?}");
    }
}
