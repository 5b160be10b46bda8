// Fused kernels against the reference kernels of layer.hpp and layer_backward.hpp, over storage
// types, shapes, views and thread counts.
#include <mhc/fused.hpp>
#include <mhc/layer_backward.hpp>

#include "support.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

using mhc::RowMatrix;
using mhc::test::tolerance;

// Parameter type paired with each storage type: float for float and bfloat16, double for double.
template <typename Storage>
using ParameterScalar = std::conditional_t<std::is_same_v<Storage, double>, double, float>;

template <typename Storage>
double storage_epsilon() {
  return static_cast<double>(Eigen::NumTraits<Storage>::epsilon());
}

struct Shape {
  int streams;
  int channels;
  Eigen::Index tokens;
};

// Every n and C of the table at T = 0, 1 and 5, then T = 257 (several chunks and a partial
// group) for a few shapes, kept small so that the sanitizer build stays fast.
std::vector<Shape> shape_table() {
  std::vector<Shape> shapes;
  for (int n : {1, 2, 3, 4, 8, 16, 32}) {
    for (int c : {1, 3, 17, 33, 100}) {
      for (Eigen::Index t : {0, 1, 5}) shapes.push_back({n, c, t});
    }
  }
  for (int n : {1, 3, 4, 8}) shapes.push_back({n, 33, 257});
  return shapes;
}

// Parameters whose coefficients vary from token to token: phi scaled so that vec(x) phi / r is
// about N(0, 1), alphas near 1 and random biases.
template <typename Scalar>
mhc::Parameters<Scalar> random_parameters(int n, int channels, std::uint32_t seed) {
  mhc::Parameters<Scalar> parameters;
  parameters.streams = n;
  parameters.channels = channels;
  const int count = parameters.coefficient_count();
  parameters.phi = mhc::test::random_matrix<Scalar>(Eigen::Index(n) * channels, count, seed,
                                                    1.0 / std::sqrt(double(n) * channels));
  parameters.bias = mhc::test::random_matrix<Scalar>(1, count, seed + 1, 1.0);
  parameters.alpha_pre = Scalar(1.0);
  parameters.alpha_post = Scalar(0.7);
  parameters.alpha_res = Scalar(1.3);
  return parameters;
}

// Random parameters of the last (n, C) requested, regenerated only when the shape changes: phi
// of the larger shapes takes longer to draw than the kernels take to run.
template <typename Scalar>
class ParameterCache {
 public:
  const mhc::Parameters<Scalar>& get(const Shape& shape, std::uint32_t seed) {
    if (parameters_.streams != shape.streams || parameters_.channels != shape.channels) {
      parameters_ = random_parameters<Scalar>(shape.streams, shape.channels, seed);
    }
    return parameters_;
  }

 private:
  mhc::Parameters<Scalar> parameters_;
};

template <typename Scalar>
mhc::Parameters<double> to_double(const mhc::Parameters<Scalar>& parameters) {
  mhc::Parameters<double> result;
  result.streams = parameters.streams;
  result.channels = parameters.channels;
  result.phi = parameters.phi.template cast<double>();
  result.bias = parameters.bias.template cast<double>();
  result.alpha_pre = parameters.alpha_pre;
  result.alpha_post = parameters.alpha_post;
  result.alpha_res = parameters.alpha_res;
  return result;
}

template <typename Storage>
RowMatrix<Storage> random_state(Eigen::Index rows, Eigen::Index cols, std::uint32_t seed) {
  return mhc::test::random_matrix<double>(rows, cols, seed).cast<Storage>();
}

template <typename Storage>
RowMatrix<double> widen(const RowMatrix<Storage>& matrix) {
  return matrix.template cast<double>();
}

// Tolerance of the coefficients: the projection sums n*C products and Sinkhorn-Knopp adds a few
// operations per entry and round, all in Scalar.
template <typename Scalar>
double coefficient_tolerance(const Shape& shape, const mhc::Options& options) {
  return tolerance<Scalar>(double(shape.streams) * shape.channels +
                           4.0 * shape.streams * options.sinkhorn.iterations);
}

template <typename Actual>
void expect_near_matrix(const Actual& actual, const RowMatrix<double>& expected, double absolute,
                        double relative, const char* what) {
  ASSERT_EQ(actual.rows(), expected.rows()) << what;
  ASSERT_EQ(actual.cols(), expected.cols()) << what;
  for (Eigen::Index i = 0; i < expected.rows(); ++i) {
    for (Eigen::Index j = 0; j < expected.cols(); ++j) {
      const double bound = absolute + relative * std::abs(expected(i, j));
      EXPECT_NEAR(static_cast<double>(actual(i, j)), expected(i, j), bound) << what << " (" << i << ", " << j << ")";
    }
  }
}

template <typename Storage>
class FusedTest : public ::testing::Test {};

using StorageTypes = ::testing::Types<float, double, Eigen::bfloat16>;
TYPED_TEST_SUITE(FusedTest, StorageTypes, );

TYPED_TEST(FusedTest, PrepareMatchesReference) {
  using Storage = TypeParam;
  using Scalar = ParameterScalar<Storage>;
  const mhc::Options options;
  mhc::fused::Workspace<Storage, Scalar> workspace;
  mhc::Coefficients<Scalar> coefficients;
  std::uint32_t seed = 1;
  ParameterCache<Scalar> cache;
  for (const Shape& shape : shape_table()) {
    SCOPED_TRACE(::testing::Message() << "n=" << shape.streams << " C=" << shape.channels << " T=" << shape.tokens);
    const auto& parameters = cache.get(shape, seed++);
    const RowMatrix<Storage> x = random_state<Storage>(shape.tokens, Eigen::Index(shape.streams) * shape.channels, seed++);
    RowMatrix<Storage> input(shape.tokens, shape.channels);
    mhc::fused::prepare_branch(parameters, x, coefficients, input, workspace, options);

    const RowMatrix<double> x_double = widen(x);
    const auto expected = mhc::prepare_branch(to_double(parameters), x_double, options);
    const double coefficient_bound = coefficient_tolerance<Scalar>(shape, options);
    expect_near_matrix(coefficients.pre, expected.coefficients.pre, coefficient_bound, 0.0, "pre");
    expect_near_matrix(coefficients.post, expected.coefficients.post, 2 * coefficient_bound, 0.0, "post");
    expect_near_matrix(coefficients.res, expected.coefficients.res, coefficient_bound, 0.0, "res");

    // h_in sums n products of |x| <= max|x| with coefficients in (0, 1), then rounds once to Storage.
    const double largest = shape.tokens > 0 ? x_double.cwiseAbs().maxCoeff() : 0.0;
    const double input_bound = (shape.streams * coefficient_bound + tolerance<Scalar>(shape.streams)) * largest;
    expect_near_matrix(input, expected.input, input_bound, storage_epsilon<Storage>(), "h_in");
  }
}

TYPED_TEST(FusedTest, MergeMatchesReference) {
  using Storage = TypeParam;
  using Scalar = ParameterScalar<Storage>;
  const mhc::Options options;
  mhc::fused::Workspace<Storage, Scalar> workspace;
  mhc::Coefficients<Scalar> coefficients;
  std::uint32_t seed = 100;
  ParameterCache<Scalar> cache;
  for (const Shape& shape : shape_table()) {
    SCOPED_TRACE(::testing::Message() << "n=" << shape.streams << " C=" << shape.channels << " T=" << shape.tokens);
    const Eigen::Index width = Eigen::Index(shape.streams) * shape.channels;
    const auto& parameters = cache.get(shape, seed++);
    const RowMatrix<Storage> x = random_state<Storage>(shape.tokens, width, seed++);
    const RowMatrix<Storage> output = random_state<Storage>(shape.tokens, shape.channels, seed++);
    RowMatrix<Storage> input(shape.tokens, shape.channels);
    mhc::fused::prepare_branch(parameters, x, coefficients, input, workspace, options);
    RowMatrix<Storage> x_next(shape.tokens, width);
    mhc::fused::merge_streams(coefficients, x, output, x_next, workspace);

    // The reference merges with the same coefficients, widened to double.
    mhc::Coefficients<double> shared;
    shared.pre = coefficients.pre.template cast<double>();
    shared.post = coefficients.post.template cast<double>();
    shared.res = coefficients.res.template cast<double>();
    const RowMatrix<double> expected = mhc::merge_streams(shared, widen(x), widen(output));

    // Each value sums n + 1 products of magnitude <= 2 max|x|, then rounds once to Storage.
    const double largest = shape.tokens > 0 ? std::max(widen(x).cwiseAbs().maxCoeff(), widen(output).cwiseAbs().maxCoeff()) : 0.0;
    const double bound = 2 * tolerance<Scalar>(shape.streams + 1) * largest;
    expect_near_matrix(x_next, expected, bound, storage_epsilon<Storage>(), "x_next");
  }
}

TYPED_TEST(FusedTest, BackwardMatchesReference) {
  using Storage = TypeParam;
  using Scalar = ParameterScalar<Storage>;
  mhc::fused::Workspace<Storage, Scalar> workspace;
  mhc::Coefficients<Scalar> coefficients;
  RowMatrix<Scalar> grad_post, grad_res, grad_pre;
  std::uint32_t seed = 200;
  ParameterCache<Scalar> cache;
  for (const Shape& shape : shape_table()) {
    SCOPED_TRACE(::testing::Message() << "n=" << shape.streams << " C=" << shape.channels << " T=" << shape.tokens);
    const Eigen::Index tokens = shape.tokens;
    const Eigen::Index width = Eigen::Index(shape.streams) * shape.channels;
    const auto& parameters = cache.get(shape, seed++);
    const RowMatrix<Storage> x = random_state<Storage>(tokens, width, seed++);
    const RowMatrix<Storage> output = random_state<Storage>(tokens, shape.channels, seed++);
    const RowMatrix<Storage> grad_next = random_state<Storage>(tokens, width, seed++);
    const RowMatrix<Storage> grad_input = random_state<Storage>(tokens, shape.channels, seed++);
    RowMatrix<Storage> input(tokens, shape.channels);
    mhc::fused::prepare_branch(parameters, x, coefficients, input, workspace);

    RowMatrix<Storage> grad_x(tokens, width);
    RowMatrix<Storage> grad_output(tokens, shape.channels);
    mhc::fused::merge_streams_backward(coefficients, x, output, grad_next, grad_x, grad_output, grad_post, grad_res,
                                       workspace);
    const RowMatrix<Storage> merge_grad_x = grad_x;
    mhc::fused::aggregate_streams_backward(coefficients, x, grad_input, grad_x, grad_pre, workspace,
                                           mhc::fused::GradientWrite::kAdd);

    mhc::Coefficients<double> shared;
    shared.pre = coefficients.pre.template cast<double>();
    shared.post = coefficients.post.template cast<double>();
    shared.res = coefficients.res.template cast<double>();
    const auto merge = mhc::merge_streams_backward(shared, widen(x), widen(output), widen(grad_next));
    const auto aggregate = mhc::aggregate_streams_backward(shared, widen(x), widen(grad_input));

    // Every input is bounded by `largest`. The mixes sum n terms with weights of at most 2 and the
    // dot products sum C terms, all in Scalar. The x and h_out gradients round once to Storage.
    const double largest = tokens > 0 ? std::max(widen(x).cwiseAbs().maxCoeff(), widen(grad_next).cwiseAbs().maxCoeff()) : 0.0;
    const double mix_bound = 2 * tolerance<Scalar>(shape.streams + 1) * shape.streams * largest;
    const double dot_bound = tolerance<Scalar>(shape.channels) * shape.channels * largest * largest;
    const double storage = storage_epsilon<Storage>();
    expect_near_matrix(merge_grad_x, merge.x, mix_bound, storage, "merge grad_x");
    expect_near_matrix(grad_output, merge.branch_output, mix_bound, storage, "grad_branch_output");
    expect_near_matrix(grad_post, merge.post, dot_bound, 0.0, "grad_post");
    expect_near_matrix(grad_res, merge.res, dot_bound, 0.0, "grad_res");
    expect_near_matrix(grad_pre, aggregate.pre, dot_bound, 0.0, "grad_pre");
    // The addition starts from the merge share as stored, so only its own rounding counts.
    const RowMatrix<double> summed = widen(merge_grad_x) + aggregate.x;
    expect_near_matrix(grad_x, summed, mix_bound, storage, "grad_x");
  }
}

TEST(FusedBackward, AggregateOverwritesGradient) {
  const auto parameters = random_parameters<float>(3, 5, 71);
  const RowMatrix<float> x = random_state<float>(4, 15, 72);
  const RowMatrix<float> grad_input = random_state<float>(4, 5, 73);
  mhc::fused::Workspace<float, float> workspace;
  mhc::Coefficients<float> coefficients;
  RowMatrix<float> input(4, 5);
  mhc::fused::prepare_branch(parameters, x, coefficients, input, workspace);

  RowMatrix<float> grad_x = RowMatrix<float>::Constant(4, 15, 1000.0f);
  RowMatrix<float> grad_pre;
  mhc::fused::aggregate_streams_backward(coefficients, x, grad_input, grad_x, grad_pre, workspace);
  const auto expected = mhc::aggregate_streams_backward(coefficients, x, grad_input);
  expect_near_matrix(grad_x, expected.x.cast<double>(), tolerance<float>(1), 0.0, "grad_x");
}

TYPED_TEST(FusedTest, ForwardMatchesReference) {
  using Storage = TypeParam;
  using Scalar = ParameterScalar<Storage>;
  const Shape shape{4, 17, 40};
  const mhc::Options options;
  const Eigen::Index width = Eigen::Index(shape.streams) * shape.channels;
  const auto parameters = random_parameters<Scalar>(shape.streams, shape.channels, 7);
  const RowMatrix<Storage> x = random_state<Storage>(shape.tokens, width, 8);
  const auto branch = [](const auto& input) {
    using Matrix = std::decay_t<decltype(input)>;
    return Matrix(input.unaryExpr([](auto value) { return decltype(value)(2) * value; }));
  };
  mhc::fused::Workspace<Storage, Scalar> workspace;
  RowMatrix<Storage> x_next(shape.tokens, width);
  mhc::fused::forward(parameters, x, branch, x_next, workspace, options);

  const RowMatrix<double> expected = mhc::forward(to_double(parameters), widen(x), branch, options);
  // Coefficient errors reach x_next through H_res x and through 2 H_post h_in.
  const double largest = widen(x).cwiseAbs().maxCoeff();
  const double bound = 8 * shape.streams * coefficient_tolerance<Scalar>(shape, options) * largest;
  expect_near_matrix(x_next, expected, bound, 3 * storage_epsilon<Storage>(), "x_next");
}

// Runs the forward and backward kernels with `threads` threads and returns the bytes of every
// output. x_next and h_out stand in for the incoming gradients.
template <typename Storage>
std::vector<unsigned char> run_with_threads(int threads, int n, int channels, Eigen::Index tokens) {
  using Scalar = ParameterScalar<Storage>;
  const Eigen::Index width = Eigen::Index(n) * channels;
  const auto parameters = random_parameters<Scalar>(n, channels, 11);
  const RowMatrix<Storage> x = random_state<Storage>(tokens, width, 12);
  const RowMatrix<Storage> output = random_state<Storage>(tokens, channels, 13);
  mhc::ThreadPool pool(threads);
  mhc::fused::Workspace<Storage, Scalar> workspace(&pool);
  mhc::Coefficients<Scalar> coefficients;
  RowMatrix<Storage> input(tokens, channels);
  RowMatrix<Storage> x_next(tokens, width);
  mhc::fused::prepare_branch(parameters, x, coefficients, input, workspace);
  mhc::fused::merge_streams(coefficients, x, output, x_next, workspace);
  RowMatrix<Storage> grad_x(tokens, width);
  RowMatrix<Storage> grad_output(tokens, channels);
  RowMatrix<Scalar> grad_post, grad_res, grad_pre;
  mhc::fused::merge_streams_backward(coefficients, x, output, x_next, grad_x, grad_output, grad_post, grad_res,
                                     workspace);
  mhc::fused::aggregate_streams_backward(coefficients, x, output, grad_x, grad_pre, workspace,
                                         mhc::fused::GradientWrite::kAdd);

  std::vector<unsigned char> bytes;
  const auto append = [&bytes](const auto& matrix) {
    const auto* begin = reinterpret_cast<const unsigned char*>(matrix.data());
    bytes.insert(bytes.end(), begin, begin + matrix.size() * sizeof(*matrix.data()));
  };
  append(coefficients.pre);
  append(coefficients.post);
  append(coefficients.res);
  append(input);
  append(x_next);
  append(grad_x);
  append(grad_output);
  append(grad_post);
  append(grad_res);
  append(grad_pre);
  return bytes;
}

TYPED_TEST(FusedTest, ThreadsBitwiseIdentical) {
  for (int n : {3, 4}) {
    SCOPED_TRACE(::testing::Message() << "n=" << n);
    const auto single = run_with_threads<TypeParam>(1, n, 33, 257);
    EXPECT_EQ(run_with_threads<TypeParam>(2, n, 33, 257), single);
    EXPECT_EQ(run_with_threads<TypeParam>(3, n, 33, 257), single);
  }
}

// The kernels compiled for n = 2, 4 and 8 do the same arithmetic as the run-time-n path, so
// every output agrees to rounding (an FMA contracted in one path and not in the other may
// change the last bit).
TYPED_TEST(FusedTest, FixedSizeStreamsMatchRunTimePath) {
  using Storage = TypeParam;
  using Scalar = ParameterScalar<Storage>;
  for (int n : {2, 4, 8}) {
    SCOPED_TRACE(::testing::Message() << "n=" << n);
    const Shape shape{n, 37, 21};
    const Eigen::Index width = Eigen::Index(n) * shape.channels;
    const auto parameters = random_parameters<Scalar>(n, shape.channels, 21);
    const RowMatrix<Storage> x = random_state<Storage>(shape.tokens, width, 22);
    const RowMatrix<Storage> output = random_state<Storage>(shape.tokens, shape.channels, 23);
    std::vector<RowMatrix<double>> results[2];
    for (const bool fixed : {true, false}) {
      mhc::fused::Workspace<Storage, Scalar> workspace;
      workspace.fixed_size_streams = fixed;
      mhc::Coefficients<Scalar> coefficients;
      RowMatrix<Storage> input(shape.tokens, shape.channels);
      RowMatrix<Storage> x_next(shape.tokens, width);
      RowMatrix<Storage> grad_x(shape.tokens, width);
      RowMatrix<Storage> grad_output(shape.tokens, shape.channels);
      RowMatrix<Scalar> grad_post, grad_res, grad_pre;
      mhc::fused::prepare_branch(parameters, x, coefficients, input, workspace);
      mhc::fused::merge_streams(coefficients, x, output, x_next, workspace);
      mhc::fused::merge_streams_backward(coefficients, x, output, x_next, grad_x, grad_output, grad_post, grad_res,
                                         workspace);
      mhc::fused::aggregate_streams_backward(coefficients, x, output, grad_x, grad_pre, workspace,
                                             mhc::fused::GradientWrite::kAdd);
      results[fixed ? 0 : 1] = {widen(coefficients.res), widen(input),     widen(x_next),  widen(grad_x),
                                widen(grad_output),      widen(grad_post), widen(grad_res), widen(grad_pre)};
    }
    const double absolute = 4 * tolerance<Scalar>(double(n) * shape.channels);
    for (std::size_t k = 0; k < results[0].size(); ++k) {
      SCOPED_TRACE(::testing::Message() << "output " << k);
      expect_near_matrix(results[1][k], results[0][k], absolute, 4 * storage_epsilon<Storage>(), "run-time path");
    }
  }
}

TYPED_TEST(FusedTest, StreamingStoresMatchCachedStores) {
  using Storage = TypeParam;
  using Scalar = ParameterScalar<Storage>;
  for (int n : {3, 4}) {
    SCOPED_TRACE(::testing::Message() << "n=" << n);
    const int channels = 37;
    const Eigen::Index tokens = 19;
    const auto parameters = random_parameters<Scalar>(n, channels, 61);
    const RowMatrix<Storage> x = random_state<Storage>(tokens, n * channels, 62);
    const RowMatrix<Storage> output = random_state<Storage>(tokens, channels, 63);
    mhc::fused::Workspace<Storage, Scalar> workspace;
    mhc::Coefficients<Scalar> coefficients;
    RowMatrix<Storage> input(tokens, channels);
    mhc::fused::prepare_branch(parameters, x, coefficients, input, workspace);

    workspace.streaming_threshold_bytes = std::numeric_limits<std::ptrdiff_t>::max();
    RowMatrix<Storage> cached(tokens, n * channels);
    mhc::fused::merge_streams(coefficients, x, output, cached, workspace);
    workspace.streaming_threshold_bytes = 0;
    RowMatrix<Storage> streamed(tokens, n * channels);
    mhc::fused::merge_streams(coefficients, x, output, streamed, workspace);
    EXPECT_EQ(streamed, cached);

    // The merge backward streams grad_x under the same threshold. `cached` serves as dx_next.
    RowMatrix<Storage> streamed_grad_x(tokens, n * channels), streamed_grad_output(tokens, channels);
    RowMatrix<Scalar> streamed_post, streamed_res;
    mhc::fused::merge_streams_backward(coefficients, x, output, cached, streamed_grad_x, streamed_grad_output,
                                       streamed_post, streamed_res, workspace);
    workspace.streaming_threshold_bytes = std::numeric_limits<std::ptrdiff_t>::max();
    RowMatrix<Storage> cached_grad_x(tokens, n * channels), cached_grad_output(tokens, channels);
    RowMatrix<Scalar> cached_post, cached_res;
    mhc::fused::merge_streams_backward(coefficients, x, output, cached, cached_grad_x, cached_grad_output, cached_post,
                                       cached_res, workspace);
    EXPECT_EQ(streamed_grad_x, cached_grad_x);
    EXPECT_EQ(streamed_grad_output, cached_grad_output);
    EXPECT_EQ(streamed_res, cached_res);
  }
}

// Values written around every row of a strided output view; none may change.
constexpr float kSentinel = -12345.0f;

// Buffer holding `rows` rows of `cols` values at `stride` apart, starting one element in (so
// the view is unaligned), with sentinels before, between and after the rows.
template <typename Storage>
struct GuardedBuffer {
  GuardedBuffer(Eigen::Index rows, Eigen::Index cols, Eigen::Index stride)
      : rows(rows), cols(cols), stride(stride), values(std::size_t(rows * stride + 8), Storage(kSentinel)) {}

  Eigen::Map<RowMatrix<Storage>, 0, Eigen::OuterStride<>> view() {
    return {values.data() + 1, rows, cols, Eigen::OuterStride<>(stride)};
  }

  // Counts values outside the view that no longer hold the sentinel.
  int overwritten_sentinels() const {
    int count = 0;
    for (std::size_t k = 0; k < values.size(); ++k) {
      const Eigen::Index offset = Eigen::Index(k) - 1;
      const bool inside = offset >= 0 && offset < rows * stride && offset % stride < cols;
      if (!inside && static_cast<float>(values[k]) != static_cast<float>(Storage(kSentinel))) ++count;
    }
    return count;
  }

  Eigen::Index rows, cols, stride;
  std::vector<Storage> values;
};

TYPED_TEST(FusedTest, StridedViewsMatchContiguous) {
  using Storage = TypeParam;
  using Scalar = ParameterScalar<Storage>;
  const int n = 4;
  const int channels = 17;
  const Eigen::Index tokens = 21;
  const Eigen::Index width = n * channels;
  const auto parameters = random_parameters<Scalar>(n, channels, 21);
  const RowMatrix<Storage> x = random_state<Storage>(tokens, width, 22);
  const RowMatrix<Storage> output = random_state<Storage>(tokens, channels, 23);
  mhc::fused::Workspace<Storage, Scalar> workspace;

  mhc::Coefficients<Scalar> coefficients;
  RowMatrix<Storage> input(tokens, channels);
  RowMatrix<Storage> x_next(tokens, width);
  mhc::fused::prepare_branch(parameters, x, coefficients, input, workspace);
  mhc::fused::merge_streams(coefficients, x, output, x_next, workspace);

  // x and h_out as a block of rows inside larger matrices; outputs in guarded strided buffers.
  RowMatrix<Storage> x_padded = random_state<Storage>(tokens + 3, width, 24);
  x_padded.middleRows(2, tokens) = x;
  GuardedBuffer<Storage> x_shifted(tokens, width, width + 3);
  x_shifted.view() = x;
  GuardedBuffer<Storage> input_buffer(tokens, channels, channels + 2);
  GuardedBuffer<Storage> next_buffer(tokens, width, width + 5);
  mhc::Coefficients<Scalar> view_coefficients;
  mhc::fused::prepare_branch(parameters, x_padded.middleRows(2, tokens), view_coefficients, input_buffer.view(),
                             workspace);
  mhc::fused::merge_streams(view_coefficients, x_shifted.view(), output, next_buffer.view(), workspace);

  EXPECT_EQ(view_coefficients.res, coefficients.res);
  EXPECT_EQ(RowMatrix<Storage>(input_buffer.view()), input);
  EXPECT_EQ(RowMatrix<Storage>(next_buffer.view()), x_next);
  EXPECT_EQ(input_buffer.overwritten_sentinels(), 0);
  EXPECT_EQ(next_buffer.overwritten_sentinels(), 0);
}

TEST(FusedSinkhorn, UnderflowFallsBackToLogDomain) {
  // Row 0 of the logits is -3000 everywhere, so exp underflows to zero in float and double after
  // the column shift. The matrix is rank one, so the exact result is 1/n everywhere.
  for (int n : {2, 3, 4}) {
    SCOPED_TRACE(::testing::Message() << "n=" << n);
    auto parameters = mhc::Parameters<float>::identity(n, 5, 0);
    for (int j = 0; j < n; ++j) parameters.bias(2 * n + j) = -3000.0f;
    for (int i = 1; i < n; ++i) {
      for (int j = 0; j < n; ++j) parameters.bias(2 * n + i * n + j) = 0.0f;
    }
    const RowMatrix<float> x = random_state<float>(3, n * 5, 31);
    mhc::fused::Workspace<float, float> workspace;
    mhc::Coefficients<float> coefficients;
    RowMatrix<float> input(3, 5);
    mhc::fused::prepare_branch(parameters, x, coefficients, input, workspace);
    for (Eigen::Index k = 0; k < coefficients.res.size(); ++k) {
      EXPECT_NEAR(coefficients.res(k), 1.0 / n, tolerance<float>(n * n)) << "entry " << k;
    }
  }
}

TEST(FusedSinkhorn, OptionsMatchReference) {
  // Zero rounds, the log-domain method and an early stop, each against the reference layer.
  const int n = 4;
  const auto parameters = random_parameters<double>(n, 9, 43);
  const RowMatrix<double> x = random_state<double>(6, n * 9, 44);
  std::vector<mhc::Options> cases(3);
  cases[0].sinkhorn.iterations = 0;
  cases[1].sinkhorn.method = mhc::SinkhornMethod::log_domain;
  cases[2].sinkhorn.iterations = 500;
  cases[2].sinkhorn.tolerance = 1e-4;
  mhc::fused::Workspace<double, double> workspace;
  for (std::size_t k = 0; k < cases.size(); ++k) {
    SCOPED_TRACE(::testing::Message() << "case " << k);
    mhc::Coefficients<double> coefficients;
    RowMatrix<double> input(6, 9);
    mhc::fused::prepare_branch(parameters, x, coefficients, input, workspace, cases[k]);
    const auto expected = mhc::compute_coefficients(parameters, x, cases[k]);
    const double bound = tolerance<double>(n * 9 + 4.0 * n * std::max(cases[k].sinkhorn.iterations, 1));
    expect_near_matrix(coefficients.res, expected.res, bound, 0.0, "res");
  }
}

TEST(FusedSinkhorn, ToleranceStopsEarly) {
  const int n = 4;
  const auto parameters = random_parameters<double>(n, 9, 41);
  const RowMatrix<double> x = random_state<double>(6, n * 9, 42);
  mhc::Options options;
  options.sinkhorn.iterations = 1000;
  options.sinkhorn.tolerance = 1e-3;
  mhc::fused::Workspace<double, double> workspace;
  mhc::Coefficients<double> early;
  RowMatrix<double> input(6, 9);
  mhc::fused::prepare_branch(parameters, x, early, input, workspace, options);
  options.sinkhorn.tolerance = 0.0;
  mhc::Coefficients<double> full;
  mhc::fused::prepare_branch(parameters, x, full, input, workspace, options);

  for (Eigen::Index t = 0; t < x.rows(); ++t) {
    const Eigen::Map<const RowMatrix<double>> mixing(early.res.row(t).data(), n, n);
    EXPECT_LE(mhc::doubly_stochastic_error(mixing), 1e-3) << "token " << t;
  }
  // Stopping early must have changed something, or the tolerance was ignored.
  EXPECT_GT((early.res - full.res).cwiseAbs().maxCoeff(), 0.0);
}

TEST(FusedErrors, PrepareRejectsBadArguments) {
  const auto parameters = random_parameters<float>(2, 3, 51);
  RowMatrix<float> x = random_state<float>(4, 6, 52);
  RowMatrix<float> input(4, 3);
  mhc::fused::Workspace<float, float> workspace;
  mhc::Coefficients<float> coefficients;

  RowMatrix<float> narrow(4, 5);
  EXPECT_THROW(mhc::fused::prepare_branch(parameters, narrow, coefficients, input, workspace), std::invalid_argument);
  RowMatrix<float> short_input(3, 3);
  EXPECT_THROW(mhc::fused::prepare_branch(parameters, x, coefficients, short_input, workspace), std::invalid_argument);
  Eigen::Map<RowMatrix<float>> aliased(x.data(), 4, 3);
  EXPECT_THROW(mhc::fused::prepare_branch(parameters, x, coefficients, aliased, workspace), std::invalid_argument);

  mhc::Options options;
  options.rms_epsilon = 0.0;
  EXPECT_THROW(mhc::fused::prepare_branch(parameters, x, coefficients, input, workspace, options), std::invalid_argument);
  options = {};
  options.sinkhorn.iterations = -1;
  EXPECT_THROW(mhc::fused::prepare_branch(parameters, x, coefficients, input, workspace, options), std::invalid_argument);
  options = {};
  options.sinkhorn.tolerance = -1.0;
  EXPECT_THROW(mhc::fused::prepare_branch(parameters, x, coefficients, input, workspace, options), std::invalid_argument);

  auto bad_parameters = parameters;
  bad_parameters.bias.resize(3);
  EXPECT_THROW(mhc::fused::prepare_branch(bad_parameters, x, coefficients, input, workspace), std::invalid_argument);
}

TEST(FusedErrors, MessageNamesArgument) {
  const auto parameters = random_parameters<float>(2, 3, 53);
  const RowMatrix<float> x = random_state<float>(4, 6, 54);
  RowMatrix<float> input(4, 2);
  mhc::fused::Workspace<float, float> workspace;
  mhc::Coefficients<float> coefficients;
  try {
    mhc::fused::prepare_branch(parameters, x, coefficients, input, workspace);
    FAIL() << "expected std::invalid_argument";
  } catch (const std::invalid_argument& error) {
    EXPECT_STREQ(error.what(),
                 "mhc::fused::prepare_branch: invalid branch_input: expected shape 4 x 3, got 4 x 2");
  }
}

TEST(FusedErrors, MergeRejectsBadArguments) {
  const auto parameters = random_parameters<float>(2, 3, 55);
  RowMatrix<float> x = random_state<float>(4, 6, 56);
  const RowMatrix<float> output = random_state<float>(4, 3, 57);
  RowMatrix<float> input(4, 3);
  RowMatrix<float> x_next(4, 6);
  mhc::fused::Workspace<float, float> workspace;
  mhc::Coefficients<float> coefficients;
  mhc::fused::prepare_branch(parameters, x, coefficients, input, workspace);

  RowMatrix<float> wide_output(4, 4);
  EXPECT_THROW(mhc::fused::merge_streams(coefficients, x, wide_output, x_next, workspace), std::invalid_argument);
  RowMatrix<float> short_next(3, 6);
  EXPECT_THROW(mhc::fused::merge_streams(coefficients, x, output, short_next, workspace), std::invalid_argument);
  EXPECT_THROW(mhc::fused::merge_streams(coefficients, x, output, x, workspace), std::invalid_argument);
  RowMatrix<float> x_odd(4, 7);
  RowMatrix<float> next_odd(4, 7);
  EXPECT_THROW(mhc::fused::merge_streams(coefficients, x_odd, output, next_odd, workspace), std::invalid_argument);
  auto truncated = coefficients;
  truncated.res.resize(4, 3);
  EXPECT_THROW(mhc::fused::merge_streams(truncated, x, output, x_next, workspace), std::invalid_argument);
}

TEST(FusedErrors, BackwardRejectsBadArguments) {
  const auto parameters = random_parameters<float>(2, 3, 81);
  RowMatrix<float> x = random_state<float>(4, 6, 82);
  const RowMatrix<float> output = random_state<float>(4, 3, 83);
  RowMatrix<float> grad_next = random_state<float>(4, 6, 84);
  RowMatrix<float> input(4, 3);
  RowMatrix<float> grad_x(4, 6);
  RowMatrix<float> grad_output(4, 3);
  RowMatrix<float> grad_post, grad_res, grad_pre;
  mhc::fused::Workspace<float, float> workspace;
  mhc::Coefficients<float> coefficients;
  mhc::fused::prepare_branch(parameters, x, coefficients, input, workspace);

  RowMatrix<float> short_next(3, 6);
  EXPECT_THROW(mhc::fused::merge_streams_backward(coefficients, x, output, short_next, grad_x, grad_output, grad_post,
                                                  grad_res, workspace),
               std::invalid_argument);
  RowMatrix<float> wide_grad_output(4, 4);
  EXPECT_THROW(mhc::fused::merge_streams_backward(coefficients, x, output, grad_next, grad_x, wide_grad_output,
                                                  grad_post, grad_res, workspace),
               std::invalid_argument);
  EXPECT_THROW(mhc::fused::merge_streams_backward(coefficients, x, output, grad_next, grad_next, grad_output,
                                                  grad_post, grad_res, workspace),
               std::invalid_argument);
  Eigen::Map<RowMatrix<float>> inside_grad_x(grad_x.data() + 6, 4, 3);
  EXPECT_THROW(mhc::fused::merge_streams_backward(coefficients, x, output, grad_next, grad_x, inside_grad_x,
                                                  grad_post, grad_res, workspace),
               std::invalid_argument);

  RowMatrix<float> short_grad_input(4, 2);
  EXPECT_THROW(mhc::fused::aggregate_streams_backward(coefficients, x, short_grad_input, grad_x, grad_pre, workspace),
               std::invalid_argument);
  EXPECT_THROW(mhc::fused::aggregate_streams_backward(coefficients, x, output, x, grad_pre, workspace),
               std::invalid_argument);
}

TEST(ThreadPool, RunsEveryIndexOnce) {
  for (int threads : {1, 2, 3}) {
    mhc::ThreadPool pool(threads);
    std::vector<int> calls(1000, 0);
    for (int repeat = 0; repeat < 3; ++repeat) {
      pool.run(static_cast<Eigen::Index>(calls.size()), [&](Eigen::Index index, int worker) {
        EXPECT_GE(worker, 0);
        EXPECT_LT(worker, threads);
        ++calls[static_cast<std::size_t>(index)];
      });
    }
    for (std::size_t k = 0; k < calls.size(); ++k) EXPECT_EQ(calls[k], 3) << "index " << k;
  }
}

TEST(ThreadPool, RejectsZeroThreads) {
  EXPECT_THROW(mhc::ThreadPool pool(0), std::invalid_argument);
}

}  // namespace
