// Shared vocabulary of the library: matrix aliases, argument checks and the assertion macro.
#pragma once

#include <Eigen/Core>

#include <sstream>
#include <stdexcept>
#include <string>

// MHC_ASSERT checks internal invariants and kernel preconditions that the public entry points
// have already validated. Define it before including any mhc header to route failures
// elsewhere (a test can make it throw). Invalid arguments from callers never rely on it: they
// always throw std::invalid_argument.
#ifndef MHC_ASSERT
#include <cassert>
#define MHC_ASSERT(condition) assert(condition)
#endif

namespace mhc {

// Row-major dynamic matrix. The residual state of T tokens is RowMatrix<Scalar>(T, n * C), so a
// row is one token's streams laid end to end: stream i, channel c sits at column i * C + c.
template <typename Scalar>
using RowMatrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// Dynamic row vector, used for biases and per-token scalars.
template <typename Scalar>
using RowVector = Eigen::Matrix<Scalar, 1, Eigen::Dynamic>;

namespace detail {

// Wraps a type in a nested-name context so that template argument deduction ignores it.
template <typename T>
struct type_identity {
  using type = T;
};

}  // namespace detail

// Read-only view of a row-major matrix: binds a RowMatrix, an Eigen::Map over a caller's buffer
// or a block of rows without a copy. Scalar is never deduced from this parameter, so a function
// taking it deduces Scalar from its other arguments and the conversion to Ref still happens.
template <typename Scalar>
using ConstRowMatrixRef = typename detail::type_identity<Eigen::Ref<const RowMatrix<Scalar>>>::type;

// Writable view of a row-major matrix, for outputs that live in the caller's buffers.
template <typename Scalar>
using RowMatrixRef = typename detail::type_identity<Eigen::Ref<RowMatrix<Scalar>>>::type;

namespace detail {

// Joins the streamable arguments into one string.
template <typename... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream stream;
  (stream << ... << parts);
  return stream.str();
}

// Throws std::invalid_argument with the library's message shape:
// "<function>: invalid <argument>: expected <expected>, got <actual>".
[[noreturn]] inline void throw_invalid_argument(const std::string& function,
                                                const std::string& argument,
                                                const std::string& expected,
                                                const std::string& actual) {
  throw std::invalid_argument(function + ": invalid " + argument + ": expected " + expected +
                              ", got " + actual);
}

// Column sums of a T x K matrix: the sum over tokens of per-token values. Returns zeros when
// T = 0 without forming column blocks, because Eigen offsets the null data pointer of an empty
// matrix for each block, which UndefinedBehaviorSanitizer rejects.
template <typename Derived>
RowVector<typename Derived::Scalar> column_sums(const Eigen::MatrixBase<Derived>& matrix) {
  if (matrix.rows() == 0) return RowVector<typename Derived::Scalar>::Zero(matrix.cols());
  return matrix.colwise().sum();
}

// Formats a matrix shape as "R x C".
inline std::string shape_string(Eigen::Index rows, Eigen::Index cols) {
  return concat(rows, " x ", cols);
}

// Throws unless `matrix` has the expected shape.
template <typename Derived>
void check_shape(const char* function, const char* argument,
                 const Eigen::DenseBase<Derived>& matrix, Eigen::Index rows, Eigen::Index cols) {
  if (matrix.rows() != rows || matrix.cols() != cols) {
    throw_invalid_argument(function, argument, "shape " + shape_string(rows, cols),
                           shape_string(matrix.rows(), matrix.cols()));
  }
}

}  // namespace detail
}  // namespace mhc
