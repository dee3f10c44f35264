#!/usr/bin/env bash
# Builds the Debian package with cargo-deb and checks it as CI does: the
# file list, the conffile, the maintainer scripts, and the packaged binary
# accepting the packaged configuration. Prints the path of the .deb.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-deb >/dev/null || cargo install cargo-deb --locked --quiet
# The manual pages come from the binary's own command definitions.
cargo build --release --locked --quiet
rm -rf target/man
target/release/herald man target/man
deb=$(cargo deb --locked --no-build 2>/dev/null | tail -1)
[ -f "$deb" ] || { echo "cargo deb made no package" >&2; exit 1; }
files=$(dpkg-deb -c "$deb")
for f in ./usr/bin/herald ./lib/systemd/system/herald.service ./etc/herald/herald.toml ./usr/share/doc/herald/README.md ./usr/share/doc/herald/docs/configuration.md; do
  grep -q " $f\$" <<<"$files" || { echo "$deb lacks $f" >&2; exit 1; }
done
for page in herald herald-serve herald-trace herald-suppression-add; do
  grep -Eq " ./usr/share/man/man8/$page\.8(\.gz)?\$" <<<"$files" || { echo "$deb lacks the manual page $page(8)" >&2; exit 1; }
done
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
dpkg-deb -e "$deb" "$tmp/DEBIAN"
grep -qx /etc/herald/herald.toml "$tmp/DEBIAN/conffiles" || { echo "herald.toml is not a conffile" >&2; exit 1; }
grep -q "adduser --system" "$tmp/DEBIAN/postinst" || { echo "postinst creates no user" >&2; exit 1; }
dpkg-deb -x "$deb" "$tmp/root"
"$tmp/root/usr/bin/herald" check-config --config "$tmp/root/etc/herald/herald.toml" >/dev/null
echo "$deb"
