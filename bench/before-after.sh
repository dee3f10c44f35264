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
command -v smtp-source >/dev/null || [ -x /usr/sbin/smtp-source ] || {
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q postfix >/dev/null
}
cargo build --release --locked
work=$(mktemp -d)
HPID=
trap 'kill $HPID 2>/dev/null; wait 2>/dev/null; rm -rf "$work"; true' EXIT
run() { # $1 label, $2 binary
  rm -rf "$work/data"
  cat > "$work/herald.toml" <<CONF
hostname = "bench.local"
[listen]
smtp = ["127.0.0.1:2525"]
max_connections = 1024
[storage]
path = "data"
[sender]
default_sender = "notifications@example.com"
[delivery]
upstream = "sink"
concurrency = 16
[upstreams.sink]
host = "127.0.0.1"
port = 2600
security = "none"
CONF
  "$2" serve --config "$work/herald.toml" 2>"$work/$1.log" &
  HPID=$!
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/2525) 2>/dev/null && break; sleep 0.1; done
  "$SHARED/bench.sh" -s "$S" -r "$R" -p "$HPID" -n "$1" -I 30 127.0.0.1:2525 "$N" | grep MEDIAN
  kill $HPID; wait $HPID 2>/dev/null || true
}
run before "$OLD"
run after ./target/release/herald
run before-again "$OLD"
