// Tests of DeepSeek's parameter layout, its conversions and its coefficient rule (deepseek.hpp).
#include <mhc/deepseek.hpp>

#include "support.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <string>

namespace {

using mhc::DeepSeekOptions;
using mhc::DeepSeekParameters;
using mhc::Options;
using mhc::Parameters;
using mhc::RowMatrix;
using mhc::test::random_matrix;
using mhc::test::tolerance;

template <typename Scalar>
class DeepSeekTyped : public ::testing::Test {};
TYPED_TEST_SUITE(DeepSeekTyped, mhc::test::ScalarTypes, mhc::test::ScalarTypeNames);

template <typename Scalar>
DeepSeekParameters<Scalar> random_deepseek(int streams, int channels, std::uint32_t seed, bool with_norm_weight) {
  DeepSeekParameters<Scalar> parameters;
  parameters.streams = streams;
  parameters.channels = channels;
  const int count = streams * (streams + 2);
  parameters.fn = random_matrix<Scalar>(count, streams * channels, seed, 0.5);
  parameters.scale = random_matrix<Scalar>(1, 3, seed + 1);
  parameters.base = random_matrix<Scalar>(1, count, seed + 2);
  if (with_norm_weight) {
    parameters.norm_weight = (random_matrix<Scalar>(1, streams * channels, seed + 3, 0.1).array() + Scalar(1)).matrix();
  }
  return parameters;
}

template <typename Scalar>
Parameters<Scalar> random_parameters(int streams, int channels, std::uint32_t seed) {
  Parameters<Scalar> parameters = Parameters<Scalar>::identity(streams, channels, 0);
  parameters.phi = random_matrix<Scalar>(parameters.phi.rows(), parameters.phi.cols(), seed);
  parameters.bias = random_matrix<Scalar>(1, parameters.coefficient_count(), seed + 1);
  parameters.alpha_pre = Scalar(0.3);
  parameters.alpha_post = Scalar(-0.2);
  parameters.alpha_res = Scalar(0.4);
  return parameters;
}

// DeepSeek's settings with every difference from the mHC rule switched off.
DeepSeekOptions equivalent_options(int repeat) {
  Options options;
  options.sinkhorn.iterations = repeat;
  return mhc::to_deepseek_options(options);
}

template <typename Scalar>
double max_difference(const RowMatrix<Scalar>& a, const RowMatrix<Scalar>& b) {
  return static_cast<double>((a - b).cwiseAbs().maxCoeff());
}

TYPED_TEST(DeepSeekTyped, ParametersRoundTrip) {
  using Scalar = TypeParam;
  for (int n : {1, 2, 3, 4}) {
    const Parameters<Scalar> original = random_parameters<Scalar>(n, 3, 11);
    const Parameters<Scalar> back = mhc::to_parameters(mhc::to_deepseek(original));
    EXPECT_EQ(back.phi, original.phi) << "n " << n;
    EXPECT_EQ(back.bias, original.bias) << "n " << n;
    EXPECT_EQ(back.alpha_pre, original.alpha_pre);
    EXPECT_EQ(back.alpha_post, original.alpha_post);
    EXPECT_EQ(back.alpha_res, original.alpha_res);
    EXPECT_EQ(back.streams, n);
    EXPECT_EQ(back.channels, 3);
  }
}

TYPED_TEST(DeepSeekTyped, DeepSeekRoundTrip) {
  using Scalar = TypeParam;
  for (int n : {1, 2, 4}) {
    const DeepSeekParameters<Scalar> original = random_deepseek<Scalar>(n, 5, 21, false);
    const DeepSeekParameters<Scalar> back = mhc::to_deepseek(mhc::to_parameters(original));
    EXPECT_EQ(back.fn, original.fn) << "n " << n;
    EXPECT_EQ(back.base, original.base) << "n " << n;
    EXPECT_EQ(back.scale, original.scale) << "n " << n;
    EXPECT_EQ(back.norm_weight.size(), 0);
  }
}

TEST(DeepSeekLayout, CombBlockIsSourceMajor) {
  // n = 3: DeepSeek's comb entry (source 0, destination 2) is row 2n + 0*3 + 2 = 8 of fn; in this
  // library it is H_res[2][0], column 2n + 2*3 + 0 = 12 of phi.
  DeepSeekParameters<double> deepseek = random_deepseek<double>(3, 2, 31, false);
  deepseek.fn.row(8).setConstant(7.0);
  deepseek.base(8) = -5.0;
  const Parameters<double> parameters = mhc::to_parameters(deepseek);
  EXPECT_EQ(parameters.phi.col(12), Eigen::VectorXd::Constant(6, 7.0));
  EXPECT_EQ(parameters.bias(12), -5.0);
  EXPECT_NE(parameters.bias(8), -5.0);
  // The pre and post blocks keep their positions: phi column k is fn row k.
  EXPECT_EQ(parameters.phi.col(4), deepseek.fn.row(4).transpose());
}

TYPED_TEST(DeepSeekTyped, SameCoefficientsWithoutDifferences) {
  using Scalar = TypeParam;
  for (int n : {1, 2, 3, 4, 8}) {
    for (bool with_norm_weight : {false, true}) {
      const int channels = 7;
      const DeepSeekParameters<Scalar> deepseek = random_deepseek<Scalar>(n, channels, 41, with_norm_weight);
      const RowMatrix<Scalar> x = random_matrix<Scalar>(3, n * channels, 42);
      Options options;
      options.sinkhorn.iterations = 12;
      const auto expected = mhc::compute_coefficients(mhc::to_parameters(deepseek), x, options);
      const auto actual = mhc::compute_deepseek_coefficients(deepseek, x, mhc::to_deepseek_options(options));
      // Both sides round a projection of n*C terms and then 12 Sinkhorn rounds differently.
      const double bound = tolerance<Scalar>(n * channels + 12 * 2 * n);
      EXPECT_LE(max_difference(actual.pre, expected.pre), bound) << "n " << n;
      EXPECT_LE(max_difference(actual.post, expected.post), bound) << "n " << n;
      EXPECT_LE(max_difference(actual.res, expected.res), bound) << "n " << n;
    }
  }
}

TYPED_TEST(DeepSeekTyped, DifferencesMatterWhenEnabled) {
  using Scalar = TypeParam;
  const int n = 4;
  const DeepSeekParameters<Scalar> deepseek = random_deepseek<Scalar>(n, 3, 51, false);
  const RowMatrix<Scalar> x = random_matrix<Scalar>(2, n * 3, 52);
  const auto reference = mhc::compute_deepseek_coefficients(deepseek, x, equivalent_options(20));

  DeepSeekOptions options = equivalent_options(20);
  options.pre_epsilon = 0.01;
  const auto shifted = mhc::compute_deepseek_coefficients(deepseek, x, options);
  EXPECT_NEAR(static_cast<double>(shifted.pre(0, 0) - reference.pre(0, 0)), 0.01, tolerance<Scalar>(4));

  options = equivalent_options(20);
  options.post_multiplier = 1.0;
  const auto halved = mhc::compute_deepseek_coefficients(deepseek, x, options);
  EXPECT_NEAR(static_cast<double>(halved.post(1, 2)), 0.5 * static_cast<double>(reference.post(1, 2)),
              tolerance<Scalar>(4));

  options = equivalent_options(20);
  options.sinkhorn_epsilon = 0.01;
  const auto smoothed = mhc::compute_deepseek_coefficients(deepseek, x, options);
  EXPECT_GT(max_difference(smoothed.res, reference.res), 1e-3);

  options = equivalent_options(2);
  const auto truncated = mhc::compute_deepseek_coefficients(deepseek, x, options);
  EXPECT_GT(max_difference(truncated.res, reference.res), 10 * tolerance<Scalar>(100));
}

TEST(DeepSeekSinkhorn, MatchesHandLoop) {
  const int n = 3;
  const RowMatrix<double> logits = random_matrix<double>(n, n, 61, 2.0);
  const double eps = 0.05;
  const int repeat = 3;
  double m[3][3];
  for (int s = 0; s < n; ++s) {
    double total = 0.0;
    for (int o = 0; o < n; ++o) total += std::exp(logits(s, o));
    for (int o = 0; o < n; ++o) m[s][o] = std::exp(logits(s, o)) / total + eps;
  }
  auto normalize_columns = [&] {
    for (int o = 0; o < n; ++o) {
      double total = 0.0;
      for (int s = 0; s < n; ++s) total += m[s][o];
      for (int s = 0; s < n; ++s) m[s][o] /= total + eps;
    }
  };
  normalize_columns();
  for (int round = 1; round < repeat; ++round) {
    for (int s = 0; s < n; ++s) {
      double total = 0.0;
      for (int o = 0; o < n; ++o) total += m[s][o];
      for (int o = 0; o < n; ++o) m[s][o] /= total + eps;
    }
    normalize_columns();
  }
  const RowMatrix<double> actual = mhc::deepseek_sinkhorn(logits, repeat, eps);
  for (int s = 0; s < n; ++s) {
    for (int o = 0; o < n; ++o) EXPECT_NEAR(actual(s, o), m[s][o], tolerance<double>(20)) << s << ", " << o;
  }
}

TEST(DeepSeekSinkhorn, EqualsTransposedSinkhornWithoutEpsilon) {
  for (int n : {1, 2, 4, 8}) {
    const RowMatrix<double> logits = random_matrix<double>(n, n, 71);
    mhc::SinkhornOptions options;
    options.iterations = 7;
    const RowMatrix<double> theirs = mhc::deepseek_sinkhorn(logits, 7, 0.0);
    const RowMatrix<double> ours = mhc::sinkhorn_knopp(RowMatrix<double>(logits.transpose()), options);
    EXPECT_LE(max_difference<double>(theirs, ours.transpose()), tolerance<double>(7 * 2 * n)) << "n " << n;
  }
}

TYPED_TEST(DeepSeekTyped, MergeFollowsTheirPost) {
  // Their merge: output o = post[o] * h + sum_s comb[s][o] x[s]. The coefficients returned in
  // this library's convention must give the same through merge_streams.
  using Scalar = TypeParam;
  const int n = 3;
  const int channels = 5;
  const DeepSeekParameters<Scalar> deepseek = random_deepseek<Scalar>(n, channels, 81, false);
  const RowMatrix<Scalar> x = random_matrix<Scalar>(1, n * channels, 82);
  const RowMatrix<Scalar> branch_output = random_matrix<Scalar>(1, channels, 83);
  DeepSeekOptions options;
  options.sinkhorn_epsilon = 0.02;
  const auto coefficients = mhc::compute_deepseek_coefficients(deepseek, x, options);
  const RowMatrix<Scalar> next = mhc::merge_streams<Scalar>(coefficients, x, branch_output);

  // Recompute comb in their orientation from the logits.
  const RowMatrix<Scalar> projections = x * deepseek.fn.transpose();
  const Scalar inverse_r = mhc::detail::inverse_rms<Scalar>(x.row(0), options.rms_epsilon);
  RowMatrix<Scalar> logits(n, n);
  for (int k = 0; k < n * n; ++k) {
    logits.data()[k] = deepseek.scale(2) * projections(0, 2 * n + k) * inverse_r + deepseek.base(2 * n + k);
  }
  const RowMatrix<Scalar> comb = mhc::deepseek_sinkhorn(logits, options.sinkhorn_repeat, options.sinkhorn_epsilon);
  for (int o = 0; o < n; ++o) {
    for (int c = 0; c < channels; ++c) {
      double expected = double(coefficients.post(0, o)) * double(branch_output(0, c));
      for (int s = 0; s < n; ++s) expected += double(comb(s, o)) * double(x(0, s * channels + c));
      EXPECT_NEAR(double(next(0, o * channels + c)), expected, tolerance<Scalar>(2 * n)) << "stream " << o;
    }
  }
}

TEST(DeepSeekOptionsConversion, RoundTrip) {
  Options options;
  options.rms_epsilon = 1e-5;
  options.sinkhorn.iterations = 9;
  const Options back = mhc::to_options(mhc::to_deepseek_options(options));
  EXPECT_EQ(back.rms_epsilon, 1e-5);
  EXPECT_EQ(back.sinkhorn.iterations, 9);
  EXPECT_EQ(back.sinkhorn.tolerance, 0.0);
}

TEST(DeepSeekOptionsConversion, RejectsInexpressible) {
  EXPECT_THROW(mhc::to_options(DeepSeekOptions{}), std::invalid_argument);
  DeepSeekOptions options = equivalent_options(5);
  options.post_multiplier = 1.0;
  EXPECT_THROW(mhc::to_options(options), std::invalid_argument);
  options = equivalent_options(5);
  options.sinkhorn_epsilon = 1e-6;
  EXPECT_THROW(mhc::to_options(options), std::invalid_argument);
  Options early_stop;
  early_stop.sinkhorn.tolerance = 1e-3;
  EXPECT_THROW(mhc::to_deepseek_options(early_stop), std::invalid_argument);
}

TEST(DeepSeekInput, RejectsBadShapes) {
  const RowMatrix<double> x = random_matrix<double>(2, 8, 91);
  DeepSeekParameters<double> parameters = random_deepseek<double>(2, 4, 92, false);
  EXPECT_NO_THROW(mhc::compute_deepseek_coefficients(parameters, x));

  DeepSeekParameters<double> bad = parameters;
  bad.fn.conservativeResize(7, 8);
  EXPECT_THROW(mhc::compute_deepseek_coefficients(bad, x), std::invalid_argument);
  bad = parameters;
  bad.scale.resize(2);
  EXPECT_THROW(mhc::to_parameters(bad), std::invalid_argument);
  bad = parameters;
  bad.base.resize(9);
  EXPECT_THROW(mhc::compute_deepseek_coefficients(bad, x), std::invalid_argument);
  bad = parameters;
  bad.norm_weight.setOnes(5);
  EXPECT_THROW(mhc::compute_deepseek_coefficients(bad, x), std::invalid_argument);
  bad = parameters;
  bad.scale(1) = std::nan("");
  EXPECT_THROW(mhc::compute_deepseek_coefficients(bad, x), std::invalid_argument);

  EXPECT_THROW(mhc::compute_deepseek_coefficients(parameters, random_matrix<double>(2, 6, 93)), std::invalid_argument);
  DeepSeekOptions options;
  options.sinkhorn_repeat = 0;
  EXPECT_THROW(mhc::compute_deepseek_coefficients(parameters, x, options), std::invalid_argument);
  options = DeepSeekOptions{};
  options.rms_epsilon = -1.0;
  EXPECT_THROW(mhc::compute_deepseek_coefficients(parameters, x, options), std::invalid_argument);
  EXPECT_THROW(mhc::deepseek_sinkhorn(RowMatrix<double>::Zero(2, 3), 3, 0.0), std::invalid_argument);
}

TEST(DeepSeekInput, MessageNamesShapes) {
  DeepSeekParameters<double> parameters = random_deepseek<double>(2, 4, 94, false);
  parameters.fn.resize(8, 7);
  try {
    mhc::to_parameters(parameters);
    FAIL() << "expected std::invalid_argument";
  } catch (const std::invalid_argument& error) {
    const std::string message = error.what();
    EXPECT_NE(message.find("parameters.fn"), std::string::npos) << message;
    EXPECT_NE(message.find("8 x 8"), std::string::npos) << message;
    EXPECT_NE(message.find("8 x 7"), std::string::npos) << message;
  }
}

}  // namespace
