#!/usr/bin/env bash
# The whole test suite: installs what the tests need (Debian packages, as
# root or with sudo), then formatting, lints, and every test of the workspace.
# `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

echo "== installing test dependencies"
mapfile -t pkgs < <(grep -vE '^\s*(#|$)' .ci/apt-packages.txt)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# The independent HTTP/3 client of the interop tests.
if ! python3 -c "import aioquic" 2>/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check aioquic \
    || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages aioquic
fi
for tool in curl kdig python3 ip bird birdc systemd-analyze fiu-ctrl; do
  command -v "$tool" >/dev/null || { echo "required tool $tool is missing after install" >&2; exit 1; }
done
python3 -c "import aioquic" || { echo "aioquic did not install" >&2; exit 1; }
rustup component add rustfmt clippy >/dev/null 2>&1 || true
# Lossless SO_REUSEPORT upgrades (README, "Zero-downtime upgrade"): queued
# connections of a closing listener move to the new process instead of being reset.
$SUDO sysctl -q -w net.ipv4.tcp_migrate_req=1

echo "== cargo fmt --check"
cargo fmt --all --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

echo "== Wasm plugins: SDK and example tests, and the modules in wasm-plugins/dist"
# The end-to-end tests load the built plugins; the script installs its
# toolchain (rustup's wasm32 target, else Debian's rustc-web) as needed.
wasm-plugins/build

echo "== cargo test"
test_log="$(mktemp)"
trap 'rm -f "$test_log"' EXIT
cargo test --workspace 2>&1 | tee "$test_log"

echo "== h3's own tests, on the patched copy in vendor/h3 (vendor/h3/MERIDIAN-PATCH.md)"
bash vendor/h3/test-upstream.sh 2>&1 | tee -a "$test_log"

echo "== soak (2 minutes) and the chaos scenarios that fit CI's time (docs/soak-chaos.md)"
# The debug binaries `cargo test` built; kill9 runs 45 s here (two kills);
# diskfull and netem need root (bench/chaos/run.sh runs them through sudo
# otherwise); plugin runs 5 rounds instead of 7 (its bound is the median of
# the rounds' paired changes).
# The soak's bounds are the issue's (RSS +5%, descriptors flat, no failed
# request, the edge's CPU per request +20%), after 60 s of calibration at full
# load that warms the edge up, except the p99's: it may grow up to 100% here
# (a p99 that doubles with a trend still fails), as the debug build at 70% of
# a shared 2-core machine turns a 12% slowdown of the machine into a 73%
# higher p99 (docs/soak-chaos.md); the issue's 20% bound holds for release
# runs, 2-minute ones included.
P99_LIMIT=100 PROFILE=debug bash bench/soak/run.sh 120
PROFILE=debug bash bench/chaos/run.sh flap --duration 30
PROFILE=debug bash bench/chaos/run.sh dnsflap --duration 30
PROFILE=debug bash bench/chaos/run.sh kill9 --duration 45 --every 15
PROFILE=debug bash bench/chaos/run.sh diskerror --phase 10
PROFILE=debug bash bench/chaos/run.sh diskfull --phase 10
PROFILE=debug bash bench/chaos/run.sh netem --phase 10
# The same scenario with `tc netem` itself: a QEMU VM with Debian's kernel
# (which has sch_netem), this machine's root shared read-only under a
# tmpfs overlay.
PROFILE=debug bash bench/chaos/netem-vm.sh --phase 10
PROFILE=debug bash bench/chaos/run.sh plugin --rounds 5

echo "== deployment files"
bash infra/systemd/verify.sh
bash infra/validate.sh

echo "== fuzzing: every target of fuzz/ for 10 s, on stable (docs/fuzzing.md)"
bash tests/fuzz.sh

# One closing line for the whole suite: the cargo tests' counts (the
# fuzz targets, soak and chaos scenarios have their own lines above).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?$/) p += $(i-1); if ($i ~ /^failed;?$/) f += $(i-1) } }
     END { printf "total: %d passed, %d failed\n", p, f }' "$test_log"
