#!/usr/bin/env bash
# Side-by-side: meridian-edge and nginx as plain reverse proxies (no cache)
# in front of the same origin, with the same worker count, driven by wrk
# (HTTP/1.1, plain) and h2load (HTTP/2 over TLS) in one run.
#
#   bash bench/proxy/run.sh            # defaults: 1 worker, 10 s per run
#   WORKERS=2 DURATION=20 bash bench/proxy/run.sh
#
# Prints a Markdown table with requests/s, p99 and the ratio meridian/nginx.
# Needs nginx, wrk, h2load (nghttp2-client) and openssl: installed from
# bench/apt-packages.txt if missing. Builds the release binaries if missing.
# Loopback only.
set -euo pipefail
BENCH_DIR="$(cd "$(dirname "$0")/.." && pwd)"
source "$BENCH_DIR/lib.sh"
WORKERS="${WORKERS:-1}"
DURATION="${DURATION:-10}"
CONNS="${CONNS:-50}"
SIZE="${SIZE:-1024}"
need_tools nginx wrk h2load openssl curl
EDGE="$(edge_bin)"
WORK="$(mktemp -d /tmp/meridian-bench.XXXXXX)"
trap bench_cleanup EXIT

ORIGIN_PORT=18900 NGINX_HTTP=18901 NGINX_TLS=18902 EDGE_HTTP=18903 EDGE_TLS=18904 EDGE_ADMIN=18905
make_cert "$WORK"
start_origin $ORIGIN_PORT "$SIZE"
mkdir -p "$WORK/proxy"

# nginx as a reverse proxy: keep-alive upstream, no buffering to disk, no cache.
cat > "$WORK/proxy/nginx.conf" <<CONF
worker_processes $WORKERS;
pid $WORK/proxy/nginx.pid;
error_log $WORK/proxy/error.log;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  upstream origin { server 127.0.0.1:$ORIGIN_PORT; keepalive 64; }
  server {
    listen 127.0.0.1:$NGINX_HTTP;
    listen 127.0.0.1:$NGINX_TLS ssl http2;
    ssl_certificate $WORK/cert.pem;
    ssl_certificate_key $WORK/key.pem;
    location / {
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$host;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      add_header Via "1.1 nginx";
    }
  }
}
CONF
nginx -p "$WORK/proxy" -c "$WORK/proxy/nginx.conf" -g 'daemon off;' &
BENCH_PIDS+=($!)
NGINX_PID=$!

cat > "$WORK/edge.toml" <<CONF
[server]
worker_threads = $WORKERS
[admin]
listen = "127.0.0.1:$EDGE_ADMIN"
[log]
access_log = "off"
level = "warn"
[[listeners]]
address = "127.0.0.1:$EDGE_HTTP"
[[listeners]]
address = "127.0.0.1:$EDGE_TLS"
tls = true
http3 = false   # nginx here has no HTTP/3 either: no Alt-Svc, equal headers
[[tls.certificates]]
cert = "$WORK/cert.pem"
key = "$WORK/key.pem"
[[sites]]
hosts = ["*"]
pool = "origin"
[sites.cache]
enabled = false   # a plain proxy, like the nginx it is compared with
[pools.origin]
origins = [{ url = "http://127.0.0.1:$ORIGIN_PORT" }]
CONF
"$EDGE" run --config "$WORK/edge.toml" > "$WORK/edge.out" 2>&1 &
BENCH_PIDS+=($!)
EDGE_PID=$!
declare -A PID_OF=([$NGINX_HTTP]=$NGINX_PID [$NGINX_TLS]=$NGINX_PID [$EDGE_HTTP]=$EDGE_PID [$EDGE_TLS]=$EDGE_PID)

for port in $ORIGIN_PORT $NGINX_HTTP $EDGE_HTTP; do wait_http "http://127.0.0.1:$port/obj"; done
for url in "http://127.0.0.1:$ORIGIN_PORT/obj" "http://127.0.0.1:$NGINX_HTTP/obj" "http://127.0.0.1:$EDGE_HTTP/obj" \
  "https://localhost:$NGINX_TLS/obj" "https://localhost:$EDGE_TLS/obj"; do
  check_object "$url" "$SIZE"
done

# wrk: requests/s and p99 (ms).
run_wrk() {
  local out t0 t1 n
  t0=$(tree_ticks "${PID_OF[$1]}")
  out=$(wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "http://127.0.0.1:$1/obj")
  t1=$(tree_ticks "${PID_OF[$1]}")
  n=$(echo "$out" | awk '/requests in/ {print $1}')
  if echo "$out" | grep -q "Non-2xx"; then echo "wrk saw non-2xx responses from port $1" >&2; exit 1; fi
  local rps p99
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  p99=$(echo "$out" | awk '$1=="99%" {v=$2; if (v ~ /us$/) {sub("us","",v); v=v/1000} else if (v ~ /ms$/) {sub("ms","",v)} else if (v ~ /s$/) {sub("s","",v); v=v*1000}; print v}')
  echo "$rps $p99 $(us_per_req $((t1 - t0)) "$n")"
}
# h2load: requests/s; p99 from the per-request latency log.
run_h2() {
  local log="$WORK/h2load-$1.log"
  local out t0 t1 n
  t0=$(tree_ticks "${PID_OF[$1]}")
  out=$(h2load -c"$CONNS" -m10 -t1 -D"$DURATION" --log-file="$log" "https://localhost:$1/obj" 2>&1)
  t1=$(tree_ticks "${PID_OF[$1]}")
  n=$(echo "$out" | awk '/^requests:/ {print $2}')
  echo "$out" | grep -q " 0 failed, 0 errored" || { echo "h2load saw failed requests: $(echo "$out" | grep '^requests:')" >&2; exit 1; }
  local rps p99
  rps=$(echo "$out" | awk '/^finished in/ {for (i=1;i<=NF;i++) if ($i ~ /req\/s,?$/) {v=$(i-1); sub(",","",v); print v}}')
  p99=$(awk '{print $3}' "$log" | sort -n | awk '{a[NR]=$1} END {i=int(NR*0.99); if (i<1) i=1; printf "%.2f", a[i]/1000}')
  echo "$rps $p99 $(us_per_req $((t1 - t0)) "$n")"
}

# Warm up both, then measure, alternating.
wrk -t1 -c"$CONNS" -d2s "http://127.0.0.1:$NGINX_HTTP/obj" >/dev/null
wrk -t1 -c"$CONNS" -d2s "http://127.0.0.1:$EDGE_HTTP/obj" >/dev/null
read -r n_h1 n_h1_p99 n_h1_cpu < <(run_wrk $NGINX_HTTP)
read -r m_h1 m_h1_p99 m_h1_cpu < <(run_wrk $EDGE_HTTP)
read -r n_h2 n_h2_p99 n_h2_cpu < <(run_h2 $NGINX_TLS)
read -r m_h2 m_h2_p99 m_h2_cpu < <(run_h2 $EDGE_TLS)

echo
echo "proxy, no cache; ${SIZE}-byte object; $WORKERS worker(s) each; $CONNS connections; ${DURATION}s per run; $(nproc) cores shared by origin, proxy and load generator"
echo
echo "| protocol (tool) | nginx req/s | meridian req/s | ratio m/n | nginx p99 ms | meridian p99 ms | ratio m/n | server CPU µs/req n / m |"
echo "|---|---|---|---|---|---|---|---|"
echo "| HTTP/1.1 (wrk) | $n_h1 | $m_h1 | $(ratio "$m_h1" "$n_h1") | $n_h1_p99 | $m_h1_p99 | $(ratio "$m_h1_p99" "$n_h1_p99") | $n_h1_cpu / $m_h1_cpu |"
echo "| HTTP/2 TLS (h2load -m10) | $n_h2 | $m_h2 | $(ratio "$m_h2" "$n_h2") | $n_h2_p99 | $m_h2_p99 | $(ratio "$m_h2_p99" "$n_h2_p99") | $n_h2_cpu / $m_h2_cpu |"
