// The backward sequence shared by every coefficient rule: merge, then aggregation, then the
// rule's compute_coefficients_backward(). The mHC free functions of backward.hpp and the
// HyperConnection block of variants.hpp both run these bodies, so a rule switch cannot change
// the order in which the gradient of x is summed.
//
// The callers validate the rule's parameters and the options first, each under its own function
// name. These steps check only the arguments they add (coefficients, merge results, branch
// gradients). A rule is any parameters type for which an unqualified compute_coefficients() and
// compute_coefficients_backward() call finds an overload by argument-dependent lookup.
#pragma once

#include <mhc/common.hpp>
#include <mhc/detail/backward_checks.hpp>
#include <mhc/layer.hpp>
#include <mhc/layer_backward.hpp>

#include <utility>

namespace mhc::detail {

// Throws unless `merged` matches T = `tokens` tokens of the rule's n streams and C channels.
template <typename ParametersType, typename Scalar>
void check_merge_backward(const char* function, const ParametersType& parameters,
                          const MergeBackward<Scalar>& merged, Eigen::Index tokens) {
  const int n = parameters.streams;
  check_coefficients_shape(function, "merged.coefficients", merged.coefficients, tokens, n);
  check_shape(function, "merged.gradients.x", merged.gradients.x, tokens, Eigen::Index(n) * parameters.channels);
  check_shape(function, "merged.gradients.post", merged.gradients.post, tokens, n);
  check_shape(function, "merged.gradients.res", merged.gradients.res, tokens, Eigen::Index(n) * n);
}

// Backward of the merge x_next = H_res x + H_post^T h_out with the given coefficients, which the
// result then owns.
template <typename ParametersType, typename Scalar = typename ParametersType::scalar_type>
MergeBackward<Scalar> merge_backward_step(const char* function, const ParametersType& parameters,
                                          const ConstRowMatrixRef<Scalar>& x, Coefficients<Scalar> coefficients,
                                          const ConstRowMatrixRef<Scalar>& branch_output,
                                          const ConstRowMatrixRef<Scalar>& grad_x_next) {
  check_coefficients_shape(function, "coefficients", coefficients, x.rows(), parameters.streams);
  check_shape(function, "branch_output", branch_output, x.rows(), parameters.channels);
  check_shape(function, "grad_x_next", grad_x_next, x.rows(), x.cols());

  MergeBackward<Scalar> result;
  result.coefficients = std::move(coefficients);
  result.gradients = merge_streams_backward(result.coefficients, x, branch_output, grad_x_next);
  return result;
}

// Backward of the aggregation h_in = H_pre x and of the coefficients, after merge_backward_step().
// Returns the total gradient of x, summed as merge + aggregation + coefficients in that order,
// and the rule's parameter gradients.
template <typename ParametersType, typename Scalar = typename ParametersType::scalar_type>
CoefficientsBackward<ParametersType> prepare_branch_backward_step(const char* function,
                                                                  const ParametersType& parameters,
                                                                  const ConstRowMatrixRef<Scalar>& x,
                                                                  const MergeBackward<Scalar>& merged,
                                                                  const ConstRowMatrixRef<Scalar>& grad_branch_input,
                                                                  const Options& options) {
  check_merge_backward(function, parameters, merged, x.rows());
  check_shape(function, "grad_branch_input", grad_branch_input, x.rows(), parameters.channels);

  AggregateGradients<Scalar> aggregated = aggregate_streams_backward(merged.coefficients, x, grad_branch_input);

  Coefficients<Scalar> grad_coefficients;
  grad_coefficients.pre = std::move(aggregated.pre);
  grad_coefficients.post = merged.gradients.post;
  grad_coefficients.res = merged.gradients.res;
  CoefficientsBackward<ParametersType> through_coefficients =
      compute_coefficients_backward(parameters, x, grad_coefficients, options);

  CoefficientsBackward<ParametersType> result;
  result.x = merged.gradients.x;
  result.x += aggregated.x;
  result.x += through_coefficients.x;
  result.parameters = std::move(through_coefficients.parameters);
  return result;
}

// The whole backward in one call: recomputes the coefficients and h_in, reruns `branch` for
// h_out, then runs the two steps above around `branch_backward`. Throws when the branch or its
// backward returns a matrix other than T x C.
template <typename ParametersType, typename Branch, typename BranchBackward,
          typename Scalar = typename ParametersType::scalar_type>
CoefficientsBackward<ParametersType> backward_steps(const char* function, const ParametersType& parameters,
                                                    const ConstRowMatrixRef<Scalar>& x,
                                                    const ConstRowMatrixRef<Scalar>& grad_x_next, Branch&& branch,
                                                    BranchBackward&& branch_backward, const Options& options) {
  check_shape(function, "grad_x_next", grad_x_next, x.rows(), x.cols());

  BranchInput<Scalar> prepared;
  prepared.coefficients = compute_coefficients(parameters, x, options);
  prepared.input = aggregate_streams(prepared.coefficients, x);
  const RowMatrix<Scalar> branch_output = std::forward<Branch>(branch)(prepared.input);
  check_shape(function, "branch output", branch_output, x.rows(), parameters.channels);

  const MergeBackward<Scalar> merged =
      merge_backward_step(function, parameters, x, std::move(prepared.coefficients), branch_output, grad_x_next);
  const RowMatrix<Scalar> grad_branch_input =
      std::forward<BranchBackward>(branch_backward)(prepared.input, merged.gradients.branch_output);
  check_shape(function, "branch_backward output", grad_branch_input, x.rows(), parameters.channels);

  return prepare_branch_backward_step(function, parameters, x, merged, grad_branch_input, options);
}

}  // namespace mhc::detail
