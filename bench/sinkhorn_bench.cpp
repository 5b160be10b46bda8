// Sinkhorn-Knopp projection of T small n x n matrices (one per row), forward and backward.
//
// The kernel is compute-bound for these n: each matrix is read once and written once
// (2 n^2 scalars), while 20 rounds cost about 4 n^2 flops each, plus n^2 exp calls, on data
// that stays in L1. Within one matrix the rounds form a serial chain of sums, divisions and
// scalings, so for small n the time per matrix follows that latency more than the flop count.
// The "matrices/s" counter is the figure to compare. bytes/s counts the logits read and the
// result written, for comparison with the memory-copy baseline.
// TODO: interleave several tokens across SIMD lanes to hide that latency.
#include <mhc/sinkhorn.hpp>

#include <benchmark/benchmark.h>

#include <cstdint>
#include <random>

namespace {

constexpr Eigen::Index kTokens = 1024;

template <typename Scalar>
mhc::RowMatrix<Scalar> random_logits(Eigen::Index rows, Eigen::Index cols, double scale) {
  std::mt19937 generator(42);
  std::normal_distribution<double> normal(0.0, scale);
  mhc::RowMatrix<Scalar> logits(rows, cols);
  for (Eigen::Index i = 0; i < logits.size(); ++i) {
    logits.data()[i] = static_cast<Scalar>(normal(generator));
  }
  return logits;
}

// Sets the matrices/s and bytes/s counters for `matrices` n x n matrices per iteration, each
// read `reads` times and written once.
template <typename Scalar>
void set_counters(benchmark::State& state, Eigen::Index matrices, Eigen::Index n, int reads) {
  const auto processed = static_cast<double>(matrices) * static_cast<double>(state.iterations());
  state.counters["matrices/s"] = benchmark::Counter(processed, benchmark::Counter::kIsRate);
  state.SetBytesProcessed(static_cast<std::int64_t>(
      processed * static_cast<double>((reads + 1) * n * n * static_cast<Eigen::Index>(sizeof(Scalar)))));
}

// Baseline: copying the same bytes that the batched projection reads and writes.
template <typename Scalar>
void BM_Copy(benchmark::State& state) {
  const Eigen::Index n = state.range(0);
  const mhc::RowMatrix<Scalar> source = random_logits<Scalar>(kTokens, n * n, 1.0);
  mhc::RowMatrix<Scalar> target(kTokens, n * n);
  for (auto _ : state) {
    target = source;
    benchmark::DoNotOptimize(target.data());
    benchmark::ClobberMemory();
  }
  set_counters<Scalar>(state, kTokens, n, 1);
}

template <typename Scalar>
void BM_Batched(benchmark::State& state) {
  const Eigen::Index n = state.range(0);
  mhc::SinkhornOptions options;
  options.method = state.range(1) == 0 ? mhc::SinkhornMethod::linear : mhc::SinkhornMethod::log_domain;
  const mhc::RowMatrix<Scalar> logits = random_logits<Scalar>(kTokens, n * n, 1.0);
  mhc::RowMatrix<Scalar> output(kTokens, n * n);
  for (auto _ : state) {
    mhc::sinkhorn_knopp_batched(logits, output, options);
    benchmark::DoNotOptimize(output.data());
    benchmark::ClobberMemory();
  }
  set_counters<Scalar>(state, kTokens, n, 1);
}

// One sinkhorn_knopp call per token on a fixed-size 4 x 4 matrix (no heap allocation).
template <typename Scalar>
void BM_FixedSize4(benchmark::State& state) {
  using Fixed = Eigen::Matrix<Scalar, 4, 4, Eigen::RowMajor>;
  const mhc::RowMatrix<Scalar> logits = random_logits<Scalar>(kTokens, 16, 1.0);
  mhc::RowMatrix<Scalar> output(kTokens, 16);
  for (auto _ : state) {
    for (Eigen::Index t = 0; t < kTokens; ++t) {
      const Fixed token_logits = Eigen::Map<const Fixed>(logits.row(t).data());
      Eigen::Map<Fixed>(output.row(t).data()) = mhc::sinkhorn_knopp(token_logits);
    }
    benchmark::DoNotOptimize(output.data());
    benchmark::ClobberMemory();
  }
  set_counters<Scalar>(state, kTokens, 4, 1);
}

// One sinkhorn_knopp call per token on a dynamic 4 x 4 matrix (one allocation per call).
template <typename Scalar>
void BM_Dynamic4(benchmark::State& state) {
  using Map = Eigen::Map<const mhc::RowMatrix<Scalar>>;
  const mhc::RowMatrix<Scalar> logits = random_logits<Scalar>(kTokens, 16, 1.0);
  mhc::RowMatrix<Scalar> output(kTokens, 16);
  for (auto _ : state) {
    for (Eigen::Index t = 0; t < kTokens; ++t) {
      const mhc::RowMatrix<Scalar> projected = mhc::sinkhorn_knopp(Map(logits.row(t).data(), 4, 4));
      output.row(t) = Eigen::Map<const mhc::RowVector<Scalar>>(projected.data(), 16);
    }
    benchmark::DoNotOptimize(output.data());
    benchmark::ClobberMemory();
  }
  set_counters<Scalar>(state, kTokens, 4, 1);
}

// Batched backward: reruns the forward rounds, then walks them in reverse. Reads the logits and
// the upstream gradient, writes the gradient.
template <typename Scalar>
void BM_BatchedBackward(benchmark::State& state) {
  const Eigen::Index n = state.range(0);
  mhc::SinkhornOptions options;
  options.gradient =
      state.range(1) == 0 ? mhc::SinkhornGradient::unrolled : mhc::SinkhornGradient::implicit;
  const mhc::RowMatrix<Scalar> logits = random_logits<Scalar>(kTokens, n * n, 1.0);
  const mhc::RowMatrix<Scalar> upstream = random_logits<Scalar>(kTokens, n * n, 1.0);
  mhc::RowMatrix<Scalar> gradient(kTokens, n * n);
  for (auto _ : state) {
    mhc::sinkhorn_knopp_batched_backward(logits, upstream, gradient, options);
    benchmark::DoNotOptimize(gradient.data());
    benchmark::ClobberMemory();
  }
  set_counters<Scalar>(state, kTokens, n, 2);
}

void matrix_sizes(benchmark::internal::Benchmark* benchmark) {
  benchmark->ArgNames({"n"});
  for (int n : {2, 4, 8, 16}) benchmark->Args({n});
}

// n, then 0 for the linear method and 1 for the log-domain one (or unrolled / implicit).
void matrix_sizes_and_variant(benchmark::internal::Benchmark* benchmark, const char* variant) {
  benchmark->ArgNames({"n", variant});
  for (int n : {2, 4, 8, 16}) {
    benchmark->Args({n, 0});
    benchmark->Args({n, 1});
  }
}

void sizes_and_method(benchmark::internal::Benchmark* benchmark) {
  matrix_sizes_and_variant(benchmark, "log_domain");
}

void sizes_and_gradient(benchmark::internal::Benchmark* benchmark) {
  matrix_sizes_and_variant(benchmark, "implicit");
}

BENCHMARK_TEMPLATE(BM_Copy, float)->Apply(matrix_sizes);
BENCHMARK_TEMPLATE(BM_Copy, double)->Apply(matrix_sizes);
BENCHMARK_TEMPLATE(BM_Batched, float)->Apply(sizes_and_method);
BENCHMARK_TEMPLATE(BM_Batched, double)->Apply(sizes_and_method);
BENCHMARK_TEMPLATE(BM_FixedSize4, float);
BENCHMARK_TEMPLATE(BM_FixedSize4, double);
BENCHMARK_TEMPLATE(BM_Dynamic4, float);
BENCHMARK_TEMPLATE(BM_Dynamic4, double);
BENCHMARK_TEMPLATE(BM_BatchedBackward, float)->Apply(sizes_and_gradient);
BENCHMARK_TEMPLATE(BM_BatchedBackward, double)->Apply(sizes_and_gradient);

}  // namespace

BENCHMARK_MAIN();
