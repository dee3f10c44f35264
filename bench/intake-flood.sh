#!/usr/bin/env bash
# A flood at the [bounces] intake while the platform sends: REPORTS reports
# of SIZE_MIB MiB of junk from FLOODERS client addresses at once (default
# 2,000 x 1 MiB from 20, the figure of issue 18), with the intake's default
# limits. Prints one RESULT line (bench/intake_flood.py says what is in it);
# copy it into docs/benchmarks.md with the date.
#   bench/intake-flood.sh [REPORTS] [FLOODERS] [SIZE_MIB]
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
R=${1:-2000} F=${2:-20} M=${3:-1}
cargo build --release --locked
work=$(mktemp -d)
head -c 32 /dev/urandom | base64 > "$work/bounce.key"
herald_config "$work/herald.toml" 2528 2602 "" "[bounces]
domain = \"bounces.bench.test\"
listen = [\"127.0.0.1:2529\"]
secret_file = \"bounce.key\"
max_size = $(( (M + 1) * 1024 * 1024 ))"
./target/release/herald --config "$work/herald.toml" serve 2>"$work/herald.log" &
HPID=$!
trap 'kill $HPID 2>/dev/null; wait $HPID 2>/dev/null; grep -c panicked "$work/herald.log" || true; rm -rf "$work"; true' EXIT
wait_port 2528
python3 bench/intake_flood.py ./target/release/herald "$work/herald.toml" "$HPID" 2528 2529 2602 "$R" "$F" "$M" tests/data/bounces/lhost-postfix-05.eml
echo "on disk: $(du -sb "$work/data/reports" | cut -f1) bytes in data/reports; panics in the log:"
