// Helpers shared by the test programs: scalar type lists, tolerances and random inputs.
#pragma once

#include <mhc/common.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <type_traits>

namespace mhc::test {

// Storage types that every typed test runs over.
using ScalarTypes = ::testing::Types<float, double>;

// Names typed tests after their scalar type ("float", "double"). Pass it as the third argument
// of TYPED_TEST_SUITE. Without it Clang's -Wpedantic warns about the macro's empty variadic
// argument, and -Werror turns that into a build failure.
struct ScalarTypeNames {
  template <typename Scalar>
  static std::string GetName(int) {
    if (std::is_same<Scalar, float>::value) return "float";
    if (std::is_same<Scalar, double>::value) return "double";
    return "other";
  }
};

// Machine epsilon of Scalar as a double.
template <typename Scalar>
double epsilon() {
  return static_cast<double>(std::numeric_limits<Scalar>::epsilon());
}

// Absolute tolerance for a quantity of magnitude about 1 computed with about `operations`
// rounding steps in Scalar: a safety factor of 8 over the worst-case linear growth of
// `operations` * epsilon. Every tolerance in the tests comes from here or explains why it differs.
template <typename Scalar>
double tolerance(double operations) {
  return 8.0 * operations * epsilon<Scalar>();
}

// Matrix with entries drawn from N(0, scale^2), reproducible from `seed`.
template <typename Scalar>
RowMatrix<Scalar> random_matrix(Eigen::Index rows, Eigen::Index cols, std::uint32_t seed,
                                double scale = 1.0) {
  std::mt19937 generator(seed);
  std::normal_distribution<double> normal(0.0, scale);
  RowMatrix<Scalar> matrix(rows, cols);
  for (Eigen::Index i = 0; i < matrix.size(); ++i) {
    matrix.data()[i] = static_cast<Scalar>(normal(generator));
  }
  return matrix;
}

// Central finite-difference derivative of a scalar function f(t) at t = 0, in double.
template <typename Function>
double central_difference(Function&& f, double step) {
  return (f(step) - f(-step)) / (2.0 * step);
}

// Two-layer perceptron h_out = tanh(h_in w1 + b1) w2 with its hand-written backward: a
// nonlinear branch for the layer tests. Shapes: w1 C x H, b1 1 x H, w2 H x C.
template <typename Scalar>
struct TanhMlp {
  RowMatrix<Scalar> w1;
  RowVector<Scalar> b1;
  RowMatrix<Scalar> w2;

  // Weights of scale 1 / sqrt(fan-in), reproducible from `seed`.
  static TanhMlp random(Eigen::Index channels, Eigen::Index hidden, std::uint32_t seed) {
    TanhMlp mlp;
    mlp.w1 = random_matrix<Scalar>(channels, hidden, seed, 1.0 / std::sqrt(double(channels)));
    mlp.b1 = random_matrix<Scalar>(1, hidden, seed + 1, 0.5);
    mlp.w2 = random_matrix<Scalar>(hidden, channels, seed + 2, 1.0 / std::sqrt(double(hidden)));
    return mlp;
  }

  RowMatrix<Scalar> hidden_activations(const RowMatrix<Scalar>& input) const {
    return ((input * w1).rowwise() + b1).array().tanh().matrix();
  }

  RowMatrix<Scalar> operator()(const RowMatrix<Scalar>& input) const {
    return hidden_activations(input) * w2;
  }

  // Gradient of the input (T x C) given the input and the gradient of the output (T x C).
  RowMatrix<Scalar> backward(const RowMatrix<Scalar>& input, const RowMatrix<Scalar>& grad_output) const {
    const RowMatrix<Scalar> activations = hidden_activations(input);
    const RowMatrix<Scalar> grad_hidden =
        ((grad_output * w2.transpose()).array() * (Scalar(1) - activations.array().square())).matrix();
    return grad_hidden * w1.transpose();
  }
};

}  // namespace mhc::test
