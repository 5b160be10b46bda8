// fused::coefficients_backward and fused::prepare_branch_backward against the reference
// backward of backward.hpp (run in double), over storage types, shapes, Sinkhorn options and
// thread counts.
#include <mhc/backward.hpp>
#include <mhc/fused.hpp>

#include "support.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using mhc::RowMatrix;
using mhc::fused::GradientWrite;
using mhc::test::tolerance;

// Parameter type paired with each storage type: float for float and bfloat16, double for double.
template <typename Storage>
using ParameterScalar = std::conditional_t<std::is_same_v<Storage, double>, double, float>;

using StorageTypes = ::testing::Types<float, double, Eigen::bfloat16>;

struct StorageTypeNames {
  template <typename Storage>
  static std::string GetName(int) {
    if (std::is_same_v<Storage, Eigen::bfloat16>) return "bfloat16";
    return mhc::test::ScalarTypeNames::GetName<Storage>(0);
  }
};

template <typename Storage>
double storage_epsilon() {
  return static_cast<double>(Eigen::NumTraits<Storage>::epsilon());
}

struct Shape {
  int streams;
  int channels;
  Eigen::Index tokens;
};

std::vector<Shape> shape_table() {
  std::vector<Shape> shapes;
  for (int n : {1, 2, 3, 4, 8}) {
    for (int c : {1, 3, 17, 100}) {
      for (Eigen::Index t : {0, 1, 33}) shapes.push_back({n, c, t});
    }
  }
  return shapes;
}

// Parameters whose coefficients vary from token to token: vec(x) phi / r is about N(0, 1), the
// alphas are near 1 and the biases random.
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

template <typename Matrix>
RowMatrix<double> widen(const Matrix& matrix) {
  return matrix.template cast<double>();
}

// Random gradients of the coefficients of `tokens` tokens.
template <typename Scalar>
mhc::Coefficients<Scalar> random_coefficient_gradients(int n, Eigen::Index tokens, std::uint32_t seed) {
  mhc::Coefficients<Scalar> grad;
  grad.pre = mhc::test::random_matrix<Scalar>(tokens, n, seed);
  grad.post = mhc::test::random_matrix<Scalar>(tokens, n, seed + 1);
  grad.res = mhc::test::random_matrix<Scalar>(tokens, Eigen::Index(n) * n, seed + 2);
  return grad;
}

template <typename Scalar>
mhc::Coefficients<double> widen(const mhc::Coefficients<Scalar>& coefficients) {
  mhc::Coefficients<double> result;
  result.pre = widen(coefficients.pre);
  result.post = widen(coefficients.post);
  result.res = widen(coefficients.res);
  return result;
}

// Rounding steps behind one gradient entry in Scalar: the projection (n*C products), the
// Sinkhorn-Knopp backward (two normalisations of n-term sums per round, forward and backward),
// the product back onto phi (M terms) and the sum over T tokens.
double gradient_operations(const Shape& shape, const mhc::Options& options) {
  const double n = shape.streams;
  const double count = n * n + 2 * n;
  return n * shape.channels + 4.0 * n * std::max(options.sinkhorn.iterations, 1) + count + double(shape.tokens);
}

// Expects every entry within absolute + relative * |expected|, where the absolute part scales
// with the largest expected entry, because a gradient entry may be a sum that cancels.
template <typename Actual>
void expect_near_matrix(const Actual& actual, const RowMatrix<double>& expected, double tolerance_scale,
                        double relative, const char* what) {
  ASSERT_EQ(actual.rows(), expected.rows()) << what;
  ASSERT_EQ(actual.cols(), expected.cols()) << what;
  const double largest = expected.size() > 0 ? expected.cwiseAbs().maxCoeff() : 0.0;
  const double absolute = tolerance_scale * std::max(1.0, largest);
  for (Eigen::Index i = 0; i < expected.rows(); ++i) {
    for (Eigen::Index j = 0; j < expected.cols(); ++j) {
      const double bound = absolute + relative * std::abs(expected(i, j));
      EXPECT_NEAR(static_cast<double>(actual(i, j)), expected(i, j), bound) << what << " (" << i << ", " << j << ")";
    }
  }
}

// Runs fused::coefficients_backward (overwrite) and compares it with
// mhc::compute_coefficients_backward in double on the same inputs.
template <typename Storage>
void expect_coefficients_backward_matches(const Shape& shape, const mhc::Options& options, std::uint32_t seed,
                                          mhc::fused::Workspace<Storage, ParameterScalar<Storage>>& workspace) {
  using Scalar = ParameterScalar<Storage>;
  const Eigen::Index width = Eigen::Index(shape.streams) * shape.channels;
  const auto parameters = random_parameters<Scalar>(shape.streams, shape.channels, seed);
  const RowMatrix<Storage> x = random_state<Storage>(shape.tokens, width, seed + 2);
  const auto grad = random_coefficient_gradients<Scalar>(shape.streams, shape.tokens, seed + 3);

  RowMatrix<Storage> grad_x = RowMatrix<Storage>::Constant(shape.tokens, width, Storage(1000.0f));
  mhc::Parameters<Scalar> grad_parameters;
  mhc::fused::coefficients_backward(parameters, x, grad.pre, grad.post, grad.res, grad_x, grad_parameters,
                                    workspace, options);

  const auto expected = mhc::compute_coefficients_backward(to_double(parameters), widen(x), widen(grad), options);
  const double scale = tolerance<Scalar>(gradient_operations(shape, options));
  expect_near_matrix(grad_x, expected.x, scale, storage_epsilon<Storage>(), "grad_x");
  expect_near_matrix(grad_parameters.phi, expected.parameters.phi, scale, 0.0, "grad phi");
  const RowMatrix<double> expected_bias = expected.parameters.bias;
  expect_near_matrix(grad_parameters.bias, expected_bias, scale, 0.0, "grad bias");
  const double alpha_scale = std::max({1.0, std::abs(expected.parameters.alpha_pre),
                                       std::abs(expected.parameters.alpha_post),
                                       std::abs(expected.parameters.alpha_res)});
  EXPECT_NEAR(double(grad_parameters.alpha_pre), expected.parameters.alpha_pre, scale * alpha_scale);
  EXPECT_NEAR(double(grad_parameters.alpha_post), expected.parameters.alpha_post, scale * alpha_scale);
  EXPECT_NEAR(double(grad_parameters.alpha_res), expected.parameters.alpha_res, scale * alpha_scale);
  EXPECT_EQ(grad_parameters.streams, shape.streams);
  EXPECT_EQ(grad_parameters.channels, shape.channels);
}

template <typename Storage>
class FusedCoefficientsBackward : public ::testing::Test {};

TYPED_TEST_SUITE(FusedCoefficientsBackward, StorageTypes, StorageTypeNames);

TYPED_TEST(FusedCoefficientsBackward, MatchesReference) {
  using Storage = TypeParam;
  mhc::fused::Workspace<Storage, ParameterScalar<Storage>> workspace;
  std::uint32_t seed = 1;
  for (const Shape& shape : shape_table()) {
    SCOPED_TRACE(::testing::Message() << "n=" << shape.streams << " C=" << shape.channels << " T=" << shape.tokens);
    expect_coefficients_backward_matches<Storage>(shape, mhc::Options{}, seed, workspace);
    seed += 10;
  }
}

TYPED_TEST(FusedCoefficientsBackward, SinkhornOptionsMatchReference) {
  using Storage = TypeParam;
  mhc::fused::Workspace<Storage, ParameterScalar<Storage>> workspace;
  std::vector<std::pair<const char*, mhc::Options>> cases;
  mhc::Options options;
  options.sinkhorn.method = mhc::SinkhornMethod::log_domain;
  cases.emplace_back("log domain", options);
  options = {};
  options.sinkhorn.gradient = mhc::SinkhornGradient::implicit;
  options.sinkhorn.iterations = 60;
  cases.emplace_back("implicit", options);
  options = {};
  options.sinkhorn.tolerance = 1e-3;
  cases.emplace_back("early stop", options);
  options = {};
  options.sinkhorn.iterations = 0;
  cases.emplace_back("no rounds", options);
  options = {};
  options.sinkhorn.iterations = 3;
  options.rms_epsilon = 0.5;
  cases.emplace_back("three rounds, large epsilon", options);

  for (const auto& [name, case_options] : cases) {
    for (const Shape& shape : {Shape{1, 3, 5}, Shape{3, 17, 33}, Shape{4, 5, 20}}) {
      SCOPED_TRACE(::testing::Message() << name << " n=" << shape.streams << " C=" << shape.channels);
      expect_coefficients_backward_matches<Storage>(shape, case_options, 500, workspace);
    }
  }
}

TYPED_TEST(FusedCoefficientsBackward, AddsToGradient) {
  using Storage = TypeParam;
  using Scalar = ParameterScalar<Storage>;
  const Shape shape{4, 17, 33};
  const Eigen::Index width = Eigen::Index(shape.streams) * shape.channels;
  const auto parameters = random_parameters<Scalar>(shape.streams, shape.channels, 40);
  const RowMatrix<Storage> x = random_state<Storage>(shape.tokens, width, 41);
  const auto grad = random_coefficient_gradients<Scalar>(shape.streams, shape.tokens, 42);
  const RowMatrix<Storage> initial = random_state<Storage>(shape.tokens, width, 43);
  mhc::fused::Workspace<Storage, Scalar> workspace;
  mhc::Parameters<Scalar> grad_parameters;

  RowMatrix<Storage> share(shape.tokens, width);
  mhc::fused::coefficients_backward(parameters, x, grad.pre, grad.post, grad.res, share, grad_parameters, workspace);
  RowMatrix<Storage> summed = initial;
  mhc::fused::coefficients_backward(parameters, x, grad.pre, grad.post, grad.res, summed, grad_parameters, workspace,
                                    mhc::Options{}, GradientWrite::kAdd);

  // Both calls compute the same share in Scalar. The overwrite call rounds the share once to
  // Storage and the add call rounds the sum once, so an entry may differ by half an ulp of each.
  const RowMatrix<double> expected = widen(initial) + widen(share);
  const double half_ulp = 0.5 * storage_epsilon<Storage>();
  for (Eigen::Index k = 0; k < expected.size(); ++k) {
    const double bound = half_ulp * (std::abs(double(share.data()[k])) + std::abs(expected.data()[k]));
    EXPECT_NEAR(double(summed.data()[k]), expected.data()[k], bound) << "entry " << k;
  }
}

TYPED_TEST(FusedCoefficientsBackward, LayerBackwardMatchesReference) {
  using Storage = TypeParam;
  using Scalar = ParameterScalar<Storage>;
  mhc::fused::Workspace<Storage, Scalar> workspace;
  mhc::Coefficients<Scalar> coefficients;
  RowMatrix<Scalar> grad_post, grad_res;
  mhc::Parameters<Scalar> grad_parameters;
  std::uint32_t seed = 300;
  for (const Shape& shape : {Shape{1, 3, 1}, Shape{2, 17, 33}, Shape{3, 5, 0}, Shape{4, 17, 33}, Shape{8, 3, 20}}) {
    SCOPED_TRACE(::testing::Message() << "n=" << shape.streams << " C=" << shape.channels << " T=" << shape.tokens);
    const Eigen::Index tokens = shape.tokens;
    const Eigen::Index width = Eigen::Index(shape.streams) * shape.channels;
    const auto parameters = random_parameters<Scalar>(shape.streams, shape.channels, seed);
    const RowMatrix<Storage> x = random_state<Storage>(tokens, width, seed + 2);
    const RowMatrix<Storage> output = random_state<Storage>(tokens, shape.channels, seed + 3);
    const RowMatrix<Storage> grad_next = random_state<Storage>(tokens, width, seed + 4);
    const RowMatrix<Storage> grad_input = random_state<Storage>(tokens, shape.channels, seed + 5);
    seed += 10;

    RowMatrix<Storage> input(tokens, shape.channels);
    mhc::fused::prepare_branch(parameters, x, coefficients, input, workspace);
    RowMatrix<Storage> grad_x(tokens, width);
    RowMatrix<Storage> grad_output(tokens, shape.channels);
    mhc::fused::merge_streams_backward(coefficients, x, output, grad_next, grad_x, grad_output, grad_post, grad_res,
                                       workspace);
    mhc::fused::prepare_branch_backward(parameters, x, coefficients, grad_input, grad_post, grad_res, grad_x,
                                        grad_parameters, workspace, mhc::Options{}, GradientWrite::kAdd);

    const auto double_parameters = to_double(parameters);
    const auto merged = mhc::merge_backward(double_parameters, widen(x), widen(coefficients), widen(output),
                                            widen(grad_next));
    const auto expected = mhc::prepare_branch_backward(double_parameters, widen(x), merged, widen(grad_input));

    // grad_x is rounded to Storage after the merge share, after adding the aggregation share and
    // after adding the coefficient share: half an ulp of each partial sum.
    const double scale = tolerance<Scalar>(gradient_operations(shape, mhc::Options{}));
    const RowMatrix<double> merge_share = merged.gradients.x;
    const RowMatrix<double> two_shares =
        merge_share + mhc::aggregate_streams_backward(widen(coefficients), widen(x), widen(grad_input)).x;
    const double absolute = scale * std::max(1.0, tokens > 0 ? expected.x.cwiseAbs().maxCoeff() : 0.0);
    const double half_ulp = 0.5 * storage_epsilon<Storage>();
    for (Eigen::Index k = 0; k < expected.x.size(); ++k) {
      const double rounding = half_ulp * (std::abs(merge_share.data()[k]) + std::abs(two_shares.data()[k]) +
                                          std::abs(expected.x.data()[k]));
      EXPECT_NEAR(double(grad_x.data()[k]), expected.x.data()[k], absolute + rounding) << "grad_x entry " << k;
    }
    expect_near_matrix(grad_parameters.phi, expected.parameters.phi, scale, 0.0, "grad phi");
    const RowMatrix<double> expected_bias = expected.parameters.bias;
    expect_near_matrix(grad_parameters.bias, expected_bias, scale, 0.0, "grad bias");
    EXPECT_NEAR(double(grad_parameters.alpha_res), expected.parameters.alpha_res,
                scale * std::max(1.0, std::abs(expected.parameters.alpha_res)));
  }
}

// Bytes of every output of the coefficient backward on `threads` threads.
template <typename Storage>
std::vector<unsigned char> run_with_threads(int threads, int n, int channels, Eigen::Index tokens,
                                            const mhc::Options& options) {
  using Scalar = ParameterScalar<Storage>;
  const Eigen::Index width = Eigen::Index(n) * channels;
  const auto parameters = random_parameters<Scalar>(n, channels, 11);
  const RowMatrix<Storage> x = random_state<Storage>(tokens, width, 12);
  const auto grad = random_coefficient_gradients<Scalar>(n, tokens, 13);
  RowMatrix<Storage> grad_x = random_state<Storage>(tokens, width, 14);
  mhc::ThreadPool pool(threads);
  mhc::fused::Workspace<Storage, Scalar> workspace(&pool);
  mhc::Parameters<Scalar> grad_parameters;
  mhc::fused::coefficients_backward(parameters, x, grad.pre, grad.post, grad.res, grad_x, grad_parameters, workspace,
                                    options, GradientWrite::kAdd);

  std::vector<unsigned char> bytes;
  const auto append = [&bytes](const auto* data, Eigen::Index size) {
    const auto* begin = reinterpret_cast<const unsigned char*>(data);
    bytes.insert(bytes.end(), begin, begin + size * Eigen::Index(sizeof(*data)));
  };
  append(grad_x.data(), grad_x.size());
  append(grad_parameters.phi.data(), grad_parameters.phi.size());
  append(grad_parameters.bias.data(), grad_parameters.bias.size());
  append(&grad_parameters.alpha_pre, 1);
  append(&grad_parameters.alpha_post, 1);
  append(&grad_parameters.alpha_res, 1);
  return bytes;
}

TYPED_TEST(FusedCoefficientsBackward, ThreadsBitwiseIdentical) {
  mhc::Options implicit;
  implicit.sinkhorn.gradient = mhc::SinkhornGradient::implicit;
  for (const mhc::Options& options : {mhc::Options{}, implicit}) {
    for (int n : {3, 4}) {
      SCOPED_TRACE(::testing::Message() << "n=" << n);
      // 257 tokens are 17 chunks, and n*C = 132 or 176 rows of grad phi are three blocks.
      const auto single = run_with_threads<TypeParam>(1, n, 44, 257, options);
      EXPECT_EQ(run_with_threads<TypeParam>(2, n, 44, 257, options), single);
      EXPECT_EQ(run_with_threads<TypeParam>(3, n, 44, 257, options), single);
    }
  }
}

TYPED_TEST(FusedCoefficientsBackward, StridedViewsMatchContiguous) {
  using Storage = TypeParam;
  using Scalar = ParameterScalar<Storage>;
  const int n = 3;
  const int channels = 17;
  const Eigen::Index tokens = 33;
  const Eigen::Index width = Eigen::Index(n) * channels;
  const auto parameters = random_parameters<Scalar>(n, channels, 61);
  const auto grad = random_coefficient_gradients<Scalar>(n, tokens, 62);
  mhc::fused::Workspace<Storage, Scalar> workspace;

  // x and grad_x as column blocks of wider matrices, so their rows are width + 5 apart.
  const RowMatrix<Storage> wide_x = random_state<Storage>(tokens, width + 5, 63);
  const RowMatrix<Storage> x = wide_x.middleCols(2, width);
  RowMatrix<Storage> wide_grad_x = RowMatrix<Storage>::Zero(tokens, width + 5);
  mhc::Parameters<Scalar> strided_parameters;
  mhc::fused::coefficients_backward<Storage, Scalar>(parameters, wide_x.middleCols(2, width), grad.pre, grad.post,
                                                     grad.res, wide_grad_x.middleCols(3, width), strided_parameters,
                                                     workspace);

  RowMatrix<Storage> grad_x(tokens, width);
  mhc::Parameters<Scalar> contiguous_parameters;
  mhc::fused::coefficients_backward(parameters, x, grad.pre, grad.post, grad.res, grad_x, contiguous_parameters,
                                    workspace);

  EXPECT_EQ(RowMatrix<Storage>(wide_grad_x.middleCols(3, width)), grad_x);
  EXPECT_EQ(strided_parameters.phi, contiguous_parameters.phi);
  EXPECT_EQ(strided_parameters.bias, contiguous_parameters.bias);
  EXPECT_EQ(strided_parameters.alpha_res, contiguous_parameters.alpha_res);
  // The columns around the block stay untouched.
  EXPECT_TRUE(wide_grad_x.leftCols(3).isZero());
  EXPECT_TRUE(wide_grad_x.rightCols(2).isZero());
}

TEST(FusedCoefficientsBackwardErrors, RejectsBadArguments) {
  const auto parameters = random_parameters<float>(3, 5, 71);
  const RowMatrix<float> x = random_state<float>(4, 15, 72);
  const auto grad = random_coefficient_gradients<float>(3, 4, 73);
  mhc::fused::Workspace<float, float> workspace;
  RowMatrix<float> grad_x(4, 15);
  mhc::Parameters<float> grad_parameters;
  const auto run = [&](const auto& x_in, const auto& pre, const auto& post, const auto& res, auto&& out,
                       const mhc::Options& options) {
    mhc::fused::coefficients_backward(parameters, x_in, pre, post, res, out, grad_parameters, workspace, options);
  };
  const mhc::Options options;
  EXPECT_NO_THROW(run(x, grad.pre, grad.post, grad.res, grad_x, options));

  const RowMatrix<float> narrow_x = random_state<float>(4, 14, 74);
  EXPECT_THROW(run(narrow_x, grad.pre, grad.post, grad.res, grad_x, options), std::invalid_argument);
  const RowMatrix<float> short_pre = grad.pre.topRows(3);
  EXPECT_THROW(run(x, short_pre, grad.post, grad.res, grad_x, options), std::invalid_argument);
  const RowMatrix<float> wide_post = RowMatrix<float>::Zero(4, 4);
  EXPECT_THROW(run(x, grad.pre, wide_post, grad.res, grad_x, options), std::invalid_argument);
  const RowMatrix<float> narrow_res = RowMatrix<float>::Zero(4, 8);
  EXPECT_THROW(run(x, grad.pre, grad.post, narrow_res, grad_x, options), std::invalid_argument);
  RowMatrix<float> short_grad_x(3, 15);
  EXPECT_THROW(run(x, grad.pre, grad.post, grad.res, short_grad_x, options), std::invalid_argument);

  RowMatrix<float> shared = x;
  EXPECT_THROW(run(shared, grad.pre, grad.post, grad.res, shared, options), std::invalid_argument);

  mhc::Options negative_rounds;
  negative_rounds.sinkhorn.iterations = -1;
  EXPECT_THROW(run(x, grad.pre, grad.post, grad.res, grad_x, negative_rounds), std::invalid_argument);
  mhc::Options zero_epsilon;
  zero_epsilon.rms_epsilon = 0.0;
  EXPECT_THROW(run(x, grad.pre, grad.post, grad.res, grad_x, zero_epsilon), std::invalid_argument);

  mhc::Parameters<float> same = parameters;
  EXPECT_THROW(mhc::fused::coefficients_backward(same, x, grad.pre, grad.post, grad.res, grad_x, same, workspace),
               std::invalid_argument);
  mhc::Parameters<float> bad_bias = parameters;
  bad_bias.bias.resize(3);
  EXPECT_THROW(mhc::fused::coefficients_backward(bad_bias, x, grad.pre, grad.post, grad.res, grad_x, grad_parameters,
                                                 workspace),
               std::invalid_argument);
}

TEST(FusedCoefficientsBackwardErrors, MessageNamesArgument) {
  const auto parameters = random_parameters<float>(2, 3, 81);
  const RowMatrix<float> x = random_state<float>(2, 6, 82);
  const auto grad = random_coefficient_gradients<float>(2, 2, 83);
  const RowMatrix<float> wide_res = RowMatrix<float>::Zero(2, 5);
  mhc::fused::Workspace<float, float> workspace;
  RowMatrix<float> grad_x(2, 6);
  mhc::Parameters<float> grad_parameters;
  try {
    mhc::fused::coefficients_backward(parameters, x, grad.pre, grad.post, wide_res, grad_x, grad_parameters,
                                      workspace);
    FAIL() << "expected std::invalid_argument";
  } catch (const std::invalid_argument& error) {
    EXPECT_EQ(std::string(error.what()),
              "mhc::fused::coefficients_backward: invalid grad_res: expected shape 2 x 4, got 2 x 5");
  }
}

TEST(FusedCoefficientsBackwardErrors, LayerBackwardLeavesGradientOnBadInput) {
  const auto parameters = random_parameters<float>(3, 5, 91);
  const RowMatrix<float> x = random_state<float>(4, 15, 92);
  const auto grad = random_coefficient_gradients<float>(3, 4, 93);
  const RowMatrix<float> grad_input = random_state<float>(4, 5, 94);
  mhc::fused::Workspace<float, float> workspace;
  mhc::Coefficients<float> coefficients;
  RowMatrix<float> input(4, 5);
  mhc::fused::prepare_branch(parameters, x, coefficients, input, workspace);
  mhc::Parameters<float> grad_parameters;

  const RowMatrix<float> initial = random_state<float>(4, 15, 95);
  RowMatrix<float> grad_x = initial;
  const RowMatrix<float> wide_res = RowMatrix<float>::Zero(4, 10);
  EXPECT_THROW(mhc::fused::prepare_branch_backward(parameters, x, coefficients, grad_input, grad.post, wide_res,
                                                   grad_x, grad_parameters, workspace, mhc::Options{},
                                                   GradientWrite::kAdd),
               std::invalid_argument);
  EXPECT_EQ(grad_x, initial);
  const RowMatrix<float> short_input = grad_input.topRows(3);
  EXPECT_THROW(mhc::fused::prepare_branch_backward(parameters, x, coefficients, short_input, grad.post, grad.res,
                                                   grad_x, grad_parameters, workspace),
               std::invalid_argument);
  EXPECT_EQ(grad_x, initial);
}

// Outputs of one backward before the branch, for bitwise comparisons.
template <typename Storage, typename Scalar>
struct BackwardOutputs {
  RowMatrix<Storage> grad_x;
  mhc::Parameters<Scalar> grad_parameters;
};

template <typename Storage, typename Scalar>
void expect_same_outputs(const BackwardOutputs<Storage, Scalar>& actual, const BackwardOutputs<Storage, Scalar>& expected) {
  EXPECT_EQ(actual.grad_x, expected.grad_x);
  EXPECT_EQ(actual.grad_parameters.phi, expected.grad_parameters.phi);
  EXPECT_EQ(actual.grad_parameters.bias, expected.grad_parameters.bias);
  EXPECT_EQ(actual.grad_parameters.alpha_pre, expected.grad_parameters.alpha_pre);
  EXPECT_EQ(actual.grad_parameters.alpha_post, expected.grad_parameters.alpha_post);
  EXPECT_EQ(actual.grad_parameters.alpha_res, expected.grad_parameters.alpha_res);
}

// The projections that prepare_branch keeps are the values that the backward would recompute
// with the same kernels, so both paths give the same bits.
TYPED_TEST(FusedCoefficientsBackward, KeptProjectionsMatchRecomputed) {
  using Storage = TypeParam;
  using Scalar = ParameterScalar<Storage>;
  mhc::fused::Workspace<Storage, Scalar> workspace;
  std::uint32_t seed = 500;
  for (const Shape& shape : {Shape{1, 3, 1}, Shape{3, 17, 33}, Shape{4, 100, 9}, Shape{8, 3, 0}}) {
    SCOPED_TRACE(::testing::Message() << "n=" << shape.streams << " C=" << shape.channels << " T=" << shape.tokens);
    const Eigen::Index width = Eigen::Index(shape.streams) * shape.channels;
    const auto parameters = random_parameters<Scalar>(shape.streams, shape.channels, seed);
    const RowMatrix<Storage> x = random_state<Storage>(shape.tokens, width, seed + 1);
    const RowMatrix<Storage> grad_input = random_state<Storage>(shape.tokens, shape.channels, seed + 2);
    const RowMatrix<Storage> initial = random_state<Storage>(shape.tokens, width, seed + 3);
    const auto grad = random_coefficient_gradients<Scalar>(shape.streams, shape.tokens, seed + 4);
    seed += 10;

    mhc::Coefficients<Scalar> plain_coefficients, coefficients;
    mhc::fused::Projections<Scalar> projections;
    RowMatrix<Storage> plain_input(shape.tokens, shape.channels), input(shape.tokens, shape.channels);
    mhc::fused::prepare_branch(parameters, x, plain_coefficients, plain_input, workspace);
    mhc::fused::prepare_branch(parameters, x, coefficients, projections, input, workspace);
    EXPECT_EQ(input, plain_input);
    EXPECT_EQ(coefficients.res, plain_coefficients.res);
    EXPECT_EQ(projections.values.rows(), shape.tokens);
    EXPECT_EQ(projections.values.cols(), parameters.coefficient_count());
    EXPECT_EQ(projections.inverse_rms.size(), shape.tokens);

    BackwardOutputs<Storage, Scalar> recomputed{initial, {}}, kept{initial, {}};
    mhc::fused::coefficients_backward(parameters, x, grad.pre, grad.post, grad.res, recomputed.grad_x,
                                      recomputed.grad_parameters, workspace, mhc::Options{}, GradientWrite::kAdd);
    mhc::fused::coefficients_backward(parameters, x, projections, grad.pre, grad.post, grad.res, kept.grad_x,
                                      kept.grad_parameters, workspace, mhc::Options{}, GradientWrite::kAdd);
    expect_same_outputs(kept, recomputed);

    BackwardOutputs<Storage, Scalar> layer_recomputed{initial, {}}, layer_kept{initial, {}};
    mhc::fused::prepare_branch_backward(parameters, x, coefficients, grad_input, grad.post, grad.res,
                                        layer_recomputed.grad_x, layer_recomputed.grad_parameters, workspace);
    mhc::fused::prepare_branch_backward(parameters, x, projections, coefficients, grad_input, grad.post, grad.res,
                                        layer_kept.grad_x, layer_kept.grad_parameters, workspace);
    expect_same_outputs(layer_kept, layer_recomputed);
  }
}

// prepare_branch_backward runs the aggregation's backward inside the coefficient backward. The
// result must equal the two kernels run one after the other, up to the rounding of grad_x to
// Storage between them.
TYPED_TEST(FusedCoefficientsBackward, PrepareBackwardMatchesSeparateKernels) {
  using Storage = TypeParam;
  using Scalar = ParameterScalar<Storage>;
  mhc::fused::Workspace<Storage, Scalar> workspace;
  const Shape shape{4, 17, 33};
  const Eigen::Index width = Eigen::Index(shape.streams) * shape.channels;
  const auto parameters = random_parameters<Scalar>(shape.streams, shape.channels, 600);
  const RowMatrix<Storage> x = random_state<Storage>(shape.tokens, width, 601);
  const RowMatrix<Storage> grad_input = random_state<Storage>(shape.tokens, shape.channels, 602);
  const auto grad = random_coefficient_gradients<Scalar>(shape.streams, shape.tokens, 603);
  mhc::Coefficients<Scalar> coefficients;
  RowMatrix<Storage> input(shape.tokens, shape.channels);
  mhc::fused::prepare_branch(parameters, x, coefficients, input, workspace);

  BackwardOutputs<Storage, Scalar> separate{RowMatrix<Storage>(shape.tokens, width), {}};
  RowMatrix<Scalar> grad_pre;
  mhc::fused::aggregate_streams_backward(coefficients, x, grad_input, separate.grad_x, grad_pre, workspace);
  mhc::fused::coefficients_backward(parameters, x, grad_pre, grad.post, grad.res, separate.grad_x,
                                    separate.grad_parameters, workspace, mhc::Options{}, GradientWrite::kAdd);
  BackwardOutputs<Storage, Scalar> fused{RowMatrix<Storage>(shape.tokens, width), {}};
  mhc::fused::prepare_branch_backward(parameters, x, coefficients, grad_input, grad.post, grad.res, fused.grad_x,
                                      fused.grad_parameters, workspace);

  if constexpr (std::is_same_v<Storage, Scalar>) {
    expect_same_outputs(fused, separate);
  } else {
    // The separate kernels round grad_x to bfloat16 twice, the fused pass once.
    const double ulp = storage_epsilon<Storage>();
    for (Eigen::Index k = 0; k < fused.grad_x.size(); ++k) {
      const double expected = double(separate.grad_x.data()[k]);
      EXPECT_NEAR(double(fused.grad_x.data()[k]), expected, 2 * ulp * std::max(1.0, std::abs(expected)))
          << "grad_x entry " << k;
    }
    EXPECT_EQ(fused.grad_parameters.phi, separate.grad_parameters.phi);
    EXPECT_EQ(fused.grad_parameters.bias, separate.grad_parameters.bias);
  }
}

TEST(FusedCoefficientsBackwardErrors, RejectsMismatchedProjections) {
  const auto parameters = random_parameters<float>(3, 5, 701);
  const RowMatrix<float> x = random_state<float>(4, 15, 702);
  const RowMatrix<float> grad_input = random_state<float>(4, 5, 703);
  const auto grad = random_coefficient_gradients<float>(3, 4, 704);
  mhc::fused::Workspace<float, float> workspace;
  mhc::Coefficients<float> coefficients;
  mhc::fused::Projections<float> projections;
  RowMatrix<float> input(4, 5);
  mhc::fused::prepare_branch(parameters, x, coefficients, projections, input, workspace);
  RowMatrix<float> grad_x(4, 15);
  mhc::Parameters<float> grad_parameters;

  mhc::fused::Projections<float> short_values = projections;
  short_values.values.conservativeResize(3, Eigen::NoChange);
  try {
    mhc::fused::coefficients_backward(parameters, x, short_values, grad.pre, grad.post, grad.res, grad_x,
                                      grad_parameters, workspace);
    FAIL() << "expected std::invalid_argument";
  } catch (const std::invalid_argument& error) {
    EXPECT_EQ(std::string(error.what()),
              "mhc::fused::coefficients_backward: invalid projections.values: expected shape 4 x 15, got 3 x 15");
  }
  mhc::fused::Projections<float> short_rms = projections;
  short_rms.inverse_rms.conservativeResize(2);
  try {
    mhc::fused::prepare_branch_backward(parameters, x, short_rms, coefficients, grad_input, grad.post, grad.res,
                                        grad_x, grad_parameters, workspace);
    FAIL() << "expected std::invalid_argument";
  } catch (const std::invalid_argument& error) {
    EXPECT_EQ(std::string(error.what()),
              "mhc::fused::prepare_branch_backward: invalid projections.inverse_rms: expected 4 values, got 2 values");
  }
}

TEST(FusedCoefficientsBackwardErrors, PrepareBackwardRejectsOverlappingInput) {
  const auto parameters = random_parameters<float>(1, 6, 711);
  const RowMatrix<float> x = random_state<float>(4, 6, 712);
  const auto grad = random_coefficient_gradients<float>(1, 4, 713);
  mhc::fused::Workspace<float, float> workspace;
  mhc::Coefficients<float> coefficients;
  RowMatrix<float> input(4, 6);
  mhc::fused::prepare_branch(parameters, x, coefficients, input, workspace);
  mhc::Parameters<float> grad_parameters;
  // With n = 1 the branch input has the shape of grad_x, so one buffer can be passed as both.
  RowMatrix<float> shared = random_state<float>(4, 6, 714);
  EXPECT_THROW(mhc::fused::prepare_branch_backward(parameters, x, coefficients, shared, grad.post, grad.res, shared,
                                                   grad_parameters, workspace),
               std::invalid_argument);
}

// Every fused kernel that reads x to compute 1/r rejects a NaN or infinite entry, naming its
// position as mhc::compute_coefficients does.
TEST(FusedNonFinite, KernelsNameFirstBadEntry) {
  const auto parameters = random_parameters<float>(2, 20, 801);
  RowMatrix<float> x = random_state<float>(40, 40, 802);
  x(37, 3) = std::numeric_limits<float>::infinity();
  x(21, 30) = std::numeric_limits<float>::quiet_NaN();
  const RowMatrix<float> grad_input = random_state<float>(40, 20, 803);
  const auto grad = random_coefficient_gradients<float>(2, 40, 804);
  mhc::ThreadPool pool(2);
  mhc::fused::Workspace<float, float> workspace(&pool);
  mhc::Coefficients<float> coefficients;
  RowMatrix<float> input(40, 20);
  RowMatrix<float> grad_x(40, 40);
  mhc::Parameters<float> grad_parameters;
  const std::string position = "got nan at (21, 30)";

  try {
    mhc::fused::prepare_branch(parameters, x, coefficients, input, workspace);
    FAIL() << "expected std::invalid_argument";
  } catch (const std::invalid_argument& error) {
    EXPECT_EQ(std::string(error.what()),
              "mhc::fused::prepare_branch: invalid x: expected finite entries, " + position);
  }
  try {
    mhc::fused::coefficients_backward(parameters, x, grad.pre, grad.post, grad.res, grad_x, grad_parameters,
                                      workspace);
    FAIL() << "expected std::invalid_argument";
  } catch (const std::invalid_argument& error) {
    EXPECT_EQ(std::string(error.what()),
              "mhc::fused::coefficients_backward: invalid x: expected finite entries, " + position);
  }
  coefficients.pre = RowMatrix<float>::Constant(40, 2, 0.5f);
  coefficients.post = RowMatrix<float>::Constant(40, 2, 1.0f);
  coefficients.res = RowMatrix<float>::Constant(40, 4, 0.5f);
  try {
    mhc::fused::prepare_branch_backward(parameters, x, coefficients, grad_input, grad.post, grad.res, grad_x,
                                        grad_parameters, workspace);
    FAIL() << "expected std::invalid_argument";
  } catch (const std::invalid_argument& error) {
    EXPECT_EQ(std::string(error.what()),
              "mhc::fused::prepare_branch_backward: invalid x: expected finite entries, " + position);
  }
}

// Float rows with entries above about 1e18 overflow a float sum of squares. The kernels then
// compute 1/r in double, as the reference kernels always do, and must agree with them.
TEST(FusedNonFinite, HugeFloatRowsKeepFiniteCoefficients) {
  const auto parameters = random_parameters<float>(4, 8, 811);
  const RowMatrix<float> x = (random_state<double>(5, 32, 812) * 1e25).cast<float>();
  mhc::fused::Workspace<float, float> workspace;
  mhc::Coefficients<float> coefficients;
  RowMatrix<float> input(5, 8);
  mhc::fused::prepare_branch(parameters, x, coefficients, input, workspace);
  const mhc::Coefficients<float> expected = mhc::compute_coefficients(parameters, x);
  ASSERT_TRUE(coefficients.pre.allFinite());
  ASSERT_TRUE(coefficients.res.allFinite());
  const double bound = tolerance<float>(32.0 * 24.0);
  EXPECT_TRUE(coefficients.pre.isApprox(expected.pre, float(bound)));
  EXPECT_TRUE(coefficients.post.isApprox(expected.post, float(bound)));
  EXPECT_TRUE(coefficients.res.isApprox(expected.res, float(bound)));

  const auto grad = random_coefficient_gradients<float>(4, 5, 813);
  RowMatrix<float> grad_x(5, 32);
  mhc::Parameters<float> grad_parameters;
  mhc::fused::coefficients_backward(parameters, x, grad.pre, grad.post, grad.res, grad_x, grad_parameters, workspace);
  EXPECT_TRUE(grad_x.allFinite());
  EXPECT_TRUE(grad_parameters.phi.allFinite());
}

// The gradients through 1/r and the alphas multiply quantities that grow with x (the logit
// gradients, through H_pre, and the projections). For float rows near 1e20 their plain products
// overflowed; both backward implementations must stay finite and agree with a double reference.
TEST(FusedNonFinite, HugeFloatRowsKeepFiniteGradients) {
  const int n = 4;
  const int channels = 8;
  const Eigen::Index tokens = 5;
  const Eigen::Index width = Eigen::Index(n) * channels;
  auto parameters = mhc::Parameters<float>::identity(n, channels, 0);
  parameters.phi = mhc::test::random_matrix<float>(width, parameters.coefficient_count(), 821, 0.1);
  const RowMatrix<float> x = (random_state<double>(tokens, width, 822) * 1e20).cast<float>();
  const RowMatrix<float> output = random_state<float>(tokens, channels, 823);
  const RowMatrix<float> grad_next = random_state<float>(tokens, width, 824);
  const RowMatrix<float> grad_input = random_state<float>(tokens, channels, 825);

  mhc::fused::Workspace<float, float> workspace;
  mhc::Coefficients<float> coefficients;
  RowMatrix<float> input(tokens, channels), grad_x(tokens, width), grad_output(tokens, channels);
  RowMatrix<float> grad_post, grad_res;
  mhc::Parameters<float> grad_parameters;
  mhc::fused::prepare_branch(parameters, x, coefficients, input, workspace);
  mhc::fused::merge_streams_backward(coefficients, x, output, grad_next, grad_x, grad_output, grad_post, grad_res,
                                     workspace);
  mhc::fused::prepare_branch_backward(parameters, x, coefficients, grad_input, grad_post, grad_res, grad_x,
                                      grad_parameters, workspace, mhc::Options{}, GradientWrite::kAdd);
  EXPECT_TRUE(grad_x.allFinite());
  EXPECT_TRUE(grad_parameters.phi.allFinite());
  EXPECT_TRUE(grad_parameters.bias.allFinite());
  EXPECT_TRUE(std::isfinite(grad_parameters.alpha_pre));
  EXPECT_TRUE(std::isfinite(grad_parameters.alpha_post));
  EXPECT_TRUE(std::isfinite(grad_parameters.alpha_res));

  const auto merged_float = mhc::merge_backward(parameters, x, output, grad_next);
  const auto reference_float = mhc::prepare_branch_backward(parameters, x, merged_float, grad_input);
  EXPECT_TRUE(reference_float.x.allFinite());
  EXPECT_TRUE(std::isfinite(reference_float.parameters.alpha_pre));
  EXPECT_TRUE(std::isfinite(reference_float.parameters.alpha_res));

  const auto double_parameters = to_double(parameters);
  const auto merged = mhc::merge_backward(double_parameters, widen(x), widen(output), widen(grad_next));
  const auto expected = mhc::prepare_branch_backward(double_parameters, widen(x), merged, widen(grad_input));
  const double relative = 1e-3;
  expect_near_matrix(grad_x, expected.x, relative, 0.0, "grad_x");
  EXPECT_NEAR(double(grad_parameters.alpha_pre), expected.parameters.alpha_pre,
              relative * std::abs(expected.parameters.alpha_pre));
  EXPECT_NEAR(double(grad_parameters.alpha_res), expected.parameters.alpha_res,
              relative * std::abs(expected.parameters.alpha_res));
}

TEST(FusedCoefficientsBackwardErrors, RejectsSharedOutputsAndBadGradientOption) {
  const auto parameters = random_parameters<float>(3, 5, 831);
  const RowMatrix<float> x = random_state<float>(4, 15, 832);
  const RowMatrix<float> output = random_state<float>(4, 5, 833);
  const auto grad = random_coefficient_gradients<float>(3, 4, 834);
  mhc::fused::Workspace<float, float> workspace;
  mhc::Coefficients<float> coefficients;
  RowMatrix<float> input(4, 5), grad_x(4, 15), grad_output(4, 5);
  mhc::fused::prepare_branch(parameters, x, coefficients, input, workspace);

  RowMatrix<float> shared;
  EXPECT_THROW(mhc::fused::merge_streams_backward(coefficients, x, output, x, grad_x, grad_output, shared, shared,
                                                  workspace),
               std::invalid_argument);

  mhc::Options bad_gradient;
  bad_gradient.sinkhorn.gradient = static_cast<mhc::SinkhornGradient>(7);
  mhc::Parameters<float> grad_parameters;
  try {
    mhc::fused::coefficients_backward(parameters, x, grad.pre, grad.post, grad.res, grad_x, grad_parameters,
                                      workspace, bad_gradient);
    FAIL() << "expected std::invalid_argument";
  } catch (const std::invalid_argument& error) {
    EXPECT_EQ(std::string(error.what()),
              "mhc::fused::coefficients_backward: invalid options.sinkhorn.gradient: expected "
              "SinkhornGradient::unrolled or implicit, got 7");
  }
}

}  // namespace
