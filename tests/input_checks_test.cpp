// Input that real callers got wrong: non-finite values, sizes beyond int, extreme magnitudes.
#include <mhc/mhc.hpp>

#include "support.hpp"

#include <gtest/gtest.h>

#include <limits>
#include <string>

namespace {

using mhc::RowMatrix;

template <typename Scalar>
class InputChecksTest : public ::testing::Test {};
TYPED_TEST_SUITE(InputChecksTest, mhc::test::ScalarTypes, mhc::test::ScalarTypeNames);

// Random mHC parameters with phi and alphas large enough that the coefficients depend on x.
template <typename Scalar>
mhc::Parameters<Scalar> random_parameters(int n, int channels) {
  mhc::Parameters<Scalar> parameters = mhc::Parameters<Scalar>::identity(n, channels, 0);
  parameters.phi = mhc::test::random_matrix<Scalar>(n * channels, parameters.coefficient_count(), 7);
  parameters.alpha_pre = parameters.alpha_post = parameters.alpha_res = Scalar(0.5);
  return parameters;
}

// Expects `call` to throw std::invalid_argument whose message contains `fragment`.
template <typename Call>
void expect_invalid_argument(Call&& call, const std::string& fragment) {
  try {
    call();
    ADD_FAILURE() << "no exception; expected one mentioning '" << fragment << "'";
  } catch (const std::invalid_argument& error) {
    EXPECT_NE(std::string(error.what()).find(fragment), std::string::npos) << error.what();
  }
}

TYPED_TEST(InputChecksTest, NonFiniteStateNamesEntry) {
  using Scalar = TypeParam;
  const mhc::Parameters<Scalar> parameters = random_parameters<Scalar>(3, 4);
  RowMatrix<Scalar> x = mhc::test::random_matrix<Scalar>(3, 12, 1);
  x(2, 5) = std::numeric_limits<Scalar>::quiet_NaN();

  expect_invalid_argument([&] { mhc::compute_coefficients(parameters, x); },
                          "mhc::compute_coefficients: invalid x: expected finite entries, got nan at (2, 5)");
  x(2, 5) = std::numeric_limits<Scalar>::infinity();
  expect_invalid_argument([&] { mhc::compute_coefficients(parameters, x); }, "got inf at (2, 5)");
}

TYPED_TEST(InputChecksTest, NonFiniteStateInDynamicRules) {
  using Scalar = TypeParam;
  RowMatrix<Scalar> x = mhc::test::random_matrix<Scalar>(2, 12, 2);
  x(1, 0) = std::numeric_limits<Scalar>::quiet_NaN();
  for (const mhc::Connection connection : {mhc::Connection::dynamic_hc, mhc::Connection::mhc_lite}) {
    SCOPED_TRACE(mhc::to_string(connection));
    const auto block = mhc::HyperConnection<Scalar>::create(connection, 3, 4, 0);
    expect_invalid_argument([&] { block.compute_coefficients(x); }, "invalid x: expected finite entries");
  }
}

TYPED_TEST(InputChecksTest, NonFiniteParametersNameField) {
  using Scalar = TypeParam;
  const RowMatrix<Scalar> x = mhc::test::random_matrix<Scalar>(2, 12, 3);
  mhc::Parameters<Scalar> parameters = random_parameters<Scalar>(3, 4);
  parameters.phi(0, 0) = std::numeric_limits<Scalar>::quiet_NaN();
  expect_invalid_argument([&] { mhc::compute_coefficients(parameters, x); }, "invalid parameters.phi");

  parameters = random_parameters<Scalar>(3, 4);
  parameters.bias(1) = std::numeric_limits<Scalar>::infinity();
  expect_invalid_argument([&] { mhc::compute_coefficients(parameters, x); }, "invalid parameters.bias");
}

TYPED_TEST(InputChecksTest, MergeIntoOverlappingOutputRejected) {
  using Scalar = TypeParam;
  const mhc::Parameters<Scalar> parameters = random_parameters<Scalar>(2, 3);
  RowMatrix<Scalar> x = mhc::test::random_matrix<Scalar>(4, 6, 6);
  const mhc::Coefficients<Scalar> coefficients = mhc::compute_coefficients(parameters, x);
  RowMatrix<Scalar> branch_output = mhc::test::random_matrix<Scalar>(4, 3, 7);

  expect_invalid_argument([&] { mhc::merge_streams<Scalar>(coefficients, x, branch_output, x); },
                          "mhc::merge_streams: invalid x_next: expected memory disjoint from x");
  RowMatrix<Scalar> buffer(5, 6);
  expect_invalid_argument(
      [&] { mhc::merge_streams<Scalar>(coefficients, buffer.topRows(4), branch_output, buffer.bottomRows(4)); },
      "invalid x_next: expected memory disjoint from x");

  RowMatrix<Scalar> x_next(4, 6);
  mhc::merge_streams<Scalar>(coefficients, x, branch_output, x_next);
  EXPECT_TRUE(x_next.allFinite());
}

TEST(InputChecks, StreamCountBeyondIntRejected) {
  expect_invalid_argument([] { mhc::Parameters<float>::identity(46341, 1, 0); }, "streams and channels");
  expect_invalid_argument([] { mhc::Parameters<float>::identity(65536, 65536, 0); }, "streams and channels");
}

TYPED_TEST(InputChecksTest, CoefficientsIgnoreStateScale) {
  // Dividing by the RMS makes the coefficients independent of the scale of x once rms_epsilon
  // is negligible against mean(x^2). Entries of 1e20 and more overflow a float sum of squares,
  // so this guards the wider accumulation.
  using Scalar = TypeParam;
  const mhc::Parameters<Scalar> parameters = random_parameters<Scalar>(4, 5);
  mhc::Options options;
  options.rms_epsilon = 1e-30;
  const RowMatrix<Scalar> x = mhc::test::random_matrix<Scalar>(3, 20, 4);
  const mhc::Coefficients<Scalar> reference = mhc::compute_coefficients(parameters, x, options);
  const double tolerance = mhc::test::tolerance<Scalar>(20.0 + 4 * 20 * 4);

  for (const double scale : {1e20, 1e30}) {
    SCOPED_TRACE(scale);
    const RowMatrix<Scalar> scaled = x * static_cast<Scalar>(scale);
    const mhc::Coefficients<Scalar> coefficients = mhc::compute_coefficients(parameters, scaled, options);
    EXPECT_LE((coefficients.pre - reference.pre).cwiseAbs().maxCoeff(), tolerance);
    EXPECT_LE((coefficients.res - reference.res).cwiseAbs().maxCoeff(), tolerance);
  }
}

TEST(InputChecks, DoubleStateAbove1e154Rescaled) {
  const mhc::Parameters<double> parameters = random_parameters<double>(2, 3);
  mhc::Options options;
  options.rms_epsilon = 1e-30;
  const RowMatrix<double> x = mhc::test::random_matrix<double>(2, 6, 5);
  const mhc::Coefficients<double> reference = mhc::compute_coefficients(parameters, x, options);
  const RowMatrix<double> scaled = x * 1e200;
  const mhc::Coefficients<double> coefficients = mhc::compute_coefficients(parameters, scaled, options);
  EXPECT_LE((coefficients.post - reference.post).cwiseAbs().maxCoeff(), 1e-12);
  EXPECT_LE((coefficients.res - reference.res).cwiseAbs().maxCoeff(), 1e-12);
}

}  // namespace
