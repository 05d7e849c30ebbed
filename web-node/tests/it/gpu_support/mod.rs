#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]
//! Shared by the GPU test binaries: one context per binary, skip (or fail
//! under `AIBLOCK_REQUIRE_GPU=1` / feature `require-gpu`) without an adapter.

use std::sync::{Arc, OnceLock};

use web_node::gpu::GpuContext;

pub fn require_gpu() -> bool {
    cfg!(feature = "require-gpu") || std::env::var("AIBLOCK_REQUIRE_GPU").is_ok_and(|v| v == "1")
}

/// The shared context, or `None` (after printing why) when there is no adapter.
pub fn ctx() -> Option<&'static GpuContext> {
    static CTX: OnceLock<Option<GpuContext>> = OnceLock::new();
    let c = CTX
        .get_or_init(|| match GpuContext::new_blocking() {
            Ok(c) => {
                eprintln!(
                    "gpu tests on adapter {:?} ({:?}), workgroup {}",
                    c.info.name, c.info.backend, c.workgroup_size
                );
                Some(c)
            }
            Err(e) => {
                eprintln!("SKIPPED: no GPU adapter ({e})");
                None
            }
        })
        .as_ref();
    if c.is_none() && require_gpu() {
        panic!("AIBLOCK_REQUIRE_GPU=1 but no GPU adapter is available");
    }
    c
}

/// A second handle on the shared context's device, for an engine (which
/// takes an `Arc`).
pub fn shared_ctx(c: &GpuContext) -> Arc<GpuContext> {
    Arc::new(c.clone())
}

/// `max |a - b| <= tol * max(1, max |b|)` with a message naming the worst index.
pub fn assert_close(gpu: &[f32], cpu: &[f32], tol: f32, what: &str) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: length");
    let scale = cpu.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    let mut worst = (0usize, 0.0f32);
    for (i, (a, b)) in gpu.iter().zip(cpu).enumerate() {
        let d = (a - b).abs();
        assert!(d.is_finite(), "{what}: non-finite at {i}: gpu {a} cpu {b}");
        if d > worst.1 {
            worst = (i, d);
        }
    }
    assert!(
        worst.1 <= tol * scale,
        "{what}: max diff {} at {} (gpu {} cpu {}), allowed {}",
        worst.1,
        worst.0,
        gpu[worst.0],
        cpu[worst.0],
        tol * scale
    );
}
