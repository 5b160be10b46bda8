// A training step through the fused kernels allocates nothing once its Workspace, coefficients
// and gradient outputs have their shapes. Two counters cover the two ways to the heap, on every
// thread: this program replaces the global operator new (std::vector, std::function), and
// EIGEN_RUNTIME_NO_MALLOC makes Eigen report its own aligned allocations, which call malloc
// directly, through eigen_assert.
#include <atomic>

namespace {
std::atomic<int> eigen_allocations{0};
}  // namespace

#define EIGEN_RUNTIME_NO_MALLOC
#define eigen_assert(condition)                      \
  do {                                               \
    if (!(condition)) eigen_allocations.fetch_add(1); \
  } while (false)

#include <mhc/fused.hpp>

#include "support.hpp"

#include <gtest/gtest.h>

#include <cstdlib>
#include <new>

namespace {

std::atomic<bool> counting{false};
std::atomic<int> allocations{0};

void* allocate(std::size_t size) {
  if (counting.load(std::memory_order_relaxed)) allocations.fetch_add(1, std::memory_order_relaxed);
  void* memory = std::malloc(size == 0 ? 1 : size);
  if (memory == nullptr) throw std::bad_alloc();
  return memory;
}

}  // namespace

void* operator new(std::size_t size) { return allocate(size); }
void* operator new[](std::size_t size) { return allocate(size); }
void operator delete(void* memory) noexcept { std::free(memory); }
void operator delete[](void* memory) noexcept { std::free(memory); }
void operator delete(void* memory, std::size_t) noexcept { std::free(memory); }
void operator delete[](void* memory, std::size_t) noexcept { std::free(memory); }

namespace {

using mhc::RowMatrix;

// Inputs, outputs and scratch of one layer's training step with bfloat16 or float storage.
template <typename Storage>
struct Step {
  using Scalar = float;

  Step(int n, int channels, Eigen::Index tokens, mhc::ThreadPool* pool)
      : parameters(mhc::Parameters<Scalar>::identity(n, channels, 0)),
        x(mhc::test::random_matrix<float>(tokens, Eigen::Index(n) * channels, 1).template cast<Storage>()),
        branch_output(mhc::test::random_matrix<float>(tokens, channels, 2).template cast<Storage>()),
        grad_next(mhc::test::random_matrix<float>(tokens, Eigen::Index(n) * channels, 3).template cast<Storage>()),
        branch_input(tokens, channels),
        x_next(tokens, Eigen::Index(n) * channels),
        grad_x(tokens, Eigen::Index(n) * channels),
        grad_branch_output(tokens, channels),
        workspace(pool) {
    parameters.phi = mhc::test::random_matrix<float>(parameters.phi.rows(), parameters.phi.cols(), 4, 0.05);
  }

  void run(bool keep_projections) {
    if (keep_projections) {
      mhc::fused::prepare_branch(parameters, x, coefficients, projections, branch_input, workspace);
    } else {
      mhc::fused::prepare_branch(parameters, x, coefficients, branch_input, workspace);
    }
    mhc::fused::merge_streams(coefficients, x, branch_output, x_next, workspace);
    mhc::fused::merge_streams_backward(coefficients, x, branch_output, grad_next, grad_x, grad_branch_output,
                                       grad_post, grad_res, workspace);
    // The branch is the identity here, so dL/dh_in = dL/dh_out.
    if (keep_projections) {
      mhc::fused::prepare_branch_backward(parameters, x, projections, coefficients, grad_branch_output, grad_post,
                                          grad_res, grad_x, grad_parameters, workspace, mhc::Options{},
                                          mhc::fused::GradientWrite::kAdd);
    } else {
      mhc::fused::prepare_branch_backward(parameters, x, coefficients, grad_branch_output, grad_post, grad_res,
                                          grad_x, grad_parameters, workspace, mhc::Options{},
                                          mhc::fused::GradientWrite::kAdd);
    }
  }

  mhc::Parameters<Scalar> parameters;
  RowMatrix<Storage> x, branch_output, grad_next, branch_input, x_next, grad_x, grad_branch_output;
  mhc::Coefficients<Scalar> coefficients;
  mhc::fused::Projections<Scalar> projections;
  RowMatrix<Scalar> grad_post, grad_res;
  mhc::Parameters<Scalar> grad_parameters;
  mhc::fused::Workspace<Storage, Scalar> workspace;
};

// Starts counting both kinds of allocation.
void start_counting() {
  allocations.store(0);
  eigen_allocations.store(0);
  counting.store(true);
  Eigen::internal::set_is_malloc_allowed(false);
}

// Stops counting and returns the number of allocations since start_counting().
int stop_counting() {
  Eigen::internal::set_is_malloc_allowed(true);
  counting.store(false);
  return allocations.load() + eigen_allocations.load();
}

template <typename Storage>
int allocations_in_second_step(int n, bool keep_projections, mhc::ThreadPool* pool) {
  Step<Storage> step(n, 37, 41, pool);
  step.run(keep_projections);
  start_counting();
  step.run(keep_projections);
  return stop_counting();
}

TEST(FusedNoMalloc, TrainingStepAllocatesNothing) {
  mhc::ThreadPool pool(2);
  for (int n : {3, 4}) {
    for (bool keep : {false, true}) {
      SCOPED_TRACE(::testing::Message() << "n=" << n << " keep projections=" << keep);
      EXPECT_EQ(allocations_in_second_step<float>(n, keep, &pool), 0);
      EXPECT_EQ(allocations_in_second_step<Eigen::bfloat16>(n, keep, &pool), 0);
      EXPECT_EQ(allocations_in_second_step<float>(n, keep, nullptr), 0);
    }
  }
}

// Both counters work: a first step allocates the workspace's list of per-thread buffers through
// operator new, and the buffers and Eigen outputs through Eigen.
TEST(FusedNoMalloc, CountersSeeFirstStep) {
  Step<float> step(4, 37, 41, nullptr);
  start_counting();
  step.run(false);
  const int eigen_count = eigen_allocations.load();
  const int total = stop_counting();
  EXPECT_GT(eigen_count, 0);
  EXPECT_GT(total - eigen_count, 0);
}

}  // namespace
