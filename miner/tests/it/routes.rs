//! Selective inference on the committed default model: one skill's held-out
//! prompts need fewer experts than all of them together, no skill needs the
//! whole model, and `improve --skill` defaults to the skill's busiest expert.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use miner::routes::{PromptRoute, Router, Summary};
use web_node::eval::{self, Corpus, Skill};
use web_node::model::Slot;

fn default_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/default")
}

/// Held-out prompts per skill (the first `n` of each), routed.
fn routed(r: &mut Router, n: usize) -> Vec<(Skill, Vec<PromptRoute>)> {
    let held = eval::tokenize(&r.tok, &Corpus::default_corpus().held_out).unwrap();
    Skill::ALL
        .iter()
        .map(|&s| {
            let ex: Vec<_> = held
                .iter()
                .filter(|e| e.skill == s)
                .take(n)
                .cloned()
                .collect();
            (s, r.route_examples(&ex).unwrap())
        })
        .collect()
}

#[test]
fn a_skills_prompts_route_to_fewer_experts_than_the_whole_set() {
    let mut r = Router::load(&default_model()).unwrap();
    let by_skill = routed(&mut r, 20);
    let all: Vec<&PromptRoute> = by_skill.iter().flat_map(|(_, v)| v).collect();
    let whole = Summary::of("all", &all, &r.sizes);
    for (skill, routes) in &by_skill {
        let refs: Vec<&PromptRoute> = routes.iter().collect();
        let s = Summary::of(skill.name(), &refs, &r.sizes);
        println!("{}", s.line());
        assert!(
            s.union_total() < whole.union_total(),
            "{skill}: its prompts use {} experts, all prompts {}",
            s.union_total(),
            whole.union_total()
        );
        // No skill needs the whole model for a prompt on average.
        assert!(s.model_fraction < 1.0, "{}", s.line());
    }
    println!("{}", whole.line());
    // One prompt needs clearly less than all the experts on average (the
    // first default model, whose routers never trained, needed 0.93).
    assert!(whole.expert_fraction < 0.75, "{}", whole.line());
}

#[test]
fn improve_defaults_to_the_expert_its_skill_uses_most() {
    let mut r = Router::load(&default_model()).unwrap();
    let slot = r.most_used_expert(Skill::Copy).unwrap();
    let Slot::Expert { layer, expert } = slot else {
        panic!("not an expert: {slot}");
    };
    // The count it was chosen by is the largest of every layer's.
    let ex = eval::tokenize(
        &r.tok,
        &eval::corpus::of_skill(&Corpus::default_corpus().public_eval, Skill::Copy),
    )
    .unwrap();
    r.model.reset_stats();
    for e in &ex {
        let full = e.full();
        eval::LogitsModel::logits_all(&mut r.model, &full[..full.len() - 1]).unwrap();
    }
    let t = r.model.routing_stats().tokens_routed.clone();
    let best = t[layer][expert];
    assert!(best > 0);
    assert!(t.iter().flatten().all(|&c| c <= best), "{t:?}");
    // `routes --skill` names the same expert.
    let o = Command::new(env!("CARGO_BIN_EXE_aiblock"))
        .args(["routes", "--skill", "copy", "--model"])
        .arg(default_model())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains(&format!("improve --skill copy picks by default: {slot}")),
        "{out}"
    );
}

/// A second training stage refuses every per-layer routing flag that names
/// a layer the model lacks (it has 4), before training or writing anything;
/// a flag value that does not parse is refused by the argument parser.
#[test]
fn train_refuses_routing_flags_for_missing_layers() {
    let tmp = tempfile::tempdir().unwrap();
    let model = default_model();
    let model = model.to_str().unwrap();
    for (flag, value, says) in [
        ("--layer-union", "4=1", "layer 4"),
        ("--layer-mi", "7=0.5", "layer 7"),
        ("--balanced-cover", "4", "--balanced-cover 4"),
        ("--cover-floor", "9=2", "--cover-floor 9"),
        ("--cover-floor", "1=x", "not a whole number"),
    ] {
        let o = crate::cli::aiblock(
            &[
                "train", "--init", model, "--out", "out", "--steps", "1", flag, value,
            ],
            tmp.path(),
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{flag} {value} was accepted");
        assert!(err.contains(says), "{flag} {value}: {err}");
        assert!(
            !tmp.path().join("out").exists(),
            "{flag} {value} wrote a model"
        );
    }
}
