// Fused, vectorised and multithreaded CPU kernels for one mHC layer.
//
// They compute what the reference kernels of <mhc/layer.hpp> compute, with less memory traffic:
//   fused::prepare_branch   reads each token's row of x once from memory and, while the row is
//                           in cache, computes its projection vec(x) phi, its sum of squares,
//                           H_pre, H_post, H_res (Sinkhorn-Knopp on the stack) and h_in = H_pre x.
//   fused::merge_streams    x_next = H_res x + H_post^T h_out in one pass that reads x and h_out
//                           once and writes x_next once.
//   fused::merge_streams_backward, fused::aggregate_streams_backward
//                           the gradients of those two mixes, each in one pass.
//   fused::coefficients_backward
//                           the gradient through the coefficients (sigmoid, Sinkhorn-Knopp, the
//                           RMS scale and phi): one pass over x for dL/dx, the bias and the
//                           alphas, and one more for dL/dphi = x^T (gradient of x phi).
//   fused::prepare_branch_backward
//                           the aggregation's backward, then the coefficients' backward.
// Per token the minimal traffic is n*C values read and C written (+ the coefficients) before the
// branch, and n*C + C read and n*C written after it.
//
// Types. Storage is the type of x, h_in, h_out and x_next: float, double or Eigen::bfloat16.
// Scalar is the type of the parameters and coefficients (float or double), and every sum is
// accumulated in Scalar. The usual mixed-precision pairing is Storage = Eigen::bfloat16 with
// Scalar = float.
//
// Outputs go to caller-owned views (Eigen::Ref of a RowMatrix, an Eigen::Map over a buffer, or a
// block of rows), and all scratch memory lives in a Workspace that grows to the largest shape
// seen and is then reused. A training loop that keeps its Workspace and Coefficients between
// steps allocates nothing per step in the forward kernels and the two mix backwards.
// NOTE: coefficients_backward runs Eigen matrix products, which may allocate their blocking
// buffers on the heap, and allocates a solver per chunk for SinkhornGradient::implicit.
//
// Threads. A Workspace may carry a ThreadPool. Tokens are split into chunks of a fixed number of
// tokens that do not depend on the pool size, and each token's result depends only on that
// token. Sums over tokens (the parameter gradients of coefficients_backward) run in a fixed
// order. So every result is bitwise identical for any number of threads.
//
// Example, one training-step forward with bfloat16 state:
//   mhc::ThreadPool pool(2);
//   mhc::fused::Workspace<Eigen::bfloat16, float> workspace(&pool);
//   mhc::Coefficients<float> coefficients;
//   mhc::fused::prepare_branch(parameters, x, coefficients, h_in, workspace);
//   h_out = branch(h_in);
//   mhc::fused::merge_streams(coefficients, x, h_out, x_next, workspace);
#pragma once

#include <mhc/common.hpp>
#include <mhc/detail/backward_checks.hpp>
#include <mhc/detail/fused_kernels.hpp>
#include <mhc/detail/layer_checks.hpp>
#include <mhc/layer.hpp>
#include <mhc/thread_pool.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <functional>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

namespace mhc::fused {

// Tokens per task. Fixed, so the split of work never depends on the number of threads.
constexpr Eigen::Index kChunkTokens = 16;

// Scratch memory and the thread pool of the fused kernels, reused across calls.
//
// Buffers grow to the largest shape seen and never shrink. A Workspace serves one call at a
// time, and its pool must outlive it (nullptr runs everything on the calling thread).
template <typename Storage, typename Scalar>
class Workspace {
  static_assert(std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>,
                "mhc::fused: the parameter type must be float or double");
  static_assert(std::is_same_v<Storage, float> || std::is_same_v<Storage, double> ||
                    std::is_same_v<Storage, Eigen::bfloat16>,
                "mhc::fused: the storage type must be float, double or Eigen::bfloat16");

 public:
  using storage_type = Storage;
  using scalar_type = Scalar;
  using Buffer = std::vector<Scalar, Eigen::aligned_allocator<Scalar>>;

  explicit Workspace(ThreadPool* pool = nullptr) : pool_(pool) {}

  ThreadPool* thread_pool() const { return pool_; }
  void set_thread_pool(ThreadPool* pool) { pool_ = pool; }

  // Number of threads the kernels run on.
  int threads() const { return pool_ != nullptr ? pool_->size() : 1; }

  // Packed copy of phi, `size` values.
  Scalar* projection_buffer(Eigen::Index size) { return grow(projection_, size); }

  // Makes room for per-worker buffers of `size` values for every thread of the pool. The kernels
  // call it before a parallel run, so worker_buffer() never allocates.
  void reserve_worker_buffers(Eigen::Index size) {
    workers_.resize(static_cast<std::size_t>(threads()));
    for (Buffer& buffer : workers_) grow(buffer, size);
  }

  Scalar* worker_buffer(int worker) { return workers_[static_cast<std::size_t>(worker)].data(); }

  // Gradients shared by all tasks of one call, `size` values (the coefficient backward keeps the
  // T x (n*n + 2n) gradient of the projections and per-chunk partial sums here).
  Scalar* gradient_buffer(Eigen::Index size) { return grow(gradients_, size); }

  // merge_streams writes an x_next larger than this many bytes with non-temporal stores, which
  // skip reading each output line into the cache first. The default is the last-level cache
  // size that Eigen detects: a larger output is evicted before anyone reads it back.
  std::ptrdiff_t streaming_threshold_bytes = Eigen::l3CacheSize();

  // Storage of the branch input and coefficients for fused::forward.
  RowMatrix<Storage> branch_input;
  Coefficients<Scalar> coefficients;

  // Gradient of H_pre (T x n) for fused::prepare_branch_backward.
  RowMatrix<Scalar> grad_pre;

 private:
  static Scalar* grow(Buffer& buffer, Eigen::Index size) {
    if (buffer.size() < static_cast<std::size_t>(size)) buffer.resize(static_cast<std::size_t>(size));
    return buffer.data();
  }

  ThreadPool* pool_ = nullptr;
  Buffer projection_;
  Buffer gradients_;
  std::vector<Buffer> workers_;
};

namespace detail {

using Eigen::Index;

template <typename Storage>
const Storage* row_pointer(const ConstRowMatrixRef<Storage>& matrix, Index row) {
  return matrix.data() + row * matrix.outerStride();
}

template <typename Storage>
Storage* row_pointer(RowMatrixRef<Storage>& matrix, Index row) {
  return matrix.data() + row * matrix.outerStride();
}

// Whether the memory spanned by two row-major views intersects.
template <typename A, typename B>
bool overlaps(const A& a, const B& b) {
  if (a.size() == 0 || b.size() == 0) return false;
  const auto* a_begin = reinterpret_cast<const unsigned char*>(a.data());
  const auto* a_end = reinterpret_cast<const unsigned char*>(a.data() + (a.rows() - 1) * a.outerStride() + a.cols());
  const auto* b_begin = reinterpret_cast<const unsigned char*>(b.data());
  const auto* b_end = reinterpret_cast<const unsigned char*>(b.data() + (b.rows() - 1) * b.outerStride() + b.cols());
  const std::less<const unsigned char*> before;
  return before(a_begin, b_end) && before(b_begin, a_end);
}

template <typename A, typename B>
void check_no_overlap(const char* function, const char* output, const char* input, const A& a, const B& b) {
  if (overlaps(a, b)) {
    mhc::detail::throw_invalid_argument(function, output, mhc::detail::concat("memory disjoint from ", input),
                                        "overlapping views");
  }
}

inline void check_sinkhorn_options(const char* function, const SinkhornOptions& options) {
  if (options.iterations < 0) {
    mhc::detail::throw_invalid_argument(function, "options.sinkhorn.iterations", "at least 0",
                                        mhc::detail::concat(options.iterations));
  }
  if (!(options.tolerance >= 0.0) || !std::isfinite(options.tolerance)) {
    mhc::detail::throw_invalid_argument(function, "options.sinkhorn.tolerance", "a finite value >= 0",
                                        mhc::detail::concat(options.tolerance));
  }
  if (options.method != SinkhornMethod::linear && options.method != SinkhornMethod::log_domain) {
    mhc::detail::throw_invalid_argument(function, "options.sinkhorn.method", "SinkhornMethod::linear or log_domain",
                                        mhc::detail::concat(static_cast<int>(options.method)));
  }
}

// Calls body(std::integral_constant<int, N>) with N = streams for the stream counts that have a
// fixed-size path (2, 4 and 8) and N = 0 (run-time count) otherwise.
template <typename Body>
void dispatch_streams(int streams, Body&& body) {
  switch (streams) {
    case 2: body(std::integral_constant<int, 2>{}); break;
    case 4: body(std::integral_constant<int, 4>{}); break;
    case 8: body(std::integral_constant<int, 8>{}); break;
    default: body(std::integral_constant<int, 0>{}); break;
  }
}

template <int N, typename Storage, typename Scalar>
void prepare_branch_tokens(const Parameters<Scalar>& parameters, const ConstRowMatrixRef<Storage>& x,
                           Coefficients<Scalar>& coefficients, RowMatrixRef<Storage>& branch_input,
                           Workspace<Storage, Scalar>& workspace, const Options& options) {
  namespace kernels = mhc::detail::fused;
  constexpr bool kConvert = !std::is_same_v<Storage, Scalar>;
  const int n = parameters.streams;
  const Index channels = parameters.channels;
  const Index width = Index(n) * channels;
  const Index count = parameters.coefficient_count();
  const Index tokens = x.rows();

  const kernels::ProjectionLayout layout = kernels::projection_layout<Scalar>(width, count);
  const Index padded = layout.padded;
  Scalar* packed = workspace.projection_buffer(layout.packed_size());
  kernels::pack_projection(parameters.phi, layout, packed);

  kernels::CoefficientRule<Scalar> rule;
  rule.bias = parameters.bias.data();
  rule.alpha_pre = parameters.alpha_pre;
  rule.alpha_post = parameters.alpha_post;
  rule.alpha_res = parameters.alpha_res;
  rule.rms_epsilon = static_cast<Scalar>(options.rms_epsilon);
  rule.width = width;
  rule.sinkhorn = options.sinkhorn;

  // Per worker: the projections of one group, then (storage conversion only) the group's rows
  // and one branch-input row in Scalar.
  const Index projection_values = kernels::kGroupTokens * padded;
  const Index row_values = kConvert ? kernels::kGroupTokens * width + channels : 0;
  workspace.reserve_worker_buffers(projection_values + row_values);

  const Index chunks = (tokens + kChunkTokens - 1) / kChunkTokens;
  mhc::detail::run_tasks(workspace.thread_pool(), chunks, [&](Index chunk, int worker) {
    Scalar* projections = workspace.worker_buffer(worker);
    Scalar* converted_rows = projections + projection_values;
    Scalar* converted_input = converted_rows + kernels::kGroupTokens * width;
    const Index chunk_end = std::min(tokens, (chunk + 1) * kChunkTokens);

    for (Index first = chunk * kChunkTokens; first < chunk_end; first += kernels::kGroupTokens) {
      const int group = static_cast<int>(std::min<Index>(kernels::kGroupTokens, chunk_end - first));
      const Scalar* rows[kernels::kGroupTokens];
      for (int r = 0; r < kernels::kGroupTokens; ++r) {
        if (r >= group) {
          rows[r] = rows[0];  // A partial group repeats row 0, and the extra projections are ignored.
          continue;
        }
        if constexpr (kConvert) {
          Scalar* row = converted_rows + r * width;
          kernels::convert_row(row_pointer<Storage>(x, first + r), width, row);
          rows[r] = row;
        } else {
          rows[r] = row_pointer<Storage>(x, first + r);
        }
      }
      kernels::project_group(rows, layout, packed, projections);

      for (int r = 0; r < group; ++r) {
        const Index t = first + r;
        Scalar* pre = coefficients.pre.data() + t * n;
        Scalar* post = coefficients.post.data() + t * n;
        Scalar* res = coefficients.res.data() + t * n * n;
        const Scalar squares = kernels::sum_of_squares(rows[r], width);
        kernels::token_coefficients<N>(projections + r * padded, squares, n, rule, pre, post, res);
        if constexpr (kConvert) {
          kernels::aggregate_row<N>(rows[r], n, channels, pre, converted_input);
          kernels::convert_row(converted_input, channels, row_pointer<Storage>(branch_input, t));
        } else {
          kernels::aggregate_row<N>(rows[r], n, channels, pre, row_pointer<Storage>(branch_input, t));
        }
      }
    }
  });
}

template <int N, typename Storage, typename Scalar>
void merge_streams_tokens(const Coefficients<Scalar>& coefficients, const ConstRowMatrixRef<Storage>& x,
                          const ConstRowMatrixRef<Storage>& branch_output, RowMatrixRef<Storage>& x_next,
                          Workspace<Storage, Scalar>& workspace) {
  namespace kernels = mhc::detail::fused;
  constexpr bool kConvert = !std::is_same_v<Storage, Scalar>;
  const int n = static_cast<int>(coefficients.pre.cols());
  const Index channels = branch_output.cols();
  const Index width = x.cols();
  const Index tokens = x.rows();

  // Per worker (storage conversion only): x, h_out and x_next of one token in Scalar.
  workspace.reserve_worker_buffers(kConvert ? 2 * width + channels : 0);

  // Storage conversion writes through a buffer and never streams.
  const double next_bytes = double(tokens) * double(width) * sizeof(Storage);
  const bool stream = !kConvert && next_bytes > double(workspace.streaming_threshold_bytes);

  const Index chunks = (tokens + kChunkTokens - 1) / kChunkTokens;
  mhc::detail::run_tasks(workspace.thread_pool(), chunks, [&](Index chunk, int worker) {
    const Index chunk_end = std::min(tokens, (chunk + 1) * kChunkTokens);
    for (Index t = chunk * kChunkTokens; t < chunk_end; ++t) {
      const Scalar* post = coefficients.post.data() + t * n;
      const Scalar* res = coefficients.res.data() + t * n * n;
      if constexpr (kConvert) {
        Scalar* state = workspace.worker_buffer(worker);
        Scalar* output = state + width;
        Scalar* next = output + channels;
        kernels::convert_row(row_pointer<Storage>(x, t), width, state);
        kernels::convert_row(row_pointer<Storage>(branch_output, t), channels, output);
        kernels::merge_row<N, false>(state, n, channels, output, res, post, next);
        kernels::convert_row(next, width, row_pointer<Storage>(x_next, t));
      } else {
        const Scalar* state = row_pointer<Storage>(x, t);
        const Scalar* output = row_pointer<Storage>(branch_output, t);
        Scalar* next = row_pointer<Storage>(x_next, t);
        if (stream) {
          kernels::merge_row<N, true>(state, n, channels, output, res, post, next);
        } else {
          kernels::merge_row<N, false>(state, n, channels, output, res, post, next);
        }
      }
    }
    if (stream) kernels::stream_fence();
  });
}

template <int N, typename Storage, typename Scalar>
void merge_streams_backward_tokens(const Coefficients<Scalar>& coefficients, const ConstRowMatrixRef<Storage>& x,
                                   const ConstRowMatrixRef<Storage>& branch_output,
                                   const ConstRowMatrixRef<Storage>& grad_x_next, RowMatrixRef<Storage>& grad_x,
                                   RowMatrixRef<Storage>& grad_branch_output, RowMatrix<Scalar>& grad_post,
                                   RowMatrix<Scalar>& grad_res, Workspace<Storage, Scalar>& workspace) {
  namespace kernels = mhc::detail::fused;
  constexpr bool kConvert = !std::is_same_v<Storage, Scalar>;
  const int n = static_cast<int>(coefficients.pre.cols());
  const Index channels = branch_output.cols();
  const Index width = x.cols();
  const Index tokens = x.rows();

  // Per worker: partial dot products, then (storage conversion only) x, h_out, dx_next, dx and
  // dh_out of one token in Scalar.
  const Index partial_values = Index(n * n + n) * kernels::packet_size<Scalar>;
  workspace.reserve_worker_buffers(partial_values + (kConvert ? 3 * width + 2 * channels : 0));

  const Index chunks = (tokens + kChunkTokens - 1) / kChunkTokens;
  mhc::detail::run_tasks(workspace.thread_pool(), chunks, [&](Index chunk, int worker) {
    Scalar* partial_sums = workspace.worker_buffer(worker);
    const Index chunk_end = std::min(tokens, (chunk + 1) * kChunkTokens);
    for (Index t = chunk * kChunkTokens; t < chunk_end; ++t) {
      const Scalar* post = coefficients.post.data() + t * n;
      const Scalar* res = coefficients.res.data() + t * n * n;
      Scalar* post_gradient = grad_post.data() + t * n;
      Scalar* res_gradient = grad_res.data() + t * n * n;
      if constexpr (kConvert) {
        Scalar* state = partial_sums + partial_values;
        Scalar* output = state + width;
        Scalar* grad_next = output + channels;
        Scalar* state_gradient = grad_next + width;
        Scalar* output_gradient = state_gradient + width;
        kernels::convert_row(row_pointer<Storage>(x, t), width, state);
        kernels::convert_row(row_pointer<Storage>(branch_output, t), channels, output);
        kernels::convert_row(row_pointer<Storage>(grad_x_next, t), width, grad_next);
        kernels::merge_row_backward<N>(state, n, channels, output, res, post, grad_next, state_gradient,
                                       output_gradient, post_gradient, res_gradient, partial_sums);
        kernels::convert_row(state_gradient, width, row_pointer<Storage>(grad_x, t));
        kernels::convert_row(output_gradient, channels, row_pointer<Storage>(grad_branch_output, t));
      } else {
        kernels::merge_row_backward<N>(row_pointer<Storage>(x, t), n, channels, row_pointer<Storage>(branch_output, t),
                                       res, post, row_pointer<Storage>(grad_x_next, t), row_pointer<Storage>(grad_x, t),
                                       row_pointer<Storage>(grad_branch_output, t), post_gradient, res_gradient,
                                       partial_sums);
      }
    }
  });
}

template <int N, bool kAccumulate, typename Storage, typename Scalar>
void aggregate_streams_backward_tokens(const Coefficients<Scalar>& coefficients, const ConstRowMatrixRef<Storage>& x,
                                       const ConstRowMatrixRef<Storage>& grad_branch_input,
                                       RowMatrixRef<Storage>& grad_x, RowMatrix<Scalar>& grad_pre,
                                       Workspace<Storage, Scalar>& workspace) {
  namespace kernels = mhc::detail::fused;
  constexpr bool kConvert = !std::is_same_v<Storage, Scalar>;
  const int n = static_cast<int>(coefficients.pre.cols());
  const Index channels = grad_branch_input.cols();
  const Index width = x.cols();
  const Index tokens = x.rows();

  // Per worker (storage conversion only): x, dh_in and dx of one token in Scalar.
  workspace.reserve_worker_buffers(kConvert ? 2 * width + channels : 0);

  const Index chunks = (tokens + kChunkTokens - 1) / kChunkTokens;
  mhc::detail::run_tasks(workspace.thread_pool(), chunks, [&](Index chunk, int worker) {
    const Index chunk_end = std::min(tokens, (chunk + 1) * kChunkTokens);
    for (Index t = chunk * kChunkTokens; t < chunk_end; ++t) {
      const Scalar* pre = coefficients.pre.data() + t * n;
      Scalar* pre_gradient = grad_pre.data() + t * n;
      if constexpr (kConvert) {
        Scalar* state = workspace.worker_buffer(worker);
        Scalar* input_gradient = state + width;
        Scalar* state_gradient = input_gradient + channels;
        kernels::convert_row(row_pointer<Storage>(x, t), width, state);
        kernels::convert_row(row_pointer<Storage>(grad_branch_input, t), channels, input_gradient);
        if constexpr (kAccumulate) kernels::convert_row(row_pointer<Storage>(grad_x, t), width, state_gradient);
        kernels::aggregate_row_backward<N, kAccumulate>(state, n, channels, pre, input_gradient, state_gradient,
                                                        pre_gradient);
        kernels::convert_row(state_gradient, width, row_pointer<Storage>(grad_x, t));
      } else {
        kernels::aggregate_row_backward<N, kAccumulate>(row_pointer<Storage>(x, t), n, channels, pre,
                                                        row_pointer<Storage>(grad_branch_input, t),
                                                        row_pointer<Storage>(grad_x, t), pre_gradient);
      }
    }
  });
}

// Checks the arguments of the coefficient backward other than grad_pre.
template <typename Storage, typename Scalar>
void check_coefficients_backward(const char* function, const Parameters<Scalar>& parameters,
                                 const ConstRowMatrixRef<Storage>& x, const ConstRowMatrixRef<Scalar>& grad_post,
                                 const ConstRowMatrixRef<Scalar>& grad_res, const RowMatrixRef<Storage>& grad_x,
                                 const Parameters<Scalar>& grad_parameters, const Options& options) {
  mhc::detail::check_parameters(function, parameters);
  mhc::detail::check_options(function, options);
  check_sinkhorn_options(function, options.sinkhorn);
  mhc::detail::check_state(function, "x", x, parameters.streams, parameters.channels);
  const int n = parameters.streams;
  mhc::detail::check_shape(function, "grad_post", grad_post, x.rows(), n);
  mhc::detail::check_shape(function, "grad_res", grad_res, x.rows(), Index(n) * n);
  mhc::detail::check_shape(function, "grad_x", grad_x, x.rows(), x.cols());
  check_no_overlap(function, "grad_x", "x", grad_x, x);
  check_no_overlap(function, "grad_x", "grad_post", grad_x, grad_post);
  check_no_overlap(function, "grad_x", "grad_res", grad_x, grad_res);
  if (&grad_parameters == &parameters) {
    mhc::detail::throw_invalid_argument(function, "grad_parameters", "an object other than parameters",
                                        "the same object");
  }
}

// Rows of grad phi per task and tokens per product step of coefficient_parameter_gradient.
// Both are fixed, so the order of every sum is independent of the number of threads.
constexpr Index kPhiGradientRows = 64;
constexpr Index kPhiGradientTokens = 256;

// Pass 1 of the coefficient backward. For each chunk of tokens it recomputes the projections
// x phi (an Eigen product on the chunk) and 1/r. It backpropagates through the sigmoids, the
// Sinkhorn-Knopp rounds and the scale alpha / r, then writes (or adds) the chunk's rows of grad_x.
// It stores the gradient of the projections in `grad_projections` (T x M) and, per chunk, the
// partial sums of the bias gradient and of the three alpha gradients in `partials`
// (chunks x (M + 3)).
template <bool kAccumulate, typename Storage, typename Scalar>
void coefficients_backward_tokens(const Parameters<Scalar>& parameters, const ConstRowMatrixRef<Storage>& x,
                                  const ConstRowMatrixRef<Scalar>& grad_pre,
                                  const ConstRowMatrixRef<Scalar>& grad_post,
                                  const ConstRowMatrixRef<Scalar>& grad_res, RowMatrixRef<Storage>& grad_x,
                                  Scalar* grad_projections, Scalar* partials, Workspace<Storage, Scalar>& workspace,
                                  const Options& options) {
  namespace kernels = mhc::detail::fused;
  using ConstRowsMap = Eigen::Map<const RowMatrix<Scalar>, 0, Eigen::OuterStride<>>;
  using RowsMap = Eigen::Map<RowMatrix<Scalar>>;
  constexpr bool kConvert = !std::is_same_v<Storage, Scalar>;
  const int n = parameters.streams;
  const Index width = x.cols();
  const Index count = parameters.coefficient_count();
  const Index tokens = x.rows();

  kernels::CoefficientRule<Scalar> rule;
  rule.bias = parameters.bias.data();
  rule.alpha_pre = parameters.alpha_pre;
  rule.alpha_post = parameters.alpha_post;
  rule.alpha_res = parameters.alpha_res;
  rule.rms_epsilon = static_cast<Scalar>(options.rms_epsilon);
  rule.width = width;
  rule.sinkhorn = options.sinkhorn;
  const Scalar alpha[3] = {parameters.alpha_pre, parameters.alpha_post, parameters.alpha_res};
  const Index block_begin[4] = {0, n, 2 * n, count};

  // Per worker: the chunk's rows of x in Scalar (storage conversion only), its projections, its
  // rows of grad_x in Scalar and the Sinkhorn scratch.
  const Index row_values = kChunkTokens * width;
  const Index projection_values = kChunkTokens * count;
  const Index scratch_values = kernels::logit_gradient_scratch_size(n, options.sinkhorn);
  workspace.reserve_worker_buffers(2 * row_values + projection_values + scratch_values);

  const bool implicit = options.sinkhorn.gradient == SinkhornGradient::implicit;
  const Index chunks = (tokens + kChunkTokens - 1) / kChunkTokens;
  mhc::detail::run_tasks(workspace.thread_pool(), chunks, [&](Index chunk, int worker) {
    Scalar* converted_rows = workspace.worker_buffer(worker);
    Scalar* projection_data = converted_rows + row_values;
    Scalar* grad_row_data = projection_data + projection_values;
    Scalar* scratch = grad_row_data + row_values;
    // NOTE: the implicit gradient allocates its solver's buffers once per chunk.
    std::optional<mhc::detail::ImplicitGradientSolver<Scalar>> solver;
    if (implicit) solver.emplace(n);

    const Index first = chunk * kChunkTokens;
    const Index rows = std::min(tokens, first + kChunkTokens) - first;
    const Scalar* x_data = nullptr;
    Index x_stride = width;
    if constexpr (kConvert) {
      for (Index r = 0; r < rows; ++r) {
        kernels::convert_row(row_pointer<Storage>(x, first + r), width, converted_rows + r * width);
      }
      x_data = converted_rows;
    } else {
      x_data = row_pointer<Storage>(x, first);
      x_stride = x.outerStride();
    }
    const ConstRowsMap chunk_x(x_data, rows, width, Eigen::OuterStride<>(x_stride));
    RowsMap projections(projection_data, rows, count);
    projections.noalias() = chunk_x * parameters.phi;

    // Token by token, logit k = alpha * projection_k / r + bias_k: the gradient of projection k
    // is alpha / r times the logit's, and 1/r collects alpha * projection_k times the logit's.
    RowsMap chunk_grad_projections(grad_projections + first * count, rows, count);
    Scalar* partial = partials + chunk * (count + 3);
    std::fill(partial, partial + count + 3, Scalar(0));
    Scalar rms_factors[kChunkTokens];
    for (Index r = 0; r < rows; ++r) {
      const Index t = first + r;
      const Scalar inverse_r =
          Scalar(1) / std::sqrt(kernels::sum_of_squares(x_data + r * x_stride, width) / static_cast<Scalar>(width) +
                                rule.rms_epsilon);
      Scalar* grad_logits = &chunk_grad_projections(r, 0);
      kernels::token_logit_gradient(projection_data + r * count, inverse_r, row_pointer<Scalar>(grad_pre, t),
                                    row_pointer<Scalar>(grad_post, t), row_pointer<Scalar>(grad_res, t), n, rule,
                                    scratch, solver ? &*solver : nullptr, grad_logits);

      Scalar grad_inverse_r(0);
      for (int block = 0; block < 3; ++block) {
        Scalar grad_alpha(0);
        for (Index k = block_begin[block]; k < block_begin[block + 1]; ++k) {
          partial[k] += grad_logits[k];
          grad_alpha += grad_logits[k] * projections(r, k) * inverse_r;
          grad_inverse_r += grad_logits[k] * alpha[block] * projections(r, k);
          grad_logits[k] *= alpha[block] * inverse_r;
        }
        partial[count + block] += grad_alpha;
      }
      // 1/r = (mean(v^2) + epsilon)^(-1/2) of the token row v has the derivative
      // -(1/r)^3 v / (n*C).
      rms_factors[r] = -grad_inverse_r * inverse_r * inverse_r * inverse_r / static_cast<Scalar>(width);
    }

    // grad_x rows = dP phi^T + rms_factor * x, through the projection and then through 1/r.
    RowsMap grad_rows(grad_row_data, rows, width);
    grad_rows.noalias() = chunk_grad_projections * parameters.phi.transpose();
    for (Index r = 0; r < rows; ++r) {
      grad_rows.row(r) += rms_factors[r] * chunk_x.row(r);
      Storage* target = row_pointer<Storage>(grad_x, first + r);
      if constexpr (kConvert) {
        // The converted row r of x is no longer needed, so it receives the old gradient row.
        Scalar* old_gradient = converted_rows + r * width;
        if constexpr (kAccumulate) {
          kernels::convert_row(target, width, old_gradient);
          for (Index k = 0; k < width; ++k) grad_rows(r, k) += old_gradient[k];
        }
        kernels::convert_row(&grad_rows(r, 0), width, target);
      } else {
        Eigen::Map<RowVector<Scalar>> target_row(target, width);
        if constexpr (kAccumulate) {
          target_row += grad_rows.row(r);
        } else {
          target_row = grad_rows.row(r);
        }
      }
    }
  });
}

// Pass 2 of the coefficient backward: grad_phi = x^T grad_projections (K x M). Each task owns
// kPhiGradientRows rows of grad_phi and sums over the tokens in fixed steps, so no partial sums
// of grad_phi are stored: per chunk of 16 tokens they would be M / 16 times the size of x.
template <typename Storage, typename Scalar>
void coefficient_parameter_gradient(const ConstRowMatrixRef<Storage>& x, const Scalar* grad_projections,
                                    RowMatrix<Scalar>& grad_phi, Workspace<Storage, Scalar>& workspace) {
  namespace kernels = mhc::detail::fused;
  using ConstRowsMap = Eigen::Map<const RowMatrix<Scalar>, 0, Eigen::OuterStride<>>;
  constexpr bool kConvert = !std::is_same_v<Storage, Scalar>;
  const Index width = x.cols();
  const Index tokens = x.rows();
  const Index count = grad_phi.cols();
  const Eigen::Map<const RowMatrix<Scalar>> all_grad_projections(grad_projections, tokens, count);

  // Per worker (storage conversion only): a kPhiGradientTokens x kPhiGradientRows block of x.
  workspace.reserve_worker_buffers(kConvert ? kPhiGradientTokens * kPhiGradientRows : 0);

  const Index blocks = (width + kPhiGradientRows - 1) / kPhiGradientRows;
  mhc::detail::run_tasks(workspace.thread_pool(), blocks, [&](Index block, int worker) {
    const Index begin = block * kPhiGradientRows;
    const Index columns = std::min(width, begin + kPhiGradientRows) - begin;
    auto grad_rows = grad_phi.middleRows(begin, columns);
    grad_rows.setZero();
    for (Index first = 0; first < tokens; first += kPhiGradientTokens) {
      const Index rows = std::min(tokens, first + kPhiGradientTokens) - first;
      const Scalar* x_data = nullptr;
      Index x_stride = columns;
      if constexpr (kConvert) {
        Scalar* converted = workspace.worker_buffer(worker);
        for (Index r = 0; r < rows; ++r) {
          kernels::convert_row(row_pointer<Storage>(x, first + r) + begin, columns, converted + r * columns);
        }
        x_data = converted;
      } else {
        x_data = row_pointer<Storage>(x, first) + begin;
        x_stride = x.outerStride();
      }
      const ConstRowsMap x_block(x_data, rows, columns, Eigen::OuterStride<>(x_stride));
      grad_rows.noalias() += x_block.transpose() * all_grad_projections.middleRows(first, rows);
    }
  });
}

}  // namespace detail

// Computes the coefficients of every token of x (T x n*C) and the branch input
// h_in = H_pre x (T x C) in one pass over x. `coefficients` is resized to T rows (no allocation
// when it already has that shape). `branch_input` must be T x C and must not overlap x.
// Matches mhc::prepare_branch to rounding; see the file comment for types and threads.
template <typename Storage, typename Scalar>
void prepare_branch(const Parameters<Scalar>& parameters, const ConstRowMatrixRef<Storage>& x,
                    Coefficients<Scalar>& coefficients, RowMatrixRef<Storage> branch_input,
                    Workspace<Storage, Scalar>& workspace, const Options& options = {}) {
  const char* function = "mhc::fused::prepare_branch";
  mhc::detail::check_parameters(function, parameters);
  mhc::detail::check_options(function, options);
  detail::check_sinkhorn_options(function, options.sinkhorn);
  mhc::detail::check_state(function, "x", x, parameters.streams, parameters.channels);
  // NOTE: x is not scanned for NaN or infinity here, which would cost a second pass over it.
  // Non-finite x gives non-finite coefficients, where the reference compute_coefficients throws.
  mhc::detail::check_shape(function, "branch_input", branch_input, x.rows(), parameters.channels);
  detail::check_no_overlap(function, "branch_input", "x", branch_input, x);

  const int n = parameters.streams;
  coefficients.pre.resize(x.rows(), n);
  coefficients.post.resize(x.rows(), n);
  coefficients.res.resize(x.rows(), n * n);
  if (x.rows() == 0) return;

  detail::dispatch_streams(n, [&](auto fixed) {
    detail::prepare_branch_tokens<decltype(fixed)::value>(parameters, x, coefficients, branch_input, workspace,
                                                          options);
  });
}

// Writes x_next = H_res x + H_post^T h_out for every token: x and x_next are T x n*C,
// branch_output (h_out) is T x C, n = coefficients.pre.cols(). x_next must not overlap x or
// branch_output. Matches mhc::merge_streams to rounding.
template <typename Storage, typename Scalar>
void merge_streams(const Coefficients<Scalar>& coefficients, const ConstRowMatrixRef<Storage>& x,
                   const ConstRowMatrixRef<Storage>& branch_output, RowMatrixRef<Storage> x_next,
                   Workspace<Storage, Scalar>& workspace) {
  const char* function = "mhc::fused::merge_streams";
  const int n = mhc::detail::check_coefficients(function, coefficients, x.rows());
  mhc::detail::check_width_multiple(function, "x", x, n);
  const Eigen::Index channels = x.cols() / n;
  mhc::detail::check_shape(function, "branch_output", branch_output, x.rows(), channels);
  mhc::detail::check_shape(function, "x_next", x_next, x.rows(), x.cols());
  detail::check_no_overlap(function, "x_next", "x", x_next, x);
  detail::check_no_overlap(function, "x_next", "branch_output", x_next, branch_output);
  if (x.rows() == 0) return;

  detail::dispatch_streams(n, [&](auto fixed) {
    detail::merge_streams_tokens<decltype(fixed)::value>(coefficients, x, branch_output, x_next, workspace);
  });
}

// Writes x_next = H_res x + H_post^T branch(H_pre x) for every token, keeping the branch input
// and coefficients in the workspace. `branch` takes the T x C branch input (a
// const RowMatrix<Storage>&) and returns a T x C matrix of Storage; another shape throws.
template <typename Storage, typename Scalar, typename Branch>
void forward(const Parameters<Scalar>& parameters, const ConstRowMatrixRef<Storage>& x, Branch&& branch,
             RowMatrixRef<Storage> x_next, Workspace<Storage, Scalar>& workspace, const Options& options = {}) {
  mhc::detail::check_parameters("mhc::fused::forward", parameters);
  workspace.branch_input.resize(x.rows(), parameters.channels);
  prepare_branch(parameters, x, workspace.coefficients, workspace.branch_input, workspace, options);
  const RowMatrix<Storage> branch_output = std::forward<Branch>(branch)(std::as_const(workspace.branch_input));
  mhc::detail::check_shape("mhc::fused::forward", "branch output", branch_output, x.rows(), parameters.channels);
  merge_streams(workspace.coefficients, x, branch_output, x_next, workspace);
}

// Choice between overwriting grad_x and adding to it, for the backward kernels.
enum class GradientWrite {
  kOverwrite,  // grad_x = this kernel's share
  kAdd,        // grad_x += this kernel's share, to sum the paths of x through one layer
};

// Backward of fused::merge_streams in one pass over x, h_out and dx_next, given
// grad_x_next = dL/dx_next (T x n*C). Writes, for every token,
//   grad_x             T x n*C  H_res^T dx_next (the merge's share of dL/dx)
//   grad_branch_output T x C    sum_i H_post[i] dx_next[stream i]
//   grad_post          T x n    <dx_next[stream i], h_out>
//   grad_res           T x n*n  entry (i, j) is <dx_next[stream i], x[stream j]>
// grad_post and grad_res are resized (no allocation when they already have the shape). The
// output views must not overlap each other or the inputs. Matches mhc::merge_streams_backward to
// rounding.
template <typename Storage, typename Scalar>
void merge_streams_backward(const Coefficients<Scalar>& coefficients, const ConstRowMatrixRef<Storage>& x,
                            const ConstRowMatrixRef<Storage>& branch_output,
                            const ConstRowMatrixRef<Storage>& grad_x_next, RowMatrixRef<Storage> grad_x,
                            RowMatrixRef<Storage> grad_branch_output, RowMatrix<Scalar>& grad_post,
                            RowMatrix<Scalar>& grad_res, Workspace<Storage, Scalar>& workspace) {
  const char* function = "mhc::fused::merge_streams_backward";
  const int n = mhc::detail::check_coefficients(function, coefficients, x.rows());
  mhc::detail::check_width_multiple(function, "x", x, n);
  const Eigen::Index channels = x.cols() / n;
  mhc::detail::check_shape(function, "branch_output", branch_output, x.rows(), channels);
  mhc::detail::check_shape(function, "grad_x_next", grad_x_next, x.rows(), x.cols());
  mhc::detail::check_shape(function, "grad_x", grad_x, x.rows(), x.cols());
  mhc::detail::check_shape(function, "grad_branch_output", grad_branch_output, x.rows(), channels);
  const auto check_disjoint_from_inputs = [&](const char* output_name, const auto& output) {
    detail::check_no_overlap(function, output_name, "x", output, x);
    detail::check_no_overlap(function, output_name, "branch_output", output, branch_output);
    detail::check_no_overlap(function, output_name, "grad_x_next", output, grad_x_next);
  };
  check_disjoint_from_inputs("grad_x", grad_x);
  check_disjoint_from_inputs("grad_branch_output", grad_branch_output);
  detail::check_no_overlap(function, "grad_branch_output", "grad_x", grad_branch_output, grad_x);

  grad_post.resize(x.rows(), n);
  grad_res.resize(x.rows(), Eigen::Index(n) * n);
  if (x.rows() == 0) return;

  detail::dispatch_streams(n, [&](auto fixed) {
    detail::merge_streams_backward_tokens<decltype(fixed)::value>(coefficients, x, branch_output, grad_x_next, grad_x,
                                                                  grad_branch_output, grad_post, grad_res, workspace);
  });
}

// Backward of the aggregation h_in = H_pre x in one pass over x and dh_in, given
// grad_branch_input = dL/dh_in (T x C). Writes (or with GradientWrite::kAdd, adds) H_pre[i] dh_in
// to stream i of grad_x (T x n*C), and sets grad_pre (T x n, resized) to <dh_in, x[stream i]>.
// grad_x must not overlap x or grad_branch_input. Matches mhc::aggregate_streams_backward to
// rounding. grad_pre, like the merge's grad_post and grad_res, feeds the coefficient backward.
template <typename Storage, typename Scalar>
void aggregate_streams_backward(const Coefficients<Scalar>& coefficients, const ConstRowMatrixRef<Storage>& x,
                                const ConstRowMatrixRef<Storage>& grad_branch_input, RowMatrixRef<Storage> grad_x,
                                RowMatrix<Scalar>& grad_pre, Workspace<Storage, Scalar>& workspace,
                                GradientWrite write = GradientWrite::kOverwrite) {
  const char* function = "mhc::fused::aggregate_streams_backward";
  const int n = mhc::detail::check_coefficients(function, coefficients, x.rows());
  mhc::detail::check_width_multiple(function, "x", x, n);
  const Eigen::Index channels = x.cols() / n;
  mhc::detail::check_shape(function, "grad_branch_input", grad_branch_input, x.rows(), channels);
  mhc::detail::check_shape(function, "grad_x", grad_x, x.rows(), x.cols());
  detail::check_no_overlap(function, "grad_x", "x", grad_x, x);
  detail::check_no_overlap(function, "grad_x", "grad_branch_input", grad_x, grad_branch_input);

  grad_pre.resize(x.rows(), n);
  if (x.rows() == 0) return;

  detail::dispatch_streams(n, [&](auto fixed) {
    constexpr int kStreams = decltype(fixed)::value;
    if (write == GradientWrite::kAdd) {
      detail::aggregate_streams_backward_tokens<kStreams, true>(coefficients, x, grad_branch_input, grad_x, grad_pre,
                                                                workspace);
    } else {
      detail::aggregate_streams_backward_tokens<kStreams, false>(coefficients, x, grad_branch_input, grad_x, grad_pre,
                                                                 workspace);
    }
  });
}

// Backward of the coefficients H_pre, H_post, H_res that fused::prepare_branch computes from x
// (T x n*C). Their gradients are grad_pre (T x n), grad_post (T x n) and grad_res (T x n*n, row
// t is dL/dH_res of token t in row-major order). Recomputes x phi and 1/r from x and the
// Sinkhorn-Knopp iterates per token, so it needs no activations from the forward pass.
//   grad_x           T x n*C  this path's share of dL/dx. It is written, or added with
//                             GradientWrite::kAdd.
//   grad_parameters  phi (n*C x (n*n + 2n)), bias and the three alphas, overwritten. The fields
//                    streams and channels are copied from `parameters`.
// grad_x must not overlap x or the coefficient gradients, and grad_parameters must be another
// object than parameters. Matches mhc::compute_coefficients_backward to rounding, for any
// SinkhornOptions.
//
// Two passes: the first runs chunks of kChunkTokens tokens and writes grad_x, the gradient of
// the projections (T x (n*n + 2n), kept in the workspace) and per-chunk partial sums of the bias
// and alpha gradients, which are then added in chunk order. The second computes
// grad_phi = x^T (gradient of the projections) in fixed blocks of rows of grad_phi. Every sum has
// a fixed order, so the result is bitwise identical for any number of threads.
// NOTE: unlike mhc::compute_coefficients_backward, this kernel does not check x for NaN or
// infinity, and such entries give NaN gradients instead of an exception.
template <typename Storage, typename Scalar>
void coefficients_backward(const Parameters<Scalar>& parameters, const ConstRowMatrixRef<Storage>& x,
                           const ConstRowMatrixRef<Scalar>& grad_pre, const ConstRowMatrixRef<Scalar>& grad_post,
                           const ConstRowMatrixRef<Scalar>& grad_res, RowMatrixRef<Storage> grad_x,
                           Parameters<Scalar>& grad_parameters, Workspace<Storage, Scalar>& workspace,
                           const Options& options = {}, GradientWrite write = GradientWrite::kOverwrite) {
  const char* function = "mhc::fused::coefficients_backward";
  detail::check_coefficients_backward<Storage, Scalar>(function, parameters, x, grad_post, grad_res, grad_x, grad_parameters, options);
  const Eigen::Index tokens = x.rows();
  mhc::detail::check_shape(function, "grad_pre", grad_pre, tokens, parameters.streams);
  detail::check_no_overlap(function, "grad_x", "grad_pre", grad_x, grad_pre);

  const Eigen::Index count = parameters.coefficient_count();
  grad_parameters.streams = parameters.streams;
  grad_parameters.channels = parameters.channels;
  grad_parameters.phi.resize(x.cols(), count);
  grad_parameters.bias.resize(count);
  if (tokens == 0) {
    grad_parameters.phi.setZero();
    grad_parameters.bias.setZero();
    grad_parameters.alpha_pre = grad_parameters.alpha_post = grad_parameters.alpha_res = Scalar(0);
    return;
  }

  const Eigen::Index chunks = (tokens + kChunkTokens - 1) / kChunkTokens;
  Scalar* grad_projections = workspace.gradient_buffer(tokens * count + chunks * (count + 3));
  Scalar* partials = grad_projections + tokens * count;
  if (write == GradientWrite::kAdd) {
    detail::coefficients_backward_tokens<true>(parameters, x, grad_pre, grad_post, grad_res, grad_x,
                                               grad_projections, partials, workspace, options);
  } else {
    detail::coefficients_backward_tokens<false>(parameters, x, grad_pre, grad_post, grad_res, grad_x,
                                                grad_projections, partials, workspace, options);
  }

  // Partial sums in chunk order: bias gradient (count values), then alpha_pre, alpha_post, alpha_res.
  const Eigen::Map<const RowMatrix<Scalar>> chunk_partials(partials, chunks, count + 3);
  RowVector<Scalar> totals = chunk_partials.row(0);
  for (Eigen::Index chunk = 1; chunk < chunks; ++chunk) totals += chunk_partials.row(chunk);
  grad_parameters.bias = totals.head(count);
  grad_parameters.alpha_pre = totals(count);
  grad_parameters.alpha_post = totals(count + 1);
  grad_parameters.alpha_res = totals(count + 2);

  detail::coefficient_parameter_gradient(x, grad_projections, grad_parameters.phi, workspace);
}

// Backward of fused::prepare_branch: the aggregation h_in = H_pre x and the coefficients, given
// grad_branch_input = dL/dh_in (T x C) from the branch's backward and grad_post, grad_res from
// fused::merge_streams_backward. `coefficients` are those of the forward pass (they weight the
// aggregation's gradient). Writes (or with GradientWrite::kAdd, adds) to grad_x the aggregation's
// and the coefficients' shares of dL/dx, and overwrites grad_parameters as
// fused::coefficients_backward does. After merge_streams_backward has written its share to
// grad_x, GradientWrite::kAdd completes the layer's dL/dx; this matches
// mhc::prepare_branch_backward to rounding. Scratch: workspace.grad_pre.
// With bfloat16 storage grad_x is rounded once after each share.
template <typename Storage, typename Scalar>
void prepare_branch_backward(const Parameters<Scalar>& parameters, const ConstRowMatrixRef<Storage>& x,
                             const Coefficients<Scalar>& coefficients,
                             const ConstRowMatrixRef<Storage>& grad_branch_input,
                             const ConstRowMatrixRef<Scalar>& grad_post, const ConstRowMatrixRef<Scalar>& grad_res,
                             RowMatrixRef<Storage> grad_x, Parameters<Scalar>& grad_parameters,
                             Workspace<Storage, Scalar>& workspace, const Options& options = {},
                             GradientWrite write = GradientWrite::kOverwrite) {
  // Checks everything before aggregate_streams_backward writes to grad_x.
  const char* function = "mhc::fused::prepare_branch_backward";
  detail::check_coefficients_backward<Storage, Scalar>(function, parameters, x, grad_post, grad_res, grad_x, grad_parameters, options);
  mhc::detail::check_coefficients_shape(function, "coefficients", coefficients, x.rows(), parameters.streams);
  mhc::detail::check_shape(function, "grad_branch_input", grad_branch_input, x.rows(), parameters.channels);
  aggregate_streams_backward(coefficients, x, grad_branch_input, grad_x, workspace.grad_pre, workspace, write);
  coefficients_backward(parameters, x, workspace.grad_pre, grad_post, grad_res, grad_x, grad_parameters, workspace,
                        options, GradientWrite::kAdd);
}

}  // namespace mhc::fused
