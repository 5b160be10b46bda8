// The classic residual-connection rules behind one block interface.
//
// Every rule only decides how the per-token coefficients H_pre (T x n), H_post (T x n) and H_res
// (T x n*n, row-major, H_res[i][j] weights input stream j into output stream i) are computed.
// Aggregation (h_in = H_pre x) and the merge (x_next = H_res x + H_post^T h_out) are shared and
// live in layer.hpp. So does the backward: HyperConnection runs the merge, aggregation and
// coefficient steps of detail/backward_steps.hpp that the mHC free functions of backward.hpp run
// too, and only compute_coefficients_backward() differs by rule. The rules, selected by Connection:
//   residual    n = 1, H_pre = H_post = H_res = 1: x_next = x + F(x) exactly.
//   static_hc   constant, learned, unconstrained H_pre, H_post, H_res.
//   dynamic_hc  Hyper-Connections (Zhu et al., arXiv 2409.19606): token-dependent tanh terms added
//               to static ones; unconstrained, so products of H_res over depth can grow.
//   mhc         Parameters<Scalar> from layer.hpp: sigmoid, 2 sigmoid, Sinkhorn-Knopp.
//   mhc_lite    arXiv 2601.05732: H_pre and H_post as mHC, H_res a softmax-weighted sum of all
//               n! permutation matrices, so it is doubly stochastic up to rounding.
#pragma once

#include <mhc/backward.hpp>
#include <mhc/common.hpp>
#include <mhc/detail/backward_steps.hpp>
#include <mhc/detail/layer_checks.hpp>
#include <mhc/detail/variants_checks.hpp>
#include <mhc/layer.hpp>
#include <mhc/layer_backward.hpp>

#include <cmath>
#include <string>
#include <utility>
#include <variant>
#include <vector>

namespace mhc {

// Largest stream count that mHC-lite accepts, because its logits grow as n!.
inline constexpr int max_lite_streams = detail::max_lite_streams;

// The residual-connection rule of a block. The order matches HyperConnection::Rule.
enum class Connection { residual, static_hc, dynamic_hc, mhc, mhc_lite };

// Returns the lower-case name of a rule ("residual", "static_hc", "dynamic_hc", "mhc", "mhc_lite").
inline const char* to_string(Connection connection) {
  switch (connection) {
    case Connection::residual: return "residual";
    case Connection::static_hc: return "static_hc";
    case Connection::dynamic_hc: return "dynamic_hc";
    case Connection::mhc: return "mhc";
    case Connection::mhc_lite: return "mhc_lite";
  }
  return "unknown";
}

// Parses a name written by to_string. Any other name throws std::invalid_argument listing the valid ones.
inline Connection parse_connection(const std::string& name) {
  for (Connection connection : {Connection::residual, Connection::static_hc, Connection::dynamic_hc,
                                Connection::mhc, Connection::mhc_lite}) {
    if (name == to_string(connection)) return connection;
  }
  detail::throw_invalid_argument("mhc::parse_connection", "name",
                                 "one of residual, static_hc, dynamic_hc, mhc, mhc_lite", "\"" + name + "\"");
}

// A plain residual connection x_next = x + F(x): one stream and no learned values.
template <typename Scalar>
struct ResidualParameters {
  using scalar_type = Scalar;

  int streams = 1;  // always 1
  int channels = 0;

  static ResidualParameters identity(int channels);
};

// Static hyper-connections: the same learned, unconstrained coefficients for every token.
template <typename Scalar>
struct StaticParameters {
  using scalar_type = Scalar;

  int streams = 0;
  int channels = 0;
  RowVector<Scalar> pre;   // H_pre, n entries
  RowVector<Scalar> post;  // H_post, n entries
  RowMatrix<Scalar> res;   // H_res, n x n, res(i, j) weights input stream j into output stream i

  // H_pre = e_(layer_index mod n), H_post = 1, H_res = I: reads the home stream only and adds
  // the branch output to every stream.
  static StaticParameters identity(int streams, int channels, int layer_index);
};

// Dynamic hyper-connections in the notation of Zhu et al. Per token, each stream row x[j] is
// RMS-normalised on its own, x_norm[j] = x[j] / sqrt(mean(x[j]^2) + rms_epsilon), and
//   B[i]     = beta_scale  * tanh(x_norm[i] . post_weight)   + static_post[i]   (HC's B)
//   A_m[j]   = alpha_scale * tanh(x_norm[j] . pre_weight)    + static_pre[j]    (HC's A_m)
//   A_r[j][i] = alpha_scale * tanh(x_norm[j] . res_weight[:, i]) + static_res(j, i)  (HC's A_r)
// HC writes output stream i = sum_j A_r[j][i] x[j] + B[i] h_out, with source streams on the rows
// of A_r, so this library's coefficients are H_pre = A_m, H_post = B and H_res = A_r^T.
// HC normalises with a LayerNorm; here it is an RMSNorm without weight, whose learnable weight
// would fold into the rows of the three weight matrices.
template <typename Scalar>
struct DynamicParameters {
  using scalar_type = Scalar;

  int streams = 0;
  int channels = 0;
  RowMatrix<Scalar> pre_weight;   // W_m, C x 1
  RowMatrix<Scalar> post_weight;  // W_beta, C x 1
  RowMatrix<Scalar> res_weight;   // W_r, C x n, column i feeds destination stream i
  RowVector<Scalar> static_pre;   // A_m static part, n entries
  RowVector<Scalar> static_post;  // B static part, n entries
  RowMatrix<Scalar> static_res;   // A_r static part, n x n, row = source stream, column = destination
  // NOTE: the initial 0.01 follows mHC's alphas; it is not taken from the HC paper.
  Scalar alpha_scale = Scalar(0.01);  // s_alpha, shared by A_m and A_r
  Scalar beta_scale = Scalar(0.01);   // s_beta

  // Zero weights and the static initialisation: every tanh term vanishes, so the layer starts
  // as StaticParameters::identity.
  static DynamicParameters identity(int streams, int channels, int layer_index);
};

// mHC-lite. H_pre and H_post follow mHC exactly. H_res = sum_k softmax(res logits)_k P_k over the
// n! permutations sigma_k of {0..n-1} in lexicographic order of (sigma_k(0), ..., sigma_k(n-1)),
// where P_k[i][sigma_k(i)] = 1: output stream i reads input stream sigma_k(i). k = 0 is the
// identity. Accepts at most max_lite_streams (6) streams because the logits grow as n!.
template <typename Scalar>
struct LiteParameters {
  using scalar_type = Scalar;

  int streams = 0;
  int channels = 0;
  // (n*C) x (2n + n!), columns [pre (n) | post (n) | one logit per permutation (n!)].
  RowMatrix<Scalar> phi;
  RowVector<Scalar> bias;  // 2n + n!, same order as the columns of phi
  Scalar alpha_pre = Scalar(0.01), alpha_post = Scalar(0.01), alpha_res = Scalar(0.01);

  // Number of coefficient logits per token: 2n + n!.
  int coefficient_count() const { return 2 * streams + detail::factorial(streams); }

  // phi = 0, b_pre and b_post as Parameters::identity, and permutation logits 0 for the identity
  // and -(6 + ln(n! - 1)) for the others, so the identity gets weight sigmoid(6) = 0.9975 for
  // every n >= 2.
  static LiteParameters identity(int streams, int channels, int layer_index);
};

namespace detail {

inline void check_identity_arguments(const char* function, int streams, int channels, int layer_index) {
  if (streams < 1) throw_invalid_argument(function, "streams", "at least 1", concat(streams));
  if (channels < 1) throw_invalid_argument(function, "channels", "at least 1", concat(channels));
  if (layer_index < 0) throw_invalid_argument(function, "layer_index", "at least 0", concat(layer_index));
}

// Coefficients of T tokens with every entry set to zero, sized for n streams.
template <typename Scalar>
Coefficients<Scalar> zero_coefficients(Eigen::Index tokens, int streams) {
  Coefficients<Scalar> coefficients;
  coefficients.pre.setZero(tokens, streams);
  coefficients.post.setZero(tokens, streams);
  coefficients.res.setZero(tokens, Eigen::Index(streams) * streams);
  return coefficients;
}

// Per-stream RMSNorm of T tokens: returns the (T*n) x C matrix whose row t*n + j is x_norm[t][j]
// and writes 1 / r of that row into inverse_norms (T*n entries).
template <typename Scalar>
RowMatrix<Scalar> normalize_streams(const ConstRowMatrixRef<Scalar>& x, int streams, int channels,
                                    double rms_epsilon, Eigen::Matrix<Scalar, Eigen::Dynamic, 1>& inverse_norms) {
  const Eigen::Index rows = x.rows() * streams;
  RowMatrix<Scalar> normalized(rows, channels);
  inverse_norms.resize(rows);
  for (Eigen::Index t = 0; t < x.rows(); ++t) {
    const auto token = stream_view(x.row(t).data(), streams, channels);
    for (int j = 0; j < streams; ++j) {
      const Eigen::Index row = t * streams + j;
      inverse_norms(row) = inverse_rms<Scalar>(token.row(j), rms_epsilon);
      normalized.row(row) = token.row(j) * inverse_norms(row);
    }
  }
  return normalized;
}

}  // namespace detail

template <typename Scalar>
ResidualParameters<Scalar> ResidualParameters<Scalar>::identity(int channels) {
  detail::check_identity_arguments("mhc::ResidualParameters::identity", 1, channels, 0);
  ResidualParameters parameters;
  parameters.channels = channels;
  return parameters;
}

template <typename Scalar>
StaticParameters<Scalar> StaticParameters<Scalar>::identity(int streams, int channels, int layer_index) {
  detail::check_identity_arguments("mhc::StaticParameters::identity", streams, channels, layer_index);
  StaticParameters parameters;
  parameters.streams = streams;
  parameters.channels = channels;
  parameters.pre.setZero(streams);
  parameters.pre(layer_index % streams) = Scalar(1);
  parameters.post.setOnes(streams);
  parameters.res.setIdentity(streams, streams);
  return parameters;
}

template <typename Scalar>
DynamicParameters<Scalar> DynamicParameters<Scalar>::identity(int streams, int channels, int layer_index) {
  detail::check_identity_arguments("mhc::DynamicParameters::identity", streams, channels, layer_index);
  DynamicParameters parameters;
  parameters.streams = streams;
  parameters.channels = channels;
  parameters.pre_weight.setZero(channels, 1);
  parameters.post_weight.setZero(channels, 1);
  parameters.res_weight.setZero(channels, streams);
  parameters.static_pre.setZero(streams);
  parameters.static_pre(layer_index % streams) = Scalar(1);
  parameters.static_post.setOnes(streams);
  parameters.static_res.setIdentity(streams, streams);
  return parameters;
}

template <typename Scalar>
LiteParameters<Scalar> LiteParameters<Scalar>::identity(int streams, int channels, int layer_index) {
  const char* function = "mhc::LiteParameters::identity";
  detail::check_identity_arguments(function, streams, channels, layer_index);
  if (streams > detail::max_lite_streams) {
    detail::throw_invalid_argument(function, "streams",
                                   detail::concat("at most ", detail::max_lite_streams,
                                                  " (mHC-lite mixes all n! permutations)"),
                                   detail::concat(streams));
  }
  LiteParameters parameters;
  parameters.streams = streams;
  parameters.channels = channels;
  const int n = streams;
  const int permutations = detail::factorial(n);
  parameters.phi.setZero(Eigen::Index(n) * channels, parameters.coefficient_count());
  parameters.bias.setZero(parameters.coefficient_count());
  for (int i = 0; i < n; ++i) parameters.bias(i) = Scalar(i == layer_index % n ? 3 : -3);
  if (permutations > 1) {
    const double others = 6.0 + std::log(static_cast<double>(permutations - 1));
    for (int k = 1; k < permutations; ++k) parameters.bias(2 * n + k) = static_cast<Scalar>(-others);
  }
  return parameters;
}

// Returns H_pre = H_post = H_res = 1 for every token of x (T x C).
template <typename Scalar>
Coefficients<Scalar> compute_coefficients(const ResidualParameters<Scalar>& parameters,
                                          const ConstRowMatrixRef<Scalar>& x, const Options& options = {}) {
  const char* function = "mhc::compute_coefficients";
  detail::check_residual_parameters(function, parameters);
  detail::check_options(function, options);
  detail::check_state(function, "x", x, 1, parameters.channels);

  Coefficients<Scalar> coefficients;
  coefficients.pre.setOnes(x.rows(), 1);
  coefficients.post.setOnes(x.rows(), 1);
  coefficients.res.setOnes(x.rows(), 1);
  return coefficients;
}

// Returns the static coefficients repeated for every token of x (T x n*C). Options are checked
// but unused.
template <typename Scalar>
Coefficients<Scalar> compute_coefficients(const StaticParameters<Scalar>& parameters,
                                          const ConstRowMatrixRef<Scalar>& x, const Options& options = {}) {
  const char* function = "mhc::compute_coefficients";
  detail::check_static_parameters(function, parameters);
  detail::check_options(function, options);
  detail::check_state(function, "x", x, parameters.streams, parameters.channels);

  const int n = parameters.streams;
  const RowMatrix<Scalar> res = parameters.res;  // contiguous row-major copy of H_res
  const Eigen::Map<const RowVector<Scalar>> res_row(res.data(), n * n);
  Coefficients<Scalar> coefficients;
  coefficients.pre = parameters.pre.replicate(x.rows(), 1);
  coefficients.post = parameters.post.replicate(x.rows(), 1);
  coefficients.res = res_row.replicate(x.rows(), 1);
  return coefficients;
}

// Computes the Hyper-Connections coefficients of every token of x (T x n*C), as DynamicParameters describes.
template <typename Scalar>
Coefficients<Scalar> compute_coefficients(const DynamicParameters<Scalar>& parameters,
                                          const ConstRowMatrixRef<Scalar>& x, const Options& options = {}) {
  const char* function = "mhc::compute_coefficients";
  detail::check_dynamic_parameters(function, parameters);
  detail::check_options(function, options);
  detail::check_state(function, "x", x, parameters.streams, parameters.channels);
  detail::check_finite_values(function, "x", x);

  const int n = parameters.streams;
  Eigen::Matrix<Scalar, Eigen::Dynamic, 1> inverse_norms;
  const RowMatrix<Scalar> normalized =
      detail::normalize_streams<Scalar>(x, n, parameters.channels, options.rms_epsilon, inverse_norms);
  // Row t*n + j of each product belongs to source stream j of token t.
  const RowMatrix<Scalar> pre_tanh = (normalized * parameters.pre_weight).array().tanh().matrix();
  const RowMatrix<Scalar> post_tanh = (normalized * parameters.post_weight).array().tanh().matrix();
  const RowMatrix<Scalar> res_tanh = (normalized * parameters.res_weight).array().tanh().matrix();

  Coefficients<Scalar> coefficients = detail::zero_coefficients<Scalar>(x.rows(), n);
  for (Eigen::Index t = 0; t < x.rows(); ++t) {
    for (int j = 0; j < n; ++j) {
      const Eigen::Index row = t * n + j;
      coefficients.pre(t, j) = parameters.alpha_scale * pre_tanh(row, 0) + parameters.static_pre(j);
      coefficients.post(t, j) = parameters.beta_scale * post_tanh(row, 0) + parameters.static_post(j);
      for (int i = 0; i < n; ++i) {
        // A_r[j][i] (source j, destination i) is H_res[i][j].
        coefficients.res(t, i * n + j) = parameters.alpha_scale * res_tanh(row, i) + parameters.static_res(j, i);
      }
    }
  }
  return coefficients;
}

// Computes the mHC-lite coefficients of every token of x (T x n*C), as LiteParameters describes.
template <typename Scalar>
Coefficients<Scalar> compute_coefficients(const LiteParameters<Scalar>& parameters,
                                          const ConstRowMatrixRef<Scalar>& x, const Options& options = {}) {
  const char* function = "mhc::compute_coefficients";
  detail::check_lite_parameters(function, parameters);
  detail::check_options(function, options);
  detail::check_state(function, "x", x, parameters.streams, parameters.channels);
  detail::check_finite_values(function, "x", x);

  const int n = parameters.streams;
  const int permutations = detail::factorial(n);
  const std::vector<int> table = detail::lexicographic_permutations(n);
  const RowMatrix<Scalar> projections = x * parameters.phi;  // T x (2n + n!)

  Coefficients<Scalar> coefficients = detail::zero_coefficients<Scalar>(x.rows(), n);
  RowVector<Scalar> weights(permutations);
  for (Eigen::Index t = 0; t < x.rows(); ++t) {
    const Scalar inverse_r = detail::inverse_rms<Scalar>(x.row(t), options.rms_epsilon);
    for (int i = 0; i < n; ++i) {
      const Scalar pre_logit = parameters.alpha_pre * projections(t, i) * inverse_r + parameters.bias(i);
      const Scalar post_logit = parameters.alpha_post * projections(t, n + i) * inverse_r + parameters.bias(n + i);
      coefficients.pre(t, i) = detail::sigmoid(pre_logit);
      coefficients.post(t, i) = Scalar(2) * detail::sigmoid(post_logit);
    }
    for (int k = 0; k < permutations; ++k) {
      weights(k) = parameters.alpha_res * projections(t, 2 * n + k) * inverse_r + parameters.bias(2 * n + k);
    }
    weights = (weights.array() - weights.maxCoeff()).exp().matrix();  // softmax, shifted against overflow
    weights /= weights.sum();
    for (int k = 0; k < permutations; ++k) {
      for (int i = 0; i < n; ++i) coefficients.res(t, i * n + table[k * n + i]) += weights(k);
    }
  }
  return coefficients;
}

// Backward of the residual rule: nothing is learned and the coefficients do not depend on x, so
// the gradient of x through the coefficients is zero.
template <typename Scalar>
CoefficientsBackward<ResidualParameters<Scalar>> compute_coefficients_backward(
    const ResidualParameters<Scalar>& parameters, const ConstRowMatrixRef<Scalar>& x,
    const Coefficients<Scalar>& grad_coefficients, const Options& options = {}) {
  const char* function = "mhc::compute_coefficients_backward";
  detail::check_residual_parameters(function, parameters);
  detail::check_options(function, options);
  detail::check_state(function, "x", x, 1, parameters.channels);
  detail::check_gradient_coefficients(function, grad_coefficients, x.rows(), 1);

  CoefficientsBackward<ResidualParameters<Scalar>> result;
  result.x.setZero(x.rows(), x.cols());
  result.parameters = parameters;
  return result;
}

// Backward of the static rule: the parameter gradients are the coefficient gradients summed
// over tokens, and the gradient of x through the coefficients is zero.
template <typename Scalar>
CoefficientsBackward<StaticParameters<Scalar>> compute_coefficients_backward(
    const StaticParameters<Scalar>& parameters, const ConstRowMatrixRef<Scalar>& x,
    const Coefficients<Scalar>& grad_coefficients, const Options& options = {}) {
  const char* function = "mhc::compute_coefficients_backward";
  detail::check_static_parameters(function, parameters);
  detail::check_options(function, options);
  detail::check_state(function, "x", x, parameters.streams, parameters.channels);
  detail::check_gradient_coefficients(function, grad_coefficients, x.rows(), parameters.streams);

  const int n = parameters.streams;
  CoefficientsBackward<StaticParameters<Scalar>> result;
  result.x.setZero(x.rows(), x.cols());
  result.parameters.streams = n;
  result.parameters.channels = parameters.channels;
  result.parameters.pre = detail::column_sums(grad_coefficients.pre);
  result.parameters.post = detail::column_sums(grad_coefficients.post);
  const RowVector<Scalar> res_sum = detail::column_sums(grad_coefficients.res);
  result.parameters.res = Eigen::Map<const RowMatrix<Scalar>>(res_sum.data(), n, n);
  return result;
}

// Backward of the dynamic rule given grad_coefficients (T x n, T x n, T x n*n): the gradient of x
// through the per-stream RMSNorm and the parameter gradients summed over tokens.
template <typename Scalar>
CoefficientsBackward<DynamicParameters<Scalar>> compute_coefficients_backward(
    const DynamicParameters<Scalar>& parameters, const ConstRowMatrixRef<Scalar>& x,
    const Coefficients<Scalar>& grad_coefficients, const Options& options = {}) {
  const char* function = "mhc::compute_coefficients_backward";
  detail::check_dynamic_parameters(function, parameters);
  detail::check_options(function, options);
  detail::check_state(function, "x", x, parameters.streams, parameters.channels);
  detail::check_gradient_coefficients(function, grad_coefficients, x.rows(), parameters.streams);

  const int n = parameters.streams;
  const int channels = parameters.channels;
  const Eigen::Index rows = x.rows() * n;  // one row per (token, source stream)
  Eigen::Matrix<Scalar, Eigen::Dynamic, 1> inverse_norms;
  const RowMatrix<Scalar> normalized = detail::normalize_streams<Scalar>(x, n, channels, options.rms_epsilon, inverse_norms);
  const RowMatrix<Scalar> pre_tanh = (normalized * parameters.pre_weight).array().tanh().matrix();
  const RowMatrix<Scalar> post_tanh = (normalized * parameters.post_weight).array().tanh().matrix();
  const RowMatrix<Scalar> res_tanh = (normalized * parameters.res_weight).array().tanh().matrix();

  // Coefficient gradients laid out like the tanh terms: row t*n + j, and for A_r column i.
  const Eigen::Map<const RowMatrix<Scalar>> grad_pre(grad_coefficients.pre.data(), rows, 1);
  const Eigen::Map<const RowMatrix<Scalar>> grad_post(grad_coefficients.post.data(), rows, 1);
  RowMatrix<Scalar> grad_a_r(rows, n);
  for (Eigen::Index t = 0; t < x.rows(); ++t) {
    const Eigen::Map<const RowMatrix<Scalar>> grad_res(grad_coefficients.res.row(t).data(), n, n);
    grad_a_r.middleRows(t * n, n) = grad_res.transpose();
  }

  CoefficientsBackward<DynamicParameters<Scalar>> result;
  DynamicParameters<Scalar>& gradient = result.parameters;
  gradient.streams = n;
  gradient.channels = channels;
  gradient.static_pre = detail::column_sums(grad_coefficients.pre);
  gradient.static_post = detail::column_sums(grad_coefficients.post);
  gradient.static_res.setZero(n, n);
  for (Eigen::Index t = 0; t < x.rows(); ++t) gradient.static_res += grad_a_r.middleRows(t * n, n);
  gradient.alpha_scale = (grad_pre.array() * pre_tanh.array()).sum() + (grad_a_r.array() * res_tanh.array()).sum();
  gradient.beta_scale = (grad_post.array() * post_tanh.array()).sum();

  // d tanh(z) / dz = 1 - tanh(z)^2.
  const RowMatrix<Scalar> grad_pre_z =
      (grad_pre.array() * parameters.alpha_scale * (Scalar(1) - pre_tanh.array().square())).matrix();
  const RowMatrix<Scalar> grad_post_z =
      (grad_post.array() * parameters.beta_scale * (Scalar(1) - post_tanh.array().square())).matrix();
  const RowMatrix<Scalar> grad_res_z =
      (grad_a_r.array() * parameters.alpha_scale * (Scalar(1) - res_tanh.array().square())).matrix();
  gradient.pre_weight = normalized.transpose() * grad_pre_z;
  gradient.post_weight = normalized.transpose() * grad_post_z;
  gradient.res_weight = normalized.transpose() * grad_res_z;

  RowMatrix<Scalar> grad_normalized = grad_pre_z * parameters.pre_weight.transpose();
  grad_normalized.noalias() += grad_post_z * parameters.post_weight.transpose();
  grad_normalized.noalias() += grad_res_z * parameters.res_weight.transpose();

  // RMSNorm backward per row: dx = (dy - y * mean(dy .* y)) / r.
  result.x.resize(x.rows(), x.cols());
  Eigen::Map<RowMatrix<Scalar>> grad_x(result.x.data(), rows, channels);
  for (Eigen::Index row = 0; row < rows; ++row) {
    const Scalar mean_inner = normalized.row(row).dot(grad_normalized.row(row)) / Scalar(channels);
    grad_x.row(row) = inverse_norms(row) * (grad_normalized.row(row) - mean_inner * normalized.row(row));
  }
  return result;
}

// Backward of the mHC-lite rule given grad_coefficients: the gradient of x (through the
// projection x phi and the RMS) and the parameter gradients summed over tokens.
template <typename Scalar>
CoefficientsBackward<LiteParameters<Scalar>> compute_coefficients_backward(
    const LiteParameters<Scalar>& parameters, const ConstRowMatrixRef<Scalar>& x,
    const Coefficients<Scalar>& grad_coefficients, const Options& options = {}) {
  const char* function = "mhc::compute_coefficients_backward";
  detail::check_lite_parameters(function, parameters);
  detail::check_options(function, options);
  detail::check_state(function, "x", x, parameters.streams, parameters.channels);
  detail::check_gradient_coefficients(function, grad_coefficients, x.rows(), parameters.streams);

  const int n = parameters.streams;
  const int permutations = detail::factorial(n);
  const int count = parameters.coefficient_count();
  const Scalar width = static_cast<Scalar>(x.cols());
  const std::vector<int> table = detail::lexicographic_permutations(n);
  const RowMatrix<Scalar> projections = x * parameters.phi;

  CoefficientsBackward<LiteParameters<Scalar>> result;
  LiteParameters<Scalar>& gradient = result.parameters;
  gradient.streams = n;
  gradient.channels = parameters.channels;
  gradient.bias.setZero(count);
  gradient.alpha_pre = gradient.alpha_post = gradient.alpha_res = Scalar(0);
  result.x.resize(x.rows(), x.cols());

  RowMatrix<Scalar> grad_projections(x.rows(), count);
  RowVector<Scalar> grad_logits(count);
  RowVector<Scalar> weights(permutations);
  for (Eigen::Index t = 0; t < x.rows(); ++t) {
    const Scalar inverse_r = detail::inverse_rms<Scalar>(x.row(t), options.rms_epsilon);
    // Normalised projections p * (1 / r); the logits are alpha * this + bias.
    const RowVector<Scalar> scaled = projections.row(t) * inverse_r;

    for (int i = 0; i < n; ++i) {
      const Scalar pre = detail::sigmoid(parameters.alpha_pre * scaled(i) + parameters.bias(i));
      const Scalar post = detail::sigmoid(parameters.alpha_post * scaled(n + i) + parameters.bias(n + i));
      grad_logits(i) = grad_coefficients.pre(t, i) * pre * (Scalar(1) - pre);
      grad_logits(n + i) = grad_coefficients.post(t, i) * Scalar(2) * post * (Scalar(1) - post);
    }

    for (int k = 0; k < permutations; ++k) {
      weights(k) = parameters.alpha_res * scaled(2 * n + k) + parameters.bias(2 * n + k);
    }
    weights = (weights.array() - weights.maxCoeff()).exp().matrix();
    weights /= weights.sum();
    // H_res sums w_k P_k, so d w_k = sum_i dH_res[i][sigma_k(i)]. The softmax then gives
    // d logits = w .* (dw - <w, dw>).
    RowVector<Scalar> grad_weights(permutations);
    for (int k = 0; k < permutations; ++k) {
      Scalar sum(0);
      for (int i = 0; i < n; ++i) sum += grad_coefficients.res(t, i * n + table[k * n + i]);
      grad_weights(k) = sum;
    }
    const Scalar inner = weights.dot(grad_weights);
    grad_logits.tail(permutations) = (weights.array() * (grad_weights.array() - inner)).matrix();

    gradient.bias += grad_logits;
    gradient.alpha_pre += grad_logits.head(n).dot(scaled.head(n));
    gradient.alpha_post += grad_logits.segment(n, n).dot(scaled.segment(n, n));
    gradient.alpha_res += grad_logits.tail(permutations).dot(scaled.tail(permutations));

    RowVector<Scalar> grad_scaled = grad_logits;
    grad_scaled.head(n) *= parameters.alpha_pre;
    grad_scaled.segment(n, n) *= parameters.alpha_post;
    grad_scaled.tail(permutations) *= parameters.alpha_res;
    grad_projections.row(t) = grad_scaled * inverse_r;
    // scaled = p / r and d(1/r)/dx = -x / (r^3 * nC).
    const Scalar grad_inverse_r = grad_scaled.dot(projections.row(t));
    result.x.row(t) = (-grad_inverse_r * inverse_r * inverse_r * inverse_r / width) * x.row(t);
  }

  gradient.phi = x.transpose() * grad_projections;
  result.x.noalias() += grad_projections * parameters.phi.transpose();
  return result;
}

namespace detail {

// Throws unless the arguments that every backward entry point of HyperConnection takes are valid:
// the rule's parameters, the options and a state x of n * C columns. Only the mHC rule runs Sinkhorn, so
// only it also requires options.sinkhorn.iterations >= 0.
template <typename Scalar, typename Derived>
void check_rule_inputs(const char* function, const ResidualParameters<Scalar>& parameters,
                       const Eigen::DenseBase<Derived>& x, const Options& options) {
  check_residual_parameters(function, parameters);
  check_options(function, options);
  check_state(function, "x", x, 1, parameters.channels);
}

template <typename Scalar, typename Derived>
void check_rule_inputs(const char* function, const StaticParameters<Scalar>& parameters,
                       const Eigen::DenseBase<Derived>& x, const Options& options) {
  check_static_parameters(function, parameters);
  check_options(function, options);
  check_state(function, "x", x, parameters.streams, parameters.channels);
}

template <typename Scalar, typename Derived>
void check_rule_inputs(const char* function, const DynamicParameters<Scalar>& parameters,
                       const Eigen::DenseBase<Derived>& x, const Options& options) {
  check_dynamic_parameters(function, parameters);
  check_options(function, options);
  check_state(function, "x", x, parameters.streams, parameters.channels);
}

template <typename Scalar, typename Derived>
void check_rule_inputs(const char* function, const Parameters<Scalar>& parameters,
                       const Eigen::DenseBase<Derived>& x, const Options& options) {
  check_backward_inputs(function, parameters, x, options);
}

template <typename Scalar, typename Derived>
void check_rule_inputs(const char* function, const LiteParameters<Scalar>& parameters,
                       const Eigen::DenseBase<Derived>& x, const Options& options) {
  check_lite_parameters(function, parameters);
  check_options(function, options);
  check_state(function, "x", x, parameters.streams, parameters.channels);
}

}  // namespace detail

// One block's residual connection under any of the rules above. Connection chooses the rule at
// creation. Every method computes that rule's coefficients and then runs the shared aggregation
// and merge of layer.hpp, or their backward.
template <typename Scalar>
class HyperConnection {
 public:
  // Alternatives in the order of Connection.
  using Rule = std::variant<ResidualParameters<Scalar>, StaticParameters<Scalar>, DynamicParameters<Scalar>,
                            Parameters<Scalar>, LiteParameters<Scalar>>;

  explicit HyperConnection(Rule parameters) : parameters_(std::move(parameters)) {}

  // Creates the rule's identity-like initialisation for layer `layer_index`. Every rule then reads
  // stream layer_index mod n and keeps the streams unmixed: exactly for residual, static_hc and
  // dynamic_hc, nearly for mhc and mhc_lite. Connection::residual requires streams == 1, and
  // mhc_lite accepts at most 6 streams.
  static HyperConnection create(Connection connection, int streams, int channels, int layer_index) {
    switch (connection) {
      case Connection::residual:
        if (streams != 1) {
          detail::throw_invalid_argument("mhc::HyperConnection::create", "streams",
                                         "1 for Connection::residual", detail::concat(streams));
        }
        if (layer_index < 0) {
          detail::throw_invalid_argument("mhc::HyperConnection::create", "layer_index", "at least 0",
                                         detail::concat(layer_index));
        }
        return HyperConnection(ResidualParameters<Scalar>::identity(channels));
      case Connection::static_hc:
        return HyperConnection(StaticParameters<Scalar>::identity(streams, channels, layer_index));
      case Connection::dynamic_hc:
        return HyperConnection(DynamicParameters<Scalar>::identity(streams, channels, layer_index));
      case Connection::mhc:
        return HyperConnection(Parameters<Scalar>::identity(streams, channels, layer_index));
      case Connection::mhc_lite:
        return HyperConnection(LiteParameters<Scalar>::identity(streams, channels, layer_index));
    }
    detail::throw_invalid_argument("mhc::HyperConnection::create", "connection", "a Connection value",
                                   detail::concat(static_cast<int>(connection)));
  }

  Connection connection() const { return static_cast<Connection>(parameters_.index()); }
  int streams() const {
    return std::visit([](const auto& parameters) { return parameters.streams; }, parameters_);
  }
  int channels() const {
    return std::visit([](const auto& parameters) { return parameters.channels; }, parameters_);
  }

  // The rule's parameters, read with std::get<StaticParameters<Scalar>>(block.parameters()) and so on.
  const Rule& parameters() const { return parameters_; }
  Rule& parameters() { return parameters_; }

  Coefficients<Scalar> compute_coefficients(const ConstRowMatrixRef<Scalar>& x, const Options& options = {}) const {
    return std::visit([&](const auto& parameters) { return mhc::compute_coefficients(parameters, x, options); },
                      parameters_);
  }

  // Coefficients and the T x C branch input h_in = H_pre x.
  BranchInput<Scalar> prepare_branch(const ConstRowMatrixRef<Scalar>& x, const Options& options = {}) const {
    BranchInput<Scalar> result;
    result.coefficients = compute_coefficients(x, options);
    result.input = aggregate_streams(result.coefficients, x);
    return result;
  }

  // x_next = H_res x + H_post^T branch_output.
  RowMatrix<Scalar> merge(const Coefficients<Scalar>& coefficients, const ConstRowMatrixRef<Scalar>& x,
                          const ConstRowMatrixRef<Scalar>& branch_output) const {
    return merge_streams<Scalar>(coefficients, x, branch_output);
  }

  // x_next = H_res x + H_post^T branch(H_pre x). `branch` takes the T x C branch input and returns
  // a T x C matrix; another shape throws.
  template <typename Branch>
  RowMatrix<Scalar> forward(const ConstRowMatrixRef<Scalar>& x, Branch&& branch, const Options& options = {}) const {
    const BranchInput<Scalar> prepared = prepare_branch(x, options);
    const RowMatrix<Scalar> branch_output = std::forward<Branch>(branch)(prepared.input);
    detail::check_shape("mhc::HyperConnection::forward", "branch output", branch_output, x.rows(), channels());
    return merge(prepared.coefficients, x, branch_output);
  }

  // Gradients of one block: `x` is the total gradient of the state (T x n*C) and `parameters`
  // holds the gradient of every learned value in the fields of the block's own rule, so it holds
  // the same alternative as parameters(). The fields streams and channels are copied from the
  // block, and the residual rule, which learns nothing, returns a copy of its parameters.
  struct Gradients {
    RowMatrix<Scalar> x;
    Rule parameters;
  };

  // Computes the first half of the backward, given branch_output (h_out, T x C) from the forward
  // and grad_x_next (T x n*C): the merge's gradients of x, h_out, H_post and H_res, together with
  // the coefficients it used. This overload takes the coefficients kept from the forward (for
  // example prepare_branch(x).coefficients) and stores them in the result. Gradients are bitwise
  // those of the recomputing overload when the kept coefficients came from this block, x and
  // options.
  MergeBackward<Scalar> merge_backward(const ConstRowMatrixRef<Scalar>& x, Coefficients<Scalar> coefficients,
                                       const ConstRowMatrixRef<Scalar>& branch_output,
                                       const ConstRowMatrixRef<Scalar>& grad_x_next,
                                       const Options& options = {}) const {
    const char* function = "mhc::HyperConnection::merge_backward";
    return std::visit(
        [&](const auto& parameters) {
          detail::check_rule_inputs(function, parameters, x, options);
          return detail::merge_backward_step(function, parameters, x, std::move(coefficients), branch_output,
                                             grad_x_next);
        },
        parameters_);
  }

  // Computes the first half of the backward like the overload above, but recomputes the
  // coefficients from x, so nothing from the forward but h_out needs to be stored.
  MergeBackward<Scalar> merge_backward(const ConstRowMatrixRef<Scalar>& x,
                                       const ConstRowMatrixRef<Scalar>& branch_output,
                                       const ConstRowMatrixRef<Scalar>& grad_x_next,
                                       const Options& options = {}) const {
    const char* function = "mhc::HyperConnection::merge_backward";
    return std::visit(
        [&](const auto& parameters) {
          detail::check_rule_inputs(function, parameters, x, options);
          return detail::merge_backward_step(function, parameters, x, mhc::compute_coefficients(parameters, x, options),
                                             branch_output, grad_x_next);
        },
        parameters_);
  }

  // Computes the second half of the backward, given the result of merge_backward() and
  // grad_branch_input (the gradient of h_in, T x C, from the branch's backward). Returns the total
  // gradient of x (merge + aggregation + coefficients, added in that order) and the parameter
  // gradients.
  Gradients prepare_branch_backward(const ConstRowMatrixRef<Scalar>& x, const MergeBackward<Scalar>& merged,
                                    const ConstRowMatrixRef<Scalar>& grad_branch_input,
                                    const Options& options = {}) const {
    const char* function = "mhc::HyperConnection::prepare_branch_backward";
    return std::visit(
        [&](const auto& parameters) {
          detail::check_rule_inputs(function, parameters, x, options);
          return to_gradients(
              detail::prepare_branch_backward_step(function, parameters, x, merged, grad_branch_input, options));
        },
        parameters_);
  }

  // Computes the backward of forward(x, branch, options) in one call, given grad_x_next (T x n*C).
  // Recomputes the coefficients and h_in, and reruns `branch` to get h_out, so `branch` must be
  // deterministic. branch_backward(h_in, grad_h_out) returns grad_h_in, and both arguments are
  // const RowMatrix<Scalar>& of T x C. A branch output or gradient of another shape throws. The
  // result equals merge_backward() followed by prepare_branch_backward().
  template <typename Branch, typename BranchBackward>
  Gradients backward(const ConstRowMatrixRef<Scalar>& x, const ConstRowMatrixRef<Scalar>& grad_x_next,
                     Branch&& branch, BranchBackward&& branch_backward, const Options& options = {}) const {
    const char* function = "mhc::HyperConnection::backward";
    return std::visit(
        [&](const auto& parameters) {
          detail::check_rule_inputs(function, parameters, x, options);
          return to_gradients(detail::backward_steps(function, parameters, x, grad_x_next,
                                                     std::forward<Branch>(branch),
                                                     std::forward<BranchBackward>(branch_backward), options));
        },
        parameters_);
  }

 private:
  template <typename ParametersType>
  static Gradients to_gradients(CoefficientsBackward<ParametersType> steps) {
    Gradients gradients;
    gradients.x = std::move(steps.x);
    gradients.parameters = std::move(steps.parameters);
    return gradients;
  }

  Rule parameters_;
};

}  // namespace mhc
