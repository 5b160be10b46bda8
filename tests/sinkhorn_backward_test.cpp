// Gradient of the Sinkhorn-Knopp projection: finite differences, the implicit gradient,
// shift invariances of the gradient, early stop and fallback paths, and the batched form.
#include <mhc/sinkhorn.hpp>

#include "support.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace {

using mhc::RowMatrix;
using mhc::SinkhornGradient;
using mhc::SinkhornMethod;
using mhc::SinkhornOptions;
using mhc::SinkhornReport;
using mhc::test::tolerance;

SinkhornOptions make_options(int iterations, SinkhornMethod method = SinkhornMethod::linear,
                             SinkhornGradient gradient = SinkhornGradient::unrolled) {
  SinkhornOptions options;
  options.iterations = iterations;
  options.method = method;
  options.gradient = gradient;
  return options;
}

// scale * (a permutation matrix) + N(0, 0.1^2) noise: off-permutation entries near exp(-scale).
template <typename Scalar>
RowMatrix<Scalar> near_permutation(Eigen::Index n, double scale, std::uint32_t seed) {
  RowMatrix<Scalar> logits = mhc::test::random_matrix<Scalar>(n, n, seed, 0.1);
  for (Eigen::Index i = 0; i < n; ++i) logits(i, (2 * i + 1) % n) += static_cast<Scalar>(scale);
  return logits;
}

template <typename A, typename B>
double max_difference(const Eigen::MatrixBase<A>& a, const Eigen::MatrixBase<B>& b) {
  return static_cast<double>((a - b).cwiseAbs().maxCoeff());
}

template <typename Call>
std::string invalid_argument_message(Call&& call) {
  try {
    call();
  } catch (const std::invalid_argument& error) {
    return error.what();
  }
  return "";
}

// sum(upstream o sinkhorn_knopp(logits, options)), the scalar loss whose gradient the backward
// pass returns.
double loss(const RowMatrix<double>& logits, const RowMatrix<double>& upstream,
            const SinkhornOptions& options) {
  return mhc::sinkhorn_knopp(logits, options).cwiseProduct(upstream).sum();
}

// Largest |backward - central difference| over all entries, relative to max(1, largest
// gradient entry). Step 1e-5: truncation error about 1e-10 * third derivative, rounding error
// about 1e-16 * |loss| / 1e-5 = 1e-11 * |loss|.
double finite_difference_error(const RowMatrix<double>& logits, const RowMatrix<double>& upstream,
                               const SinkhornOptions& options) {
  const RowMatrix<double> gradient = mhc::sinkhorn_knopp_backward(logits, upstream, options);
  const double step = 1e-5;
  double largest = 0.0;
  for (Eigen::Index i = 0; i < logits.rows(); ++i) {
    for (Eigen::Index j = 0; j < logits.cols(); ++j) {
      const double numeric = mhc::test::central_difference(
          [&](double t) {
            RowMatrix<double> moved = logits;
            moved(i, j) += t;
            return loss(moved, upstream, options);
          },
          step);
      largest = std::max(largest, std::abs(gradient(i, j) - numeric));
    }
  }
  return largest / std::max(1.0, gradient.cwiseAbs().maxCoeff());
}

TEST(SinkhornBackward, MatchesFiniteDifferences) {
  for (Eigen::Index n : {1, 2, 3, 4, 8}) {
    const RowMatrix<double> upstream = mhc::test::random_matrix<double>(n, n, 101, 1.0);
    const RowMatrix<double> small = mhc::test::random_matrix<double>(n, n, 102, 0.5);
    const RowMatrix<double> large = near_permutation<double>(n, 6.0, 103);
    for (int iterations : {1, 2, 20}) {
      for (SinkhornMethod method : {SinkhornMethod::linear, SinkhornMethod::log_domain}) {
        const SinkhornOptions options = make_options(iterations, method);
        EXPECT_LE(finite_difference_error(small, upstream, options), 1e-7)
            << "n " << n << " rounds " << iterations << " log domain " << (method == SinkhornMethod::log_domain);
        EXPECT_LE(finite_difference_error(large, upstream, options), 1e-7)
            << "n " << n << " rounds " << iterations << " log domain " << (method == SinkhornMethod::log_domain);
      }
    }
  }
}

TEST(SinkhornBackward, ZeroRoundsMatchesFiniteDifferences) {
  const RowMatrix<double> upstream = mhc::test::random_matrix<double>(3, 3, 105, 1.0);
  const RowMatrix<double> logits = mhc::test::random_matrix<double>(3, 3, 106, 1.0);
  EXPECT_LE(finite_difference_error(logits, upstream, make_options(0)), 1e-7);
}

// With the tolerance set, the derivative is that of the rounds that ran. Away from the point
// where the stopping round changes, the perturbed forward passes run the same round count.
TEST(SinkhornBackward, EarlyStopMatchesFiniteDifferences) {
  const RowMatrix<double> upstream = mhc::test::random_matrix<double>(4, 4, 107, 1.0);
  const RowMatrix<double> logits = mhc::test::random_matrix<double>(4, 4, 108, 1.0);
  SinkhornOptions options = make_options(50);
  options.tolerance = 1e-5;
  EXPECT_LE(finite_difference_error(logits, upstream, options), 1e-7);
}

TEST(SinkhornBackward, FallbackMatchesFiniteDifferences) {
  const RowMatrix<double> upstream = mhc::test::random_matrix<double>(3, 3, 109, 1.0);
  RowMatrix<double> logits = mhc::test::random_matrix<double>(3, 3, 110, 1.0);
  logits.row(0).array() -= 1e4;
  SinkhornReport report;
  mhc::sinkhorn_knopp(logits, make_options(20), report);
  ASSERT_TRUE(report.log_domain);
  EXPECT_LE(finite_difference_error(logits, upstream, make_options(20)), 1e-7);
}

template <typename Scalar>
class SinkhornBackwardTest : public ::testing::Test {};
TYPED_TEST_SUITE(SinkhornBackwardTest, mhc::test::ScalarTypes, mhc::test::ScalarTypeNames);

TYPED_TEST(SinkhornBackwardTest, MatchesDouble) {
  using Scalar = TypeParam;
  for (Eigen::Index n : {1, 2, 3, 4, 8, 16}) {
    const RowMatrix<double> logits = mhc::test::random_matrix<double>(n, n, 111, 1.0);
    const RowMatrix<double> upstream = mhc::test::random_matrix<double>(n, n, 112, 1.0);
    for (SinkhornMethod method : {SinkhornMethod::linear, SinkhornMethod::log_domain}) {
      const SinkhornOptions options = make_options(20, method);
      const RowMatrix<double> expected = mhc::sinkhorn_knopp_backward(logits, upstream, options);
      const RowMatrix<Scalar> actual = mhc::sinkhorn_knopp_backward(
          RowMatrix<Scalar>(logits.cast<Scalar>()), RowMatrix<Scalar>(upstream.cast<Scalar>()),
          options);
      EXPECT_LE(max_difference(actual.template cast<double>(), expected),
                tolerance<Scalar>(40 * n))
          << "n " << n;
    }
  }
}

// Adding a constant to a column never changes the result because columns are normalised
// first, so the gradient's column sums vanish at any round count.
TYPED_TEST(SinkhornBackwardTest, ColumnSumsVanish) {
  using Scalar = TypeParam;
  for (Eigen::Index n : {2, 3, 4, 8}) {
    const RowMatrix<Scalar> logits = mhc::test::random_matrix<Scalar>(n, n, 113, 2.0);
    const RowMatrix<Scalar> upstream = mhc::test::random_matrix<Scalar>(n, n, 114, 1.0);
    for (int iterations : {1, 2, 5, 20}) {
      for (SinkhornMethod method : {SinkhornMethod::linear, SinkhornMethod::log_domain}) {
        const RowMatrix<Scalar> gradient =
            mhc::sinkhorn_knopp_backward(logits, upstream, make_options(iterations, method));
        EXPECT_LE(static_cast<double>(gradient.colwise().sum().cwiseAbs().maxCoeff()),
                  tolerance<Scalar>(4 * n * iterations))
            << "n " << n << " rounds " << iterations;
      }
    }
  }
}

TYPED_TEST(SinkhornBackwardTest, RowSumsVanishAtConvergence) {
  using Scalar = TypeParam;
  for (Eigen::Index n : {2, 3, 4, 8}) {
    const RowMatrix<Scalar> logits = mhc::test::random_matrix<Scalar>(n, n, 115, 1.0);
    const RowMatrix<Scalar> upstream = mhc::test::random_matrix<Scalar>(n, n, 116, 1.0);
    const RowMatrix<Scalar> gradient =
        mhc::sinkhorn_knopp_backward(logits, upstream, make_options(300));
    EXPECT_LE(static_cast<double>(gradient.rowwise().sum().cwiseAbs().maxCoeff()),
              tolerance<Scalar>(40 * n))
        << "n " << n;
  }
}

TYPED_TEST(SinkhornBackwardTest, RowSumsRemainWhenTruncated) {
  using Scalar = TypeParam;
  const RowMatrix<Scalar> logits = mhc::test::random_matrix<Scalar>(4, 4, 117, 2.0);
  const RowMatrix<Scalar> upstream = mhc::test::random_matrix<Scalar>(4, 4, 118, 1.0);
  const RowMatrix<Scalar> gradient = mhc::sinkhorn_knopp_backward(logits, upstream, make_options(1));
  EXPECT_GT(static_cast<double>(gradient.rowwise().sum().cwiseAbs().maxCoeff()), 1e-3);
}

TYPED_TEST(SinkhornBackwardTest, ImplicitMatchesUnrolledAtConvergence) {
  using Scalar = TypeParam;
  for (Eigen::Index n : {1, 2, 3, 4, 8, 16}) {
    const RowMatrix<Scalar> logits = mhc::test::random_matrix<Scalar>(n, n, 119, 1.0);
    const RowMatrix<Scalar> upstream = mhc::test::random_matrix<Scalar>(n, n, 120, 1.0);
    for (SinkhornMethod method : {SinkhornMethod::linear, SinkhornMethod::log_domain}) {
      const RowMatrix<Scalar> unrolled =
          mhc::sinkhorn_knopp_backward(logits, upstream, make_options(300, method));
      const RowMatrix<Scalar> implicit = mhc::sinkhorn_knopp_backward(
          logits, upstream, make_options(300, method, SinkhornGradient::implicit));
      EXPECT_LE(max_difference(implicit, unrolled), tolerance<Scalar>(40 * n)) << "n " << n;
    }
  }
}

// Before convergence the two gradients differ by about the column error of the forward pass.
TYPED_TEST(SinkhornBackwardTest, ImplicitDiffersWhenTruncated) {
  using Scalar = TypeParam;
  const RowMatrix<Scalar> logits = near_permutation<Scalar>(4, 4.0, 121);
  const RowMatrix<Scalar> upstream = mhc::test::random_matrix<Scalar>(4, 4, 122, 1.0);
  SinkhornReport report;
  mhc::sinkhorn_knopp(logits, make_options(2), report);
  const RowMatrix<Scalar> unrolled = mhc::sinkhorn_knopp_backward(logits, upstream, make_options(2));
  const RowMatrix<Scalar> implicit = mhc::sinkhorn_knopp_backward(
      logits, upstream, make_options(2, SinkhornMethod::linear, SinkhornGradient::implicit));
  EXPECT_GT(max_difference(implicit, unrolled), 0.01 * report.column_error);
  EXPECT_LT(max_difference(implicit, unrolled), 10.0 * report.column_error);
}

TYPED_TEST(SinkhornBackwardTest, ImplicitSumsVanish) {
  using Scalar = TypeParam;
  for (Eigen::Index n : {1, 2, 3, 4, 8}) {
    const RowMatrix<Scalar> logits = mhc::test::random_matrix<Scalar>(n, n, 123, 1.0);
    const RowMatrix<Scalar> upstream = mhc::test::random_matrix<Scalar>(n, n, 124, 1.0);
    const RowMatrix<Scalar> gradient = mhc::sinkhorn_knopp_backward(
        logits, upstream, make_options(200, SinkhornMethod::linear, SinkhornGradient::implicit));
    EXPECT_LE(static_cast<double>(gradient.rowwise().sum().cwiseAbs().maxCoeff()),
              tolerance<Scalar>(8 * n))
        << "n " << n;
    EXPECT_LE(static_cast<double>(gradient.colwise().sum().cwiseAbs().maxCoeff()),
              tolerance<Scalar>(8 * n))
        << "n " << n;
  }
}

TYPED_TEST(SinkhornBackwardTest, EarlyStopUsesRoundsThatRan) {
  using Scalar = TypeParam;
  const RowMatrix<Scalar> logits = mhc::test::random_matrix<Scalar>(4, 4, 125, 1.0);
  const RowMatrix<Scalar> upstream = mhc::test::random_matrix<Scalar>(4, 4, 126, 1.0);
  SinkhornOptions options = make_options(100);
  options.tolerance = 1e-4;
  SinkhornReport report;
  mhc::sinkhorn_knopp(logits, options, report);
  ASSERT_LT(report.iterations, options.iterations);
  EXPECT_EQ(max_difference(mhc::sinkhorn_knopp_backward(logits, upstream, options),
                           mhc::sinkhorn_knopp_backward(logits, upstream,
                                                        make_options(report.iterations))),
            0.0);
}

TYPED_TEST(SinkhornBackwardTest, FallbackUsesLogDomain) {
  using Scalar = TypeParam;
  RowMatrix<Scalar> logits = mhc::test::random_matrix<Scalar>(3, 3, 127, 1.0);
  logits.row(2).array() -= Scalar(1e4);
  const RowMatrix<Scalar> upstream = mhc::test::random_matrix<Scalar>(3, 3, 128, 1.0);
  SinkhornReport report;
  mhc::sinkhorn_knopp(logits, make_options(20), report);
  ASSERT_TRUE(report.log_domain);
  const RowMatrix<Scalar> linear = mhc::sinkhorn_knopp_backward(logits, upstream, make_options(20));
  EXPECT_TRUE(linear.allFinite());
  EXPECT_EQ(max_difference(linear, mhc::sinkhorn_knopp_backward(
                                       logits, upstream,
                                       make_options(20, SinkhornMethod::log_domain))),
            0.0);
}

TYPED_TEST(SinkhornBackwardTest, StructuralZeroHasZeroGradient) {
  using Scalar = TypeParam;
  RowMatrix<Scalar> logits = mhc::test::random_matrix<Scalar>(4, 4, 129, 1.0);
  logits(2, 1) = -std::numeric_limits<Scalar>::infinity();
  const RowMatrix<Scalar> upstream = mhc::test::random_matrix<Scalar>(4, 4, 130, 1.0);
  for (SinkhornMethod method : {SinkhornMethod::linear, SinkhornMethod::log_domain}) {
    for (SinkhornGradient gradient : {SinkhornGradient::unrolled, SinkhornGradient::implicit}) {
      const RowMatrix<Scalar> result =
          mhc::sinkhorn_knopp_backward(logits, upstream, make_options(20, method, gradient));
      EXPECT_TRUE(result.allFinite());
      EXPECT_EQ(result(2, 1), Scalar(0));
    }
  }
}

TYPED_TEST(SinkhornBackwardTest, FixedSizeMatchesDynamic) {
  using Scalar = TypeParam;
  using Fixed = Eigen::Matrix<Scalar, 4, 4>;
  const RowMatrix<Scalar> logits = mhc::test::random_matrix<Scalar>(4, 4, 131, 2.0);
  const RowMatrix<Scalar> upstream = mhc::test::random_matrix<Scalar>(4, 4, 132, 1.0);
  const Fixed fixed = mhc::sinkhorn_knopp_backward(Fixed(logits), Fixed(upstream));
  EXPECT_LE(max_difference(fixed, mhc::sinkhorn_knopp_backward(logits, upstream)),
            tolerance<Scalar>(80));
}

TYPED_TEST(SinkhornBackwardTest, BatchedMatchesOneByOne) {
  using Scalar = TypeParam;
  for (Eigen::Index n : {1, 2, 3, 4, 8}) {
    for (Eigen::Index tokens : {0, 1, 4}) {
      const RowMatrix<Scalar> logits = mhc::test::random_matrix<Scalar>(tokens, n * n, 133, 2.0);
      const RowMatrix<Scalar> upstream = mhc::test::random_matrix<Scalar>(tokens, n * n, 134, 1.0);
      for (SinkhornGradient gradient : {SinkhornGradient::unrolled, SinkhornGradient::implicit}) {
        const SinkhornOptions options = make_options(20, SinkhornMethod::linear, gradient);
        const RowMatrix<Scalar> batched =
            mhc::sinkhorn_knopp_batched_backward(logits, upstream, options);
        ASSERT_EQ(batched.rows(), tokens);
        ASSERT_EQ(batched.cols(), n * n);
        for (Eigen::Index t = 0; t < tokens; ++t) {
          const RowMatrix<Scalar> token_logits =
              Eigen::Map<const RowMatrix<Scalar>>(logits.row(t).data(), n, n);
          const RowMatrix<Scalar> token_upstream =
              Eigen::Map<const RowMatrix<Scalar>>(upstream.row(t).data(), n, n);
          const RowMatrix<Scalar> expected =
              mhc::sinkhorn_knopp_backward(token_logits, token_upstream, options);
          const Eigen::Map<const RowMatrix<Scalar>> actual(batched.row(t).data(), n, n);
          EXPECT_LE(max_difference(actual, expected), tolerance<Scalar>(40 * n))
              << "n " << n << " token " << t;
        }
      }
    }
  }
}

TYPED_TEST(SinkhornBackwardTest, BatchedGradientMayAliasUpstream) {
  using Scalar = TypeParam;
  const RowMatrix<Scalar> logits = mhc::test::random_matrix<Scalar>(3, 9, 135, 1.0);
  RowMatrix<Scalar> gradient = mhc::test::random_matrix<Scalar>(3, 9, 136, 1.0);
  const RowMatrix<Scalar> expected = mhc::sinkhorn_knopp_batched_backward(logits, gradient);
  mhc::sinkhorn_knopp_batched_backward(logits, gradient, gradient);
  EXPECT_EQ(max_difference(gradient, expected), 0.0);
}

TYPED_TEST(SinkhornBackwardTest, InvalidArgumentsThrow) {
  using Scalar = TypeParam;
  const RowMatrix<Scalar> logits = RowMatrix<Scalar>::Zero(3, 3);
  EXPECT_EQ(invalid_argument_message(
                [&] { mhc::sinkhorn_knopp_backward(logits, RowMatrix<Scalar>::Zero(3, 2)); }),
            "sinkhorn_knopp_backward: invalid grad_output: expected shape 3 x 3, got 3 x 2");
  EXPECT_EQ(invalid_argument_message([&] {
              mhc::sinkhorn_knopp_backward(RowMatrix<Scalar>::Zero(2, 3),
                                           RowMatrix<Scalar>::Zero(2, 3));
            }),
            "sinkhorn_knopp_backward: invalid logits: expected a non-empty square matrix, got 2 x 3");
  EXPECT_NE(invalid_argument_message([&] {
              mhc::sinkhorn_knopp_backward(logits, logits, SinkhornOptions{-2, 0.0});
            }).find("invalid options.iterations"),
            std::string::npos);
  SinkhornOptions bad_gradient;
  bad_gradient.gradient = static_cast<SinkhornGradient>(5);
  EXPECT_NE(invalid_argument_message([&] {
              mhc::sinkhorn_knopp_backward(logits, logits, bad_gradient);
            }).find("invalid options.gradient"),
            std::string::npos);

  const RowMatrix<Scalar> batch = RowMatrix<Scalar>::Zero(2, 4);
  EXPECT_EQ(invalid_argument_message([&] {
              mhc::sinkhorn_knopp_batched_backward(batch, RowMatrix<Scalar>::Zero(2, 9));
            }),
            "sinkhorn_knopp_batched_backward: invalid grad_output: expected shape 2 x 4, got 2 x 9");
  RowMatrix<Scalar> small_output(1, 4);
  EXPECT_EQ(invalid_argument_message([&] {
              mhc::sinkhorn_knopp_batched_backward(batch, batch, small_output);
            }),
            "sinkhorn_knopp_batched_backward: invalid grad_logits: expected shape 2 x 4, got 1 x 4");
  RowMatrix<Scalar> with_infinity = batch;
  with_infinity(1, 0) = std::numeric_limits<Scalar>::infinity();
  EXPECT_EQ(invalid_argument_message([&] {
              mhc::sinkhorn_knopp_batched_backward(with_infinity, batch);
            }),
            "sinkhorn_knopp_batched_backward: invalid logits row 1: expected finite entries or "
            "-infinity, got inf at (0, 0)");
}

}  // namespace
