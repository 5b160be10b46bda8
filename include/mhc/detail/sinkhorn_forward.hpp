// Forward kernels of the Sinkhorn-Knopp projection: input checks, the linear and the
// log-domain iteration. Include <mhc/sinkhorn.hpp> instead of this header.
//
// Every kernel works on one n x n matrix through a generic dense expression (a fixed-size
// matrix, a dynamic one or an Eigen::Map over one row of a batch). The kernels allocate nothing,
// so a fixed-size matrix or a Map over caller buffers never touches the heap.
#pragma once

#include <mhc/common.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

namespace mhc::detail {

// Names the logits argument in messages: the whole matrix, or one row of a batch.
inline std::string logits_name(Eigen::Index token) {
  return token < 0 ? std::string("logits") : concat("logits row ", token);
}

// Throws unless every entry is finite or -infinity and every row and column keeps at least
// one finite entry. An all -infinity row or column has no doubly stochastic scaling.
template <typename Derived>
void check_logits_entries(const char* function, const Eigen::MatrixBase<Derived>& logits,
                          Eigen::Index token = -1) {
  using Scalar = typename Derived::Scalar;
  const Scalar infinity = std::numeric_limits<Scalar>::infinity();
  for (Eigen::Index i = 0; i < logits.rows(); ++i) {
    for (Eigen::Index j = 0; j < logits.cols(); ++j) {
      const Scalar value = logits(i, j);
      if (std::isnan(value) || value == infinity) {
        throw_invalid_argument(function, logits_name(token), "finite entries or -infinity",
                               concat(value, " at (", i, ", ", j, ")"));
      }
    }
  }
  for (Eigen::Index i = 0; i < logits.rows(); ++i) {
    if (!(logits.row(i).array() > -infinity).any()) {
      throw_invalid_argument(function, logits_name(token), "a finite entry in every row",
                             concat("row ", i, " entirely -infinity"));
    }
  }
  for (Eigen::Index j = 0; j < logits.cols(); ++j) {
    if (!(logits.col(j).array() > -infinity).any()) {
      throw_invalid_argument(function, logits_name(token), "a finite entry in every column",
                             concat("column ", j, " entirely -infinity"));
    }
  }
}

// Elementwise exp that maps -infinity to exactly 0, so structural zeros stay zero. Eigen 3.4's
// vectorised exp clamps its argument at about -88.7 (float) or -709.8 (double) and so returns
// a tiny positive number for -infinity.
template <typename Derived>
auto exp_or_zero(const Eigen::ArrayBase<Derived>& values) {
  using Scalar = typename Derived::Scalar;
  return (values > -std::numeric_limits<Scalar>::infinity()).select(values.exp(), Scalar(0));
}

// Storage for what the backward pass needs to walk the iteration in reverse: per round, the n
// column normalisers followed by the n row normalisers. The linear iteration stores the sums,
// the log-domain one the log-sum-exps. A null `data` records nothing.
template <typename Scalar>
struct SinkhornTrace {
  Scalar* data = nullptr;
  Eigen::Index n = 0;

  Scalar* columns(int round) const { return data + 2 * n * round; }
  Scalar* rows(int round) const { return data + 2 * n * round + n; }
};

// Largest |column sum - 1| of a matrix of probabilities.
template <typename Derived>
double column_error(const Eigen::MatrixBase<Derived>& matrix) {
  using Scalar = typename Derived::Scalar;
  Scalar largest(0);
  for (Eigen::Index j = 0; j < matrix.cols(); ++j) {
    largest = std::max(largest, std::abs(matrix.col(j).sum() - Scalar(1)));
  }
  return static_cast<double>(largest);
}

// Largest |column sum - 1| of exp(log_matrix), for the log-domain early stop.
template <typename Derived>
double column_error_of_exp(const Eigen::MatrixBase<Derived>& log_matrix) {
  using Scalar = typename Derived::Scalar;
  Scalar largest(0);
  for (Eigen::Index j = 0; j < log_matrix.cols(); ++j) {
    largest = std::max(largest, std::abs(exp_or_zero(log_matrix.col(j).array()).sum() - Scalar(1)));
  }
  return static_cast<double>(largest);
}

// Writes exp(logits - max of each column) into `state`, the first iterate of the linear method.
// The shift leaves every later iterate unchanged because the columns are normalised first, and
// it keeps exp at or below 1. Each column has a finite maximum after check_logits_entries.
template <typename LogitsDerived, typename StateDerived>
void shifted_exp(const Eigen::MatrixBase<LogitsDerived>& logits,
                 Eigen::MatrixBase<StateDerived>& state) {
  for (Eigen::Index j = 0; j < logits.cols(); ++j) {
    const auto maximum = logits.col(j).maxCoeff();
    state.col(j) = exp_or_zero(logits.col(j).array() - maximum).matrix();
  }
}

// Runs up to `iterations` rounds of the linear iteration on `state` in place: each column
// divided by its sum, then each row by its sum. Stops after a round once tolerance > 0 and the
// column error is at most the tolerance. Returns the number of rounds that ran, or -1 when a
// sum fell below the smallest normal number. In that case `state` is partly normalised and the
// caller must restart in the log domain. A sum underflows when exp took every entry of a row
// or column to zero or to subnormals, for example a row whose logits lie 1e4 below the others.
template <typename StateDerived>
int linear_rounds(Eigen::MatrixBase<StateDerived>& state, int iterations, double tolerance,
                  const SinkhornTrace<typename StateDerived::Scalar>& trace) {
  using Scalar = typename StateDerived::Scalar;
  const Scalar smallest_normal = std::numeric_limits<Scalar>::min();
  for (int round = 0; round < iterations; ++round) {
    for (Eigen::Index j = 0; j < state.cols(); ++j) {
      const Scalar sum = state.col(j).sum();
      if (!(sum >= smallest_normal)) return -1;
      if (trace.data != nullptr) trace.columns(round)[j] = sum;
      state.col(j) *= Scalar(1) / sum;
    }
    for (Eigen::Index i = 0; i < state.rows(); ++i) {
      const Scalar sum = state.row(i).sum();
      if (!(sum >= smallest_normal)) return -1;
      if (trace.data != nullptr) trace.rows(round)[i] = sum;
      state.row(i) *= Scalar(1) / sum;
    }
    if (tolerance > 0.0 && column_error(state) <= tolerance) return round + 1;
  }
  return iterations;
}

// log(sum(exp(values))) for values with a finite maximum: the maximum is factored out, so the
// exp arguments are at most 0 and the sum lies in [1, size].
template <typename Derived>
typename Derived::Scalar log_sum_exp(const Eigen::MatrixBase<Derived>& values) {
  const auto maximum = values.maxCoeff();
  return maximum + std::log(exp_or_zero(values.array() - maximum).sum());
}

// Runs up to `iterations` rounds of the log-domain iteration on `state` (the logits on entry)
// in place: each column minus its log-sum-exp, then each row minus its log-sum-exp. On return
// exp(state) is the projection. Every log-sum-exp stays finite because every row and column
// keeps a finite entry, so the result is finite for any finite logits. Same early stop as
// linear_rounds. Returns the number of rounds that ran (never -1).
template <typename StateDerived>
int log_domain_rounds(Eigen::MatrixBase<StateDerived>& state, int iterations, double tolerance,
                      const SinkhornTrace<typename StateDerived::Scalar>& trace) {
  using Scalar = typename StateDerived::Scalar;
  for (int round = 0; round < iterations; ++round) {
    for (Eigen::Index j = 0; j < state.cols(); ++j) {
      const Scalar normaliser = log_sum_exp(state.col(j));
      if (trace.data != nullptr) trace.columns(round)[j] = normaliser;
      state.col(j).array() -= normaliser;
    }
    for (Eigen::Index i = 0; i < state.rows(); ++i) {
      const Scalar normaliser = log_sum_exp(state.row(i));
      if (trace.data != nullptr) trace.rows(round)[i] = normaliser;
      state.row(i).array() -= normaliser;
    }
    if (tolerance > 0.0 && column_error_of_exp(state) <= tolerance) return round + 1;
  }
  return iterations;
}

// Outcome of one projection: rounds run, column error of the result, and whether the
// log-domain iteration produced it.
struct ProjectionOutcome {
  int iterations = 0;
  double column_error = 0.0;
  bool log_domain = false;
};

// Projects checked, square `logits` into `output` (same shape; it must not alias `logits`).
// With zero iterations the output is exp(logits) unnormalised. The linear method restarts in
// the log domain when a sum underflows.
template <typename LogitsDerived, typename OutputDerived>
ProjectionOutcome project(const Eigen::MatrixBase<LogitsDerived>& logits,
                          Eigen::MatrixBase<OutputDerived>& output, int iterations,
                          double tolerance, bool log_domain,
                          const SinkhornTrace<typename OutputDerived::Scalar>& trace = {}) {
  ProjectionOutcome outcome;
  if (iterations == 0) {
    output = exp_or_zero(logits.array()).matrix();
    outcome.column_error = column_error(output);
    outcome.log_domain = log_domain;
    return outcome;
  }

  if (!log_domain) {
    shifted_exp(logits, output);
    outcome.iterations = linear_rounds(output, iterations, tolerance, trace);
    if (outcome.iterations >= 0) {
      outcome.column_error = column_error(output);
      return outcome;
    }
  }

  output = logits;
  outcome.iterations = log_domain_rounds(output, iterations, tolerance, trace);
  output = exp_or_zero(output.array()).matrix();
  outcome.column_error = column_error(output);
  outcome.log_domain = true;
  return outcome;
}

}  // namespace mhc::detail
