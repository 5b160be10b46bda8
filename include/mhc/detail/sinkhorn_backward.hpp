// Backward kernels of the Sinkhorn-Knopp projection: the vector-Jacobian product of the
// truncated iteration (linear and log domain) and the implicit gradient at convergence.
// Include <mhc/sinkhorn.hpp> instead of this header.
#pragma once

#include <mhc/detail/sinkhorn_forward.hpp>

#include <Eigen/Cholesky>

namespace mhc::detail {

// Vector-Jacobian product of linear_rounds. On entry `state` contains the iterate after
// `rounds` rounds and `grad` the gradient with respect to it. On return `grad` contains the
// gradient with respect to the logits and `state` the first iterate exp(logits - column max).
//
// Each normalisation Y = X / s (s the sums along one axis) has the backward
// dX = (dY - sum(dY * Y)) / s with the inner sum along the same axis, and X = Y * s rebuilds
// the earlier iterate from the stored sums, so no iterate is kept. The rebuilt iterates differ
// from the forward ones by a few rounding errors per round. The column-maximum shift adds no
// term because the iteration does not depend on it.
template <typename StateDerived, typename GradDerived>
void linear_backward(Eigen::MatrixBase<StateDerived>& state, Eigen::MatrixBase<GradDerived>& grad,
                     int rounds, const SinkhornTrace<typename StateDerived::Scalar>& trace) {
  using Scalar = typename StateDerived::Scalar;
  for (int round = rounds - 1; round >= 0; --round) {
    const Scalar* row_sums = trace.rows(round);
    for (Eigen::Index i = 0; i < state.rows(); ++i) {
      const Scalar inner = grad.row(i).cwiseProduct(state.row(i)).sum();
      grad.row(i).array() = (grad.row(i).array() - inner) / row_sums[i];
      state.row(i) *= row_sums[i];
    }
    const Scalar* column_sums = trace.columns(round);
    for (Eigen::Index j = 0; j < state.cols(); ++j) {
      const Scalar inner = grad.col(j).cwiseProduct(state.col(j)).sum();
      grad.col(j).array() = (grad.col(j).array() - inner) / column_sums[j];
      state.col(j) *= column_sums[j];
    }
  }
  grad = grad.cwiseProduct(state);
}

// Vector-Jacobian product of log_domain_rounds. On entry `state` contains the log-domain state
// after `rounds` rounds (the output is exp(state)) and `grad` the gradient with respect to the
// output. On return `grad` contains the gradient with respect to the logits.
//
// Each step Z = X - logsumexp(X) along one axis has the backward
// dX = dZ - exp(Z) * sum(dZ) along that axis, and X = Z + logsumexp rebuilds the earlier state.
// exp(Z) is a normalised probability, so no step overflows.
template <typename StateDerived, typename GradDerived>
void log_domain_backward(Eigen::MatrixBase<StateDerived>& state,
                         Eigen::MatrixBase<GradDerived>& grad, int rounds,
                         const SinkhornTrace<typename StateDerived::Scalar>& trace) {
  using Scalar = typename StateDerived::Scalar;
  grad.array() *= exp_or_zero(state.array());
  for (int round = rounds - 1; round >= 0; --round) {
    const Scalar* row_normalisers = trace.rows(round);
    for (Eigen::Index i = 0; i < state.rows(); ++i) {
      const Scalar total = grad.row(i).sum();
      grad.row(i).array() -= total * exp_or_zero(state.row(i).array());
      state.row(i).array() += row_normalisers[i];
    }
    const Scalar* column_normalisers = trace.columns(round);
    for (Eigen::Index j = 0; j < state.cols(); ++j) {
      const Scalar total = grad.col(j).sum();
      grad.col(j).array() -= total * exp_or_zero(state.col(j).array());
      state.col(j).array() += column_normalisers[j];
    }
  }
}

// Replaces `grad` (the gradient with respect to the output on entry) by the gradient with
// respect to checked `logits` of the truncated iteration that project() runs with the same
// arguments. It reruns the forward pass into `state` (scratch of the logits' shape) and records
// 2 * n normalisers per round in `trace_storage`, which must hold 2 * n * iterations scalars.
template <typename LogitsDerived, typename StateDerived, typename GradDerived>
void unrolled_backward(const Eigen::MatrixBase<LogitsDerived>& logits,
                       Eigen::MatrixBase<StateDerived>& state,
                       Eigen::MatrixBase<GradDerived>& grad, int iterations, double tolerance,
                       bool log_domain, typename StateDerived::Scalar* trace_storage) {
  if (iterations == 0) {
    grad.array() *= exp_or_zero(logits.array());
    return;
  }

  const SinkhornTrace<typename StateDerived::Scalar> trace{trace_storage, logits.rows()};
  if (!log_domain) {
    shifted_exp(logits, state);
    const int rounds = linear_rounds(state, iterations, tolerance, trace);
    if (rounds >= 0) {
      linear_backward(state, grad, rounds, trace);
      return;
    }
  }

  state = logits;
  const int rounds = log_domain_rounds(state, iterations, tolerance, trace);
  log_domain_backward(state, grad, rounds, trace);
}

// Gradient at convergence, from the fixed-point conditions instead of the iteration. With P the
// projection and G the upstream gradient, d logits = P o (G - a 1^T - 1 b^T), where a and b
// solve a + P b = (P o G) 1 and P^T a + b = (P o G)^T 1. Eliminating a leaves
// (I - P^T P) b = (P o G)^T 1 - P^T (P o G) 1, which is singular along b = 1 (a = -1), so the
// solver fixes b[n-1] = 0 and solves the leading (n-1) x (n-1) block with LDL^T.
//
// The buffers are sized once, so one solver serves a whole batch without reallocating them.
// NOTE: near a permutation matrix I - P^T P is nearly singular, so the result loses about
// log10(1 / smallest nonzero off-permutation entry) digits. This is an estimate, not measured,
// and in float the error could reach about 1e-3.
template <typename Scalar>
class ImplicitGradientSolver {
 public:
  explicit ImplicitGradientSolver(Eigen::Index n)
      : n_(n),
        system_(n - 1, n - 1),
        row_totals_(n),
        column_totals_(n),
        right_side_(n),
        a_(n),
        b_(n),
        factorisation_(n - 1) {}

  // Replaces `grad` (G on entry) by the implicit gradient for the projection `projected`.
  template <typename ProjectedDerived, typename GradDerived>
  void apply(const Eigen::MatrixBase<ProjectedDerived>& projected,
             Eigen::MatrixBase<GradDerived>& grad) {
    // With n = 1 the projection is the constant [[1]].
    if (n_ == 1) {
      grad.setZero();
      return;
    }

    row_totals_ = projected.cwiseProduct(grad).rowwise().sum();
    column_totals_ = projected.cwiseProduct(grad).colwise().sum().transpose();

    const Eigen::Index m = n_ - 1;
    system_.noalias() = -projected.leftCols(m).transpose() * projected.leftCols(m);
    system_.diagonal().array() += Scalar(1);
    right_side_ = column_totals_;
    right_side_.noalias() -= projected.transpose() * row_totals_;

    factorisation_.compute(system_);
    b_.head(m) = factorisation_.solve(right_side_.head(m));
    b_(m) = Scalar(0);
    a_ = row_totals_;
    a_.noalias() -= projected * b_;

    for (Eigen::Index i = 0; i < n_; ++i) {
      for (Eigen::Index j = 0; j < n_; ++j) {
        grad(i, j) = projected(i, j) * (grad(i, j) - a_(i) - b_(j));
      }
    }
  }

 private:
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  using Vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;

  Eigen::Index n_;
  Matrix system_;
  Vector row_totals_;
  Vector column_totals_;
  Vector right_side_;
  Vector a_;
  Vector b_;
  Eigen::LDLT<Matrix> factorisation_;
};

}  // namespace mhc::detail
