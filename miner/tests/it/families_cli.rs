#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The CLI on the non-Mixtral families: `aiblock logits` on the committed
//! transformers fixtures (OLMoE, Qwen2-MoE, Qwen3-MoE), and a Qwen2-MoE
//! checkpoint through `genesis` (relay) -> `import` -> `publish` -> `export`,
//! bit-identical, shared-expert blocks included.

use crate::cli::{aiblock, max_rel_err, ok};
use std::path::{Path, PathBuf};

use relay::server::ServeConfig;
use relay::ServeOptions;
use safetensors::SafeTensors;
use test_support::relay::TestRelay;
use web_node::model::random::{tiny_family_config, tokenizer_json, write_random_model};
use web_node::model::Family;

fn fixtures() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../web-node/tests/fixtures/families");
    let mut v: Vec<PathBuf> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("reference.json").exists())
        .collect();
    v.sort();
    v
}

#[test]
fn logits_cli_matches_transformers_for_every_family() {
    let dirs = fixtures();
    assert!(dirs.len() >= 3);
    for fixture in dirs {
        let tmp = tempfile::tempdir().unwrap();
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(fixture.join(f), tmp.path().join(f)).unwrap();
        }
        // A model directory needs a tokenizer; `logits` takes ids.
        std::fs::write(tmp.path().join("tokenizer.json"), tokenizer_json().unwrap()).unwrap();
        let r: serde_json::Value =
            serde_json::from_slice(&std::fs::read(fixture.join("reference.json")).unwrap())
                .unwrap();
        let ids: Vec<u32> = serde_json::from_value(r["input_ids"].clone()).unwrap();
        let want: Vec<f32> = serde_json::from_value(r["last_logits"].clone()).unwrap();
        let ids = ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        let out = ok(&aiblock(
            &[
                "logits",
                "--model",
                tmp.path().to_str().unwrap(),
                "--tokens",
                &ids,
            ],
            tmp.path(),
        ));
        let got: Vec<f32> = serde_json::from_str(&out).unwrap();
        assert_eq!(got.len(), want.len());
        let err = max_rel_err(&got, &want);
        assert!(err <= 1e-3, "{}: relative error {err}", fixture.display());
    }
}

fn assert_same_tensors(a: &[u8], b: &[u8]) {
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

#[test]
fn qwen2_moe_import_publish_export_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    let model = work.join("qwen2");
    let cfg = tiny_family_config(Family::Qwen2Moe);
    write_random_model(&model, &cfg, 17).unwrap();
    // The relay's genesis: the meta block alone (config and tokenizer).
    let meta_only = work.join("meta-only/qwen2");
    std::fs::create_dir_all(&meta_only).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(model.join(f), meta_only.join(f)).unwrap();
    }
    let relay = TestRelay::start_cfg(
        ServeConfig {
            data_dir: work.join("data"),
            web_dir: None,
            model_dir: Some(meta_only),
            database: None,
        },
        |s| s,
        ServeOptions::default(),
    );
    let body = ureq::get(&format!("{}/chain/A/blocks", relay.url))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    let a: Vec<web_node::net::api::BlockInfo> = serde_json::from_str(&body).unwrap();
    assert_eq!(a.len(), 1);
    let meta = a[0].hash.to_hex();
    let key = work.join("data/operator.key");
    let out = ok(&aiblock(
        &[
            "import",
            "--model",
            model.to_str().unwrap(),
            "--meta-hash",
            &meta,
            "--address",
            "alice",
            "--key",
            key.to_str().unwrap(),
            "--relay",
            &relay.url,
            "--out",
            "blocks",
        ],
        work,
    ));
    // shared + per layer (router, shared expert, 8 experts).
    let n = 1 + cfg.num_hidden_layers * (2 + cfg.num_local_experts);
    assert!(out.contains(&format!("wrote {n} blocks")), "{out}");
    assert!(out.contains("layer1.shared_expert"), "{out}");
    assert!(
        out.contains("model.layers.1.mlp.shared_expert_gate.weight"),
        "{out}"
    );
    let out = ok(&aiblock(
        &["publish", "--relay", &relay.url, "--dir", "blocks"],
        work,
    ));
    assert!(out.contains(&format!("published {n} blocks")), "{out}");
    ok(&aiblock(
        &["export", "--relay", &relay.url, "--out", "exported"],
        work,
    ));
    let original = std::fs::read(model.join("model.safetensors")).unwrap();
    let exported = std::fs::read(work.join("exported/model.safetensors")).unwrap();
    assert_same_tensors(&original, &exported);

    // The exported directory answers as the original does.
    let logits = |dir: &Path| {
        ok(&aiblock(
            &[
                "logits",
                "--model",
                dir.to_str().unwrap(),
                "--tokens",
                "0,72,101,108",
            ],
            work,
        ))
    };
    assert_eq!(logits(&model), logits(&work.join("exported")));

    // A Qwen2-MoE checkpoint does not import against a Mixtral meta.
    let mixtral = work.join("mixtral");
    write_random_model(&mixtral, &tiny_family_config(Family::Mixtral), 1).unwrap();
    let o = aiblock(
        &[
            "import",
            "--model",
            mixtral.to_str().unwrap(),
            "--meta-hash",
            &meta,
            "--address",
            "alice",
            "--key",
            key.to_str().unwrap(),
            "--relay",
            &relay.url,
            "--dry-run",
        ],
        work,
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("does not match the meta config"), "{err}");
}

/// The committed default model through Hugging Face transformers'
/// `MixtralForCausalLM` (fixture made by `scripts/make_default_fixture.py`):
/// the tokenizer gives transformers' ids, `aiblock logits` gives its last
/// logits within 1e-5 of the largest, and `aiblock chat` its greedy answer.
#[test]
fn default_model_logits_match_transformers() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = crate::cli::default_model();
    let r: serde_json::Value = serde_json::from_slice(
        &std::fs::read(root.join("tests/fixtures/default_transformers.json")).unwrap(),
    )
    .unwrap();
    let sha =
        web_node::chain::BlockHash::of(&std::fs::read(model.join("model.safetensors")).unwrap())
            .to_hex();
    assert_eq!(
        r["model_sha256"].as_str().unwrap(),
        sha,
        "miner/tests/fixtures/default_transformers.json was made from another model: \
         run `python3 scripts/make_default_fixture.py` after changing models/default"
    );
    let tok =
        web_node::model::tokenizer::Tokenizer::from_file(model.join("tokenizer.json")).unwrap();
    let prompts = r["prompts"].as_array().unwrap();
    assert!(prompts.len() >= 5);
    let max_new = r["max_new_tokens"].as_u64().unwrap().to_string();
    for p in prompts {
        let text = p["text"].as_str().unwrap();
        let ids: Vec<u32> = serde_json::from_value(p["input_ids"].clone()).unwrap();
        assert_eq!(
            tok.encode_with(text, false).unwrap(),
            ids,
            "{text}: token ids"
        );
        let want: Vec<f32> = serde_json::from_value(p["last_logits"].clone()).unwrap();
        let list = ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        let m = model.to_str().unwrap();
        let got: Vec<f32> = serde_json::from_str(&ok(&aiblock(
            &["logits", "--model", m, "--tokens", &list],
            root,
        )))
        .unwrap();
        assert_eq!(got.len(), want.len(), "{text}: vocabulary");
        let err = max_rel_err(&got, &want);
        eprintln!("{text}: last logits' relative error against transformers {err:.2e}");
        assert!(err <= 1e-5, "{text}: logits relative error {err} > 1e-5");
        let answer = ok(&aiblock(
            &[
                "chat",
                "--model",
                m,
                "--prompt",
                text,
                "--max-tokens",
                &max_new,
            ],
            root,
        ));
        assert_eq!(
            answer.trim_end_matches('\n'),
            p["greedy_text"].as_str().unwrap(),
            "{text}: greedy answer"
        );
    }
}
