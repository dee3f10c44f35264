#!/usr/bin/env bash
# p50/p99 of the time from the client's final dot to the relay's reply
# (issue 22), herald and Postfix side by side in the same run: each relays
# into smtp-sink on 127.0.0.1:2600; bench/latency.py times every message.
#   bench/latency.sh [MESSAGES] [SESSIONS]
# Needs root for Postfix (as bench/compare.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-5000} S=${2:-10}
SHARED=${SHARED:-../shared/bench}
. bench/lib.sh
need_postfix_tools
cargo build --release --locked
work=$(mktemp -d)
start_sink "$work/sink.out"
SINK=$!
herald_config "$work/herald.toml" 2525 2600
./target/release/herald serve --config "$work/herald.toml" 2>"$work/herald.log" &
HPID=$!
trap 'kill $HPID $SINK 2>/dev/null; wait 2>/dev/null; "$SHARED/postfix-peer.sh" stop; rm -rf "$work"' EXIT
wait_port 2525
postfix_peer_start >/dev/null
wait_port 2625
echo "== $(date -u +%Y-%m-%d), $(nproc) cores, $N messages of 4 KiB over $S sessions"
printf 'herald   '; python3 bench/latency.py 127.0.0.1:2525 "$N" "$S"
printf 'postfix  '; python3 bench/latency.py 127.0.0.1:2625 "$N" "$S"
