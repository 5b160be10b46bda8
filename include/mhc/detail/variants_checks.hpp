// Argument checks and the permutation table behind the coefficient rules of variants.hpp.
#pragma once

#include <mhc/common.hpp>
#include <mhc/detail/layer_checks.hpp>

#include <algorithm>
#include <numeric>
#include <vector>

namespace mhc::detail {

// mHC-lite mixes all n! permutation matrices. At n = 6 that is 720 logits per token and a phi of
// 6C x 732; at n = 7 it would be 5040 logits and a phi about 7 times wider than the rest of the
// layer's weights together, so the rule accepts at most 6 streams.
inline constexpr int max_lite_streams = 6;

inline int factorial(int n) {
  int result = 1;
  for (int k = 2; k <= n; ++k) result *= k;
  return result;
}

// All permutations of {0, ..., n-1} in lexicographic order, flattened: permutation k occupies
// entries [k*n, (k+1)*n) and entry k*n + i is the image sigma_k(i). Permutation 0 is the identity.
inline std::vector<int> lexicographic_permutations(int n) {
  std::vector<int> current(static_cast<std::size_t>(n));
  std::iota(current.begin(), current.end(), 0);
  std::vector<int> table;
  table.reserve(static_cast<std::size_t>(factorial(n) * n));
  do {
    table.insert(table.end(), current.begin(), current.end());
  } while (std::next_permutation(current.begin(), current.end()));
  return table;
}

template <typename Derived>
void check_size(const char* function, const char* argument, const Eigen::DenseBase<Derived>& vector,
                Eigen::Index size) {
  if (vector.size() != size) {
    throw_invalid_argument(function, argument, concat(size, " entries"), concat(vector.size(), " entries"));
  }
}

template <typename ParametersType>
void check_residual_parameters(const char* function, const ParametersType& parameters) {
  if (parameters.streams != 1) {
    throw_invalid_argument(function, "parameters.streams", "1 (a plain residual connection has one stream)",
                           concat(parameters.streams));
  }
  check_positive(function, "parameters.channels", parameters.channels);
}

template <typename ParametersType>
void check_static_parameters(const char* function, const ParametersType& parameters) {
  check_positive(function, "parameters.streams", parameters.streams);
  check_positive(function, "parameters.channels", parameters.channels);
  const int n = parameters.streams;
  check_size(function, "parameters.pre", parameters.pre, n);
  check_size(function, "parameters.post", parameters.post, n);
  check_shape(function, "parameters.res", parameters.res, n, n);
}

template <typename ParametersType>
void check_dynamic_parameters(const char* function, const ParametersType& parameters) {
  check_positive(function, "parameters.streams", parameters.streams);
  check_positive(function, "parameters.channels", parameters.channels);
  const int n = parameters.streams;
  const int c = parameters.channels;
  check_shape(function, "parameters.pre_weight", parameters.pre_weight, c, 1);
  check_shape(function, "parameters.post_weight", parameters.post_weight, c, 1);
  check_shape(function, "parameters.res_weight", parameters.res_weight, c, n);
  check_size(function, "parameters.static_pre", parameters.static_pre, n);
  check_size(function, "parameters.static_post", parameters.static_post, n);
  check_shape(function, "parameters.static_res", parameters.static_res, n, n);
  check_finite_scalar(function, "parameters.alpha_scale", parameters.alpha_scale);
  check_finite_scalar(function, "parameters.beta_scale", parameters.beta_scale);
}

template <typename ParametersType>
void check_lite_parameters(const char* function, const ParametersType& parameters) {
  check_positive(function, "parameters.streams", parameters.streams);
  if (parameters.streams > max_lite_streams) {
    throw_invalid_argument(function, "parameters.streams",
                           concat("at most ", max_lite_streams, " (mHC-lite mixes all n! permutations)"),
                           concat(parameters.streams));
  }
  check_positive(function, "parameters.channels", parameters.channels);
  const Eigen::Index rows = Eigen::Index(parameters.streams) * parameters.channels;
  const Eigen::Index cols = parameters.coefficient_count();
  check_shape(function, "parameters.phi", parameters.phi, rows, cols);
  if (parameters.bias.size() != cols) {
    throw_invalid_argument(function, "parameters.bias", concat(cols, " entries (2 * streams + streams!)"),
                           concat(parameters.bias.size(), " entries"));
  }
  check_finite_scalar(function, "parameters.alpha_pre", parameters.alpha_pre);
  check_finite_scalar(function, "parameters.alpha_post", parameters.alpha_post);
  check_finite_scalar(function, "parameters.alpha_res", parameters.alpha_res);
}

// Throws unless the gradient of the coefficients is shaped like the rule's coefficients for T tokens.
template <typename CoefficientsType>
void check_gradient_coefficients(const char* function, const CoefficientsType& gradient, Eigen::Index tokens,
                                 int streams) {
  check_shape(function, "grad_coefficients.pre", gradient.pre, tokens, streams);
  check_shape(function, "grad_coefficients.post", gradient.post, tokens, streams);
  check_shape(function, "grad_coefficients.res", gradient.res, tokens, Eigen::Index(streams) * streams);
}

}  // namespace mhc::detail
