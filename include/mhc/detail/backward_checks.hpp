// Argument checks of the layer's backward entry points, on top of those in layer_checks.hpp.
#pragma once

#include <mhc/common.hpp>
#include <mhc/detail/layer_checks.hpp>

#include <string>

namespace mhc::detail {

// Throws unless the options are usable by a backward pass: a positive finite rms_epsilon and a
// Sinkhorn iteration count of at least 0.
template <typename OptionsType>
void check_backward_options(const char* function, const OptionsType& options) {
  check_options(function, options);
  if (options.sinkhorn.iterations < 0) {
    throw_invalid_argument(function, "options.sinkhorn.iterations", "at least 0",
                           concat(options.sinkhorn.iterations));
  }
}

// Throws unless the arguments every backward entry point takes are valid: self-consistent
// parameters, usable options and a state x of parameters.streams * parameters.channels columns.
template <typename ParametersType, typename Derived, typename OptionsType>
void check_backward_inputs(const char* function, const ParametersType& parameters,
                           const Eigen::DenseBase<Derived>& x, const OptionsType& options) {
  check_parameters(function, parameters);
  check_backward_options(function, options);
  check_state(function, "x", x, parameters.streams, parameters.channels);
}

// Throws unless every field of a Coefficients-shaped object describes `tokens` tokens of
// `streams` streams: pre and post T x n, res T x (n*n). `argument` prefixes the field names.
template <typename CoefficientsType>
void check_coefficients_shape(const char* function, const std::string& argument,
                              const CoefficientsType& coefficients, Eigen::Index tokens, int streams) {
  const auto check = [&](const char* field, const auto& matrix, Eigen::Index cols) {
    if (matrix.rows() != tokens || matrix.cols() != cols) {
      throw_invalid_argument(function, argument + "." + field, "shape " + shape_string(tokens, cols),
                             shape_string(matrix.rows(), matrix.cols()));
    }
  };
  check("pre", coefficients.pre, streams);
  check("post", coefficients.post, streams);
  check("res", coefficients.res, Eigen::Index(streams) * streams);
}

}  // namespace mhc::detail
