#!/usr/bin/env bash
# Does a slow webhook endpoint slow SMTP acceptance? Runs the shared driver
# (smtp-source -> herald -> smtp-sink) twice in the same run: without
# webhooks, and with a [[webhooks]] endpoint (events delivered) that takes
# 0.5 s to answer each POST.
#   bench/webhooks.sh [MESSAGES] [SESSIONS]     (default 10000 10)
# Needs smtp-source/smtp-sink (Postfix; installed as root on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-10000} S=${2:-10}
SHARED=${SHARED:-../shared/bench}
. bench/lib.sh
need_postfix_tools
cargo build --release --locked
work=$(mktemp -d)
head -c 32 /dev/urandom | base64 > "$work/webhook.key"
# A slow receiver: 0.5 s per POST, one at a time.
python3 - "$work" <<'PY' &
import http.server, sys, time
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        time.sleep(0.5)
        self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
        with open(sys.argv[1] + "/posts", "a") as f: f.write("x\n")
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", 2690), H).serve_forever()
PY
RPID=$!
HPID=
trap 'kill $HPID $RPID 2>/dev/null; wait 2>/dev/null; rm -rf "$work"; true' EXIT
run() { # $1 = label, $2 = extra config
  rm -rf "$work/data"
  herald_config "$work/herald.toml" 2525 2600 "" "$2"
  ./target/release/herald --config "$work/herald.toml" serve 2>"$work/herald-$1.log" &
  HPID=$!
  wait_port 2525
  "$SHARED/bench.sh" -s "$S" -r 1 -p "$HPID" -n "$1" -I 30 127.0.0.1:2525 "$N" | grep MEDIAN
  kill $HPID; wait $HPID 2>/dev/null || true
}
run plain ""
run webhook "[[webhooks]]
url = \"http://127.0.0.1:2690/hook\"
secret_file = \"$work/webhook.key\"
events = [\"delivered\"]"
echo "webhook POSTs received during the run: $(wc -l < "$work/posts" 2>/dev/null || echo 0)"
