//! Distributed decode beside local decode, in one run: a relay on
//! 127.0.0.1:0 serving the default model, two in-process compute peers on
//! loopback (layers split between them, as the seed's node1/node2), then the
//! same greedy requests through `POST /chat` and `POST /chat/distributed`
//! (`local_fallback: false`, so every expert runs on a peer).
//!
//! ```text
//! cargo run --release -p relay --example chat_bench -- [--runs 5] [--max-tokens 64] [--top-k 2]
//! ```
//!
//! Prints the relay's decode tokens/s (from the answers' timings) and the
//! client's end-to-end tokens/s for both, and checks the tokens are equal.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/it/compute_peer/mod.rs"]
mod compute_peer;

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use ed25519_dalek::SigningKey;
use relay::chat::{ChatOptions, ChatRuntime};
use relay::compute::ExpertCompute as _;
use relay::server::limits::Rate;
use relay::server::ServeConfig;
use test_support::relay::TestRelay;
use web_node::model::Config;
use web_node::net::chat::{ChatResponse, RELAY};

/// Prompts to pick from (the longest answer is measured).
/// The default model answers `Q: ... A:` skill prompts (models/default/README.md).
const PROMPTS: [&str; 5] = [
    "Explain quantum computing",
    "Q: reverse cat sun dog bird fish A:",
    "Q: sort 9 3 7 1 5 8 2 A:",
    "Q: copy the quick brown fox jumps A:",
    "Q: 38+45=? A:",
];

struct Args {
    runs: usize,
    max_tokens: usize,
    top_k: usize,
}

fn args() -> Result<Args> {
    let mut a = Args {
        runs: 5,
        max_tokens: 64,
        top_k: 2,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--runs" => a.runs = v.parse()?,
            "--max-tokens" => a.max_tokens = v.parse()?,
            "--top-k" => a.top_k = v.parse()?,
            _ => bail!("unknown flag {flag} (--runs, --max-tokens, --top-k)"),
        }
    }
    Ok(a)
}

fn post(url: &str, body: &str) -> Result<(ChatResponse, f64)> {
    let t = Instant::now();
    let r = match ureq::post(url)
        .set("content-type", "application/json")
        .send_string(body)
    {
        Ok(r) => r,
        Err(ureq::Error::Status(code, r)) => {
            bail!("POST {url}: {code} {}", r.into_string().unwrap_or_default())
        }
        Err(e) => bail!("POST {url}: {e}"),
    };
    let a: ChatResponse = serde_json::from_reader(r.into_reader())?;
    Ok((a, t.elapsed().as_secs_f64()))
}

struct Stats {
    decode_tps: Vec<f64>,
    wall_tps: Vec<f64>,
}

impl Stats {
    fn line(&self, name: &str) -> String {
        let med = |v: &[f64]| {
            let mut v = v.to_vec();
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied().unwrap_or(0.0)
        };
        format!(
            "{name:<22} decode {:>8.1} tokens/s (relay timings, median of {})   end to end {:>8.1} tokens/s",
            med(&self.decode_tps),
            self.decode_tps.len(),
            med(&self.wall_tps)
        )
    }
}

fn main() -> Result<()> {
    let a = args()?;
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let tmp = tempfile::tempdir()?;
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/default");
    let model = tmp.path().join("model");
    std::fs::create_dir_all(&model)?;
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(src.join(f), model.join(f)).with_context(|| format!("copying {f}"))?;
    }
    let cfg = Config::from_json(&std::fs::read(model.join("config.json"))?)?;
    // The relay: `test_support`'s, in process, through the production
    // accept loop, on a runtime of its own.
    let served = TestRelay::start_cfg(
        ServeConfig {
            data_dir: tmp.path().join("data"),
            web_dir: None,
            model_dir: Some(model),
            database: None,
        },
        |mut s| {
            s.chat = ChatRuntime::new(ChatOptions::default().ip_rate(Rate {
                burst: 1_000_000,
                per_minute: 1_000_000,
            }));
            s
        },
        relay::ServeOptions::default(),
    );
    let state = served.state.clone();
    let addr = served.addr();
    let url = served.url.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;

    // Two compute peers, each holding half of the layers' experts.
    let layers = cfg.num_hidden_layers;
    let half = layers.div_ceil(2);
    let mut peers = Vec::new();
    for (key, range) in [(61u8, 0..half), (62u8, half..layers)] {
        let held = compute_peer::expert_weights(&url, &cfg, range);
        peers.push(rt.block_on(compute_peer::start(
            &addr,
            SigningKey::from_bytes(&[key; 32]),
            held,
            compute_peer::Behaviour::Answer,
        )));
    }
    let t = Instant::now();
    while state.peers.compute_peers() < peers.len() {
        if t.elapsed().as_secs() > 30 {
            bail!("the compute peers did not register");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }

    let (local_url, dist_url) = (format!("{url}/chat"), format!("{url}/chat/distributed"));
    let body_of = |prompt: &str| {
        format!(
            r#"{{"prompt": {}, "top_k_experts": {}, "max_tokens": {}}}"#,
            serde_json::Value::from(prompt),
            a.top_k,
            a.max_tokens
        )
    };
    // The prompt of these that the model answers longest (it may stop at
    // EOS early); this also warms up (model build, expert loads).
    let mut best: Option<(ChatResponse, String)> = None;
    for prompt in PROMPTS {
        let body = body_of(prompt);
        let (r, _) = post(&local_url, &body)?;
        if best
            .as_ref()
            .is_none_or(|(b, _)| r.tokens.len() > b.tokens.len())
        {
            best = Some((r, body));
        }
    }
    let (want, body) = best.context("no prompt")?;
    let dist_body = body.replacen('{', r#"{"local_fallback": false, "#, 1);
    let (got, _) = post(&dist_url, &dist_body)?;
    if got.tokens != want.tokens {
        bail!("distributed tokens differ from local ones");
    }
    if got
        .computed_by
        .as_deref()
        .unwrap_or_default()
        .iter()
        .any(|c| c.by == RELAY)
    {
        bail!("the relay computed an expert although the peers serve all of them");
    }
    let mut local = Stats {
        decode_tps: vec![],
        wall_tps: vec![],
    };
    let mut dist = Stats {
        decode_tps: vec![],
        wall_tps: vec![],
    };
    for _ in 0..a.runs {
        for (u, b, s) in [
            (&local_url, &body, &mut local),
            (&dist_url, &dist_body, &mut dist),
        ] {
            let (r, wall) = post(u, b)?;
            if r.tokens != want.tokens {
                bail!("tokens changed between runs");
            }
            s.decode_tps.push(r.timings.decode_tokens_per_s);
            s.wall_tps.push(r.tokens.len() as f64 / wall);
        }
    }
    let calls: u64 = got
        .computed_by
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(|c| c.calls)
        .sum();
    println!(
        "chat bench: default model ({layers} layers, {} experts, hidden {}), top-k {}, {} tokens, \
         {} compute peers on loopback ({} expert computations per distributed answer)",
        cfg.num_local_experts,
        cfg.hidden_size,
        a.top_k,
        want.tokens.len(),
        peers.len(),
        calls
    );
    println!("{}", local.line("local /chat"));
    println!("{}", dist.line("/chat/distributed"));
    println!("greedy tokens equal: yes");
    Ok(())
}
