#!/usr/bin/env bash
# Checks the systemd units with `systemd-analyze verify`, pointing them at the
# binaries built in target/ (the units name /usr/bin, where packages put them).
# Any finding fails the check. Needs systemd-analyze (Debian: systemd).
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v systemd-analyze >/dev/null || { echo "systemd-analyze is required (apt-get install systemd)" >&2; exit 1; }
bin_dir="${BIN_DIR:-$PWD/target/debug}"
for b in meridian-edge meridian-dns; do
  [ -x "$bin_dir/$b" ] || { echo "$bin_dir/$b is not built (cargo build --workspace --bins)" >&2; exit 1; }
done
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
for u in infra/systemd/*.service infra/systemd/*.socket; do
  sed "s|/usr/bin/meridian-|$bin_dir/meridian-|g" "$u" > "$tmp/$(basename "$u")"
done
out="$(systemd-analyze verify "$tmp"/*.service "$tmp"/*.socket 2>&1 || true)"
if [ -n "$out" ]; then
  echo "systemd-analyze verify found problems:" >&2
  echo "$out" >&2
  exit 1
fi
echo "systemd units: ok ($(ls infra/systemd/*.service infra/systemd/*.socket | wc -l) verified)"
