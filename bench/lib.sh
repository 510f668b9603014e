# Shared helpers of the benchmark scripts (sourced, not run).
# Everything binds 127.0.0.1; every process started is killed on exit.

BENCH_PIDS=()
bench_cleanup() {
  for p in "${BENCH_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${BENCH_PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  [ -n "${WORK:-}" ] && rm -rf "$WORK"
}

# need_tools TOOL... : install bench/apt-packages.txt if any is missing, then insist.
need_tools() {
  local missing=0
  for t in "$@"; do command -v "$t" >/dev/null || missing=1; done
  if [ "$missing" = 1 ]; then
    local sudo=""; [ "$(id -u)" != 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    grep -vE '^\s*(#|$)' "$BENCH_DIR/apt-packages.txt" | xargs $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends
  fi
  for t in "$@"; do command -v "$t" >/dev/null || { echo "bench needs $t" >&2; exit 1; }; done
}

# make_cert DIR : a self-signed P-256 certificate for localhost (cert.pem, key.pem).
make_cert() {
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj /CN=localhost -addext subjectAltName=DNS:localhost \
    -keyout "$1/key.pem" -out "$1/cert.pem" 2>/dev/null
}

# start_origin PORT SIZE [CACHE_CONTROL] : nginx (one worker) serving /obj of
# SIZE random bytes, with that Cache-Control if given.
start_origin() {
  local port=$1 size=$2 cc="${3:-}" extra=""
  [ -n "$cc" ] && extra="add_header Cache-Control \"$cc\";"
  # nginx workers run unprivileged: the object must be readable by them.
  chmod 755 "$WORK"
  mkdir -p "$WORK/www" "$WORK/origin"
  head -c "$size" /dev/urandom > "$WORK/www/obj"
  cat > "$WORK/origin/nginx.conf" <<CONF
worker_processes 1;
pid $WORK/origin/nginx.pid;
error_log $WORK/origin/error.log;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:$port; root $WORK/www; $extra }
}
CONF
  nginx -p "$WORK/origin" -c "$WORK/origin/nginx.conf" -g 'daemon off;' &
  BENCH_PIDS+=($!)
}

# wait_http URL : up to 5 s for URL to answer.
wait_http() {
  for _ in $(seq 1 100); do
    curl -sk -o /dev/null "$1" && return 0
    sleep 0.05
  done
  echo "timed out waiting for $1" >&2
  return 1
}

# check_object URL SIZE : the URL must answer 200 with SIZE bytes, or the run stops.
check_object() {
  local got
  got=$(curl -sk -o /dev/null -w '%{http_code} %{size_download}' "$1")
  if [ "$got" != "200 $2" ]; then
    echo "sanity check failed for $1: got '$got', want '200 $2'" >&2
    exit 1
  fi
}

# cpu_ticks PID : user+system clock ticks the process has used.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# ratio A B : A/B with two decimals.
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }

# tree_pids PID : PID and all its descendants.
tree_pids() {
  echo "$1"
  local c
  for c in $(cat /proc/"$1"/task/*/children 2>/dev/null); do tree_pids "$c"; done
}

# tree_ticks PID : user+system clock ticks used by PID and its descendants
# (nginx and Varnish serve from child processes).
tree_ticks() {
  local total=0 p t
  for p in $(tree_pids "$1"); do
    t=$(cpu_ticks "$p" 2>/dev/null || echo 0)
    total=$((total + t))
  done
  echo "$total"
}

# us_per_req TICKS REQUESTS : server CPU microseconds per request.
us_per_req() {
  awk -v t="$1" -v n="$2" -v hz="$(getconf CLK_TCK)" 'BEGIN { if (n > 0) printf "%.1f", t / hz * 1e6 / n; else print "-" }'
}

# edge_bin : builds the release binaries if missing; prints the edge's path.
# EDGE_BIN=PATH uses that binary instead (an older build, to compare).
edge_bin() {
  if [ -n "${EDGE_BIN:-}" ]; then
    echo "$EDGE_BIN"
    return
  fi
  (cd "$BENCH_DIR/.." && { [ -x target/release/meridian-edge ] && [ -x target/release/h3load ]; } \
    || cargo build --release -p meridian-edge -p meridian-bench >&2)
  echo "$BENCH_DIR/../target/release/meridian-edge"
}

# plugin_headers_toml DIST : the `headers` plugin as the plugin benches
# configure it (a request header added; HSTS added and Server removed on the
# response).
plugin_headers_toml() {
  cat <<CONF
[[sites.plugins]]
path = "$1/headers.wasm"
config = '{"request":{"add":{"X-From-Edge":"1"}},"response":{"add":{"Strict-Transport-Security":"max-age=63072000"},"remove":["Server"]}}'
CONF
}
