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
// steps, and the gradient outputs too, allocates nothing per step in any kernel of this file
// except fused::forward, whose branch returns a new matrix. That is true while T stays the same,
// because the Coefficients, Projections and gradient matrices are resized to T rows.
// An output must not overlap an input. The kernels compare the address ranges of the views, so
// they also reject disjoint column blocks of one buffer whose rows interleave.
// NOTE: coefficients_backward and prepare_branch_backward allocate a solver per chunk of tokens
// for SinkhornGradient::implicit.
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
#include <atomic>
#include <cmath>
#include <functional>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

namespace mhc::fused {

// Tokens per task. Fixed, so the split of work never depends on the number of threads.
constexpr Eigen::Index kChunkTokens = 16;

// Choice between overwriting grad_x and adding to it, for the backward kernels.
enum class GradientWrite {
  kOverwrite,  // grad_x = this kernel's share
  kAdd,        // grad_x += this kernel's share, to sum the paths of x through one layer
};

// Values of the forward pass that the coefficient backward otherwise recomputes from x: per token
// the projection vec(x) phi (before the scale alpha / r) and 1/r. Keeping them costs
// T * (n*n + 2n + 1) values and saves fused::coefficients_backward one of its three products
// with phi.
template <typename Scalar>
struct Projections {
  RowMatrix<Scalar> values;                              // T x (n*n + 2n), columns [pre | post | res]
  Eigen::Matrix<Scalar, Eigen::Dynamic, 1> inverse_rms;  // T values of 1/r
};

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

  // Copy of phi^T for the coefficient backward, `size` values.
  Scalar* transposed_buffer(Eigen::Index size) { return grow(transposed_, size); }

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

  // merge_streams writes an x_next, and merge_streams_backward a grad_x, larger than this many
  // bytes with non-temporal stores, which skip reading each output line into the cache first.
  // The default is the last-level cache size that Eigen detects: a larger output is evicted
  // before anyone reads it back.
  std::ptrdiff_t streaming_threshold_bytes = Eigen::l3CacheSize();

  // Whether n = 2, 4 and 8 run the kernels compiled for that stream count. false runs the path
  // for a run-time n for every n, which the benchmarks and tests compare against.
  bool fixed_size_streams = true;

  // Storage of the branch input and coefficients for fused::forward.
  RowMatrix<Storage> branch_input;
  Coefficients<Scalar> coefficients;

 private:
  static Scalar* grow(Buffer& buffer, Eigen::Index size) {
    if (buffer.size() < static_cast<std::size_t>(size)) buffer.resize(static_cast<std::size_t>(size));
    return buffer.data();
  }

  ThreadPool* pool_ = nullptr;
  Buffer projection_;
  Buffer transposed_;
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
  if (options.gradient != SinkhornGradient::unrolled && options.gradient != SinkhornGradient::implicit) {
    mhc::detail::throw_invalid_argument(function, "options.sinkhorn.gradient",
                                        "SinkhornGradient::unrolled or implicit",
                                        mhc::detail::concat(static_cast<int>(options.gradient)));
  }
}

// Lowest index of a token whose row of x has a NaN or infinite entry, shared by the tasks of one
// call. The kernels detect such rows from their sum of squares, which they compute anyway, and
// throw after the parallel run because a task must not throw.
class NonFiniteRows {
 public:
  explicit NonFiniteRows(Index tokens) : none_(tokens), first_(tokens) {}

  void record(Index token) {
    Index current = first_.load(std::memory_order_relaxed);
    while (token < current && !first_.compare_exchange_weak(current, token, std::memory_order_relaxed)) {
    }
  }

  // Throws std::invalid_argument naming the first non-finite entry of x, if a task recorded one.
  template <typename Matrix>
  void throw_if_recorded(const char* function, const Matrix& x) const {
    const Index token = first_.load(std::memory_order_relaxed);
    if (token == none_) return;
    for (Index column = 0; column < x.cols(); ++column) {
      const double value = static_cast<double>(x(token, column));
      if (!std::isfinite(value)) {
        mhc::detail::throw_invalid_argument(function, "x", "finite entries",
                                            mhc::detail::concat(value, " at (", token, ", ", column, ")"));
      }
    }
  }

 private:
  Index none_;
  std::atomic<Index> first_;
};

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

// The scalars that turn a token's projection into its coefficients.
template <typename Scalar>
mhc::detail::fused::CoefficientRule<Scalar> coefficient_rule(const Parameters<Scalar>& parameters, Index width,
                                                             const Options& options) {
  mhc::detail::fused::CoefficientRule<Scalar> rule;
  rule.bias = parameters.bias.data();
  rule.alpha_pre = parameters.alpha_pre;
  rule.alpha_post = parameters.alpha_post;
  rule.alpha_res = parameters.alpha_res;
  rule.rms_epsilon = options.rms_epsilon;
  rule.width = width;
  rule.sinkhorn = options.sinkhorn;
  return rule;
}

// Points rows[0..kGroupTokens) at the rows of x for tokens first .. first + group - 1, in Scalar:
// converted into `converted_rows` (kGroupTokens rows of x.cols() values) when Storage differs
// from Scalar. A partial group repeats row 0 in the unused slots, whose results the caller
// ignores.
template <typename Storage, typename Scalar>
void load_group_rows(const ConstRowMatrixRef<Storage>& x, Index first, int group, Scalar* converted_rows,
                     const Scalar** rows) {
  const Index width = x.cols();
  for (int r = 0; r < group; ++r) {
    if constexpr (!std::is_same_v<Storage, Scalar>) {
      Scalar* row = converted_rows + r * width;
      mhc::detail::fused::convert_row(row_pointer<Storage>(x, first + r), width, row);
      rows[r] = row;
    } else {
      rows[r] = row_pointer<Storage>(x, first + r);
    }
  }
  for (int r = group; r < mhc::detail::fused::kGroupTokens; ++r) rows[r] = rows[0];
}

template <int N, typename Storage, typename Scalar>
void prepare_branch_tokens(const Parameters<Scalar>& parameters, const ConstRowMatrixRef<Storage>& x,
                           Coefficients<Scalar>& coefficients, RowMatrixRef<Storage>& branch_input,
                           Projections<Scalar>* kept, Workspace<Storage, Scalar>& workspace, const Options& options,
                           NonFiniteRows& non_finite) {
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

  const kernels::CoefficientRule<Scalar> rule = coefficient_rule(parameters, width, options);

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
      load_group_rows<Storage>(x, first, group, converted_rows, rows);
      kernels::project_group(rows, layout, packed, projections);

      for (int r = 0; r < group; ++r) {
        const Index t = first + r;
        Scalar* pre = coefficients.pre.data() + t * n;
        Scalar* post = coefficients.post.data() + t * n;
        Scalar* res = coefficients.res.data() + t * n * n;
        const Scalar inverse_r = kernels::token_inverse_rms(rows[r], width, rule.rms_epsilon);
        if (std::isnan(inverse_r)) non_finite.record(t);
        if (kept != nullptr) {
          std::copy(projections + r * padded, projections + r * padded + count, kept->values.data() + t * count);
          kept->inverse_rms(t) = inverse_r;
        }
        kernels::token_coefficients<N>(projections + r * padded, inverse_r, n, rule, pre, post, res);
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

  // A grad_x larger than the threshold is written with non-temporal stores, as merge_streams
  // writes x_next. Storage conversion writes through a buffer and never streams.
  const double gradient_bytes = double(tokens) * double(width) * sizeof(Storage);
  const bool stream = !kConvert && gradient_bytes > double(workspace.streaming_threshold_bytes);

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
        kernels::merge_row_backward<N, false>(state, n, channels, output, res, post, grad_next, state_gradient,
                                              output_gradient, post_gradient, res_gradient, partial_sums);
        kernels::convert_row(state_gradient, width, row_pointer<Storage>(grad_x, t));
        kernels::convert_row(output_gradient, channels, row_pointer<Storage>(grad_branch_output, t));
      } else {
        const auto run = [&](auto stream) {
          kernels::merge_row_backward<N, decltype(stream)::value>(
              row_pointer<Storage>(x, t), n, channels, row_pointer<Storage>(branch_output, t), res, post,
              row_pointer<Storage>(grad_x_next, t), row_pointer<Storage>(grad_x, t),
              row_pointer<Storage>(grad_branch_output, t), post_gradient, res_gradient, partial_sums);
        };
        if (stream) {
          run(std::true_type{});
        } else {
          run(std::false_type{});
        }
      }
    }
    if (stream) kernels::stream_fence();
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

// Buffers of one coefficient backward call, shared by its tasks.
template <typename Scalar>
struct BackwardBuffers {
  mhc::detail::fused::ProjectionLayout layout;
  const Scalar* packed = nullptr;      // phi packed for the projection (unused with kept projections)
  const Scalar* transposed = nullptr;  // phi^T, packed by pack_transposed
  Scalar* grad_projections = nullptr;  // T x layout.padded, zero beyond column M
  Scalar* partials = nullptr;          // chunks x (M + 3): bias and alpha gradients per chunk
};

// The aggregation h_in = H_pre x, whose backward fused::prepare_branch_backward runs in the first
// pass of the coefficient backward.
template <typename Storage, typename Scalar>
struct AggregationBackward {
  const Coefficients<Scalar>* coefficients = nullptr;              // of the forward pass
  const ConstRowMatrixRef<Storage>* grad_branch_input = nullptr;  // dL/dh_in, T x C
};

// Rows of grad phi per task and tokens per step of coefficient_parameter_gradient. Both are
// fixed, so the order of every sum is independent of the number of threads.
constexpr Index kPhiGradientRows = 256;
constexpr Index kPhiGradientTokens = 128;

// Pass 1 of the coefficient backward, over chunks of kChunkTokens tokens in groups of
// kGroupTokens. Per token it takes the projections x phi and 1/r from `kept`, or recomputes
// them, and backpropagates through the sigmoids, the Sinkhorn-Knopp rounds and the scale
// alpha / r into the gradient of the projections, stored in buffers.grad_projections. Per group
// it writes (or adds) the rows of grad_x, dP phi^T plus the term of 1/r, and per chunk it stores
// the partial sums of the bias and alpha gradients in buffers.partials.
// With `aggregation`, each token first runs the aggregation's backward on its row, which is then
// in cache: that writes (or adds) H_pre[i] dh_in to stream i of grad_x and yields the token's
// dL/dH_pre, so `grad_pre` is unused (null). Without it, `grad_pre` gives dL/dH_pre.
template <bool kAccumulate, typename Storage, typename Scalar>
void coefficients_backward_tokens(const Parameters<Scalar>& parameters, const ConstRowMatrixRef<Storage>& x,
                                  const Projections<Scalar>* kept,
                                  const AggregationBackward<Storage, Scalar>* aggregation,
                                  const ConstRowMatrixRef<Scalar>* grad_pre, const ConstRowMatrixRef<Scalar>& grad_post,
                                  const ConstRowMatrixRef<Scalar>& grad_res, RowMatrixRef<Storage>& grad_x,
                                  const BackwardBuffers<Scalar>& buffers, NonFiniteRows& non_finite,
                                  Workspace<Storage, Scalar>& workspace, const Options& options) {
  namespace kernels = mhc::detail::fused;
  constexpr bool kConvert = !std::is_same_v<Storage, Scalar>;
  constexpr int G = kernels::kGroupTokens;
  const int n = parameters.streams;
  const Index width = x.cols();
  const Index count = parameters.coefficient_count();
  const Index padded = buffers.layout.padded;
  const Index tokens = x.rows();

  const kernels::CoefficientRule<Scalar> rule = coefficient_rule(parameters, width, options);
  const Index channels = parameters.channels;

  // Per worker: the group's rows of x and of grad_x in Scalar (storage conversion only) and the
  // group's projections. Then a zero projection gradient and a spare output row for the unused
  // slots of a partial group, and the Sinkhorn scratch. Last, for the aggregation, the group's
  // dL/dH_pre and one row of dL/dh_in in Scalar.
  const Index row_values = kConvert ? G * width : 0;
  const Index scratch_values = kernels::logit_gradient_scratch_size(n, options.sinkhorn);
  const Index aggregation_values = aggregation != nullptr ? G * n + channels : 0;
  workspace.reserve_worker_buffers(2 * row_values + G * padded + padded + width + scratch_values +
                                   aggregation_values);

  const bool implicit = options.sinkhorn.gradient == SinkhornGradient::implicit;
  const Index chunks = (tokens + kChunkTokens - 1) / kChunkTokens;
  mhc::detail::run_tasks(workspace.thread_pool(), chunks, [&](Index chunk, int worker) {
    Scalar* converted_rows = workspace.worker_buffer(worker);
    Scalar* converted_gradients = converted_rows + row_values;
    Scalar* projection_data = converted_gradients + row_values;
    Scalar* zero_gradient = projection_data + G * padded;
    Scalar* spare_row = zero_gradient + padded;
    Scalar* scratch = spare_row + width;
    Scalar* aggregated_pre = scratch + scratch_values;
    Scalar* converted_input = aggregated_pre + G * n;
    // NOTE: the implicit gradient allocates its solver's buffers once per chunk.
    std::optional<mhc::detail::ImplicitGradientSolver<Scalar>> solver;
    if (implicit) solver.emplace(n);

    Scalar* partial = buffers.partials + chunk * (count + 3);
    std::fill(partial, partial + count + 3, Scalar(0));
    const Index chunk_end = std::min(tokens, (chunk + 1) * kChunkTokens);
    for (Index first = chunk * kChunkTokens; first < chunk_end; first += G) {
      const int group = static_cast<int>(std::min<Index>(G, chunk_end - first));
      const Scalar* rows[G];
      const Scalar* gradients[G];
      Scalar* outputs[G];
      Scalar scales[G];
      Scalar inverse_rms[G];
      load_group_rows<Storage>(x, first, group, converted_rows, rows);
      if (kept == nullptr) kernels::project_group(rows, buffers.layout, buffers.packed, projection_data);

      for (int r = 0; r < group; ++r) {
        const Index t = first + r;
        if constexpr (kConvert) {
          outputs[r] = converted_gradients + r * width;
          if constexpr (kAccumulate) kernels::convert_row(row_pointer<Storage>(grad_x, t), width, outputs[r]);
        } else {
          outputs[r] = row_pointer<Storage>(grad_x, t);
        }
        const Scalar* token_grad_pre = nullptr;
        if (aggregation != nullptr) {
          const Scalar* input_gradient = nullptr;
          if constexpr (kConvert) {
            kernels::convert_row(row_pointer<Storage>(*aggregation->grad_branch_input, t), channels, converted_input);
            input_gradient = converted_input;
          } else {
            input_gradient = row_pointer<Storage>(*aggregation->grad_branch_input, t);
          }
          Scalar* pre_gradient = aggregated_pre + r * n;
          kernels::aggregate_row_backward<0, kAccumulate>(rows[r], n, channels,
                                                          aggregation->coefficients->pre.data() + t * n,
                                                          input_gradient, outputs[r], pre_gradient);
          token_grad_pre = pre_gradient;
        } else {
          token_grad_pre = row_pointer<Scalar>(*grad_pre, t);
        }

        const Scalar* projection = projection_data + r * padded;
        Scalar inverse_r(0);
        if (kept != nullptr) {
          projection = kept->values.data() + t * count;
          inverse_r = kept->inverse_rms(t);
        } else {
          inverse_r = kernels::token_inverse_rms(rows[r], width, rule.rms_epsilon);
          if (std::isnan(inverse_r)) non_finite.record(t);
        }
        Scalar* grad_logits = buffers.grad_projections + t * padded;
        kernels::token_logit_gradient(projection, inverse_r, token_grad_pre,
                                      row_pointer<Scalar>(grad_post, t), row_pointer<Scalar>(grad_res, t), n, rule,
                                      scratch, solver ? &*solver : nullptr, grad_logits);
        std::fill(grad_logits + count, grad_logits + padded, Scalar(0));

        scales[r] = kernels::scale_logit_gradient(projection, inverse_r, rule, n, width, grad_logits, partial);
        inverse_rms[r] = inverse_r;
        gradients[r] = grad_logits;
      }
      if (group < G) {
        std::fill(zero_gradient, zero_gradient + padded, Scalar(0));
        std::fill(spare_row, spare_row + width, Scalar(0));
      }
      for (int r = group; r < G; ++r) {
        gradients[r] = zero_gradient;
        scales[r] = Scalar(0);
        inverse_rms[r] = Scalar(0);
        outputs[r] = spare_row;
      }

      // After the aggregation's share, the outputs hold values to add to even when overwriting.
      if (kAccumulate || aggregation != nullptr) {
        kernels::backproject_group<true>(gradients, count, buffers.transposed, width, rows, scales, inverse_rms,
                                         outputs);
      } else {
        kernels::backproject_group<false>(gradients, count, buffers.transposed, width, rows, scales, inverse_rms,
                                          outputs);
      }
      if constexpr (kConvert) {
        for (int r = 0; r < group; ++r) kernels::convert_row(outputs[r], width, row_pointer<Storage>(grad_x, first + r));
      }
    }
  });
}

// Pass 2 of the coefficient backward: grad_phi = x^T grad_projections (K x M). Each task owns
// kPhiGradientRows rows of grad_phi and adds the tokens to them in steps of kPhiGradientTokens,
// packing each step's block of x first. Every entry adds its tokens in order, so the result does
// not depend on the number of threads and no partial sums of grad_phi are stored. Per chunk of 16
// tokens they would take M / 16 times the size of x.
template <typename Storage, typename Scalar>
void coefficient_parameter_gradient(const ConstRowMatrixRef<Storage>& x, const BackwardBuffers<Scalar>& buffers,
                                    RowMatrix<Scalar>& grad_phi, Workspace<Storage, Scalar>& workspace) {
  namespace kernels = mhc::detail::fused;
  const Index width = x.cols();
  const Index tokens = x.rows();
  const Index count = grad_phi.cols();
  const Index padded = buffers.layout.padded;

  // Per worker: one step of the block of x, packed, and the block's rows of grad_phi padded to
  // whole packets.
  const Index block_values = kPhiGradientTokens * kPhiGradientRows;
  workspace.reserve_worker_buffers(block_values + kPhiGradientRows * padded);

  const Index blocks = (width + kPhiGradientRows - 1) / kPhiGradientRows;
  mhc::detail::run_tasks(workspace.thread_pool(), blocks, [&](Index block, int worker) {
    Scalar* packed_x = workspace.worker_buffer(worker);
    Scalar* sums = packed_x + block_values;
    const Index begin = block * kPhiGradientRows;
    const Index rows = std::min(width, begin + kPhiGradientRows) - begin;
    std::fill(sums, sums + rows * padded, Scalar(0));
    for (Index first = 0; first < tokens; first += kPhiGradientTokens) {
      const Index step = std::min(tokens, first + kPhiGradientTokens) - first;
      kernels::pack_gradient_block(row_pointer<Storage>(x, first) + begin, x.outerStride(), step, rows, packed_x);
      kernels::accumulate_phi_gradient(packed_x, rows, step, buffers.grad_projections + first * padded, buffers.layout,
                                       sums);
    }
    for (Index i = 0; i < rows; ++i) {
      grad_phi.row(begin + i) = Eigen::Map<const RowVector<Scalar>>(sums + i * padded, count);
    }
  });
}

// The coefficient backward behind the overloads of fused::coefficients_backward and
// fused::prepare_branch_backward. `kept` is null when the projections are to be recomputed from
// x, and `aggregation` null when grad_pre is given instead (see coefficients_backward_tokens).
template <typename Storage, typename Scalar>
void coefficients_backward(const char* function, const Parameters<Scalar>& parameters,
                           const ConstRowMatrixRef<Storage>& x, const Projections<Scalar>* kept,
                           const AggregationBackward<Storage, Scalar>* aggregation,
                           const ConstRowMatrixRef<Scalar>* grad_pre, const ConstRowMatrixRef<Scalar>& grad_post,
                           const ConstRowMatrixRef<Scalar>& grad_res, RowMatrixRef<Storage>& grad_x,
                           Parameters<Scalar>& grad_parameters, Workspace<Storage, Scalar>& workspace,
                           const Options& options, GradientWrite write) {
  namespace kernels = mhc::detail::fused;
  const Index tokens = x.rows();
  const Index width = x.cols();
  const Index count = parameters.coefficient_count();
  grad_parameters.streams = parameters.streams;
  grad_parameters.channels = parameters.channels;
  grad_parameters.phi.resize(width, count);
  grad_parameters.bias.resize(count);
  if (tokens == 0) {
    grad_parameters.phi.setZero();
    grad_parameters.bias.setZero();
    grad_parameters.alpha_pre = grad_parameters.alpha_post = grad_parameters.alpha_res = Scalar(0);
    return;
  }

  BackwardBuffers<Scalar> buffers;
  buffers.layout = kernels::projection_layout<Scalar>(width, count);
  if (kept == nullptr) {
    Scalar* packed = workspace.projection_buffer(buffers.layout.packed_size());
    kernels::pack_projection(parameters.phi, buffers.layout, packed);
    buffers.packed = packed;
  }
  Scalar* transposed = workspace.transposed_buffer(count * width);
  kernels::pack_transposed(parameters.phi, transposed);
  buffers.transposed = transposed;
  const Index chunks = (tokens + kChunkTokens - 1) / kChunkTokens;
  buffers.grad_projections = workspace.gradient_buffer(tokens * buffers.layout.padded + chunks * (count + 3));
  buffers.partials = buffers.grad_projections + tokens * buffers.layout.padded;

  NonFiniteRows non_finite(tokens);
  if (write == GradientWrite::kAdd) {
    coefficients_backward_tokens<true>(parameters, x, kept, aggregation, grad_pre, grad_post, grad_res, grad_x,
                                       buffers, non_finite, workspace, options);
  } else {
    coefficients_backward_tokens<false>(parameters, x, kept, aggregation, grad_pre, grad_post, grad_res, grad_x,
                                        buffers, non_finite, workspace, options);
  }
  non_finite.throw_if_recorded(function, x);

  // Partial sums in chunk order: bias gradient (count values), then alpha_pre, alpha_post,
  // alpha_res. They are added in place, so a call allocates nothing once the outputs have their
  // shapes.
  const Eigen::Map<const RowMatrix<Scalar>> chunk_partials(buffers.partials, chunks, count + 3);
  grad_parameters.bias = chunk_partials.row(0).head(count);
  Scalar alphas[3] = {chunk_partials(0, count), chunk_partials(0, count + 1), chunk_partials(0, count + 2)};
  for (Index chunk = 1; chunk < chunks; ++chunk) {
    grad_parameters.bias += chunk_partials.row(chunk).head(count);
    for (int k = 0; k < 3; ++k) alphas[k] += chunk_partials(chunk, count + k);
  }
  grad_parameters.alpha_pre = alphas[0];
  grad_parameters.alpha_post = alphas[1];
  grad_parameters.alpha_res = alphas[2];

  coefficient_parameter_gradient(x, buffers, grad_parameters.phi, workspace);
}

template <typename Scalar>
void check_projections(const char* function, const Projections<Scalar>& projections, Index tokens, Index count) {
  mhc::detail::check_shape(function, "projections.values", projections.values, tokens, count);
  if (projections.inverse_rms.size() != tokens) {
    mhc::detail::throw_invalid_argument(function, "projections.inverse_rms", mhc::detail::concat(tokens, " values"),
                                        mhc::detail::concat(projections.inverse_rms.size(), " values"));
  }
}

// The forward pass before the branch behind both overloads of fused::prepare_branch; `kept` is
// null when the projections are not kept.
template <typename Storage, typename Scalar>
void prepare_branch(const char* function, const Parameters<Scalar>& parameters, const ConstRowMatrixRef<Storage>& x,
                    Coefficients<Scalar>& coefficients, Projections<Scalar>* kept, RowMatrixRef<Storage>& branch_input,
                    Workspace<Storage, Scalar>& workspace, const Options& options) {
  mhc::detail::check_parameters(function, parameters);
  mhc::detail::check_options(function, options);
  check_sinkhorn_options(function, options.sinkhorn);
  mhc::detail::check_state(function, "x", x, parameters.streams, parameters.channels);
  mhc::detail::check_shape(function, "branch_input", branch_input, x.rows(), parameters.channels);
  check_no_overlap(function, "branch_input", "x", branch_input, x);

  const int n = parameters.streams;
  coefficients.pre.resize(x.rows(), n);
  coefficients.post.resize(x.rows(), n);
  coefficients.res.resize(x.rows(), n * n);
  if (kept != nullptr) {
    kept->values.resize(x.rows(), parameters.coefficient_count());
    kept->inverse_rms.resize(x.rows());
  }
  if (x.rows() == 0) return;

  NonFiniteRows non_finite(x.rows());
  dispatch_streams(workspace.fixed_size_streams ? n : 0, [&](auto fixed) {
    prepare_branch_tokens<decltype(fixed)::value>(parameters, x, coefficients, branch_input, kept, workspace, options,
                                                  non_finite);
  });
  non_finite.throw_if_recorded(function, x);
}

// The backward before the branch behind both overloads of fused::prepare_branch_backward.
// Checks every argument before anything is written.
template <typename Storage, typename Scalar>
void prepare_branch_backward(const char* function, const Parameters<Scalar>& parameters,
                             const ConstRowMatrixRef<Storage>& x, const Projections<Scalar>* kept,
                             const Coefficients<Scalar>& coefficients,
                             const ConstRowMatrixRef<Storage>& grad_branch_input,
                             const ConstRowMatrixRef<Scalar>& grad_post, const ConstRowMatrixRef<Scalar>& grad_res,
                             RowMatrixRef<Storage>& grad_x, Parameters<Scalar>& grad_parameters,
                             Workspace<Storage, Scalar>& workspace, const Options& options, GradientWrite write) {
  check_coefficients_backward<Storage, Scalar>(function, parameters, x, grad_post, grad_res, grad_x, grad_parameters,
                                               options);
  mhc::detail::check_coefficients_shape(function, "coefficients", coefficients, x.rows(), parameters.streams);
  mhc::detail::check_shape(function, "grad_branch_input", grad_branch_input, x.rows(), parameters.channels);
  check_no_overlap(function, "grad_x", "grad_branch_input", grad_x, grad_branch_input);
  if (kept != nullptr) check_projections(function, *kept, x.rows(), parameters.coefficient_count());

  AggregationBackward<Storage, Scalar> aggregation;
  aggregation.coefficients = &coefficients;
  aggregation.grad_branch_input = &grad_branch_input;
  const ConstRowMatrixRef<Scalar>* const no_grad_pre = nullptr;
  coefficients_backward(function, parameters, x, kept, &aggregation, no_grad_pre, grad_post, grad_res, grad_x,
                        grad_parameters, workspace, options, write);
}

}  // namespace detail

// Computes the coefficients of every token of x (T x n*C) and the branch input
// h_in = H_pre x (T x C) in one pass over x. `coefficients` is resized to T rows (no allocation
// when it already has that shape). `branch_input` must be T x C and must not overlap x.
// Matches mhc::prepare_branch to rounding; see the file comment for types and threads.
// A NaN or infinite entry of x throws std::invalid_argument, as in mhc::compute_coefficients,
// but only after the pass, so the outputs are then partly written.
// NOTE: x phi is computed in Scalar. Finite float rows large enough to overflow it (entries near
// 1e37 with phi of order 1) give NaN coefficients here without an exception.
template <typename Storage, typename Scalar>
void prepare_branch(const Parameters<Scalar>& parameters, const ConstRowMatrixRef<Storage>& x,
                    Coefficients<Scalar>& coefficients, RowMatrixRef<Storage> branch_input,
                    Workspace<Storage, Scalar>& workspace, const Options& options = {}) {
  Projections<Scalar>* const no_projections = nullptr;
  detail::prepare_branch("mhc::fused::prepare_branch", parameters, x, coefficients, no_projections, branch_input,
                         workspace, options);
}

// As above, and keeps each token's projection and 1/r in `projections` (resized to T rows) for
// the overloads of fused::coefficients_backward and fused::prepare_branch_backward that take
// them.
template <typename Storage, typename Scalar>
void prepare_branch(const Parameters<Scalar>& parameters, const ConstRowMatrixRef<Storage>& x,
                    Coefficients<Scalar>& coefficients, Projections<Scalar>& projections,
                    RowMatrixRef<Storage> branch_input, Workspace<Storage, Scalar>& workspace,
                    const Options& options = {}) {
  detail::prepare_branch("mhc::fused::prepare_branch", parameters, x, coefficients, &projections, branch_input,
                         workspace, options);
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

  detail::dispatch_streams(workspace.fixed_size_streams ? n : 0, [&](auto fixed) {
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
  if (&grad_post == &grad_res) {
    mhc::detail::throw_invalid_argument(function, "grad_res", "an object other than grad_post", "the same object");
  }

  grad_post.resize(x.rows(), n);
  grad_res.resize(x.rows(), Eigen::Index(n) * n);
  if (x.rows() == 0) return;

  detail::dispatch_streams(workspace.fixed_size_streams ? n : 0, [&](auto fixed) {
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

  detail::dispatch_streams(workspace.fixed_size_streams ? n : 0, [&](auto fixed) {
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
// SinkhornOptions. A NaN or infinite entry of x throws std::invalid_argument after the first
// pass, which has then written grad_x.
//
// Two passes: the first runs chunks of kChunkTokens tokens and writes grad_x, the gradient of
// the projections (kept in the workspace) and per-chunk partial sums of the bias and alpha
// gradients, which are then added in chunk order. The second computes
// grad_phi = x^T (gradient of the projections) in fixed blocks of rows of grad_phi. Every sum has
// a fixed order, so the result is bitwise identical for any number of threads.
template <typename Storage, typename Scalar>
void coefficients_backward(const Parameters<Scalar>& parameters, const ConstRowMatrixRef<Storage>& x,
                           const ConstRowMatrixRef<Scalar>& grad_pre, const ConstRowMatrixRef<Scalar>& grad_post,
                           const ConstRowMatrixRef<Scalar>& grad_res, RowMatrixRef<Storage> grad_x,
                           Parameters<Scalar>& grad_parameters, Workspace<Storage, Scalar>& workspace,
                           const Options& options = {}, GradientWrite write = GradientWrite::kOverwrite) {
  const char* function = "mhc::fused::coefficients_backward";
  detail::check_coefficients_backward<Storage, Scalar>(function, parameters, x, grad_post, grad_res, grad_x,
                                                       grad_parameters, options);
  mhc::detail::check_shape(function, "grad_pre", grad_pre, x.rows(), parameters.streams);
  detail::check_no_overlap(function, "grad_x", "grad_pre", grad_x, grad_pre);
  const Projections<Scalar>* const recompute = nullptr;
  const detail::AggregationBackward<Storage, Scalar>* const no_aggregation = nullptr;
  detail::coefficients_backward(function, parameters, x, recompute, no_aggregation, &grad_pre, grad_post, grad_res,
                                grad_x, grad_parameters, workspace, options, write);
}

// As above, with the projections and 1/r that fused::prepare_branch kept for this x, which
// saves recomputing x phi. The result is the same to rounding.
// NOTE: only the shapes of `projections` are checked. Projections of another x give wrong
// gradients, and since this overload does not compute the sum of squares, it does not detect a
// NaN or infinite entry of x (the forward pass that kept the projections rejected them).
template <typename Storage, typename Scalar>
void coefficients_backward(const Parameters<Scalar>& parameters, const ConstRowMatrixRef<Storage>& x,
                           const Projections<Scalar>& projections, const ConstRowMatrixRef<Scalar>& grad_pre,
                           const ConstRowMatrixRef<Scalar>& grad_post, const ConstRowMatrixRef<Scalar>& grad_res,
                           RowMatrixRef<Storage> grad_x, Parameters<Scalar>& grad_parameters,
                           Workspace<Storage, Scalar>& workspace, const Options& options = {},
                           GradientWrite write = GradientWrite::kOverwrite) {
  const char* function = "mhc::fused::coefficients_backward";
  detail::check_coefficients_backward<Storage, Scalar>(function, parameters, x, grad_post, grad_res, grad_x,
                                                       grad_parameters, options);
  mhc::detail::check_shape(function, "grad_pre", grad_pre, x.rows(), parameters.streams);
  detail::check_no_overlap(function, "grad_x", "grad_pre", grad_x, grad_pre);
  detail::check_projections(function, projections, x.rows(), parameters.coefficient_count());
  const detail::AggregationBackward<Storage, Scalar>* const no_aggregation = nullptr;
  detail::coefficients_backward(function, parameters, x, &projections, no_aggregation, &grad_pre, grad_post,
                                grad_res, grad_x, grad_parameters, workspace, options, write);
}

// Backward of fused::prepare_branch: the aggregation h_in = H_pre x and the coefficients, given
// grad_branch_input = dL/dh_in (T x C) from the branch's backward and grad_post, grad_res from
// fused::merge_streams_backward. `coefficients` are those of the forward pass (they weight the
// aggregation's gradient). Writes (or with GradientWrite::kAdd, adds) to grad_x the aggregation's
// and the coefficients' shares of dL/dx, and overwrites grad_parameters as
// fused::coefficients_backward does. After merge_streams_backward has written its share to
// grad_x, GradientWrite::kAdd completes the layer's dL/dx; this matches
// mhc::prepare_branch_backward to rounding.
// The aggregation's backward runs inside the first pass of the coefficient backward, so x and
// grad_x are read once for both. With bfloat16 storage grad_x is rounded once.
template <typename Storage, typename Scalar>
void prepare_branch_backward(const Parameters<Scalar>& parameters, const ConstRowMatrixRef<Storage>& x,
                             const Coefficients<Scalar>& coefficients,
                             const ConstRowMatrixRef<Storage>& grad_branch_input,
                             const ConstRowMatrixRef<Scalar>& grad_post, const ConstRowMatrixRef<Scalar>& grad_res,
                             RowMatrixRef<Storage> grad_x, Parameters<Scalar>& grad_parameters,
                             Workspace<Storage, Scalar>& workspace, const Options& options = {},
                             GradientWrite write = GradientWrite::kOverwrite) {
  const Projections<Scalar>* const recompute = nullptr;
  detail::prepare_branch_backward("mhc::fused::prepare_branch_backward", parameters, x, recompute, coefficients,
                                  grad_branch_input, grad_post, grad_res, grad_x, grad_parameters, workspace, options,
                                  write);
}

// As above, with the projections that fused::prepare_branch kept for this x (see the
// coefficients_backward overload that takes them).
template <typename Storage, typename Scalar>
void prepare_branch_backward(const Parameters<Scalar>& parameters, const ConstRowMatrixRef<Storage>& x,
                             const Projections<Scalar>& projections, const Coefficients<Scalar>& coefficients,
                             const ConstRowMatrixRef<Storage>& grad_branch_input,
                             const ConstRowMatrixRef<Scalar>& grad_post, const ConstRowMatrixRef<Scalar>& grad_res,
                             RowMatrixRef<Storage> grad_x, Parameters<Scalar>& grad_parameters,
                             Workspace<Storage, Scalar>& workspace, const Options& options = {},
                             GradientWrite write = GradientWrite::kOverwrite) {
  detail::prepare_branch_backward("mhc::fused::prepare_branch_backward", parameters, x, &projections, coefficients,
                                  grad_branch_input, grad_post, grad_res, grad_x, grad_parameters, workspace, options,
                                  write);
}

}  // namespace mhc::fused
