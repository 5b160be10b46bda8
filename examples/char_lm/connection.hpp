// The residual connection of one layer of the character model: the only part of the model that
// differs between the variants (plain residual, static HC, dynamic HC, mHC, mHC-lite).
//
// Forward:  prepare_branch (coefficients and h_in = H_pre x), the caller's branch, then merge
//           (x_next = H_res x + H_post^T h_out), all from the library.
// Backward: merge backward -> the caller's branch backward -> aggregation backward ->
//           coefficient backward. Only the last step depends on the rule, through the
//           compute_coefficients_backward overload of the rule's parameters type.
#pragma once

#include <mhc/backward.hpp>
#include <mhc/layer.hpp>
#include <mhc/layer_backward.hpp>
#include <mhc/variants.hpp>

#include <string>
#include <utility>
#include <variant>

namespace char_lm {

template <typename Scalar>
using RowMatrix = mhc::RowMatrix<Scalar>;

template <typename Scalar>
using RowVector = mhc::RowVector<Scalar>;

// The learned values of one connection, whichever rule it follows.
template <typename Scalar>
using ConnectionParameters = typename mhc::HyperConnection<Scalar>::Rule;

// Each for_each_tensor overload calls visit(name, data, size, decay) once per learned tensor of
// a rule, in a fixed order. `decay` is true where AdamW applies weight decay: to the weight
// matrices, but not to biases, scales and static coefficients, because decay would pull those
// from their identity initialisation toward zero.
template <typename Scalar, typename Visitor>
void for_each_tensor(mhc::ResidualParameters<Scalar>&, Visitor&&) {}

template <typename Scalar, typename Visitor>
void for_each_tensor(mhc::StaticParameters<Scalar>& parameters, Visitor&& visit) {
  visit("pre", parameters.pre.data(), parameters.pre.size(), false);
  visit("post", parameters.post.data(), parameters.post.size(), false);
  visit("res", parameters.res.data(), parameters.res.size(), false);
}

template <typename Scalar, typename Visitor>
void for_each_tensor(mhc::DynamicParameters<Scalar>& parameters, Visitor&& visit) {
  visit("pre_weight", parameters.pre_weight.data(), parameters.pre_weight.size(), true);
  visit("post_weight", parameters.post_weight.data(), parameters.post_weight.size(), true);
  visit("res_weight", parameters.res_weight.data(), parameters.res_weight.size(), true);
  visit("static_pre", parameters.static_pre.data(), parameters.static_pre.size(), false);
  visit("static_post", parameters.static_post.data(), parameters.static_post.size(), false);
  visit("static_res", parameters.static_res.data(), parameters.static_res.size(), false);
  visit("alpha_scale", &parameters.alpha_scale, 1, false);
  visit("beta_scale", &parameters.beta_scale, 1, false);
}

// mHC and mHC-lite share the field names: phi, bias and the three alphas.
template <typename ProjectionParameters, typename Visitor>
void for_each_projection_tensor(ProjectionParameters& parameters, Visitor&& visit) {
  visit("phi", parameters.phi.data(), parameters.phi.size(), true);
  visit("bias", parameters.bias.data(), parameters.bias.size(), false);
  visit("alpha_pre", &parameters.alpha_pre, 1, false);
  visit("alpha_post", &parameters.alpha_post, 1, false);
  visit("alpha_res", &parameters.alpha_res, 1, false);
}

template <typename Scalar, typename Visitor>
void for_each_tensor(mhc::Parameters<Scalar>& parameters, Visitor&& visit) {
  for_each_projection_tensor(parameters, visit);
}

template <typename Scalar, typename Visitor>
void for_each_tensor(mhc::LiteParameters<Scalar>& parameters, Visitor&& visit) {
  for_each_projection_tensor(parameters, visit);
}

template <typename Scalar, typename Visitor>
void for_each_tensor(ConnectionParameters<Scalar>& parameters, Visitor&& visit) {
  std::visit([&](auto& rule) { for_each_tensor(rule, visit); }, parameters);
}

// Gradients of one connection: x is the total gradient of the layer input (merge, branch and
// coefficient paths), parameters the gradient of the rule's learned values.
template <typename Scalar>
struct ConnectionGradients {
  RowMatrix<Scalar> x;
  ConnectionParameters<Scalar> parameters;
};

// Backpropagates grad_x_next (T x n*C) through one layer x_next = H_res x + H_post^T F(H_pre x).
// `coefficients` and `branch_output` are the values of the forward pass on `x`.
// `branch_backward` maps the gradient of the branch output (T x C) to the gradient of the
// branch input (T x C) and accumulates the branch's own parameter gradients.
template <typename Scalar, typename BranchBackward>
ConnectionGradients<Scalar> connection_backward(const ConnectionParameters<Scalar>& parameters,
                                                const RowMatrix<Scalar>& x,
                                                const mhc::Coefficients<Scalar>& coefficients,
                                                const RowMatrix<Scalar>& branch_output,
                                                const RowMatrix<Scalar>& grad_x_next,
                                                BranchBackward&& branch_backward,
                                                const mhc::Options& options) {
  mhc::MergeGradients<Scalar> merged =
      mhc::merge_streams_backward<Scalar>(coefficients, x, branch_output, grad_x_next);
  const RowMatrix<Scalar> grad_branch_input = branch_backward(merged.branch_output);
  mhc::AggregateGradients<Scalar> aggregated =
      mhc::aggregate_streams_backward<Scalar>(coefficients, x, grad_branch_input);

  mhc::Coefficients<Scalar> grad_coefficients;
  grad_coefficients.pre = std::move(aggregated.pre);
  grad_coefficients.post = std::move(merged.post);
  grad_coefficients.res = std::move(merged.res);

  ConnectionGradients<Scalar> gradients;
  std::visit(
      [&](const auto& rule) {
        auto rule_gradients = mhc::compute_coefficients_backward(rule, x, grad_coefficients, options);
        gradients.x = std::move(rule_gradients.x);
        gradients.parameters = std::move(rule_gradients.parameters);
      },
      parameters);
  gradients.x += merged.x;
  gradients.x += aggregated.x;
  return gradients;
}

}  // namespace char_lm
