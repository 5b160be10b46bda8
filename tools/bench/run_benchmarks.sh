#!/usr/bin/env bash
# Builds bench/layer_bench with -march=native, runs it with repetitions, runs the PyTorch
# comparison, and writes everything with a machine description to one folder. The folder also
# gets benchmarks.svg, the medians drawn by tools/bench/plot_benchmarks.py for
# docs/benchmarks.md; without python3 on PATH the script skips the figure.
#
# Usage: tools/bench/run_benchmarks.sh [OUTPUT_DIR] [extra layer_bench arguments...]
#   OUTPUT_DIR defaults to build/bench-results. Pass --full after it for the full sweep, or
#   --benchmark_filter=REGEX to pick benchmarks. MHC_BENCH_REPETITIONS (default 5) sets the
#   repetitions; tables should quote the medians.
set -euo pipefail

repository="$(cd "$(dirname "$0")/../.." && pwd)"
output="${1:-$repository/build/bench-results}"
shift || true
repetitions="${MHC_BENCH_REPETITIONS:-5}"
build="$repository/build/bench-native"

mkdir -p "$output"
output="$(cd "$output" && pwd)"
cmake -S "$repository" -B "$build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_FLAGS=-march=native \
  -DMHC_BUILD_TESTS=OFF -DMHC_BUILD_EXAMPLES=OFF >/dev/null
cmake --build "$build" --target layer_bench -j "$(nproc)" >"$output/build.log" 2>&1

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git -C "$repository" rev-parse --short HEAD)"
  echo "compiler: $(c++ --version | head -n 1)"
  lscpu | grep -E '^(Model name|CPU family|Model:|CPU\(s\)|Thread|Core|Socket|L1d|L2|L3)'
  grep MemTotal /proc/meminfo
  echo "load average: $(cut -d ' ' -f 1-3 /proc/loadavg)"
} | tee "$output/machine.txt"

"$build/bench/layer_bench" "$@" \
  --benchmark_repetitions="$repetitions" \
  --benchmark_report_aggregates_only=true \
  --benchmark_out="$output/layer_bench.json" --benchmark_out_format=json \
  | tee "$output/layer_bench.txt"

# The figure for docs/benchmarks.md. A failed plot leaves the measurements in place, so the run
# goes on to the PyTorch baseline.
if command -v python3 >/dev/null; then
  python3 "$repository/tools/bench/plot_benchmarks.py" "$output/layer_bench.json" "$output/benchmarks.svg" \
    || echo "plotting $output/layer_bench.json failed (error above); the measurements are kept" >&2
else
  echo "skipping $output/benchmarks.svg: python3 is not on PATH" >&2
fi

# The eager PyTorch baseline on the headline shape, one and two threads.
if /usr/bin/python3 -c 'import torch' 2>/dev/null; then
  for threads in 1 2; do
    /usr/bin/python3 "$repository/tools/bench/torch_layer.py" --streams 4 --channels 2048 --tokens 4096 \
      --threads "$threads" --repetitions "$repetitions"
  done | tee "$output/torch_layer.txt"
else
  echo "skipping the PyTorch baseline: /usr/bin/python3 cannot import torch" | tee "$output/torch_layer.txt"
fi
