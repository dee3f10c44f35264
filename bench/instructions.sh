#!/usr/bin/env bash
# Instructions per message, a figure that does not move with the machine's
# other tenants (issue 22): herald (release) under valgrind's callgrind
# relays MESSAGES messages of 4 KiB from one smtp-source session into
# smtp-sink; a second run relays none. Both count from the moment herald
# listens to its exit. (total - idle) / MESSAGES is the cost of one message:
# reception, rewrite, queue, delivery, events.
#   bench/instructions.sh [MESSAGES] [EXTRA_TOML]
# e.g. bench/instructions.sh 2000
#      bench/instructions.sh 2000 "$(printf '[cluster]\nredis = "redis://127.0.0.1:6379/0"')"
# CG_OUT=FILE keeps the busy run's callgrind file (callgrind_annotate FILE).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-2000} EXTRA=${2:-}
. bench/lib.sh
need_postfix_tools
command -v valgrind >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q valgrind >/dev/null
cargo build --release --locked
bench_workdir
count() { grep -ao 'mesg=[0-9]*' "$work/sink.out" 2>/dev/null | tail -1 | cut -d= -f2; }
# run MESSAGES: the instructions herald executed from start to exit.
run() {
  rm -rf "$work/data" "$work/cg.out"
  herald_config "$work/herald.toml" 2525 2600 "" "$EXTRA"
  start_sink "$work/sink.out"
  local sink=$!
  PIDS+=("$sink")
  # Counted from the moment herald listens: sled's thread pool starts with
  # threads that spin until it is set up, which under valgrind (one thread
  # at a time) costs a random hundred million instructions or more.
  valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$work/cg.out" \
    ./target/release/herald serve --config "$work/herald.toml" 2>"$work/valgrind.log" &
  local h=$!
  PIDS+=("$h")
  # run is called in $( ): its own trap stops what it started.
  trap 'kill "${PIDS[@]}" 2>/dev/null || true' EXIT
  for _ in $(seq 600); do (exec 3<>/dev/tcp/127.0.0.1/2525) 2>/dev/null && break; sleep 0.1; done
  callgrind_control -i on "$h" >/dev/null
  if [ "$1" -gt 0 ]; then
    smtp-source -l 4096 -m "$1" -s 1 -t to@example.com 127.0.0.1:2525
    local deadline=$((SECONDS + 600))
    until [ "$(count)" = "$1" ]; do
      [ $SECONDS -lt $deadline ] || { echo "the sink has $(count) of $1" >&2; exit 1; }
      sleep 0.2
    done
  fi
  kill -TERM "$h"; wait "$h" || true
  kill "$sink"; wait "$sink" 2>/dev/null || true
  [ -z "${CG_OUT:-}" ] || [ "$1" -eq 0 ] || cp "$work/cg.out" "$CG_OUT"
  sed -n 's/^summary: \([0-9]*\).*/\1/p; s/^totals: \([0-9]*\).*/\1/p' "$work/cg.out" | head -1
}
idle=$(run 0)
busy=$(run "$N")
awk -v b="$busy" -v i="$idle" -v n="$N" 'BEGIN {
  printf "instructions: %d idle (listening, then stop), %d with %d messages: %.0f per message\n", i, b, n, (b - i) / n }'
