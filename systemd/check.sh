#!/usr/bin/env bash
# Checks the unit as CI does: systemd-analyze verify, and
# systemd-analyze security at most 2.0 ("OK").
set -euo pipefail
cd "$(dirname "$0")"
command -v systemd-analyze >/dev/null || {
  [ "$(id -u)" = 0 ] || { echo "systemd-analyze is missing: apt-get install systemd" >&2; exit 1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null
}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# verify wants the binary to exist: check the unit as installed, with a
# stand-in for /usr/bin/herald when it is not installed here.
sed "s|/usr/bin/herald|$( [ -x /usr/bin/herald ] && echo /usr/bin/herald || echo /usr/bin/true)|g" herald.service > "$tmp/herald.service"
systemd-analyze verify "$tmp/herald.service"
systemd-analyze security --offline=yes --threshold=20 "$tmp/herald.service" | tail -1
