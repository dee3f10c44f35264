#!/usr/bin/env bash
# Same-run throughput of two herald binaries (e.g. the last release and this
# tree), with the shared driver: smtp-source -> herald -> smtp-sink.
#   bench/before-after.sh OLD_HERALD_BINARY [MESSAGES] [SESSIONS] [REPS]
# Build the old one from a worktree: git worktree add /tmp/old REV &&
# (cd /tmp/old && cargo build --release --locked).
set -euo pipefail
cd "$(dirname "$0")/.."
OLD=$1 N=${2:-5000} S=${3:-10} R=${4:-3}
SHARED=${SHARED:-../shared/bench}
. bench/lib.sh
need_postfix_tools
cargo build --release --locked
work=$(mktemp -d)
HPID=
trap 'kill $HPID 2>/dev/null; wait 2>/dev/null; rm -rf "$work"; true' EXIT
run() { # $1 label, $2 binary
  rm -rf "$work/data"
  herald_config "$work/herald.toml" 2525 2600
  "$2" serve --config "$work/herald.toml" 2>"$work/$1.log" &
  HPID=$!
  wait_port 2525
  "$SHARED/bench.sh" -s "$S" -r "$R" -p "$HPID" -n "$1" -I 30 127.0.0.1:2525 "$N" | grep MEDIAN
  kill $HPID; wait $HPID 2>/dev/null || true
}
run before "$OLD"
run after ./target/release/herald
run before-again "$OLD"
