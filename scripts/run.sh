#!/usr/bin/env bash
# Build the web app and start the relay on the default data:
#   ./scripts/run.sh
# Then open the printed URL. Env: AIBLOCK_ADDR (default 127.0.0.1:8080),
# AIBLOCK_DATA (default ./data).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ADDR="${AIBLOCK_ADDR:-127.0.0.1:8080}"
DATA="${AIBLOCK_DATA:-./data}"

ensure_web_tools
build_web
log "cargo build --release -p relay"
cargo build --release -p relay

args=(serve --addr "$ADDR" --data "$DATA" --web dist)
if [ -f models/default/config.json ]; then
    args+=(--model models/default)
fi
echo
echo "    AI-Block relay: open http://$ADDR/  (Ctrl-C stops it)"
echo
exec cargo run --quiet --release -p relay -- "${args[@]}"
