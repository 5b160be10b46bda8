// Tests of the mHC layer forward (layer.hpp) against plain-loop reference computations.
#include <mhc/layer.hpp>
#include <mhc/streams.hpp>

#include "support.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace {

using mhc::Coefficients;
using mhc::Options;
using mhc::Parameters;
using mhc::RowMatrix;
using mhc::test::random_matrix;
using mhc::test::tolerance;

template <typename Scalar>
class LayerTyped : public ::testing::Test {};
TYPED_TEST_SUITE(LayerTyped, mhc::test::ScalarTypes, mhc::test::ScalarTypeNames);

// A fixed nonlinear branch: F(h) = tanh(h) + 0.5, which is neither h nor a multiple of it.
template <typename Scalar>
RowMatrix<Scalar> tanh_branch(const RowMatrix<Scalar>& input) {
  return (input.array().tanh() + Scalar(0.5)).matrix();
}

double sigmoid(double z) { return 1.0 / (1.0 + std::exp(-z)); }

// One token's coefficients computed in double with plain loops, independent of layer.hpp.
struct ReferenceCoefficients {
  std::vector<double> pre, post;
  std::vector<std::vector<double>> res;  // res[i][j] weights input stream j into output stream i
};

template <typename Scalar>
ReferenceCoefficients reference_coefficients(const Parameters<Scalar>& parameters, const RowMatrix<Scalar>& x,
                                             Eigen::Index t, const Options& options) {
  const int n = parameters.streams;
  const Eigen::Index width = x.cols();
  double sum_of_squares = 0.0;
  for (Eigen::Index k = 0; k < width; ++k) sum_of_squares += double(x(t, k)) * double(x(t, k));
  const double r = std::sqrt(sum_of_squares / double(width) + options.rms_epsilon);

  std::vector<double> logits(static_cast<std::size_t>(parameters.coefficient_count()));
  for (int column = 0; column < parameters.coefficient_count(); ++column) {
    double projection = 0.0;
    for (Eigen::Index k = 0; k < width; ++k) projection += double(x(t, k)) * double(parameters.phi(k, column));
    double alpha = double(parameters.alpha_res);
    if (column < 2 * n) alpha = double(parameters.alpha_post);
    if (column < n) alpha = double(parameters.alpha_pre);
    logits[std::size_t(column)] = alpha * projection / r + double(parameters.bias(column));
  }

  ReferenceCoefficients reference;
  reference.res.assign(std::size_t(n), std::vector<double>(std::size_t(n)));
  for (int i = 0; i < n; ++i) {
    reference.pre.push_back(sigmoid(logits[std::size_t(i)]));
    reference.post.push_back(2.0 * sigmoid(logits[std::size_t(n + i)]));
    for (int j = 0; j < n; ++j) reference.res[std::size_t(i)][std::size_t(j)] = std::exp(logits[std::size_t(2 * n + i * n + j)]);
  }
  // Sinkhorn-Knopp: every round divides each column by its sum, then each row by its sum.
  auto& m = reference.res;
  for (int round = 0; round < options.sinkhorn.iterations; ++round) {
    for (int j = 0; j < n; ++j) {
      double total = 0.0;
      for (int i = 0; i < n; ++i) total += m[std::size_t(i)][std::size_t(j)];
      for (int i = 0; i < n; ++i) m[std::size_t(i)][std::size_t(j)] /= total;
    }
    for (int i = 0; i < n; ++i) {
      double total = 0.0;
      for (int j = 0; j < n; ++j) total += m[std::size_t(i)][std::size_t(j)];
      for (int j = 0; j < n; ++j) m[std::size_t(i)][std::size_t(j)] /= total;
    }
  }
  return reference;
}

// x_next of every token in double: H_res x + H_post^T (tanh(H_pre x) + 0.5).
template <typename Scalar>
RowMatrix<double> reference_forward(const Parameters<Scalar>& parameters, const RowMatrix<Scalar>& x,
                                    const Options& options) {
  const int n = parameters.streams;
  const int channels = parameters.channels;
  RowMatrix<double> next(x.rows(), x.cols());
  for (Eigen::Index t = 0; t < x.rows(); ++t) {
    const ReferenceCoefficients coefficients = reference_coefficients(parameters, x, t, options);
    std::vector<double> branch(std::size_t(channels), 0.0);
    for (int c = 0; c < channels; ++c) {
      double input = 0.0;
      for (int j = 0; j < n; ++j) input += coefficients.pre[std::size_t(j)] * double(x(t, j * channels + c));
      branch[std::size_t(c)] = std::tanh(input) + 0.5;
    }
    for (int i = 0; i < n; ++i) {
      for (int c = 0; c < channels; ++c) {
        double value = coefficients.post[std::size_t(i)] * branch[std::size_t(c)];
        for (int j = 0; j < n; ++j) value += coefficients.res[std::size_t(i)][std::size_t(j)] * double(x(t, j * channels + c));
        next(t, i * channels + c) = value;
      }
    }
  }
  return next;
}

// Parameters whose coefficients vary from token to token and from stream to stream.
template <typename Scalar>
Parameters<Scalar> random_parameters(int streams, int channels, std::uint32_t seed) {
  Parameters<Scalar> parameters = Parameters<Scalar>::identity(streams, channels, 0);
  parameters.phi = random_matrix<Scalar>(parameters.phi.rows(), parameters.phi.cols(), seed, 0.3);
  parameters.bias = random_matrix<Scalar>(1, parameters.coefficient_count(), seed + 1);
  parameters.alpha_pre = Scalar(0.5);
  parameters.alpha_post = Scalar(0.7);
  parameters.alpha_res = Scalar(0.9);
  return parameters;
}

// Parameters with phi = 0, so every coefficient comes from its bias: pre and post from the given
// logits and H_res from +20 where `pattern` is 1 and -20 elsewhere. A 0/1 permutation pattern
// makes Sinkhorn-Knopp return that permutation to within e^-40.
template <typename Scalar>
Parameters<Scalar> bias_only(const std::vector<double>& pre_logits, const std::vector<double>& post_logits,
                             const RowMatrix<double>& pattern, int channels) {
  const int n = static_cast<int>(pre_logits.size());
  Parameters<Scalar> parameters = Parameters<Scalar>::identity(n, channels, 0);
  for (int i = 0; i < n; ++i) {
    parameters.bias(i) = Scalar(pre_logits[std::size_t(i)]);
    parameters.bias(n + i) = Scalar(post_logits[std::size_t(i)]);
    for (int j = 0; j < n; ++j) parameters.bias(2 * n + i * n + j) = Scalar(pattern(i, j) > 0.5 ? 20 : -20);
  }
  return parameters;
}

template <typename Scalar>
RowMatrix<Scalar> stream_of(const RowMatrix<Scalar>& state, Eigen::Index t, int stream, int channels) {
  return state.block(t, Eigen::Index(stream) * channels, 1, channels);
}

template <typename Scalar>
double max_difference(const RowMatrix<Scalar>& a, const RowMatrix<Scalar>& b) {
  if (a.size() == 0) return 0.0;
  return static_cast<double>((a - b).cwiseAbs().maxCoeff());
}

TYPED_TEST(LayerTyped, CoefficientsMatchHandComputation) {
  using Scalar = TypeParam;
  Options options;
  options.rms_epsilon = 1e-3;
  options.sinkhorn.iterations = 15;
  for (int n : {1, 2, 3, 4, 8}) {
    const int channels = 7;
    const Parameters<Scalar> parameters = random_parameters<Scalar>(n, channels, 11);
    const RowMatrix<Scalar> x = random_matrix<Scalar>(3, n * channels, 12);
    const Coefficients<Scalar> coefficients = mhc::compute_coefficients(parameters, x, options);
    ASSERT_EQ(coefficients.res.cols(), n * n);
    const double bound = tolerance<Scalar>(n * channels + 2 * n * options.sinkhorn.iterations);
    for (Eigen::Index t = 0; t < x.rows(); ++t) {
      const ReferenceCoefficients expected = reference_coefficients(parameters, x, t, options);
      for (int i = 0; i < n; ++i) {
        EXPECT_NEAR(double(coefficients.pre(t, i)), expected.pre[std::size_t(i)], bound) << "n " << n << " i " << i;
        EXPECT_NEAR(double(coefficients.post(t, i)), expected.post[std::size_t(i)], bound) << "n " << n << " i " << i;
        for (int j = 0; j < n; ++j) {
          EXPECT_NEAR(double(coefficients.res(t, i * n + j)), expected.res[std::size_t(i)][std::size_t(j)], bound)
              << "n " << n << " H_res[" << i << "][" << j << "]";
        }
      }
    }
  }
}

TYPED_TEST(LayerTyped, ForwardMatchesReferenceOverShapes) {
  using Scalar = TypeParam;
  const Options options;
  for (int n : {1, 2, 3, 4, 8, 16}) {
    for (int channels : {1, 3, 7, 13}) {
      for (Eigen::Index tokens : {0, 1, 5}) {
        const Parameters<Scalar> parameters = random_parameters<Scalar>(n, channels, 21);
        const RowMatrix<Scalar> x = random_matrix<Scalar>(tokens, n * channels, 22);
        const RowMatrix<Scalar> next = mhc::forward(parameters, x, tanh_branch<Scalar>, options);
        ASSERT_EQ(next.rows(), tokens);
        ASSERT_EQ(next.cols(), n * channels);
        if (tokens == 0) continue;
        const RowMatrix<double> expected = reference_forward(parameters, x, options);
        const double scale = 1.0 + expected.cwiseAbs().maxCoeff();
        const double bound = scale * tolerance<Scalar>(n * channels + 40 * n);
        EXPECT_LE(max_difference<double>(next.template cast<double>(), expected), bound)
            << "n " << n << " C " << channels << " T " << tokens;
      }
    }
  }
}

TYPED_TEST(LayerTyped, AsymmetricMixingIsNotTransposed) {
  using Scalar = TypeParam;
  const int channels = 3;
  // n = 2 swaps the streams; n = 4 is the cycle output i <- input (i + 1) mod 4, whose transpose
  // is the opposite cycle.
  for (int n : {2, 4}) {
    RowMatrix<double> pattern = RowMatrix<double>::Zero(n, n);
    for (int i = 0; i < n; ++i) pattern(i, (i + 1) % n) = 1.0;
    const Parameters<Scalar> parameters =
        bias_only<Scalar>(std::vector<double>(std::size_t(n), 0.0), std::vector<double>(std::size_t(n), 0.0), pattern, channels);
    const RowMatrix<Scalar> x = random_matrix<Scalar>(2, n * channels, 31);
    const auto zero_branch = [](const RowMatrix<Scalar>& input) {
      return RowMatrix<Scalar>::Zero(input.rows(), input.cols()).eval();
    };
    const RowMatrix<Scalar> next = mhc::forward(parameters, x, zero_branch);
    for (Eigen::Index t = 0; t < x.rows(); ++t) {
      for (int i = 0; i < n; ++i) {
        const RowMatrix<Scalar> source = stream_of(x, t, (i + 1) % n, channels);
        const RowMatrix<Scalar> transposed_source = stream_of(x, t, (i + n - 1) % n, channels);
        const RowMatrix<Scalar> unmixed = stream_of(x, t, i, channels);
        const RowMatrix<Scalar> actual = stream_of(next, t, i, channels);
        EXPECT_LE(max_difference(actual, source), tolerance<Scalar>(n)) << "n " << n << " stream " << i;
        if (n == 4) {
          EXPECT_GT(max_difference(actual, transposed_source), 1e-3) << "stream " << i;
        }
        EXPECT_GT(max_difference(actual, unmixed), 1e-3) << "n " << n << " stream " << i;
      }
    }
  }
}

TYPED_TEST(LayerTyped, PostCarriesFactorTwo) {
  using Scalar = TypeParam;
  const int n = 3;
  const int channels = 4;
  // Post logits 0 and 40: H_post = 2 sigmoid(0) = 1 and 2 sigmoid(40) = 2 - 2e^-40, which is 2 in double.
  const Parameters<Scalar> parameters =
      bias_only<Scalar>({0.0, 0.0, 0.0}, {0.0, 40.0, 0.0}, RowMatrix<double>::Identity(n, n), channels);
  const RowMatrix<Scalar> x = random_matrix<Scalar>(2, n * channels, 41);
  const Coefficients<Scalar> coefficients = mhc::compute_coefficients(parameters, x);
  EXPECT_NEAR(double(coefficients.post(0, 0)), 1.0, tolerance<Scalar>(2));
  EXPECT_NEAR(double(coefficients.post(0, 1)), 2.0, tolerance<Scalar>(4));
  EXPECT_NEAR(double(coefficients.pre(1, 2)), 0.5, tolerance<Scalar>(2));

  const RowMatrix<Scalar> next = mhc::forward(parameters, x, tanh_branch<Scalar>);
  for (Eigen::Index t = 0; t < x.rows(); ++t) {
    RowMatrix<Scalar> input = RowMatrix<Scalar>::Zero(1, channels);
    for (int j = 0; j < n; ++j) input += Scalar(0.5) * stream_of(x, t, j, channels);
    const RowMatrix<Scalar> update = tanh_branch<Scalar>(input);
    const RowMatrix<Scalar> doubled = stream_of(x, t, 1, channels) + Scalar(2) * update;
    EXPECT_LE(max_difference(stream_of(next, t, 1, channels), doubled), tolerance<Scalar>(8));
    const RowMatrix<Scalar> single = stream_of(x, t, 0, channels) + update;
    EXPECT_LE(max_difference(stream_of(next, t, 0, channels), single), tolerance<Scalar>(8));
  }
}

TYPED_TEST(LayerTyped, SingleStreamIsScaledResidual) {
  using Scalar = TypeParam;
  for (int channels : {1, 3, 13}) {
    Parameters<Scalar> parameters = random_parameters<Scalar>(1, channels, 51);
    const RowMatrix<Scalar> x = random_matrix<Scalar>(4, channels, 52);
    const Coefficients<Scalar> coefficients = mhc::compute_coefficients(parameters, x);
    const RowMatrix<Scalar> next = mhc::forward(parameters, x, tanh_branch<Scalar>);
    for (Eigen::Index t = 0; t < x.rows(); ++t) {
      // One stream: Sinkhorn-Knopp of a 1 x 1 matrix is exactly 1, so x_next = x + H_post F(H_pre x).
      EXPECT_EQ(coefficients.res(t, 0), Scalar(1));
      const RowMatrix<Scalar> expected =
          x.row(t) + coefficients.post(t, 0) * tanh_branch<Scalar>(RowMatrix<Scalar>(coefficients.pre(t, 0) * x.row(t)));
      EXPECT_LE(max_difference(RowMatrix<Scalar>(next.row(t)), expected), tolerance<Scalar>(4)) << "C " << channels;
    }
  }
}

TYPED_TEST(LayerTyped, IdentityReadsHomeStream) {
  using Scalar = TypeParam;
  const int channels = 3;
  for (int n : {2, 3, 4, 8, 16}) {
    // Symmetric logits 3 on the diagonal and -3 elsewhere: one Sinkhorn round already gives the
    // diagonal e^6 / (e^6 + n - 1) in every row and column.
    const double diagonal = std::exp(6.0) / (std::exp(6.0) + n - 1);
    for (int layer : {0, 1, n - 1, n, 2 * n + 1}) {
      const Parameters<Scalar> parameters = Parameters<Scalar>::identity(n, channels, layer);
      const RowMatrix<Scalar> x = random_matrix<Scalar>(2, n * channels, 61);
      const Coefficients<Scalar> coefficients = mhc::compute_coefficients(parameters, x);
      const int home = layer % n;
      for (int i = 0; i < n; ++i) {
        EXPECT_NEAR(double(coefficients.pre(0, i)), sigmoid(i == home ? 3.0 : -3.0), tolerance<Scalar>(4))
            << "n " << n << " layer " << layer << " stream " << i;
        EXPECT_NEAR(double(coefficients.post(1, i)), 1.0, tolerance<Scalar>(4));
        for (int j = 0; j < n; ++j) {
          const double expected = i == j ? diagonal : (1.0 - diagonal) / (n - 1);
          EXPECT_NEAR(double(coefficients.res(1, i * n + j)), expected, tolerance<Scalar>(40 * n)) << "n " << n;
        }
      }
    }
  }
}

TYPED_TEST(LayerTyped, StreamsPersistAcrossLayers) {
  using Scalar = TypeParam;
  const int channels = 5;
  const int layers = 3;
  for (int n : {1, 4}) {
    const RowMatrix<Scalar> embedding = random_matrix<Scalar>(3, channels, 71);
    RowMatrix<Scalar> state = mhc::expand_streams(embedding, n);
    RowMatrix<Scalar> collapsed = embedding;
    for (int layer = 0; layer < layers; ++layer) {
      const Parameters<Scalar> parameters = random_parameters<Scalar>(n, channels, 72 + std::uint32_t(layer));
      state = mhc::forward(parameters, state, tanh_branch<Scalar>);
      collapsed = mhc::reduce_streams(mhc::forward(parameters, mhc::expand_streams(collapsed, n), tanh_branch<Scalar>), n);
    }
    const RowMatrix<Scalar> persistent = mhc::reduce_streams(state, n);
    if (n == 1) {
      // With one stream expansion and reduction are copies, so both orders agree exactly.
      EXPECT_EQ(persistent, collapsed);
    } else {
      EXPECT_GT(max_difference(persistent, collapsed), 1e-2);
    }
  }
}

TYPED_TEST(LayerTyped, AcceptsMapAndRowBlock) {
  using Scalar = TypeParam;
  const int n = 3;
  const int channels = 7;
  const Parameters<Scalar> parameters = random_parameters<Scalar>(n, channels, 81);
  const RowMatrix<Scalar> all = random_matrix<Scalar>(6, n * channels, 82);
  const RowMatrix<Scalar> middle = all.middleRows(2, 3);
  const RowMatrix<Scalar> expected = mhc::forward(parameters, middle, tanh_branch<Scalar>);

  EXPECT_EQ(mhc::forward(parameters, all.middleRows(2, 3), tanh_branch<Scalar>), expected);
  std::vector<Scalar> buffer(middle.data(), middle.data() + middle.size());
  const Eigen::Map<const RowMatrix<Scalar>> mapped(buffer.data(), 3, n * channels);
  EXPECT_EQ(mhc::forward(parameters, mapped, tanh_branch<Scalar>), expected);
  const Coefficients<Scalar> from_map = mhc::compute_coefficients(parameters, mapped);
  EXPECT_EQ(from_map.res, mhc::compute_coefficients(parameters, middle).res);
}

TYPED_TEST(LayerTyped, HalvesEqualForward) {
  using Scalar = TypeParam;
  for (int n : {1, 2, 4}) {
    const int channels = 13;
    const Parameters<Scalar> parameters = random_parameters<Scalar>(n, channels, 91);
    const RowMatrix<Scalar> x = random_matrix<Scalar>(4, n * channels, 92);
    const mhc::BranchInput<Scalar> prepared = mhc::prepare_branch(parameters, x);
    const RowMatrix<Scalar> branch_output = tanh_branch<Scalar>(prepared.input);
    const RowMatrix<Scalar> returned = mhc::merge_streams<Scalar>(prepared.coefficients, x, branch_output);
    EXPECT_EQ(returned, mhc::forward(parameters, x, tanh_branch<Scalar>)) << "n " << n;

    RowMatrix<Scalar> into(x.rows(), x.cols());
    mhc::merge_streams<Scalar>(prepared.coefficients, x, branch_output, into);
    EXPECT_EQ(into, returned) << "n " << n;

    // The caller's buffer may be a block of a larger matrix.
    RowMatrix<Scalar> larger = RowMatrix<Scalar>::Constant(x.rows() + 2, x.cols(), Scalar(-7));
    mhc::merge_streams<Scalar>(prepared.coefficients, x, branch_output, larger.middleRows(1, x.rows()));
    EXPECT_EQ(RowMatrix<Scalar>(larger.middleRows(1, x.rows())), returned);
    EXPECT_EQ(larger(0, 0), Scalar(-7));
    EXPECT_EQ(larger(x.rows() + 1, x.cols() - 1), Scalar(-7));
  }
}

// Runs `call` and returns the std::invalid_argument message, or "" when nothing was thrown.
template <typename Call>
std::string invalid_argument_message(Call&& call) {
  try {
    call();
  } catch (const std::invalid_argument& error) {
    return error.what();
  }
  return "";
}

TEST(LayerInput, RejectsWrongStateWidth) {
  const Parameters<double> parameters = Parameters<double>::identity(2, 3, 0);
  const RowMatrix<double> x = random_matrix<double>(2, 7, 101);
  const std::string message = invalid_argument_message([&] { mhc::forward(parameters, x, tanh_branch<double>); });
  EXPECT_NE(message.find("x"), std::string::npos) << message;
  EXPECT_NE(message.find("expected 6 columns"), std::string::npos) << message;
  EXPECT_NE(message.find("got 7 columns"), std::string::npos) << message;
}

TEST(LayerInput, RejectsWrongBranchShape) {
  const Parameters<double> parameters = Parameters<double>::identity(2, 3, 0);
  const RowMatrix<double> x = random_matrix<double>(2, 6, 102);
  const std::string message = invalid_argument_message([&] {
    mhc::forward(parameters, x, [](const RowMatrix<double>& input) { return RowMatrix<double>(input.rows(), 4); });
  });
  EXPECT_NE(message.find("branch output"), std::string::npos) << message;
  EXPECT_NE(message.find("2 x 3"), std::string::npos) << message;
  EXPECT_NE(message.find("2 x 4"), std::string::npos) << message;
}

TEST(LayerInput, RejectsInconsistentParameters) {
  const RowMatrix<double> x = random_matrix<double>(2, 6, 103);
  Parameters<double> parameters = Parameters<double>::identity(2, 3, 0);
  parameters.phi.resize(6, 7);
  EXPECT_NE(invalid_argument_message([&] { mhc::compute_coefficients(parameters, x); }).find("parameters.phi"),
            std::string::npos);

  parameters = Parameters<double>::identity(2, 3, 0);
  parameters.bias.resize(9);
  EXPECT_NE(invalid_argument_message([&] { mhc::compute_coefficients(parameters, x); }).find("parameters.bias"),
            std::string::npos);

  parameters = Parameters<double>::identity(2, 3, 0);
  parameters.streams = 0;
  EXPECT_NE(invalid_argument_message([&] { mhc::compute_coefficients(parameters, x); }).find("parameters.streams"),
            std::string::npos);

  parameters = Parameters<double>::identity(2, 3, 0);
  parameters.alpha_res = std::numeric_limits<double>::infinity();
  EXPECT_NE(invalid_argument_message([&] { mhc::compute_coefficients(parameters, x); }).find("parameters.alpha_res"),
            std::string::npos);

  EXPECT_THROW(Parameters<double>::identity(0, 3, 0), std::invalid_argument);
  EXPECT_THROW(Parameters<double>::identity(2, 0, 0), std::invalid_argument);
  EXPECT_THROW(Parameters<double>::identity(2, 3, -1), std::invalid_argument);
}

TEST(LayerInput, RejectsNonPositiveEpsilon) {
  const Parameters<double> parameters = Parameters<double>::identity(2, 3, 0);
  const RowMatrix<double> x = random_matrix<double>(2, 6, 104);
  for (double epsilon : {0.0, -1e-6, std::nan("")}) {
    Options options;
    options.rms_epsilon = epsilon;
    const std::string message = invalid_argument_message([&] { mhc::compute_coefficients(parameters, x, options); });
    EXPECT_NE(message.find("options.rms_epsilon"), std::string::npos) << "epsilon " << epsilon << ": " << message;
  }
}

TEST(LayerInput, RejectsMismatchedCoefficients) {
  const Parameters<double> parameters = Parameters<double>::identity(2, 3, 0);
  const RowMatrix<double> x = random_matrix<double>(3, 6, 105);
  const Coefficients<double> coefficients = mhc::compute_coefficients(parameters, x);
  const RowMatrix<double> branch_output = random_matrix<double>(3, 3, 106);

  const RowMatrix<double> fewer_tokens = x.topRows(2);
  EXPECT_NE(invalid_argument_message([&] { mhc::aggregate_streams(coefficients, fewer_tokens); }).find("coefficients.pre"),
            std::string::npos);
  const RowMatrix<double> odd_width = random_matrix<double>(3, 7, 107);
  EXPECT_NE(invalid_argument_message([&] { mhc::aggregate_streams(coefficients, odd_width); }).find("x"),
            std::string::npos);
  Coefficients<double> bad = coefficients;
  bad.res.resize(3, 3);
  EXPECT_NE(invalid_argument_message([&] { mhc::merge_streams<double>(bad, x, branch_output); }).find("coefficients.res"),
            std::string::npos);
  EXPECT_THROW(mhc::merge_streams<double>(coefficients, x, RowMatrix<double>(3, 4)), std::invalid_argument);
  RowMatrix<double> small(2, 6);
  EXPECT_THROW(mhc::merge_streams<double>(coefficients, x, branch_output, small), std::invalid_argument);
}

}  // namespace
