#!/usr/bin/env bash
# Run every test:
#   ./scripts/test.sh
# formatting, clippy (-D warnings), cargo test --workspace, the wasm build
# (trunk), and the headless-Chromium tests in tests/e2e when node and chromium
# are installed.
#
# AIBLOCK_REQUIRE_E2E=1: fail (instead of skipping) when the browser tests cannot run.
# AIBLOCK_REQUIRE_GPU=1: GPU tests fail (instead of skipping) without a wgpu adapter,
#                        and the browser test requires a WebGPU adapter.
# AIBLOCK_REQUIRE_PG=1:  PostgreSQL tests fail (instead of skipping) without
#                        PostgreSQL's initdb/pg_ctl (apt-get install postgresql).
# CI (.ci/run) sets all three.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

SECONDS=0

# Relay integration tests that run again on PostgreSQL (the others look at
# the embedded store's files on disk).
# (Filters on the module paths of the one integration-test binary per crate;
# --workspace keeps the feature set of the run above, so nothing recompiles.)
PG_BEHAVIOUR_FILTERS="api:: authz:: concurrency:: p2p:: ws:: rewards:: chat::"

have_postgres() {
    [ -n "${AIBLOCK_PG_BIN:-}" ] && return 0
    command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1 && return 0
    ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1
}
step() { log "[$((SECONDS / 60))m$((SECONDS % 60))s] $*"; }

ensure_web_tools

step "cargo fmt --all -- --check"
cargo fmt --all -- --check

# The relay's layers: no cycle between its files, no import up the table.
if command -v python3 >/dev/null 2>&1; then
    step "relay module graph (scripts/relay_layers.py)"
    python3 scripts/relay_layers.py relay/src check
else
    log "python3 not found: relay module-graph check skipped"
fi

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo clippy -p web-node --target wasm32-unknown-unknown -- -D warnings"
cargo clippy -p web-node --target wasm32-unknown-unknown -- -D warnings

# Every binary first: tests outside the relay crate start the real `relay`
# (miner's `aiblock demo` test finds it in target/debug; cargo builds a
# crate's own binaries for its tests only).
step "cargo build --workspace --bins"
cargo build --workspace --bins

step "cargo test --workspace"
cargo test --workspace

# The relay's behaviour tests once more with every relay on PostgreSQL (a
# throwaway server; the store tests above already ran on both backends).
if have_postgres; then
    step "relay behaviour tests on PostgreSQL (AIBLOCK_TEST_STORE=postgres)"
    AIBLOCK_TEST_STORE=postgres cargo test --workspace --test it -- $PG_BEHAVIOUR_FILTERS
else
    printf '\n\033[1;33m##  POSTGRESQL TESTS SKIPPED: initdb/pg_ctl not found (apt-get install postgresql)\033[0m\n\n'
    if [ "${AIBLOCK_REQUIRE_PG:-0}" = 1 ]; then
        echo "AIBLOCK_REQUIRE_PG=1: failing because PostgreSQL is not installed" >&2
        exit 1
    fi
fi

step "web app (wasm) build"
build_web

skip_e2e() {
    printf '\n\033[1;33m'
    printf '############################################################\n'
    printf '##  BROWSER TESTS SKIPPED: %s\n' "$1"
    printf '##  (install chromium and node/npm, or see .ci/run)\n'
    printf '############################################################\033[0m\n\n'
    if [ "${AIBLOCK_REQUIRE_E2E:-0}" = 1 ]; then
        echo "AIBLOCK_REQUIRE_E2E=1: failing because the browser tests did not run" >&2
        exit 1
    fi
}

CHROMIUM="${AIBLOCK_CHROMIUM:-/usr/bin/chromium}"
if ! command -v node >/dev/null 2>&1; then
    skip_e2e "node is not installed"
elif [ ! -x "$CHROMIUM" ]; then
    skip_e2e "no chromium at $CHROMIUM"
else
    if [ ! -d tests/e2e/node_modules/playwright-core ]; then
        if command -v npm >/dev/null 2>&1; then
            step "npm ci (tests/e2e)"
            (cd tests/e2e && npm ci --no-audit --no-fund)
        fi
    fi
    if [ ! -d tests/e2e/node_modules/playwright-core ]; then
        skip_e2e "playwright-core is not installed (cd tests/e2e && npm ci)"
    else
        # The binaries, the lying peer and the native greedy decoder the browser tests use.
        step "cargo build -p relay -p miner --bins --example corrupt_peer --example greedy_ids"
        cargo build -p relay -p miner --bins --example corrupt_peer --example greedy_ids
        target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
        export AIBLOCK_RELAY_BIN="$target_dir/debug/relay" AIBLOCK_MINER_BIN="$target_dir/debug/aiblock" AIBLOCK_DIST="$PWD/dist"
        step "browser tests: node tests/e2e/verify.mjs"
        node tests/e2e/verify.mjs
        step "browser node tests: node tests/e2e/node.mjs"
        node tests/e2e/node.mjs
        # The README's first command as written: ./scripts/run.sh on the
        # default ./data (release build of the relay, once), Ctrl-C, restart.
        step "first run: node tests/e2e/first_run.mjs (./scripts/run.sh, default ./data)"
        node tests/e2e/first_run.mjs
        step "quantized model: node tests/e2e/quant.mjs (aiblock quantize, two browsers on q8_0)"
        node tests/e2e/quant.mjs
        step "page at scale: node tests/e2e/scale.mjs (1,042 blocks, memory budget, storage quota)"
        node tests/e2e/scale.mjs
        step "direct transfer: node tests/e2e/direct.mjs (WebRTC between pages, failover, a liar banned)"
        node tests/e2e/direct.mjs
    fi
fi

step "all tests passed"
