// One mHC layer, backward: gradients of the state x and of the layer's parameters.
//
// The forward pass (layer.hpp) is
//   coefficients = compute_coefficients(parameters, x)      H_pre, H_post, H_res per token
//   h_in         = H_pre x                                  T x C, the branch input
//   h_out        = branch(h_in)                             T x C, the caller's branch
//   x_next       = H_res x + H_post^T h_out                 T x (n*C)
// so x reaches x_next along three paths: the merge (H_res x), the aggregation into the branch
// (H_pre x) and the coefficients. The backward comes in three forms:
//   - backward(): one call that reruns the branch and calls its vector-Jacobian product;
//   - merge_backward() then prepare_branch_backward(): the two halves, so that a training loop
//     backpropagates its own branch in between;
//   - compute_coefficients_backward(): the coefficient path alone.
//
// Memory: by default the halves recompute the coefficients from x instead of storing their
// T x (n*n + 2n) values per layer. The overload of merge_backward() that takes the coefficients
// kept from the forward skips that recomputation. It gives bitwise the same gradients, provided
// the kept coefficients came from compute_coefficients() or prepare_branch() on the same
// parameters, x and options.
//
// Determinism: every per-token step is independent, and the parameter gradients are summed over
// tokens in one fixed order. The gradient of phi is the single product x^T dP, and the bias and
// alpha gradients are summed token by token. So the same inputs give bitwise the same
// gradients on every run.
// NOTE: with Eigen's OpenMP threading enabled, the product x^T dP may be blocked differently
// for another thread count, which changes its rounding.
#pragma once

#include <mhc/common.hpp>
#include <mhc/detail/backward_checks.hpp>
#include <mhc/detail/backward_steps.hpp>
#include <mhc/detail/layer_checks.hpp>
#include <mhc/layer.hpp>
#include <mhc/layer_backward.hpp>
#include <mhc/sinkhorn.hpp>

#include <utility>

namespace mhc {

// Gradients of one layer with respect to its inputs.
template <typename Scalar>
struct LayerGradients {
  RowMatrix<Scalar> x;  // T x (n*C): total gradient of x through the merge, the branch and the coefficients
  // Gradients of phi, bias and the three alphas, in the fields of the same name. The fields
  // streams and channels are copied from the layer.
  Parameters<Scalar> parameters;
};

namespace detail {

// Fills `grad_logits` (1 x (n*n + 2n), order [pre | post | res]) with the gradient of token t's
// coefficient logits, given row t of `grad` (the gradient of its coefficients). The logits are
// recomputed from the token's projection x phi and 1/r with the expressions of
// compute_coefficients().
template <typename Scalar, typename ProjectionRow>
void token_logit_gradient(const Parameters<Scalar>& parameters, const ProjectionRow& projection,
                          Scalar inverse_r, const Coefficients<Scalar>& grad, Eigen::Index t,
                          const SinkhornOptions& sinkhorn, RowVector<Scalar>& grad_logits) {
  const int n = parameters.streams;
  for (int i = 0; i < n; ++i) {
    const Scalar pre = sigmoid(parameters.alpha_pre * projection(i) * inverse_r + parameters.bias(i));
    grad_logits(i) = grad.pre(t, i) * pre * (Scalar(1) - pre);

    // H_post = 2 sigmoid(z), so dH_post / dz = 2 sigmoid(z) (1 - sigmoid(z)).
    const Scalar post = sigmoid(parameters.alpha_post * projection(n + i) * inverse_r + parameters.bias(n + i));
    grad_logits(n + i) = grad.post(t, i) * Scalar(2) * post * (Scalar(1) - post);
  }

  RowMatrix<Scalar> logits(n, n);
  for (int k = 0; k < n * n; ++k) {
    logits.data()[k] = parameters.alpha_res * projection(2 * n + k) * inverse_r + parameters.bias(2 * n + k);
  }
  const Eigen::Map<const RowMatrix<Scalar>> grad_mixing(grad.res.row(t).data(), n, n);
  const RowMatrix<Scalar> grad_res_logits = sinkhorn_knopp_backward(logits, grad_mixing, sinkhorn);
  grad_logits.segment(2 * n, n * n) = Eigen::Map<const RowVector<Scalar>>(grad_res_logits.data(), n * n);
}

}  // namespace detail

// Backpropagates grad_coefficients (the gradient of the loss with respect to H_pre, H_post and
// H_res, in the Coefficients layout: pre T x n, post T x n, res T x (n*n)) through
// compute_coefficients(parameters, x, options). Returns the gradient of x along this path alone
// (T x (n*C)) and the gradients of phi, bias, alpha_pre, alpha_post and alpha_res.
//
// Recomputes the projection x phi, the RMS and the logits from x, and the Sinkhorn iterates
// inside sinkhorn_knopp_backward(), so it needs no stored activations.
// NOTE: the logits cannot be taken from kept coefficients, so a layer backward that recomputes
// the coefficients computes the product x phi twice (once there and once here).
template <typename Scalar>
CoefficientsBackward<Parameters<Scalar>> compute_coefficients_backward(
    const Parameters<Scalar>& parameters, const ConstRowMatrixRef<Scalar>& x,
    const Coefficients<Scalar>& grad_coefficients, const Options& options = {}) {
  const char* function = "mhc::compute_coefficients_backward";
  detail::check_backward_inputs(function, parameters, x, options);
  detail::check_coefficients_shape(function, "grad_coefficients", grad_coefficients, x.rows(),
                                   parameters.streams);

  const int n = parameters.streams;
  const int count = parameters.coefficient_count();
  const Eigen::Index tokens = x.rows();
  const RowMatrix<Scalar> projections = x * parameters.phi;  // T x count, as in the forward

  // Token by token, logit k = alpha * projection_k * (1/r) + bias_k. Collect the gradient of the
  // projections (grad_projections) and of 1/r, and sum the bias and alpha gradients in token order.
  RowMatrix<Scalar> grad_projections(tokens, count);
  RowVector<Scalar> inverse_rms(tokens);
  RowVector<Scalar> grad_inverse_rms(tokens);
  RowVector<Scalar> grad_logits(count);
  RowVector<Scalar> grad_bias = RowVector<Scalar>::Zero(count);
  Scalar grad_alpha[3] = {Scalar(0), Scalar(0), Scalar(0)};  // pre, post, res
  const Scalar alpha[3] = {parameters.alpha_pre, parameters.alpha_post, parameters.alpha_res};
  const int block_begin[4] = {0, n, 2 * n, count};
  for (Eigen::Index t = 0; t < tokens; ++t) {
    const Scalar inverse_r = detail::inverse_rms<Scalar>(x.row(t), options.rms_epsilon);
    detail::token_logit_gradient(parameters, projections.row(t), inverse_r, grad_coefficients, t,
                                 options.sinkhorn, grad_logits);
    grad_bias += grad_logits;

    Scalar grad_inverse_r(0);
    for (int block = 0; block < 3; ++block) {
      Scalar grad_alpha_token(0);
      for (int k = block_begin[block]; k < block_begin[block + 1]; ++k) {
        const Scalar scaled_projection = projections(t, k) * inverse_r;
        grad_alpha_token += grad_logits(k) * scaled_projection;
        grad_projections(t, k) = grad_logits(k) * alpha[block] * inverse_r;
        // Scaled by 1/r: for huge x both the logit gradient (through H_pre, which weights x) and
        // the projection are large, and their plain product would overflow a float.
        grad_inverse_r += grad_logits(k) * alpha[block] * scaled_projection;
      }
      grad_alpha[block] += grad_alpha_token;
    }
    inverse_rms(t) = inverse_r;
    grad_inverse_rms(t) = grad_inverse_r;  // the gradient of 1/r, times 1/r
  }

  CoefficientsBackward<Parameters<Scalar>> result;
  result.parameters.streams = parameters.streams;
  result.parameters.channels = parameters.channels;
  result.parameters.phi.noalias() = x.transpose() * grad_projections;  // (n*C) x count
  result.parameters.bias = grad_bias;
  result.parameters.alpha_pre = grad_alpha[0];
  result.parameters.alpha_post = grad_alpha[1];
  result.parameters.alpha_res = grad_alpha[2];

  // Gradient of x through the projection, then through 1/r = (mean(v^2) + epsilon)^(-1/2) of the
  // token row v, whose derivative is -(1/r)^3 v / (n*C). The factors are applied as
  // ((-g / r) / (n*C) / r) (v / r), with g / r stored above, so no intermediate leaves the float
  // range for huge v.
  result.x.noalias() = grad_projections * parameters.phi.transpose();
  const Scalar width = static_cast<Scalar>(x.cols());
  for (Eigen::Index t = 0; t < tokens; ++t) {
    const Scalar inverse_r = inverse_rms(t);
    const Scalar factor = -grad_inverse_rms(t) / width * inverse_r;
    result.x.row(t) += factor * (x.row(t) * inverse_r);
  }
  return result;
}

// Computes the first half of the layer's backward, mirroring merge_streams(). Given
// branch_output (h_out, T x C) from the forward and grad_x_next (T x (n*C)), returns the merge's
// gradients of x, of h_out, of H_post and of H_res, together with the coefficients it used.
// This overload takes the coefficients kept from the forward (for example
// prepare_branch(...).coefficients) and stores them in the result, so pass them with std::move
// to avoid a copy.
template <typename Scalar>
MergeBackward<Scalar> merge_backward(const Parameters<Scalar>& parameters,
                                     const ConstRowMatrixRef<Scalar>& x,
                                     Coefficients<Scalar> coefficients,
                                     const ConstRowMatrixRef<Scalar>& branch_output,
                                     const ConstRowMatrixRef<Scalar>& grad_x_next,
                                     const Options& options = {}) {
  const char* function = "mhc::merge_backward";
  detail::check_backward_inputs(function, parameters, x, options);
  return detail::merge_backward_step(function, parameters, x, std::move(coefficients), branch_output, grad_x_next);
}

// Computes the first half of the layer's backward like the overload above, but recomputes the
// coefficients with compute_coefficients(parameters, x, options).
template <typename Scalar>
MergeBackward<Scalar> merge_backward(const Parameters<Scalar>& parameters,
                                     const ConstRowMatrixRef<Scalar>& x,
                                     const ConstRowMatrixRef<Scalar>& branch_output,
                                     const ConstRowMatrixRef<Scalar>& grad_x_next,
                                     const Options& options = {}) {
  detail::check_backward_inputs("mhc::merge_backward", parameters, x, options);
  return merge_backward(parameters, x, compute_coefficients(parameters, x, options), branch_output,
                        grad_x_next, options);
}

// Computes the second half of the layer's backward, mirroring prepare_branch(). Given the
// result of merge_backward() and grad_branch_input (the gradient of h_in, T x C, from the
// branch's backward), backpropagates through the aggregation h_in = H_pre x and the
// coefficients.
// Returns the total gradient of x (merge + aggregation + coefficients, added in that order) and
// the parameter gradients.
template <typename Scalar>
LayerGradients<Scalar> prepare_branch_backward(const Parameters<Scalar>& parameters,
                                               const ConstRowMatrixRef<Scalar>& x,
                                               const MergeBackward<Scalar>& merged,
                                               const ConstRowMatrixRef<Scalar>& grad_branch_input,
                                               const Options& options = {}) {
  const char* function = "mhc::prepare_branch_backward";
  detail::check_backward_inputs(function, parameters, x, options);
  CoefficientsBackward<Parameters<Scalar>> steps =
      detail::prepare_branch_backward_step(function, parameters, x, merged, grad_branch_input, options);

  LayerGradients<Scalar> result;
  result.x = std::move(steps.x);
  result.parameters = std::move(steps.parameters);
  return result;
}

// Computes the backward of forward(parameters, x, branch, options) in one call, given grad_x_next
// (T x (n*C)). Recomputes the coefficients and h_in from x and reruns `branch` on h_in to get
// h_out, so nothing from the forward needs to be stored.
//   branch(h_in) -> h_out                          takes a const RowMatrix<Scalar>& (T x C)
//   branch_backward(h_in, grad_h_out) -> grad_h_in  the branch's vector-Jacobian product, both
//                                                  arguments const RowMatrix<Scalar>& (T x C)
// `branch` must be deterministic, because its rerun must reproduce the h_out of the forward.
// A branch output or gradient of another shape throws std::invalid_argument. The result equals
// merge_backward() followed by prepare_branch_backward().
template <typename Scalar, typename Branch, typename BranchBackward>
LayerGradients<Scalar> backward(const Parameters<Scalar>& parameters, const ConstRowMatrixRef<Scalar>& x,
                                const ConstRowMatrixRef<Scalar>& grad_x_next, Branch&& branch,
                                BranchBackward&& branch_backward, const Options& options = {}) {
  const char* function = "mhc::backward";
  detail::check_backward_inputs(function, parameters, x, options);
  CoefficientsBackward<Parameters<Scalar>> steps =
      detail::backward_steps(function, parameters, x, grad_x_next, std::forward<Branch>(branch),
                             std::forward<BranchBackward>(branch_backward), options);

  LayerGradients<Scalar> result;
  result.x = std::move(steps.x);
  result.parameters = std::move(steps.parameters);
  return result;
}

}  // namespace mhc
