#!/usr/bin/env bash
# What a misbehaving plugin costs the edge's other requests, in edge CPU per
# well-behaved request: the plugin of the `plugin` chaos scenario (trap,
# loop or memory exhaustion when a request carries `x-misbehave`), in front
# of an nginx origin, every request a memory-cache hit, driven by wrk with
# every EVERY-th request of each connection misbehaving. Runs alone and with
# each misbehaviour alternate, ROUNDS times, in one run, each starting once
# the plugin is no longer clamped by an earlier run's loops (the seconds
# waited are printed); the edge's CPU comes from /proc over each run. CPU
# per request moves less with the machine's noise than the chaos scenario's
# throughputs (docs/soak-chaos.md).
#
#   bash bench/plugins/misbehave.sh          # DURATION=8 ROUNDS=3 EVERY=100 CONNS=32
#   KINDS="loop" bash bench/plugins/misbehave.sh
#   EDGE_BIN=PATH bash bench/plugins/misbehave.sh   # another build, to compare
set -euo pipefail
BENCH_DIR="$(cd "$(dirname "$0")/.." && pwd)"
ROOT="$(cd "$BENCH_DIR/.." && pwd)"
source "$BENCH_DIR/lib.sh"
DURATION="${DURATION:-8}" ROUNDS="${ROUNDS:-3}" EVERY="${EVERY:-100}" CONNS="${CONNS:-32}"
KINDS="${KINDS:-loop trap memory}"
need_tools nginx wrk curl
EDGE="$(edge_bin)"
(cd "$ROOT" && cargo build --release -p meridian-e2e --bin meridian-chaos >&2)
WORK="$(mktemp -d /tmp/meridian-bench-misbehave.XXXXXX)"
trap bench_cleanup EXIT
ORIGIN=18960 PORT=18961 ADMIN=18962
"$ROOT/target/release/meridian-chaos" plugin-wasm --out "$WORK/misbehave.wasm"
start_origin "$ORIGIN" 4096 "public, max-age=3600"
cat > "$WORK/edge.toml" <<CONF
[admin]
listen = "127.0.0.1:$ADMIN"

[log]
access_log = "off"
# Every plugin failure, for the loops' figures below (the warnings are
# throttled to one a second).
level = "warn,meridian_edge::plugins::failures=debug"

[cache]
memory = "64MiB"

[[listeners]]
address = "127.0.0.1:$PORT"

[[sites]]
hosts = ["*"]
pool = "origin"

[[sites.plugins]]
path = "$WORK/misbehave.wasm"
failure = "closed"
memory = "16MiB"

[pools.origin]
origins = [{ url = "http://127.0.0.1:$ORIGIN" }]
CONF
env -u RUST_BACKTRACE "$EDGE" run --config "$WORK/edge.toml" > "$WORK/edge.log" 2>&1 &
EDGE_PID=$!
BENCH_PIDS+=("$EDGE_PID")
wait_http "http://127.0.0.1:$PORT/obj"
check_object "http://127.0.0.1:$PORT/obj" 4096

# unclamped : waits (at most 30 s) until the plugin is no longer clamped
# after a missed deadline (the clamp lasts 10 s after the last loop), so
# that each run measures its own misbehaviour, not the clamp a loop run
# left behind; prints the seconds waited.
unclamped() {
  local i line
  for i in $(seq 0 300); do
    line=$(curl -fsS "http://127.0.0.1:$ADMIN/metrics" | grep '^meridian_plugin_deadline_clamp{' | grep 'kind="clamped"') \
      || { echo "misbehave: the edge's /metrics has no meridian_plugin_deadline_clamp{kind=\"clamped\"}" >&2; exit 1; }
    if [ "${line##* }" = 0 ]; then awk -v i="$i" 'BEGIN { printf "%.1f", i / 10 }'; return; fi
    sleep 0.1
  done
  echo "misbehave: the plugin was still clamped 30 s after its last loop: $line" >&2
  exit 1
}

# run EVERY KIND : one wrk run; prints "good/s µs-per-good bad".
run() {
  local t0 t1 out reqs bad
  t0=$(cpu_ticks "$EDGE_PID")
  out=$(EVERY=$1 KIND=$2 wrk -t1 -c"$CONNS" -d"${DURATION}s" -s "$BENCH_DIR/plugins/misbehave.lua" "http://127.0.0.1:$PORT/obj")
  t1=$(cpu_ticks "$EDGE_PID")
  reqs=$(awk '/requests in/ {print $1}' <<<"$out")
  bad=$(awk '/Non-2xx/ {print $NF}' <<<"$out"); bad=${bad:-0}
  printf '%s %s %s\n' "$(awk -v g=$((reqs - bad)) -v d="$DURATION" 'BEGIN{printf "%.0f", g/d}')" \
    "$(us_per_req $((t1 - t0)) $((reqs - bad)))" "$bad"
}

echo "misbehave: every ${EVERY}th request; ${DURATION} s runs; ${ROUNDS} rounds; edge $EDGE"
printf '%-8s %-7s %10s %12s %8s %9s\n' round run good/s "µs/good" bad "waited/s"
declare -A SUM_US=() N=()
for r in $(seq 1 "$ROUNDS"); do
  for kind in none $KINDS; do
    every=$EVERY; [ "$kind" = none ] && every=0
    waited=$(unclamped)
    read -r gps us bad < <(run "$every" "$kind")
    printf '%-8s %-7s %10s %12s %8s %9s\n' "$r" "$kind" "$gps" "$us" "$bad" "$waited"
    SUM_US[$kind]=$(awk -v a="${SUM_US[$kind]:-0}" -v b="$us" 'BEGIN{print a+b}')
    N[$kind]=$(( ${N[$kind]:-0} + 1 ))
  done
done
base=$(awk -v a="${SUM_US[none]}" -v n="${N[none]}" 'BEGIN{print a/n}')
for kind in $KINDS; do
  awk -v k="$kind" -v a="${SUM_US[$kind]}" -v n="${N[$kind]}" -v b="$base" -v e="$EVERY" 'BEGIN{
    m = a / n; printf "misbehave: %-6s %.2f µs per good request against %.2f alone (%+.1f%%): about %.0f µs of edge CPU per misbehaving request\n", k, m, b, (m - b) / b * 100, (m - b) * (e - 1) }'
done
# How the loops were cut, from the edge's log (the warnings and the debug
# line of every failure): by the fuel of the plugin's clamp (every loop after
# the first miss of a clamp window), or by the CPU-time deadline.
fuel=$(grep -o 'used all [0-9]* units of fuel' "$WORK/edge.log" | sort | uniq -c | awk '{printf "%s%d at %s units", sep, $1, $4; sep=", "}' || true)
deadline=$(grep -c 'exceeded its [0-9.]*m*s deadline' "$WORK/edge.log" || true)
echo "misbehave: loops cut by their clamp's fuel: ${fuel:-none}; by their deadline: ${deadline:-0}"
