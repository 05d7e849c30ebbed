//! The miner CLI against a real relay (the relay library in process on
//! 127.0.0.1:0, `test_support::relay::TestRelay`) and the committed default
//! model: import/export round trip, refused mismatched checkpoints, greedy
//! chat from the blocks the relay stores, and the quality gate (honest improve accepted, lies and worse
//! versions rejected, heads unchanged).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::cli::{aiblock, default_model, ok};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use relay::server::ServeConfig;
use relay::{AppState, ServeOptions};
use safetensors::SafeTensors;
use test_support::relay::TestRelay;
use web_node::chain::BlockHash;
use web_node::eval::{self, Corpus, Skill};
use web_node::model::load::ModelDir;
use web_node::model::reference::CpuModel;
use web_node::net::api::BlockInfo;

/// A relay in this process (`test_support`'s, through the production
/// accept loop) on the embedded store; `customize` runs after the rate
/// limits are lifted.
fn start_relay(
    data: &Path,
    model: &Path,
    customize: impl FnOnce(AppState) -> AppState,
) -> TestRelay {
    let cfg = ServeConfig {
        data_dir: data.to_path_buf(),
        web_dir: None,
        model_dir: Some(model.to_path_buf()),
        database: None,
    };
    TestRelay::start_cfg(cfg, customize, ServeOptions::default())
}

/// The first page of a chain's listing, as the relay pages it by default.
fn chain(url: &str, c: &str) -> Vec<BlockInfo> {
    let body = ureq::get(&format!("{url}/chain/{c}/blocks"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    serde_json::from_str(&body).unwrap()
}

fn heads(url: &str) -> Vec<(String, BlockHash)> {
    let body = ureq::get(&format!("{url}/chain/B/blocks?limit=1000"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    let all: Vec<BlockInfo> = serde_json::from_str(&body).unwrap();
    let mut v: Vec<_> = all
        .into_iter()
        .filter(|b| b.is_head)
        .map(|b| (b.name, b.hash))
        .collect();
    v.sort();
    v
}

/// Every tensor of two safetensors files: same names, dtypes, shapes and bytes.
fn assert_bit_identical(a: &[u8], b: &[u8]) {
    let (a, b) = (
        SafeTensors::deserialize(a).unwrap(),
        SafeTensors::deserialize(b).unwrap(),
    );
    let mut na = a.names();
    let mut nb = b.names();
    na.sort();
    nb.sort();
    assert_eq!(na, nb);
    for n in na {
        let (x, y) = (a.tensor(n).unwrap(), b.tensor(n).unwrap());
        assert_eq!(x.dtype(), y.dtype(), "{n}");
        assert_eq!(x.shape(), y.shape(), "{n}");
        assert!(x.data() == y.data(), "{n}: bytes differ");
    }
}

/// A model dir with only config.json and tokenizer.json: the relay's genesis
/// is then the meta block alone, and the miner imports the weights.
fn meta_only_model(dir: &Path) -> PathBuf {
    let m = dir.join("meta-only/aiblock-default");
    std::fs::create_dir_all(&m).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(default_model().join(f), m.join(f)).unwrap();
    }
    m
}

#[test]
fn import_publish_export_round_trip_and_greedy_chat_from_relay_blocks() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    let relay = start_relay(&work.join("data"), &meta_only_model(work), |s| s);
    let a = chain(&relay.url, "A");
    assert_eq!(a.len(), 1);
    let meta = a[0].hash.to_hex();
    assert!(heads(&relay.url).is_empty());

    // The first version of a slot must be signed by the meta block's signer
    // (here the relay operator, whose key is data/operator.key).
    let operator_key = work.join("data/operator.key");
    let model = default_model();
    let model = model.to_str().unwrap();
    let import = |key: &str, extra: &[&str]| {
        let mut args = vec![
            "import",
            "--model",
            model,
            "--meta-hash",
            &meta,
            "--address",
            "alice",
            "--key",
            key,
            "--relay",
            &relay.url,
        ];
        args.extend(extra);
        aiblock(&args, work)
    };

    // A stranger's key: imported fine, refused by the relay on publish.
    ok(&aiblock(&["keygen", "--out", "key"], work));
    ok(&import("key", &["--out", "stranger"]));
    let o = aiblock(
        &["publish", "--relay", &relay.url, "--dir", "stranger"],
        work,
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("forbidden"), "{err}");
    assert!(heads(&relay.url).is_empty());
    let operator_key = operator_key.to_str().unwrap();

    // Dry run: lists every block with tensors and shapes, writes nothing.
    let out = ok(&import(operator_key, &["--dry-run", "--out", "dry"]));
    assert!(
        out.contains("layer3.expert7") && out.contains("model.embed_tokens.weight"),
        "{out}"
    );
    assert!(
        out.contains("[512, 128]") || out.contains("[128, 128]"),
        "{out}"
    );
    assert!(out.contains("dry run: 37 blocks"), "{out}");
    assert!(!work.join("dry").exists(), "a dry run writes nothing");

    ok(&import(operator_key, &["--out", "blocks"]));
    let out = ok(&aiblock(
        &["publish", "--relay", &relay.url, "--dir", "blocks"],
        work,
    ));
    assert!(out.contains("published 37 blocks"), "{out}");
    assert_eq!(heads(&relay.url).len(), 37);

    ok(&aiblock(
        &["export", "--relay", &relay.url, "--out", "exported"],
        work,
    ));
    let original = std::fs::read(default_model().join("model.safetensors")).unwrap();
    let exported = std::fs::read(work.join("exported/model.safetensors")).unwrap();
    assert_bit_identical(&original, &exported);

    // Greedy chat from the model rebuilt out of the relay's blocks answers
    // held-out arithmetic prompts (never seen in training).
    let corpus = Corpus::default_corpus();
    let held: Vec<_> = eval::corpus::of_skill(&corpus.held_out, Skill::Add);
    let exported_dir = work.join("exported");
    let mut correct = 0;
    for ex in held.iter().take(3) {
        let o = aiblock(
            &[
                "chat",
                "--model",
                exported_dir.to_str().unwrap(),
                "--prompt",
                &ex.prompt,
                "--max-tokens",
                "8",
            ],
            work,
        );
        let text = ok(&o);
        if text.trim() == ex.answer.trim() {
            correct += 1;
        } else {
            eprintln!("{} -> {text:?} (expected {:?})", ex.prompt, ex.answer);
        }
    }
    assert!(
        correct >= 2,
        "greedy chat answered {correct}/3 held-out sums"
    );
    // And the exported model scores the committed held-out accuracy on add.
    let dir = ModelDir::load(&exported_dir).unwrap();
    let mut m = CpuModel::from_model_dir(&dir).unwrap();
    let tok = dir.tokenizer.inner().clone();
    let acc = eval::accuracy(&mut m, &tok, &eval::tokenize(&tok, &held).unwrap()).unwrap();
    assert!(acc[0].fraction() >= 0.8, "{acc:?}");
}

#[test]
fn model_rebuilt_from_the_relays_genesis_blocks_answers_as_the_directory_does() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    // The relay's own genesis: meta block and every slot from models/default,
    // listed 10 blocks a page: export must follow the pages to find every head.
    let relay = start_relay(&work.join("data"), &default_model(), |s| {
        s.with_options(|o| o.default_page = 10)
    });
    assert_eq!(heads(&relay.url).len(), 37);
    assert_eq!(chain(&relay.url, "B").len(), 10, "one page of 10");
    ok(&aiblock(
        &["export", "--relay", &relay.url, "--out", "exported"],
        work,
    ));
    let load = |dir: &Path| {
        let d = ModelDir::load(dir).unwrap();
        let tok = d.tokenizer.inner().clone();
        (CpuModel::from_model_dir(&d).unwrap(), tok)
    };
    let (mut direct, tok) = load(&default_model());
    let (mut rebuilt, _) = load(&work.join("exported"));
    let eos = eval::eos_id(&tok).unwrap();
    let held = eval::tokenize(&tok, &Corpus::default_corpus().held_out).unwrap();
    let mut correct = 0;
    for ex in &held {
        let a = eval::greedy(&mut direct, &ex.prompt, ex.answer.len() + 4, eos).unwrap();
        let b = eval::greedy(&mut rebuilt, &ex.prompt, ex.answer.len() + 4, eos).unwrap();
        assert_eq!(a, b, "{:?}", tok.decode(&ex.prompt, false));
        correct += usize::from(eval::is_correct(&tok, ex, &b, eos).unwrap());
    }
    // The answers are the committed model's: its held-out accuracy as its
    // train_report.json records it (measured there with the training code;
    // the CPU engine may differ on a borderline answer or two).
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(default_model().join("train_report.json")).unwrap())
            .unwrap();
    let reported: usize = report["held_out"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["correct"].as_u64().unwrap() as usize)
        .sum();
    assert!(
        correct + 3 >= reported,
        "{correct}/{} held-out answers right, the report says {reported}",
        held.len()
    );
}

#[test]
fn mismatched_checkpoint_is_refused_in_dry_run_too() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    ok(&aiblock(&["keygen", "--out", "key"], work));
    let model = default_model();
    let meta = ok(&aiblock(
        &[
            "genesis",
            "--model",
            model.to_str().unwrap(),
            "--key",
            "key",
            "--out",
            "meta",
        ],
        work,
    ));
    let meta = meta.trim().to_string();
    let meta_file = std::fs::read_dir(work.join("meta"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    // Another model: same layout, other sizes.
    let other = work.join("other");
    web_node::model::random::write_random_model(&other, &web_node::model::random::tiny_config(), 3)
        .unwrap();
    let meta_file = meta_file.to_str().unwrap();
    let import = |model: &Path, meta: &str, extra: &[&str]| {
        let mut args = vec![
            "import",
            "--model",
            model.to_str().unwrap(),
            "--meta-hash",
            meta,
            "--address",
            "bob",
            "--key",
            "key",
            "--meta-file",
            meta_file,
        ];
        args.extend(extra);
        aiblock(&args, work)
    };
    for extra in [&["--out", "out", "--dry-run"][..], &["--out", "out"]] {
        let o = import(&other, &meta, extra);
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("does not match the meta config"), "{err}");
        assert!(err.contains("shape"), "{err}");
        assert!(!work.join("out").exists(), "nothing written");
    }
    // A meta file that is not the --meta-hash is refused too.
    let o = import(&model, &"0".repeat(64), &["--dry-run"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not the --meta-hash"));
}

#[test]
fn quality_gate_accepts_honest_improvements_and_rejects_lies_and_regressions() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    let relay = start_relay(&work.join("data"), &default_model(), |s| {
        s.with_gate(Arc::new(relay::quality::QualityGate::default()))
    });
    ok(&aiblock(&["keygen", "--out", "key"], work));
    let before = heads(&relay.url);
    assert_eq!(before.len(), 37);
    let url = relay.url.as_str();
    // No --expert: improve takes the expert copy is routed to most.
    let improve = |extra: &[&str]| {
        let mut args = vec!["improve", "--relay", url, "--skill", "copy", "--key", "key"];
        args.extend(extra);
        aiblock(&args, work)
    };

    // A lie: the real loss of this version, but it claims far less.
    let o = improve(&["--steps", "100", "--lr", "5e-4", "--claim", "0.01"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("rejected") && err.contains("does not match the recomputed"),
        "{err}"
    );
    assert_eq!(heads(url), before, "a rejected block changes no head");

    // Worse than the incumbent: a destructive learning rate, published anyway
    // with its honest (higher) loss.
    let o = improve(&["--lr", "0.5", "--steps", "10", "--force"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("is not better than the incumbent"), "{err}");
    assert_eq!(heads(url), before, "a rejected block changes no head");

    // Honest: accepted, the slot's head moves, the public-eval loss drops.
    let out = ok(&improve(&["--steps", "100", "--lr", "5e-4"]));
    assert!(out.contains("published"), "{out}");
    let expert = out
        .split("copy is routed most to ")
        .nth(1)
        .and_then(|r| r.split(':').next())
        .unwrap_or_else(|| panic!("no default expert in {out}"))
        .to_string();
    let after = heads(url);
    let changed: Vec<_> = after
        .iter()
        .zip(&before)
        .filter(|(a, b)| a != b)
        .map(|(a, _)| a.0.clone())
        .collect();
    assert_eq!(changed, vec![expert.clone()]);
    let loss_of = |dir: &Path| {
        let d = ModelDir::load(dir).unwrap();
        let mut m = CpuModel::from_model_dir(&d).unwrap();
        eval::public_eval_loss(&mut m, d.tokenizer.inner()).unwrap()
    };
    ok(&aiblock(
        &["export", "--relay", url, "--out", "exported"],
        work,
    ));
    let (old, new) = (loss_of(&default_model()), loss_of(&work.join("exported")));
    assert!(
        new < old - relay::quality::MARGIN,
        "public-eval loss {old} -> {new}"
    );
    let info = chain(url, "B")
        .into_iter()
        .find(|b| b.is_head && b.name == expert)
        .unwrap();
    let claimed = info.candidate_loss.unwrap() as f64;
    assert!(
        (claimed - new).abs() <= relay::quality::TOLERANCE,
        "claimed {claimed}, loss {new}"
    );

    // Usage keeps the gate's verdict as the version's quality: its verified
    // loss, the incumbent's, and the reward's quality factor from them.
    let stats: serde_json::Value = serde_json::from_str(
        &ureq::get(&format!("{url}/experts/stats/{expert}"))
            .call()
            .unwrap()
            .into_string()
            .unwrap(),
    )
    .unwrap();
    let v2 = &stats["versions"][1];
    assert_eq!(v2["is_head"], true, "{stats}");
    let verified = v2["verified_loss"].as_f64().unwrap();
    let incumbent = v2["incumbent_loss"].as_f64().unwrap();
    assert!((verified - new).abs() <= 1e-6, "{verified} vs {new}");
    assert!((incumbent - old).abs() <= 1e-6, "{incumbent} vs {old}");
    assert_eq!(
        v2["quality_pct"],
        relay::usage::quality_pct(Some(verified), Some(incumbent))
    );
    assert!(v2["quality_pct"].as_u64().unwrap() > 100, "{v2}");
    assert_eq!(stats["versions"][0]["quality_pct"], 100, "genesis");
}
