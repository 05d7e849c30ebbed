//! Every `shaders/*.wgsl` parses and validates with naga (no GPU needed),
//! and every file is one the crate includes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

#[test]
fn every_shader_validates_with_naga() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shaders");
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("wgsl") {
            continue;
        }
        let src = std::fs::read_to_string(&path).unwrap();
        let module = naga::front::wgsl::parse_str(&src)
            .unwrap_or_else(|e| panic!("{}: {}", path.display(), e.emit_to_string(&src)));
        naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            // `unpack2x16float` (the f16 weight kernels) is core WGSL; naga
            // gates it behind this capability for backends that lack it.
            naga::valid::Capabilities::SHADER_FLOAT16_IN_FLOAT32,
        )
        .validate(&module)
        .unwrap_or_else(|e| panic!("{}: {}", path.display(), e.emit_to_string(&src)));
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        let included = web_node::gpu::SHADERS.iter().find(|(n, _)| *n == name);
        assert!(
            included.is_some_and(|(_, s)| *s == src),
            "{name}.wgsl is not the source the crate includes"
        );
        seen.push(name);
    }
    assert_eq!(
        seen.len(),
        web_node::gpu::SHADERS.len(),
        "every included shader is a file in shaders/"
    );
}

/// The barrier kernels' sources with their workgroup arrays sized for a
/// model (`kernel::sized_source`): every group of declarations is found in
/// each of them (a renamed array would silently stay at its largest size),
/// the sized source is smaller, and it still validates, at the default
/// model's shape and at odd small ones.
#[test]
fn sized_workgroup_arrays_apply_to_every_barrier_kernel() {
    use web_node::gpu::kernel::{sized_source, Shape};
    let validate = |name: &str, src: &str| {
        let module = naga::front::wgsl::parse_str(src)
            .unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(src)));
        naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::SHADER_FLOAT16_IN_FLOAT32,
        )
        .validate(&module)
        .unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(src)));
    };
    let mut sized = 0;
    for &(name, src) in web_node::gpu::SHADERS {
        let (expert, attn) = (
            name.starts_with("expert_up"),
            name.starts_with("attn_decode"),
        );
        if !(expert || attn) {
            let same = sized_source(
                src,
                &Shape {
                    hidden: 128,
                    n_experts: 8,
                    head_dim: 32,
                },
                16,
            );
            assert_eq!(same, src, "{name}: nothing to size");
            continue;
        }
        for (hidden, n_experts, head_dim, wg) in [(128, 8, 32, 16), (96, 3, 2, 1), (36, 5, 6, 7)] {
            let shape = Shape {
                hidden,
                n_experts: if expert { n_experts } else { 0 },
                head_dim: if attn { head_dim } else { 0 },
            };
            let s = sized_source(src, &shape, wg);
            assert!(
                s.contains(&format!(
                    "const MAX_HIDDEN: u32 = {}u;",
                    hidden.div_ceil(4) * 4
                )),
                "{name}: MAX_HIDDEN not sized"
            );
            if expert {
                assert!(
                    s.contains(&format!("const MAX_EXPERTS: u32 = {n_experts}u;")),
                    "{name}"
                );
                assert!(s.contains(&format!("r_red: array<f32, {wg}>")), "{name}");
            } else {
                assert!(
                    s.contains(&format!("const MAX_HEAD_DIM: u32 = {head_dim}u;")),
                    "{name}"
                );
                assert!(!s.contains("const RED: u32 = 256u;"), "{name}");
            }
            validate(name, &s);
            if attn {
                // Several query heads per workgroup (the engine writes QPW).
                let one = "const QPW: u32 = 1u;";
                assert!(s.contains(one), "{name}: no QPW");
                for qpw in [2, 3, 4] {
                    validate(name, &s.replace(one, &format!("const QPW: u32 = {qpw}u;")));
                }
            }
        }
        // Larger than the kernels' defaults: left as written.
        let big = Shape {
            hidden: 4096,
            n_experts: 300,
            head_dim: 512,
        };
        assert_eq!(sized_source(src, &big, 64), src, "{name}");
        sized += 1;
    }
    assert_eq!(sized, 10, "the expert_up and attn_decode kernels");
}
