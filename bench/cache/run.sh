#!/usr/bin/env bash
# Cache hits: meridian-edge against nginx proxy_cache and Varnish, configured
# alike, in one run.
#   - objects of 1 KiB and 100 KiB, requested in rotation over N objects;
#   - memory-tier hits (everything fits in memory) and disk-tier hits
#     (meridian with a 1 MiB memory tier over its disk tier; Varnish with
#     file storage; nginx's cache is always files in the page cache);
#   - requests/s and p99 (wrk), ratios, and the origin requests seen during
#     each measured run (0 = every request was a hit).
# Every proxy is pinned to CPU 0 with one worker; wrk and the origin to CPU 1.
#
#   bash bench/cache/run.sh                  # DURATION=10 CONNS=50
set -euo pipefail
BENCH_DIR="$(cd "$(dirname "$0")/.." && pwd)"
source "$BENCH_DIR/lib.sh"
DURATION="${DURATION:-10}" CONNS="${CONNS:-50}"
need_tools nginx wrk varnishd openssl curl taskset
EDGE="$(edge_bin)"
WORK="$(mktemp -d /tmp/meridian-bench-cache.XXXXXX)"
trap bench_cleanup EXIT
chmod 755 "$WORK"
ORIGIN=18940 NGX=18941 VMEM=18942 VFILE=18943 MMEM=18944 MDISK=18945 ADMIN1=18946 ADMIN2=18947
declare -A COUNT=([1024]=2000 [102400]=200)

# Origin: nginx on CPU 1 serving cacheable objects, logging each request.
mkdir -p "$WORK/www" "$WORK/origin" "$WORK/ngx"
for size in 1024 102400; do
  head -c "$size" /dev/urandom > "$WORK/obj"
  for i in $(seq 0 $((COUNT[$size] - 1))); do cp "$WORK/obj" "$WORK/www/obj-$size-$i"; done
done
cat > "$WORK/origin/nginx.conf" <<CONF
worker_processes 1;
pid $WORK/origin/nginx.pid;
error_log $WORK/origin/error.log;
events { worker_connections 4096; }
http {
  access_log $WORK/origin/access.log;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$ORIGIN;
    root $WORK/www;
    add_header Cache-Control "public, max-age=3600";
  }
}
CONF
taskset -c 1 nginx -p "$WORK/origin" -c "$WORK/origin/nginx.conf" -g 'daemon off;' &
BENCH_PIDS+=($!)

# nginx proxy_cache, one worker.
cat > "$WORK/ngx/nginx.conf" <<CONF
worker_processes 1;
pid $WORK/ngx/nginx.pid;
error_log $WORK/ngx/error.log;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  proxy_cache_path $WORK/ngx/cache levels=1:2 keys_zone=z:50m max_size=2g inactive=1h use_temp_path=off;
  upstream origin { server 127.0.0.1:$ORIGIN; keepalive 16; }
  server {
    listen 127.0.0.1:$NGX;
    location / {
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_cache z;
      proxy_cache_lock on;
      add_header X-Cache \$upstream_cache_status;
    }
  }
}
CONF
taskset -c 0 nginx -p "$WORK/ngx" -c "$WORK/ngx/nginx.conf" -g 'daemon off;' &
BENCH_PIDS+=($!)
PID_OF[$NGX]=$!

# Varnish: memory (malloc) and disk (file) storage, one thread pool.
for v in mem file; do
  port=$VMEM; storage="malloc,256m"
  if [ $v = file ]; then port=$VFILE; storage="file,$WORK/varnish-file.bin,256m"; fi
  taskset -c 0 varnishd -F -n "$WORK/varnish-$v" -a "127.0.0.1:$port" -b "127.0.0.1:$ORIGIN" -s "$storage" \
    -p thread_pools=1 -p thread_pool_min=50 >/dev/null 2>&1 &
  BENCH_PIDS+=($!)
  PID_OF[$port]=$!
done

# meridian-edge: one worker; memory tier, and a 1 MiB memory tier over disk.
for m in mem disk; do
  port=$MMEM; admin=$ADMIN1; extra='memory = "256MiB"'
  if [ $m = disk ]; then port=$MDISK; admin=$ADMIN2; extra="memory = \"1MiB\"
disk_dir = \"$WORK/meridian-disk\"
disk = \"1GiB\""; fi
  cat > "$WORK/edge-$m.toml" <<CONF
[server]
worker_threads = 1
[admin]
listen = "127.0.0.1:$admin"
[log]
access_log = "off"
level = "warn"
[cache]
$extra
[[listeners]]
address = "127.0.0.1:$port"
[[sites]]
hosts = ["*"]
pool = "origin"
[pools.origin]
origins = [{ url = "http://127.0.0.1:$ORIGIN" }]
CONF
  taskset -c 0 "$EDGE" run --config "$WORK/edge-$m.toml" > "$WORK/edge-$m.out" 2>&1 &
  BENCH_PIDS+=($!)
  PID_OF[$port]=$!
done

for port in $ORIGIN $NGX $VMEM $VFILE $MMEM $MDISK; do wait_http "http://127.0.0.1:$port/obj-1024-0"; done
for port in $NGX $VMEM $VFILE $MMEM $MDISK; do check_object "http://127.0.0.1:$port/obj-102400-1" 102400; done

cat > "$WORK/rotate.lua" <<'LUA'
local size = os.getenv("OBJ_SIZE")
local n = tonumber(os.getenv("OBJ_COUNT"))
local i = 0
request = function()
  i = i + 1
  return wrk.format("GET", "/obj-" .. size .. "-" .. (i % n))
end
LUA

origin_requests() { wc -l < "$WORK/origin/access.log"; }

# run PORT SIZE -> "rps p99ms origin_requests_during_run server_cpu_us_per_request"
run() {
  local port=$1 size=$2 before after out rps p99 t0 t1 n
  OBJ_SIZE=$size OBJ_COUNT=${COUNT[$size]} taskset -c 1 wrk -t1 -c"$CONNS" -d3s -s "$WORK/rotate.lua" "http://127.0.0.1:$port" >/dev/null
  before=$(origin_requests)
  t0=$(tree_ticks "${PID_OF[$port]}")
  out=$(OBJ_SIZE=$size OBJ_COUNT=${COUNT[$size]} taskset -c 1 wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency -s "$WORK/rotate.lua" "http://127.0.0.1:$port")
  t1=$(tree_ticks "${PID_OF[$port]}")
  n=$(echo "$out" | awk '/requests in/ {print $1}')
  after=$(origin_requests)
  if echo "$out" | grep -q "Non-2xx"; then echo "non-2xx responses from port $port" >&2; exit 1; fi
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  p99=$(echo "$out" | awk '$1=="99%" {v=$2; if (v ~ /us$/) {sub("us","",v); v=v/1000} else if (v ~ /ms$/) {sub("ms","",v)} else if (v ~ /s$/) {sub("s","",v); v=v*1000}; print v}')
  echo "$rps $p99 $((after - before)) $(us_per_req $((t1 - t0)) "$n")"
}

echo
echo "cache hits; one worker per proxy pinned to CPU 0, wrk and origin on CPU 1; $CONNS connections; ${DURATION}s per run; objects requested in rotation (1 KiB: ${COUNT[1024]} objects, 100 KiB: ${COUNT[102400]})"
echo
echo "| object | tier | meridian req/s | nginx req/s | varnish req/s | m/nginx | m/varnish | p99 ms m / n / v | server CPU µs/req m / n / v | origin requests during runs m / n / v |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for size in 1024 102400; do
  label=$([ $size = 1024 ] && echo "1 KiB" || echo "100 KiB")
  read -r n_rps n_p99 n_o n_cpu < <(run $NGX $size)
  read -r mm_rps mm_p99 mm_o mm_cpu < <(run $MMEM $size)
  read -r vm_rps vm_p99 vm_o vm_cpu < <(run $VMEM $size)
  echo "| $label | memory | $mm_rps | $n_rps | $vm_rps | $(ratio "$mm_rps" "$n_rps") | $(ratio "$mm_rps" "$vm_rps") | $mm_p99 / $n_p99 / $vm_p99 | $mm_cpu / $n_cpu / $vm_cpu | $mm_o / $n_o / $vm_o |"
  read -r md_rps md_p99 md_o md_cpu < <(run $MDISK $size)
  read -r vf_rps vf_p99 vf_o vf_cpu < <(run $VFILE $size)
  echo "| $label | disk | $md_rps | $n_rps | $vf_rps | $(ratio "$md_rps" "$n_rps") | $(ratio "$md_rps" "$vf_rps") | $md_p99 / $n_p99 / $vf_p99 | $md_cpu / $n_cpu / $vf_cpu | $md_o / $n_o / $vf_o |"
done
echo
echo "meridian disk-tier hits during the runs: $(curl -s "http://127.0.0.1:$ADMIN2/cache" | tr -d ' \n' | sed -E 's/.*"disk":\{[^}]*"hits":([0-9]+).*/\1/')"
