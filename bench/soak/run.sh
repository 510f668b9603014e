#!/usr/bin/env bash
# The soak (issue #16): meridian-edge (memory + disk tiers, the `headers`
# plugin, h1/h2/h3) and meridian-dns (queries with and without ECS) under a
# steady mixed load at 70% of the capacity measured at the start; purges
# every 3 s, a SIGHUP reload every minute; samples every 10 s into a CSV and
# a PNG plot. Fails on RSS growth > 5%, descriptor growth, p99 drift > 20%
# or any failed request. See docs/soak-chaos.md.
#
#   bash bench/soak/run.sh [SECONDS]     # default 1800; CI runs 120
#   PROFILE=debug bash bench/soak/run.sh 120   # the debug build (what CI uses)
#   OUT=DIR  LOAD=0.7  CALIBRATE=60|10   (output directory, load fraction, calibration seconds:
#                                         60 for a run under 10 minutes, else 10)
#   RSS_LIMIT=5  P99_LIMIT=20   (growth bounds in percent; CI's 2-minute debug run loosens the p99's)
#   EDGE_BIN=PATH   soak this meridian-edge binary instead of the one built
#                   here (an allocator variant, say; see bench/RESULTS.md)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
DURATION="${1:-1800}"
PROFILE="${PROFILE:-release}"
OUT="${OUT:-$ROOT/target/soak-$DURATION}"
LOAD="${LOAD:-0.7}"
# Capacity is measured closed-loop for CALIBRATE seconds, which warms the
# edge up too: 60 for a run under 10 minutes, else 10 (soak.rs,
# default_calibrate).
CALIBRATE="${CALIBRATE:-$(( DURATION < 600 ? 60 : 10 ))}"

# Debian's python3-matplotlib belongs to Debian's python3 (another python3
# may come first on PATH).
PY=python3; [ -x /usr/bin/python3 ] && PY=/usr/bin/python3
if ! "$PY" -c "import matplotlib" 2>/dev/null; then
  sudo=""; [ "$(id -u)" != 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-matplotlib
fi
"$PY" -c "import matplotlib" || { echo "soak needs python3-matplotlib" >&2; exit 1; }
[ -f wasm-plugins/dist/headers.wasm ] || wasm-plugins/build

flag=""; [ "$PROFILE" = release ] && flag="--release"
# Two builds: the servers alone (so their features are those of a plain
# build), then the harness.
cargo build $flag -p meridian-edge -p meridian-dns --bins >&2
cargo build $flag -p meridian-e2e --bin meridian-chaos >&2
# The builds go to $CARGO_TARGET_DIR when it is set (else ./target).
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/$PROFILE"
mkdir -p "$OUT"

CHAOS_PID=""
cleanup() { [ -n "$CHAOS_PID" ] && kill "$CHAOS_PID" 2>/dev/null; wait 2>/dev/null || true; }
trap cleanup EXIT
# The harness kills its servers when it exits, however it exits; `timeout`
# bounds the whole run (calibration and the last samples included).
MERIDIAN_EDGE_BIN="${EDGE_BIN:-$BIN/meridian-edge}" MERIDIAN_DNS_BIN="$BIN/meridian-dns" \
  timeout --signal=TERM $((DURATION + CALIBRATE + 180)) \
  "$BIN/meridian-chaos" soak --duration "$DURATION" --out "$OUT" --load "$LOAD" --calibrate "$CALIBRATE" \
  --rss-limit "${RSS_LIMIT:-5}" --p99-limit "${P99_LIMIT:-20}" --cpu-limit "${CPU_LIMIT:-20}" &
CHAOS_PID=$!
status=0
wait "$CHAOS_PID" || status=$?
CHAOS_PID=""
if [ -s "$OUT/soak.csv" ]; then
  "$PY" "$ROOT/bench/soak/plot.py" "$OUT/soak.csv" "$OUT/soak.png" "meridian soak, ${DURATION}s, $PROFILE build"
  echo "soak: CSV $OUT/soak.csv, plot $OUT/soak.png"
fi
exit "$status"
