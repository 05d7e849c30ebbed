//! The fixed-length decode the benchmarks time (`web_node::gpu::bench`: the
//! native `gpu_engine` bench, `greedy_ids --fixed`, the page's
//! `bench_decode`): exactly `n` tokens past EOS, the CPU reference's greedy
//! tokens, counters of the decode only, and clear errors for bad input.

use crate::gpu_support::{ctx, shared_ctx};
use web_node::gpu::bench::{
    all_resident_options, apply_variant, bench_decode_blocking, check_length, parse_format,
    supply_all, Resident,
};
use web_node::gpu::{Engine, EngineOptions, PoolFormat, WeightFormat};
use web_node::model::load::ModelDir;
use web_node::model::quant::QuantizingSource;
use web_node::model::random::{small_config, tiny_config, write_random_model, TOKENIZER_VOCAB};
use web_node::model::reference::CpuModel;
use web_node::model::sampler::argmax;
use web_node::model::{Config, ExpertId, ExpertSource, Forward, QuantFormat, RunOptions};
use web_node::model::{Output, Want};

fn all_experts(m: &ModelDir) -> Vec<(ExpertId, web_node::model::ExpertWeights)> {
    let mut src = m.expert_source().unwrap();
    let cfg = &m.config;
    (0..cfg.num_hidden_layers)
        .flat_map(|l| (0..cfg.num_local_experts).map(move |e| (l, e)))
        .map(|(l, e)| (ExpertId::new(l, e), src.load_expert(l, e).unwrap()))
        .collect()
}

/// `n` greedy tokens of the CPU reference, EOS never checked.
fn cpu_fixed(cpu: &mut CpuModel, prompt: &[u32], n: usize) -> Vec<u32> {
    let opts = RunOptions::default();
    let mut tok = argmax(&cpu.forward(prompt, &opts).unwrap());
    let mut out = vec![tok];
    while out.len() < n {
        tok = argmax(&cpu.forward(&[tok], &opts).unwrap());
        out.push(tok);
    }
    out
}

#[test]
fn fixed_decode_gives_the_cpu_tokens_and_decode_counters() {
    let Some(c) = ctx() else { return };
    let dir = tempfile::tempdir().unwrap();
    // Sizes that are multiples of the quantization group (32).
    write_random_model(
        dir.path(),
        &small_config(TOKENIZER_VOCAB, 64, 96, 3, 4, 2),
        5,
    )
    .unwrap();
    let m = ModelDir::load(dir.path()).unwrap();
    let cfg = &m.config;
    let prompt: Vec<u32> = (0..7u32).map(|i| (i * 31 + 3) % 250).collect();
    let n = 40;
    let opts = RunOptions::default();
    for fmt in [
        PoolFormat::Float(WeightFormat::F32),
        PoolFormat::Quant(QuantFormat::Q8_0),
    ] {
        let mut gpu = Engine::with_options(
            shared_ctx(c),
            cfg,
            &m.shared,
            &m.routers,
            all_resident_options(fmt),
        )
        .unwrap();
        supply_all(&mut gpu, all_experts(&m)).unwrap();
        assert_eq!(
            gpu.resident_experts(),
            cfg.num_hidden_layers * cfg.num_local_experts
        );
        let r = bench_decode_blocking(&mut gpu, &mut Resident, &prompt, n, &opts, 2).unwrap();
        let mut cpu = match fmt {
            PoolFormat::Quant(format) => CpuModel::new(
                cfg.clone(),
                m.shared.clone(),
                m.routers.clone(),
                QuantizingSource {
                    inner: m.expert_source().unwrap(),
                    format,
                },
            )
            .unwrap(),
            PoolFormat::Float(_) => CpuModel::from_model_dir(&m).unwrap(),
        };
        assert_eq!(r.tokens, cpu_fixed(&mut cpu, &prompt, n), "{fmt}");
        assert_eq!((r.prompt_tokens, r.rounds), (prompt.len(), 2));
        // The decode's counters only (the prefill's reset): the engine's
        // own count of a greedy decode step, once per token.
        let per_step = gpu.dispatches_per_step() as f64;
        assert_eq!(r.dispatches_per_token, per_step, "{fmt}");
        assert_eq!(r.submissions_per_token, 1.0, "{fmt}: all resident");
        assert!(r.ms_per_token > 0.0 && r.prefill_ms > 0.0, "{r:?}");
    }
}

#[test]
fn bad_fixed_decodes_are_errors() {
    assert_eq!(
        parse_format("f16").unwrap(),
        PoolFormat::Float(WeightFormat::F16)
    );
    assert_eq!(
        parse_format("q4_0").unwrap(),
        PoolFormat::Quant(QuantFormat::Q4_0)
    );
    assert!(parse_format("f64")
        .unwrap_err()
        .to_string()
        .contains("unknown weight format"));
    let mut o = EngineOptions::default();
    apply_variant(&mut o, "unfused").unwrap();
    assert_eq!((o.fused, o.fused_attention), (false, false));
    apply_variant(&mut o, "fused").unwrap();
    assert_eq!((o.fused, o.fused_attention), (true, false));
    assert!(apply_variant(&mut o, "fast").is_err());
    let cfg = tiny_config();
    let room = cfg.max_position_embeddings;
    assert!(check_length(&cfg, 4096, 1, room).is_ok());
    for (prompt, n) in [(0, 4), (3, 0), (2, room)] {
        assert!(check_length(&cfg, 4096, prompt, n).is_err(), "{prompt} {n}");
    }
    assert!(check_length(&cfg, 8, 4, 6).is_err(), "the engine's max_seq");

    let Some(c) = ctx() else { return };
    let dir = tempfile::tempdir().unwrap();
    write_random_model(dir.path(), &cfg, 6).unwrap();
    let m = ModelDir::load(dir.path()).unwrap();
    let engine = |opts| Engine::with_options(shared_ctx(c), &cfg, &m.shared, &m.routers, opts);
    // No expert supplied: the decode would fetch, so it is refused.
    let mut gpu = engine(EngineOptions::default()).unwrap();
    let e = bench_decode_blocking(&mut gpu, &mut Resident, &[1, 2], 3, &Default::default(), 1)
        .unwrap_err();
    assert!(
        e.to_string().contains("not every expert is resident"),
        "{e}"
    );
    // A pool smaller than the model cannot hold them all.
    let mut small = engine(EngineOptions {
        expert_pool_bytes: Some(2 * gpu.expert_bytes()),
        ..Default::default()
    })
    .unwrap();
    let e = supply_all(&mut small, all_experts(&m)).unwrap_err();
    assert!(e.to_string().contains("needs them all"), "{e}");
    // Too long for the context.
    let e = bench_decode_blocking(
        &mut gpu,
        &mut Resident,
        &[1],
        room + 1,
        &Default::default(),
        1,
    )
    .unwrap_err();
    assert!(e.to_string().contains("do not fit the context"), "{e}");
}

/// The pipelined-decode tests' model (tiny, random, in a temporary
/// directory kept alive by `_dir`), prompt and the CPU reference's `n`
/// greedy tokens after it.
struct DecodeCase {
    _dir: tempfile::TempDir,
    cfg: Config,
    m: ModelDir,
    prompt: Vec<u32>,
    want: Vec<u32>,
}

fn decode_case(n: usize) -> DecodeCase {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config();
    write_random_model(dir.path(), &cfg, 11).unwrap();
    let m = ModelDir::load(dir.path()).unwrap();
    let prompt: Vec<u32> = (0..5u32).map(|i| (i * 17 + 2) % 200).collect();
    let want = cpu_fixed(&mut CpuModel::from_model_dir(&m).unwrap(), &prompt, n);
    DecodeCase {
        _dir: dir,
        cfg,
        m,
        prompt,
        want,
    }
}

/// `Engine::decode_greedy`, pipelined (every expert resident: token t + 1
/// submitted before t is read back) and not (a pool that misses, one step
/// per token): the CPU reference's tokens, one submission per token, and a
/// stop that leaves the cache where single steps would (the speculative
/// chunk after the stop discarded, the next step embedding its own token).
#[test]
fn pipelined_decode_matches_single_steps_and_stops_cleanly() {
    let Some(c) = ctx() else { return };
    let n = 24;
    let DecodeCase {
        _dir,
        cfg,
        m,
        prompt,
        want,
    } = decode_case(n);
    let opts = RunOptions::default();
    let engine = |pool: Option<u64>| {
        Engine::with_options(
            shared_ctx(c),
            &cfg,
            &m.shared,
            &m.routers,
            EngineOptions {
                expert_pool_bytes: pool,
                ..Default::default()
            },
        )
        .unwrap()
    };
    let first = |gpu: &mut Engine| match gpu
        .run_blocking(&mut Resident, &prompt, &opts, Want::Greedy)
        .unwrap()
    {
        Output::Token(t) => t,
        o => panic!("{o:?}"),
    };

    let mut gpu = engine(None);
    supply_all(&mut gpu, all_experts(&m)).unwrap();
    let t0 = first(&mut gpu);
    assert!(gpu.can_pipeline(t0));
    assert!(!gpu.can_pipeline(t0 + 1), "x holds t0's row only");
    gpu.reset_stats();
    let rest =
        pollster::block_on(gpu.decode_greedy(&mut Resident, t0, n - 1, &opts, |_| true)).unwrap();
    let got: Vec<u32> = std::iter::once(t0).chain(rest).collect();
    assert_eq!(got, want, "pipelined vs CPU");
    let s = gpu.stats().clone();
    assert_eq!(
        (s.tokens, s.submissions),
        ((n - 1) as u64, (n - 1) as u64),
        "{s:?}"
    );
    assert_eq!(gpu.position(), prompt.len() + n - 1);

    // Stop after the 6th sampled token (its successor already in flight):
    // the cache holds t0 and the first five, and single steps from there
    // give the rest of the CPU's tokens.
    gpu.reset();
    let t0 = first(&mut gpu);
    let mut seen = 0;
    let six = pollster::block_on(gpu.decode_greedy(&mut Resident, t0, n, &opts, |_| {
        seen += 1;
        seen < 6
    }))
    .unwrap();
    assert_eq!(six, want[1..7], "stopped at the 6th");
    assert_eq!(
        gpu.position(),
        prompt.len() + 6,
        "speculative chunk discarded"
    );
    assert!(!gpu.can_pipeline(six[5]), "a discarded chunk overwrote x");
    let mut tok = six[5];
    let mut tail = Vec::new();
    while 7 + tail.len() < n {
        tok = gpu.next_token(&mut Resident, &[tok], &opts).unwrap();
        tail.push(tok);
    }
    assert_eq!(tail, want[7..], "single steps after the stop");
    // Stopping on the last token of `n` leaves nothing in flight: x holds its row.
    gpu.reset();
    let t0 = first(&mut gpu);
    let two = pollster::block_on(gpu.decode_greedy(&mut Resident, t0, 2, &opts, |_| true)).unwrap();
    assert_eq!(two, want[1..3]);
    assert!(gpu.can_pipeline(two[1]));

    // A pool of 3 experts (fewer than a layer's) pipelines too: below.
    let mut small = engine(Some(3 * gpu.expert_bytes()));
    let t0 = first_token(&mut small, &mut m.expert_source().unwrap(), &prompt);
    assert!(small.can_pipeline(t0));
}

fn first_token<S: web_node::model::Supply + ?Sized>(
    gpu: &mut Engine,
    src: &mut S,
    prompt: &[u32],
) -> u32 {
    match gpu
        .run_blocking(src, prompt, &RunOptions::default(), Want::Greedy)
        .unwrap()
    {
        Output::Token(t) => t,
        o => panic!("{o:?}"),
    }
}

/// `Engine::decode_greedy` with a pool that lacks experts, pipelined: each
/// chunk reads its lacking layers' routes back with its token. The tokens
/// of single steps (the CPU's) with pools of 3 and 12 experts (evicting,
/// missing mid-pipeline: the chunk in flight after a miss discarded, the
/// missed token resumed from its own route buffer); a stop that leaves the
/// cache where single steps would; a supply that fails mid-pipeline (an
/// error, nothing paused); and no submission beyond one per token while
/// every routed expert is resident.
#[test]
fn pipelined_pool_decode_matches_single_steps() {
    let Some(c) = ctx() else { return };
    let n = 24;
    let DecodeCase {
        _dir,
        cfg,
        m,
        prompt,
        want,
    } = decode_case(n);
    let opts = RunOptions::default();
    let per = web_node::gpu::expert_bytes(&cfg, WeightFormat::F32);
    let engine = |slots: u64| {
        Engine::with_options(
            shared_ctx(c),
            &cfg,
            &m.shared,
            &m.routers,
            EngineOptions {
                expert_pool_bytes: Some(slots * per),
                ..Default::default()
            },
        )
        .unwrap()
    };
    for slots in [3u64, 12] {
        let mut src = m.expert_source().unwrap();
        let mut gpu = engine(slots);
        let t0 = first_token(&mut gpu, &mut src, &prompt);
        assert!(gpu.can_pipeline(t0), "pool of {slots}");
        gpu.reset_stats();
        let rest =
            pollster::block_on(gpu.decode_greedy(&mut src, t0, n - 1, &opts, |_| true)).unwrap();
        assert_eq!(rest, want[1..], "pool of {slots} vs CPU");
        assert_eq!(gpu.position(), prompt.len() + n - 1);
        let s = gpu.stats().clone();
        eprintln!("pipelined pool of {slots}: {s:?}");
        assert_eq!(s.tokens, (n - 1) as u64, "{s:?}");
        // Misses mid-pipeline: each pause (or resumption from the host
        // cache of evicted experts) costs the missed chunk's resumes and at
        // most one discarded chunk, nothing else.
        let again = s.pauses + s.host_resumes;
        assert!(again > 0, "{s:?}");
        let extra = s.submissions - s.tokens;
        assert!(
            (again..=2 * again).contains(&extra),
            "{extra} submissions beyond one per token: {s:?}"
        );
        // A miss discards at most the one chunk behind it, and none once
        // two of the last eight tokens missed (then one token is in flight
        // at a time): a pool of 3 misses often enough for that.
        assert!(s.discarded_chunks <= again, "{s:?}");
        assert_eq!(extra, again + s.discarded_chunks, "{s:?}");
        if slots == 3 {
            assert!(s.discarded_chunks < again, "{s:?}");
        }

        // Stop after the 6th sampled token (its successor in flight): the
        // cache holds t0 and the first five; single steps give the rest.
        gpu.reset();
        let t0 = first_token(&mut gpu, &mut src, &prompt);
        let mut seen = 0;
        let six = pollster::block_on(gpu.decode_greedy(&mut src, t0, n, &opts, |_| {
            seen += 1;
            seen < 6
        }))
        .unwrap();
        assert_eq!(six, want[1..7], "pool of {slots}: stopped at the 6th");
        assert_eq!(gpu.position(), prompt.len() + 6);
        let mut tok = six[5];
        let mut tail = Vec::new();
        while 7 + tail.len() < n {
            tok = gpu.next_token(&mut src, &[tok], &opts).unwrap();
            tail.push(tok);
        }
        assert_eq!(
            tail,
            want[7..],
            "pool of {slots}: single steps after the stop"
        );
    }

    // A supply that fails mid-pipeline: a clear error, nothing left
    // paused, and the engine decodes the CPU's tokens again after a reset.
    struct FailAfter<S>(S, usize);
    impl<S: ExpertSource> ExpertSource for FailAfter<S> {
        fn load_expert(
            &mut self,
            layer: usize,
            expert: usize,
        ) -> Result<web_node::model::ExpertWeights, web_node::model::ModelError> {
            if self.1 == 0 {
                return Err(web_node::model::ModelError::Source(format!(
                    "layer{layer}.expert{expert} unavailable"
                )));
            }
            self.1 -= 1;
            self.0.load_expert(layer, expert)
        }
    }
    let mut src = m.expert_source().unwrap();
    let mut gpu = engine(3);
    let t0 = first_token(&mut gpu, &mut src, &prompt);
    let mut failing = FailAfter(m.expert_source().unwrap(), 4);
    let e = pollster::block_on(gpu.decode_greedy(&mut failing, t0, n - 1, &opts, |_| true))
        .unwrap_err();
    assert!(e.to_string().contains("unavailable"), "{e}");
    assert!(!gpu.is_paused());
    assert!(gpu.position() < prompt.len() + n - 1);
    gpu.reset();
    let t0 = first_token(&mut gpu, &mut src, &prompt);
    let rest = pollster::block_on(gpu.decode_greedy(&mut src, t0, n - 1, &opts, |_| true)).unwrap();
    assert_eq!(rest, want[1..], "after a failed supply");

    // A pool that holds the model, filled by one decode with only the
    // routed experts: the same decode again finds every routed expert
    // resident, pipelines through the layers that lack others (their routes
    // read back with the token) and adds no submission.
    let total = (cfg.num_hidden_layers * cfg.num_local_experts) as u64;
    let mut src = m.expert_source().unwrap();
    let mut gpu = engine(total);
    let t0 = first_token(&mut gpu, &mut src, &prompt);
    let warm = pollster::block_on(gpu.decode_greedy(&mut src, t0, 8, &opts, |_| true)).unwrap();
    assert_eq!(warm, want[1..9]);
    assert!(
        (gpu.resident_experts() as u64) < total,
        "some expert never routed"
    );
    gpu.reset();
    let t0 = first_token(&mut gpu, &mut src, &prompt);
    assert!(gpu.can_pipeline(t0));
    gpu.reset_stats();
    let again = pollster::block_on(gpu.decode_greedy(&mut src, t0, 8, &opts, |_| true)).unwrap();
    assert_eq!(again, warm);
    let s = gpu.stats();
    assert_eq!(
        (s.pauses, s.submissions, s.readbacks, s.tokens),
        (0, 8, 8, 8),
        "{s:?}"
    );
    assert!(s.readback_bytes > 8 * 4, "routes read back: {s:?}");
}
