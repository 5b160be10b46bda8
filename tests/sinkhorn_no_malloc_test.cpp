// The forward projection of fixed-size matrices, and the batched projection into a
// caller-provided output, must not allocate. Eigen reports heap allocations through
// eigen_assert when EIGEN_RUNTIME_NO_MALLOC is defined. This file counts those reports instead
// of relying on assert, so the check also runs in Release builds where NDEBUG disables assert.
#include <atomic>

namespace {
std::atomic<int> eigen_assert_failures{0};
}  // namespace

#define EIGEN_RUNTIME_NO_MALLOC
#define eigen_assert(condition)                        \
  do {                                                 \
    if (!(condition)) eigen_assert_failures.fetch_add(1); \
  } while (false)

#include <mhc/sinkhorn.hpp>

#include "support.hpp"

#include <gtest/gtest.h>

#include <limits>

namespace {

using mhc::RowMatrix;
using mhc::SinkhornMethod;
using mhc::SinkhornOptions;

// Runs `call` with Eigen's heap allocation forbidden and returns how many Eigen assertions,
// allocation attempts included, failed meanwhile.
template <typename Call>
int failures_without_malloc(Call&& call) {
  const int before = eigen_assert_failures.load();
  Eigen::internal::set_is_malloc_allowed(false);
  call();
  Eigen::internal::set_is_malloc_allowed(true);
  return eigen_assert_failures.load() - before;
}

template <typename Scalar>
class SinkhornNoMallocTest : public ::testing::Test {};
TYPED_TEST_SUITE(SinkhornNoMallocTest, mhc::test::ScalarTypes, mhc::test::ScalarTypeNames);

TYPED_TEST(SinkhornNoMallocTest, GuardDetectsAllocation) {
  using Scalar = TypeParam;
  EXPECT_GT(failures_without_malloc([] {
              RowMatrix<Scalar> allocated(3, 3);
              allocated.setZero();
            }),
            0);
}

TYPED_TEST(SinkhornNoMallocTest, FixedSizeForward) {
  using Scalar = TypeParam;
  using Fixed = Eigen::Matrix<Scalar, 4, 4>;
  const Fixed logits = mhc::test::random_matrix<Scalar>(4, 4, 3, 2.0);
  Fixed underflowing = logits;
  underflowing.row(1).array() -= Scalar(1e4);
  for (SinkhornMethod method : {SinkhornMethod::linear, SinkhornMethod::log_domain}) {
    SinkhornOptions options;
    options.method = method;
    options.tolerance = 1e-6;
    Fixed projected;
    Fixed fallback;
    mhc::SinkhornReport report;
    EXPECT_EQ(failures_without_malloc([&] {
                projected = mhc::sinkhorn_knopp(logits, options);
                fallback = mhc::sinkhorn_knopp(underflowing, options, report);
              }),
              0);
    EXPECT_TRUE(report.log_domain);
    EXPECT_LE(static_cast<double>(mhc::doubly_stochastic_error(projected)), 1e-3);
  }
}

TYPED_TEST(SinkhornNoMallocTest, BatchedForwardIntoOutput) {
  using Scalar = TypeParam;
  for (Eigen::Index n : {1, 2, 4, 8}) {
    const RowMatrix<Scalar> logits = mhc::test::random_matrix<Scalar>(6, n * n, 5, 2.0);
    RowMatrix<Scalar> output(6, n * n);
    EXPECT_EQ(failures_without_malloc([&] { mhc::sinkhorn_knopp_batched(logits, output); }), 0)
        << "n " << n;
    EXPECT_TRUE(output.allFinite()) << "n " << n;
  }
}

}  // namespace
