#!/usr/bin/env bash
# The whole test suite under the sanitizers, as CI runs it:
#   address  AddressSanitizer + UndefinedBehaviorSanitizer + LeakSanitizer
#   thread   ThreadSanitizer
#   all      both, one after the other (the default)
# Each mode has a build folder of its own (ASAN_BUILD_DIR, default
# build-asan; TSAN_BUILD_DIR, default build-tsan; not BUILD_DIR, which
# run-tests.sh exports for the main build), built -O1 -g1 with assertions
# on: under UBSan that compiles in half the time of -O2, and line tables
# are all a report needs. Warnings are not errors here: GCC's flow analysis
# under instrumentation gives false -Wmaybe-uninitialized; the warning gate
# is run-tests.sh.
#
# ThreadSanitizer sees only the synchronisation of code it instrumented, and
# every message between actors goes through CAF's mailboxes, so `thread`
# first builds libcaf_core from the Debian source of the installed libcaf-dev
# (same version; its headers are the ones in /usr/include/caf) with
# -fsanitize=thread, once per build folder, and links it statically.
#
# Starts a private PostgreSQL cluster like run-tests.sh, then runs ctest.
# Every process (the test binaries and the hsm-driver processes they start)
# writes its ASan, LSan and TSan reports to files under
# <build>/sanitizer-reports, so a report fails the run even where no test
# looks at that process's exit status. GCC's UBSan runtime ignores log_path
# next to ASan's and writes to stderr: the first report ends the process
# (halt_on_error), a test fails on a report in the output of a driver it
# started (tests/support/process.cpp), and this script on one anywhere in
# the tests' output. The run fails on any failed test or any report, and
# prints the reports. Suppressions name third-party code only, each with
# its reason: tests/ubsan.supp, tests/lsan.supp, tests/tsan.supp.
# Assumes the packages of deploy/install-deps.sh are installed.
#   deploy/run-sanitizers.sh [address|thread|all] [extra ctest arguments]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
mode=${1:-all}
shift || true
jobs=${JOBS:-$(nproc)}
case $mode in
  address|thread) modes=("$mode") ;;
  all) modes=(address thread) ;;
  *)
    echo "usage: $0 [address|thread|all] [extra ctest arguments]" >&2
    exit 2
    ;;
esac
asan_build=${ASAN_BUILD_DIR:-$root/build-asan}
tsan_build=${TSAN_BUILD_DIR:-$root/build-tsan}
# -O1 -g1 for the project, the same for the instrumented CAF.
opt_flags="-O1 -g1"

# Builds libcaf_core with -fsanitize=thread into $1/caf-tsan/libcaf_core.a
# from the source package of the installed libcaf-dev, fetched with apt-get
# through a private list (no change to the machine's apt sources; apt checks
# the tarball against the signed Sources index). Kept across runs: rebuilt
# only when the version or the compiler changes.
build_caf_tsan() {
  local dir=$1/caf-tsan
  local pkg ver stamp
  pkg=$(dpkg-query -W -f='${source:Package}' libcaf-dev)
  ver=$(dpkg-query -W -f='${source:Version}' libcaf-dev)
  stamp="$pkg $ver $(c++ --version | head -n 1) $opt_flags -fsanitize=thread"
  if [ -f "$dir/libcaf_core.a" ] && [ "$(cat "$dir/stamp" 2>/dev/null)" = "$stamp" ]; then
    return 0
  fi
  echo "== [$((SECONDS / 60))m] building $pkg $ver libcaf_core with -fsanitize=thread"
  rm -rf "$dir"
  mkdir -p "$dir/apt/lists/partial" "$dir/apt/cache/archives/partial" "$dir/obj"
  local codename mirror
  codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
  mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
  echo "deb-src $mirror $codename main" >"$dir/apt/sources.list"
  local apt=(apt-get -q -o "Dir::Etc::SourceList=$dir/apt/sources.list"
             -o Dir::Etc::SourceParts=/dev/null
             -o "Dir::State::Lists=$dir/apt/lists"
             -o "Dir::Cache=$dir/apt/cache" -o APT::Sandbox::User=root)
  "${apt[@]}" update >/dev/null
  (cd "$dir" && "${apt[@]}" source --download-only --tar-only "$pkg=$ver" >/dev/null)
  tar -xzf "$dir"/"${pkg}"_*.orig.tar.gz -C "$dir"
  local core
  core=$(ls -d "$dir"/"${pkg}"-*/libcaf_core)
  # The sources CAF's own CMakeLists.txt lists; compiled against the
  # installed headers (identical to the tarball's, plus Debian's
  # build_config.hpp), warnings off: third-party code.
  sed -n '/set(LIBCAF_CORE_SRCS/,/)/s/^ *\(src\/[^ ]*\.cpp\)$/\1/p' \
    "$core/CMakeLists.txt" >"$dir/sources"
  (cd "$core" && xargs -P "$jobs" -I{} sh -c \
    'c++ -std=c++17 '"$opt_flags"' -fPIC -fsanitize=thread -fno-omit-frame-pointer -w -c "$1" -o "$2/obj/$(echo "$1" | tr / _).o"' \
    _ {} "$dir" <"$dir/sources")
  ar rcs "$dir/libcaf_core.a" "$dir"/obj/*.o
  rm -rf "$dir/obj" "$dir/apt" "$dir"/"${pkg}"-*/ "$dir"/*.orig.tar.*
  echo "$stamp" >"$dir/stamp"
}

build() {
  local build=$1 sanitizers=$2
  shift 2
  cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Debug \
    "-DCMAKE_CXX_FLAGS_DEBUG=$opt_flags" -DHSM_DRIVER_SANITIZERS="$sanitizers" \
    -DHSM_DRIVER_BUILD_TESTS=ON "$@" >/dev/null
  cmake --build "$build" -j "$jobs"
}

# Runs ctest in $1 with the sanitizer options already exported; fails on a
# failed test, on any report file, and on a UBSan report anywhere in the
# tests' output (Testing/Temporary/LastTest.log holds every test's).
run_suite() {
  local build=$1 reports=$1/sanitizer-reports
  shift
  local status=0
  (cd "$build" && ctest --output-on-failure --no-tests=error -j "$jobs" "$@") || status=1
  local log=$build/Testing/Temporary/LastTest.log
  if grep -q ": runtime error: " "$log" 2>/dev/null; then
    echo "== [$((SECONDS / 60))m] UndefinedBehaviorSanitizer reports in the tests' output ($log):"
    grep -A12 ": runtime error: " "$log" | head -n 400
    status=1
  fi
  local files
  files=$(find "$reports" -type f 2>/dev/null | sort)
  if [ -n "$files" ]; then
    echo "== [$((SECONDS / 60))m] sanitizer reports in $reports:"
    for f in $files; do
      echo "---- $f"
      head -n 200 "$f"
    done
    status=1
  fi
  return "$status"
}

work=$(mktemp -d)
chmod 755 "$work"
cleanup() {
  "$root/deploy/pg-test-cluster.sh" stop "$work/pg" || true
  rm -rf "$work"
}
trap cleanup EXIT

# Build first, then one PostgreSQL cluster for every suite.
for m in "${modes[@]}"; do
  case $m in
    address)
      echo "== [$((SECONDS / 60))m] build (address,undefined) in $asan_build"
      build "$asan_build" address,undefined
      ;;
    thread)
      build_caf_tsan "$tsan_build"
      echo "== [$((SECONDS / 60))m] build (thread) in $tsan_build"
      build "$tsan_build" thread -DCAF_CORE_LIBRARY="$tsan_build/caf-tsan/libcaf_core.a"
      ;;
  esac
done

HSM_TEST_POSTGRES_URL=$("$root/deploy/pg-test-cluster.sh" start "$work/pg")
export HSM_TEST_POSTGRES_URL HSM_TEST_PG_DIR=$work/pg

status=0
for m in "${modes[@]}"; do
  case $m in
    address)
      reports=$asan_build/sanitizer-reports
      rm -rf "$reports" && mkdir -p "$reports"
      log="log_path=$reports/asan:log_exe_name=1"
      # UBSan: every check recoverable, so that tests/ubsan.supp can apply,
      # but the first unsuppressed report ends the process.
      export ASAN_OPTIONS="$log:detect_leaks=1:detect_stack_use_after_return=1:check_initialization_order=1:print_suppressions=0"
      export UBSAN_OPTIONS="$log:print_stacktrace=1:halt_on_error=1:report_error_type=1:suppressions=$root/tests/ubsan.supp"
      # The test binaries that load SoftHSMv2 set LSAN_OPTIONS themselves
      # (tests/CMakeLists.txt: the same file, and the slow unwinder that
      # its entries need); log_path and print_suppressions come from
      # ASAN_OPTIONS there.
      export LSAN_OPTIONS="$log:suppressions=$root/tests/lsan.supp:print_suppressions=0"
      echo "== [$((SECONDS / 60))m] tests under ASan+UBSan+LSan ($asan_build)"
      run_suite "$asan_build" "$@" || status=1
      unset ASAN_OPTIONS UBSAN_OPTIONS LSAN_OPTIONS
      ;;
    thread)
      reports=$tsan_build/sanitizer-reports
      rm -rf "$reports" && mkdir -p "$reports"
      export TSAN_OPTIONS="log_path=$reports/tsan:log_exe_name=1:second_deadlock_stack=1:halt_on_error=0:print_suppressions=0:suppressions=$root/tests/tsan.supp"
      echo "== [$((SECONDS / 60))m] tests under TSan ($tsan_build)"
      run_suite "$tsan_build" "$@" || status=1
      unset TSAN_OPTIONS
      ;;
  esac
done
exit "$status"
