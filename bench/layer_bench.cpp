// Benchmarks of one mHC layer on the CPU: fused kernels, reference kernels, and the layer around
// an MLP branch against a plain residual connection. "backward" is the layer's full backward:
// the merge, the aggregation and the coefficients (sigmoid, Sinkhorn-Knopp, RMS scale, phi).
//
// For n up to about 8 the layer is bandwidth-bound: per token it does O(n*C*(n*n + 2n)) flops
// on n*C values. The minimal memory traffic per token, with s the bytes of the storage type and
// S those of the coefficient type, is
//   prepare (before the branch): read n*C*s (x), write C*s (h_in) + (n*n + 2n)*S (coefficients);
//   merge (after the branch):    read (n*C + C)*s (x, h_out) + (n*n + n)*S (H_post, H_res),
//                                write n*C*s (x_next);
//   forward:                     the sum of the two;
//   merge backward:              read (2n*C + C)*s (x, h_out, dx_next) + (n*n + n)*S (H_post,
//                                H_res), write (n*C + C)*s (dx, dh_out) + (n*n + n)*S (their
//                                gradients);
//   prepare backward (dx +=):    read (2n*C + C)*s (x, dh_in, dx) + (n*n + 2n)*S (the gradients
//                                of H_post and H_res, and H_pre), write n*C*s (dx), plus the
//                                n*C x (n*n + 2n) gradient of phi once per call;
//   backward:                    the sum of the two backwards (the branch runs between them, so
//                                they cannot share a pass);
//   forward_backward:            forward plus backward.
// fused::prepare_branch_backward runs the aggregation backward inside the first pass of the
// coefficient backward. Its second pass reads x again for the gradient of phi, which this
// minimum does not count.
// The "_kept" variants keep the projections of the forward pass (fused::Projections): per token
// the forward also writes, and the backward reads, (n*n + 2n + 1)*S, the projection vec(x) phi
// and 1/r, which spares the backward one product with phi.
// For n >= 16 the projection vec(x) phi dominates and the kernels become compute-bound, so the
// copy_fraction counter drops there by design.
//
// Counters: items_per_second is tokens/s, bytes_per_second the minimal traffic per second, and
// copy_fraction that rate divided by the bandwidth of std::memcpy moving the same number of
// bytes on the same threads, measured in this binary (copy_GBps) once per size. All rates use
// wall time. memory_copy times that copy with repetitions of its own, for a steadier baseline.
//
// Layer benchmarks, named kernel/type, with the arguments n (streams), C (channels),
// T (tokens) and threads:
//   fused_{prepare,merge,forward,backward,forward_backward}  the fused kernels;
//   fused_{backward,forward_backward}_kept                    the same with kept projections;
//   fused_{forward,forward_backward}_dynamic                  the same with
//       Workspace::fixed_size_streams = false, which runs the path for a run-time n in place of
//       the kernels compiled for n = 2, 4 and 8, registered for those n only;
//   reference_*                                               the kernels of layer.hpp, one
//       thread, allocating their results.
// A variant runs on the shapes of its base kernel, so a script can pair
// "fused_forward/float/n:4/..." with "fused_forward_dynamic/float/n:4/..." by the part after the
// kernel name.
// The default run covers T = 4096, threads 1 and 2, with n = 1, 2, 4 at C = 2048 and n = 8 at
// C = 1024. Pass --full for the sweep n in {1, 2, 4, 8, 16, 32}, C in {512, 1024, 2048, 4096},
// T in {1024, 4096, 8192}, threads 1 and 2; combine it with --benchmark_filter to pick kernels.
// For n >= 16, T is reduced to keep one iteration near a second; the T argument shows the
// reduced value.
//
// MLP benchmarks, with the arguments C, T, threads (and n for mHC): a branch y = relu(h W1) W2
// with a 4C hidden layer (Eigen GEMMs spread over the threads) wrapped in a plain residual
// x + F(x) or in an mHC layer with n = 4.
//   mlp_residual, mlp_mhc              the forward pass;
//   mlp_residual_train, mlp_mhc_train  a training step: the forward pass, then the backward from
//                                      a fixed random dL/dy (dL/dx_next for mHC). The backward
//                                      computes the gradients of W1, W2 and, for mHC, of the
//                                      layer's parameters.
// mlp_mhc and mlp_mhc_train report overhead_percent, their time per iteration against that of
// the residual version of the same pass, measured in their setup (median of 5 runs). The default
// run uses C = 2048 and T = 256 and 1024, --full adds T = 4096.
#include "bench_support.hpp"

#include <mhc/backward.hpp>
#include <mhc/fused.hpp>
#include <mhc/layer.hpp>
#include <mhc/layer_backward.hpp>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using mhc::RowMatrix;
using Eigen::Index;

template <typename Storage>
using ParameterScalar = std::conditional_t<std::is_same_v<Storage, double>, double, float>;

// Inputs and outputs of one layer, allocated and filled once per benchmark.
// Every state-sized matrix is written here. A timed loop would otherwise pay for the page faults
// of fresh pages, and on Linux its reads of never-written pages would hit the shared zero page.
// x_next is random because the backward benchmarks also use it as dL/dx_next.
template <typename Storage>
struct LayerData {
  using Scalar = ParameterScalar<Storage>;

  LayerData(int streams, int channels, Index tokens)
      : parameters(mhc::bench::random_parameters<Scalar>(streams, channels, 1)),
        x(mhc::bench::uniform_matrix<Storage>(tokens, Index(streams) * channels, 2)),
        branch_output(mhc::bench::uniform_matrix<Storage>(tokens, channels, 3)),
        branch_input(RowMatrix<Storage>::Zero(tokens, channels)),
        x_next(mhc::bench::uniform_matrix<Storage>(tokens, Index(streams) * channels, 9)),
        grad_x(RowMatrix<Storage>::Zero(tokens, Index(streams) * channels)),
        grad_branch_output(RowMatrix<Storage>::Zero(tokens, channels)) {}

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

  // The merge backward and the prepare backward; see the file comment.
  double backward_traffic() const {
    const double n = parameters.streams;
    const double c = parameters.channels;
    const double merge = (3 * n * c + 2 * c) * sizeof(Storage) + 2 * (n * n + n) * sizeof(Scalar);
    const double prepare = (3 * n * c + c) * sizeof(Storage) + (n * n + 2 * n) * sizeof(Scalar);
    const double grad_phi = n * c * (n * n + 2 * n) * sizeof(Scalar);
    return static_cast<double>(x.rows()) * (merge + prepare) + grad_phi;
  }

  // Kept projections and 1/r, written once by the forward and read once by the backward.
  double projection_traffic() const {
    const double n = parameters.streams;
    return static_cast<double>(x.rows()) * (n * n + 2 * n + 1) * sizeof(Scalar);
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

// Kernel variant that fused_layer times.
enum class Variant {
  kDefault,          // kernels compiled for n = 2, 4, 8, projections recomputed in the backward
  kKeptProjections,  // the forward keeps the projections for the backward
  kRunTimeStreams,   // Workspace::fixed_size_streams = false
};

// Minimal traffic of the kernels that `kind` runs, plus that of the kept projections when
// `kept_projections` is set.
template <typename Storage>
double layer_traffic(const LayerData<Storage>& data, Kernel kind, bool kept_projections) {
  double traffic = (runs_prepare(kind) ? data.prepare_traffic() : 0.0) +
                   (runs_merge(kind) ? data.merge_traffic() : 0.0) +
                   (runs_backward(kind) ? data.backward_traffic() : 0.0);
  if (kept_projections) {
    const int passes = (runs_prepare(kind) ? 1 : 0) + (runs_backward(kind) ? 1 : 0);
    traffic += passes * data.projection_traffic();
  }
  return traffic;
}

template <typename Storage, Kernel kind, Variant variant = Variant::kDefault>
void fused_layer(benchmark::State& state) {
  using Scalar = typename LayerData<Storage>::Scalar;
  constexpr bool kKeep = variant == Variant::kKeptProjections;
  const Arguments arguments = read_arguments(state);
  LayerData<Storage> data(arguments.streams, arguments.channels, arguments.tokens);
  mhc::fused::Workspace<Storage, Scalar> workspace(mhc::bench::pool(arguments.threads));
  workspace.fixed_size_streams = variant != Variant::kRunTimeStreams;
  mhc::fused::Projections<Scalar> projections;

  const auto prepare = [&] {
    if constexpr (kKeep) {
      mhc::fused::prepare_branch(data.parameters, data.x, data.coefficients, projections, data.branch_input,
                                 workspace);
    } else {
      mhc::fused::prepare_branch(data.parameters, data.x, data.coefficients, data.branch_input, workspace);
    }
  };
  // In the backward pass x_next is used as dL/dx_next and h_out as dL/dh_in.
  const auto backward = [&] {
    mhc::fused::merge_streams_backward(data.coefficients, data.x, data.branch_output, data.x_next, data.grad_x,
                                       data.grad_branch_output, data.grad_post, data.grad_res, workspace);
    if constexpr (kKeep) {
      mhc::fused::prepare_branch_backward(data.parameters, data.x, projections, data.coefficients, data.branch_output,
                                          data.grad_post, data.grad_res, data.grad_x, data.grad_parameters,
                                          workspace, mhc::Options{}, mhc::fused::GradientWrite::kAdd);
    } else {
      mhc::fused::prepare_branch_backward(data.parameters, data.x, data.coefficients, data.branch_output,
                                          data.grad_post, data.grad_res, data.grad_x, data.grad_parameters,
                                          workspace, mhc::Options{}, mhc::fused::GradientWrite::kAdd);
    }
  };

  // Untimed first calls give the coefficients, projections, gradients and workspace buffers
  // their shapes, so the timed loop allocates none of them.
  prepare();
  if (runs_backward(kind)) backward();

  const mhc::bench::Stopwatch stopwatch;
  for (auto _ : state) {
    if (runs_prepare(kind)) prepare();
    if (runs_merge(kind)) {
      mhc::fused::merge_streams(data.coefficients, data.x, data.branch_output, data.x_next, workspace);
    }
    if (runs_backward(kind)) backward();
    benchmark::ClobberMemory();
  }

  const double traffic = layer_traffic(data, kind, kKeep);
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

  const double traffic = layer_traffic(data, kind, false);
  mhc::bench::set_traffic_counters(state, arguments.tokens, traffic, arguments.threads, stopwatch.seconds());
}

// ---------------------------------------------------------------------------------------------
// The layer around an MLP branch.

// Rows per task of the MLP products. Fixed, so no result depends on the number of threads.
constexpr Index kMlpBlock = 64;

Index mlp_blocks(Index rows) { return (rows + kMlpBlock - 1) / kMlpBlock; }

// Gradients of the MLP weights and of its hidden layer, shaped by the first Mlp::backward.
struct MlpGradients {
  RowMatrix<float> hidden;  // dL/d(hidden), T x 4C
  RowMatrix<float> w1;      // C x 4C
  RowMatrix<float> w2;      // 4C x C
};

// y = relu(h W1) W2 (+ h when `residual`) for T x C input h, in token blocks spread over the
// pool. `hidden` is T x 4C scratch that keeps relu(h W1) for the backward.
// NOTE: Eigen 3.4 takes the packing buffers of a matrix product from the heap when they exceed
// EIGEN_STACK_ALLOCATION_LIMIT (128 KiB), so the timed MLP loops still allocate inside Eigen.
struct Mlp {
  Mlp(int channels, Index tokens)
      : w1(mhc::bench::uniform_matrix<float>(channels, 4 * channels, 4) / std::sqrt(float(channels))),
        w2(mhc::bench::uniform_matrix<float>(4 * channels, channels, 5) / std::sqrt(float(4 * channels))),
        hidden(tokens, 4 * channels) {}

  void forward(const RowMatrix<float>& input, RowMatrix<float>& output, bool residual, mhc::ThreadPool* pool) {
    const Index tokens = input.rows();
    pool->run(mlp_blocks(tokens), [&](Index block, int) {
      const Index first = block * kMlpBlock;
      const Index rows = std::min(kMlpBlock, tokens - first);
      auto hidden_rows = hidden.middleRows(first, rows);
      hidden_rows.noalias() = input.middleRows(first, rows) * w1;
      hidden_rows = hidden_rows.cwiseMax(0.0f);
      auto output_rows = output.middleRows(first, rows);
      output_rows.noalias() = hidden_rows * w2;
      if (residual) output_rows += input.middleRows(first, rows);
    });
  }

  // Backward of the last forward(), which ran on `input`, given grad_output = dL/dy. Writes
  // grad_input = dL/dh (plus dL/dy when `residual`) and the gradients of W1, W2 and the hidden
  // layer. Two runs on the pool: token blocks for the row-wise products, then blocks of rows of
  // dW1 and dW2, each a sum over all tokens, so no two tasks write the same entries.
  void backward(const RowMatrix<float>& input, const RowMatrix<float>& grad_output, RowMatrix<float>& grad_input,
                bool residual, MlpGradients& gradients, mhc::ThreadPool* pool) const {
    const Index tokens = input.rows();
    gradients.hidden.resize(tokens, hidden.cols());
    gradients.w1.resize(w1.rows(), w1.cols());
    gradients.w2.resize(w2.rows(), w2.cols());

    pool->run(mlp_blocks(tokens), [&](Index block, int) {
      const Index first = block * kMlpBlock;
      const Index rows = std::min(kMlpBlock, tokens - first);
      // dhidden = (dy W2^T) masked by hidden > 0, the derivative of relu.
      auto grad_hidden_rows = gradients.hidden.middleRows(first, rows);
      grad_hidden_rows.noalias() = grad_output.middleRows(first, rows) * w2.transpose();
      grad_hidden_rows.array() =
          (hidden.middleRows(first, rows).array() > 0.0f).select(grad_hidden_rows.array(), 0.0f);
      auto grad_input_rows = grad_input.middleRows(first, rows);
      grad_input_rows.noalias() = grad_hidden_rows * w1.transpose();
      if (residual) grad_input_rows += grad_output.middleRows(first, rows);
    });

    // dW1 = h^T dhidden and dW2 = hidden^T dy. The dW1 blocks come first: each is about four
    // times the work of a dW2 block, and starting the larger tasks first balances the threads.
    const Index w1_blocks = mlp_blocks(w1.rows());
    const Index w2_blocks = mlp_blocks(w2.rows());
    pool->run(w1_blocks + w2_blocks, [&](Index block, int) {
      if (block < w1_blocks) {
        const Index first = block * kMlpBlock;
        const Index rows = std::min(kMlpBlock, w1.rows() - first);
        gradients.w1.middleRows(first, rows).noalias() = input.middleCols(first, rows).transpose() * gradients.hidden;
      } else {
        const Index first = (block - w1_blocks) * kMlpBlock;
        const Index rows = std::min(kMlpBlock, w2.rows() - first);
        gradients.w2.middleRows(first, rows).noalias() = hidden.middleCols(first, rows).transpose() * grad_output;
      }
    });
  }

  RowMatrix<float> w1, w2, hidden;
};

// The plain residual y = x + F(x) on a T x C state, with dL/dy a fixed random matrix.
struct ResidualMlp {
  ResidualMlp(Mlp& branch, int channels, Index tokens)
      : mlp(branch),
        x(mhc::bench::uniform_matrix<float>(tokens, channels, 6)),
        y(tokens, channels),
        grad_y(mhc::bench::uniform_matrix<float>(tokens, channels, 7)),
        grad_x(tokens, channels) {}

  // The forward pass, then the backward when `kind` is Kernel::kForwardBackward.
  void run(Kernel kind, mhc::ThreadPool* pool) {
    mlp.forward(x, y, true, pool);
    if (runs_backward(kind)) mlp.backward(x, grad_y, grad_x, true, gradients, pool);
    benchmark::ClobberMemory();
  }

  Mlp& mlp;
  RowMatrix<float> x, y, grad_y, grad_x;
  MlpGradients gradients;
};

// An mHC layer around the same branch on a T x n*C state, with dL/dx_next a fixed random matrix.
// The forward runs the fused prepare, F(h_in) and the fused merge. The backward runs the fused
// merge backward, the MLP backward from dh_out to dh_in, and the fused prepare backward, which
// adds its share of dL/dx to the merge's.
struct MhcMlp {
  MhcMlp(Mlp& branch, int streams, int channels, Index tokens, mhc::ThreadPool* pool)
      : mlp(branch),
        data(streams, channels, tokens),
        workspace(pool),
        grad_x_next(mhc::bench::uniform_matrix<float>(tokens, Index(streams) * channels, 8)),
        grad_branch_input(tokens, channels) {}

  void run(Kernel kind) {
    mhc::ThreadPool* pool = workspace.thread_pool();
    mhc::fused::prepare_branch(data.parameters, data.x, data.coefficients, data.branch_input, workspace);
    mlp.forward(data.branch_input, data.branch_output, false, pool);
    mhc::fused::merge_streams(data.coefficients, data.x, data.branch_output, data.x_next, workspace);
    if (runs_backward(kind)) {
      mhc::fused::merge_streams_backward(data.coefficients, data.x, data.branch_output, grad_x_next, data.grad_x,
                                         data.grad_branch_output, data.grad_post, data.grad_res, workspace);
      mlp.backward(data.branch_input, data.grad_branch_output, grad_branch_input, false, gradients, pool);
      mhc::fused::prepare_branch_backward(data.parameters, data.x, data.coefficients, grad_branch_input,
                                          data.grad_post, data.grad_res, data.grad_x, data.grad_parameters,
                                          workspace, mhc::Options{}, mhc::fused::GradientWrite::kAdd);
    }
    benchmark::ClobberMemory();
  }

  Mlp& mlp;
  LayerData<float> data;
  mhc::fused::Workspace<float, float> workspace;
  RowMatrix<float> grad_x_next;
  RowMatrix<float> grad_branch_input;
  MlpGradients gradients;
};

// Plain residual x + F(x): the forward pass (Kernel::kForward) or a training step
// (Kernel::kForwardBackward).
template <Kernel kind>
void mlp_residual(benchmark::State& state) {
  const int channels = static_cast<int>(state.range(0));
  const Index tokens = state.range(1);
  mhc::ThreadPool* pool = mhc::bench::pool(static_cast<int>(state.range(2)));
  Mlp mlp(channels, tokens);
  ResidualMlp residual(mlp, channels, tokens);

  residual.run(kind, pool);  // untimed, shapes the gradients
  for (auto _ : state) residual.run(kind, pool);
  state.SetItemsProcessed(state.iterations() * tokens);
}

// mHC with n streams around the same branch, for the same passes as mlp_residual.
// overhead_percent compares its time per iteration with that of the plain residual, measured in
// the setup on the same thread pool.
template <Kernel kind>
void mlp_mhc(benchmark::State& state) {
  const int channels = static_cast<int>(state.range(0));
  const Index tokens = state.range(1);
  mhc::ThreadPool* pool = mhc::bench::pool(static_cast<int>(state.range(2)));
  const int streams = static_cast<int>(state.range(3));
  Mlp mlp(channels, tokens);
  MhcMlp layer(mlp, streams, channels, tokens, pool);

  // The plain residual around the same branch, on a T x C state, as the baseline.
  ResidualMlp residual(mlp, channels, tokens);
  residual.run(kind, pool);
  const double residual_seconds = mhc::bench::median_seconds(5, [&] { residual.run(kind, pool); });

  layer.run(kind);  // untimed, shapes the coefficients, gradients and workspace buffers
  const mhc::bench::Stopwatch stopwatch;
  for (auto _ : state) layer.run(kind);
  const double seconds = stopwatch.seconds();

  state.SetItemsProcessed(state.iterations() * tokens);
  const double per_iteration = seconds / static_cast<double>(state.iterations());
  state.counters["overhead_percent"] = 100.0 * (per_iteration / residual_seconds - 1.0);
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
      shapes.push_back({2, 2048, 4096, threads});
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

// The shapes for which Workspace::fixed_size_streams selects kernels compiled for n: n = 2, 4, 8.
std::vector<Arguments> fixed_size_shapes(const std::vector<Arguments>& shapes) {
  std::vector<Arguments> selected;
  for (const Arguments& shape : shapes) {
    if (shape.streams == 2 || shape.streams == 4 || shape.streams == 8) selected.push_back(shape);
  }
  return selected;
}

template <typename Function>
void register_mlp(const std::string& name, Function function, bool with_mhc, const std::vector<Index>& token_counts) {
  benchmark::internal::Benchmark* benchmark = benchmark::RegisterBenchmark(name.c_str(), function);
  if (with_mhc) {
    benchmark->ArgNames({"C", "T", "threads", "n"});
  } else {
    benchmark->ArgNames({"C", "T", "threads"});
  }
  benchmark->UseRealTime()->Unit(benchmark::kMillisecond);
  for (int threads : {1, 2}) {
    for (Index tokens : token_counts) {
      if (with_mhc) {
        benchmark->Args({2048, tokens, threads, 4});
      } else {
        benchmark->Args({2048, tokens, threads});
      }
    }
  }
}

// std::memcpy of MiB mebibytes in 1 MiB pieces spread over the threads, the copy that the
// copy_fraction counters divide by. Its bytes_per_second counts reads plus writes (2 * MiB), and
// its repetitions give a median that docs/benchmarks.md can quote for each thread count.
void memory_copy(benchmark::State& state) {
  const std::int64_t bytes = state.range(0) << 20;
  const int threads = static_cast<int>(state.range(1));
  std::vector<unsigned char> source(static_cast<std::size_t>(bytes), 1);
  std::vector<unsigned char> target(static_cast<std::size_t>(bytes), 0);
  constexpr std::int64_t kPiece = std::int64_t(1) << 20;
  const Index pieces = static_cast<Index>((bytes + kPiece - 1) / kPiece);
  for (auto _ : state) {
    mhc::bench::pool(threads)->run(pieces, [&](Index piece, int) {
      const std::int64_t begin = piece * kPiece;
      const std::int64_t size = std::min(kPiece, bytes - begin);
      std::memcpy(target.data() + begin, source.data() + begin, static_cast<std::size_t>(size));
    });
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(2 * bytes * state.iterations());
}

void register_all(bool full) {
  const auto fused = layer_shapes(full, true);
  const auto fused_fixed_size = fixed_size_shapes(fused);
  const auto reference = layer_shapes(full, false);

  // 256 MiB per buffer is about the size of x_next plus x at n = 4, C = 2048, T = 4096.
  auto* copy = benchmark::RegisterBenchmark("memory_copy", memory_copy);
  copy->ArgNames({"MiB", "threads"})->UseRealTime()->Unit(benchmark::kMillisecond);
  for (int threads : {1, 2}) copy->Args({256, threads});

  register_layer("fused_prepare/float", fused_layer<float, Kernel::kPrepare>, fused);
  register_layer("fused_merge/float", fused_layer<float, Kernel::kMerge>, fused);
  register_layer("fused_forward/float", fused_layer<float, Kernel::kForward>, fused);
  register_layer("fused_forward/bfloat16", fused_layer<Eigen::bfloat16, Kernel::kForward>, fused);
  register_layer("fused_forward/double", fused_layer<double, Kernel::kForward>, fused);
  register_layer("fused_forward_dynamic/float",
                 fused_layer<float, Kernel::kForward, Variant::kRunTimeStreams>, fused_fixed_size);
  register_layer("reference_prepare/float", reference_layer<float, Kernel::kPrepare>, reference);
  register_layer("reference_merge/float", reference_layer<float, Kernel::kMerge>, reference);
  register_layer("reference_forward/float", reference_layer<float, Kernel::kForward>, reference);
  register_layer("fused_backward/float", fused_layer<float, Kernel::kBackward>, fused);
  register_layer("fused_backward_kept/float",
                 fused_layer<float, Kernel::kBackward, Variant::kKeptProjections>, fused);
  register_layer("fused_forward_backward/float", fused_layer<float, Kernel::kForwardBackward>, fused);
  register_layer("fused_forward_backward/bfloat16", fused_layer<Eigen::bfloat16, Kernel::kForwardBackward>, fused);
  register_layer("fused_forward_backward_kept/float",
                 fused_layer<float, Kernel::kForwardBackward, Variant::kKeptProjections>, fused);
  register_layer("fused_forward_backward_kept/bfloat16",
                 fused_layer<Eigen::bfloat16, Kernel::kForwardBackward, Variant::kKeptProjections>, fused);
  register_layer("fused_forward_backward_dynamic/float",
                 fused_layer<float, Kernel::kForwardBackward, Variant::kRunTimeStreams>, fused_fixed_size);
  register_layer("reference_backward/float", reference_layer<float, Kernel::kBackward>, reference);
  register_layer("reference_forward_backward/float", reference_layer<float, Kernel::kForwardBackward>, reference);
  if (full) {
    register_layer("fused_prepare/bfloat16", fused_layer<Eigen::bfloat16, Kernel::kPrepare>, fused);
    register_layer("fused_merge/bfloat16", fused_layer<Eigen::bfloat16, Kernel::kMerge>, fused);
    register_layer("reference_forward/double", reference_layer<double, Kernel::kForward>, reference);
  }

  // MLP branch at C = 2048. One forward iteration at T = 4096 is about 0.3 Tflop and a training
  // step three times that, so only --full runs T = 4096.
  const std::vector<Index> mlp_tokens = full ? std::vector<Index>{256, 1024, 4096} : std::vector<Index>{256, 1024};
  register_mlp("mlp_residual/float", mlp_residual<Kernel::kForward>, false, mlp_tokens);
  register_mlp("mlp_mhc/float", mlp_mhc<Kernel::kForward>, true, mlp_tokens);
  register_mlp("mlp_residual_train/float", mlp_residual<Kernel::kForwardBackward>, false, mlp_tokens);
  register_mlp("mlp_mhc_train/float", mlp_mhc<Kernel::kForwardBackward>, true, mlp_tokens);
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
