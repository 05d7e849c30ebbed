#!/usr/bin/env bash
# The browser benchmark (issue 11), in one run:
#   ./scripts/bench-browser.sh
# decode tokens/s in headless Chromium (WebGPU on SwiftShader, the CPU path
# with and without wasm SIMD128) beside the native engine (wgpu on lavapipe,
# the CPU reference), time to first token cold and from the cache, the wasm
# bundle's size raw and compressed, and the block bytes downloaded before the
# first token beside the whole model's.
#
# First, the fixed-length decode (issue 21, tests/e2e/decode_bench.mjs): N
# tokens (BENCH_DECODE, default 64) after one prompt, EOS ignored, every
# expert resident, f32/f16/q8_0/q4_0 (BENCH_DTYPES), in the page (WebGPU on
# SwiftShader, window.wasmBindings.bench_decode) beside native lavapipe
# (greedy_ids --fixed N), one `RESULT browser dtype=.. ms_per_token=..
# native_lavapipe_ms_per_token=.. ratio=.. tokens_equal=..` line per format:
#   BENCH_ONLY=decode ./scripts/bench-browser.sh     # only that part
#
# Builds: the relay (debug, as the tests), the native greedy_ids example
# (release, for the native tokens/s), the web app
# into dist/ (SIMD128, .cargo/config.toml) and, unless BENCH_NO_NOSIMD=1, a
# second web app without SIMD into target/bench-browser/dist-nosimd (its own
# target dir, so the main wasm build is not invalidated; the first run
# compiles the wasm crates once more, a few minutes).
#
# Env: BENCH_TOKENS (default 16), BENCH_PROMPTS, BENCH_SKIP_BUILD=1 (use the
# builds as they are), WGPU_ADAPTER_NAME (native adapter; default llvmpipe),
# BENCH_ONLY=decode (the fixed-length decode only; skips the SIMD-less
# build), BENCH_DECODE, BENCH_DTYPES, BENCH_ROUNDS, BENCH_VARIANTS
# (decode_bench.mjs; e.g. BENCH_VARIANTS=fused_attn,fused,unfused).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
nosimd_target="$target_dir/bench-browser/target-nosimd"
nosimd_dist="$target_dir/bench-browser/dist-nosimd"

if [ "${BENCH_SKIP_BUILD:-0}" != 1 ]; then
    ensure_web_tools
    log "cargo build -p relay (debug, as the tests) and the greedy_ids example (release: native speed)"
    cargo build -p relay
    cargo build --release -p miner --example greedy_ids
    build_web
    if [ "${BENCH_NO_NOSIMD:-0}" != 1 ] && [ "${BENCH_ONLY:-}" != decode ]; then
        log "web app without SIMD128 -> $nosimd_dist"
        mkdir -p "$nosimd_dist"
        # RUSTFLAGS replaces .cargo/config.toml's target rustflags (+simd128).
        RUSTFLAGS="-C target-feature=-simd128" CARGO_TARGET_DIR="$nosimd_target" \
            trunk build --release --offline --dist "$nosimd_dist"
    fi
fi

if [ -d "$nosimd_dist" ] && ls "$nosimd_dist"/*.wasm >/dev/null 2>&1 && [ "${BENCH_NO_NOSIMD:-0}" != 1 ]; then
    export AIBLOCK_DIST_NOSIMD="$nosimd_dist"
fi

if [ ! -d tests/e2e/node_modules/playwright-core ]; then
    (cd tests/e2e && npm ci --no-audit --no-fund)
fi

export WGPU_ADAPTER_NAME="${WGPU_ADAPTER_NAME:-llvmpipe}"
export AIBLOCK_RELAY_BIN="$target_dir/debug/relay"
export AIBLOCK_GREEDY_IDS_BIN="$target_dir/release/examples/greedy_ids"
export AIBLOCK_DIST="$PWD/dist"
node tests/e2e/decode_bench.mjs
if [ "${BENCH_ONLY:-}" != decode ]; then
    exec node tests/e2e/bench.mjs
fi
