#!/usr/bin/env bash
# Thread hand-offs and system calls per message (issue 22): herald (release)
# relays MESSAGES messages of 4 KiB from SESSIONS smtp-source sessions into
# smtp-sink while `perf stat --per-thread` counts, for herald's threads
# only, context switches, CPU time, page faults and the main system calls;
# printed per message and per kind of thread (tokio's workers, the
# committer, sled's io threads).
#   bench/wakeups.sh [MESSAGES] [SESSIONS]
# Needs perf (linux-perf) and root for its tracepoints.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-10000} S=${2:-10}
. bench/lib.sh
need_postfix_tools
command -v perf >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q linux-perf >/dev/null
cargo build --release --locked
bench_workdir
herald_config "$work/herald.toml" 2525 2600
start_sink "$work/sink.out"
PIDS+=($!)
./target/release/herald serve --config "$work/herald.toml" 2>"$work/herald.log" &
h=$!
PIDS+=("$h")
wait_port 2525
ev=context-switches,cpu-clock,page-faults
for s in sendto recvfrom write futex epoll_wait accept4 fsync pwrite64 sync_file_range; do
  ev="$ev,syscalls:sys_enter_$s"
done
perf stat --per-thread -e "$ev" -p "$h" -o "$work/perf.txt" &
p=$!
sleep 0.5
start=$(date +%s.%N)
smtp-source -l 4096 -m "$N" -s "$S" -t to@example.com 127.0.0.1:2525
count() { grep -ao 'mesg=[0-9]*' "$work/sink.out" 2>/dev/null | tail -1 | cut -d= -f2; }
until [ "$(count)" = "$N" ]; do sleep 0.1; done
end=$(date +%s.%N)
kill -INT "$p"; wait "$p" || true
python3 - "$work/perf.txt" "$N" "$start" "$end" <<'PY'
import collections, re, sys
path, n, start, end = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
by = collections.defaultdict(collections.Counter)
for line in open(path):
    m = re.match(r"\s*(\S+?)-\d+\s+([\d,.]+)\s+(?:msec\s+)?(\S+)", line)
    if not m:
        continue
    thread = "sled-io" if m.group(1).startswith("sled-io") else m.group(1)
    what = m.group(3).replace("syscalls:sys_enter_", "")
    by[thread][what] += float(m.group(2).replace(",", ""))
kinds = ["context-switches", "cpu-clock", "page-faults", "sendto", "recvfrom", "write",
         "futex", "epoll_wait", "accept4", "fsync", "pwrite64", "sync_file_range"]
print(f"{n} messages in {end - start:.2f} s ({n / (end - start):.0f} msg/s); per message:")
short = {"context-switches": "switches", "cpu-clock": "cpu ms", "page-faults": "faults",
         "sync_file_range": "sync_range"}
print(f"{'thread':16}" + "".join(f"{short.get(k, k):>11}" for k in kinds))
total = collections.Counter()
for t, c in sorted(by.items(), key=lambda x: -x[1]["cpu-clock"]):
    if c["cpu-clock"] == 0 and c["context-switches"] == 0:
        continue
    total.update(c)
    print(f"{t:16}" + "".join(f"{c[k] / n:11.3f}" for k in kinds))
print(f"{'all':16}" + "".join(f"{total[k] / n:11.3f}" for k in kinds))
PY
