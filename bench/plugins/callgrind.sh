#!/usr/bin/env bash
# User-space instructions per cache hit, with no plugin and with one
# (`headers`), counted by callgrind: repeatable whatever else the machine is
# doing, unlike req/s on a shared 2-core box.
#
#   bash bench/plugins/callgrind.sh          # 2000 measured hits per config
#   N=5000 bash bench/plugins/callgrind.sh
#
# Each edge runs under valgrind with instrumentation off; 500 warm-up hits
# fill the cache and the pools, then instrumentation is switched on for the
# N measured hits only (h2load --h1, 4 connections).
# Needs valgrind, nginx, h2load and curl (bench/apt-packages.txt).
set -euo pipefail
BENCH_DIR="$(cd "$(dirname "$0")/.." && pwd)"
ROOT="$(cd "$BENCH_DIR/.." && pwd)"
source "$BENCH_DIR/lib.sh"
N="${N:-2000}"
need_tools valgrind callgrind_control callgrind_annotate nginx h2load curl
EDGE="$(edge_bin)"
DIST="$ROOT/wasm-plugins/dist"
[ -f "$DIST/headers.wasm" ] || "$ROOT/wasm-plugins/build" --no-test >&2
WORK="$(mktemp -d /tmp/meridian-bench.XXXXXX)"
trap bench_cleanup EXIT
ORIGIN_PORT=18960
start_origin $ORIGIN_PORT 1024 "public, max-age=3600"

# count PORT CHAIN(0|1) : instructions per hit
count() {
  local port=$1 chain=$2 cfg="$WORK/edge-$1.toml"
  {
    cat <<CONF
[server]
worker_threads = 1
[admin]
listen = "127.0.0.1:$((port + 1))"
[log]
access_log = "off"
level = "warn"
[plugins]
# valgrind cannot reserve the pooling allocator's address space for 1024
max_instances = 8
[[listeners]]
address = "127.0.0.1:$port"
[[sites]]
hosts = ["*"]
pool = "origin"
CONF
    if [ "$chain" = 1 ]; then plugin_headers_toml "$DIST"; fi
    cat <<CONF
[sites.cache]
enabled = true
[pools.origin]
origins = [{ url = "http://127.0.0.1:$ORIGIN_PORT" }]
CONF
  } > "$cfg"
  valgrind --tool=callgrind --smc-check=all-non-file --instr-atstart=no \
    --callgrind-out-file="$WORK/cg.$port.%p" "$EDGE" run --config "$cfg" > "$WORK/vg-$port.log" 2>&1 &
  local vp=$!
  BENCH_PIDS+=("$vp")
  for _ in $(seq 1 300); do curl -s -o /dev/null "http://127.0.0.1:$port/obj" && break; sleep 0.2; done
  h2load --h1 -n 500 -c 4 "http://127.0.0.1:$port/obj" > /dev/null
  callgrind_control -i on "$vp" > /dev/null
  h2load --h1 -n "$N" -c 4 "http://127.0.0.1:$port/obj" | grep -q "$N succeeded" \
    || { echo "not every measured request succeeded on port $port" >&2; exit 1; }
  callgrind_control -i off "$vp" > /dev/null
  callgrind_control -d "$vp" > /dev/null
  kill "$vp"; wait "$vp" 2>/dev/null || true
  local total
  total=$(for f in "$WORK"/cg."$port".*; do
    callgrind_annotate "$f" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1; exit}'
  done | sort -n | tail -1)
  echo $((total / N))
}

base=$(count 18961 0)
one=$(count 18963 1)
echo
echo "User-space instructions per 1 KiB cache hit (callgrind, $N hits, one edge worker)"
echo
echo "| plugins | instructions per hit | ratio to 0 plugins |"
echo "|---|---|---|"
echo "| 0 | $base | 1.00 |"
echo "| 1 (headers) | $one | $(ratio "$one" "$base") |"
