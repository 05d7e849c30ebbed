#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `aiblock quantize` and `aiblock verify-quant` on block files of the
//! default model, as a user runs them: `genesis` + `import` write the float
//! model, `quantize --blocks` the q8_0 model, `verify-quant` re-derives it;
//! a validly re-signed block with one altered scale is reported by tensor
//! and group (exit status 1). `genesis --quant` + `import` make a quantized
//! model with no source on the chain; `import --quant` of another format is
//! refused.

use crate::cli::{aiblock, default_model, ok};
use std::path::{Path, PathBuf};

use miner::blocks::{load_key, parse_block_file, write_block_file};
use web_node::chain::{BlockBuilder, PayloadDtype};
use web_node::model::Slot;

fn block_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "block"))
        .collect();
    v.sort();
    v
}

#[test]
fn quantize_and_verify_block_files() {
    let tmp = tempfile::tempdir().unwrap();
    let w = tmp.path();
    let model = default_model();
    let model = model.to_str().unwrap();
    ok(&aiblock(&["keygen", "--out", "key"], w));
    let meta = ok(&aiblock(
        &["genesis", "--model", model, "--key", "key", "--out", "src"],
        w,
    ));
    let meta = meta.trim().to_string();
    let meta_file = block_files(&w.join("src"))[0].clone();
    ok(&aiblock(
        &[
            "import",
            "--model",
            model,
            "--meta-hash",
            &meta,
            "--meta-file",
            meta_file.to_str().unwrap(),
            "--address",
            "op",
            "--key",
            "key",
            "--out",
            "src",
        ],
        w,
    ));
    assert_eq!(block_files(&w.join("src")).len(), 38);
    let out = ok(&aiblock(
        &[
            "quantize", "--blocks", "src", "--quant", "q8_0", "--key", "key", "--out", "q8",
        ],
        w,
    ));
    assert!(out.contains("3.7") && out.contains("smaller"), "{out}");
    let out = ok(&aiblock(
        &["verify-quant", "--blocks", "q8", "--sources", "src"],
        w,
    ));
    assert!(
        out.contains("32 quantized blocks re-derive exactly"),
        "{out}"
    );

    // One scale of layer1.expert3's w2 altered, the block validly re-signed.
    let path = w.join("q8/layer1.expert3.block");
    let (b, mut p) = parse_block_file(&std::fs::read(&path).unwrap()).unwrap();
    let tensor = "model.layers.1.block_sparse_moe.experts.3.w2.weight";
    let st = web_node::chain::parse_safetensors(&p).unwrap();
    let at = st
        .tensor(&format!("{tensor}.scales"))
        .unwrap()
        .data()
        .as_ptr() as usize
        - p.as_ptr() as usize
        + 2 * (4 * 8 + 6); // row 4, group 6 (w2 is [128, 256]: 8 groups a row)
    p[at] ^= 0x04;
    let key = load_key(&w.join("key")).unwrap();
    let forged = BlockBuilder::slot(
        b.header.meta.unwrap(),
        Slot::parse(&b.header.name).unwrap(),
        PayloadDtype::Q8_0,
    )
    .parents(b.header.parents.clone())
    .address(b.header.address.clone())
    .timestamp_ms(b.header.timestamp_ms)
    .chunk_size(b.header.chunk_size)
    .sign(&p, &key);
    std::fs::remove_file(&path).unwrap();
    write_block_file(&w.join("q8"), &forged, &p).unwrap();
    let o = aiblock(&["verify-quant", "--blocks", "q8", "--sources", "src"], w);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(!o.status.success(), "{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with("MISMATCH"))
        .unwrap_or_else(|| panic!("no MISMATCH line in {out}"));
    assert!(
        line.contains("layer1.expert3")
            && line.contains(tensor)
            && line.contains("group 6")
            && line.contains("row 4"),
        "{line}"
    );
    assert_eq!(
        out.lines().filter(|l| l.starts_with("ok ")).count(),
        31,
        "{out}"
    );

    // A quantized model with no source on the chain: genesis --quant, import.
    let qmeta = ok(&aiblock(
        &[
            "genesis", "--model", model, "--key", "key", "--quant", "q4_0", "--name", "d4",
            "--out", "g4",
        ],
        w,
    ));
    let qmeta = qmeta.trim().to_string();
    let qmeta_file = block_files(&w.join("g4"))[0].clone();
    let import = |quant: Option<&str>| {
        let mut args = vec![
            "import",
            "--model",
            model,
            "--meta-hash",
            &qmeta,
            "--meta-file",
            qmeta_file.to_str().unwrap(),
            "--address",
            "op",
            "--key",
            "key",
            "--out",
            "g4",
        ];
        if let Some(q) = quant {
            args.extend(["--quant", q]);
        }
        aiblock(&args, w)
    };
    let o = import(Some("q8_0"));
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("q4_0 model, not q8_0"));
    ok(&import(None));
    let (b, _) =
        parse_block_file(&std::fs::read(w.join("g4/layer0.expert0.block")).unwrap()).unwrap();
    assert_eq!(b.header.dtype, PayloadDtype::Q4_0);
    let (b, _) = parse_block_file(&std::fs::read(w.join("g4/shared.block")).unwrap()).unwrap();
    assert_eq!(b.header.dtype, PayloadDtype::F32);
}
