#!/usr/bin/env bash
# Smoke run of the libFuzzer targets (fuzz/README.md): configures and builds
# them with clang in their own build folder (FUZZ_BUILD_DIR, default
# build-fuzz; never BUILD_DIR, which names the main gcc build),
# then runs each for SECONDS (default 20) on a copy of its seed corpus
# (fuzz/corpus/<target>). Exits non-zero on any crash, leak, sanitizer
# report or timeout, printing the target's log and keeping the reproducer
# under $FUZZ_BUILD_DIR/fuzz-artifacts/<target>/.
#   deploy/fuzz-smoke.sh [SECONDS]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
seconds=${1:-20}
build=${FUZZ_BUILD_DIR:-$root/build-fuzz}
jobs=${JOBS:-2}
targets=(fuzz_poll fuzz_conninfo fuzz_hex_point fuzz_result_status
         fuzz_proxy_bodies)

CC=${CC:-clang} CXX=${CXX:-clang++} cmake -S "$root" -B "$build" \
  -DHSM_DRIVER_BUILD_FUZZ=ON -DHSM_DRIVER_BUILD_TESTS=OFF >/dev/null
cmake --build "$build" -j "$jobs" --target "${targets[@]}"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
status=0
for t in "${targets[@]}"; do
  cp -r "$root/fuzz/corpus/$t" "$work/$t"
  artifacts=$build/fuzz-artifacts/$t
  mkdir -p "$artifacts"
  if "$build/$t" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
       -max_len=4096 -print_final_stats=1 -artifact_prefix="$artifacts/" \
       "$work/$t" >"$work/$t.log" 2>&1; then
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/$t.log")
    echo "fuzz-smoke: $t ok: ${execs:-?} executions in ${seconds}s," \
         "corpus $(find "$work/$t" -type f | wc -l) files"
  else
    echo "fuzz-smoke: $t FAILED; reproducer in $artifacts/" >&2
    tail -n 60 "$work/$t.log" >&2
    status=1
  fi
done
exit "$status"
