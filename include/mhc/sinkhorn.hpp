// Sinkhorn-Knopp projection of a square matrix of logits onto the doubly stochastic matrices.
#pragma once

#include <mhc/common.hpp>

#include <cmath>

namespace mhc {

struct SinkhornOptions {
  int iterations = 20;     // maximum number of (column, then row) normalisation rounds
  double tolerance = 0.0;  // stop once max |column sum - 1| <= tolerance; 0 always runs all rounds
};

// Largest |row sum - 1| or |column sum - 1|.
template <typename Derived>
typename Derived::Scalar doubly_stochastic_error(const Eigen::MatrixBase<Derived>& matrix) {
  using Scalar = typename Derived::Scalar;
  const Scalar row_error = (matrix.rowwise().sum().array() - Scalar(1)).abs().maxCoeff();
  const Scalar column_error = (matrix.colwise().sum().array() - Scalar(1)).abs().maxCoeff();
  return row_error > column_error ? row_error : column_error;
}

// exp(logits) alternately normalised by columns then rows. Rows are normalised last, so row
// sums are exact to rounding and the truncation error sits in the column sums.
// TODO: minimal version (no validation, no log-domain fallback, no early stop).
template <typename Derived>
auto sinkhorn_knopp(const Eigen::MatrixBase<Derived>& logits, const SinkhornOptions& options = {}) {
  using Matrix = typename Derived::PlainObject;
  // Subtracting each column's maximum leaves the result unchanged because the column
  // normalisation comes first, and it keeps exp from overflowing.
  Matrix matrix = (logits.rowwise() - logits.colwise().maxCoeff()).array().exp().matrix();
  for (int round = 0; round < options.iterations; ++round) {
    matrix.array().rowwise() /= matrix.colwise().sum().array();
    matrix.array().colwise() /= matrix.rowwise().sum().array();
  }
  return matrix;
}

}  // namespace mhc
