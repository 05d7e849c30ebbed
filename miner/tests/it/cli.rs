#![allow(clippy::unwrap_used, clippy::expect_used)]
//! What the CLI tests share: the `aiblock` binary run in a directory, its
//! success checked, and the committed default model.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The committed default model.
pub fn default_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/default")
}

/// Run `aiblock args` in `cwd` (warnings only in the log, no backtraces).
pub fn aiblock(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_aiblock"))
        .args(args)
        .current_dir(cwd)
        .env("RUST_LOG", "warn")
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap()
}

/// Its stdout, after asserting it succeeded (both streams in the failure).
pub fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "command failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The largest absolute difference between `got` and `want`, over the
/// largest magnitude in `want` (logits compared with a reference).
pub fn max_rel_err(got: &[f32], want: &[f32]) -> f32 {
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    got.iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
        / scale
}
