#!/usr/bin/env bash
# Three herald nodes of one cluster against one node, same run: N messages
# of 4 KiB from smtp-source (S sessions per node; with three nodes each gets
# N/3 at once), all into one smtp-sink; the time until the sink has them all.
# On one 2-core machine three nodes share the same CPUs: this measures what
# the cluster costs, not what more machines would give.
#   bench/cluster-nodes.sh [MESSAGES] [SESSIONS] [REPS]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-6000} S=${2:-10} R=${3:-3}
. bench/lib.sh
need_postfix_tools
cargo build --release --locked
bench_workdir
redis-server --port 6399 --bind 127.0.0.1 --save "" --appendonly no --dir "$work" >/dev/null &
PIDS+=($!)
wait_port 6399
count() { grep -ao 'mesg=[0-9]*' "$work/sink.out" 2>/dev/null | tail -1 | cut -d= -f2; }
run() { # $1 nodes
  local nodes=$1 per=$((N / $1)) herald=() i
  for i in $(seq "$nodes"); do
    mkdir -p "$work/n$i"; rm -rf "$work/n$i/data"
    herald_config "$work/n$i/herald.toml" $((2524 + i)) 2600 "" \
      "$(printf '[cluster]\nredis = "redis://127.0.0.1:6399/0"\nnode = "n%s"\n' "$i")"
    ./target/release/herald serve --config "$work/n$i/herald.toml" 2>"$work/n$i.log" &
    herald+=($!)
    wait_port $((2524 + i))
  done
  start_sink "$work/sink.out"
  local sink=$!
  wait_port 2600
  sleep 1
  local t0 src=()
  t0=$(date +%s.%N)
  for i in $(seq "$nodes"); do
    smtp-source -l 4096 -m "$per" -s "$S" -t to@example.com 127.0.0.1:$((2524 + i)) &
    src+=($!)
  done
  wait "${src[@]}"
  local t_acc
  t_acc=$(echo "$(date +%s.%N) - $t0" | bc)
  local deadline=$((SECONDS + 120))
  until [ "$(count)" = $((per * nodes)) ]; do
    [ $SECONDS -lt $deadline ] || { echo "the sink has $(count) of $((per * nodes)) after 120 s" >&2; exit 1; }
    sleep 0.01
  done
  local t_e2e
  t_e2e=$(echo "$(date +%s.%N) - $t0" | bc)
  printf 'nodes=%s n=%s s=%s/node acc_rate=%.0f e2e_rate=%.0f\n' "$nodes" $((per * nodes)) "$S" \
    "$(echo "$per * $nodes / $t_acc" | bc -l)" "$(echo "$per * $nodes / $t_e2e" | bc -l)"
  kill "$sink" "${herald[@]}"; wait "$sink" "${herald[@]}" 2>/dev/null || true
}
for _ in $(seq "$R"); do run 1; run 3; done
