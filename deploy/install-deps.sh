#!/usr/bin/env bash
# Installs every Debian package that building, testing and running hsm-driver
# needs. Idempotent: safe to run again; apt-get skips what is already there.
set -euo pipefail

packages=(
  # toolchain
  build-essential cmake pkg-config
  # actor framework (0.17 API)
  libcaf-dev
  # crypto: host-side verification, TLS, PKI tooling
  libssl-dev openssl libsecp256k1-dev libsodium-dev
  # POSIX ACLs of secret files (systemd credentials)
  libacl1-dev
  # PKCS#11 header and the software token used by dev mode and tests
  libp11-kit-dev softhsm2
  # key stores
  libsqlite3-dev sqlite3 libpqxx-dev postgresql
  # JSON, logging, command line
  nlohmann-json3-dev libspdlog-dev libfmt-dev libcli11-dev
  # HTTP: client (driver) and server (reference proxy)
  libcurl4-openssl-dev libcpp-httplib-dev curl
  # metrics: prometheus-cpp's core library (registry, metric types, text format)
  prometheus-cpp-dev
  # tests and benchmarks
  libgtest-dev libgmock-dev libbenchmark-dev
  # `hsm-driver bench --plot`: renders the session sweep as a PNG
  gnuplot-nox
  # process helpers used by the test scripts
  procps jq
  # deploy/check-format.sh (run by deploy/run-tests.sh); Debian 12: version 14
  clang-format
  # deploy/fuzz-smoke.sh: clang with libFuzzer and its sanitizer runtimes
  clang libclang-rt-14-dev
  # deploy/check-deploy.sh: systemd-analyze (systemd), compose.yaml parsing,
  # shell lint
  systemd python3-yaml shellcheck
)

sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then
  sudo_cmd=(sudo)
fi

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ "${#missing[@]}" -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} packages present"
  exit 0
fi

echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo_cmd[@]}" apt-get update -q
"${sudo_cmd[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
