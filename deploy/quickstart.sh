#!/usr/bin/env bash
# Installs, builds and runs the whole system on this machine in one command:
# `hsm-driver dev` (a SoftHSMv2 token and master key, a local PKI, SQLite, the
# reference proxy and the driver), which runs a demo through the proxy
# (a key per scheme, a signature, a verification), prints it, and keeps
# serving until Ctrl-C / SIGTERM.
# Usage: deploy/quickstart.sh [DATA_DIR]   (default: ./hsm-driver-dev)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/deploy/install-deps.sh"
"$root/deploy/build.sh" -DHSM_DRIVER_BUILD_TESTS=OFF
exec "$root/build/hsm-driver" dev --data-dir "${1:-$root/hsm-driver-dev}"
