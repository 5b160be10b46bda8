// Shared pieces of the benchmark programs: thread pools, input data, the memory-copy baseline and
// the traffic counters.
#pragma once

#include <mhc/fused.hpp>
#include <mhc/layer.hpp>
#include <mhc/thread_pool.hpp>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <utility>
#include <vector>

namespace mhc::bench {

// One pool per thread count, created on first use and shared by every benchmark.
inline ThreadPool* pool(int threads) {
  static std::map<int, std::unique_ptr<ThreadPool>> pools;
  std::unique_ptr<ThreadPool>& entry = pools[threads];
  if (!entry) entry = std::make_unique<ThreadPool>(threads);
  return entry.get();
}

// Fills `values` with uniform numbers in [-1, 1) from a xorshift generator: drawing from
// std::normal_distribution would take seconds for the larger states.
template <typename Storage>
void fill_uniform(Storage* values, Eigen::Index count, std::uint64_t seed) {
  std::uint64_t state = seed * 0x9E3779B97F4A7C15ull + 1;
  for (Eigen::Index k = 0; k < count; ++k) {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    const double unit = static_cast<double>(state >> 11) * (1.0 / 9007199254740992.0);
    values[k] = static_cast<Storage>(2.0 * unit - 1.0);
  }
}

template <typename Storage>
RowMatrix<Storage> uniform_matrix(Eigen::Index rows, Eigen::Index cols, std::uint64_t seed) {
  RowMatrix<Storage> matrix(rows, cols);
  fill_uniform(matrix.data(), matrix.size(), seed);
  return matrix;
}

// Layer parameters with small random phi, so the coefficients vary per token as in training.
template <typename Scalar>
Parameters<Scalar> random_parameters(int streams, int channels, std::uint64_t seed) {
  Parameters<Scalar> parameters = Parameters<Scalar>::identity(streams, channels, 0);
  fill_uniform(parameters.phi.data(), parameters.phi.size(), seed);
  parameters.phi *= Scalar(1.0 / std::sqrt(double(streams) * channels));
  return parameters;
}

// Median of `samples` wall-clock times of `work`, in seconds.
template <typename Work>
double median_seconds(int samples, Work&& work) {
  std::vector<double> times;
  for (int sample = 0; sample < samples; ++sample) {
    const auto start = std::chrono::steady_clock::now();
    work();
    times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  std::nth_element(times.begin(), times.begin() + samples / 2, times.end());
  return times[static_cast<std::size_t>(samples / 2)];
}

// Bytes per second of std::memcpy moving `traffic_bytes` / 2 bytes (so `traffic_bytes` of reads
// plus writes) on `threads` threads, in 1 MiB pieces: the median of 5 runs after a warm-up run.
// The copy is timed again at every call, right after the kernel it is compared with, because
// the memory bandwidth of a shared machine drifts between benchmarks. The buffers of the last
// size are kept, and the untimed warm-up run takes their page faults.
inline double copy_bandwidth(double traffic_bytes, int threads) {
  struct Buffers {
    std::vector<unsigned char> source, target;
  };
  static Buffers pair;
  const std::int64_t bytes = std::max<std::int64_t>(1, static_cast<std::int64_t>(traffic_bytes / 2));
  if (pair.source.size() != static_cast<std::size_t>(bytes)) {
    pair.source.assign(static_cast<std::size_t>(bytes), 1);
    pair.target.assign(static_cast<std::size_t>(bytes), 0);
  }

  constexpr std::int64_t kPiece = std::int64_t(1) << 20;
  const std::int64_t pieces = (bytes + kPiece - 1) / kPiece;
  const auto copy = [&] {
    pool(threads)->run(pieces, [&](Eigen::Index piece, int) {
      const std::int64_t begin = piece * kPiece;
      const std::int64_t size = std::min(kPiece, bytes - begin);
      std::memcpy(pair.target.data() + begin, pair.source.data() + begin, static_cast<std::size_t>(size));
    });
    benchmark::ClobberMemory();
  };
  copy();
  return 2.0 * static_cast<double>(bytes) / median_seconds(5, copy);
}

// Sets tokens/s and bytes/s of the minimal traffic (over wall time), and copy_fraction, that
// bytes/s divided by the memory-copy bandwidth for the same traffic and thread count.
// `seconds` is the wall time of all iterations, measured by the caller.
inline void set_traffic_counters(benchmark::State& state, Eigen::Index tokens, double traffic_bytes, int threads,
                                 double seconds) {
  const auto iterations = static_cast<double>(state.iterations());
  state.SetItemsProcessed(static_cast<std::int64_t>(tokens) * state.iterations());
  state.SetBytesProcessed(static_cast<std::int64_t>(traffic_bytes * iterations));
  const double copy = copy_bandwidth(traffic_bytes, threads);
  state.counters["copy_GBps"] = copy / 1e9;
  state.counters["copy_fraction"] = seconds > 0 ? traffic_bytes * iterations / seconds / copy : 0.0;
}

// Wall-clock stopwatch started at construction.
class Stopwatch {
 public:
  double seconds() const { return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count(); }

 private:
  std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
};

}  // namespace mhc::bench
