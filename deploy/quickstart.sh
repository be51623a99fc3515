#!/usr/bin/env bash
# Installs, builds and runs the key path end to end (see demo-keypath.sh).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/deploy/install-deps.sh"
"$root/deploy/build.sh" -DHSM_DRIVER_BUILD_TESTS=OFF
"$root/deploy/demo-keypath.sh" "$@"
