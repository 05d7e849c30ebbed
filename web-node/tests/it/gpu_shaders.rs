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
