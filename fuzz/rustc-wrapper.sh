#!/usr/bin/env bash
# RUSTC_WRAPPER of the fuzz build (tests/fuzz.sh): coverage instrumentation
# only where its feedback guides the fuzzer (our crates, the fuzz targets,
# and the parsers they drive); every other crate (wasmtime and cranelift,
# tokio, rustls, foyer, ...) compiles without it, which roughly halves the
# cold build. Everything keeps --cfg fuzzing and the fuzz profile.
rustc="$1"
shift
name=""
prev=""
for a in "$@"; do
  [ "$prev" = "--crate-name" ] && name="$a"
  prev="$a"
done
case "$name" in
  meridian_* | h3 | httparse | http | toml | toml_parser | hickory_proto | hickory_server | maxminddb | ipnet)
    exec "$rustc" "$@" ;;
esac
for a in "$@"; do
  case "$a" in */fuzz/fuzz_targets/*.rs | */fuzz/src/lib.rs) exec "$rustc" "$@" ;; esac
done
args=()
for a in "$@"; do
  case "$a" in
    -Cpasses=sancov-module | -Cllvm-args=-sanitizer-coverage*) ;;
    *) args+=("$a") ;;
  esac
done
exec "$rustc" "${args[@]}"
