#!/usr/bin/env bash
# One herald node with [cluster] (a redis-server of its own on 127.0.0.1:6399,
# no persistence) against the same node without, same run, with the shared
# driver: smtp-source -> herald -> smtp-sink. Prints the MEDIAN lines, the
# Redis commands per message (INFO commandstats) and Redis's own CPU.
#   bench/cluster.sh [MESSAGES] [SESSIONS] [REPS]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-5000} S=${2:-10} R=${3:-3}
SHARED=${SHARED:-../shared/bench}
. bench/lib.sh
need_postfix_tools
command -v redis-server >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server >/dev/null
cargo build --release --locked
work=$(mktemp -d)
HPID= RPID=
trap 'kill $HPID $RPID 2>/dev/null; wait 2>/dev/null; rm -rf "$work"; true' EXIT
redis-server --port 6399 --bind 127.0.0.1 --save "" --appendonly no --dir "$work" >/dev/null &
RPID=$!
wait_port 6399
run() { # $1 label, $2 extra TOML (Redis's CPU counts with the relay's: it is part of the cluster)
  rm -rf "$work/data"
  herald_config "$work/herald.toml" 2525 2600 "" "$2"
  ./target/release/herald serve --config "$work/herald.toml" 2>"$work/$1.log" &
  HPID=$!
  wait_port 2525
  "$SHARED/bench.sh" -s "$S" -r "$R" -P "echo $HPID $RPID" -n "$1" -I 30 127.0.0.1:2525 "$N" | grep -E "MEDIAN|warning"
  kill $HPID; wait $HPID 2>/dev/null || true
}
redis_calls() { redis-cli -p 6399 info commandstats | tr -d '\r' | sed -n 's/^cmdstat_[^:]*:calls=\([0-9]*\),.*/\1/p' | paste -sd+ | bc; }
redis_cpu() { ps -o times= -p "$RPID" | tr -d ' '; } # whole seconds
run standalone ""
calls0=$(redis_calls) cpu0=$(redis_cpu)
run cluster "$(printf '[cluster]\nredis = "redis://127.0.0.1:6399/0"\nnode = "bench"\n')"
calls1=$(redis_calls) cpu1=$(redis_cpu)
msgs=$((N * R))
awk -v c=$((calls1 - calls0)) -v m="$msgs" -v cpu=$((cpu1 - cpu0)) 'BEGIN { printf "redis: %d commands for %d messages (%.2f per message, heartbeats, leases and stream reads included), redis-server CPU %d s\n", c, m, c / m, cpu }'
run standalone-again ""
