#!/usr/bin/env bash
# HTTP/3 versus HTTP/2 on the same meridian-edge, for cache hits: same object, same client
# concurrency: h2load (HTTP/2 over TLS) and h3load (bench/src/bin/h3load.rs).
# Reports requests/s, p50, p99 and the edge's CPU time per request.
#
#   bash bench/h3/run.sh               # defaults: 1 worker, 10 s, 20 connections x 10 streams
#   WORKERS=2 DURATION=20 SIZE=10240 bash bench/h3/run.sh
set -euo pipefail
BENCH_DIR="$(cd "$(dirname "$0")/.." && pwd)"
source "$BENCH_DIR/lib.sh"
WORKERS="${WORKERS:-1}" DURATION="${DURATION:-10}" CONNS="${CONNS:-20}" STREAMS="${STREAMS:-10}" SIZE="${SIZE:-1024}"
need_tools nginx h2load openssl curl
EDGE="$(edge_bin)"
H3LOAD="$BENCH_DIR/../target/release/h3load"
WORK="$(mktemp -d /tmp/meridian-bench-h3.XXXXXX)"
trap bench_cleanup EXIT
ORIGIN=18910 TLS=18911 ADMIN=18912
make_cert "$WORK"
start_origin $ORIGIN "$SIZE" "public, max-age=3600"
cat > "$WORK/edge.toml" <<CONF
[server]
worker_threads = $WORKERS
[admin]
listen = "127.0.0.1:$ADMIN"
[log]
access_log = "off"
level = "warn"
[[listeners]]
address = "127.0.0.1:$TLS"
tls = true
[[tls.certificates]]
cert = "$WORK/cert.pem"
key = "$WORK/key.pem"
[[sites]]
hosts = ["*"]
pool = "origin"
[pools.origin]
origins = [{ url = "http://127.0.0.1:$ORIGIN" }]
CONF
"$EDGE" run --config "$WORK/edge.toml" > "$WORK/edge.out" 2>&1 &
EDGE_PID=$!
BENCH_PIDS+=($EDGE_PID)
wait_http "http://127.0.0.1:$ORIGIN/obj"
wait_http "https://localhost:$TLS/obj" 2>/dev/null || wait_http "http://127.0.0.1:$ADMIN/readyz"
check_object "http://127.0.0.1:$ORIGIN/obj" "$SIZE"
check_object "https://localhost:$TLS/obj" "$SIZE"
# Served from the cache from here on.
curl -sk -D - -o /dev/null "https://localhost:$TLS/obj" | grep -qi "^cache-status: meridian; hit" \
  || { echo "the object is not a cache hit" >&2; exit 1; }
TCK=$(getconf CLK_TCK)

run_h2() {
  local log="$WORK/h2.log" t0 t1 out rps n p50 p99
  t0=$(cpu_ticks $EDGE_PID)
  out=$(h2load -c"$CONNS" -m"$STREAMS" -t1 -D"$DURATION" --log-file="$log" "https://localhost:$TLS/obj" 2>&1)
  echo "$out" | grep -q " 0 failed, 0 errored" || { echo "h2load saw failed requests: $(echo "$out" | grep '^requests:')" >&2; exit 1; }
  t1=$(cpu_ticks $EDGE_PID)
  rps=$(echo "$out" | awk '/^finished in/ {for (i=1;i<=NF;i++) if ($i ~ /req\/s,?$/) {v=$(i-1); sub(",","",v); print v}}')
  n=$(echo "$out" | awk '/^requests:/ {print $8}')
  read -r p50 p99 < <(awk '{print $3}' "$log" | sort -n | awk '{a[NR]=$1} END {i=int(NR*0.5); j=int(NR*0.99); if(i<1)i=1; if(j<1)j=1; printf "%.2f %.2f\n", a[i]/1000, a[j]/1000}')
  echo "$rps $p50 $p99 $(awk -v d=$((t1 - t0)) -v n="$n" -v t="$TCK" 'BEGIN { printf "%.1f", d / t * 1e6 / n }')"
}
run_h3() {
  local t0 t1 out rps n p50 p99
  t0=$(cpu_ticks $EDGE_PID)
  out=$("$H3LOAD" --connect "127.0.0.1:$TLS" -c "$CONNS" -m "$STREAMS" -d "$DURATION" "https://localhost:$TLS/obj")
  t1=$(cpu_ticks $EDGE_PID)
  rps=$(echo "$out" | sed -E 's/.*; ([0-9.]+) req\/s.*/\1/')
  n=$(echo "$out" | sed -E 's/^requests: ([0-9]+) ok.*/\1/')
  p50=$(echo "$out" | sed -E 's/.*p50 ([0-9.]+).*/\1/')
  p99=$(echo "$out" | sed -E 's/.*p99 ([0-9.]+).*/\1/')
  echo "$rps $p50 $p99 $(awk -v d=$((t1 - t0)) -v n="$n" -v t="$TCK" 'BEGIN { printf "%.1f", d / t * 1e6 / n }')"
}

h2load -c"$CONNS" -m"$STREAMS" -t1 -D2 "https://localhost:$TLS/obj" >/dev/null 2>&1
"$H3LOAD" --connect "127.0.0.1:$TLS" -c "$CONNS" -m "$STREAMS" -d 2 "https://localhost:$TLS/obj" >/dev/null
read -r h2_rps h2_p50 h2_p99 h2_cpu < <(run_h2)
read -r h3_rps h3_p50 h3_p99 h3_cpu < <(run_h3)
echo
echo "meridian-edge cache hits of a ${SIZE}-byte object; $WORKERS worker(s); $CONNS connections x $STREAMS streams; ${DURATION}s per run; $(nproc) cores shared by origin, edge and load generator"
echo
echo "| protocol | req/s | p50 ms | p99 ms | edge CPU µs/req |"
echo "|---|---|---|---|---|"
echo "| HTTP/2 (h2load) | $h2_rps | $h2_p50 | $h2_p99 | $h2_cpu |"
echo "| HTTP/3 (h3load) | $h3_rps | $h3_p50 | $h3_p99 | $h3_cpu |"
echo "| ratio h3/h2 | $(ratio "$h3_rps" "$h2_rps") | $(ratio "$h3_p50" "$h2_p50") | $(ratio "$h3_p99" "$h2_p99") | $(ratio "$h3_cpu" "$h2_cpu") |"
