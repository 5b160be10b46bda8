// Compares the layer backward with the float64 PyTorch reference in tools/reference (autograd
// gradients stored in tests/data). All gradients are those of the loss sum(grad_x_next * x_next).
// Float runs convert the double inputs to float first, so their error includes the rounding of
// the inputs.
#include <mhc/backward.hpp>
#include <mhc/mhc.hpp>

#include "golden.hpp"
#include "support.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

namespace {

using mhc::RowMatrix;
using mhc::test::GoldenFile;

// Every layer case in tests/data. A listed file that is missing fails the tests.
const char* const kLayerCases[] = {
    "layer_n1_c5_t3",      "layer_n2_c3_t1",       "layer_n2_c7_t5",
    "layer_n3_c5_t3",      "layer_n3_c12_t1",      "layer_n4_c7_t5",
    "layer_n4_c12_t3",     "layer_n4_c5_t3_iter5", "layer_n8_c3_t3",
    "layer_n4_c3_t0",      "regression_swap_n2",   "regression_cycle_n4",
    "regression_post_factor_n4", "regression_small_tokens_n3",
};

// One golden layer case converted to Scalar.
template <typename Scalar>
struct GoldenLayer {
  explicit GoldenLayer(const GoldenFile& file) {
    parameters.streams = file.integer("streams");
    parameters.channels = file.integer("channels");
    parameters.phi = file.array_as<Scalar>("phi");
    parameters.bias = file.array_as<Scalar>("bias");
    parameters.alpha_pre = static_cast<Scalar>(file.scalar("alpha_pre"));
    parameters.alpha_post = static_cast<Scalar>(file.scalar("alpha_post"));
    parameters.alpha_res = static_cast<Scalar>(file.scalar("alpha_res"));
    options.sinkhorn.iterations = file.integer("iterations");
    options.rms_epsilon = file.scalar("rms_epsilon");
    x = file.array_as<Scalar>("x");
    grad_x_next = file.array_as<Scalar>("grad_x_next");
    branch.w1 = file.array_as<Scalar>("w1");
    branch.b1 = file.array_as<Scalar>("b1");
    branch.w2 = file.array_as<Scalar>("w2");
  }

  mhc::Parameters<Scalar> parameters;
  mhc::Options options;
  RowMatrix<Scalar> x;
  RowMatrix<Scalar> grad_x_next;
  mhc::test::TanhMlp<Scalar> branch;  // h_out = tanh(h_in w1 + b1) w2
};

// Rounding steps behind one gradient entry, for mhc::test::tolerance. The forward sums n*C terms
// for the projection and the RMS, C and H terms in the branch and n in the aggregation and the
// merge. The backward repeats each of these sums, and the Sinkhorn backward makes four passes
// over n entries per round in both directions. The last term covers exp and sigmoid of logits
// up to about 10, whose relative error grows with the logit.
double backward_operations(const GoldenFile& file) {
  const double n = file.scalar("streams");
  const double channels = file.scalar("channels");
  const double hidden = file.scalar("hidden");
  const double iterations = file.scalar("iterations");
  return 2.0 * (n * channels + channels + hidden + 2.0 * n) + 8.0 * n * iterations + 10.0;
}

// Expects |actual - expected| <= tolerance * max(1, max |expected|) everywhere and reports the
// worst entry. The scale is the array's largest magnitude because an entry that is a sum of
// large terms which cancel keeps the rounding error of those terms.
template <typename Scalar>
void expect_near_golden(const RowMatrix<Scalar>& actual, const RowMatrix<double>& expected, double tolerance,
                        const std::string& name) {
  ASSERT_EQ(actual.rows(), expected.rows()) << name;
  ASSERT_EQ(actual.cols(), expected.cols()) << name;
  if (expected.size() == 0) return;

  const double scale = std::max(1.0, expected.cwiseAbs().maxCoeff());
  double worst_error = 0.0;
  Eigen::Index worst = 0;
  for (Eigen::Index k = 0; k < expected.size(); ++k) {
    double error = std::abs(static_cast<double>(actual.data()[k]) - expected.data()[k]);
    if (!std::isfinite(error)) error = std::numeric_limits<double>::infinity();
    if (error > worst_error) {
      worst_error = error;
      worst = k;
    }
  }
  EXPECT_LE(worst_error, tolerance * scale)
      << name << " entry " << worst << ": actual " << static_cast<double>(actual.data()[worst]) << ", expected "
      << expected.data()[worst];
}

template <typename Scalar>
void expect_near_golden(Scalar actual, double expected, double tolerance, const std::string& name) {
  EXPECT_NEAR(static_cast<double>(actual), expected, tolerance * std::max(1.0, std::abs(expected))) << name;
}

template <typename Scalar>
void expect_parameters_near_golden(const mhc::Parameters<Scalar>& gradients, const GoldenFile& file,
                                   double tolerance) {
  expect_near_golden(gradients.phi, file.array("grad_phi"), tolerance, "grad_phi");
  expect_near_golden(RowMatrix<Scalar>(gradients.bias), file.array("grad_bias"), tolerance, "grad_bias");
  expect_near_golden(gradients.alpha_pre, file.scalar("grad_alpha_pre"), tolerance, "grad_alpha_pre");
  expect_near_golden(gradients.alpha_post, file.scalar("grad_alpha_post"), tolerance, "grad_alpha_post");
  expect_near_golden(gradients.alpha_res, file.scalar("grad_alpha_res"), tolerance, "grad_alpha_res");
}

template <typename Scalar>
class GoldenBackward : public ::testing::Test {};
// The empty third argument (the default name generator) keeps Clang's
// -Wgnu-zero-variadic-macro-arguments quiet with GoogleTest 1.12.
TYPED_TEST_SUITE(GoldenBackward, mhc::test::ScalarTypes, );

TYPED_TEST(GoldenBackward, HalvesMatchReference) {
  using Scalar = TypeParam;
  for (const char* stem : kLayerCases) {
    SCOPED_TRACE(stem);
    const GoldenFile file = GoldenFile::load(mhc::test::golden_path(std::string(stem) + ".txt"));
    const GoldenLayer<Scalar> layer(file);
    const double tolerance = mhc::test::tolerance<Scalar>(backward_operations(file));

    const mhc::BranchInput<Scalar> prepared = mhc::prepare_branch(layer.parameters, layer.x, layer.options);
    const RowMatrix<Scalar> branch_output = layer.branch(prepared.input);
    const mhc::MergeBackward<Scalar> merged =
        mhc::merge_backward(layer.parameters, layer.x, branch_output, layer.grad_x_next, layer.options);
    const RowMatrix<Scalar> grad_branch_input = layer.branch.backward(prepared.input, merged.gradients.branch_output);
    const mhc::LayerGradients<Scalar> gradients =
        mhc::prepare_branch_backward(layer.parameters, layer.x, merged, grad_branch_input, layer.options);

    expect_near_golden(merged.gradients.x, file.array("grad_x_merge"), tolerance, "grad_x_merge");
    expect_near_golden(merged.gradients.branch_output, file.array("grad_h_out"), tolerance, "grad_h_out");
    expect_near_golden(merged.gradients.post, file.array("grad_post"), tolerance, "grad_post");
    expect_near_golden(merged.gradients.res, file.array("grad_res"), tolerance, "grad_res");
    expect_near_golden(grad_branch_input, file.array("grad_h_in"), tolerance, "grad_h_in");
    expect_near_golden(gradients.x, file.array("grad_x"), tolerance, "grad_x");
    expect_parameters_near_golden(gradients.parameters, file, tolerance);
  }
}

TYPED_TEST(GoldenBackward, OneCallMatchesReference) {
  using Scalar = TypeParam;
  for (const char* stem : kLayerCases) {
    SCOPED_TRACE(stem);
    const GoldenFile file = GoldenFile::load(mhc::test::golden_path(std::string(stem) + ".txt"));
    const GoldenLayer<Scalar> layer(file);
    const double tolerance = mhc::test::tolerance<Scalar>(backward_operations(file));

    const mhc::LayerGradients<Scalar> gradients = mhc::backward(
        layer.parameters, layer.x, layer.grad_x_next, [&](const RowMatrix<Scalar>& input) { return layer.branch(input); },
        [&](const RowMatrix<Scalar>& input, const RowMatrix<Scalar>& grad_output) {
          return layer.branch.backward(input, grad_output);
        },
        layer.options);

    expect_near_golden(gradients.x, file.array("grad_x"), tolerance, "grad_x");
    expect_parameters_near_golden(gradients.parameters, file, tolerance);
  }
}

// The coefficient path alone, fed with the reference's gradients of H_pre, H_post and H_res.
TYPED_TEST(GoldenBackward, CoefficientPathMatchesReference) {
  using Scalar = TypeParam;
  for (const char* stem : kLayerCases) {
    SCOPED_TRACE(stem);
    const GoldenFile file = GoldenFile::load(mhc::test::golden_path(std::string(stem) + ".txt"));
    const GoldenLayer<Scalar> layer(file);
    const double tolerance = mhc::test::tolerance<Scalar>(backward_operations(file));
    mhc::Coefficients<Scalar> grad_coefficients;
    grad_coefficients.pre = file.array_as<Scalar>("grad_pre");
    grad_coefficients.post = file.array_as<Scalar>("grad_post");
    grad_coefficients.res = file.array_as<Scalar>("grad_res");

    const auto through_coefficients =
        mhc::compute_coefficients_backward(layer.parameters, layer.x, grad_coefficients, layer.options);

    expect_near_golden(through_coefficients.x, file.array("grad_x_coefficients"), tolerance, "grad_x_coefficients");
    expect_parameters_near_golden(through_coefficients.parameters, file, tolerance);
  }
}

// The aggregation path alone, fed with the reference's gradient of h_in.
TYPED_TEST(GoldenBackward, AggregationPathMatchesReference) {
  using Scalar = TypeParam;
  for (const char* stem : kLayerCases) {
    SCOPED_TRACE(stem);
    const GoldenFile file = GoldenFile::load(mhc::test::golden_path(std::string(stem) + ".txt"));
    const GoldenLayer<Scalar> layer(file);
    const double tolerance = mhc::test::tolerance<Scalar>(backward_operations(file));

    const mhc::Coefficients<Scalar> coefficients =
        mhc::compute_coefficients(layer.parameters, layer.x, layer.options);
    const mhc::AggregateGradients<Scalar> aggregated =
        mhc::aggregate_streams_backward(coefficients, layer.x, file.array_as<Scalar>("grad_h_in"));

    expect_near_golden(aggregated.x, file.array("grad_x_aggregate"), tolerance, "grad_x_aggregate");
    expect_near_golden(aggregated.pre, file.array("grad_pre"), tolerance, "grad_pre");
  }
}

}  // namespace
