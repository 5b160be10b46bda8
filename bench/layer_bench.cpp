// Benchmarks of one mHC layer on the CPU: fused kernels, reference kernels, and the layer around
// an MLP branch against a plain residual connection. "backward" is the layer's full backward:
// the merge, the aggregation and the coefficients (sigmoid, Sinkhorn-Knopp, RMS scale, phi).
//
// For n up to about 8 the layer is bandwidth-bound: per token it does O(n*C*(n*n + 2n)) flops
// on n*C values. The minimal memory traffic per token, with s the bytes of the storage type and
// S those of the coefficient type, is
//   prepare (before the branch): read n*C*s (x), write C*s (h_in) + (n*n + 2n)*S (coefficients);
//   merge (after the branch):    read (n*C + C)*s (x, h_out) + (n*n + n)*S, write n*C*s (x_next);
//   forward:                     the sum of the two;
//   merge backward:              read (2n*C + C)*s (x, h_out, dx_next) + (n*n + n)*S,
//                                write (n*C + C)*s (dx, dh_out) + (n*n + n)*S;
//   aggregation backward (+=):   read (2n*C + C)*s (x, dh_in, dx) + n*S, write n*C*s (dx) + n*S;
//   coefficient backward (+=):   read 2n*C*s (x, dx) + (n*n + 2n)*S, write n*C*s (dx), plus the
//                                n*C x (n*n + 2n) gradient of phi once per call;
//   backward:                    the sum of the three (the branch runs between the merge and the
//                                others, so they cannot share a pass); forward_backward: forward
//                                plus backward.
// The fused coefficient backward reads x a second time for the gradient of phi, which this
// minimum does not count.
// For n >= 16 the projection vec(x) phi dominates and the kernels become compute-bound, so the
// copy_fraction counter drops there by design.
//
// Counters: items_per_second is tokens/s, bytes_per_second the minimal traffic per second, and
// copy_fraction that rate divided by the bandwidth of std::memcpy moving the same number of
// bytes on the same threads, measured in this binary (copy_GBps). All rates use wall time.
//
// Arguments: n (streams), C (channels), T (tokens), threads. The default run covers n = 4,
// C = 2048, T = 4096 and a few neighbours. Pass --full for the sweep n in {1, 2, 4, 8, 16, 32},
// C in {512, 1024, 2048, 4096}, T in {1024, 4096, 8192}, threads 1 and 2; combine it with
// --benchmark_filter to pick kernels. For n >= 16, T is reduced to keep one iteration near a
// second; the T argument shows the reduced value.
//
// MlpResidual and MlpMhc time the forward pass of a branch y = relu(h W1) W2 with a 4C hidden
// layer (Eigen GEMMs, token blocks spread over the threads) wrapped in a plain residual
// x + F(x) or in an mHC layer; MlpMhc reports overhead_percent against MlpResidual measured in
// its setup.
#include "bench_support.hpp"

#include <mhc/backward.hpp>
#include <mhc/fused.hpp>
#include <mhc/layer.hpp>
#include <mhc/layer_backward.hpp>

#include <benchmark/benchmark.h>

#include <cstring>
#include <string>
#include <vector>

namespace {

using mhc::RowMatrix;
using Eigen::Index;

template <typename Storage>
using ParameterScalar = std::conditional_t<std::is_same_v<Storage, double>, double, float>;

// Inputs and outputs of one layer, allocated and filled once per benchmark.
template <typename Storage>
struct LayerData {
  using Scalar = ParameterScalar<Storage>;

  LayerData(int streams, int channels, Index tokens)
      : parameters(mhc::bench::random_parameters<Scalar>(streams, channels, 1)),
        x(mhc::bench::uniform_matrix<Storage>(tokens, Index(streams) * channels, 2)),
        branch_output(mhc::bench::uniform_matrix<Storage>(tokens, channels, 3)),
        branch_input(tokens, channels),
        x_next(tokens, Index(streams) * channels),
        grad_x(tokens, Index(streams) * channels),
        grad_branch_output(tokens, channels) {}

  double prepare_traffic() const {
    const double n = parameters.streams;
    const double c = parameters.channels;
    return static_cast<double>(x.rows()) *
           ((n * c + c) * sizeof(Storage) + (n * n + 2 * n) * sizeof(Scalar));
  }

  double merge_traffic() const {
    const double n = parameters.streams;
    const double c = parameters.channels;
    return static_cast<double>(x.rows()) *
           ((2 * n * c + c) * sizeof(Storage) + (n * n + n) * sizeof(Scalar));
  }

  double backward_traffic() const {
    const double n = parameters.streams;
    const double c = parameters.channels;
    const double merge = (3 * n * c + 2 * c) * sizeof(Storage) + 2 * (n * n + n) * sizeof(Scalar);
    const double aggregate = (3 * n * c + c) * sizeof(Storage) + 2 * n * sizeof(Scalar);
    const double coefficients = 3 * n * c * sizeof(Storage) + (n * n + 2 * n) * sizeof(Scalar);
    const double grad_phi = n * c * (n * n + 2 * n) * sizeof(Scalar);
    return static_cast<double>(x.rows()) * (merge + aggregate + coefficients) + grad_phi;
  }

  mhc::Parameters<Scalar> parameters;
  RowMatrix<Storage> x;
  RowMatrix<Storage> branch_output;
  RowMatrix<Storage> branch_input;
  RowMatrix<Storage> x_next;
  RowMatrix<Storage> grad_x;
  RowMatrix<Storage> grad_branch_output;
  mhc::Coefficients<Scalar> coefficients;
  RowMatrix<Scalar> grad_pre, grad_post, grad_res;
  mhc::Parameters<Scalar> grad_parameters;
};

struct Arguments {
  int streams;
  int channels;
  Index tokens;
  int threads;
};

Arguments read_arguments(const benchmark::State& state) {
  return {static_cast<int>(state.range(0)), static_cast<int>(state.range(1)), state.range(2),
          static_cast<int>(state.range(3))};
}

enum class Kernel { kPrepare, kMerge, kForward, kBackward, kForwardBackward };

constexpr bool runs_prepare(Kernel kind) {
  return kind == Kernel::kPrepare || kind == Kernel::kForward || kind == Kernel::kForwardBackward;
}
constexpr bool runs_merge(Kernel kind) {
  return kind == Kernel::kMerge || kind == Kernel::kForward || kind == Kernel::kForwardBackward;
}
constexpr bool runs_backward(Kernel kind) { return kind == Kernel::kBackward || kind == Kernel::kForwardBackward; }

// Minimal traffic of the kernels that `kind` runs.
template <typename Storage>
double layer_traffic(const LayerData<Storage>& data, Kernel kind) {
  return (runs_prepare(kind) ? data.prepare_traffic() : 0.0) + (runs_merge(kind) ? data.merge_traffic() : 0.0) +
         (runs_backward(kind) ? data.backward_traffic() : 0.0);
}

template <typename Storage, Kernel kind>
void fused_layer(benchmark::State& state) {
  const Arguments arguments = read_arguments(state);
  LayerData<Storage> data(arguments.streams, arguments.channels, arguments.tokens);
  mhc::fused::Workspace<Storage, typename LayerData<Storage>::Scalar> workspace(mhc::bench::pool(arguments.threads));
  mhc::fused::prepare_branch(data.parameters, data.x, data.coefficients, data.branch_input, workspace);

  const mhc::bench::Stopwatch stopwatch;
  // In the backward pass x_next is used as dL/dx_next and h_out as dL/dh_in.
  for (auto _ : state) {
    if (runs_prepare(kind)) {
      mhc::fused::prepare_branch(data.parameters, data.x, data.coefficients, data.branch_input, workspace);
    }
    if (runs_merge(kind)) {
      mhc::fused::merge_streams(data.coefficients, data.x, data.branch_output, data.x_next, workspace);
    }
    if (runs_backward(kind)) {
      mhc::fused::merge_streams_backward(data.coefficients, data.x, data.branch_output, data.x_next, data.grad_x,
                                         data.grad_branch_output, data.grad_post, data.grad_res, workspace);
      mhc::fused::prepare_branch_backward(data.parameters, data.x, data.coefficients, data.branch_output,
                                          data.grad_post, data.grad_res, data.grad_x, data.grad_parameters,
                                          workspace, mhc::Options{}, mhc::fused::GradientWrite::kAdd);
    }
    benchmark::ClobberMemory();
  }

  const double traffic = layer_traffic(data, kind);
  mhc::bench::set_traffic_counters(state, arguments.tokens, traffic, arguments.threads, stopwatch.seconds());
}

// The reference kernels of layer.hpp, single-threaded and allocating their results.
template <typename Scalar, Kernel kind>
void reference_layer(benchmark::State& state) {
  const Arguments arguments = read_arguments(state);
  LayerData<Scalar> data(arguments.streams, arguments.channels, arguments.tokens);
  data.coefficients = mhc::compute_coefficients(data.parameters, data.x);

  const mhc::bench::Stopwatch stopwatch;
  for (auto _ : state) {
    if (runs_prepare(kind)) {
      mhc::BranchInput<Scalar> prepared = mhc::prepare_branch(data.parameters, data.x);
      benchmark::DoNotOptimize(prepared.input.data());
      data.coefficients = std::move(prepared.coefficients);
    }
    if (runs_merge(kind)) {
      mhc::merge_streams(data.coefficients, data.x, data.branch_output, mhc::RowMatrixRef<Scalar>(data.x_next));
    }
    if (runs_backward(kind)) {
      const auto merge = mhc::merge_streams_backward(data.coefficients, data.x, data.branch_output, data.x_next);
      auto aggregate = mhc::aggregate_streams_backward(data.coefficients, data.x, data.branch_output);
      mhc::Coefficients<Scalar> grad_coefficients;
      grad_coefficients.pre = std::move(aggregate.pre);
      grad_coefficients.post = merge.post;
      grad_coefficients.res = merge.res;
      const auto through_coefficients = mhc::compute_coefficients_backward(data.parameters, data.x, grad_coefficients);
      data.grad_x.noalias() = merge.x + aggregate.x;
      data.grad_x += through_coefficients.x;
      benchmark::DoNotOptimize(through_coefficients.parameters.phi.data());
    }
    benchmark::ClobberMemory();
  }

  const double traffic = layer_traffic(data, kind);
  mhc::bench::set_traffic_counters(state, arguments.tokens, traffic, arguments.threads, stopwatch.seconds());
}

// ---------------------------------------------------------------------------------------------
// The layer around an MLP branch.

// y = relu(h W1) W2 (+ h when `residual`) for T x C input h, token blocks of 64 rows spread over
// the pool; `hidden` is T x 4C scratch.
struct Mlp {
  Mlp(int channels, Index tokens)
      : w1(mhc::bench::uniform_matrix<float>(channels, 4 * channels, 4) / std::sqrt(float(channels))),
        w2(mhc::bench::uniform_matrix<float>(4 * channels, channels, 5) / std::sqrt(float(4 * channels))),
        hidden(tokens, 4 * channels) {}

  void run(const RowMatrix<float>& input, RowMatrix<float>& output, bool residual, mhc::ThreadPool* pool) {
    constexpr Index kBlock = 64;
    const Index tokens = input.rows();
    pool->run((tokens + kBlock - 1) / kBlock, [&](Index block, int) {
      const Index first = block * kBlock;
      const Index rows = std::min(kBlock, tokens - first);
      auto hidden_rows = hidden.middleRows(first, rows);
      hidden_rows.noalias() = input.middleRows(first, rows) * w1;
      hidden_rows = hidden_rows.cwiseMax(0.0f);
      auto output_rows = output.middleRows(first, rows);
      output_rows.noalias() = hidden_rows * w2;
      if (residual) output_rows += input.middleRows(first, rows);
    });
  }

  RowMatrix<float> w1, w2, hidden;
};

// Plain residual x + F(x) on a T x C state.
void mlp_residual(benchmark::State& state) {
  const int channels = static_cast<int>(state.range(0));
  const Index tokens = state.range(1);
  const int threads = static_cast<int>(state.range(2));
  Mlp mlp(channels, tokens);
  const RowMatrix<float> x = mhc::bench::uniform_matrix<float>(tokens, channels, 6);
  RowMatrix<float> y(tokens, channels);
  for (auto _ : state) {
    mlp.run(x, y, true, mhc::bench::pool(threads));
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations() * tokens);
}

// mHC with n = 4 streams around the same branch: fused prepare, F(h_in), fused merge.
void mlp_mhc(benchmark::State& state) {
  const int channels = static_cast<int>(state.range(0));
  const Index tokens = state.range(1);
  const int threads = static_cast<int>(state.range(2));
  const int streams = static_cast<int>(state.range(3));
  mhc::ThreadPool* pool = mhc::bench::pool(threads);
  Mlp mlp(channels, tokens);
  LayerData<float> data(streams, channels, tokens);
  mhc::fused::Workspace<float, float> workspace(pool);

  const auto step = [&] {
    mhc::fused::prepare_branch(data.parameters, data.x, data.coefficients, data.branch_input, workspace);
    mlp.run(data.branch_input, data.branch_output, false, pool);
    mhc::fused::merge_streams(data.coefficients, data.x, data.branch_output, data.x_next, workspace);
    benchmark::ClobberMemory();
  };

  // The plain residual around the same branch, on a T x C state, as the baseline.
  const RowMatrix<float> plain_x = mhc::bench::uniform_matrix<float>(tokens, channels, 6);
  RowMatrix<float> plain_y(tokens, channels);
  const auto plain = [&] {
    mlp.run(plain_x, plain_y, true, pool);
    benchmark::ClobberMemory();
  };
  plain();
  const double plain_seconds = mhc::bench::median_seconds(5, plain);

  const mhc::bench::Stopwatch stopwatch;
  for (auto _ : state) step();
  const double seconds = stopwatch.seconds();

  state.SetItemsProcessed(state.iterations() * tokens);
  const double per_iteration = seconds / static_cast<double>(state.iterations());
  state.counters["overhead_percent"] = 100.0 * (per_iteration / plain_seconds - 1.0);
}

// ---------------------------------------------------------------------------------------------
// Registration.

// Tokens for a shape: the requested T, reduced for n >= 16 so that the projection, about
// T * n*C * (n*n + 2n) multiply-adds, stays near 2^32 per iteration (at least 64 tokens).
Index sweep_tokens(int streams, int channels, Index tokens) {
  if (streams < 16) return tokens;
  const double work_per_token = double(streams) * channels * (double(streams) * streams + 2.0 * streams);
  const Index limit = std::max<Index>(64, static_cast<Index>(4294967296.0 / work_per_token) / 16 * 16);
  return std::min(tokens, limit);
}

template <typename Function>
void register_layer(const std::string& name, Function function, const std::vector<Arguments>& shapes) {
  benchmark::internal::Benchmark* benchmark = benchmark::RegisterBenchmark(name.c_str(), function);
  benchmark->ArgNames({"n", "C", "T", "threads"})->UseRealTime()->Unit(benchmark::kMillisecond);
  for (const Arguments& shape : shapes) {
    benchmark->Args({shape.streams, shape.channels, shape.tokens, shape.threads});
  }
}

std::vector<Arguments> layer_shapes(bool full, bool multithreaded) {
  std::vector<Arguments> shapes;
  const std::vector<int> thread_counts = multithreaded ? std::vector<int>{1, 2} : std::vector<int>{1};
  if (!full) {
    for (int threads : thread_counts) {
      shapes.push_back({4, 2048, 4096, threads});
      shapes.push_back({1, 2048, 4096, threads});
      shapes.push_back({8, 1024, 4096, threads});
    }
    return shapes;
  }
  for (int threads : thread_counts) {
    for (int n : {1, 2, 4, 8, 16, 32}) {
      for (int c : {512, 1024, 2048, 4096}) {
        for (Index t : {1024, 4096, 8192}) {
          const Index tokens = sweep_tokens(n, c, t);
          if (tokens != t && t != 1024) continue;  // one reduced T per shape
          shapes.push_back({n, c, tokens, threads});
        }
      }
    }
  }
  return shapes;
}

void register_all(bool full) {
  const auto fused = layer_shapes(full, true);
  const auto reference = layer_shapes(full, false);

  register_layer("fused_prepare/float", fused_layer<float, Kernel::kPrepare>, fused);
  register_layer("fused_merge/float", fused_layer<float, Kernel::kMerge>, fused);
  register_layer("fused_forward/float", fused_layer<float, Kernel::kForward>, fused);
  register_layer("fused_forward/bfloat16", fused_layer<Eigen::bfloat16, Kernel::kForward>, fused);
  register_layer("fused_forward/double", fused_layer<double, Kernel::kForward>, fused);
  register_layer("reference_prepare/float", reference_layer<float, Kernel::kPrepare>, reference);
  register_layer("reference_merge/float", reference_layer<float, Kernel::kMerge>, reference);
  register_layer("reference_forward/float", reference_layer<float, Kernel::kForward>, reference);
  register_layer("fused_backward/float", fused_layer<float, Kernel::kBackward>, fused);
  register_layer("fused_forward_backward/float", fused_layer<float, Kernel::kForwardBackward>, fused);
  register_layer("fused_forward_backward/bfloat16", fused_layer<Eigen::bfloat16, Kernel::kForwardBackward>, fused);
  register_layer("reference_backward/float", reference_layer<float, Kernel::kBackward>, reference);
  register_layer("reference_forward_backward/float", reference_layer<float, Kernel::kForwardBackward>, reference);
  if (full) {
    register_layer("fused_prepare/bfloat16", fused_layer<Eigen::bfloat16, Kernel::kPrepare>, fused);
    register_layer("fused_merge/bfloat16", fused_layer<Eigen::bfloat16, Kernel::kMerge>, fused);
    register_layer("reference_forward/double", reference_layer<double, Kernel::kForward>, reference);
  }

  // MLP branch: C, T, threads (and n for mHC). One iteration at C = 2048, T = 4096 is about
  // 0.3 Tflop, so the default run uses T = 256.
  const std::vector<Index> mlp_tokens = full ? std::vector<Index>{1024, 4096} : std::vector<Index>{256};
  auto* residual = benchmark::RegisterBenchmark("mlp_residual/float", mlp_residual);
  auto* with_mhc = benchmark::RegisterBenchmark("mlp_mhc/float", mlp_mhc);
  residual->ArgNames({"C", "T", "threads"})->UseRealTime()->Unit(benchmark::kMillisecond);
  with_mhc->ArgNames({"C", "T", "threads", "n"})->UseRealTime()->Unit(benchmark::kMillisecond);
  for (int threads : {1, 2}) {
    for (Index tokens : mlp_tokens) {
      residual->Args({2048, tokens, threads});
      with_mhc->Args({2048, tokens, threads, 4});
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  bool full = false;
  int kept_arguments = 1;
  for (int k = 1; k < argc; ++k) {
    if (std::strcmp(argv[k], "--full") == 0) {
      full = true;
    } else {
      argv[kept_arguments++] = argv[k];
    }
  }
  argc = kept_arguments;

  register_all(full);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
