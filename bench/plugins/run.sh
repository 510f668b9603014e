#!/usr/bin/env bash
# Wasm plugin overhead: meridian-edge with 0, 1 and 3 plugins in the site's
# chain, driven by wrk in one run, reported as ratios against no plugin.
#
#   bash bench/plugins/run.sh                 # 1 worker, 10 s per run
#   WORKERS=2 DURATION=20 bash bench/plugins/run.sh
#
# Chains (every request carries a valid HS256 bearer token, so jwt-auth does
# its full verification):
#   0: no plugin
#   1: headers (adds a request header; adds HSTS and removes Server on the response)
#   3: jwt-auth (HS256, iss/aud/exp checks) + headers + geo-redirect (no GeoIP
#      database: the country is unknown and the rule falls through)
# Two modes: "hit" (every measured request a memory-cache hit: the plugins'
# share of the work is largest) and "proxy" (cache off: every request goes
# to the origin).
# Needs nginx (the origin), wrk, openssl and curl (bench/apt-packages.txt),
# and the plugins in wasm-plugins/dist (built by wasm-plugins/build if absent).
set -euo pipefail
BENCH_DIR="$(cd "$(dirname "$0")/.." && pwd)"
ROOT="$(cd "$BENCH_DIR/.." && pwd)"
source "$BENCH_DIR/lib.sh"
WORKERS="${WORKERS:-1}"
DURATION="${DURATION:-10}"
CONNS="${CONNS:-50}"
SIZE="${SIZE:-1024}"
need_tools nginx wrk openssl curl
EDGE="$(edge_bin)"
DIST="$ROOT/wasm-plugins/dist"
for p in headers jwt-auth geo-redirect; do
  [ -f "$DIST/$p.wasm" ] || "$ROOT/wasm-plugins/build" --no-test >&2
done
WORK="$(mktemp -d /tmp/meridian-bench.XXXXXX)"
trap bench_cleanup EXIT

ORIGIN_PORT=18930
# public: responses to requests with Authorization are storable (RFC 9111 §3.5)
start_origin $ORIGIN_PORT "$SIZE" "public, max-age=3600"

SECRET="bench-secret"
b64url() { openssl base64 -A | tr '+/' '-_' | tr -d '='; }
NOW=$(date +%s)
HDR=$(printf '{"alg":"HS256","typ":"JWT"}' | b64url)
CLAIMS=$(printf '{"sub":"bench","iss":"https://issuer.test","aud":"meridian","exp":%d}' $((NOW + 86400)) | b64url)
SIG=$(printf '%s.%s' "$HDR" "$CLAIMS" | openssl dgst -sha256 -hmac "$SECRET" -binary | b64url)
TOKEN="$HDR.$CLAIMS.$SIG"

plugin_headers() { plugin_headers_toml "$DIST"; }
plugin_jwt() {
  cat <<CONF
[[sites.plugins]]
path = "$DIST/jwt-auth.wasm"
config = { alg = "HS256", secret = "$SECRET", issuer = "https://issuer.test", audience = "meridian" }
CONF
}
plugin_geo() {
  cat <<CONF
[[sites.plugins]]
path = "$DIST/geo-redirect.wasm"
config = '{"rules":[{"countries":["KP"],"deny":451}],"default":"continue"}'
CONF
}

# start_edge PORT ADMIN CACHE(true|false) CHAIN(0|1|3)
start_edge() {
  local port=$1 admin=$2 cache=$3 chain=$4 cfg="$WORK/edge-$1.toml"
  {
    cat <<CONF
[server]
worker_threads = $WORKERS
[admin]
listen = "127.0.0.1:$admin"
[log]
access_log = "off"
level = "warn"
[[listeners]]
address = "127.0.0.1:$port"
[[sites]]
hosts = ["*"]
pool = "origin"
CONF
    case $chain in
      1) plugin_headers ;;
      3) plugin_jwt; plugin_headers; plugin_geo ;;
    esac
    cat <<CONF
[sites.cache]
enabled = $cache
[pools.origin]
origins = [{ url = "http://127.0.0.1:$ORIGIN_PORT" }]
CONF
  } > "$cfg"
  "$EDGE" run --config "$cfg" > "$WORK/edge-$port.out" 2>&1 &
  BENCH_PIDS+=($!)
}

declare -A PORT
n=0
for mode in hit proxy; do
  for chain in 0 1 3; do
    p=$((18931 + n * 2))
    cache=true; [ $mode = proxy ] && cache=false
    start_edge $p $((p + 1)) $cache $chain
    PORT[$mode-$chain]=$p
    n=$((n + 1))
  done
done
for key in "${!PORT[@]}"; do
  url="http://127.0.0.1:${PORT[$key]}/obj"
  wait_http "$url"
  got=$(curl -s -o /dev/null -w '%{http_code} %{size_download}' -H "Authorization: Bearer $TOKEN" "$url")
  [ "$got" = "200 $SIZE" ] || { echo "edge $key answered $got" >&2; cat "$WORK/edge-${PORT[$key]}.out" >&2; exit 1; }
done
# The 3-plugin chain really refuses a request without the token.
code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:${PORT[hit-3]}/obj")
[ "$code" = 401 ] || { echo "jwt-auth did not refuse an unauthenticated request ($code)" >&2; exit 1; }

run_wrk() {
  local out
  out=$(wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$1/obj")
  if echo "$out" | grep -q "Non-2xx"; then echo "wrk saw non-2xx responses from port $1" >&2; exit 1; fi
  local rps p99
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  p99=$(echo "$out" | awk '$1=="99%" {v=$2; if (v ~ /us$/) {sub("us","",v); v=v/1000} else if (v ~ /ms$/) {sub("ms","",v)} else if (v ~ /s$/) {sub("s","",v); v=v*1000}; print v}')
  echo "$rps $p99"
}

declare -A RPS P99
for mode in hit proxy; do
  for chain in 0 1 3; do
    wrk -t1 -c"$CONNS" -d2s -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:${PORT[$mode-$chain]}/obj" >/dev/null
    read -r r p < <(run_wrk "${PORT[$mode-$chain]}")
    RPS[$mode-$chain]=$r; P99[$mode-$chain]=$p
  done
done

echo
echo "Wasm plugin chains; ${SIZE}-byte object; $WORKERS worker(s); $CONNS connections; ${DURATION}s per run; wrk HTTP/1.1; $(nproc) cores shared by origin, edge and load generator"
echo
echo "| mode | plugins | req/s | ratio to 0 plugins | p99 ms | ratio to 0 plugins |"
echo "|---|---|---|---|---|---|"
for mode in hit proxy; do
  for chain in 0 1 3; do
    echo "| $mode | $chain | ${RPS[$mode-$chain]} | $(ratio "${RPS[$mode-$chain]}" "${RPS[$mode-0]}") | ${P99[$mode-$chain]} | $(ratio "${P99[$mode-$chain]}" "${P99[$mode-0]}") |"
  done
done
