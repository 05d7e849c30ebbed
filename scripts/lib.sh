# Shared by run.sh and test.sh: install the web toolchain if it is missing.
# Versions are pinned: trunk 0.22 needs a newer rustc than stable 1.95 here, and
# wasm-bindgen-cli must equal the wasm-bindgen crate pinned in Cargo.toml.

TRUNK_VERSION=0.21.14
WASM_BINDGEN_VERSION=0.2.130

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

ensure_web_tools() {
    if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown; then
        log "installing the wasm32-unknown-unknown target"
        rustup target add wasm32-unknown-unknown
    fi
    if ! command -v trunk >/dev/null 2>&1; then
        log "installing trunk $TRUNK_VERSION (a few minutes, once)"
        cargo install "trunk@$TRUNK_VERSION" --locked
    elif ! trunk --version | grep -q "trunk $TRUNK_VERSION"; then
        log "note: using $(trunk --version); this project is tested with trunk $TRUNK_VERSION"
    fi
    if ! wasm-bindgen --version 2>/dev/null | grep -q "wasm-bindgen $WASM_BINDGEN_VERSION"; then
        log "installing wasm-bindgen-cli $WASM_BINDGEN_VERSION (a few minutes, once)"
        # No --locked: its lockfile names a crate version the registry no longer serves.
        cargo install wasm-bindgen-cli --version "$WASM_BINDGEN_VERSION" --force
    fi
}

# Build the web app into dist/. Trunk must not download tools (--offline);
# `cargo fetch` first so a fresh checkout has its crates.
build_web() {
    cargo fetch --quiet
    log "trunk build --release --offline"
    trunk build --release --offline
}
