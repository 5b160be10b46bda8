// Backward of the coefficient-independent halves of a layer: the residual merge and the stream
// aggregation. Both are bilinear in the coefficients and the state, so each returns the
// gradient with respect to both. Shapes follow layer.hpp.
#pragma once

#include <mhc/layer.hpp>

namespace mhc {

// Gradients from the merge x_next = H_res x + H_post^T h_out.
template <typename Scalar>
struct MergeGradients {
  RowMatrix<Scalar> x;              // T x (n*C): H_res^T dx_next per token (the merge's share only)
  RowMatrix<Scalar> branch_output;  // T x C: sum_i H_post[i] * dx_next[stream i]
  RowMatrix<Scalar> post;           // T x n: <dx_next[stream i], h_out>
  RowMatrix<Scalar> res;            // T x (n*n): entry (i, j) is <dx_next[stream i], x[stream j]>
};

// Result of merge_backward() (backward.hpp) and HyperConnection::merge_backward() (variants.hpp):
// the coefficients the merge used and its gradients.
template <typename Scalar>
struct MergeBackward {
  Coefficients<Scalar> coefficients;  // H_pre, H_post, H_res of every token (recomputed or kept)
  // gradients.x is the merge's share of the gradient of x (H_res^T dx_next per token).
  // gradients.branch_output is the gradient of h_out, the input of the branch's backward.
  // gradients.post and gradients.res are the gradients of H_post and H_res.
  MergeGradients<Scalar> gradients;
};

// Gradients from the aggregation h_in = H_pre x.
template <typename Scalar>
struct AggregateGradients {
  RowMatrix<Scalar> x;    // T x (n*C): H_pre[i] * dh_in in stream i (the aggregation's share only)
  RowMatrix<Scalar> pre;  // T x n: <dh_in, x[stream i]>
};

// Result of the backward pass of a coefficient rule (mHC, static HC, dynamic HC, mHC-lite).
// `x` is the gradient of the state through the coefficients (T x n*C). `parameters` contains the
// gradients of the rule's learned values, field by field, in the rule's own parameters type.
template <typename ParametersType>
struct CoefficientsBackward {
  RowMatrix<typename ParametersType::scalar_type> x;
  ParametersType parameters;
};

// Backward of merge_streams(coefficients, x, branch_output) given grad_x_next (T x n*C).
// Only coefficients.post and coefficients.res are read; coefficients.pre must still have the
// matching shape.
template <typename Scalar>
MergeGradients<Scalar> merge_streams_backward(const Coefficients<Scalar>& coefficients,
                                              const ConstRowMatrixRef<Scalar>& x,
                                              const ConstRowMatrixRef<Scalar>& branch_output,
                                              const ConstRowMatrixRef<Scalar>& grad_x_next) {
  const char* function = "mhc::merge_streams_backward";
  const int n = detail::check_coefficients(function, coefficients, x.rows());
  detail::check_width_multiple(function, "x", x, n);
  const int channels = static_cast<int>(x.cols() / n);
  detail::check_shape(function, "branch_output", branch_output, x.rows(), channels);
  detail::check_shape(function, "grad_x_next", grad_x_next, x.rows(), x.cols());

  const Eigen::Index tokens = x.rows();
  MergeGradients<Scalar> gradients;
  gradients.x.resize(tokens, x.cols());
  gradients.branch_output.resize(tokens, channels);
  gradients.post.resize(tokens, n);
  gradients.res.resize(tokens, n * n);
  for (Eigen::Index t = 0; t < tokens; ++t) {
    const auto streams = detail::stream_view(x.row(t).data(), n, channels);
    const auto grad_next = detail::stream_view(grad_x_next.row(t).data(), n, channels);
    const auto mixing = detail::token_mixing(coefficients.res, t, n);

    detail::stream_view(gradients.x.row(t).data(), n, channels).noalias() = mixing.transpose() * grad_next;
    gradients.branch_output.row(t).noalias() = coefficients.post.row(t) * grad_next;
    gradients.post.row(t).noalias() = (grad_next * branch_output.row(t).transpose()).transpose();
    Eigen::Map<RowMatrix<Scalar>>(gradients.res.row(t).data(), n, n).noalias() =
        grad_next * streams.transpose();
  }
  return gradients;
}

// Backward of aggregate_streams(coefficients, x) given grad_input = dh_in (T x C).
template <typename Scalar>
AggregateGradients<Scalar> aggregate_streams_backward(const Coefficients<Scalar>& coefficients,
                                                      const ConstRowMatrixRef<Scalar>& x,
                                                      const ConstRowMatrixRef<Scalar>& grad_input) {
  const char* function = "mhc::aggregate_streams_backward";
  const int n = detail::check_coefficients(function, coefficients, x.rows());
  detail::check_width_multiple(function, "x", x, n);
  const int channels = static_cast<int>(x.cols() / n);
  detail::check_shape(function, "grad_input", grad_input, x.rows(), channels);

  const Eigen::Index tokens = x.rows();
  AggregateGradients<Scalar> gradients;
  gradients.x.resize(tokens, x.cols());
  gradients.pre.resize(tokens, n);
  for (Eigen::Index t = 0; t < tokens; ++t) {
    const auto streams = detail::stream_view(x.row(t).data(), n, channels);
    detail::stream_view(gradients.x.row(t).data(), n, channels).noalias() =
        coefficients.pre.row(t).transpose() * grad_input.row(t);
    gradients.pre.row(t).noalias() = (streams * grad_input.row(t).transpose()).transpose();
  }
  return gradients;
}

}  // namespace mhc
