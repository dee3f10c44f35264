#!/usr/bin/env bash
# Restart with a large queue (issue 22): delivery paused, MESSAGES of 4 KiB
# queued through smtp-source, herald stopped (SIGTERM) and started again;
# prints how long the new process took to answer 220 on its SMTP port, and
# to log its queue loaded for delivery.
#   bench/restart.sh [MESSAGES]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-100000}
. bench/lib.sh
need_postfix_tools
cargo build --release --locked
work=$(mktemp -d)
herald_config "$work/herald.toml" 2525 2600
cd "$work"
H=$OLDPWD/target/release/herald
"$H" serve --config herald.toml 2>herald.log &
HPID=$!
trap 'kill $HPID 2>/dev/null; wait 2>/dev/null; cd /; rm -rf "$work"' EXIT
wait_port 2525
"$H" pause --config herald.toml >/dev/null
start=$(date +%s.%N)
smtp-source -l 4096 -m "$N" -s 20 -t to@example.com 127.0.0.1:2525
echo "queued $N in $(echo "$(date +%s.%N) - $start" | bc) s; data: $(du -sh data | cut -f1)"
kill -TERM $HPID; wait $HPID 2>/dev/null || true
# The time to the greeting: connect until a 220 is read.
greet() { exec 3<>/dev/tcp/127.0.0.1/2525 && read -r -t 1 line <&3 && [[ $line == 220* ]]; }
t0=$(date +%s.%N)
"$H" serve --config herald.toml 2>herald2.log &
HPID=$!
until greet 2>/dev/null; do sleep 0.005; done
t1=$(date +%s.%N)
until grep -q "queue loaded" herald2.log; do sleep 0.01; done
t2=$(date +%s.%N)
echo "restart with $N queued: 220 after $(echo "$t1 - $t0" | bc) s; queue loaded after $(echo "$t2 - $t0" | bc) s"
grep "queue loaded" herald2.log | tail -1
