#!/usr/bin/env bash
# Peak RSS of herald while SESSIONS clients each send a SIZE_MIB message at
# once (default 20 x 20 MiB), every message delivered and checked intact.
#   bench/memory.sh [SESSIONS] [SIZE_MIB]
# Prints one RESULT line; copy it into README.md with the date.
set -euo pipefail
cd "$(dirname "$0")/.."
S=${1:-20} M=${2:-20}
cargo build --release --locked
work=$(mktemp -d)
cat > "$work/herald.toml" <<CONF
hostname = "bench.local"
[listen]
smtp = ["127.0.0.1:2527"]
max_message_size = $(( (M + 5) * 1024 * 1024 ))
[storage]
path = "data"
[sender]
default_sender = "notifications@example.com"
[delivery]
upstream = "sink"
[upstreams.sink]
host = "127.0.0.1"
port = 2601
security = "none"
[control]
socket = "data/herald.sock"
CONF
./target/release/herald --config "$work/herald.toml" serve 2>"$work/herald.log" &
HPID=$!
trap 'kill $HPID 2>/dev/null; wait $HPID 2>/dev/null; rm -rf "$work"; true' EXIT
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/2527) 2>/dev/null && break; sleep 0.1; done
python3 bench/memory.py "$HPID" 2527 2601 "$S" "$M"
