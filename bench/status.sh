#!/usr/bin/env bash
# How long `herald status` and GET /metrics take with a large queue, and what
# 16 concurrent scrapes do to an SMTP EHLO.
#   bench/status.sh [MESSAGES]        (default 100000)
# Needs smtp-source (Postfix; apt-get installs it on first use, as root).
# Prints one RESULT line; copy it into docs/benchmarks.md with the date.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-100000}
. bench/lib.sh
need_postfix_tools
cargo build --release --locked
work=$(mktemp -d)
# The upstream is a closed port: with delivery paused the queue only grows.
herald_config "$work/herald.toml" 2526 9 "" 'metrics_listen = "127.0.0.1:9026"'
herald() { ./target/release/herald --config "$work/herald.toml" "$@"; }
./target/release/herald --config "$work/herald.toml" serve 2>"$work/herald.log" &
HPID=$!
trap 'kill $HPID 2>/dev/null; wait $HPID 2>/dev/null; rm -rf "$work"; true' EXIT
wait_port 2526
# Held, so the queue only grows.
herald pause >/dev/null
echo "filling the queue with $N messages..."
smtp-source -s 20 -m "$N" -l 1024 -f app@platform.test -t user@dest.test 127.0.0.1:2526
until [ "$(herald status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["messages"])')" -ge "$N" ]; do
  sleep 1
done
CFG="$work/herald.toml" python3 - "$N" <<'PY'
import json, socket, statistics, subprocess, sys, threading, time, urllib.request

n = sys.argv[1]
def timed(f, k=20):
    out = []
    for _ in range(k):
        t = time.perf_counter()
        f()
        out.append((time.perf_counter() - t) * 1000)
    return statistics.median(out)

import os
cfg = os.environ.get("CFG")
def status():
    subprocess.run(["./target/release/herald", "--config", cfg, "status"], check=True,
                   stdout=subprocess.DEVNULL)
def metrics():
    urllib.request.urlopen("http://127.0.0.1:9026/metrics").read()
def ehlo():
    s = socket.create_connection(("127.0.0.1", 2526))
    f = s.makefile("rb")
    f.readline()
    t = time.perf_counter()
    s.sendall(b"EHLO bench\r\n")
    while True:
        line = f.readline()
        if line[3:4] == b" ":
            break
    d = (time.perf_counter() - t) * 1000
    s.sendall(b"QUIT\r\n")
    s.close()
    return d

st = timed(status)
me = timed(metrics)
quiet = statistics.median([ehlo() for _ in range(20)])
stop = False
def scrape():
    while not stop:
        metrics()
threads = [threading.Thread(target=scrape) for _ in range(16)]
for t in threads:
    t.start()
time.sleep(0.5)
busy = statistics.median([ehlo() for _ in range(20)])
stop = True
for t in threads:
    t.join()
print(f"RESULT queued={n} status_ms={st:.1f} metrics_ms={me:.1f} ehlo_ms={quiet:.2f} ehlo_16_scrapes_ms={busy:.2f}")
PY
