// Sinkhorn-Knopp projection of a square matrix of logits onto the doubly stochastic matrices.
#pragma once

#include <mhc/common.hpp>

#include <cmath>
#include <vector>

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


// Gradient with respect to the logits of sinkhorn_knopp(logits, options), given grad_output:
// the exact derivative of the truncated iteration, recomputing the iterates.
// TODO: minimal version (no validation, no log-domain path, no early stop).
template <typename Derived, typename GradDerived>
auto sinkhorn_knopp_backward(const Eigen::MatrixBase<Derived>& logits,
                             const Eigen::MatrixBase<GradDerived>& grad_output,
                             const SinkhornOptions& options = {}) {
  using Matrix = typename Derived::PlainObject;
  std::vector<Matrix> before_columns, before_rows;
  Matrix matrix = (logits.rowwise() - logits.colwise().maxCoeff()).array().exp().matrix();
  const Matrix initial = matrix;
  for (int round = 0; round < options.iterations; ++round) {
    before_columns.push_back(matrix);
    matrix.array().rowwise() /= matrix.colwise().sum().array();
    before_rows.push_back(matrix);
    matrix.array().colwise() /= matrix.rowwise().sum().array();
  }
  Matrix grad = grad_output;
  for (int round = options.iterations - 1; round >= 0; --round) {
    // Y = Z / rowsum(Z): dZ = (dY - rowsum(dY * Y)) / rowsum(Z)
    const Matrix& z = before_rows[round];
    const Matrix y = (z.array().colwise() / z.rowwise().sum().array()).matrix();
    const auto row_inner = (grad.array() * y.array()).rowwise().sum().eval();
    grad = ((grad.array().colwise() - row_inner).colwise() / z.rowwise().sum().array()).matrix();
    // Z = X / colsum(X): dX = (dZ - colsum(dZ * Z)) / colsum(X)
    const Matrix& x = before_columns[round];
    const Matrix zz = (x.array().rowwise() / x.colwise().sum().array()).matrix();
    const auto column_inner = (grad.array() * zz.array()).colwise().sum().eval();
    grad = ((grad.array().rowwise() - column_inner).rowwise() / x.colwise().sum().array()).matrix();
  }
  return Matrix((grad.array() * initial.array()).matrix());
}

}  // namespace mhc
