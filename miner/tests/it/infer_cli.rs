#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `aiblock logits` and `aiblock chat` on a random model directory.

use std::process::Command;

use crate::cli::max_rel_err;
use web_node::model::load::ModelDir;
use web_node::model::random::{tiny_config, write_random_model};
use web_node::model::reference::CpuModel;
use web_node::model::{Forward, RunOptions};

fn aiblock() -> Command {
    Command::new(env!("CARGO_BIN_EXE_aiblock"))
}

#[test]
fn logits_prints_the_last_positions_logits_as_json() {
    let tmp = tempfile::tempdir().unwrap();
    write_random_model(tmp.path(), &tiny_config(), 21).unwrap();
    let out = aiblock()
        .args(["logits", "--model"])
        .arg(tmp.path())
        .args(["--tokens", "0,72,101,108"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Vec<f32> = serde_json::from_slice(&out.stdout).unwrap();
    let dir = ModelDir::load(tmp.path()).unwrap();
    let want = CpuModel::from_model_dir(&dir)
        .unwrap()
        .forward(&[0, 72, 101, 108], &RunOptions::default())
        .unwrap();
    assert_eq!(got, want);

    // Bad input: clear error, non-zero exit.
    for toks in ["", "1,x", "9999"] {
        let out = aiblock()
            .args(["logits", "--model"])
            .arg(tmp.path())
            .args(["--tokens", toks])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{toks}");
        assert!(!out.stderr.is_empty());
    }
}

#[test]
fn chat_generates_deterministically() {
    let tmp = tempfile::tempdir().unwrap();
    write_random_model(tmp.path(), &tiny_config(), 22).unwrap();
    let run = |extra: &[&str]| {
        let out = aiblock()
            .args(["chat", "--model"])
            .arg(tmp.path())
            .args(["--prompt", "Hi there", "--max-tokens", "8"])
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (out.stdout, String::from_utf8_lossy(&out.stderr).to_string())
    };
    let (a, err) = run(&["--temperature", "0.7", "--seed", "3", "--top-p", "0.9"]);
    assert!(err.contains("generated"), "{err}");
    let (b, _) = run(&["--temperature", "0.7", "--seed", "3", "--top-p", "0.9"]);
    assert_eq!(a, b);
    run(&["--top-k", "8"]);
    run(&["--no-moe"]);
    let out = aiblock()
        .args(["chat", "--model"])
        .arg(tmp.path())
        .args(["--prompt", "x", "--top-k", "9"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn logits_on_the_gpu_match_the_cpu() {
    let tmp = tempfile::tempdir().unwrap();
    write_random_model(tmp.path(), &tiny_config(), 23).unwrap();
    let run = |device: &str| {
        aiblock()
            .args(["logits", "--model"])
            .arg(tmp.path())
            .args(["--tokens", "0,72,101,108,108,111", "--device", device])
            .output()
            .unwrap()
    };
    let gpu = run("gpu");
    if !gpu.status.success() {
        let err = String::from_utf8_lossy(&gpu.stderr);
        assert!(err.contains("no usable GPU adapter"), "{err}");
        eprintln!("SKIPPED: {err}");
        return;
    }
    let cpu: Vec<f32> = serde_json::from_slice(&run("cpu").stdout).unwrap();
    let gpu: Vec<f32> = serde_json::from_slice(&gpu.stdout).unwrap();
    let err = max_rel_err(&gpu, &cpu);
    assert_eq!(cpu.len(), gpu.len());
    assert!(err < 1e-4, "relative error {err}");
}

/// `--quant` on the GPU: the experts are quantized as they load and read
/// packed by the quantized kernels; logits match the CPU engine with the
/// same quantized experts (models/default: sizes fit the groups of 32).
#[test]
fn quantized_logits_on_the_gpu_match_the_cpu() {
    let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/default");
    for q in ["q8_0", "q4_0"] {
        let run = |device: &str| {
            aiblock()
                .args(["logits", "--model"])
                .arg(&model)
                .args(["--tokens", "0,72,101,108,108,111", "--device", device])
                .args(["--quant", q])
                .output()
                .unwrap()
        };
        let gpu = run("gpu");
        if !gpu.status.success() {
            let err = String::from_utf8_lossy(&gpu.stderr);
            assert!(err.contains("no usable GPU adapter"), "{err}");
            eprintln!("SKIPPED: {err}");
            return;
        }
        let cpu: Vec<f32> = serde_json::from_slice(&run("cpu").stdout).unwrap();
        let gpu: Vec<f32> = serde_json::from_slice(&gpu.stdout).unwrap();
        let scale = cpu.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = cpu
            .iter()
            .zip(&gpu)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
            / scale;
        assert_eq!(cpu.len(), gpu.len());
        assert!(err < 1e-4, "{q}: relative error {err}");
    }
}
