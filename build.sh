#!/usr/bin/env bash
# Builds and runs mhc on a Debian or Ubuntu machine, installing missing packages when run as root.
#
#   ./build.sh example [ARGS...]   build and run the main example
#   ./build.sh test                build and run the whole test suite (CTest)
#   ./build.sh sanitize            build and run the tests under Clang with ASan and UBSan
#   ./build.sh bench [ARGS...]     build the benchmarks and run them (ARGS go to Google Benchmark)
#
# Build folders: build/release (example, test, bench) and build/sanitize. Set JOBS to change
# the build parallelism (default: the number of processors). With CI=true, compiler warnings
# fail the build.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
jobs=${JOBS:-$(nproc 2>/dev/null || echo 2)}
main_example=sinkhorn_projection

usage() {
  sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

# Installs the named Debian packages that are missing, or exits naming them when not root.
require_packages() {
  if ! command -v dpkg-query >/dev/null 2>&1; then
    echo "build.sh: dpkg-query not found, so required packages cannot be checked: $*" >&2
    echo "build.sh: continuing; CMake reports anything that is missing" >&2
    return 0
  fi
  local missing=()
  local package
  for package in "$@"; do
    if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed'; then
      missing+=("$package")
    fi
  done
  [ ${#missing[@]} -eq 0 ] && return 0

  if [ "$(id -u)" -eq 0 ]; then
    echo "build.sh: installing missing packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
  else
    echo "build.sh: missing packages: ${missing[*]}" >&2
    echo "build.sh: install them with: sudo apt-get install ${missing[*]}" >&2
    exit 1
  fi
}

base_packages=(cmake make g++ libeigen3-dev libgtest-dev libbenchmark-dev)

configure() {
  local build_dir=$1
  shift
  local werror=OFF
  [ "${CI:-}" = "true" ] && werror=ON
  cmake -S "$here" -B "$build_dir" -DMHC_WARNINGS_AS_ERRORS="$werror" "$@"
}

command=${1:-}
[ $# -gt 0 ] && shift
case "$command" in
  example)
    require_packages "${base_packages[@]}"
    configure "$here/build/release" -DCMAKE_BUILD_TYPE=Release
    cmake --build "$here/build/release" --parallel "$jobs" --target "$main_example"
    "$here/build/release/examples/$main_example" "$@"
    ;;
  test)
    require_packages "${base_packages[@]}"
    configure "$here/build/release" -DCMAKE_BUILD_TYPE=Release
    cmake --build "$here/build/release" --parallel "$jobs"
    ctest --test-dir "$here/build/release" --output-on-failure --parallel "$jobs"
    ;;
  sanitize)
    require_packages "${base_packages[@]}" clang
    configure "$here/build/sanitize" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
      -DCMAKE_CXX_COMPILER=clang++ -DMHC_SANITIZE=ON \
      -DMHC_BUILD_BENCHMARKS=OFF -DMHC_BUILD_EXAMPLES=OFF
    cmake --build "$here/build/sanitize" --parallel "$jobs"
    ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
      ctest --test-dir "$here/build/sanitize" --output-on-failure --parallel "$jobs"
    ;;
  bench)
    require_packages "${base_packages[@]}"
    configure "$here/build/release" -DCMAKE_BUILD_TYPE=Release
    cmake --build "$here/build/release" --parallel "$jobs"
    for program in "$here"/build/release/bench/*_bench; do
      echo "== $(basename "$program")"
      "$program" "$@"
    done
    ;;
  -h|--help|help)
    usage
    ;;
  *)
    usage >&2
    exit 2
    ;;
esac
