#!/usr/bin/env bash
# Peak RSS of herald while SESSIONS clients each send a SIZE_MIB message at
# once (default 20 x 20 MiB), every message delivered and checked intact.
#   bench/memory.sh [SESSIONS] [SIZE_MIB]
# Prints one RESULT line; copy it into docs/benchmarks.md with the date.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
S=${1:-20} M=${2:-20}
cargo build --release --locked
work=$(mktemp -d)
herald_config "$work/herald.toml" 2527 2601 "max_message_size = $(( (M + 5) * 1024 * 1024 ))"
./target/release/herald --config "$work/herald.toml" serve 2>"$work/herald.log" &
HPID=$!
trap 'kill $HPID 2>/dev/null; wait $HPID 2>/dev/null; rm -rf "$work"; true' EXIT
wait_port 2527
python3 bench/memory.py "$HPID" 2527 2601 "$S" "$M"
