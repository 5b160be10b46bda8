// Argument checks shared by the layer's entry points. Each throws std::invalid_argument whose
// message names the function, the argument, the expected and the actual value.
#pragma once

#include <mhc/common.hpp>

#include <cmath>
#include <cstdint>

namespace mhc::detail {

inline void check_positive(const char* function, const char* argument, long long value) {
  if (value < 1) throw_invalid_argument(function, argument, "a positive value", concat(value));
}

// Throws unless `state` is T x (streams * channels).
template <typename Derived>
void check_state(const char* function, const char* argument, const Eigen::DenseBase<Derived>& state,
                 int streams, int channels) {
  const Eigen::Index width = Eigen::Index(streams) * channels;
  if (state.cols() != width) {
    throw_invalid_argument(function, argument,
                           concat(width, " columns (streams * channels = ", streams, " * ", channels, ")"),
                           concat(state.cols(), " columns"));
  }
}

// Throws unless the column count of `matrix` is a multiple of `divisor` (at least `divisor`).
template <typename Derived>
void check_width_multiple(const char* function, const char* argument,
                          const Eigen::DenseBase<Derived>& matrix, Eigen::Index divisor) {
  if (matrix.cols() < divisor || matrix.cols() % divisor != 0) {
    throw_invalid_argument(function, argument,
                           concat("a positive multiple of ", divisor, " columns (one block of channels per stream)"),
                           concat(matrix.cols(), " columns"));
  }
}

// Throws unless n*C and n*n + 2n fit in an int, the index type of the layer's loops.
inline void check_layer_size(const char* function, long long streams, long long channels) {
  const long long limit = 2147483647LL;
  if (streams * channels > limit || streams * streams + 2 * streams > limit) {
    throw_invalid_argument(function, "streams and channels",
                           "streams * channels and streams * streams + 2 * streams at most 2147483647",
                           concat("streams ", streams, " and channels ", channels));
  }
}

template <typename Scalar>
void check_finite_scalar(const char* function, const char* argument, Scalar value) {
  if (!std::isfinite(static_cast<double>(value))) {
    throw_invalid_argument(function, argument, "a finite value", concat(static_cast<double>(value)));
  }
}

// Throws unless every entry of `matrix` is finite, naming the first one that is not.
template <typename Derived>
void check_finite_values(const char* function, const char* argument, const Eigen::DenseBase<Derived>& matrix) {
  for (Eigen::Index row = 0; row < matrix.rows(); ++row) {
    for (Eigen::Index col = 0; col < matrix.cols(); ++col) {
      const double value = static_cast<double>(matrix(row, col));
      if (!std::isfinite(value)) {
        throw_invalid_argument(function, argument, "finite entries", concat(value, " at (", row, ", ", col, ")"));
      }
    }
  }
}

// Throws if the memory of the row-major views `output` and `input` overlaps, because a kernel
// that reads `input` while writing `output` would read values it has already overwritten.
template <typename Output, typename Input>
void check_disjoint(const char* function, const char* output_name, const char* input_name,
                    const Output& output, const Input& input) {
  if (output.size() == 0 || input.size() == 0) return;
  // Addresses compare as integers, because < between pointers into different arrays is unspecified.
  const auto address = [](const auto* pointer) { return reinterpret_cast<std::uintptr_t>(pointer); };
  const std::uintptr_t output_begin = address(output.data());
  const std::uintptr_t output_end =
      address(output.data() + (output.rows() - 1) * output.outerStride() + output.cols());
  const std::uintptr_t input_begin = address(input.data());
  const std::uintptr_t input_end = address(input.data() + (input.rows() - 1) * input.outerStride() + input.cols());
  if (output_begin < input_end && input_begin < output_end) {
    throw_invalid_argument(function, output_name, concat("memory disjoint from ", input_name),
                           concat("a view that overlaps ", input_name));
  }
}

// Throws unless the parameters are self-consistent: n >= 1, C >= 1, n*C and n*n + 2n within
// int, phi (n*C) x (n*n + 2n), bias of n*n + 2n entries, finite phi, bias and alphas.
template <typename ParametersType>
void check_parameters(const char* function, const ParametersType& parameters) {
  check_positive(function, "parameters.streams", parameters.streams);
  check_positive(function, "parameters.channels", parameters.channels);
  check_layer_size(function, parameters.streams, parameters.channels);
  const Eigen::Index rows = Eigen::Index(parameters.streams) * parameters.channels;
  const Eigen::Index cols = parameters.coefficient_count();
  check_shape(function, "parameters.phi", parameters.phi, rows, cols);
  if (parameters.bias.size() != cols) {
    throw_invalid_argument(function, "parameters.bias",
                           concat(cols, " entries (streams * streams + 2 * streams)"),
                           concat(parameters.bias.size(), " entries"));
  }
  check_finite_values(function, "parameters.phi", parameters.phi);
  check_finite_values(function, "parameters.bias", parameters.bias);
  check_finite_scalar(function, "parameters.alpha_pre", parameters.alpha_pre);
  check_finite_scalar(function, "parameters.alpha_post", parameters.alpha_post);
  check_finite_scalar(function, "parameters.alpha_res", parameters.alpha_res);
}

template <typename OptionsType>
void check_options(const char* function, const OptionsType& options) {
  if (!(options.rms_epsilon > 0.0) || !std::isfinite(options.rms_epsilon)) {
    throw_invalid_argument(function, "options.rms_epsilon", "a positive finite value",
                           concat(options.rms_epsilon));
  }
}

// Throws unless the coefficients describe `tokens` tokens of one stream count n >= 1
// (pre and post T x n, res T x n*n); returns n.
template <typename CoefficientsType>
int check_coefficients(const char* function, const CoefficientsType& coefficients, Eigen::Index tokens) {
  const Eigen::Index n = coefficients.pre.cols();
  if (n < 1) throw_invalid_argument(function, "coefficients.pre", "at least 1 column (one per stream)", "0 columns");
  check_shape(function, "coefficients.pre", coefficients.pre, tokens, n);
  check_shape(function, "coefficients.post", coefficients.post, tokens, n);
  check_shape(function, "coefficients.res", coefficients.res, tokens, n * n);
  return static_cast<int>(n);
}

}  // namespace mhc::detail
