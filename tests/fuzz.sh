#!/usr/bin/env bash
# Runs every fuzz target of fuzz/ (docs/fuzzing.md) for a bounded time, on
# the stable toolchain: libfuzzer-sys, with LLVM's coverage passes turned on
# by stable -C flags (no nightly, no cargo-fuzz). tests/run.sh calls it.
#
#   tests/fuzz.sh                 every target, FUZZ_SECONDS each (default 10: CI time, docs/fuzzing.md)
#   tests/fuzz.sh range slice     only these
#   FUZZ_SECONDS=600 tests/fuzz.sh h3_request
#
# A crash, a timeout, a target that fails to build, or a binary that is not
# instrumented makes it exit non-zero. New inputs go to a scratch corpus
# (fuzz/target/corpus/), not to the seeds in fuzz/corpus/; a crashing input
# is kept in fuzz/target/artifacts/ and its path printed.
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_EACH="${FUZZ_SECONDS:-10}"
TRIPLE="$(rustc -vV | sed -n 's/^host: //p')"
export CARGO_TARGET_DIR="$PWD/fuzz/target"
# The flags cargo-fuzz passes, minus the sanitizer (-Zsanitizer is nightly-only).
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# Instruments only the crates whose coverage guides the fuzzer (see the script).
export RUSTC_WRAPPER="$PWD/fuzz/rustc-wrapper.sh"

if [ "$#" -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^meridian-fuzz$')
fi

command -v c++ >/dev/null || { echo "fuzz: libfuzzer-sys needs a C++ compiler (build-essential)" >&2; exit 1; }

echo "== fuzz: building ${#targets[@]} targets (profile fuzz, target $TRIPLE)"
build_start=$(date +%s)
bins=()
for t in "${targets[@]}"; do bins+=(--bin "$t"); done
# The fuzz workspace builds the versions the main one does: its lock starts
# as a copy of the root lock (cargo drops what it does not use and adds
# libfuzzer-sys). --target keeps RUSTFLAGS off build scripts and proc macros.
cp Cargo.lock fuzz/Cargo.lock
cargo build --profile fuzz --target "$TRIPLE" --manifest-path fuzz/Cargo.toml "${bins[@]}"
echo "fuzz: build took $(( $(date +%s) - build_start )) s"

out_dir="$CARGO_TARGET_DIR/$TRIPLE/fuzz"
work="$CARGO_TARGET_DIR/runs"
mkdir -p "$work" "$CARGO_TARGET_DIR/artifacts" "$CARGO_TARGET_DIR/corpus"
passed=0
failed=0
for t in "${targets[@]}"; do
  seeds="fuzz/corpus/$t"
  [ -d "$seeds" ] || { echo "fuzz $t: no seed corpus at $seeds" >&2; failed=$((failed + 1)); continue; }
  scratch="$CARGO_TARGET_DIR/corpus/$t"
  mkdir -p "$scratch"
  log="$work/$t.log"
  start=$(date +%s)
  set +e
  # -timeout: one input taking longer is a hang, and a failure.
  "$out_dir/$t" -max_total_time="$SECONDS_EACH" -timeout=30 -rss_limit_mb=3072 \
    -print_final_stats=1 -artifact_prefix="$CARGO_TARGET_DIR/artifacts/$t-" \
    "$scratch" "$seeds" >"$log" 2>&1
  rc=$?
  set -e
  took=$(( $(date +%s) - start ))
  counters=$(sed -n 's/^INFO: Loaded [0-9]* modules *(\([0-9]*\) inline 8-bit counters).*/\1/p' "$log" | head -1)
  inited=$(sed -n 's/^#[0-9]*[[:space:]]*INITED cov: \([0-9]*\).*/\1/p' "$log" | head -1)
  final=$(grep -Eo 'cov: [0-9]+' "$log" | tail -1 | grep -Eo '[0-9]+' || true)
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  corp=$(grep -Eo 'corp: [0-9]+' "$log" | tail -1 | grep -Eo '[0-9]+' || true)
  summary="fuzz $t: ${runs:-?} runs in ${took} s, cov ${inited:-?} -> ${final:-?}, corpus ${corp:-?}, ${counters:-0} counters"
  if [ "$rc" -ne 0 ]; then
    echo "$summary: FAILED (exit $rc); log $log"
    grep -E 'panicked at|ERROR: libFuzzer|SUMMARY|Test unit written to|==[0-9]+==' "$log" | head -20 || true
    failed=$((failed + 1))
  elif [ -z "$counters" ] || [ "$counters" -eq 0 ] || [ -z "$final" ] || [ "$final" -eq 0 ]; then
    echo "$summary: FAILED (not instrumented: no coverage feedback); log $log"
    failed=$((failed + 1))
  else
    echo "$summary: ok"
    passed=$((passed + 1))
  fi
done
echo "fuzz: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
