// Tests of the layer backward: finite differences in double on every input and parameter,
// float against double, bitwise agreement of the recompute and keep-coefficients modes and of
// the halves with the one-call form, and argument checks.
#include <mhc/backward.hpp>
#include <mhc/mhc.hpp>

#include "support.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using mhc::Coefficients;
using mhc::LayerGradients;
using mhc::Options;
using mhc::Parameters;
using mhc::RowMatrix;
using mhc::test::TanhMlp;

// Size of the coefficient logits. Small logits keep every coefficient away from saturation, and
// large ones push the sigmoids towards 0 or 1 and H_res towards a permutation.
enum class LogitScale { small, large };

// Random layer parameters. A column of phi has norm about 1, so for a token of any RMS
// alpha * (x phi) / r is about alpha in size. `scale` picks the alphas and the bias spread.
template <typename Scalar>
Parameters<Scalar> random_parameters(int streams, int channels, LogitScale scale, std::uint32_t seed) {
  const double logit_size = scale == LogitScale::small ? 0.5 : 4.0;
  Parameters<Scalar> parameters;
  parameters.streams = streams;
  parameters.channels = channels;
  const int width = streams * channels;
  parameters.phi = mhc::test::random_matrix<Scalar>(width, parameters.coefficient_count(), seed,
                                                    1.0 / std::sqrt(double(width)));
  parameters.bias = mhc::test::random_matrix<Scalar>(1, parameters.coefficient_count(), seed + 1, logit_size);
  parameters.alpha_pre = Scalar(0.7 * logit_size);
  parameters.alpha_post = Scalar(0.9 * logit_size);
  parameters.alpha_res = Scalar(1.1 * logit_size);
  return parameters;
}

template <typename Target, typename Source>
Parameters<Target> cast_parameters(const Parameters<Source>& source) {
  Parameters<Target> target;
  target.streams = source.streams;
  target.channels = source.channels;
  target.phi = source.phi.template cast<Target>();
  target.bias = source.bias.template cast<Target>();
  target.alpha_pre = static_cast<Target>(source.alpha_pre);
  target.alpha_post = static_cast<Target>(source.alpha_post);
  target.alpha_res = static_cast<Target>(source.alpha_res);
  return target;
}

// One layer problem: parameters, state, branch and a random upstream gradient. The upstream
// gradient is random because a structured one can hide errors: an all-ones gradient of H_res,
// for instance, gives an exactly zero gradient of its logits.
template <typename Scalar>
struct LayerCase {
  Parameters<Scalar> parameters;
  RowMatrix<Scalar> x;
  RowMatrix<Scalar> grad_x_next;
  TanhMlp<Scalar> branch;
  Options options;
};

template <typename Scalar>
LayerCase<Scalar> make_case(int streams, int channels, Eigen::Index tokens, int iterations,
                            LogitScale scale, std::uint32_t seed) {
  LayerCase<Scalar> layer;
  layer.parameters = random_parameters<Scalar>(streams, channels, scale, seed);
  layer.x = mhc::test::random_matrix<Scalar>(tokens, streams * channels, seed + 10);
  // Give each token its own RMS, so a 1/r shared between tokens would show.
  for (Eigen::Index t = 0; t < tokens; ++t) layer.x.row(t) *= Scalar(0.5 + 0.4 * double(t));
  layer.grad_x_next = mhc::test::random_matrix<Scalar>(tokens, streams * channels, seed + 20);
  layer.branch = TanhMlp<Scalar>::random(channels, 6, seed + 30);
  layer.options.sinkhorn.iterations = iterations;
  return layer;
}

template <typename Target, typename Source>
LayerCase<Target> cast_case(const LayerCase<Source>& source) {
  LayerCase<Target> target;
  target.parameters = cast_parameters<Target>(source.parameters);
  target.x = source.x.template cast<Target>();
  target.grad_x_next = source.grad_x_next.template cast<Target>();
  target.branch.w1 = source.branch.w1.template cast<Target>();
  target.branch.b1 = source.branch.b1.template cast<Target>();
  target.branch.w2 = source.branch.w2.template cast<Target>();
  target.options = source.options;
  return target;
}

template <typename Scalar>
LayerGradients<Scalar> one_call_backward(const LayerCase<Scalar>& layer) {
  const TanhMlp<Scalar>& branch = layer.branch;
  return mhc::backward(
      layer.parameters, layer.x, layer.grad_x_next,
      [&](const RowMatrix<Scalar>& input) { return branch(input); },
      [&](const RowMatrix<Scalar>& input, const RowMatrix<Scalar>& grad_output) {
        return branch.backward(input, grad_output);
      },
      layer.options);
}

// The loss sum(grad_x_next * x_next) whose gradients the backward computes.
double layer_loss(const LayerCase<double>& layer) {
  const RowMatrix<double> x_next = mhc::forward(
      layer.parameters, layer.x, [&](const RowMatrix<double>& input) { return layer.branch(input); },
      layer.options);
  return (x_next.array() * layer.grad_x_next.array()).sum();
}

// Central difference of the loss along one scalar of the case, selected by `entry`.
double loss_derivative(LayerCase<double> layer, const std::function<double&(LayerCase<double>&)>& entry) {
  const double step = 1e-5;
  const double origin = entry(layer);
  return mhc::test::central_difference(
      [&](double offset) {
        entry(layer) = origin + offset;
        return layer_loss(layer);
      },
      step);
}

// The central difference with step 1e-5 has a truncation error of about 1e-10 times the third
// derivative and a rounding error of about 1e-11 times the loss. A tolerance of 1e-7 relative
// to the derivative (at least 1) is ten times the worst error seen on these cases.
constexpr double finite_difference_tolerance = 1e-7;

void expect_near_derivative(double analytic, double numeric, const std::string& what) {
  EXPECT_NEAR(analytic, numeric, finite_difference_tolerance * std::max(1.0, std::abs(numeric))) << what;
}

void check_against_finite_differences(const LayerCase<double>& layer) {
  const LayerGradients<double> gradients = one_call_backward(layer);
  const Parameters<double>& grad = gradients.parameters;

  for (Eigen::Index k = 0; k < layer.x.size(); ++k) {
    const double numeric = loss_derivative(layer, [k](LayerCase<double>& c) -> double& { return c.x.data()[k]; });
    expect_near_derivative(gradients.x.data()[k], numeric, "x entry " + std::to_string(k));
  }
  for (Eigen::Index k = 0; k < layer.parameters.phi.size(); ++k) {
    const double numeric =
        loss_derivative(layer, [k](LayerCase<double>& c) -> double& { return c.parameters.phi.data()[k]; });
    expect_near_derivative(grad.phi.data()[k], numeric, "phi entry " + std::to_string(k));
  }
  for (Eigen::Index k = 0; k < layer.parameters.bias.size(); ++k) {
    const double numeric =
        loss_derivative(layer, [k](LayerCase<double>& c) -> double& { return c.parameters.bias(k); });
    expect_near_derivative(grad.bias(k), numeric, "bias entry " + std::to_string(k));
  }
  expect_near_derivative(grad.alpha_pre,
                         loss_derivative(layer, [](LayerCase<double>& c) -> double& { return c.parameters.alpha_pre; }),
                         "alpha_pre");
  expect_near_derivative(grad.alpha_post,
                         loss_derivative(layer, [](LayerCase<double>& c) -> double& { return c.parameters.alpha_post; }),
                         "alpha_post");
  expect_near_derivative(grad.alpha_res,
                         loss_derivative(layer, [](LayerCase<double>& c) -> double& { return c.parameters.alpha_res; }),
                         "alpha_res");
}

struct GradientCase {
  int streams;
  int channels;
  Eigen::Index tokens;
  int iterations;
  LogitScale scale;
};

std::string describe(const GradientCase& c) {
  return "n=" + std::to_string(c.streams) + " C=" + std::to_string(c.channels) + " T=" + std::to_string(c.tokens) +
         " iterations=" + std::to_string(c.iterations) + (c.scale == LogitScale::small ? " small" : " large");
}

std::vector<GradientCase> gradient_cases() {
  std::vector<GradientCase> cases;
  for (int streams : {1, 2, 3, 4, 8}) {
    for (int iterations : {1, 20}) {
      for (LogitScale scale : {LogitScale::small, LogitScale::large}) {
        const int channels = streams == 8 ? 2 : 3;  // C = 2 keeps n = 8 fast (phi is 16 x 80)
        cases.push_back({streams, channels, 2, iterations, scale});
      }
    }
  }
  cases.push_back({4, 5, 1, 20, LogitScale::small});  // one token, C = 5
  return cases;
}

TEST(LayerBackward, MatchesFiniteDifferences) {
  std::uint32_t seed = 100;
  for (const GradientCase& c : gradient_cases()) {
    SCOPED_TRACE(describe(c));
    check_against_finite_differences(make_case<double>(c.streams, c.channels, c.tokens, c.iterations, c.scale, seed));
    seed += 100;
  }
}

// A large H_res logit spread must actually make H_res close to a permutation, or the large
// cases above would not test the saturated regime.
TEST(LayerBackward, LargeLogitsSaturateMixing) {
  const LayerCase<double> layer = make_case<double>(4, 3, 2, 20, LogitScale::large, 300);
  const Coefficients<double> coefficients = mhc::compute_coefficients(layer.parameters, layer.x, layer.options);
  EXPECT_GT(coefficients.res.maxCoeff(), 0.9);
}

TEST(LayerBackward, EmptyBatchGivesZeroGradients) {
  const LayerCase<double> layer = make_case<double>(4, 3, 0, 20, LogitScale::small, 400);
  const LayerGradients<double> gradients = one_call_backward(layer);
  EXPECT_EQ(gradients.x.rows(), 0);
  EXPECT_EQ(gradients.x.cols(), 12);
  EXPECT_EQ(gradients.parameters.phi.rows(), 12);
  EXPECT_EQ(gradients.parameters.phi.cols(), 24);
  EXPECT_EQ(gradients.parameters.bias.size(), 24);
  for (Eigen::Index k = 0; k < gradients.parameters.phi.size(); ++k) EXPECT_EQ(gradients.parameters.phi.data()[k], 0.0);
  for (Eigen::Index k = 0; k < gradients.parameters.bias.size(); ++k) EXPECT_EQ(gradients.parameters.bias(k), 0.0);
  EXPECT_EQ(gradients.parameters.alpha_pre, 0.0);
  EXPECT_EQ(gradients.parameters.alpha_post, 0.0);
  EXPECT_EQ(gradients.parameters.alpha_res, 0.0);
}

TEST(LayerBackward, CopiesShapeIntoGradients) {
  const LayerCase<double> layer = make_case<double>(3, 5, 2, 20, LogitScale::small, 500);
  const LayerGradients<double> gradients = one_call_backward(layer);
  EXPECT_EQ(gradients.parameters.streams, 3);
  EXPECT_EQ(gradients.parameters.channels, 5);
}

TEST(LayerBackward, FloatAgreesWithDouble) {
  using Scalar = float;
  for (int streams : {1, 2, 4, 8}) {
    for (LogitScale scale : {LogitScale::small, LogitScale::large}) {
      SCOPED_TRACE("n=" + std::to_string(streams) + (scale == LogitScale::small ? " small" : " large"));
      const int channels = 5;
      const LayerCase<Scalar> layer = make_case<Scalar>(streams, channels, 3, 20, scale, 1000 + streams);
      const LayerGradients<Scalar> low = one_call_backward(layer);
      const LayerGradients<double> high = one_call_backward(cast_case<double>(layer));

      // Each gradient entry is a sum over n*C products, passed through 2 * 20 Sinkhorn
      // normalisations of n-term sums.
      const double operations = double(streams * channels) + 40.0 * streams;
      const double tolerance = mhc::test::tolerance<Scalar>(operations);
      const auto expect_close = [&](const auto& actual, const auto& expected, const char* what) {
        for (Eigen::Index k = 0; k < expected.size(); ++k) {
          const double reference = expected.data()[k];
          EXPECT_NEAR(double(actual.data()[k]), reference, tolerance * std::max(1.0, std::abs(reference)))
              << what << " entry " << k;
        }
      };
      expect_close(low.x, high.x, "x");
      expect_close(low.parameters.phi, high.parameters.phi, "phi");
      expect_close(low.parameters.bias, high.parameters.bias, "bias");
      const double alpha_scale = std::max({1.0, std::abs(high.parameters.alpha_pre), std::abs(high.parameters.alpha_post),
                                           std::abs(high.parameters.alpha_res)});
      EXPECT_NEAR(double(low.parameters.alpha_pre), high.parameters.alpha_pre, tolerance * alpha_scale);
      EXPECT_NEAR(double(low.parameters.alpha_post), high.parameters.alpha_post, tolerance * alpha_scale);
      EXPECT_NEAR(double(low.parameters.alpha_res), high.parameters.alpha_res, tolerance * alpha_scale);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Typed tests over float and double.

template <typename Scalar>
class TypedLayerBackward : public ::testing::Test {};
// The empty third argument (the default name generator) keeps Clang's
// -Wgnu-zero-variadic-macro-arguments quiet with GoogleTest 1.12.
TYPED_TEST_SUITE(TypedLayerBackward, mhc::test::ScalarTypes, );

template <typename Scalar>
void expect_bitwise_equal(const RowMatrix<Scalar>& actual, const RowMatrix<Scalar>& expected, const std::string& what) {
  ASSERT_EQ(actual.rows(), expected.rows()) << what;
  ASSERT_EQ(actual.cols(), expected.cols()) << what;
  for (Eigen::Index k = 0; k < actual.size(); ++k) EXPECT_EQ(actual.data()[k], expected.data()[k]) << what << " entry " << k;
}

template <typename Scalar>
void expect_bitwise_equal(const LayerGradients<Scalar>& actual, const LayerGradients<Scalar>& expected) {
  expect_bitwise_equal(actual.x, expected.x, "x");
  expect_bitwise_equal(actual.parameters.phi, expected.parameters.phi, "phi");
  expect_bitwise_equal(RowMatrix<Scalar>(actual.parameters.bias), RowMatrix<Scalar>(expected.parameters.bias), "bias");
  EXPECT_EQ(actual.parameters.alpha_pre, expected.parameters.alpha_pre);
  EXPECT_EQ(actual.parameters.alpha_post, expected.parameters.alpha_post);
  EXPECT_EQ(actual.parameters.alpha_res, expected.parameters.alpha_res);
}

// The halves with the coefficients recomputed, or kept from prepare_branch().
template <typename Scalar>
LayerGradients<Scalar> halves_backward(const LayerCase<Scalar>& layer, bool keep_coefficients) {
  mhc::BranchInput<Scalar> prepared = mhc::prepare_branch(layer.parameters, layer.x, layer.options);
  const RowMatrix<Scalar> branch_output = layer.branch(prepared.input);
  const mhc::MergeBackward<Scalar> merged =
      keep_coefficients ? mhc::merge_backward(layer.parameters, layer.x, std::move(prepared.coefficients),
                                              branch_output, layer.grad_x_next, layer.options)
                        : mhc::merge_backward(layer.parameters, layer.x, branch_output, layer.grad_x_next, layer.options);
  const RowMatrix<Scalar> grad_branch_input = layer.branch.backward(prepared.input, merged.gradients.branch_output);
  return mhc::prepare_branch_backward(layer.parameters, layer.x, merged, grad_branch_input, layer.options);
}

TYPED_TEST(TypedLayerBackward, KeptCoefficientsMatchRecomputed) {
  using Scalar = TypeParam;
  for (int streams : {1, 2, 4, 8}) {
    SCOPED_TRACE("n=" + std::to_string(streams));
    const LayerCase<Scalar> layer = make_case<Scalar>(streams, 7, 5, 20, LogitScale::large, 600 + streams);
    expect_bitwise_equal(halves_backward(layer, true), halves_backward(layer, false));
  }
}

TYPED_TEST(TypedLayerBackward, HalvesMatchOneCall) {
  using Scalar = TypeParam;
  for (int streams : {1, 2, 4, 8}) {
    SCOPED_TRACE("n=" + std::to_string(streams));
    const LayerCase<Scalar> layer = make_case<Scalar>(streams, 7, 5, 20, LogitScale::small, 700 + streams);
    expect_bitwise_equal(halves_backward(layer, false), one_call_backward(layer));
  }
}

TYPED_TEST(TypedLayerBackward, RepeatedCallsAreBitwiseEqual) {
  using Scalar = TypeParam;
  const LayerCase<Scalar> layer = make_case<Scalar>(4, 9, 33, 20, LogitScale::small, 800);
  expect_bitwise_equal(one_call_backward(layer), one_call_backward(layer));
}

// A block of rows and an Eigen::Map over the caller's buffer give the same gradients as a plain
// matrix of the same rows.
TYPED_TEST(TypedLayerBackward, ViewsMatchPlainMatrices) {
  using Scalar = TypeParam;
  const LayerCase<Scalar> layer = make_case<Scalar>(3, 5, 6, 20, LogitScale::small, 850);
  const Coefficients<Scalar> grad = mhc::compute_coefficients(layer.parameters, layer.x, layer.options);
  Coefficients<Scalar> middle_grad;
  middle_grad.pre = grad.pre.middleRows(2, 3);
  middle_grad.post = grad.post.middleRows(2, 3);
  middle_grad.res = grad.res.middleRows(2, 3);
  const RowMatrix<Scalar> middle = layer.x.middleRows(2, 3);
  const Eigen::Map<const RowMatrix<Scalar>> mapped(layer.x.row(2).data(), 3, layer.x.cols());

  const auto plain = mhc::compute_coefficients_backward(layer.parameters, middle, middle_grad, layer.options);
  const auto block =
      mhc::compute_coefficients_backward(layer.parameters, layer.x.middleRows(2, 3), middle_grad, layer.options);
  const auto map = mhc::compute_coefficients_backward(layer.parameters, mapped, middle_grad, layer.options);

  expect_bitwise_equal(block.x, plain.x, "x from a block");
  expect_bitwise_equal(block.parameters.phi, plain.parameters.phi, "phi from a block");
  expect_bitwise_equal(map.x, plain.x, "x from a map");
  expect_bitwise_equal(map.parameters.phi, plain.parameters.phi, "phi from a map");
}

// The gradients split by path add up to the total of prepare_branch_backward().
TYPED_TEST(TypedLayerBackward, PathsSumToTotal) {
  using Scalar = TypeParam;
  const LayerCase<Scalar> layer = make_case<Scalar>(4, 5, 3, 20, LogitScale::small, 900);
  const mhc::BranchInput<Scalar> prepared = mhc::prepare_branch(layer.parameters, layer.x, layer.options);
  const RowMatrix<Scalar> branch_output = layer.branch(prepared.input);
  const mhc::MergeBackward<Scalar> merged =
      mhc::merge_backward(layer.parameters, layer.x, branch_output, layer.grad_x_next, layer.options);
  const RowMatrix<Scalar> grad_input = layer.branch.backward(prepared.input, merged.gradients.branch_output);
  const LayerGradients<Scalar> total =
      mhc::prepare_branch_backward(layer.parameters, layer.x, merged, grad_input, layer.options);

  const mhc::AggregateGradients<Scalar> aggregated =
      mhc::aggregate_streams_backward(merged.coefficients, layer.x, grad_input);
  Coefficients<Scalar> grad_coefficients{aggregated.pre, merged.gradients.post, merged.gradients.res};
  const auto through_coefficients =
      mhc::compute_coefficients_backward(layer.parameters, layer.x, grad_coefficients, layer.options);

  const RowMatrix<Scalar> sum = merged.gradients.x + aggregated.x + through_coefficients.x;
  expect_bitwise_equal(total.x, sum, "x");
  expect_bitwise_equal(total.parameters.phi, through_coefficients.parameters.phi, "phi");
}

// ---------------------------------------------------------------------------------------------
// Argument checks.

// Expects `call` to throw std::invalid_argument whose message contains every part.
template <typename Call>
void expect_invalid_argument(Call&& call, const std::vector<std::string>& parts) {
  try {
    call();
    ADD_FAILURE() << "no exception thrown; expected one mentioning " << parts.front();
  } catch (const std::invalid_argument& error) {
    const std::string message = error.what();
    for (const std::string& part : parts) EXPECT_NE(message.find(part), std::string::npos) << message;
  }
}

TYPED_TEST(TypedLayerBackward, CoefficientsBackwardRejectsBadInput) {
  using Scalar = TypeParam;
  const LayerCase<Scalar> layer = make_case<Scalar>(2, 3, 4, 20, LogitScale::small, 1100);
  const Coefficients<Scalar> grad = mhc::compute_coefficients(layer.parameters, layer.x, layer.options);
  const char* function = "mhc::compute_coefficients_backward";

  const RowMatrix<Scalar> narrow_x = layer.x.leftCols(5);
  expect_invalid_argument([&] { mhc::compute_coefficients_backward(layer.parameters, narrow_x, grad); },
                          {function, "invalid x", "expected 6 columns", "got 5 columns"});

  Coefficients<Scalar> short_pre = grad;
  short_pre.pre = grad.pre.topRows(3);
  expect_invalid_argument([&] { mhc::compute_coefficients_backward(layer.parameters, layer.x, short_pre); },
                          {function, "grad_coefficients.pre", "shape 4 x 2", "got 3 x 2"});

  Coefficients<Scalar> wide_post = grad;
  wide_post.post = RowMatrix<Scalar>::Zero(4, 3);
  expect_invalid_argument([&] { mhc::compute_coefficients_backward(layer.parameters, layer.x, wide_post); },
                          {function, "grad_coefficients.post", "shape 4 x 2", "got 4 x 3"});

  Coefficients<Scalar> wrong_res = grad;
  wrong_res.res = RowMatrix<Scalar>::Zero(4, 2);
  expect_invalid_argument([&] { mhc::compute_coefficients_backward(layer.parameters, layer.x, wrong_res); },
                          {function, "grad_coefficients.res", "shape 4 x 4", "got 4 x 2"});

  Parameters<Scalar> bad_phi = layer.parameters;
  bad_phi.phi = RowMatrix<Scalar>::Zero(6, 7);
  expect_invalid_argument([&] { mhc::compute_coefficients_backward(bad_phi, layer.x, grad); },
                          {function, "parameters.phi", "shape 6 x 8", "got 6 x 7"});

  Parameters<Scalar> bad_bias = layer.parameters;
  bad_bias.bias = mhc::RowVector<Scalar>::Zero(5);
  expect_invalid_argument([&] { mhc::compute_coefficients_backward(bad_bias, layer.x, grad); },
                          {function, "parameters.bias", "8 entries", "got 5 entries"});

  Parameters<Scalar> infinite_alpha = layer.parameters;
  infinite_alpha.alpha_res = std::numeric_limits<Scalar>::infinity();
  expect_invalid_argument([&] { mhc::compute_coefficients_backward(infinite_alpha, layer.x, grad); },
                          {function, "parameters.alpha_res", "a finite value"});

  Options negative_iterations;
  negative_iterations.sinkhorn.iterations = -1;
  expect_invalid_argument(
      [&] { mhc::compute_coefficients_backward(layer.parameters, layer.x, grad, negative_iterations); },
      {function, "options.sinkhorn.iterations", "at least 0", "got -1"});

  Options zero_epsilon;
  zero_epsilon.rms_epsilon = 0.0;
  expect_invalid_argument([&] { mhc::compute_coefficients_backward(layer.parameters, layer.x, grad, zero_epsilon); },
                          {function, "options.rms_epsilon", "a positive finite value"});
}

TYPED_TEST(TypedLayerBackward, HalvesRejectBadInput) {
  using Scalar = TypeParam;
  const LayerCase<Scalar> layer = make_case<Scalar>(2, 3, 4, 20, LogitScale::small, 1200);
  const mhc::BranchInput<Scalar> prepared = mhc::prepare_branch(layer.parameters, layer.x, layer.options);
  const RowMatrix<Scalar> branch_output = layer.branch(prepared.input);

  const RowMatrix<Scalar> short_output = branch_output.topRows(3);
  expect_invalid_argument(
      [&] { mhc::merge_backward(layer.parameters, layer.x, short_output, layer.grad_x_next); },
      {"mhc::merge_backward", "branch_output", "shape 4 x 3", "got 3 x 3"});

  const RowMatrix<Scalar> narrow_grad = layer.grad_x_next.leftCols(4);
  expect_invalid_argument(
      [&] { mhc::merge_backward(layer.parameters, layer.x, branch_output, narrow_grad); },
      {"mhc::merge_backward", "grad_x_next", "shape 4 x 6", "got 4 x 4"});

  const RowMatrix<Scalar> narrow_x = layer.x.leftCols(4);
  expect_invalid_argument(
      [&] { mhc::merge_backward(layer.parameters, narrow_x, branch_output, layer.grad_x_next); },
      {"mhc::merge_backward", "invalid x", "expected 6 columns", "got 4 columns"});

  Coefficients<Scalar> three_streams = prepared.coefficients;
  three_streams.pre = RowMatrix<Scalar>::Zero(4, 3);
  expect_invalid_argument(
      [&] { mhc::merge_backward(layer.parameters, layer.x, three_streams, branch_output, layer.grad_x_next); },
      {"mhc::merge_backward", "coefficients.pre", "shape 4 x 2", "got 4 x 3"});

  const mhc::MergeBackward<Scalar> merged =
      mhc::merge_backward(layer.parameters, layer.x, branch_output, layer.grad_x_next);
  const RowMatrix<Scalar> grad_input = layer.branch.backward(prepared.input, merged.gradients.branch_output);
  const char* second = "mhc::prepare_branch_backward";

  const RowMatrix<Scalar> wide_grad_input = RowMatrix<Scalar>::Zero(4, 4);
  expect_invalid_argument(
      [&] { mhc::prepare_branch_backward(layer.parameters, layer.x, merged, wide_grad_input); },
      {second, "grad_branch_input", "shape 4 x 3", "got 4 x 4"});

  mhc::MergeBackward<Scalar> short_merged = merged;
  short_merged.gradients.res = merged.gradients.res.topRows(2);
  expect_invalid_argument([&] { mhc::prepare_branch_backward(layer.parameters, layer.x, short_merged, grad_input); },
                          {second, "merged.gradients.res", "shape 4 x 4", "got 2 x 4"});

  mhc::MergeBackward<Scalar> narrow_merged = merged;
  narrow_merged.gradients.x = merged.gradients.x.leftCols(3);
  expect_invalid_argument([&] { mhc::prepare_branch_backward(layer.parameters, layer.x, narrow_merged, grad_input); },
                          {second, "merged.gradients.x", "shape 4 x 6", "got 4 x 3"});

  mhc::MergeBackward<Scalar> empty_coefficients = merged;
  empty_coefficients.coefficients.post.resize(0, 0);
  expect_invalid_argument(
      [&] { mhc::prepare_branch_backward(layer.parameters, layer.x, empty_coefficients, grad_input); },
      {second, "merged.coefficients.post", "shape 4 x 2", "got 0 x 0"});
}

TYPED_TEST(TypedLayerBackward, OneCallRejectsBadInput) {
  using Scalar = TypeParam;
  const LayerCase<Scalar> layer = make_case<Scalar>(2, 3, 4, 20, LogitScale::small, 1300);
  const auto identity_branch = [](const RowMatrix<Scalar>& input) { return input; };
  const auto identity_backward = [](const RowMatrix<Scalar>&, const RowMatrix<Scalar>& grad) { return grad; };

  const RowMatrix<Scalar> short_grad = layer.grad_x_next.topRows(2);
  expect_invalid_argument(
      [&] { mhc::backward(layer.parameters, layer.x, short_grad, identity_branch, identity_backward); },
      {"mhc::backward", "grad_x_next", "shape 4 x 6", "got 2 x 6"});

  const auto wide_branch = [](const RowMatrix<Scalar>& input) { return RowMatrix<Scalar>::Zero(input.rows(), 5).eval(); };
  expect_invalid_argument(
      [&] { mhc::backward(layer.parameters, layer.x, layer.grad_x_next, wide_branch, identity_backward); },
      {"mhc::backward", "branch output", "shape 4 x 3", "got 4 x 5"});

  const auto short_backward = [](const RowMatrix<Scalar>&, const RowMatrix<Scalar>& grad) {
    return grad.topRows(1).eval();
  };
  expect_invalid_argument(
      [&] { mhc::backward(layer.parameters, layer.x, layer.grad_x_next, identity_branch, short_backward); },
      {"mhc::backward", "branch_backward output", "shape 4 x 3", "got 1 x 3"});
}

}  // namespace
