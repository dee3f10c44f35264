#!/usr/bin/env bash
# Compares herald with Postfix on this machine, in the same run, with the
# shared driver (smtp-source -> relay -> smtp-sink on 127.0.0.1:2600).
#   bench/compare.sh [MESSAGES] [SESSIONS] [REPETITIONS]
# Needs root for Postfix (apt-get installs it on first use). Prints the
# MEDIAN line of each relay; copy them into docs/benchmarks.md with the date.
# FULL=1: the whole job on both sides: herald rewrites From to its
# authorized sender and DKIM-signs (RSA-2048); Postfix does the same with
# canonical maps and OpenDKIM (POSTFIX_PEER_DKIM=1).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-5000} S=${2:-10} R=${3:-3}
SHARED=${SHARED:-../shared/bench}
. bench/lib.sh
need_postfix_tools
cargo build --release --locked
work=$(mktemp -d)
if [ "${FULL:-0}" = 1 ]; then
  ./target/release/herald dkim-keygen --domain example.com --selector bench \
    --out "$work/dkim.pem" >/dev/null
  herald_config "$work/herald.toml" 2525 2600 "" \
    "$(printf '[[dkim]]\ndomain = "example.com"\nselector = "bench"\nprivate_key = "dkim.pem"')"
  export POSTFIX_PEER_DKIM=1
else
  herald_config "$work/herald.toml" 2525 2600
fi
./target/release/herald serve --config "$work/herald.toml" 2>"$work/herald.log" &
HPID=$!
trap 'kill $HPID 2>/dev/null; wait $HPID 2>/dev/null; "$SHARED/postfix-peer.sh" stop; rm -rf "$work"' EXIT
wait_port 2525
postfix_peer_start
echo "== herald (pid $HPID)"
"$SHARED/bench.sh" -s "$S" -r "$R" -p "$HPID" -n herald -I 30 127.0.0.1:2525 "$N" | tee "$work/herald.out"
echo "== postfix"
"$SHARED/bench.sh" -s "$S" -r "$R" -P "$SHARED/postfix-peer.sh pid" -n postfix -I 30 127.0.0.1:2625 "$N" | tee "$work/postfix.out"
echo "== summary ($(date -u +%Y-%m-%d), $(nproc) cores, $N msgs x $S sessions, median of $R)"
grep -h MEDIAN "$work/herald.out" "$work/postfix.out"
