// Sinkhorn-Knopp projection of square matrices of logits onto the doubly stochastic matrices,
// with its gradient, for one matrix or for a batch of T matrices stored one per row.
//
// The iteration starts from M(0) = exp(logits) and runs rounds that divide every column by its
// sum, then every row by its sum. Rows are normalised last, so row sums are exact to rounding
// and the truncation error sits in the column sums. Logits may contain -infinity (a structural
// zero) as long as every row and every column keeps a finite entry.
#pragma once

#include <mhc/common.hpp>
#include <mhc/detail/sinkhorn_backward.hpp>
#include <mhc/detail/sinkhorn_forward.hpp>

#include <cmath>
#include <type_traits>
#include <vector>

namespace mhc {

// Formulation of the rounds. Both give the same result to rounding.
enum class SinkhornMethod {
  // Sums of exp(logits - column maximum). The faster one. It falls back to log_domain for a
  // matrix where a row or column sum underflows, as when one row lies 1e4 below the others.
  linear,
  // Alternating column and row log-sum-exp subtraction. It costs n^2 exp calls per half round,
  // which linear avoids, and stays finite for any finite logits.
  log_domain,
};

// Kind of derivative that sinkhorn_knopp_backward returns.
enum class SinkhornGradient {
  // Exact vector-Jacobian product of the rounds that the forward pass ran.
  unrolled,
  // Gradient of the converged projection, independent of the round count. It equals the
  // unrolled gradient once the forward pass has converged and differs from it by about the
  // column error otherwise.
  implicit,
};

// Settings of one projection and of its gradient.
struct SinkhornOptions {
  int iterations = 20;     // maximum number of (column, then row) normalisation rounds
  double tolerance = 0.0;  // stop once max |column sum - 1| <= tolerance; 0 always runs all rounds
  SinkhornMethod method = SinkhornMethod::linear;
  SinkhornGradient gradient = SinkhornGradient::unrolled;
};

// Outcome of one projection.
struct SinkhornReport {
  int iterations = 0;         // rounds that ran: options.iterations unless the tolerance stopped it
  double column_error = 0.0;  // max |column sum - 1| of the returned matrix
  bool log_domain = false;    // whether the log-domain iteration produced the result
};

namespace detail {

template <typename Scalar>
void check_scalar_type() {
  static_assert(std::is_floating_point<Scalar>::value,
                "mhc Sinkhorn functions need float, double or long double entries");
}

inline void check_sinkhorn_options(const char* function, const SinkhornOptions& options) {
  if (options.iterations < 0) {
    throw_invalid_argument(function, "options.iterations", "a round count >= 0",
                           concat(options.iterations));
  }
  if (!(options.tolerance >= 0.0)) {
    throw_invalid_argument(function, "options.tolerance", "a value >= 0 (0 disables early stop)",
                           concat(options.tolerance));
  }
  if (options.method != SinkhornMethod::linear && options.method != SinkhornMethod::log_domain) {
    throw_invalid_argument(function, "options.method", "SinkhornMethod::linear or log_domain",
                           concat(static_cast<int>(options.method)));
  }
  if (options.gradient != SinkhornGradient::unrolled &&
      options.gradient != SinkhornGradient::implicit) {
    throw_invalid_argument(function, "options.gradient", "SinkhornGradient::unrolled or implicit",
                           concat(static_cast<int>(options.gradient)));
  }
}

template <typename Derived>
void check_square_logits(const char* function, const Eigen::MatrixBase<Derived>& logits) {
  if (logits.rows() == 0 || logits.rows() != logits.cols()) {
    throw_invalid_argument(function, "logits", "a non-empty square matrix",
                           shape_string(logits.rows(), logits.cols()));
  }
  check_logits_entries(function, logits);
}

// Returns n for a batch whose rows are n x n matrices, so the column count must be n * n > 0.
template <typename Derived>
Eigen::Index batched_matrix_size(const char* function, const Eigen::MatrixBase<Derived>& logits) {
  const Eigen::Index columns = logits.cols();
  Eigen::Index n = static_cast<Eigen::Index>(std::llround(std::sqrt(static_cast<double>(columns))));
  while (n * n > columns) --n;
  while ((n + 1) * (n + 1) <= columns) ++n;
  if (columns == 0 || n * n != columns) {
    throw_invalid_argument(function, "logits", "n * n columns (one row-major n x n matrix per row)",
                           concat(columns, " columns"));
  }
  return n;
}

template <typename Scalar>
using ConstSquareMap = Eigen::Map<const RowMatrix<Scalar>>;
template <typename Scalar>
using SquareMap = Eigen::Map<RowMatrix<Scalar>>;

}  // namespace detail

// Returns the largest |row sum - 1| or |column sum - 1| of a non-empty matrix.
template <typename Derived>
typename Derived::Scalar doubly_stochastic_error(const Eigen::MatrixBase<Derived>& matrix) {
  using Scalar = typename Derived::Scalar;
  if (matrix.size() == 0) {
    detail::throw_invalid_argument("mhc::doubly_stochastic_error", "matrix", "a non-empty matrix",
                           detail::shape_string(matrix.rows(), matrix.cols()));
  }
  const Scalar row_error = (matrix.rowwise().sum().array() - Scalar(1)).abs().maxCoeff();
  const Scalar column_error = (matrix.colwise().sum().array() - Scalar(1)).abs().maxCoeff();
  return row_error > column_error ? row_error : column_error;
}

// Projects exp(logits) onto the doubly stochastic matrices with up to options.iterations rounds
// and stores the rounds run, the final column error and the method used in `report`.
// With iterations = 0 the result is exp(logits) unnormalised, which overflows for logits above
// about 88 (float) or 709 (double). Otherwise the result is finite for any finite logits.
// Fixed-size input returns a fixed-size matrix and never allocates.
template <typename Derived>
typename Derived::PlainObject sinkhorn_knopp(const Eigen::MatrixBase<Derived>& logits,
                                             const SinkhornOptions& options,
                                             SinkhornReport& report) {
  detail::check_scalar_type<typename Derived::Scalar>();
  detail::check_sinkhorn_options("mhc::sinkhorn_knopp", options);
  detail::check_square_logits("mhc::sinkhorn_knopp", logits);

  typename Derived::PlainObject output(logits.rows(), logits.cols());
  const detail::ProjectionOutcome outcome =
      detail::project(logits, output, options.iterations, options.tolerance,
                      options.method == SinkhornMethod::log_domain);
  report = SinkhornReport{outcome.iterations, outcome.column_error, outcome.log_domain};
  return output;
}

// Projects exp(logits) onto the doubly stochastic matrices; see the overload with a report.
template <typename Derived>
typename Derived::PlainObject sinkhorn_knopp(const Eigen::MatrixBase<Derived>& logits,
                                             const SinkhornOptions& options = {}) {
  SinkhornReport report;
  return sinkhorn_knopp(logits, options, report);
}

// Returns the gradient with respect to `logits`, given `grad_output`, the gradient with respect
// to sinkhorn_knopp(logits, options). With SinkhornGradient::unrolled it is the exact derivative
// of the rounds that the forward pass ran: fewer when the tolerance stopped it, and the
// log-domain rounds when it fell back to them. The iterates are recomputed internally, so the
// caller keeps nothing from the forward pass.
// NOTE: allocates 2 * n * options.iterations scalars of scratch, plus the implicit solver's
// buffers, even for fixed-size input. The batched form allocates them once per call.
template <typename Derived, typename GradDerived>
typename Derived::PlainObject sinkhorn_knopp_backward(
    const Eigen::MatrixBase<Derived>& logits, const Eigen::MatrixBase<GradDerived>& grad_output,
    const SinkhornOptions& options = {}) {
  using Scalar = typename Derived::Scalar;
  static_assert(std::is_same<Scalar, typename GradDerived::Scalar>::value,
                "sinkhorn_knopp_backward: logits and grad_output need the same scalar type");
  detail::check_scalar_type<Scalar>();
  const char* function = "mhc::sinkhorn_knopp_backward";
  detail::check_sinkhorn_options(function, options);
  detail::check_square_logits(function, logits);
  detail::check_shape(function, "grad_output", grad_output, logits.rows(), logits.cols());

  const bool log_domain = options.method == SinkhornMethod::log_domain;
  typename Derived::PlainObject state(logits.rows(), logits.cols());
  typename Derived::PlainObject grad = grad_output;
  if (options.gradient == SinkhornGradient::implicit) {
    detail::project(logits, state, options.iterations, options.tolerance, log_domain);
    detail::ImplicitGradientSolver<Scalar>(logits.rows()).apply(state, grad);
    return grad;
  }

  std::vector<Scalar> trace(static_cast<std::size_t>(2 * logits.rows() * options.iterations));
  detail::unrolled_backward(logits, state, grad, options.iterations, options.tolerance,
                            log_domain, trace.data());
  return grad;
}

// Projects T matrices stored one per row: `logits` is T x (n * n) and row t contains token t's
// n x n logits in row-major order. Writes the projections in the same layout into `output`,
// which must be T x (n * n) and may not alias `logits`. Allocates nothing when `logits` is a
// row-major matrix with contiguous rows (otherwise it is copied once into that layout).
template <typename Derived>
void sinkhorn_knopp_batched(const Eigen::MatrixBase<Derived>& logits,
                            RowMatrixRef<typename Derived::Scalar> output,
                            const SinkhornOptions& options = {}) {
  using Scalar = typename Derived::Scalar;
  detail::check_scalar_type<Scalar>();
  const char* function = "mhc::sinkhorn_knopp_batched";
  detail::check_sinkhorn_options(function, options);
  const Eigen::Index n = detail::batched_matrix_size(function, logits);
  detail::check_shape(function, "output", output, logits.rows(), logits.cols());

  const Eigen::Ref<const RowMatrix<Scalar>> rows(logits);
  const bool log_domain = options.method == SinkhornMethod::log_domain;
  for (Eigen::Index t = 0; t < rows.rows(); ++t) {
    const detail::ConstSquareMap<Scalar> token_logits(rows.row(t).data(), n, n);
    detail::check_logits_entries(function, token_logits, t);
    detail::SquareMap<Scalar> token_output(output.row(t).data(), n, n);
    detail::project(token_logits, token_output, options.iterations, options.tolerance,
                    log_domain);
  }
}

// Returns the projections of T matrices stored one per row (T x (n * n), row t is token t's
// n x n logits in row-major order) in the same layout. T = 0 gives a 0 x (n * n) result.
template <typename Derived>
RowMatrix<typename Derived::Scalar> sinkhorn_knopp_batched(const Eigen::MatrixBase<Derived>& logits,
                                                           const SinkhornOptions& options = {}) {
  RowMatrix<typename Derived::Scalar> output(logits.rows(), logits.cols());
  sinkhorn_knopp_batched(logits, output, options);
  return output;
}

// Writes into `grad_logits` the gradient with respect to the batched `logits`, given
// `grad_output`, the gradient with respect to sinkhorn_knopp_batched(logits, options). All
// three are T x (n * n) with one row-major n x n matrix per row; `grad_logits` may alias
// `grad_output` but not `logits`. Scratch buffers are allocated once per call, not per token.
template <typename Derived, typename GradDerived>
void sinkhorn_knopp_batched_backward(const Eigen::MatrixBase<Derived>& logits,
                                     const Eigen::MatrixBase<GradDerived>& grad_output,
                                     RowMatrixRef<typename Derived::Scalar> grad_logits,
                                     const SinkhornOptions& options = {}) {
  using Scalar = typename Derived::Scalar;
  static_assert(std::is_same<Scalar, typename GradDerived::Scalar>::value,
                "sinkhorn_knopp_batched_backward: logits and grad_output need the same scalar type");
  detail::check_scalar_type<Scalar>();
  const char* function = "mhc::sinkhorn_knopp_batched_backward";
  detail::check_sinkhorn_options(function, options);
  const Eigen::Index n = detail::batched_matrix_size(function, logits);
  detail::check_shape(function, "grad_output", grad_output, logits.rows(), logits.cols());
  detail::check_shape(function, "grad_logits", grad_logits, logits.rows(), logits.cols());

  const Eigen::Ref<const RowMatrix<Scalar>> rows(logits);
  grad_logits = grad_output;
  const bool log_domain = options.method == SinkhornMethod::log_domain;
  const bool implicit = options.gradient == SinkhornGradient::implicit;

  RowMatrix<Scalar> state(n, n);
  std::vector<Scalar> trace(static_cast<std::size_t>(implicit ? 0 : 2 * n * options.iterations));
  detail::ImplicitGradientSolver<Scalar> solver(implicit ? n : 1);
  for (Eigen::Index t = 0; t < rows.rows(); ++t) {
    const detail::ConstSquareMap<Scalar> token_logits(rows.row(t).data(), n, n);
    detail::check_logits_entries(function, token_logits, t);
    detail::SquareMap<Scalar> token_grad(grad_logits.row(t).data(), n, n);
    if (implicit) {
      detail::project(token_logits, state, options.iterations, options.tolerance, log_domain);
      solver.apply(state, token_grad);
    } else {
      detail::unrolled_backward(token_logits, state, token_grad, options.iterations,
                                options.tolerance, log_domain, trace.data());
    }
  }
}

// Returns the gradient with respect to the batched `logits`; see the overload with an output.
template <typename Derived, typename GradDerived>
RowMatrix<typename Derived::Scalar> sinkhorn_knopp_batched_backward(
    const Eigen::MatrixBase<Derived>& logits, const Eigen::MatrixBase<GradDerived>& grad_output,
    const SinkhornOptions& options = {}) {
  RowMatrix<typename Derived::Scalar> grad_logits(logits.rows(), logits.cols());
  sinkhorn_knopp_batched_backward(logits, grad_output, grad_logits, options);
  return grad_logits;
}

}  // namespace mhc
