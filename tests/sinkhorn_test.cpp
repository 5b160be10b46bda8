// Forward Sinkhorn-Knopp projection: normalisation, invariances, closed forms, extreme logits,
// early stop, batched and fixed-size forms, and argument checks.
#include <mhc/sinkhorn.hpp>

#include "support.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace {

using mhc::RowMatrix;
using mhc::SinkhornMethod;
using mhc::SinkhornOptions;
using mhc::SinkhornReport;
using mhc::test::tolerance;

const std::vector<Eigen::Index> kSizes = {1, 2, 3, 4, 8, 16, 32};

SinkhornOptions rounds(int iterations, SinkhornMethod method = SinkhornMethod::linear) {
  SinkhornOptions options;
  options.iterations = iterations;
  options.method = method;
  return options;
}

// scale * (a permutation matrix with an asymmetric pattern) + N(0, 0.1^2) noise. Sinkhorn
// converges slowly on it because the off-permutation entries are about exp(-scale).
template <typename Scalar>
RowMatrix<Scalar> near_permutation(Eigen::Index n, double scale, std::uint32_t seed) {
  RowMatrix<Scalar> logits = mhc::test::random_matrix<Scalar>(n, n, seed, 0.1);
  for (Eigen::Index i = 0; i < n; ++i) logits(i, (2 * i + 1) % n) += static_cast<Scalar>(scale);
  return logits;
}

// Largest |row sum - 1|.
template <typename Derived>
double row_error(const Eigen::MatrixBase<Derived>& matrix) {
  return static_cast<double>((matrix.rowwise().sum().array() - 1).abs().maxCoeff());
}

// Largest |column sum - 1|.
template <typename Derived>
double column_error(const Eigen::MatrixBase<Derived>& matrix) {
  return static_cast<double>((matrix.colwise().sum().array() - 1).abs().maxCoeff());
}

template <typename A, typename B>
double max_difference(const Eigen::MatrixBase<A>& a, const Eigen::MatrixBase<B>& b) {
  return static_cast<double>((a - b).cwiseAbs().maxCoeff());
}

// Permutation i -> (step * i + offset) mod n; a bijection when step and n are coprime.
Eigen::PermutationMatrix<Eigen::Dynamic> shift_permutation(Eigen::Index n, int step, int offset) {
  Eigen::PermutationMatrix<Eigen::Dynamic> permutation(n);
  for (Eigen::Index i = 0; i < n; ++i) permutation.indices()(i) = static_cast<int>((step * i + offset) % n);
  return permutation;
}

// Runs `call` and returns the message of the std::invalid_argument it throws, or "" if none.
template <typename Call>
std::string invalid_argument_message(Call&& call) {
  try {
    call();
  } catch (const std::invalid_argument& error) {
    return error.what();
  }
  return "";
}

template <typename Scalar>
class SinkhornTest : public ::testing::Test {};
TYPED_TEST_SUITE(SinkhornTest, mhc::test::ScalarTypes, mhc::test::ScalarTypeNames);

TYPED_TEST(SinkhornTest, RowSumsExact) {
  using Scalar = TypeParam;
  for (Eigen::Index n : kSizes) {
    for (int iterations : {1, 2, 20}) {
      const RowMatrix<Scalar> logits = mhc::test::random_matrix<Scalar>(n, n, 7, 2.0);
      const RowMatrix<Scalar> projected = mhc::sinkhorn_knopp(logits, rounds(iterations));
      EXPECT_LE(row_error(projected), tolerance<Scalar>(n)) << "n " << n << " rounds " << iterations;
      EXPECT_GE(projected.minCoeff(), Scalar(0)) << "n " << n << " rounds " << iterations;
    }
  }
}

// Bounds from 2000 draws of random_matrix(n, n, seed, s), seeds 0..1999, 20 rounds, double:
// worst column error 3.5e-3 for s = 1 (n = 4; smaller for larger n) and 3.7e-2 for s = 2.
TYPED_TEST(SinkhornTest, ColumnErrorBound) {
  using Scalar = TypeParam;
  for (Eigen::Index n : kSizes) {
    for (std::uint32_t seed = 0; seed < 50; ++seed) {
      const RowMatrix<Scalar> unit = mhc::test::random_matrix<Scalar>(n, n, seed, 1.0);
      const RowMatrix<Scalar> wide = mhc::test::random_matrix<Scalar>(n, n, seed, 2.0);
      const double rounding = tolerance<Scalar>(n);
      EXPECT_LE(column_error(mhc::sinkhorn_knopp(unit)), 3.5e-3 + rounding) << "n " << n;
      EXPECT_LE(column_error(mhc::sinkhorn_knopp(wide)), 3.7e-2 + rounding) << "n " << n;
    }
  }
}

TYPED_TEST(SinkhornTest, ConvergesToDoublyStochastic) {
  using Scalar = TypeParam;
  for (Eigen::Index n : kSizes) {
    const RowMatrix<Scalar> logits = mhc::test::random_matrix<Scalar>(n, n, 3, 1.0);
    const RowMatrix<Scalar> projected = mhc::sinkhorn_knopp(logits, rounds(500));
    EXPECT_LE(static_cast<double>(mhc::doubly_stochastic_error(projected)), tolerance<Scalar>(n))
        << "n " << n;
  }
}

TYPED_TEST(SinkhornTest, DoublyStochasticIsFixedPoint) {
  using Scalar = TypeParam;
  for (Eigen::Index n : kSizes) {
    // Average of the identity and two cyclic shifts: doubly stochastic with positive entries
    // after adding a uniform part.
    RowMatrix<Scalar> target = RowMatrix<Scalar>::Constant(n, n, Scalar(0.1) / Scalar(n));
    for (Eigen::Index i = 0; i < n; ++i) {
      target(i, i) += Scalar(0.5);
      target(i, (i + 1) % n) += Scalar(0.3);
      target(i, (i + 3) % n) += Scalar(0.1);
    }
    const RowMatrix<Scalar> logits = target.array().log().matrix();
    for (int iterations : {1, 20}) {
      const RowMatrix<Scalar> projected = mhc::sinkhorn_knopp(logits, rounds(iterations));
      EXPECT_LE(max_difference(projected, target), tolerance<Scalar>(4 * n)) << "n " << n;
    }
  }
}

TYPED_TEST(SinkhornTest, ColumnShiftInvariant) {
  using Scalar = TypeParam;
  for (Eigen::Index n : kSizes) {
    const RowMatrix<Scalar> logits = mhc::test::random_matrix<Scalar>(n, n, 11, 2.0);
    const RowMatrix<Scalar> shifts = mhc::test::random_matrix<Scalar>(1, n, 12, 5.0);
    const RowMatrix<Scalar> shifted = logits + shifts.replicate(n, 1);
    for (int iterations : {1, 2, 20}) {
      for (SinkhornMethod method : {SinkhornMethod::linear, SinkhornMethod::log_domain}) {
        const auto options = rounds(iterations, method);
        EXPECT_LE(max_difference(mhc::sinkhorn_knopp(shifted, options),
                                 mhc::sinkhorn_knopp(logits, options)),
                  tolerance<Scalar>(4 * n * iterations))
            << "n " << n << " rounds " << iterations;
      }
    }
  }
}

TYPED_TEST(SinkhornTest, RowShiftInvariantAtConvergence) {
  using Scalar = TypeParam;
  for (Eigen::Index n : kSizes) {
    const RowMatrix<Scalar> logits = mhc::test::random_matrix<Scalar>(n, n, 13, 1.0);
    const RowMatrix<Scalar> shifts = mhc::test::random_matrix<Scalar>(n, 1, 14, 5.0);
    const RowMatrix<Scalar> shifted = logits + shifts.replicate(1, n);
    EXPECT_LE(max_difference(mhc::sinkhorn_knopp(shifted, rounds(500)),
                             mhc::sinkhorn_knopp(logits, rounds(500))),
              tolerance<Scalar>(16 * n))
        << "n " << n;
  }
}

TYPED_TEST(SinkhornTest, RowShiftChangesTruncatedResult) {
  using Scalar = TypeParam;
  const RowMatrix<Scalar> logits = mhc::test::random_matrix<Scalar>(4, 4, 13, 2.0);
  const RowMatrix<Scalar> shifts = mhc::test::random_matrix<Scalar>(4, 1, 14, 5.0);
  const RowMatrix<Scalar> shifted = logits + shifts.replicate(1, 4);
  EXPECT_GT(max_difference(mhc::sinkhorn_knopp(shifted, rounds(1)),
                           mhc::sinkhorn_knopp(logits, rounds(1))),
            1e-3);
}

TYPED_TEST(SinkhornTest, PermutationEquivariant) {
  using Scalar = TypeParam;
  for (Eigen::Index n : kSizes) {
    const auto row_permutation = shift_permutation(n, 1, 1);
    const auto column_permutation = shift_permutation(n, n % 2 == 0 ? 1 : 2, n / 2);
    const RowMatrix<Scalar> logits = mhc::test::random_matrix<Scalar>(n, n, 17, 2.0);
    const RowMatrix<Scalar> permuted = row_permutation * logits * column_permutation.transpose();
    for (int iterations : {1, 20}) {
      const RowMatrix<Scalar> expected =
          row_permutation * mhc::sinkhorn_knopp(logits, rounds(iterations)) *
          column_permutation.transpose();
      EXPECT_LE(max_difference(mhc::sinkhorn_knopp(permuted, rounds(iterations)), expected),
                tolerance<Scalar>(4 * n * iterations))
          << "n " << n;
    }
  }
}

TYPED_TEST(SinkhornTest, SizeOneIsOne) {
  using Scalar = TypeParam;
  for (Scalar logit : {Scalar(-30), Scalar(0), Scalar(5)}) {
    const RowMatrix<Scalar> logits = RowMatrix<Scalar>::Constant(1, 1, logit);
    EXPECT_EQ(mhc::sinkhorn_knopp(logits)(0, 0), Scalar(1)) << "logit " << logit;
  }
}

// For exp(logits) = [[a, b], [c, d]] the limit is [[p, 1 - p], [1 - p, p]] with
// p = sqrt(ad) / (sqrt(ad) + sqrt(bc)).
TYPED_TEST(SinkhornTest, TwoByTwoClosedForm) {
  using Scalar = TypeParam;
  for (std::uint32_t seed = 0; seed < 20; ++seed) {
    const RowMatrix<double> logits = mhc::test::random_matrix<double>(2, 2, seed, 1.5);
    const double ad = std::exp(0.5 * (logits(0, 0) + logits(1, 1)));
    const double bc = std::exp(0.5 * (logits(0, 1) + logits(1, 0)));
    const double p = ad / (ad + bc);
    const RowMatrix<Scalar> projected =
        mhc::sinkhorn_knopp(RowMatrix<Scalar>(logits.cast<Scalar>()), rounds(300));
    EXPECT_NEAR(static_cast<double>(projected(0, 0)), p, tolerance<Scalar>(8)) << "seed " << seed;
    EXPECT_NEAR(static_cast<double>(projected(0, 1)), 1 - p, tolerance<Scalar>(8)) << "seed " << seed;
    EXPECT_NEAR(static_cast<double>(projected(1, 0)), 1 - p, tolerance<Scalar>(8)) << "seed " << seed;
    EXPECT_NEAR(static_cast<double>(projected(1, 1)), p, tolerance<Scalar>(8)) << "seed " << seed;
  }
}

TYPED_TEST(SinkhornTest, ZeroRoundsIsExp) {
  using Scalar = TypeParam;
  const RowMatrix<Scalar> logits = mhc::test::random_matrix<Scalar>(3, 3, 5, 1.0);
  for (SinkhornMethod method : {SinkhornMethod::linear, SinkhornMethod::log_domain}) {
    SinkhornReport report;
    const RowMatrix<Scalar> projected = mhc::sinkhorn_knopp(logits, rounds(0, method), report);
    EXPECT_LE(max_difference(projected, logits.array().exp().matrix()), tolerance<Scalar>(1));
    EXPECT_EQ(report.iterations, 0);
  }
}

TYPED_TEST(SinkhornTest, FixedSizeMatchesDynamic) {
  using Scalar = TypeParam;
  using Fixed = Eigen::Matrix<Scalar, 4, 4>;
  const RowMatrix<Scalar> logits = mhc::test::random_matrix<Scalar>(4, 4, 19, 2.0);
  const Fixed fixed_logits = logits;
  const Fixed fixed = mhc::sinkhorn_knopp(fixed_logits);
  const RowMatrix<Scalar> dynamic = mhc::sinkhorn_knopp(logits);
  const Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic> column_major =
      mhc::sinkhorn_knopp(Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>(logits));
  EXPECT_LE(max_difference(fixed, dynamic), tolerance<Scalar>(4));
  EXPECT_LE(max_difference(column_major, dynamic), tolerance<Scalar>(4));
}

TYPED_TEST(SinkhornTest, BatchedMatchesOneByOne) {
  using Scalar = TypeParam;
  for (Eigen::Index n : {1, 2, 3, 4, 8}) {
    for (Eigen::Index tokens : {0, 1, 5}) {
      const RowMatrix<Scalar> logits = mhc::test::random_matrix<Scalar>(tokens, n * n, 23, 2.0);
      const RowMatrix<Scalar> batched = mhc::sinkhorn_knopp_batched(logits);
      ASSERT_EQ(batched.rows(), tokens);
      ASSERT_EQ(batched.cols(), n * n);
      for (Eigen::Index t = 0; t < tokens; ++t) {
        const RowMatrix<Scalar> token_logits =
            Eigen::Map<const RowMatrix<Scalar>>(logits.row(t).data(), n, n);
        const RowMatrix<Scalar> expected = mhc::sinkhorn_knopp(token_logits);
        const Eigen::Map<const RowMatrix<Scalar>> actual(batched.row(t).data(), n, n);
        EXPECT_LE(max_difference(actual, expected), tolerance<Scalar>(n)) << "n " << n << " token " << t;
      }
    }
  }
}

TYPED_TEST(SinkhornTest, BatchedWritesIntoBlockOfRows) {
  using Scalar = TypeParam;
  const Eigen::Index n = 3;
  const RowMatrix<Scalar> logits = mhc::test::random_matrix<Scalar>(4, n * n, 29, 1.0);
  RowMatrix<Scalar> output = RowMatrix<Scalar>::Constant(6, n * n, Scalar(-7));
  mhc::sinkhorn_knopp_batched(logits, output.middleRows(1, 4), SinkhornOptions{20, 1e-6});
  EXPECT_LE(max_difference(output.middleRows(1, 4),
                           mhc::sinkhorn_knopp_batched(logits, SinkhornOptions{20, 1e-6})),
            tolerance<Scalar>(n));
  EXPECT_EQ(output.row(0).maxCoeff(), Scalar(-7));
  EXPECT_EQ(output.row(5).maxCoeff(), Scalar(-7));
}

TYPED_TEST(SinkhornTest, BatchedAcceptsColumnMajorInput) {
  using Scalar = TypeParam;
  const RowMatrix<Scalar> logits = mhc::test::random_matrix<Scalar>(3, 16, 31, 1.0);
  const Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic> column_major = logits;
  EXPECT_EQ(max_difference(mhc::sinkhorn_knopp_batched(column_major),
                           mhc::sinkhorn_knopp_batched(logits)),
            0.0);
}

TYPED_TEST(SinkhornTest, ErrorDecreasesWithRounds) {
  using Scalar = TypeParam;
  const RowMatrix<Scalar> logits = near_permutation<Scalar>(4, 6.0, 37);
  double previous = std::numeric_limits<double>::infinity();
  for (int iterations : {1, 2, 3, 4, 6, 8}) {
    SinkhornReport report;
    mhc::sinkhorn_knopp(logits, rounds(iterations), report);
    EXPECT_LT(report.column_error, previous) << "rounds " << iterations;
    previous = report.column_error;
  }
  EXPECT_GT(previous, 10 * tolerance<Scalar>(4));
}

TYPED_TEST(SinkhornTest, ToleranceStopsEarly) {
  using Scalar = TypeParam;
  const RowMatrix<Scalar> logits = mhc::test::random_matrix<Scalar>(4, 4, 41, 1.0);
  for (SinkhornMethod method : {SinkhornMethod::linear, SinkhornMethod::log_domain}) {
    SinkhornOptions options = rounds(100, method);
    options.tolerance = 1e-4;
    SinkhornReport report;
    const RowMatrix<Scalar> projected = mhc::sinkhorn_knopp(logits, options, report);
    EXPECT_GT(report.iterations, 0);
    EXPECT_LT(report.iterations, options.iterations);
    EXPECT_LE(report.column_error, options.tolerance);
    EXPECT_NEAR(report.column_error, column_error(projected), tolerance<Scalar>(4));

    SinkhornReport previous;
    mhc::sinkhorn_knopp(logits, rounds(report.iterations - 1, method), previous);
    EXPECT_GT(previous.column_error, options.tolerance);
    EXPECT_EQ(max_difference(mhc::sinkhorn_knopp(logits, rounds(report.iterations, method)),
                             projected),
              0.0);
  }
}

TYPED_TEST(SinkhornTest, ReportWithoutTolerance) {
  using Scalar = TypeParam;
  const RowMatrix<Scalar> logits = mhc::test::random_matrix<Scalar>(5, 5, 43, 1.0);
  SinkhornReport report;
  const RowMatrix<Scalar> projected = mhc::sinkhorn_knopp(logits, rounds(7), report);
  EXPECT_EQ(report.iterations, 7);
  EXPECT_NEAR(report.column_error, column_error(projected), tolerance<Scalar>(5));
  EXPECT_FALSE(report.log_domain);
}

TYPED_TEST(SinkhornTest, MethodsAgree) {
  using Scalar = TypeParam;
  for (Eigen::Index n : kSizes) {
    for (double scale : {0.1, 2.0, 10.0}) {
      const RowMatrix<Scalar> logits = mhc::test::random_matrix<Scalar>(n, n, 47, scale);
      SinkhornReport report;
      const RowMatrix<Scalar> log_domain =
          mhc::sinkhorn_knopp(logits, rounds(20, SinkhornMethod::log_domain), report);
      EXPECT_TRUE(report.log_domain);
      EXPECT_LE(max_difference(mhc::sinkhorn_knopp(logits, rounds(20)), log_domain),
                tolerance<Scalar>(4 * n + scale))
          << "n " << n << " scale " << scale;
    }
  }
}

TYPED_TEST(SinkhornTest, LargeLogitsStayFinite) {
  using Scalar = TypeParam;
  for (Eigen::Index n : {2, 4, 8}) {
    const RowMatrix<Scalar> logits = mhc::test::random_matrix<Scalar>(n, n, 53, 1e4);
    for (SinkhornMethod method : {SinkhornMethod::linear, SinkhornMethod::log_domain}) {
      const RowMatrix<Scalar> projected = mhc::sinkhorn_knopp(logits, rounds(20, method));
      EXPECT_TRUE(projected.allFinite()) << "n " << n;
      EXPECT_LE(row_error(projected), tolerance<Scalar>(n)) << "n " << n;
      EXPECT_GE(projected.minCoeff(), Scalar(0)) << "n " << n;
    }
  }
}

TYPED_TEST(SinkhornTest, TinyLogitsGiveUniform) {
  using Scalar = TypeParam;
  for (Eigen::Index n : kSizes) {
    const RowMatrix<Scalar> logits = mhc::test::random_matrix<Scalar>(n, n, 59, 1e-30);
    const RowMatrix<Scalar> projected = mhc::sinkhorn_knopp(logits, rounds(1));
    const Scalar uniform = Scalar(1) / static_cast<Scalar>(n);
    EXPECT_LE(max_difference(projected, RowMatrix<Scalar>::Constant(n, n, uniform)),
              tolerance<Scalar>(n))
        << "n " << n;
  }
}

// One row far below the others underflows every sum of that row, so the linear method must
// finish in the log domain and agree with it.
TYPED_TEST(SinkhornTest, UnderflowFallsBackToLogDomain) {
  using Scalar = TypeParam;
  RowMatrix<Scalar> logits = mhc::test::random_matrix<Scalar>(3, 3, 61, 1.0);
  logits.row(1).array() -= Scalar(1e4);
  SinkhornReport linear_report;
  const RowMatrix<Scalar> linear = mhc::sinkhorn_knopp(logits, rounds(20), linear_report);
  const RowMatrix<Scalar> log_domain =
      mhc::sinkhorn_knopp(logits, rounds(20, SinkhornMethod::log_domain));
  EXPECT_TRUE(linear_report.log_domain);
  EXPECT_TRUE(linear.allFinite());
  EXPECT_LE(row_error(linear), tolerance<Scalar>(3));
  EXPECT_EQ(max_difference(linear, log_domain), 0.0);
}

TYPED_TEST(SinkhornTest, MixedColumnStaysFinite) {
  using Scalar = TypeParam;
  RowMatrix<Scalar> logits(3, 3);
  logits << 0, -1e4, 0,  //
      -1e4, 0, -1e4,     //
      0, -1e4, -1e4;
  for (SinkhornMethod method : {SinkhornMethod::linear, SinkhornMethod::log_domain}) {
    const RowMatrix<Scalar> projected = mhc::sinkhorn_knopp(logits, rounds(20, method));
    EXPECT_TRUE(projected.allFinite());
    EXPECT_LE(row_error(projected), tolerance<Scalar>(3));
    EXPECT_GE(projected.minCoeff(), Scalar(0));
  }
}

TYPED_TEST(SinkhornTest, NegativeInfinityIsStructuralZero) {
  using Scalar = TypeParam;
  const Scalar minus_infinity = -std::numeric_limits<Scalar>::infinity();
  for (Eigen::Index n : {2, 3, 4, 8}) {
    RowMatrix<Scalar> logits = mhc::test::random_matrix<Scalar>(n, n, 67, 1.0);
    for (Eigen::Index i = 0; i < n; ++i) logits(i, (i + 1) % n) = minus_infinity;
    for (SinkhornMethod method : {SinkhornMethod::linear, SinkhornMethod::log_domain}) {
      const RowMatrix<Scalar> projected = mhc::sinkhorn_knopp(logits, rounds(50, method));
      EXPECT_TRUE(projected.allFinite()) << "n " << n;
      EXPECT_LE(row_error(projected), tolerance<Scalar>(n)) << "n " << n;
      for (Eigen::Index i = 0; i < n; ++i) {
        EXPECT_EQ(projected(i, (i + 1) % n), Scalar(0)) << "n " << n << " row " << i;
      }
    }
  }
}

TYPED_TEST(SinkhornTest, InvalidLogitsThrow) {
  using Scalar = TypeParam;
  const Scalar nan = std::numeric_limits<Scalar>::quiet_NaN();
  const Scalar infinity = std::numeric_limits<Scalar>::infinity();
  RowMatrix<Scalar> with_nan = RowMatrix<Scalar>::Zero(3, 3);
  with_nan(1, 2) = nan;
  RowMatrix<Scalar> with_infinity = RowMatrix<Scalar>::Zero(3, 3);
  with_infinity(2, 0) = infinity;
  RowMatrix<Scalar> empty_row = RowMatrix<Scalar>::Zero(3, 3);
  empty_row.row(1).setConstant(-infinity);
  RowMatrix<Scalar> empty_column = RowMatrix<Scalar>::Zero(3, 3);
  empty_column.col(2).setConstant(-infinity);

  const auto message = [](const RowMatrix<Scalar>& logits) {
    return invalid_argument_message([&] { mhc::sinkhorn_knopp(logits); });
  };
  EXPECT_EQ(message(RowMatrix<Scalar>::Zero(2, 3)),
            "sinkhorn_knopp: invalid logits: expected a non-empty square matrix, got 2 x 3");
  EXPECT_EQ(message(RowMatrix<Scalar>::Zero(0, 0)),
            "sinkhorn_knopp: invalid logits: expected a non-empty square matrix, got 0 x 0");
  EXPECT_EQ(message(with_nan),
            "sinkhorn_knopp: invalid logits: expected finite entries or -infinity, got nan at (1, 2)");
  EXPECT_EQ(message(with_infinity),
            "sinkhorn_knopp: invalid logits: expected finite entries or -infinity, got inf at (2, 0)");
  EXPECT_EQ(message(empty_row),
            "sinkhorn_knopp: invalid logits: expected a finite entry in every row, got row 1 "
            "entirely -infinity");
  EXPECT_EQ(message(empty_column),
            "sinkhorn_knopp: invalid logits: expected a finite entry in every column, got column 2 "
            "entirely -infinity");
}

TYPED_TEST(SinkhornTest, InvalidOptionsThrow) {
  using Scalar = TypeParam;
  const RowMatrix<Scalar> logits = RowMatrix<Scalar>::Zero(2, 2);
  const auto message = [&](const SinkhornOptions& options) {
    return invalid_argument_message([&] { mhc::sinkhorn_knopp(logits, options); });
  };
  EXPECT_EQ(message(SinkhornOptions{-1, 0.0}),
            "sinkhorn_knopp: invalid options.iterations: expected a round count >= 0, got -1");
  EXPECT_EQ(message(SinkhornOptions{20, -1e-3}),
            "sinkhorn_knopp: invalid options.tolerance: expected a value >= 0 (0 disables early "
            "stop), got -0.001");
  EXPECT_NE(message(SinkhornOptions{20, std::numeric_limits<double>::quiet_NaN()})
                .find("invalid options.tolerance"),
            std::string::npos);
  SinkhornOptions bad_method;
  bad_method.method = static_cast<SinkhornMethod>(7);
  EXPECT_NE(message(bad_method).find("invalid options.method"), std::string::npos);
}

TYPED_TEST(SinkhornTest, InvalidBatchThrows) {
  using Scalar = TypeParam;
  const auto message = [](const RowMatrix<Scalar>& logits) {
    return invalid_argument_message([&] { mhc::sinkhorn_knopp_batched(logits); });
  };
  EXPECT_EQ(message(RowMatrix<Scalar>::Zero(2, 10)),
            "sinkhorn_knopp_batched: invalid logits: expected n * n columns (one row-major n x n "
            "matrix per row), got 10 columns");
  EXPECT_NE(message(RowMatrix<Scalar>::Zero(2, 0)).find("got 0 columns"), std::string::npos);

  RowMatrix<Scalar> with_nan = RowMatrix<Scalar>::Zero(3, 4);
  with_nan(2, 3) = std::numeric_limits<Scalar>::quiet_NaN();
  EXPECT_EQ(message(with_nan),
            "sinkhorn_knopp_batched: invalid logits row 2: expected finite entries or -infinity, "
            "got nan at (1, 1)");

  RowMatrix<Scalar> output(2, 4);
  const RowMatrix<Scalar> logits = RowMatrix<Scalar>::Zero(3, 4);
  EXPECT_EQ(invalid_argument_message([&] { mhc::sinkhorn_knopp_batched(logits, output); }),
            "sinkhorn_knopp_batched: invalid output: expected shape 3 x 4, got 2 x 4");
}

TYPED_TEST(SinkhornTest, ErrorMeasureOfEmptyThrows) {
  using Scalar = TypeParam;
  EXPECT_THROW(mhc::doubly_stochastic_error(RowMatrix<Scalar>(0, 0)), std::invalid_argument);
}

}  // namespace
