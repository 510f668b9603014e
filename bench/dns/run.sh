#!/usr/bin/env bash
# Load test: meridian-dns against PowerDNS (GeoIP backend) for steered A
# queries with ECS, and against Knot and NSD for a static zone. Every server
# is pinned to the same single CPU (SERVER_CPU) and dnsperf to another
# (CLIENT_CPU); the script prints the measured queries per second, the
# server's CPU time per query (user+system ticks from /proc/PID/stat over the
# run, divided by the queries completed: QPS on two cores is bounded by
# dnsperf, CPU per query much less) and the ratios from this one run. It
# records nothing: run it and read the output.
#
# meridian-dns also runs with the demo zone signed (a KSK and a ZSK, ECDSA
# P-256): DO queries answered from the signature cache, and DO queries for
# distinct wildcard names, every one a signature-cache miss.
#
# Needs (Debian): dnsperf pdns-server pdns-backend-geoip knot nsd
# (listed in bench/apt-packages.txt). Missing peers are skipped with a note;
# missing dnsperf is an error.
#
# Usage: bench/dns/run.sh [SECONDS]     (default 10 per test)
# MERIDIAN_BIN=path/to/meridian-dns skips the release build and runs that binary.
set -euo pipefail

DURATION="${1:-10}"
SERVER_CPU="${SERVER_CPU:-1}"
CLIENT_CPU="${CLIENT_CPU:-0}"
CLIENTS="${CLIENTS:-8}"
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
EX="$ROOT/dns/examples"
WORK="$(mktemp -d /tmp/meridian-dns-bench.XXXXXX)"
PIDS=()
cleanup() {
    for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

command -v dnsperf >/dev/null || { echo "dnsperf not found: apt-get install dnsperf" >&2; exit 1; }
command -v taskset >/dev/null || { echo "taskset not found (util-linux)" >&2; exit 1; }

free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }

wait_dns() { # port name
    for _ in $(seq 1 100); do
        if kdig @127.0.0.1 -p "$1" "$2" SOA +time=1 +retry=0 +short >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    echo "server on port $1 did not answer" >&2
    return 1
}

# ECS option for dnsperf -E: code 8, family 1, source /24, scope 0, 198.51.100.0
ECS_PARIS="8:00011800c63364"

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
TICK_US="$(( 1000000 / $(getconf CLK_TCK) ))"

# load label port queryfile [extra dnsperf args...]: runs dnsperf against the
# server most recently started (${PIDS[-1]}); prints "QPS CPU_US_PER_QUERY".
load() {
    local label="$1" port="$2" qf="$3"; shift 3
    local pid="${PIDS[-1]}" out t0 t1
    t0="$(cpu_ticks "$pid")"
    out="$(taskset -c "$CLIENT_CPU" dnsperf -s 127.0.0.1 -p "$port" -d "$qf" -l "$DURATION" -c "$CLIENTS" -q 200 "$@" 2>&1)"
    t1="$(cpu_ticks "$pid")"
    local qps lost done_q us
    qps="$(awk '/Queries per second:/ {print $4}' <<<"$out")"
    lost="$(awk '/Queries lost:/ {print $3}' <<<"$out")"
    done_q="$(awk '/Queries completed:/ {print $3}' <<<"$out")"
    if [ -z "$qps" ] || [ -z "$done_q" ] || [ "$done_q" = 0 ]; then echo "$out" >&2; echo "dnsperf failed for $label" >&2; return 1; fi
    us="$(awk -v t=$((t1 - t0)) -v u="$TICK_US" -v q="$done_q" 'BEGIN { printf "%.2f", t * u / q }')"
    printf '%-44s %12s qps  %8s us CPU/query  (lost %s)\n' "$label" "$qps" "$us" "$lost" >&2
    echo "$qps $us"
}

ratio() { python3 -c "import sys; a,b=float(sys.argv[1]),float(sys.argv[2]); print(f'{a/b:.2f}' if b else 'n/a')" "$1" "$2"; }

if [ -n "${MERIDIAN_BIN:-}" ]; then
    BIN="$MERIDIAN_BIN"
else
    echo "== building meridian-dns (release)" >&2
    (cd "$ROOT" && cargo build --release -p meridian-dns >&2)
    BIN="$ROOT/target/release/meridian-dns"
fi

# Query files.
printf 'www.demo.meridian.test A\n' > "$WORK/steered.txt"
printf 'static.demo.meridian.test A\nmail.demo.meridian.test A\ndemo.meridian.test MX\nns1.demo.meridian.test AAAA\n' > "$WORK/static.txt"
# Distinct names under the demo's wildcard: each answer is a new RRset.
awk 'BEGIN { for (i = 0; i < 400000; i++) printf "n%d.wild.demo.meridian.test A\n", i }' > "$WORK/miss.txt"

# A GeoIP database for the peers, built by our own compiler from the demo CSV.
"$BIN" geo build --csv "$EX/demo-geo.csv" --out "$WORK/demo.mmdb" >&2

declare -A R

# --- meridian-dns -----------------------------------------------------------
MPORT="$(free_port)"
taskset -c "$SERVER_CPU" "$BIN" run --config "$EX/demo.toml" --listen "127.0.0.1:$MPORT" --no-admin \
    >"$WORK/meridian.out" 2>"$WORK/meridian.err" &
PIDS+=($!)
wait_dns "$MPORT" demo.meridian.test
R[meridian_steered]="$(load "meridian-dns steered A + ECS" "$MPORT" "$WORK/steered.txt" -E "$ECS_PARIS")"
R[meridian_static]="$(load "meridian-dns static zone" "$MPORT" "$WORK/static.txt")"
kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true

# --- meridian-dns, the demo zone signed ----------------------------------------
"$BIN" keys generate --zone demo.meridian.test. --role ksk --out "$WORK/ksk.pem" >/dev/null
"$BIN" keys generate --zone demo.meridian.test. --role zsk --out "$WORK/zsk.pem" >/dev/null
sed -e "s#file = \"demo.meridian.test.zone\"#file = \"$EX/demo.meridian.test.zone\"\n[zones.dnssec]\nkeys = [{ file = \"$WORK/ksk.pem\", role = \"ksk\" }, { file = \"$WORK/zsk.pem\", role = \"zsk\" }]#" \
    -e "s#csv = \"demo-geo.csv\"#csv = \"$EX/demo-geo.csv\"#" "$EX/demo.toml" > "$WORK/signed.toml"
SPORT="$(free_port)"
taskset -c "$SERVER_CPU" "$BIN" run --config "$WORK/signed.toml" --listen "127.0.0.1:$SPORT" --no-admin \
    >"$WORK/signed.out" 2>"$WORK/signed.err" &
PIDS+=($!)
wait_dns "$SPORT" demo.meridian.test
kdig @127.0.0.1 -p "$SPORT" +dnssec www.demo.meridian.test A +subnet=198.51.100.0/24 | grep -q RRSIG \
    || { echo "the signed server returned no RRSIG" >&2; exit 1; }
R[signed_steered_nodo]="$(load "signed zone, steered A + ECS, no DO" "$SPORT" "$WORK/steered.txt" -E "$ECS_PARIS")"
R[signed_steered]="$(load "signed zone, steered A + ECS, DO (cached)" "$SPORT" "$WORK/steered.txt" -E "$ECS_PARIS" -D)"
R[signed_static]="$(load "signed zone, static, DO (cached)" "$SPORT" "$WORK/static.txt" -D)"
R[miss_nodo]="$(load "signed zone, distinct names, no DO" "$SPORT" "$WORK/miss.txt")"
kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true
# A fresh server, so that every name below is a signature-cache miss.
taskset -c "$SERVER_CPU" "$BIN" run --config "$WORK/signed.toml" --listen "127.0.0.1:$SPORT" --no-admin \
    >"$WORK/signed.out" 2>"$WORK/signed.err" &
PIDS+=($!)
wait_dns "$SPORT" demo.meridian.test
R[miss]="$(load "signed zone, distinct names, DO (misses)" "$SPORT" "$WORK/miss.txt" -D)"
kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true

# --- PowerDNS, GeoIP backend --------------------------------------------------
if command -v pdns_server >/dev/null && ls /usr/lib/*/pdns/libgeoipbackend.so >/dev/null 2>&1; then
    PPORT="$(free_port)"
    cat > "$WORK/geo-zones.yaml" <<YAML
domains:
- domain: demo.meridian.test
  ttl: 30
  records:
    demo.meridian.test:
      - soa: ns1.demo.meridian.test hostmaster.demo.meridian.test 2026112601 7200 3600 1209600 300
      - ns: ns1.demo.meridian.test
    ns1.demo.meridian.test:
      - a: 192.0.2.53
    eu.www.demo.meridian.test:
      - a: 192.0.2.2
    oc.www.demo.meridian.test:
      - a: 192.0.2.3
    unknown.www.demo.meridian.test:
      - a: 192.0.2.1
    na.www.demo.meridian.test:
      - a: 192.0.2.1
  services:
    www.demo.meridian.test: '%cn.www.demo.meridian.test'
YAML
    mkdir -p "$WORK/pdns"
    cat > "$WORK/pdns/pdns.conf" <<CONF
launch=geoip
geoip-database-files=mmdb:$WORK/demo.mmdb
geoip-zones-file=$WORK/geo-zones.yaml
edns-subnet-processing=yes
local-address=127.0.0.1
local-port=$PPORT
socket-dir=$WORK/pdns
daemon=no
guardian=no
disable-syslog=yes
loglevel=3
receiver-threads=1
distributor-threads=1
cache-ttl=0
query-cache-ttl=0
CONF
    taskset -c "$SERVER_CPU" pdns_server --config-dir="$WORK/pdns" >"$WORK/pdns.log" 2>&1 &
    PIDS+=($!)
    if wait_dns "$PPORT" demo.meridian.test; then
        got="$(kdig @127.0.0.1 -p "$PPORT" www.demo.meridian.test A +subnet=198.51.100.0/24 +short | tail -1)"
        echo "PowerDNS answers $got for the Paris subnet (meridian-dns: 192.0.2.2)" >&2
        R[pdns_steered]="$(load "PowerDNS geoip steered A + ECS" "$PPORT" "$WORK/steered.txt" -E "$ECS_PARIS")"
    else
        cat "$WORK/pdns.log" >&2
    fi
    kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true
else
    echo "PowerDNS with the GeoIP backend not installed: skipped (apt-get install pdns-server pdns-backend-geoip)" >&2
fi

# --- Knot -------------------------------------------------------------------
if command -v knotd >/dev/null; then
    KPORT="$(free_port)"
    mkdir -p "$WORK/knot/db" "$WORK/knot/run"
    cp "$EX/demo.meridian.test.zone" "$WORK/knot/"
    cat > "$WORK/knot/knot.conf" <<CONF
server:
    rundir: "$WORK/knot/run"
    listen: 127.0.0.1@$KPORT
    udp-workers: 1
    tcp-workers: 1
    background-workers: 1
database:
    storage: "$WORK/knot/db"
log:
  - target: stderr
    any: warning
zone:
  - domain: demo.meridian.test
    file: "$WORK/knot/demo.meridian.test.zone"
    zonefile-sync: -1
    journal-content: none
CONF
    taskset -c "$SERVER_CPU" knotd -c "$WORK/knot/knot.conf" >"$WORK/knot.log" 2>&1 &
    PIDS+=($!)
    wait_dns "$KPORT" demo.meridian.test && R[knot_static]="$(load "Knot static zone" "$KPORT" "$WORK/static.txt")"
    kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true
else
    echo "Knot not installed: skipped (apt-get install knot)" >&2
fi

# --- NSD --------------------------------------------------------------------
if command -v nsd >/dev/null; then
    NPORT="$(free_port)"
    mkdir -p "$WORK/nsd"
    cp "$EX/demo.meridian.test.zone" "$WORK/nsd/"
    cat > "$WORK/nsd/nsd.conf" <<CONF
server:
    ip-address: 127.0.0.1
    port: $NPORT
    server-count: 1
    username: ""
    chroot: ""
    zonesdir: "$WORK/nsd"
    pidfile: "$WORK/nsd/nsd.pid"
    database: ""
    zonelistfile: "$WORK/nsd/zone.list"
    xfrdfile: "$WORK/nsd/xfrd.state"
    xfrdir: "$WORK/nsd"
    verbosity: 0
    # NSD has response rate limiting on by default; the load test is one client.
    rrl-ratelimit: 0
    rrl-whitelist-ratelimit: 0
remote-control:
    control-enable: no
zone:
    name: demo.meridian.test
    zonefile: demo.meridian.test.zone
CONF
    taskset -c "$SERVER_CPU" nsd -d -c "$WORK/nsd/nsd.conf" >"$WORK/nsd.log" 2>&1 &
    PIDS+=($!)
    wait_dns "$NPORT" demo.meridian.test && R[nsd_static]="$(load "NSD static zone" "$NPORT" "$WORK/static.txt")"
    kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true
else
    echo "NSD not installed: skipped (apt-get install nsd)" >&2
fi

echo
echo "Results (${DURATION}s each, servers on CPU $SERVER_CPU, dnsperf on CPU $CLIENT_CPU, $CLIENTS clients): qps, server CPU us/query"
for k in meridian_steered pdns_steered meridian_static knot_static nsd_static signed_steered_nodo signed_steered signed_static miss_nodo miss; do
    printf '  %-20s %s\n' "$k" "${R[$k]:-skipped}"
done
us() { cut -d' ' -f2 <<<"$1"; }
qps() { cut -d' ' -f1 <<<"$1"; }
echo "Ratios of CPU per query (measured in this run; lower is better for the first):"
[ -n "${R[knot_static]:-}" ] && echo "  meridian steered+ECS / Knot static: $(ratio "$(us "${R[meridian_steered]}")" "$(us "${R[knot_static]}")")  (goal <= 1.25)"
[ -n "${R[knot_static]:-}" ] && echo "  meridian static / Knot static:      $(ratio "$(us "${R[meridian_static]}")" "$(us "${R[knot_static]}")")  (goal <= 1.1)"
[ -n "${R[pdns_steered]:-}" ] && echo "  meridian / PowerDNS steered+ECS:    $(ratio "$(us "${R[meridian_steered]}")" "$(us "${R[pdns_steered]}")")"
[ -n "${R[nsd_static]:-}" ] && echo "  meridian static / NSD static:       $(ratio "$(us "${R[meridian_static]}")" "$(us "${R[nsd_static]}")")"
echo "  signed (cache) / unsigned, steered: $(ratio "$(us "${R[signed_steered]}")" "$(us "${R[meridian_steered]}")")  (goal <= 1.5)"
echo "  signed (cache) / unsigned, static:  $(ratio "$(us "${R[signed_static]}")" "$(us "${R[meridian_static]}")")  (goal <= 1.5)"
echo "  signature-cache miss, extra CPU per query: $(awk -v a="$(us "${R[miss]}")" -v b="$(us "${R[miss_nodo]}")" 'BEGIN { printf "%.1f us", a - b }')"
exit 0
