#!/usr/bin/env bash
# The whole test suite on a fresh Debian 12 machine: installs every package,
# builds with warnings as errors, starts a private PostgreSQL cluster (a
# temporary folder, a loopback port, a non-root user), runs unit, integration,
# network, engine, PostgreSQL and redundancy tests (real SoftHSMv2 tokens and
# real SQLite files are created per test under /tmp), then the key-path demo
# end to end, the crash and failover drills, a short libFuzzer run of each
# parser of untrusted bytes, the suite again under ASan+UBSan and under TSan
# (deploy/run-sanitizers.sh), and stops the cluster; then checks the include
# layering, the formatting and the deployment files (deploy/check-layers.sh,
# deploy/check-format.sh, deploy/check-deploy.sh).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
# Each step says when it starts, in minutes since the run began: the whole
# run must stay within CI's budget, and this shows where the time goes.
step() { printf '== [%d:%02d] %s\n' $((SECONDS / 60)) $((SECONDS % 60)) "$*"; }
step "install the packages"
"$root/deploy/install-deps.sh"
export BUILD_DIR=${BUILD_DIR:-$root/build}
step "build (warnings are errors)"
"$root/deploy/build.sh" -DHSM_DRIVER_WERROR=ON -DHSM_DRIVER_BUILD_TESTS=ON

work=$(mktemp -d)
chmod 755 "$work"
cleanup() {
  "$root/deploy/pg-test-cluster.sh" stop "$work/pg" || true
  rm -rf "$work"
}
trap cleanup EXIT
HSM_TEST_POSTGRES_URL=$("$root/deploy/pg-test-cluster.sh" start "$work/pg")
export HSM_TEST_POSTGRES_URL HSM_TEST_PG_DIR=$work/pg
echo "PostgreSQL for the tests: $HSM_TEST_POSTGRES_URL"

step "tests"
(cd "$BUILD_DIR" && ctest --output-on-failure --no-tests=error -j "$(nproc)")
step "key-path demo"
HSM_DRIVER_BIN=$BUILD_DIR/hsm-driver "$root/deploy/demo-keypath.sh" "$work/demo"

# Crash consistency and failover at a small size: two real drivers, kill -9,
# database restarts and crashes, a synchronous standby promoted under load;
# every request answered, one key per key id, every key and signature
# checked with openssl.
step "crash and failover drills"
HSM_DRIVER_BIN=$BUILD_DIR/hsm-driver "$root/deploy/crash-drill.sh" --rounds 3
HSM_DRIVER_BIN=$BUILD_DIR/hsm-driver "$root/deploy/failover-drill.sh" --rounds 2

# The parsers of untrusted bytes under libFuzzer, 20 s each (fuzz/README.md).
step "fuzz smoke run"
"$root/deploy/fuzz-smoke.sh" 20

# The whole suite again under ASan+UBSan+LSan, then under ThreadSanitizer
# (with an instrumented libcaf_core), each in a build folder of its own; any
# report fails the run.
step "sanitizers"
"$root/deploy/run-sanitizers.sh" all

# Static checks last, so a formatting slip does not hide a test result:
# includes point one way (DESIGN.md, Layout), then clang-format.
# Both run, so one report shows every finding.
step "static checks"
static=0
"$root/deploy/check-layers.sh" || static=1
"$root/deploy/check-format.sh" || static=1
HSM_DRIVER_BIN=$BUILD_DIR/hsm-driver "$root/deploy/check-deploy.sh" || static=1
step "done"
exit "$static"
