#!/usr/bin/env bash
# The chaos scenarios of issue #16, one command each (docs/soak-chaos.md):
#
#   bash bench/chaos/run.sh flap      [--duration 60] [--period 5]   # 1. the origin flaps (stale-if-error)
#   bash bench/chaos/run.sh kill9     [--duration 70] [--every 20]   # 2. kill -9 of the edge under writes
#   bash bench/chaos/run.sh diskfull  [--phase 15] [--tmpfs-mb 64]   # 3. the disk tier's tmpfs fills (root)
#   bash bench/chaos/run.sh diskerror [--phase 15]                   # 3b. the disk tier's reads and writes fail (EIO; fiu-utils)
#   bash bench/chaos/run.sh netem     [--phase 15] [--burst 500] [--link auto|netem|wire]  # 4. delay, loss, partition (root)
#   bash bench/chaos/run.sh plugin    [--phase 3] [--rounds 7] [--deadline-ms 50] [--kinds trap,loop,memory] [--every 100]  # 5. every 100th request: trap/loop/OOM
#   bash bench/chaos/run.sh dnsflap   [--duration 40] [--rate 1000]  # 6. DNS health checks flap
#   bash bench/chaos/run.sh all                                      # every scenario, in turn
#
# PROFILE=release (default) or debug picks the build of meridian-edge and
# meridian-dns under test. Each scenario prints one line
#   NAME: sent=… succeeded=… expected_failures=… unexpected_failures=… corrupt_bodies=…
# and exits non-zero unless the last two are 0 and its other checks hold.
# Server logs: $MERIDIAN_CHAOS_LOGS (default /tmp/meridian-chaos-logs/).
# The builds go to $CARGO_TARGET_DIR when it is set (else ./target).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
[ $# -ge 1 ] || { sed -n '2,19p' "$0" >&2; exit 2; }
SCENARIO="$1"; shift
PROFILE="${PROFILE:-release}"
case "$SCENARIO" in
  flap|kill9|diskfull|diskerror|netem|plugin|dnsflap|all) ;;
  *) echo "unknown scenario $SCENARIO" >&2; exit 2 ;;
esac
flag=""; [ "$PROFILE" = release ] && flag="--release"
# Two builds: the servers alone (so their features are those of a plain
# build), then the harness.
cargo build $flag -p meridian-edge -p meridian-dns --bins >&2
cargo build $flag -p meridian-e2e --bin meridian-chaos >&2
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/$PROFILE"
export MERIDIAN_EDGE_BIN="$BIN/meridian-edge" MERIDIAN_DNS_BIN="$BIN/meridian-dns"

CHAOS_PID=""
cleanup() { [ -n "$CHAOS_PID" ] && kill "$CHAOS_PID" 2>/dev/null; wait 2>/dev/null || true; }
trap cleanup EXIT

# diskfull (a tmpfs) and netem (network namespaces) need root: as another
# user, the binaries built above run through sudo (cargo does not).
as_root() {
  case "$1" in
    diskfull|netem) if [ "$(id -u)" != 0 ]; then
        echo "chaos: $1 needs root: running it through sudo" >&2
        sudo env MERIDIAN_EDGE_BIN="$MERIDIAN_EDGE_BIN" MERIDIAN_DNS_BIN="$MERIDIAN_DNS_BIN" \
          ${MERIDIAN_CHAOS_LOGS:+MERIDIAN_CHAOS_LOGS="$MERIDIAN_CHAOS_LOGS"} "${@:2}"
        return
      fi ;;
  esac
  "${@:2}"
}

# run NAME ARGS… : one scenario, bounded by `timeout`; its servers die with it.
run() {
  local status=0
  as_root "$1" timeout --signal=TERM 900 "$BIN/meridian-chaos" "$@" &
  CHAOS_PID=$!
  wait "$CHAOS_PID" || status=$?
  CHAOS_PID=""
  return "$status"
}

if [ "$SCENARIO" = all ]; then
  failed=()
  for s in flap kill9 diskfull diskerror netem plugin dnsflap; do
    echo "== chaos: $s"
    run "$s" || failed+=("$s")
  done
  [ "${#failed[@]}" -eq 0 ] || { echo "chaos: failed: ${failed[*]}" >&2; exit 1; }
  exit 0
fi
run "$SCENARIO" "$@"
