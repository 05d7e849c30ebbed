# Shared by run.sh and test.sh: install the web toolchain if it is missing.
# Versions are pinned: trunk 0.22 needs a newer rustc than stable 1.95 here, and
# wasm-bindgen-cli must equal the wasm-bindgen crate pinned in Cargo.toml.

TRUNK_VERSION=0.21.14
WASM_BINDGEN_VERSION=0.2.130
# wasm-opt (binaryen) from npm: installs in seconds; its `-Oz` output (trunk's
# data-wasm-opt="z", no --all-features) runs in Chromium. Debian's binaryen
# (108) is too old: its output fails in Chromium.
BINARYEN_VERSION=132.0.0
WASM_OPT_MIN=116
AIBLOCK_TOOLS="${AIBLOCK_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/aiblock}"

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
    ensure_wasm_opt
}

# The version number of the wasm-opt on PATH (0 if none).
wasm_opt_version() {
    wasm-opt --version 2>/dev/null | awk '{print $3}' | grep -E '^[0-9]+$' || echo 0
}

# Put a wasm-opt >= $WASM_OPT_MIN first on PATH: npm's binaryen, installed
# under $AIBLOCK_TOOLS. Without npm, a stand-in that copies the wasm
# unoptimised, so the build still works (bigger bundle, with a warning).
ensure_wasm_opt() {
    local npm_bin="$AIBLOCK_TOOLS/binaryen-$BINARYEN_VERSION/node_modules/.bin"
    if [ -x "$npm_bin/wasm-opt" ]; then
        export PATH="$npm_bin:$PATH"
    fi
    if [ "$(wasm_opt_version)" -ge "$WASM_OPT_MIN" ]; then
        return 0
    fi
    if command -v npm >/dev/null 2>&1; then
        log "installing wasm-opt (npm binaryen@$BINARYEN_VERSION, seconds, once)"
        if npm install --no-audit --no-fund --silent \
            --prefix "$AIBLOCK_TOOLS/binaryen-$BINARYEN_VERSION" "binaryen@$BINARYEN_VERSION"; then
            export PATH="$npm_bin:$PATH"
        fi
    fi
    if [ "$(wasm_opt_version)" -ge "$WASM_OPT_MIN" ]; then
        return 0
    fi
    log "WARNING: no wasm-opt >= $WASM_OPT_MIN (install npm); the wasm bundle is built unoptimised"
    local shim="$AIBLOCK_TOOLS/wasm-opt-passthrough"
    mkdir -p "$shim"
    cat >"$shim/wasm-opt" <<'SHIM'
#!/bin/sh
# Stand-in for wasm-opt (scripts/lib.sh): copies the input to --output.
if [ "$1" = "--version" ]; then echo "wasm-opt version 0 (passthrough)"; exit 0; fi
out=; in=
for a in "$@"; do
    case "$a" in
        --output=*) out="${a#--output=}" ;;
        -*) ;;
        *) in="$a" ;;
    esac
done
exec cp "$in" "$out"
SHIM
    chmod +x "$shim/wasm-opt"
    export PATH="$shim:$PATH"
}

# Build the web app into dist/. Trunk must not download tools (--offline);
# `cargo fetch` first so a fresh checkout has its crates. Trunk runs wasm-opt
# -Oz (index.html data-wasm-opt="z"); the text assets then get .gz siblings
# that the relay serves as they are (ServeDir precompressed_gzip).
build_web() {
    cargo fetch --quiet
    ensure_wasm_opt
    log "trunk build --release --offline (wasm-opt $(wasm_opt_version))"
    trunk build --release --offline
    find dist -type f \( -name '*.wasm' -o -name '*.js' -o -name '*.html' -o -name '*.css' \) \
        -exec gzip -9 -k -f {} +
    local wasm
    for wasm in dist/*.wasm; do
        [ -f "$wasm" ] && log "$wasm: $(wc -c <"$wasm") bytes, $(wc -c <"$wasm.gz") gzipped"
    done
}
