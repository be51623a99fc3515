#!/usr/bin/env bash
# The whole test suite on a fresh Debian 12 machine: installs every package,
# builds with warnings as errors, runs unit and integration tests (a real
# SoftHSMv2 token and real SQLite files, created per test under /tmp), then
# the key-path demo end to end in a temporary data folder.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/deploy/install-deps.sh"
export BUILD_DIR=${BUILD_DIR:-$root/build}
"$root/deploy/build.sh" -DHSM_DRIVER_WERROR=ON -DHSM_DRIVER_BUILD_TESTS=ON
(cd "$BUILD_DIR" && ctest --output-on-failure --no-tests=error -j "$(nproc)")
demo=$(mktemp -d)
trap 'rm -rf "$demo"' EXIT
HSM_DRIVER_BIN=$BUILD_DIR/hsm-driver "$root/deploy/demo-keypath.sh" "$demo/data"
