// Stability diagnostics: the gain of stream-mixing matrices, alone and composed over layers.
//
// For a mixing matrix P (x_next = P x + ...), the forward gain is the largest absolute row sum
// (how much a constant signal across streams can grow in one step) and the backward gain the
// largest absolute column sum (the same for gradients flowing back). DeepSeek's mHC paper
// (arXiv 2512.24880) calls the maximum the Amax Gain Magnitude. The smallest sums are reported
// too, so that attenuation shows as well as amplification. A doubly stochastic P has all four
// equal to 1, and so has any product of such matrices.
#pragma once

#include <mhc/common.hpp>
#include <mhc/detail/layer_checks.hpp>

#include <cmath>
#include <string>
#include <vector>

namespace mhc {

// Largest and smallest absolute row sums (forward) and column sums (backward) of a matrix.
struct MixingGain {
  double forward_max = 0.0;
  double forward_min = 0.0;
  double backward_max = 0.0;
  double backward_min = 0.0;
};

// Gains of one layer's mixing matrix and of the composite products through that layer.
struct LayerGain {
  MixingGain layer;               // H_res(l)
  MixingGain forward_composite;   // H_res(l) ... H_res(1): what the input has gone through
  MixingGain backward_composite;  // H_res(L) ... H_res(l): what a gradient from the top goes through
};

// Returns the gains of a square mixing matrix P, where P[i][j] weights input stream j into
// output stream i.
template <typename Derived>
MixingGain mixing_gain(const Eigen::MatrixBase<Derived>& mixing) {
  if (mixing.rows() != mixing.cols() || mixing.rows() == 0) {
    detail::throw_invalid_argument("mhc::mixing_gain", "mixing", "a non-empty square matrix",
                                   detail::shape_string(mixing.rows(), mixing.cols()));
  }
  const Eigen::ArrayXd row_sums = mixing.template cast<double>().rowwise().sum().array().abs();
  const Eigen::ArrayXd column_sums = mixing.template cast<double>().colwise().sum().transpose().array().abs();
  MixingGain gain;
  gain.forward_max = row_sums.maxCoeff();
  gain.forward_min = row_sums.minCoeff();
  gain.backward_max = column_sums.maxCoeff();
  gain.backward_min = column_sums.minCoeff();
  return gain;
}

namespace detail {

// Number of streams n of a T x (n*n) matrix of per-token mixing matrices; throws otherwise.
inline int streams_of_mixing_rows(const char* function, const char* argument, Eigen::Index columns) {
  const auto n = static_cast<Eigen::Index>(std::lround(std::sqrt(static_cast<double>(columns))));
  if (n < 1 || n * n != columns) {
    throw_invalid_argument(function, argument, "n * n columns for some n >= 1 (one row-major n x n matrix per token)",
                           concat(columns, " columns"));
  }
  return static_cast<int>(n);
}

inline void accumulate_gain(MixingGain& sum, const MixingGain& term) {
  sum.forward_max += term.forward_max;
  sum.forward_min += term.forward_min;
  sum.backward_max += term.backward_max;
  sum.backward_min += term.backward_min;
}

inline MixingGain scale_gain(MixingGain gain, double factor) {
  gain.forward_max *= factor;
  gain.forward_min *= factor;
  gain.backward_max *= factor;
  gain.backward_min *= factor;
  return gain;
}

}  // namespace detail

// Returns the gains of per-token mixing matrices (T x n*n, row t is token t's H_res in row-major
// order, as in Coefficients::res), each of the four values averaged over the T tokens.
// Zero tokens give all zeros.
template <typename Derived>
MixingGain mean_mixing_gain(const Eigen::MatrixBase<Derived>& res) {
  const int n = detail::streams_of_mixing_rows("mhc::mean_mixing_gain", "res", res.cols());
  MixingGain sum;
  Eigen::MatrixXd mixing(n, n);
  for (Eigen::Index t = 0; t < res.rows(); ++t) {
    for (int i = 0; i < n; ++i) {
      for (int j = 0; j < n; ++j) mixing(i, j) = static_cast<double>(res(t, i * n + j));
    }
    detail::accumulate_gain(sum, mixing_gain(mixing));
  }
  return res.rows() == 0 ? sum : detail::scale_gain(sum, 1.0 / static_cast<double>(res.rows()));
}

// Returns, for each layer l of a stack, the gains of H_res(l), of the forward composite
// H_res(l) ... H_res(1) and of the backward composite H_res(L) ... H_res(l), computed per token in
// double and averaged over tokens. res_per_layer[l] is layer l's T x (n*n) Coefficients::res;
// every layer must have the same T and n.
template <typename Scalar>
std::vector<LayerGain> layer_gains(const std::vector<RowMatrix<Scalar>>& res_per_layer) {
  const char* function = "mhc::layer_gains";
  std::vector<LayerGain> gains(res_per_layer.size());
  if (res_per_layer.empty()) return gains;

  const int n = detail::streams_of_mixing_rows(function, "res_per_layer[0]", res_per_layer[0].cols());
  const Eigen::Index tokens = res_per_layer[0].rows();
  for (std::size_t l = 0; l < res_per_layer.size(); ++l) {
    detail::check_shape(function, ("res_per_layer[" + std::to_string(l) + "]").c_str(), res_per_layer[l],
                        tokens, Eigen::Index(n) * n);
  }

  const auto mixing_of = [&](std::size_t layer, Eigen::Index t) {
    Eigen::MatrixXd mixing(n, n);
    for (int i = 0; i < n; ++i) {
      for (int j = 0; j < n; ++j) mixing(i, j) = static_cast<double>(res_per_layer[layer](t, i * n + j));
    }
    return mixing;
  };

  const std::size_t layers = res_per_layer.size();
  for (Eigen::Index t = 0; t < tokens; ++t) {
    // Forward composite: multiply each new layer on the left.
    Eigen::MatrixXd composite = Eigen::MatrixXd::Identity(n, n);
    for (std::size_t l = 0; l < layers; ++l) {
      const Eigen::MatrixXd mixing = mixing_of(l, t);
      composite = mixing * composite;
      detail::accumulate_gain(gains[l].layer, mixing_gain(mixing));
      detail::accumulate_gain(gains[l].forward_composite, mixing_gain(composite));
    }
    // Backward composite: walk down from the top, multiplying each lower layer on the right.
    composite.setIdentity();
    for (std::size_t l = layers; l-- > 0;) {
      composite = composite * mixing_of(l, t);
      detail::accumulate_gain(gains[l].backward_composite, mixing_gain(composite));
    }
  }

  if (tokens > 0) {
    const double inverse_tokens = 1.0 / static_cast<double>(tokens);
    for (LayerGain& gain : gains) {
      gain.layer = detail::scale_gain(gain.layer, inverse_tokens);
      gain.forward_composite = detail::scale_gain(gain.forward_composite, inverse_tokens);
      gain.backward_composite = detail::scale_gain(gain.backward_composite, inverse_tokens);
    }
  }
  return gains;
}

}  // namespace mhc
