// One mHC layer, forward: dynamic coefficients, stream aggregation and the residual merge.
//
// Shapes, for T tokens, n streams and C channels:
//   x        T x (n*C)   residual state; token t, stream i, channel c at (t, i*C + c)
//   h_in     T x C       branch input  h_in[t] = sum_i H_pre[t][i] * x[t, stream i]
//   h_out    T x C       branch output
//   x_next   T x (n*C)   x_next[t, stream i] = sum_j H_res[t][i][j] * x[t, stream j]
//                                              + H_post[t][i] * h_out[t]
// H_res[i][j] weights input stream j into output stream i.
#pragma once

#include <mhc/common.hpp>
#include <mhc/detail/layer_checks.hpp>
#include <mhc/sinkhorn.hpp>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <utility>

namespace mhc {

// Learned parameters of one mHC layer.
template <typename Scalar>
struct Parameters {
  using scalar_type = Scalar;

  int streams = 0;   // n
  int channels = 0;  // C
  // (n*C) x (n*n + 2n), columns [pre (n) | post (n) | res (n*n)]. Column 2n + i*n + j produces
  // the logit of H_res[i][j]. A learnable RMSNorm weight folds into the rows of phi.
  RowMatrix<Scalar> phi;
  Eigen::Matrix<Scalar, 1, Eigen::Dynamic> bias;  // n*n + 2n, same order as the columns of phi
  Scalar alpha_pre = Scalar(0.01), alpha_post = Scalar(0.01), alpha_res = Scalar(0.01);

  // Number of coefficient logits per token: n*n + 2n.
  int coefficient_count() const { return streams * streams + 2 * streams; }

  // Parameters of a layer that starts as a pre-norm residual connection reading stream
  // layer_index mod n: phi = 0, b_pre = -3 except +3 on that stream (H_pre about 0.95 there and
  // 0.05 elsewhere), b_post = 0 (H_post = 1) and b_res = 6 I - 3 (H_res close to the identity).
  static Parameters identity(int streams, int channels, int layer_index);
};

// Settings shared by the forward and backward passes of a layer.
struct Options {
  SinkhornOptions sinkhorn;
  double rms_epsilon = 1e-6;  // r = sqrt(mean(vec(x)^2) + rms_epsilon); must be positive
};

// Per-token coefficients of a layer, T rows each.
template <typename Scalar>
struct Coefficients {
  RowMatrix<Scalar> pre;   // T x n, sigmoid: values in (0, 1)
  RowMatrix<Scalar> post;  // T x n, 2 * sigmoid: values in (0, 2)
  RowMatrix<Scalar> res;   // T x (n*n), row t is H_res of token t in row-major order
};

// The half of a layer before its branch: the coefficients and the branch input h_in (T x C).
template <typename Scalar>
struct BranchInput {
  Coefficients<Scalar> coefficients;
  RowMatrix<Scalar> input;
};

template <typename Scalar>
Parameters<Scalar> Parameters<Scalar>::identity(int streams, int channels, int layer_index) {
  const char* function = "mhc::Parameters::identity";
  if (streams < 1) detail::throw_invalid_argument(function, "streams", "at least 1", detail::concat(streams));
  if (channels < 1) detail::throw_invalid_argument(function, "channels", "at least 1", detail::concat(channels));
  if (layer_index < 0) detail::throw_invalid_argument(function, "layer_index", "at least 0", detail::concat(layer_index));
  detail::check_layer_size(function, streams, channels);

  Parameters parameters;
  parameters.streams = streams;
  parameters.channels = channels;
  const int n = streams;
  const int home = layer_index % n;
  parameters.phi = RowMatrix<Scalar>::Zero(n * channels, parameters.coefficient_count());
  parameters.bias.setZero(parameters.coefficient_count());
  for (int i = 0; i < n; ++i) parameters.bias(i) = Scalar(i == home ? 3 : -3);
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j < n; ++j) parameters.bias(2 * n + i * n + j) = Scalar(i == j ? 3 : -3);
  }
  return parameters;
}

namespace detail {

template <typename Scalar>
Scalar sigmoid(Scalar z) {
  return Scalar(1) / (Scalar(1) + std::exp(-z));
}

// 1 / r for one token row of finite values, r = sqrt(mean(row^2) + epsilon). Squares of float
// values cannot overflow a double, so float and narrower types accumulate in double. Double rows
// whose squares overflow (entries above about 1e154) are divided by their largest magnitude first.
template <typename Scalar, typename Row>
Scalar inverse_rms(const Row& row, double rms_epsilon) {
  using Accumulator = std::conditional_t<(sizeof(Scalar) < sizeof(double)), double, Scalar>;
  const Accumulator count = static_cast<Accumulator>(row.size());
  const Accumulator epsilon = static_cast<Accumulator>(rms_epsilon);
  Accumulator sum_of_squares(0);
  for (Eigen::Index k = 0; k < row.size(); ++k) {
    const Accumulator value = static_cast<Accumulator>(row(k));
    sum_of_squares += value * value;
  }
  if (std::isfinite(static_cast<double>(sum_of_squares))) {
    return static_cast<Scalar>(Accumulator(1) / std::sqrt(sum_of_squares / count + epsilon));
  }

  Accumulator scale(0);
  for (Eigen::Index k = 0; k < row.size(); ++k) {
    scale = std::max(scale, static_cast<Accumulator>(std::abs(static_cast<Accumulator>(row(k)))));
  }
  Accumulator scaled_squares(0);
  for (Eigen::Index k = 0; k < row.size(); ++k) {
    const Accumulator value = static_cast<Accumulator>(row(k)) / scale;
    scaled_squares += value * value;
  }
  // r = scale * sqrt(scaled mean + epsilon / scale^2), with scale^2 never formed.
  const Accumulator epsilon_term = epsilon / scale / scale;
  return static_cast<Scalar>(Accumulator(1) / scale / std::sqrt(scaled_squares / count + epsilon_term));
}

// n x C view of one token's streams, stream i in row i; `row` points at the token's n*C values.
template <typename Scalar>
Eigen::Map<const RowMatrix<Scalar>> stream_view(const Scalar* row, int streams, int channels) {
  return Eigen::Map<const RowMatrix<Scalar>>(row, streams, channels);
}

template <typename Scalar>
Eigen::Map<RowMatrix<Scalar>> stream_view(Scalar* row, int streams, int channels) {
  return Eigen::Map<RowMatrix<Scalar>>(row, streams, channels);
}

// Read-only n x n view of H_res of token t inside a T x (n*n) coefficient matrix.
template <typename Scalar>
Eigen::Map<const RowMatrix<Scalar>> token_mixing(const RowMatrix<Scalar>& res, Eigen::Index t, int streams) {
  return Eigen::Map<const RowMatrix<Scalar>>(res.row(t).data(), streams, streams);
}

}  // namespace detail

// Computes H_pre, H_post and H_res for every token of x (T x n*C). The projection x phi is one
// matrix product; dividing its rows by the RMS of vec(x) afterwards equals RMSNorm before it.
template <typename Scalar>
Coefficients<Scalar> compute_coefficients(const Parameters<Scalar>& parameters,
                                          const ConstRowMatrixRef<Scalar>& x,
                                          const Options& options = {}) {
  const char* function = "mhc::compute_coefficients";
  detail::check_parameters(function, parameters);
  detail::check_options(function, options);
  detail::check_state(function, "x", x, parameters.streams, parameters.channels);
  detail::check_finite_values(function, "x", x);

  const int n = parameters.streams;
  const Eigen::Index tokens = x.rows();
  const RowMatrix<Scalar> projections = x * parameters.phi;  // T x (n*n + 2n)

  Coefficients<Scalar> coefficients;
  coefficients.pre.resize(tokens, n);
  coefficients.post.resize(tokens, n);
  coefficients.res.resize(tokens, n * n);
  RowMatrix<Scalar> logits(tokens, n * n);  // row t: H_res~ of token t, row-major
  for (Eigen::Index t = 0; t < tokens; ++t) {
    const Scalar inverse_r = detail::inverse_rms<Scalar>(x.row(t), options.rms_epsilon);
    for (int i = 0; i < n; ++i) {
      const Scalar pre_logit = parameters.alpha_pre * projections(t, i) * inverse_r + parameters.bias(i);
      const Scalar post_logit = parameters.alpha_post * projections(t, n + i) * inverse_r + parameters.bias(n + i);
      coefficients.pre(t, i) = detail::sigmoid(pre_logit);
      coefficients.post(t, i) = Scalar(2) * detail::sigmoid(post_logit);
    }
    for (int k = 0; k < n * n; ++k) {
      logits(t, k) = parameters.alpha_res * projections(t, 2 * n + k) * inverse_r + parameters.bias(2 * n + k);
    }
  }
  sinkhorn_knopp_batched(logits, RowMatrixRef<Scalar>(coefficients.res), options.sinkhorn);
  return coefficients;
}

// Aggregates the streams into the branch input: h_in[t] = sum_i H_pre[t][i] * x[t, stream i].
// x is T x (n*C) with n = coefficients.pre.cols(); returns T x C.
template <typename Scalar>
RowMatrix<Scalar> aggregate_streams(const Coefficients<Scalar>& coefficients,
                                    const ConstRowMatrixRef<Scalar>& x) {
  const char* function = "mhc::aggregate_streams";
  const int n = detail::check_coefficients(function, coefficients, x.rows());
  detail::check_width_multiple(function, "x", x, n);
  const int channels = static_cast<int>(x.cols() / n);

  RowMatrix<Scalar> input(x.rows(), channels);
  for (Eigen::Index t = 0; t < x.rows(); ++t) {
    input.row(t).noalias() = coefficients.pre.row(t) * detail::stream_view(x.row(t).data(), n, channels);
  }
  return input;
}

// Writes x_next = H_res x + H_post^T h_out for every token into `x_next` (T x n*C, which must
// not alias x or branch_output).
template <typename Scalar>
void merge_streams(const Coefficients<Scalar>& coefficients, const ConstRowMatrixRef<Scalar>& x,
                   const ConstRowMatrixRef<Scalar>& branch_output, RowMatrixRef<Scalar> x_next) {
  const char* function = "mhc::merge_streams";
  const int n = detail::check_coefficients(function, coefficients, x.rows());
  detail::check_width_multiple(function, "x", x, n);
  const int channels = static_cast<int>(x.cols() / n);
  detail::check_shape(function, "branch_output", branch_output, x.rows(), channels);
  detail::check_shape(function, "x_next", x_next, x.rows(), x.cols());
  detail::check_disjoint(function, "x_next", "x", x_next, x);
  detail::check_disjoint(function, "x_next", "branch_output", x_next, branch_output);

  for (Eigen::Index t = 0; t < x.rows(); ++t) {
    auto next = detail::stream_view(x_next.row(t).data(), n, channels);
    next.noalias() = detail::token_mixing(coefficients.res, t, n) *
                     detail::stream_view(x.row(t).data(), n, channels);
    next.noalias() += coefficients.post.row(t).transpose() * branch_output.row(t);
  }
}

// Returns x_next = H_res x + H_post^T h_out for every token.
template <typename Scalar>
RowMatrix<Scalar> merge_streams(const Coefficients<Scalar>& coefficients,
                                const ConstRowMatrixRef<Scalar>& x,
                                const ConstRowMatrixRef<Scalar>& branch_output) {
  RowMatrix<Scalar> x_next(x.rows(), x.cols());
  merge_streams(coefficients, x, branch_output, RowMatrixRef<Scalar>(x_next));
  return x_next;
}

// The half of the layer before the branch: coefficients and h_in = H_pre x. Run your branch on
// the returned `input`, then call merge_streams(result.coefficients, x, branch_output).
template <typename Scalar>
BranchInput<Scalar> prepare_branch(const Parameters<Scalar>& parameters,
                                   const ConstRowMatrixRef<Scalar>& x,
                                   const Options& options = {}) {
  BranchInput<Scalar> result;
  result.coefficients = compute_coefficients(parameters, x, options);
  result.input = aggregate_streams(result.coefficients, x);
  return result;
}

// x_next = H_res x + H_post^T branch(H_pre x), token by token. `branch` takes the T x C branch
// input (a const RowMatrix<Scalar>&) and returns a T x C matrix; another shape throws.
template <typename Scalar, typename Branch>
RowMatrix<Scalar> forward(const Parameters<Scalar>& parameters, const ConstRowMatrixRef<Scalar>& x,
                          Branch&& branch, const Options& options = {}) {
  const BranchInput<Scalar> prepared = prepare_branch(parameters, x, options);
  const RowMatrix<Scalar> branch_output = std::forward<Branch>(branch)(prepared.input);
  detail::check_shape("mhc::forward", "branch output", branch_output, x.rows(), parameters.channels);
  return merge_streams<Scalar>(prepared.coefficients, x, branch_output);
}

}  // namespace mhc
