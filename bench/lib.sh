# What the bench scripts share; source it: . "$(dirname "$0")/lib.sh"

# smtp-source and smtp-sink come with Postfix (installed as root on first
# use; Debian's "No configuration" install leaves no main.cf, postconf needs one).
need_postfix_tools() {
  command -v smtp-source >/dev/null || [ -x /usr/sbin/smtp-source ] || {
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q postfix >/dev/null
  }
  [ -f /etc/postfix/main.cf ] || cp /usr/share/postfix/main.cf.debian /etc/postfix/main.cf
  PATH=$PATH:/usr/sbin
}

# herald_config FILE SMTP_PORT UPSTREAM_PORT [LISTEN_LINES] [MORE_TOML]
# A bench configuration: SMTP on 127.0.0.1:SMTP_PORT, the queue in data/
# beside FILE, relaying to 127.0.0.1:UPSTREAM_PORT without TLS. LISTEN_LINES
# go into [listen]; MORE_TOML follows [control] (keys of it, or sections).
herald_config() {
  cat > "$1" <<CONF
hostname = "bench.local"
[listen]
smtp = ["127.0.0.1:$2"]
max_connections = 1024
max_connections_per_ip = 1024
${4:-}
[storage]
path = "data"
[sender]
default_sender = "notifications@example.com"
[delivery]
upstream = "sink"
concurrency = 16
[upstreams.sink]
host = "127.0.0.1"
port = $3
security = "none"
[control]
socket = "data/herald.sock"
${5:-}
CONF
}

# wait_port PORT: until something accepts on 127.0.0.1:PORT (10 s at most).
wait_port() {
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return; sleep 0.1; done
}

# postfix_peer_start: the reference Postfix (../shared/bench/postfix-peer.sh)
# with an empty queue. Messages left by an earlier run would be tried at
# once while no sink listens: Postfix then takes the sink for dead and
# defers everything of the next run ("delivery temporarily suspended").
postfix_peer_start() {
  "$SHARED/postfix-peer.sh" stop >/dev/null 2>&1 || true
  postsuper -d ALL >/dev/null 2>&1 || true
  "$SHARED/postfix-peer.sh" start "$@"
}

# bench_workdir: a scratch folder in $work, removed at exit, and PIDS: the
# processes to stop then.
bench_workdir() {
  work=$(mktemp -d)
  PIDS=()
  trap 'kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
}

# start_sink OUT: smtp-sink on 127.0.0.1:2600 (as nobody when run as root:
# it will not run as root), its output in OUT; $! is its pid.
start_sink() {
  local asroot=()
  [ "$(id -u)" -ne 0 ] || asroot=(-u nobody)
  smtp-sink -c "${asroot[@]}" 127.0.0.1:2600 1024 >"$1" 2>&1 &
}
