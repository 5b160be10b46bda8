// Tests of the residual-connection rules in variants.hpp and the HyperConnection block.
#include <mhc/variants.hpp>

#include "support.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace {

using mhc::Coefficients;
using mhc::Connection;
using mhc::DynamicParameters;
using mhc::HyperConnection;
using mhc::LiteParameters;
using mhc::Options;
using mhc::ResidualParameters;
using mhc::RowMatrix;
using mhc::StaticParameters;
using mhc::test::random_matrix;
using mhc::test::tolerance;

const Connection kConnections[] = {Connection::residual, Connection::static_hc, Connection::dynamic_hc,
                                   Connection::mhc, Connection::mhc_lite};

template <typename Scalar>
class VariantsTyped : public ::testing::Test {};
TYPED_TEST_SUITE(VariantsTyped, mhc::test::ScalarTypes, mhc::test::ScalarTypeNames);

// A fixed nonlinear branch, so that F(h) differs from h and from any linear map of it.
template <typename Scalar>
RowMatrix<Scalar> tanh_branch(const RowMatrix<Scalar>& input) {
  return (input.array().tanh() + Scalar(0.5)).matrix();
}

// Returns the stream-i block of one token row.
template <typename Scalar>
RowMatrix<Scalar> stream_of(const RowMatrix<Scalar>& state, Eigen::Index t, int stream, int channels) {
  return state.block(t, Eigen::Index(stream) * channels, 1, channels);
}

// Sum of every coefficient weighted by a fixed random gradient: a scalar whose derivative is
// what compute_coefficients_backward returns.
template <typename ParametersType>
double weighted_sum(const ParametersType& parameters, const RowMatrix<double>& x, const Coefficients<double>& weights,
                    const Options& options) {
  const Coefficients<double> coefficients = mhc::compute_coefficients(parameters, x, options);
  return (coefficients.pre.array() * weights.pre.array()).sum() +
         (coefficients.post.array() * weights.post.array()).sum() +
         (coefficients.res.array() * weights.res.array()).sum();
}

Coefficients<double> random_gradient(Eigen::Index tokens, int streams, std::uint32_t seed) {
  Coefficients<double> gradient;
  gradient.pre = random_matrix<double>(tokens, streams, seed);
  gradient.post = random_matrix<double>(tokens, streams, seed + 1);
  gradient.res = random_matrix<double>(tokens, streams * streams, seed + 2);
  return gradient;
}

// Central differences with step 1e-6 in double have a truncation error near 1e-12 and a rounding
// error near 1e-16 * |sum| / 1e-6, so 1e-6 relative leaves a wide margin on sums of order 10.
double difference_tolerance(double value) { return 1e-6 * (1.0 + std::abs(value)); }

// Compares every entry of an analytic parameter gradient with a central difference.
template <typename ParametersType, typename Entry>
void expect_parameter_gradient(const ParametersType& parameters, const RowMatrix<double>& x,
                               const Coefficients<double>& weights, const Options& options, Eigen::Index size,
                               Entry entry, const std::vector<double>& analytic, const std::string& name) {
  ASSERT_EQ(static_cast<Eigen::Index>(analytic.size()), size) << name;
  for (Eigen::Index k = 0; k < size; ++k) {
    const double numeric = mhc::test::central_difference(
        [&](double step) {
          ParametersType moved = parameters;
          entry(moved, k) += step;
          return weighted_sum(moved, x, weights, options);
        },
        1e-6);
    EXPECT_NEAR(analytic[static_cast<std::size_t>(k)], numeric, difference_tolerance(numeric)) << name << " entry " << k;
  }
}

template <typename ParametersType>
void expect_state_gradient(const ParametersType& parameters, const RowMatrix<double>& x,
                           const Coefficients<double>& weights, const Options& options, const RowMatrix<double>& analytic) {
  ASSERT_EQ(analytic.rows(), x.rows());
  ASSERT_EQ(analytic.cols(), x.cols());
  for (Eigen::Index k = 0; k < x.size(); ++k) {
    const double numeric = mhc::test::central_difference(
        [&](double step) {
          RowMatrix<double> moved = x;
          moved.data()[k] += step;
          return weighted_sum(parameters, moved, weights, options);
        },
        1e-6);
    EXPECT_NEAR(analytic.data()[k], numeric, difference_tolerance(numeric)) << "x entry " << k;
  }
}

template <typename Derived>
std::vector<double> to_vector(const Eigen::DenseBase<Derived>& matrix) {
  std::vector<double> values;
  for (Eigen::Index r = 0; r < matrix.rows(); ++r) {
    for (Eigen::Index c = 0; c < matrix.cols(); ++c) values.push_back(static_cast<double>(matrix(r, c)));
  }
  return values;
}

template <typename Scalar>
DynamicParameters<Scalar> random_dynamic(int streams, int channels, std::uint32_t seed) {
  DynamicParameters<Scalar> parameters = DynamicParameters<Scalar>::identity(streams, channels, 1);
  parameters.pre_weight = random_matrix<Scalar>(channels, 1, seed, 0.7);
  parameters.post_weight = random_matrix<Scalar>(channels, 1, seed + 1, 0.7);
  parameters.res_weight = random_matrix<Scalar>(channels, streams, seed + 2, 0.7);
  parameters.static_pre = random_matrix<Scalar>(1, streams, seed + 3);
  parameters.static_post = random_matrix<Scalar>(1, streams, seed + 4);
  parameters.static_res = random_matrix<Scalar>(streams, streams, seed + 5);
  parameters.alpha_scale = Scalar(0.8);
  parameters.beta_scale = Scalar(-0.6);
  return parameters;
}

template <typename Scalar>
LiteParameters<Scalar> random_lite(int streams, int channels, std::uint32_t seed) {
  LiteParameters<Scalar> parameters = LiteParameters<Scalar>::identity(streams, channels, 0);
  parameters.phi = random_matrix<Scalar>(parameters.phi.rows(), parameters.phi.cols(), seed);
  parameters.bias = random_matrix<Scalar>(1, parameters.coefficient_count(), seed + 1);
  parameters.alpha_pre = Scalar(0.7);
  parameters.alpha_post = Scalar(-0.5);
  parameters.alpha_res = Scalar(0.9);
  return parameters;
}

template <typename Scalar>
StaticParameters<Scalar> random_static(int streams, int channels, std::uint32_t seed) {
  StaticParameters<Scalar> parameters = StaticParameters<Scalar>::identity(streams, channels, 0);
  parameters.pre = random_matrix<Scalar>(1, streams, seed);
  parameters.post = random_matrix<Scalar>(1, streams, seed + 1);
  parameters.res = random_matrix<Scalar>(streams, streams, seed + 2);
  return parameters;
}

TEST(ConnectionName, RoundTrips) {
  for (Connection connection : kConnections) {
    EXPECT_EQ(mhc::parse_connection(mhc::to_string(connection)), connection) << mhc::to_string(connection);
  }
}

TEST(ConnectionName, RejectsUnknown) {
  EXPECT_THROW(mhc::parse_connection("hyper"), std::invalid_argument);
  EXPECT_THROW(mhc::parse_connection(""), std::invalid_argument);
}

TYPED_TEST(VariantsTyped, ResidualIsBitwisePlainResidual) {
  using Scalar = TypeParam;
  for (int channels : {1, 3, 7, 13}) {
    for (Eigen::Index tokens : {0, 1, 5}) {
      const auto block = HyperConnection<Scalar>::create(Connection::residual, 1, channels, 3);
      const RowMatrix<Scalar> x = random_matrix<Scalar>(tokens, channels, 11);
      const RowMatrix<Scalar> next = block.forward(x, tanh_branch<Scalar>);
      const RowMatrix<Scalar> expected = x + tanh_branch<Scalar>(x);
      ASSERT_EQ(next.rows(), tokens);
      for (Eigen::Index k = 0; k < next.size(); ++k) {
        EXPECT_EQ(next.data()[k], expected.data()[k]) << "C " << channels << " entry " << k;
      }
    }
  }
}

TYPED_TEST(VariantsTyped, StaticIdentityReadsHomeStream) {
  using Scalar = TypeParam;
  const int channels = 7;
  for (int n : {1, 2, 3, 4, 8}) {
    for (int layer : {0, 1, 5}) {
      const auto block = HyperConnection<Scalar>::create(Connection::static_hc, n, channels, layer);
      const RowMatrix<Scalar> x = random_matrix<Scalar>(3, n * channels, 21);
      const RowMatrix<Scalar> next = block.forward(x, tanh_branch<Scalar>);
      const int home = layer % n;
      for (Eigen::Index t = 0; t < x.rows(); ++t) {
        const RowMatrix<Scalar> update = tanh_branch<Scalar>(stream_of(x, t, home, channels));
        for (int i = 0; i < n; ++i) {
          const RowMatrix<Scalar> expected = stream_of(x, t, i, channels) + update;
          const RowMatrix<Scalar> actual = stream_of(next, t, i, channels);
          EXPECT_LE((actual - expected).cwiseAbs().maxCoeff(), tolerance<Scalar>(n)) << "n " << n << " stream " << i;
        }
      }
    }
  }
}

TYPED_TEST(VariantsTyped, DynamicIdentityEqualsStatic) {
  using Scalar = TypeParam;
  for (int n : {1, 2, 4}) {
    const RowMatrix<Scalar> x = random_matrix<Scalar>(4, n * 5, 31);
    const auto dynamic = mhc::compute_coefficients(DynamicParameters<Scalar>::identity(n, 5, 2), x);
    const auto fixed = mhc::compute_coefficients(StaticParameters<Scalar>::identity(n, 5, 2), x);
    EXPECT_EQ(dynamic.pre, fixed.pre) << "n " << n;
    EXPECT_EQ(dynamic.post, fixed.post) << "n " << n;
    EXPECT_EQ(dynamic.res, fixed.res) << "n " << n;
  }
}

TYPED_TEST(VariantsTyped, MhcAndLiteIdentityNearResidual) {
  using Scalar = TypeParam;
  for (Connection connection : {Connection::mhc, Connection::mhc_lite}) {
    for (int n : {2, 3, 4}) {
      const auto block = HyperConnection<Scalar>::create(connection, n, 3, 5);
      const RowMatrix<Scalar> x = random_matrix<Scalar>(2, n * 3, 41);
      const auto coefficients = block.compute_coefficients(x);
      const int home = 5 % n;
      for (Eigen::Index t = 0; t < x.rows(); ++t) {
        for (int i = 0; i < n; ++i) {
          // phi = 0, so every logit is its bias: sigmoid(+-3) for H_pre, 2 sigmoid(0) = 1 for H_post.
          const double logit = i == home ? 3.0 : -3.0;
          const double pre = static_cast<double>(coefficients.pre(t, i));
          EXPECT_NEAR(pre, 1.0 / (1.0 + std::exp(-logit)), tolerance<Scalar>(4)) << mhc::to_string(connection) << " n " << n;
          EXPECT_NEAR(static_cast<double>(coefficients.post(t, i)), 1.0, tolerance<Scalar>(4));
          EXPECT_GT(static_cast<double>(coefficients.res(t, i * n + i)), 0.99) << mhc::to_string(connection);
        }
      }
    }
  }
}

TYPED_TEST(VariantsTyped, LiteIdentityWeight) {
  using Scalar = TypeParam;
  // The identity permutation gets sigmoid(6) and only it puts weight on the diagonal, so each
  // diagonal entry is at least that weight.
  const double identity_weight = 1.0 / (1.0 + std::exp(-6.0));
  for (int n : {2, 3, 4, 5, 6}) {
    const LiteParameters<Scalar> parameters = LiteParameters<Scalar>::identity(n, 2, 0);
    const RowMatrix<Scalar> x = random_matrix<Scalar>(1, n * 2, 43);
    const auto coefficients = mhc::compute_coefficients(parameters, x);
    EXPECT_GE(static_cast<double>(coefficients.res(0, 0)), identity_weight - tolerance<Scalar>(n)) << "n " << n;
    EXPECT_LE(static_cast<double>(coefficients.res(0, 1)), 1.0 - identity_weight + tolerance<Scalar>(n)) << "n " << n;
  }
}

TYPED_TEST(VariantsTyped, LiteIsDoublyStochastic) {
  using Scalar = TypeParam;
  for (int n : {1, 2, 3, 4, 5}) {
    const LiteParameters<Scalar> parameters = random_lite<Scalar>(n, 3, 51);
    const RowMatrix<Scalar> x = random_matrix<Scalar>(4, n * 3, 52, 2.0);
    const auto coefficients = mhc::compute_coefficients(parameters, x);
    for (Eigen::Index t = 0; t < x.rows(); ++t) {
      const Eigen::Map<const RowMatrix<Scalar>> mixing(coefficients.res.row(t).data(), n, n);
      const double factorial = static_cast<double>(mhc::detail::factorial(n));
      EXPECT_LE(static_cast<double>(mhc::doubly_stochastic_error(mixing)), tolerance<Scalar>(factorial)) << "n " << n;
      EXPECT_GE(static_cast<double>(mixing.minCoeff()), 0.0) << "n " << n;
    }
  }
}

TEST(LitePermutations, LexicographicOrder) {
  const std::vector<int> table = mhc::detail::lexicographic_permutations(3);
  const std::vector<int> expected = {0, 1, 2, 0, 2, 1, 1, 0, 2, 1, 2, 0, 2, 0, 1, 2, 1, 0};
  EXPECT_EQ(table, expected);
}

TEST(LitePermutations, PermutationMatrixConvention) {
  // Put nearly all weight on permutation 3 of n = 3, sigma = (1, 2, 0): output stream i reads
  // input stream sigma(i), so H_res[0][1] = H_res[1][2] = H_res[2][0] = 1.
  LiteParameters<double> parameters = LiteParameters<double>::identity(3, 2, 0);
  parameters.bias.tail(6).setConstant(-40.0);
  parameters.bias(6 + 3) = 40.0;
  const RowMatrix<double> x = random_matrix<double>(1, 6, 61);
  const auto coefficients = mhc::compute_coefficients(parameters, x);
  const Eigen::Map<const RowMatrix<double>> mixing(coefficients.res.row(0).data(), 3, 3);
  EXPECT_NEAR(mixing(0, 1), 1.0, 1e-12);
  EXPECT_NEAR(mixing(1, 2), 1.0, 1e-12);
  EXPECT_NEAR(mixing(2, 0), 1.0, 1e-12);
  EXPECT_NEAR(mixing(0, 0), 0.0, 1e-12);
}

TYPED_TEST(VariantsTyped, LiteMatchesHandComputation) {
  using Scalar = TypeParam;
  const int n = 3;
  const int channels = 4;
  const LiteParameters<Scalar> parameters = random_lite<Scalar>(n, channels, 71);
  const RowMatrix<Scalar> x = random_matrix<Scalar>(2, n * channels, 72);
  const auto coefficients = mhc::compute_coefficients(parameters, x);
  const int permutations[6][3] = {{0, 1, 2}, {0, 2, 1}, {1, 0, 2}, {1, 2, 0}, {2, 0, 1}, {2, 1, 0}};
  for (Eigen::Index t = 0; t < x.rows(); ++t) {
    double sum_of_squares = 0.0;
    for (Eigen::Index k = 0; k < x.cols(); ++k) sum_of_squares += double(x(t, k)) * double(x(t, k));
    const double r = std::sqrt(sum_of_squares / double(x.cols()) + 1e-6);
    std::vector<double> logits(12);
    for (int col = 0; col < 12; ++col) {
      double projection = 0.0;
      for (Eigen::Index k = 0; k < x.cols(); ++k) projection += double(x(t, k)) * double(parameters.phi(k, col));
      double alpha = parameters.alpha_res;
      if (col < 2 * n) alpha = parameters.alpha_post;
      if (col < n) alpha = parameters.alpha_pre;
      logits[std::size_t(col)] = alpha * projection / r + double(parameters.bias(col));
    }
    double total = 0.0;
    for (int k = 0; k < 6; ++k) total += std::exp(logits[std::size_t(6 + k)]);
    double expected_res[3][3] = {};
    for (int k = 0; k < 6; ++k) {
      for (int i = 0; i < n; ++i) expected_res[i][permutations[k][i]] += std::exp(logits[std::size_t(6 + k)]) / total;
    }
    const double bound = tolerance<Scalar>(x.cols() + 20);
    for (int i = 0; i < n; ++i) {
      EXPECT_NEAR(double(coefficients.pre(t, i)), 1.0 / (1.0 + std::exp(-logits[std::size_t(i)])), bound);
      EXPECT_NEAR(double(coefficients.post(t, i)), 2.0 / (1.0 + std::exp(-logits[std::size_t(n + i)])), bound);
      for (int j = 0; j < n; ++j) EXPECT_NEAR(double(coefficients.res(t, i * n + j)), expected_res[i][j], bound);
    }
  }
}

TYPED_TEST(VariantsTyped, DynamicMatchesHandComputation) {
  using Scalar = TypeParam;
  const int n = 3;
  const int channels = 5;
  const DynamicParameters<Scalar> parameters = random_dynamic<Scalar>(n, channels, 81);
  const RowMatrix<Scalar> x = random_matrix<Scalar>(2, n * channels, 82);
  Options options;
  options.rms_epsilon = 1e-3;
  const auto coefficients = mhc::compute_coefficients(parameters, x, options);
  for (Eigen::Index t = 0; t < x.rows(); ++t) {
    std::vector<std::vector<double>> normalized(n, std::vector<double>(channels));
    for (int j = 0; j < n; ++j) {
      double sum_of_squares = 0.0;
      for (int c = 0; c < channels; ++c) sum_of_squares += std::pow(double(x(t, j * channels + c)), 2);
      const double r = std::sqrt(sum_of_squares / channels + 1e-3);
      for (int c = 0; c < channels; ++c) normalized[std::size_t(j)][std::size_t(c)] = double(x(t, j * channels + c)) / r;
    }
    auto project = [&](int j, const RowMatrix<Scalar>& weight, int column) {
      double sum = 0.0;
      for (int c = 0; c < channels; ++c) sum += normalized[std::size_t(j)][std::size_t(c)] * double(weight(c, column));
      return sum;
    };
    const double bound = tolerance<Scalar>(4 * channels);
    for (int j = 0; j < n; ++j) {
      const double a_m = parameters.alpha_scale * std::tanh(project(j, parameters.pre_weight, 0)) + parameters.static_pre(j);
      const double b = parameters.beta_scale * std::tanh(project(j, parameters.post_weight, 0)) + parameters.static_post(j);
      EXPECT_NEAR(double(coefficients.pre(t, j)), a_m, bound);
      EXPECT_NEAR(double(coefficients.post(t, j)), b, bound);
      for (int i = 0; i < n; ++i) {
        // A_r[j][i] (source j, destination i) is this library's H_res[i][j].
        const double a_r = parameters.alpha_scale * std::tanh(project(j, parameters.res_weight, i)) +
                           parameters.static_res(j, i);
        EXPECT_NEAR(double(coefficients.res(t, i * n + j)), a_r, bound) << "destination " << i << " source " << j;
      }
    }
  }
}

TYPED_TEST(VariantsTyped, SwitchingConnectionSwitchesRule) {
  using Scalar = TypeParam;
  const int n = 2;
  const RowMatrix<Scalar> x = random_matrix<Scalar>(3, n * 3, 91);
  const RowMatrix<Scalar> static_result =
      HyperConnection<Scalar>::create(Connection::static_hc, n, 3, 0).forward(x, tanh_branch<Scalar>);
  const RowMatrix<Scalar> mhc_result =
      HyperConnection<Scalar>::create(Connection::mhc, n, 3, 0).forward(x, tanh_branch<Scalar>);
  const RowMatrix<Scalar> direct = mhc::forward(mhc::Parameters<Scalar>::identity(n, 3, 0), x, tanh_branch<Scalar>);
  EXPECT_GT(static_cast<double>((static_result - mhc_result).cwiseAbs().maxCoeff()), 1e-2);
  EXPECT_EQ(mhc_result, direct);
  for (Connection connection : kConnections) {
    const int streams = connection == Connection::residual ? 1 : 3;
    const auto block = HyperConnection<Scalar>::create(connection, streams, 4, 1);
    EXPECT_EQ(block.connection(), connection) << mhc::to_string(connection);
    EXPECT_EQ(block.streams(), streams);
    EXPECT_EQ(block.channels(), 4);
    EXPECT_EQ(static_cast<int>(block.parameters().index()), static_cast<int>(connection));
  }
}

TYPED_TEST(VariantsTyped, HalvesEqualForward) {
  using Scalar = TypeParam;
  for (Connection connection : kConnections) {
    const int n = connection == Connection::residual ? 1 : 3;
    HyperConnection<Scalar> block = HyperConnection<Scalar>::create(connection, n, 7, 2);
    if (connection == Connection::dynamic_hc) block = HyperConnection<Scalar>(random_dynamic<Scalar>(n, 7, 95));
    const RowMatrix<Scalar> x = random_matrix<Scalar>(4, n * 7, 96);
    const auto prepared = block.prepare_branch(x);
    const RowMatrix<Scalar> halves = block.merge(prepared.coefficients, x, tanh_branch<Scalar>(prepared.input));
    EXPECT_EQ(halves, block.forward(x, tanh_branch<Scalar>)) << mhc::to_string(connection);
  }
}

TEST(VariantsBackward, StaticMatchesDifferences) {
  for (int n : {1, 2, 3}) {
    const StaticParameters<double> parameters = random_static<double>(n, 3, 101);
    const RowMatrix<double> x = random_matrix<double>(4, n * 3, 102);
    const Coefficients<double> weights = random_gradient(4, n, 103);
    const auto result = mhc::compute_coefficients_backward(parameters, x, weights);
    const Options options;
    expect_parameter_gradient(parameters, x, weights, options, n,
                              [](StaticParameters<double>& p, Eigen::Index k) -> double& { return p.pre(k); },
                              to_vector(result.parameters.pre), "pre");
    expect_parameter_gradient(parameters, x, weights, options, n,
                              [](StaticParameters<double>& p, Eigen::Index k) -> double& { return p.post(k); },
                              to_vector(result.parameters.post), "post");
    expect_parameter_gradient(parameters, x, weights, options, n * n,
                              [](StaticParameters<double>& p, Eigen::Index k) -> double& { return p.res.data()[k]; },
                              to_vector(result.parameters.res), "res");
    EXPECT_EQ(result.x, RowMatrix<double>::Zero(x.rows(), x.cols()));
  }
}

TEST(VariantsBackward, DynamicMatchesDifferences) {
  Options options;
  options.rms_epsilon = 1e-4;
  for (int n : {1, 2, 3}) {
    const int channels = 3;
    const DynamicParameters<double> parameters = random_dynamic<double>(n, channels, 111);
    const RowMatrix<double> x = random_matrix<double>(3, n * channels, 112);
    const Coefficients<double> weights = random_gradient(3, n, 113);
    const auto result = mhc::compute_coefficients_backward(parameters, x, weights, options);
    const auto& gradient = result.parameters;
    using P = DynamicParameters<double>;
    expect_parameter_gradient(parameters, x, weights, options, channels,
                              [](P& p, Eigen::Index k) -> double& { return p.pre_weight(k, 0); },
                              to_vector(gradient.pre_weight), "pre_weight");
    expect_parameter_gradient(parameters, x, weights, options, channels,
                              [](P& p, Eigen::Index k) -> double& { return p.post_weight(k, 0); },
                              to_vector(gradient.post_weight), "post_weight");
    expect_parameter_gradient(parameters, x, weights, options, channels * n,
                              [](P& p, Eigen::Index k) -> double& { return p.res_weight.data()[k]; },
                              to_vector(gradient.res_weight), "res_weight");
    expect_parameter_gradient(parameters, x, weights, options, n,
                              [](P& p, Eigen::Index k) -> double& { return p.static_pre(k); },
                              to_vector(gradient.static_pre), "static_pre");
    expect_parameter_gradient(parameters, x, weights, options, n,
                              [](P& p, Eigen::Index k) -> double& { return p.static_post(k); },
                              to_vector(gradient.static_post), "static_post");
    expect_parameter_gradient(parameters, x, weights, options, n * n,
                              [](P& p, Eigen::Index k) -> double& { return p.static_res.data()[k]; },
                              to_vector(gradient.static_res), "static_res");
    expect_parameter_gradient(parameters, x, weights, options, 1,
                              [](P& p, Eigen::Index) -> double& { return p.alpha_scale; },
                              {gradient.alpha_scale}, "alpha_scale");
    expect_parameter_gradient(parameters, x, weights, options, 1,
                              [](P& p, Eigen::Index) -> double& { return p.beta_scale; },
                              {gradient.beta_scale}, "beta_scale");
    expect_state_gradient(parameters, x, weights, options, result.x);
  }
}

TEST(VariantsBackward, LiteMatchesDifferences) {
  Options options;
  options.rms_epsilon = 1e-4;
  for (int n : {1, 2, 3}) {
    const int channels = 2;
    const LiteParameters<double> parameters = random_lite<double>(n, channels, 121);
    const RowMatrix<double> x = random_matrix<double>(3, n * channels, 122);
    const Coefficients<double> weights = random_gradient(3, n, 123);
    const auto result = mhc::compute_coefficients_backward(parameters, x, weights, options);
    const auto& gradient = result.parameters;
    using P = LiteParameters<double>;
    expect_parameter_gradient(parameters, x, weights, options, parameters.phi.size(),
                              [](P& p, Eigen::Index k) -> double& { return p.phi.data()[k]; },
                              to_vector(gradient.phi), "phi");
    expect_parameter_gradient(parameters, x, weights, options, parameters.bias.size(),
                              [](P& p, Eigen::Index k) -> double& { return p.bias(k); },
                              to_vector(gradient.bias), "bias");
    expect_parameter_gradient(parameters, x, weights, options, 1,
                              [](P& p, Eigen::Index) -> double& { return p.alpha_pre; }, {gradient.alpha_pre},
                              "alpha_pre");
    expect_parameter_gradient(parameters, x, weights, options, 1,
                              [](P& p, Eigen::Index) -> double& { return p.alpha_post; }, {gradient.alpha_post},
                              "alpha_post");
    expect_parameter_gradient(parameters, x, weights, options, 1,
                              [](P& p, Eigen::Index) -> double& { return p.alpha_res; }, {gradient.alpha_res},
                              "alpha_res");
    expect_state_gradient(parameters, x, weights, options, result.x);
  }
}

TEST(VariantsBackward, ResidualIsZero) {
  const ResidualParameters<double> parameters = ResidualParameters<double>::identity(5);
  const RowMatrix<double> x = random_matrix<double>(3, 5, 131);
  const auto result = mhc::compute_coefficients_backward(parameters, x, random_gradient(3, 1, 132));
  EXPECT_EQ(result.x, RowMatrix<double>::Zero(3, 5));
}

// The float backward agrees with the double one on the same inputs within float rounding.
TYPED_TEST(VariantsTyped, BackwardMatchesDouble) {
  using Scalar = TypeParam;
  const int n = 3;
  const int channels = 7;
  const RowMatrix<double> x = random_matrix<double>(5, n * channels, 141);
  const Coefficients<double> weights = random_gradient(5, n, 142);
  Coefficients<Scalar> cast_weights;
  cast_weights.pre = weights.pre.cast<Scalar>();
  cast_weights.post = weights.post.cast<Scalar>();
  cast_weights.res = weights.res.cast<Scalar>();
  const RowMatrix<Scalar> cast_x = x.cast<Scalar>();
  const double bound = 10.0 * tolerance<Scalar>(5 * n * channels);

  const DynamicParameters<double> dynamic = random_dynamic<double>(n, channels, 143);
  DynamicParameters<Scalar> single_dynamic = random_dynamic<Scalar>(n, channels, 143);
  const auto dynamic_reference = mhc::compute_coefficients_backward(dynamic, x, weights);
  const auto dynamic_single = mhc::compute_coefficients_backward(single_dynamic, cast_x, cast_weights);
  EXPECT_LE((dynamic_single.x.template cast<double>() - dynamic_reference.x).cwiseAbs().maxCoeff(), bound);
  EXPECT_LE((dynamic_single.parameters.res_weight.template cast<double>() - dynamic_reference.parameters.res_weight)
                .cwiseAbs()
                .maxCoeff(),
            bound);

  const LiteParameters<double> lite = random_lite<double>(n, channels, 144);
  const LiteParameters<Scalar> single_lite = random_lite<Scalar>(n, channels, 144);
  const auto lite_reference = mhc::compute_coefficients_backward(lite, x, weights);
  const auto lite_single = mhc::compute_coefficients_backward(single_lite, cast_x, cast_weights);
  EXPECT_LE((lite_single.x.template cast<double>() - lite_reference.x).cwiseAbs().maxCoeff(), bound);
  EXPECT_LE((lite_single.parameters.phi.template cast<double>() - lite_reference.parameters.phi).cwiseAbs().maxCoeff(),
            bound);
}

TEST(VariantsInput, RejectsWrongShapes) {
  const RowMatrix<double> x = random_matrix<double>(2, 6, 151);
  StaticParameters<double> fixed = StaticParameters<double>::identity(3, 2, 0);
  fixed.res.resize(3, 2);
  EXPECT_THROW(mhc::compute_coefficients(fixed, x), std::invalid_argument);

  DynamicParameters<double> dynamic = DynamicParameters<double>::identity(3, 2, 0);
  dynamic.res_weight.resize(2, 2);
  EXPECT_THROW(mhc::compute_coefficients(dynamic, x), std::invalid_argument);
  dynamic = DynamicParameters<double>::identity(3, 2, 0);
  dynamic.alpha_scale = std::nan("");
  EXPECT_THROW(mhc::compute_coefficients(dynamic, x), std::invalid_argument);

  LiteParameters<double> lite = LiteParameters<double>::identity(3, 2, 0);
  lite.bias.resize(15);
  EXPECT_THROW(mhc::compute_coefficients(lite, x), std::invalid_argument);

  const RowMatrix<double> wide = random_matrix<double>(2, 7, 152);
  EXPECT_THROW(mhc::compute_coefficients(StaticParameters<double>::identity(3, 2, 0), wide), std::invalid_argument);
  EXPECT_THROW(mhc::compute_coefficients(ResidualParameters<double>::identity(2), wide), std::invalid_argument);

  Options options;
  options.rms_epsilon = 0.0;
  EXPECT_THROW(mhc::compute_coefficients(DynamicParameters<double>::identity(3, 2, 0), x, options),
               std::invalid_argument);

  Coefficients<double> gradient = random_gradient(2, 3, 153);
  gradient.res.resize(2, 8);
  EXPECT_THROW(mhc::compute_coefficients_backward(DynamicParameters<double>::identity(3, 2, 0), x, gradient),
               std::invalid_argument);
  EXPECT_THROW(mhc::compute_coefficients_backward(LiteParameters<double>::identity(3, 2, 0), x, gradient),
               std::invalid_argument);
}

TEST(VariantsInput, MessagesNameArgument) {
  LiteParameters<double> lite;
  lite.streams = 7;
  lite.channels = 1;
  try {
    mhc::compute_coefficients(lite, RowMatrix<double>::Zero(1, 7));
    FAIL() << "expected std::invalid_argument";
  } catch (const std::invalid_argument& error) {
    const std::string message = error.what();
    EXPECT_NE(message.find("parameters.streams"), std::string::npos) << message;
    EXPECT_NE(message.find("at most 6"), std::string::npos) << message;
    EXPECT_NE(message.find("got 7"), std::string::npos) << message;
  }
}

TEST(VariantsInput, CreateRejectsBadSettings) {
  EXPECT_THROW(HyperConnection<double>::create(Connection::residual, 2, 4, 0), std::invalid_argument);
  EXPECT_THROW(HyperConnection<double>::create(Connection::mhc_lite, 7, 4, 0), std::invalid_argument);
  EXPECT_THROW(HyperConnection<double>::create(Connection::static_hc, 0, 4, 0), std::invalid_argument);
  EXPECT_THROW(HyperConnection<double>::create(Connection::dynamic_hc, 2, 0, 0), std::invalid_argument);
  EXPECT_THROW(HyperConnection<double>::create(Connection::mhc, 2, 4, -1), std::invalid_argument);
  EXPECT_THROW(HyperConnection<double>::create(static_cast<Connection>(9), 2, 4, 0), std::invalid_argument);
}

TEST(VariantsInput, ForwardRejectsBranchShape) {
  const auto block = HyperConnection<double>::create(Connection::static_hc, 2, 3, 0);
  const RowMatrix<double> x = random_matrix<double>(2, 6, 161);
  EXPECT_THROW(block.forward(x, [](const RowMatrix<double>& input) { return RowMatrix<double>(input.rows(), 4); }),
               std::invalid_argument);
}

}  // namespace
