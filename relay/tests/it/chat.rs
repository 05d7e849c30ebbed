//! `POST /chat` and `POST /chat/distributed` on a real relay (127.0.0.1:0)
//! serving the default model: the seed's curl bodies, answers equal to the
//! native CPU engine run on the model directory, server-sent events, bad
//! bodies, the concurrency cap, and distributed inference on compute peers
//! (raw WebSocket clients speaking `web_node::net::peer`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use crate::common::*;
use crate::compute_peer::{Behaviour, ComputePeer};
use ed25519_dalek::SigningKey;
use relay::chat::{ChatOptions, ChatRuntime};
use relay::compute::ExpertCompute as _;
use web_node::model::generate::{generate, Generation};
use web_node::model::load::ModelDir;
use web_node::model::reference::CpuModel;
use web_node::model::sampler::Sampler;
use web_node::model::RunOptions;
use web_node::net::api::codes;
use web_node::net::chat::{ChatResponse, TokenEvent, EVENT_DONE, EVENT_TOKEN, RELAY};

/// The seed README's three inference bodies, byte for byte.
const SEED_STANDARD: &str = r#"{"prompt": "Explain quantum computing", "use_moe": false}"#;
const SEED_MOE: &str =
    r#"{"prompt": "Explain quantum computing", "use_moe": true, "top_k_experts": 2}"#;
const SEED_DISTRIBUTED: &str = r#"{"prompt": "Explain quantum computing", "top_k_experts": 3}"#;
/// The relay's default `max_tokens` (the seed's bodies give none).
const SEED_MAX_TOKENS: usize = relay::chat::DEFAULT_MAX_TOKENS;

struct Env {
    _tmp: tempfile::TempDir,
    relay: TestRelay,
    /// The model the relay's genesis was made from (a copy of models/default).
    dir: ModelDir,
}

impl Env {
    fn url(&self) -> &str {
        &self.relay.url
    }

    fn chat(&self, body: &str) -> Resp {
        post_json(&format!("{}/chat", self.url()), body.as_bytes())
    }

    fn distributed(&self, body: &str) -> Resp {
        post_json(&format!("{}/chat/distributed", self.url()), body.as_bytes())
    }

    /// Greedy generation of the native CPU engine on the model directory.
    fn native(&self, prompt: &str, opts: RunOptions, max_tokens: usize) -> Generation {
        let mut m = CpuModel::from_model_dir(&self.dir).unwrap();
        generate(
            &mut m,
            &self.dir.tokenizer,
            prompt,
            max_tokens,
            &mut Sampler::greedy(),
            &opts,
            |_, _| true,
        )
        .unwrap()
    }
}

fn env_with(customize: impl FnOnce(relay::AppState) -> relay::AppState) -> Env {
    let tmp = tempfile::tempdir().unwrap();
    let model = copy_default_model(tmp.path());
    let dir = ModelDir::load(&model).unwrap();
    let relay = TestRelay::start_with(&tmp.path().join("data"), Some(&model), None, customize);
    Env {
        _tmp: tmp,
        relay,
        dir,
    }
}

fn env() -> Env {
    env_with(|s| s)
}

fn answer(r: &Resp) -> ChatResponse {
    assert_eq!(r.status, 200, "body: {}", String::from_utf8_lossy(&r.body));
    assert!(
        r.content_type.starts_with("application/json"),
        "{}",
        r.content_type
    );
    r.json()
}

/// Server-sent events as (event, data) pairs.
fn sse_events(body: &[u8]) -> Vec<(String, String)> {
    let text = String::from_utf8(body.to_vec()).unwrap();
    let mut out = Vec::new();
    for block in text.split("\n\n") {
        let mut event = String::new();
        let mut data = Vec::new();
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("event:") {
                event = v.trim_start().to_string();
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push(v.strip_prefix(' ').unwrap_or(v).to_string());
            }
        }
        if !event.is_empty() {
            out.push((event, data.join("\n")));
        }
    }
    out
}

#[test]
fn seed_bodies_answer_like_the_native_engine() {
    let e = env();
    let layers = e.dir.config.num_hidden_layers;
    for (body, opts) in [
        (
            SEED_STANDARD,
            RunOptions {
                top_k: None,
                use_moe: false,
            },
        ),
        (
            SEED_MOE,
            RunOptions {
                top_k: Some(2),
                use_moe: true,
            },
        ),
    ] {
        let a = answer(&e.chat(body));
        let want = e.native("Explain quantum computing", opts, SEED_MAX_TOKENS);
        assert_eq!(a.tokens, want.tokens, "{body}");
        assert_eq!(a.response, want.text, "{body}");
        assert_eq!(a.prompt_tokens, want.prompt_tokens.len());
        assert_eq!(a.use_moe, opts.use_moe);
        assert_eq!(a.model, list(e.url(), "A")[0].hash.to_hex());
        // The experts each layer used, and per step.
        assert_eq!(a.experts.len(), layers);
        assert_eq!(
            a.step_experts.len(),
            1 + a.tokens.len() - usize::from(a.stop != "eos")
        );
        let per_tok = opts.experts_per_token(&e.dir.config).unwrap();
        assert_eq!(a.experts_per_token, per_tok);
        for step in &a.step_experts[1..] {
            assert!(step.iter().all(|l| l.len() == per_tok), "{step:?}");
        }
        if !opts.use_moe {
            assert!(a
                .experts
                .iter()
                .all(|l| l.len() == e.dir.config.num_local_experts));
        }
        assert!(a.timings.total_ms >= a.timings.prefill_ms);
        assert!(a.computed_by.is_none());
    }
    // A prompt in the default model's skill format (it answers those at length).
    let skill = "Q: reverse cat sun dog bird fish A:";
    let a = answer(&e.chat(&format!(r#"{{"prompt": "{skill}", "max_tokens": 32}}"#)));
    let want = e.native(skill, RunOptions::default(), 32);
    assert_eq!((a.tokens, a.response), (want.tokens, want.text));
    // The seed's distributed body, without compute peers: the relay computes.
    let a = answer(&e.distributed(SEED_DISTRIBUTED));
    let want = e.native(
        "Explain quantum computing",
        RunOptions {
            top_k: Some(3),
            use_moe: true,
        },
        SEED_MAX_TOKENS,
    );
    assert_eq!(a.tokens, want.tokens);
    assert_eq!(a.response, want.text);
    let by = a.computed_by.unwrap();
    assert!(!by.is_empty());
    assert!(by.iter().all(|c| c.by == RELAY), "{by:?}");
    assert!(a.failovers.unwrap().is_empty());
}

#[test]
fn sampling_options_and_streamed_events() {
    let e = env();
    let body = r#"{"prompt": "The cat", "max_tokens": 20, "stream": true}"#;
    let r = e.chat(body);
    assert_eq!(r.status, 200);
    assert!(
        r.content_type.starts_with("text/event-stream"),
        "{}",
        r.content_type
    );
    let events = sse_events(&r.body);
    let (last, data) = events.last().unwrap();
    assert_eq!(last, EVENT_DONE, "{events:?}");
    let done: ChatResponse = serde_json::from_str(data).unwrap();
    let tokens: Vec<TokenEvent> = events[..events.len() - 1]
        .iter()
        .map(|(name, d)| {
            assert_eq!(name, EVENT_TOKEN);
            serde_json::from_str(d).unwrap()
        })
        .collect();
    assert_eq!(tokens.iter().map(|t| t.id).collect::<Vec<_>>(), done.tokens);
    assert_eq!(
        tokens.iter().map(|t| t.text.as_str()).collect::<String>(),
        done.response
    );
    let want = e.native("The cat", RunOptions::default(), 20);
    assert_eq!(done.tokens, want.tokens);

    // Seeded sampling repeats itself.
    let body =
        r#"{"prompt": "The cat", "max_tokens": 16, "temperature": 0.9, "top_p": 0.9, "seed": 7}"#;
    let a = answer(&e.chat(body));
    let b = answer(&e.chat(body));
    assert_eq!(a.tokens, b.tokens);
}

#[test]
fn bad_bodies_get_json_errors() {
    let e = env();
    let experts = e.dir.config.num_local_experts;
    let long = "x".repeat(relay::chat::MAX_PROMPT_CHARS + 1);
    let cases: Vec<(String, u16, &str)> = vec![
        (r#"{"use_moe": true}"#.into(), 400, codes::MALFORMED),
        (r#"{"prompt": ""}"#.into(), 400, codes::MALFORMED),
        (r#"{"prompt": "   "}"#.into(), 400, codes::MALFORMED),
        (r#"{"prompt": 5}"#.into(), 400, codes::MALFORMED),
        (
            r#"{"prompt": "hi", "use_moe": "yes"}"#.into(),
            400,
            codes::MALFORMED,
        ),
        (
            r#"{"prompt": "hi", "top_k_experts": 0}"#.into(),
            400,
            codes::MALFORMED,
        ),
        (
            format!(r#"{{"prompt": "hi", "top_k_experts": {}}}"#, experts + 1),
            400,
            codes::MALFORMED,
        ),
        (
            r#"{"prompt": "hi", "top_k_experts": -1}"#.into(),
            400,
            codes::MALFORMED,
        ),
        (
            format!(
                r#"{{"prompt": "hi", "max_tokens": {}}}"#,
                relay::chat::MAX_TOKENS_CAP + 1
            ),
            400,
            codes::MALFORMED,
        ),
        (
            r#"{"prompt": "hi", "max_tokens": 0}"#.into(),
            400,
            codes::MALFORMED,
        ),
        (
            r#"{"prompt": "hi", "temperature": -1}"#.into(),
            400,
            codes::MALFORMED,
        ),
        (
            r#"{"prompt": "hi", "top_p": 0}"#.into(),
            400,
            codes::MALFORMED,
        ),
        (
            r#"{"prompt": "hi", "max_token": 5}"#.into(),
            400,
            codes::MALFORMED,
        ),
        (
            r#"{"prompt": "hi", "local_fallback": false}"#.into(),
            400,
            codes::MALFORMED,
        ),
        (r#"{"prompt": "hi""#.into(), 400, codes::MALFORMED),
        ("not json".into(), 400, codes::MALFORMED),
        (r#"["prompt"]"#.into(), 400, codes::MALFORMED),
        (format!(r#"{{"prompt": "{long}"}}"#), 413, codes::TOO_LARGE),
    ];
    for (body, status, code) in &cases {
        let r = e.chat(body);
        assert_eq!(r.status, *status, "{body:.80}");
        let err = r.error(*status);
        assert_eq!(err.code, *code, "{body:.80}: {err:?}");
        assert!(!err.message.is_empty());
    }
    // A body larger than the limit is refused from its Content-Length, unread.
    let big = format!(
        "POST /chat HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        relay::chat::MAX_CHAT_BODY + 1
    );
    let (st, text) = raw(&e.relay.addr(), big.as_bytes());
    assert_eq!(st, 413, "{text}");
    assert!(text.contains(codes::TOO_LARGE), "{text}");
    // The same checks on /chat/distributed (but local_fallback is allowed there).
    let err = e
        .distributed(r#"{"prompt": "hi", "top_k_experts": 0}"#)
        .error(400);
    assert_eq!(err.code, codes::MALFORMED);
    // Wrong or missing content type.
    let url = format!("{}/chat", e.url());
    for ct in ["text/plain", "application/x-www-form-urlencoded"] {
        let r = to_resp(
            ureq::post(&url)
                .set("Content-Type", ct)
                .send_bytes(SEED_MOE.as_bytes()),
        );
        assert_eq!(r.error(415).code, codes::UNSUPPORTED_MEDIA_TYPE);
    }
    let r = to_resp(ureq::post(&url).send_bytes(SEED_MOE.as_bytes()));
    assert_eq!(r.error(415).code, codes::UNSUPPORTED_MEDIA_TYPE);
    // GET is not a chat.
    assert_eq!(get(&url).error(405).code, codes::METHOD_NOT_ALLOWED);
    // The relay still answers.
    answer(&e.chat(SEED_MOE));
}

#[test]
fn per_ip_rate_limit_gives_429_with_retry_after() {
    let e = env_with(|mut s| {
        s.chat = ChatRuntime::new(ChatOptions::default().ip_rate(relay::server::limits::Rate {
            burst: 2,
            per_minute: 1,
        }));
        s
    });
    let body = r#"{"prompt": "hi", "max_tokens": 2}"#;
    answer(&e.chat(body));
    answer(&e.chat(body));
    let r = e.chat(body);
    assert_eq!(r.error(429).code, codes::RATE_LIMITED);
    assert!(r.retry_after.unwrap().parse::<u64>().unwrap() >= 1);
}

#[test]
fn distributed_without_peers_and_without_fallback_is_503() {
    let e = env();
    let r = e.distributed(
        r#"{"prompt": "Explain quantum computing", "top_k_experts": 3, "local_fallback": false}"#,
    );
    let err = r.error(503);
    assert_eq!(err.code, codes::UNAVAILABLE);
    assert!(
        err.message.contains("no peer serves expert computation"),
        "{err:?}"
    );
    // With the fallback (the default) it answers, as /chat does.
    let a = answer(&e.distributed(r#"{"prompt": "Explain quantum computing", "top_k_experts": 3, "local_fallback": true, "max_tokens": 12}"#));
    let b = answer(
        &e.chat(r#"{"prompt": "Explain quantum computing", "top_k_experts": 3, "max_tokens": 12}"#),
    );
    assert_eq!(a.tokens, b.tokens);
    assert_eq!(a.response, b.response);
}

/// Compute peers on their own runtime (the test thread talks HTTP).
struct Peers {
    rt: tokio::runtime::Runtime,
    peers: Vec<ComputePeer>,
}

impl Peers {
    fn new() -> Self {
        Self {
            rt: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap(),
            peers: Vec::new(),
        }
    }

    /// A peer holding (and serving computations for) the experts of `layers`.
    fn add(&mut self, e: &Env, key: u8, layers: std::ops::Range<usize>, b: Behaviour) -> usize {
        let held = crate::compute_peer::expert_weights(e.url(), &e.dir.config, layers);
        assert!(!held.is_empty());
        let addr = e.relay.addr();
        let p = self.rt.block_on(crate::compute_peer::start(
            &addr,
            SigningKey::from_bytes(&[key; 32]),
            held,
            b,
        ));
        self.peers.push(p);
        // The relay registers the peer asynchronously: wait for it.
        let n = self.peers.len();
        wait_for(&format!("{n} compute peers"), || {
            e.relay.state.peers.compute_peers() >= n
        });
        n - 1
    }
}

/// Wait for a condition the relay reaches asynchronously (a failing test
/// after a minute, not a timing assertion).
fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let end = std::time::Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(
            std::time::Instant::now() < end,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn two_compute_peers_give_the_same_greedy_tokens_and_are_named() {
    let e = env();
    let layers = e.dir.config.num_hidden_layers;
    let half = layers / 2;
    let mut peers = Peers::new();
    let p0 = peers.add(&e, 31, 0..half, Behaviour::Answer);
    let p1 = peers.add(&e, 32, half..layers, Behaviour::Answer);
    let (id0, id1) = (peers.peers[p0].id_hex(), peers.peers[p1].id_hex());

    // The seed's body, every expert computed by a peer (no fallback).
    let body =
        r#"{"prompt": "Explain quantum computing", "top_k_experts": 3, "local_fallback": false}"#;
    let a = answer(&e.distributed(body));
    let local = answer(&e.chat(r#"{"prompt": "Explain quantum computing", "top_k_experts": 3}"#));
    assert_eq!(a.tokens, local.tokens);
    assert_eq!(a.response, local.response);
    assert_eq!(a.experts, local.experts);
    assert_eq!(a.step_experts, local.step_experts);
    let by = a.computed_by.unwrap();
    for c in &by {
        let want = if c.layer < half { &id0 } else { &id1 };
        assert_eq!(&c.by, want, "{c:?}");
        assert!(c.calls > 0 && c.rows >= c.calls);
    }
    // Every routed (layer, expert) was computed, by exactly the holder.
    let routed: usize = a.experts.iter().map(Vec::len).sum();
    assert_eq!(by.len(), routed);
    assert!(a.failovers.unwrap().is_empty());
    let asked: u64 = peers.peers.iter().map(ComputePeer::answered).sum();
    assert_eq!(asked, by.iter().map(|c| c.calls).sum::<u64>());
    assert!(peers.peers.iter().all(|p| p.answered() > 0));

    // A skill prompt (decodes several tokens) through the peers.
    let body = r#"{"prompt": "Q: sort 9 3 7 1 5 8 2 A:", "max_tokens": 32}"#;
    let a = answer(&e.distributed(&body.replacen('{', r#"{"local_fallback": false, "#, 1)));
    let b = answer(&e.chat(body));
    assert_eq!((a.tokens, a.response), (b.tokens, b.response));
    // Dense mixture through the peers too, equal to /chat.
    let a = answer(&e.distributed(
        r#"{"prompt": "hello", "use_moe": false, "max_tokens": 8, "local_fallback": false}"#,
    ));
    let b = answer(&e.chat(r#"{"prompt": "hello", "use_moe": false, "max_tokens": 8}"#));
    assert_eq!(a.tokens, b.tokens);
    assert!(a.computed_by.unwrap().iter().all(|c| c.by != RELAY));
}

#[test]
fn a_peer_killed_mid_request_fails_over_and_the_answer_stays() {
    let e = env();
    let layers = e.dir.config.num_hidden_layers;
    let half = layers / 2;
    let mut peers = Peers::new();
    let dying = peers.add(&e, 41, 0..half, Behaviour::DropOnFirstCompute);
    let live = peers.add(&e, 42, half..layers, Behaviour::Answer);
    let body = r#"{"prompt": "Explain quantum computing", "top_k_experts": 3, "max_tokens": 24}"#;
    let a = answer(&e.distributed(body));
    let local = answer(&e.chat(body));
    assert_eq!(a.tokens, local.tokens);
    assert_eq!(a.response, local.response);
    assert_eq!(peers.peers[dying].asked(), 1);
    assert_eq!(peers.peers[dying].answered(), 0);
    let dead = peers.peers[dying].id_hex();
    let fo = a.failovers.unwrap();
    assert!(
        fo.iter().any(|f| f.peer == dead && f.layer < half),
        "{fo:?}"
    );
    let by = a.computed_by.unwrap();
    // The dead peer's layers were computed by the relay, the others by the live peer.
    for c in &by {
        let want = if c.layer < half {
            RELAY.to_string()
        } else {
            peers.peers[live].id_hex()
        };
        assert_eq!(c.by, want, "{c:?}");
    }
    // Now nobody serves layers 0..half: without the fallback that is a 503.
    wait_for("the dead peer to be dropped", || {
        e.relay.state.peers.compute_peers() == 1
    });
    let r = e.distributed(
        r#"{"prompt": "Explain quantum computing", "local_fallback": false, "max_tokens": 4}"#,
    );
    let err = r.error(503);
    assert_eq!(err.code, codes::UNAVAILABLE);
    assert!(
        err.message.contains("no peer serves expert computation"),
        "{err:?}"
    );
}

#[test]
fn concurrency_cap_gives_429_while_a_generation_runs() {
    let e = env_with(|mut s| {
        s.chat = ChatRuntime::new(ChatOptions::default().max_concurrent(1));
        s
    });
    let layers = e.dir.config.num_hidden_layers;
    let (go, wait) = tokio::sync::watch::channel(false);
    let mut peers = Peers::new();
    let slow = peers.add(&e, 51, 0..layers, Behaviour::WaitFor(wait));
    let url = format!("{}/chat/distributed", e.url());
    let body = r#"{"prompt": "Explain quantum computing", "max_tokens": 6}"#;
    let running = std::thread::spawn(move || post_json(&url, body.as_bytes()));
    // The generation holds the only slot while the peer holds its computation.
    let asked = peers.peers[slow].asked.clone();
    wait_for("the first computation", || {
        asked.load(std::sync::atomic::Ordering::SeqCst) > 0
    });
    assert_eq!(e.relay.state.chat.running(), 1);
    for r in [e.chat(SEED_MOE), e.distributed(SEED_DISTRIBUTED)] {
        assert_eq!(r.error(429).code, codes::RATE_LIMITED);
        assert!(r.retry_after.is_some());
    }
    go.send(true).unwrap();
    let a = answer(&running.join().unwrap());
    let b = answer(&e.chat(body));
    assert_eq!(a.tokens, b.tokens);
    assert!(a
        .computed_by
        .unwrap()
        .iter()
        .all(|c| c.by == peers.peers[slow].id_hex()));
}
