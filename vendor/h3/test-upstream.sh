#!/usr/bin/env bash
# h3's own tests (its 228 unit tests and its doctests) on Meridian's patched
# copy. They need two things the workspace's build does not give them:
# - `--all-features`: they use h3's internals behind the
#   `i-implement-a-third-party-backend-and-opt-into-breaking-changes`
#   feature;
# - h3-quinn's source beside h3's, as in h3's own repository: its tests
#   include `../../../h3-quinn/src/lib.rs`. That is the h3-quinn the
#   workspace resolves (0.0.10), found with `cargo metadata`.
# So they run in a temporary copy, with the dev-dependencies that
# vendor/h3/Cargo.lock pins (`--locked`; from crates.io, ring as the one
# crypto provider). tests/run.sh runs this.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
quinn_manifest=$(cargo metadata --format-version 1 --locked --manifest-path "$ROOT/Cargo.toml" |
  python3 -c 'import json, sys
m = json.load(sys.stdin)
print(next(p["manifest_path"] for p in m["packages"] if p["name"] == "h3-quinn"))')
work=$(mktemp -d /tmp/h3-upstream.XXXXXX)
trap 'rm -rf "$work"' EXIT
cp -r "$ROOT/vendor/h3" "$work/h3"
cp -r "$(dirname "$quinn_manifest")" "$work/h3-quinn"
cd "$work/h3"
CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}/h3-upstream" cargo test --locked --all-features
