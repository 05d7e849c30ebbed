#!/usr/bin/env bash
# The scale benchmark (issue 22), not part of the test command:
#   ./scripts/bench-scale.sh
# 1. writes a random checkpoint of a real MoE shape (OLMoE-1B-7B by default:
#    16 layers x 64 experts, top-8, hidden 2048, expert width 1024, vocab
#    50,304, f16), tensor by tensor, never holding the model in memory
#    (miner/examples/bench_scale.rs);
# 2. starts a relay with it as the genesis model (`relay serve --model`):
#    genesis time, until the relay listens;
# 3. the client core's sync of the relay (bench_scale sync): listing time
#    (both chains page by page, the chain-A payloads) and native header
#    verification time;
#    then the page (tests/e2e/scale_page.mjs, headless Chromium, served by
#    the relay from dist/): its listing and header verification time, load
#    time, first answer (CPU engine) and the bytes fetched for it, its
#    wasm memory, JS heap and Chromium's peak RSS; skipped with a message
#    when node, Chromium, playwright-core or the built page is missing, or
#    AIBLOCK_BENCH_PAGE=0;
# 4. `aiblock export --relay` (every head through the core, payloads verified);
# 5. `aiblock quantize --relay --quant q8_0` (a q8_0 model on the relay beside
#    the f16 one), unless AIBLOCK_BENCH_QUANT=0;
# 6. `aiblock peer` holding every block of layer 0: time until it holds them,
#    its peak RSS;
# 7. native CPU decode tokens/s (`aiblock chat`, f32 and q8_0 experts) and
#    its peak RSS, beside Hugging Face transformers (PyTorch, float32, same
#    threads) on the same checkpoint (scripts/bench_transformers.py; skipped
#    with a message when python3 cannot import torch and transformers, or
#    AIBLOCK_BENCH_TRANSFORMERS=0);
# 8. the relay's peak RSS (VmHWM); the work directory is deleted at the end
#    (AIBLOCK_BENCH_KEEP=1 keeps it).
#
# Size: AIBLOCK_SCALE_LAYERS, _EXPERTS, _TOPK, _HIDDEN, _EXPERT_WIDTH, _VOCAB,
# _FAMILY (olmoe|mixtral), _DTYPE (f16|f32). Full size is ~14 GB of f16 on
# disk and more in memory for the decode step; e.g. AIBLOCK_SCALE_HIDDEN=512
# AIBLOCK_SCALE_EXPERT_WIDTH=256 fits a small machine.
# Other env: AIBLOCK_BENCH_PROFILE (release|dev, default release; dev reuses
# the test build's dependencies and builds web-node's kernels at opt-level 3),
# AIBLOCK_BENCH_DIR (work dir, default a new one under target/),
# AIBLOCK_BENCH_TOKENS (decode tokens, default 16), AIBLOCK_BENCH_THREADS
# (default 2), AIBLOCK_BENCH_SKIP_BUILD=1, AIBLOCK_DIST (the built page the
# relay serves, default dist/: `source scripts/lib.sh && build_web`),
# AIBLOCK_CHROMIUM (default /usr/bin/chromium), AIBLOCK_BENCH_PAGE=0,
# AIBLOCK_BENCH_TRANSFORMERS=0.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

profile="${AIBLOCK_BENCH_PROFILE:-release}"
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
case "$profile" in
    release) bin="$target_dir/release"; build=(--release) ;;
    dev) bin="$target_dir/debug"; build=(--config 'profile.dev.package.web-node.opt-level=3') ;;
    *) echo "AIBLOCK_BENCH_PROFILE=$profile: release or dev" >&2; exit 2 ;;
esac
tokens="${AIBLOCK_BENCH_TOKENS:-16}"
threads="${AIBLOCK_BENCH_THREADS:-2}"

if [ "${AIBLOCK_BENCH_SKIP_BUILD:-0}" != 1 ]; then
    log "cargo build --profile $profile: relay, aiblock, the bench_scale example"
    cargo build "${build[@]}" -p relay -p miner --bins --example bench_scale
fi
bench="$bin/examples/bench_scale"
aiblock="$bin/aiblock"
relay_bin="$bin/relay"

work="${AIBLOCK_BENCH_DIR:-$target_dir/bench-scale}"
dist="${AIBLOCK_DIST:-$PWD/dist}"
# The page step's needs: the reason it is skipped, or empty.
page_skip=""
if [ "${AIBLOCK_BENCH_PAGE:-1}" != 1 ]; then
    page_skip="AIBLOCK_BENCH_PAGE=0"
elif ! command -v node > /dev/null; then
    page_skip="node not found"
elif [ ! -x "${AIBLOCK_CHROMIUM:-/usr/bin/chromium}" ]; then
    page_skip="no Chromium at ${AIBLOCK_CHROMIUM:-/usr/bin/chromium} (set AIBLOCK_CHROMIUM)"
elif [ ! -d tests/e2e/node_modules/playwright-core ]; then
    page_skip="playwright-core not installed (cd tests/e2e && npm ci)"
elif [ ! -f "$dist/index.html" ]; then
    page_skip="no built page at $dist (source scripts/lib.sh && build_web)"
fi
rm -rf "$work"
mkdir -p "$work"
relay_pid=""
cleanup() {
    if [ -n "$relay_pid" ] && kill -0 "$relay_pid" 2>/dev/null; then
        kill "$relay_pid" 2>/dev/null || true
        wait "$relay_pid" 2>/dev/null || true
    fi
    if [ "${AIBLOCK_BENCH_KEEP:-0}" != 1 ]; then rm -rf "$work"; fi
}
trap cleanup EXIT

now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
# Peak RSS (MB) from a `/usr/bin/time -v` report.
maxrss() { awk -F: '/Maximum resident set size/ { printf "%.0f", $2 / 1024 }' "$1"; }
results=()
report() { results+=("$(printf '%-44s %s' "$1" "$2")"); printf '    %-44s %s\n' "$1" "$2" >&2; }

log "1. random checkpoint (streamed) -> $work/model"
t0=$(now)
"$bench" write "$work/model" | tee "$work/write.txt"
report "checkpoint written" "$(secs "$t0" "$(now)") s, $(du -sh "$work/model/model.safetensors" | cut -f1)"
report "machine" "$(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"

log "2. relay serve with it as the genesis model"
t0=$(now)
web="$work/none"
[ -z "$page_skip" ] && web="$dist"
RUST_LOG=warn "$relay_bin" serve --addr 127.0.0.1:0 --data "$work/data" --web "$web" \
    --model "$work/model" --gate accept-all --key-burst 1000000 --key-per-minute 1000000 \
    --ip-burst 1000000 --ip-per-minute 1000000 > "$work/relay.out" 2> "$work/relay.err" &
relay_pid=$!
url=""
for _ in $(seq 1 36000); do
    url=$(sed -n 's/^relay listening on \(http:[^ ]*\).*/\1/p' "$work/relay.out" | head -1)
    [ -n "$url" ] && break
    kill -0 "$relay_pid" 2>/dev/null || { cat "$work/relay.err" >&2; exit 1; }
    sleep 0.05
done
[ -n "$url" ] || { echo "the relay did not start" >&2; exit 1; }
report "genesis (relay start to listening)" "$(secs "$t0" "$(now)") s at $url"

log "3. client core: listing and native header verification"
"$bench" sync "$url" | tee "$work/sync.txt"
report "listing" "$(sed -n 's/^listing: //p' "$work/sync.txt")"
report "header verification (native)" "$(sed -n 's/^header verification (native): //p' "$work/sync.txt")"

log "3b. the page (headless Chromium, CPU engine): load, verification, first answer"
mib() { awk -v b="$1" 'BEGIN { if (b == "" || b == "null") print "?"; else printf "%.1f", b / 1048576 }'; }
if [ -n "$page_skip" ]; then
    report "page" "skipped: $page_skip"
elif SCALE_TOKENS="${AIBLOCK_BENCH_PAGE_TOKENS:-8}" node tests/e2e/scale_page.mjs "$url" \
        > "$work/page.json" 2> "$work/page.err"; then
    # One JSON object; a field by name (numbers, strings, null).
    pj() { node -e 'const j = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8")); const v = j[process.argv[2]]; console.log(v == null ? "?" : typeof v === "number" ? String(Math.round(v * 10) / 10) : v)' "$work/page.json" "$1"; }
    report "page: listing + meta payloads" "$(pj listMs) ms (wasm, page clock)"
    report "header verification (page)" "$(pj verifyMs) ms for $(pj blocks) blocks ($(pj verified) verified, $(pj failed) failed)"
    report "page: startup payloads" "$(pj startupMs) ms; load until online $(pj loadMs) ms, $(mib "$(pj loadPayloadBytes)") MiB of payloads, $(mib "$(pj loadRestBytes)") MiB REST bodies"
    report "page: first answer (CPU engine)" "$(pj answerMs) ms ($(pj answerState), $(pj answerTokens) tokens, first token $(pj firstTokenMs) ms)"
    report "page: bytes for the first answer" "$(mib "$(pj answerPayloadBytes)") MiB of payloads in $(pj answerRequests) requests, $(pj answerMBps) MB/s over the answer; session: $(mib "$(pj totalPayloadBytes)") MiB of payloads ($(mib "$(pj wsBytesFromRelay)") MiB over /ws from the relay, $(mib "$(pj wsBytesFromPeers)") from peers), $(mib "$(pj totalRestBytes)") MiB REST bodies"
    report "page: peak memory" "wasm $(mib "$(pj wasmBytes)") MiB (budget $(mib "$(pj budget)") MiB), JS heap $(mib "$(pj jsHeapPeak)") MiB, Chromium RSS $(mib "$(pj chromiumPeakRss)") MiB"
else
    report "page" "FAILED: $(tail -3 "$work/page.err" | tr '\n' ' ')"
fi

log "4. aiblock export --relay (every head, verified)"
t0=$(now)
/usr/bin/time -v -o "$work/export.time" "$aiblock" export --relay "$url" --out "$work/exported" > /dev/null
report "aiblock export --relay" "$(secs "$t0" "$(now)") s, peak RSS $(maxrss "$work/export.time") MB"
# The streamed checkpoint's layout is not safetensors' canonical one that
# export writes: compare tensor by tensor.
if same=$("$bench" compare "$work/model/model.safetensors" "$work/exported/model.safetensors" 2>&1); then
    report "export == checkpoint" "$same"
else
    report "export == checkpoint" "DIFFERS: $same"
fi
rm -rf "$work/exported"

if [ "${AIBLOCK_BENCH_QUANT:-1}" = 1 ]; then
    log "5. aiblock quantize --relay --quant q8_0 (published beside the f16 model)"
    t0=$(now)
    if RUST_LOG=warn "$aiblock" quantize --relay "$url" --quant q8_0 --key "$work/data/operator.key" \
        --out "$work/q8" --threads "$threads" > "$work/quant.out" 2>&1; then
        report "quantize q8_0 + publish" "$(secs "$t0" "$(now)") s, $(du -sh "$work/q8" | cut -f1) of blocks"
    else
        report "quantize q8_0 + publish" "FAILED: $(tail -1 "$work/quant.out")"
    fi
    rm -rf "$work/q8"
fi

log "6. aiblock peer holding layer 0"
want=$(( ${AIBLOCK_SCALE_EXPERTS:-64} + 1 ))
t0=$(now)
RUST_LOG=warn /usr/bin/time -v -o "$work/peer.time" "$aiblock" peer --relay "${url/http/ws}/ws" \
    --data "$work/node" --experts 'layer0.*' > "$work/peer.out" 2>&1 &
time_pid=$!
held=0
for _ in $(seq 1 12000); do
    held=$( (find "$work/node/payloads" -name '*.bin' 2>/dev/null || true) | wc -l)
    [ "$held" -ge "$want" ] && break
    kill -0 "$time_pid" 2>/dev/null || break
    sleep 0.05
done
took=$(secs "$t0" "$(now)")
peer_pid=$(pgrep -P "$time_pid" || true)
[ -n "$peer_pid" ] && kill -INT "$peer_pid" 2>/dev/null || true
wait "$time_pid" 2>/dev/null || true
report "aiblock peer: layer 0 held ($held/$want blocks)" "$took s (sync, fetch, verify, store), peak RSS $(maxrss "$work/peer.time") MB"

log "7. native CPU decode ($tokens tokens, $threads threads)"
for q in none q8_0; do
    args=()
    [ "$q" = none ] || args=(--quant "$q")
    if /usr/bin/time -v -o "$work/chat.time" "$aiblock" chat --model "$work/model" --prompt "The chain" \
        --max-tokens "$tokens" --threads "$threads" "${args[@]}" > /dev/null 2> "$work/chat.err"; then
        rate=$(sed -n 's/.*decode \([0-9.]*\) tokens\/s.*/\1/p' "$work/chat.err")
        first=$(sed -n 's/.*prefill+first token \([0-9.]*\) ms.*/\1/p' "$work/chat.err")
        report "CPU decode, experts $q" "$rate tok/s (first token $first ms), peak RSS $(maxrss "$work/chat.time") MB"
    else
        report "CPU decode, experts $q" "FAILED: $(tail -1 "$work/chat.err")"
    fi
done

if [ "${AIBLOCK_BENCH_TRANSFORMERS:-1}" != 1 ]; then
    report "transformers CPU decode" "skipped: AIBLOCK_BENCH_TRANSFORMERS=0"
elif ! python3 -c 'import torch, transformers' 2> /dev/null; then
    report "transformers CPU decode" "skipped: python3 cannot import torch and transformers"
elif /usr/bin/time -v -o "$work/tf.time" python3 scripts/bench_transformers.py "$work/model" \
        --tokens "$tokens" --threads "$threads" --prompt "The chain" > "$work/tf.out" 2> "$work/tf.err"; then
    line=$(grep '^RESULT transformers' "$work/tf.out")
    tf() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<< "$line"; }
    report "transformers CPU decode (float32)" "$(tf decode_tok_per_s) tok/s (prefill $(tf prefill_ms) ms, load $(tf load_s) s, torch $(tf torch)), peak RSS $(maxrss "$work/tf.time") MB"
else
    report "transformers CPU decode" "FAILED: $(tail -1 "$work/tf.err")"
fi

relay_rss=$(awk '/VmHWM/ { printf "%.0f", $2 / 1024 }' "/proc/$relay_pid/status")
report "relay peak RSS (VmHWM)" "$relay_rss MB"
report "disk used by the run" "$(du -sh "$work" | cut -f1)"

echo
echo "bench-scale ($profile build; $(head -1 "$work/write.txt" | sed 's/^wrote [^ ]* //'))"
printf '%s\n' "${results[@]}"
