#!/usr/bin/env bash
# Purge at scale: one tag covering N objects (default 100,000) on the disk tier.
#   - meridian-edge with a 1 MiB memory tier over a disk tier is filled, from an
#     nginx origin, with N objects of 1 KiB tagged "bulk" (Surrogate-Key) and
#     100 tagged "keep";
#   - POST /purge {"tags":["bulk"]} is timed: from its answer on, nothing of
#     the tag may be served. Right after it, a sample of 2,000 bulk objects is
#     asked for with `Cache-Control: only-if-cached` (the cache answers from
#     storage or 504, never from the origin): every one must be 504;
#   - GET /purge/ID is polled (every 20 ms) until the job is done: the time to
#     that, the job's own started/finished times, and its counts are printed;
#   - then all N bulk objects must be 504 to only-if-cached, and the 100 keep
#     objects hits.
# An edge that answers POST /purge synchronously (200 with "purged", builds
# before purge jobs; EDGE_BIN=...) is timed as one call, cut at 120 s.
#
#   bash bench/purge/run.sh                 # N=100000
#   N=20000 EDGE_BIN=/path/to/old/meridian-edge bash bench/purge/run.sh
set -euo pipefail
BENCH_DIR="$(cd "$(dirname "$0")/.." && pwd)"
source "$BENCH_DIR/lib.sh"
N="${N:-100000}"
need_tools nginx curl
EDGE="$(edge_bin)"
WORK="$(mktemp -d /tmp/meridian-bench-purge.XXXXXX)"
trap bench_cleanup EXIT
chmod 755 "$WORK"
ORIGIN=18960 HTTP=18961 ADMIN=18962

# Origin: nginx answering every /bulk/* and /keep/* path with the same 1 KiB object.
mkdir -p "$WORK/www" "$WORK/origin"
head -c 1024 /dev/urandom > "$WORK/www/obj"
cat > "$WORK/origin/nginx.conf" <<CONF
worker_processes 1;
pid $WORK/origin/nginx.pid;
error_log $WORK/origin/error.log;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$ORIGIN;
    root $WORK/www;
    location /bulk/ { add_header Cache-Control "public, max-age=3600"; add_header Surrogate-Key "bulk"; try_files /obj =404; }
    location /keep/ { add_header Cache-Control "public, max-age=3600"; add_header Surrogate-Key "keep"; try_files /obj =404; }
  }
}
CONF
nginx -p "$WORK/origin" -c "$WORK/origin/nginx.conf" -g 'daemon off;' &
BENCH_PIDS+=($!)

cat > "$WORK/edge.toml" <<CONF
[admin]
listen = "127.0.0.1:$ADMIN"
[log]
access_log = "off"
level = "warn"
[cache]
memory = "1MiB"
disk = "4GiB"
disk_dir = "$WORK/cache"
[[listeners]]
address = "127.0.0.1:$HTTP"
[[sites]]
hosts = ["*"]
pool = "origin"
[pools.origin]
origins = [{ url = "http://127.0.0.1:$ORIGIN" }]
CONF
"$EDGE" run --config "$WORK/edge.toml" > "$WORK/edge.out" 2>&1 &
BENCH_PIDS+=($!)
wait_http "http://127.0.0.1:$ORIGIN/keep/0"
wait_http "http://127.0.0.1:$ADMIN/healthz"
check_object "http://127.0.0.1:$HTTP/keep/0" 1024

# curl_config FILE PREFIX FIRST STEP LAST [only-if-cached] : one transfer per path.
curl_config() {
  {
    if [ -n "${6:-}" ]; then echo 'header = "Cache-Control: only-if-cached"'; fi
    echo 'write-out = "%{http_code}\n"'
    seq "$3" "$4" "$5" | awk -v u="http://127.0.0.1:$HTTP/$2/" '{ print "url = \"" u $1 "\"\noutput = \"/dev/null\"" }'
  } > "$1"
}
# codes CONFIG : the status of every transfer, one a line.
codes() { curl -s --no-progress-meter --parallel --parallel-max 32 -K "$1" || true; }
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
indexed() { curl -s "http://127.0.0.1:$ADMIN/cache" | tr -d ' \n' | sed -E 's/.*"indexed_keys":([0-9]+).*/\1/'; }
field() { tr -d ' \n' | sed -E "s/.*\"$1\":\"?([^,\"}]*).*/\1/"; }

echo "filling: $N bulk objects and 100 keep objects" >&2
t=$(now_ms)
curl_config "$WORK/fill-bulk.cfg" bulk 0 1 $((N - 1))
curl_config "$WORK/fill-keep.cfg" keep 0 1 99
bad=$(codes "$WORK/fill-bulk.cfg" | grep -vc '^200$' || true)
[ "$bad" = 0 ] || { echo "$bad fills failed" >&2; exit 1; }
codes "$WORK/fill-keep.cfg" > /dev/null
for _ in $(seq 1 600); do
  [ "$(indexed)" -ge $((N + 100)) ] && break
  sleep 0.1
done
[ "$(indexed)" -ge $((N + 100)) ] || { echo "only $(indexed) objects stored" >&2; exit 1; }
echo "filled in $(( $(now_ms) - t )) ms; disk tier: $(curl -s "http://127.0.0.1:$ADMIN/cache" | tr -d ' \n' | sed -E 's/.*"disk":\{([^}]*)\}.*/\1/')" >&2
sleep 2

step=$(( N / 2000 > 1 ? N / 2000 : 1 ))
curl_config "$WORK/probe-sample.cfg" bulk 0 "$step" $((N - 1)) only
curl_config "$WORK/probe-all.cfg" bulk 0 1 $((N - 1)) only
curl_config "$WORK/probe-keep.cfg" keep 0 1 99 only

t0=$(now_ms)
resp=$(curl -s -m 120 -o "$WORK/purge.json" -w '%{http_code}' -X POST -d '{"tags":["bulk"]}' "http://127.0.0.1:$ADMIN/purge" || echo "cut")
t1=$(now_ms)
# The sample is asked for while the job runs, and the job is polled meanwhile.
( codes "$WORK/probe-sample.cfg" > "$WORK/sample.codes"; now_ms > "$WORK/sample.end" ) &
sampler=$!
id=""
if [ "$resp" = 202 ]; then
  id=$(field id < "$WORK/purge.json")
  while :; do
    curl -s "http://127.0.0.1:$ADMIN/purge/$id" > "$WORK/job.json"
    state=$(field state < "$WORK/job.json")
    [ "$state" = done ] || [ "$state" = failed ] && break
    [ $(( $(now_ms) - t0 )) -lt 600000 ] || { echo "the job did not end in 10 minutes" >&2; exit 1; }
    sleep 0.02
  done
  t3=$(now_ms)
else
  cp "$WORK/purge.json" "$WORK/job.json" 2>/dev/null || echo '{}' > "$WORK/job.json"
  t3=$t1
fi
wait "$sampler"
t2=$(cat "$WORK/sample.end")
sample_served=$(grep -vc "^504$" "$WORK/sample.codes" || true)
echo "sample answers: $(sort "$WORK/sample.codes" | uniq -c | tr "\n" " ")" >&2
sample_n=$(grep -c '^url' "$WORK/probe-sample.cfg")
all_served=$(codes "$WORK/probe-all.cfg" | grep -vc '^504$' || true)
keep_hits=$(codes "$WORK/probe-keep.cfg" | grep -c '^200$' || true)

echo
echo "purge of one tag covering $N objects of 1 KiB on the disk tier (memory tier 1 MiB); edge: $EDGE"
echo
echo "| measure | value |"
echo "|---|---|"
echo "| POST /purge answer | $resp |"
echo "| time until POST /purge answered (from then on nothing of the tag is served) | $((t1 - t0)) ms |"
echo "| bulk objects served right after the answer (only-if-cached, sample of $sample_n, asked in $((t2 - t1)) ms) | $sample_served |"
if [ -n "$id" ]; then
  acc=$(field accepted < "$WORK/job.json"); st=$(field started < "$WORK/job.json"); fin=$(field finished < "$WORK/job.json")
  echo "| time until GET /purge/ID said done (polled every 20 ms) | $((t3 - t0)) ms |"
  echo "| job: accepted → finished (its own times) | $(awk -v a="$acc" -v f="$fin" 'BEGIN { printf "%.0f ms", (f - a) * 1000 }') |"
  echo "| job: started → finished | $(awk -v s="$st" -v f="$fin" 'BEGIN { printf "%.0f ms", (f - s) * 1000 }') |"
  echo "| job: state, matched, removed | $(field state < "$WORK/job.json"), $(field matched < "$WORK/job.json"), $(field removed < "$WORK/job.json") |"
else
  echo "| synchronous purge: purged | $(field purged < "$WORK/job.json") |"
fi
echo "| bulk objects served after the job (only-if-cached, all $N) | $all_served |"
echo "| keep objects still hits (of 100) | $keep_hits |"
echo "| objects left in the index | $(indexed) |"
