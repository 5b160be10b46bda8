// mHC layer parameters in the layout of DeepSeek's published kernels, and their coefficient rule.
//
// Sources read: deepseek-ai/TileKernels, tile_kernels/modeling/mhc/functional.py (mhc_pre, whose
// defaults are post_mult_value = 1.0, pre_eps = sinkhorn_eps = norm_eps = 1e-6 and
// sinkhorn_repeat = 10), and the TileLang kernels tile_kernels/mhc/pre_split_mixes_kernel.py,
// sinkhorn_kernel.py and post_kernel.py of the same project, read in the jingqiny-99/TileKernels
// copy. Public copies of the DeepSeek-V4 inference code (Block.hc_pre, Block.hc_post and
// hc_split_sinkhorn) compute the same rule with a post multiplier of 2 and 20 Sinkhorn repeats.
// NOTE: those copies were read in third-party repositories, not in DeepSeek's own release.
//
// Their layout and rule, per token of x (n streams of C channels, vec(x) of n*C values):
//   fn    [n(n+2), n*C]  rows [pre (n) | post (n) | comb (n*n)]; fn = phi^T
//   scale [3]            (alpha_pre, alpha_post, alpha_res)
//   base  [n(n+2)]       the bias, same order as the rows of fn
//   mixes = vec(x) fn^T / sqrt(mean(vec(x)^2) + rms_epsilon)
//   pre   = sigmoid(scale[0] * mixes[pre] + base[pre]) + pre_epsilon
//   post  = post_multiplier * sigmoid(scale[1] * mixes[post] + base[post])
//   comb  = deepseek_sinkhorn(scale[2] * mixes[comb] + base[comb]), an n x n matrix in row-major
//           order whose row is the SOURCE stream and column the DESTINATION stream:
//           output stream o = post[o] * h_out + sum_s comb[s][o] * x[s].
// So comb = H_res^T: comb entry (s, o), logit column 2n + s*n + o of fn, is this library's
// H_res[o][s], phi column 2n + o*n + s.
#pragma once

#include <mhc/common.hpp>
#include <mhc/detail/layer_checks.hpp>
#include <mhc/detail/variants_checks.hpp>
#include <mhc/layer.hpp>

#include <cmath>

namespace mhc {

// One mHC layer's learned values as DeepSeek stores them.
template <typename Scalar>
struct DeepSeekParameters {
  using scalar_type = Scalar;

  int streams = 0;   // n, hc_mult in their code
  int channels = 0;  // C
  RowMatrix<Scalar> fn;           // n(n+2) x (n*C), rows [pre | post | comb (source-major)]
  RowVector<Scalar> scale;        // 3 entries: alpha_pre, alpha_post, alpha_res
  RowVector<Scalar> base;         // n(n+2) entries, same order as the rows of fn
  RowVector<Scalar> norm_weight;  // empty, or the n*C RMSNorm weight that multiplies vec(x)
};

// Settings of DeepSeek's coefficient rule. The defaults are those of the DeepSeek-V4 inference
// code; TileKernels' mhc_pre defaults to post_multiplier = 1 and sinkhorn_repeat = 10.
struct DeepSeekOptions {
  double rms_epsilon = 1e-6;       // norm_eps: mixes divide by sqrt(mean(vec(x)^2) + rms_epsilon)
  double pre_epsilon = 1e-6;       // added to sigmoid for H_pre
  double sinkhorn_epsilon = 1e-6;  // added after the softmax and to every normalising sum
  int sinkhorn_repeat = 20;        // at least 1: one column pass, then repeat - 1 (row, column) passes
  double post_multiplier = 2.0;    // H_post = post_multiplier * sigmoid
};

namespace detail {

template <typename Scalar>
void check_deepseek_parameters(const char* function, const DeepSeekParameters<Scalar>& parameters) {
  check_positive(function, "parameters.streams", parameters.streams);
  check_positive(function, "parameters.channels", parameters.channels);
  const int n = parameters.streams;
  const Eigen::Index width = Eigen::Index(n) * parameters.channels;
  check_shape(function, "parameters.fn", parameters.fn, n * (n + 2), width);
  check_size(function, "parameters.scale", parameters.scale, 3);
  check_size(function, "parameters.base", parameters.base, n * (n + 2));
  if (parameters.norm_weight.size() != 0 && parameters.norm_weight.size() != width) {
    throw_invalid_argument(function, "parameters.norm_weight", concat("0 or ", width, " entries (streams * channels)"),
                           concat(parameters.norm_weight.size(), " entries"));
  }
  for (int k = 0; k < 3; ++k) check_finite_scalar(function, "parameters.scale", parameters.scale(k));
}

inline void check_deepseek_options(const char* function, const DeepSeekOptions& options) {
  if (!(options.rms_epsilon > 0.0) || !std::isfinite(options.rms_epsilon)) {
    throw_invalid_argument(function, "options.rms_epsilon", "a positive finite value", concat(options.rms_epsilon));
  }
  if (!(options.pre_epsilon >= 0.0) || !std::isfinite(options.pre_epsilon)) {
    throw_invalid_argument(function, "options.pre_epsilon", "a finite value >= 0", concat(options.pre_epsilon));
  }
  if (!(options.sinkhorn_epsilon >= 0.0) || !std::isfinite(options.sinkhorn_epsilon)) {
    throw_invalid_argument(function, "options.sinkhorn_epsilon", "a finite value >= 0",
                           concat(options.sinkhorn_epsilon));
  }
  if (options.sinkhorn_repeat < 1) {
    throw_invalid_argument(function, "options.sinkhorn_repeat", "at least 1", concat(options.sinkhorn_repeat));
  }
  if (!std::isfinite(options.post_multiplier)) {
    throw_invalid_argument(function, "options.post_multiplier", "a finite value", concat(options.post_multiplier));
  }
}

// Position of the res logit (source s, destination o) among the n*n res entries: DeepSeek's comb
// is source-major, this library's H_res destination-major.
inline int deepseek_comb_index(int source, int destination, int streams) { return source * streams + destination; }
inline int library_res_index(int source, int destination, int streams) { return destination * streams + source; }

}  // namespace detail

// DeepSeek's Sinkhorn variant on an n x n matrix of logits in their orientation (row = source).
// It takes a softmax along each row and adds epsilon to every entry. Then it divides each column
// by (its sum + epsilon), and repeat - 1 more times divides each row by (its sum + epsilon) and
// then each column by (its sum + epsilon).
// Columns go last, so each destination's incoming weights sum to 1 up to epsilon. With
// epsilon = 0 this equals sinkhorn_knopp(logits^T) with repeat iterations, transposed.
template <typename Derived>
typename Derived::PlainObject deepseek_sinkhorn(const Eigen::MatrixBase<Derived>& logits, int repeat,
                                                 double epsilon) {
  using Matrix = typename Derived::PlainObject;
  using Scalar = typename Derived::Scalar;
  const char* function = "mhc::deepseek_sinkhorn";
  if (logits.rows() != logits.cols()) {
    detail::throw_invalid_argument(function, "logits", "a square matrix",
                                   detail::shape_string(logits.rows(), logits.cols()));
  }
  if (repeat < 1) detail::throw_invalid_argument(function, "repeat", "at least 1", detail::concat(repeat));
  const Scalar eps = static_cast<Scalar>(epsilon);

  Matrix matrix = (logits.colwise() - logits.rowwise().maxCoeff()).array().exp().matrix();
  matrix.array().colwise() /= matrix.rowwise().sum().array();
  matrix.array() += eps;
  matrix.array().rowwise() /= matrix.colwise().sum().array() + eps;
  for (int round = 1; round < repeat; ++round) {
    matrix.array().colwise() /= matrix.rowwise().sum().array() + eps;
    matrix.array().rowwise() /= matrix.colwise().sum().array() + eps;
  }
  return matrix;
}

// Computes the coefficients of every token of x (T x n*C) with DeepSeek's rule, returned in this
// library's convention (res row t is H_res = comb^T in row-major order), ready for merge_streams.
template <typename Scalar>
Coefficients<Scalar> compute_deepseek_coefficients(const DeepSeekParameters<Scalar>& parameters,
                                                   const ConstRowMatrixRef<Scalar>& x,
                                                   const DeepSeekOptions& options = {}) {
  const char* function = "mhc::compute_deepseek_coefficients";
  detail::check_deepseek_parameters(function, parameters);
  detail::check_deepseek_options(function, options);
  detail::check_state(function, "x", x, parameters.streams, parameters.channels);
  detail::check_finite_values(function, "x", x);

  const int n = parameters.streams;
  RowMatrix<Scalar> projections;  // T x n(n+2), one mix per row of fn
  if (parameters.norm_weight.size() == 0) {
    projections = x * parameters.fn.transpose();
  } else {
    projections = (x.array().rowwise() * parameters.norm_weight.array()).matrix() * parameters.fn.transpose();
  }

  Coefficients<Scalar> coefficients;
  coefficients.pre.resize(x.rows(), n);
  coefficients.post.resize(x.rows(), n);
  coefficients.res.resize(x.rows(), n * n);
  RowMatrix<Scalar> comb_logits(n, n);
  const Scalar pre_epsilon = static_cast<Scalar>(options.pre_epsilon);
  const Scalar post_multiplier = static_cast<Scalar>(options.post_multiplier);
  for (Eigen::Index t = 0; t < x.rows(); ++t) {
    const Scalar inverse_r = detail::inverse_rms<Scalar>(x.row(t), options.rms_epsilon);
    for (int i = 0; i < n; ++i) {
      const Scalar pre_logit = parameters.scale(0) * projections(t, i) * inverse_r + parameters.base(i);
      const Scalar post_logit = parameters.scale(1) * projections(t, n + i) * inverse_r + parameters.base(n + i);
      coefficients.pre(t, i) = detail::sigmoid(pre_logit) + pre_epsilon;
      coefficients.post(t, i) = post_multiplier * detail::sigmoid(post_logit);
    }
    for (int k = 0; k < n * n; ++k) {
      comb_logits.data()[k] = parameters.scale(2) * projections(t, 2 * n + k) * inverse_r + parameters.base(2 * n + k);
    }
    const RowMatrix<Scalar> comb = deepseek_sinkhorn(comb_logits, options.sinkhorn_repeat, options.sinkhorn_epsilon);
    Eigen::Map<RowMatrix<Scalar>>(coefficients.res.row(t).data(), n, n) = comb.transpose();
  }
  return coefficients;
}

// Converts DeepSeek's layout to Parameters<Scalar>: phi = fn^T with the res block transposed per
// token, and norm_weight, if present, folded into the rows of phi. The rules then agree when
// DeepSeekOptions has pre_epsilon = sinkhorn_epsilon = 0 and post_multiplier = 2.
template <typename Scalar>
Parameters<Scalar> to_parameters(const DeepSeekParameters<Scalar>& deepseek) {
  detail::check_deepseek_parameters("mhc::to_parameters", deepseek);
  const int n = deepseek.streams;
  Parameters<Scalar> parameters;
  parameters.streams = n;
  parameters.channels = deepseek.channels;
  parameters.phi.resize(deepseek.fn.cols(), deepseek.fn.rows());
  parameters.bias.resize(deepseek.base.size());
  for (int k = 0; k < 2 * n; ++k) {
    parameters.phi.col(k) = deepseek.fn.row(k).transpose();
    parameters.bias(k) = deepseek.base(k);
  }
  for (int source = 0; source < n; ++source) {
    for (int destination = 0; destination < n; ++destination) {
      const int from = 2 * n + detail::deepseek_comb_index(source, destination, n);
      const int to = 2 * n + detail::library_res_index(source, destination, n);
      parameters.phi.col(to) = deepseek.fn.row(from).transpose();
      parameters.bias(to) = deepseek.base(from);
    }
  }
  if (deepseek.norm_weight.size() != 0) {
    parameters.phi.array().colwise() *= deepseek.norm_weight.transpose().array();
  }
  parameters.alpha_pre = deepseek.scale(0);
  parameters.alpha_post = deepseek.scale(1);
  parameters.alpha_res = deepseek.scale(2);
  return parameters;
}

// Converts Parameters<Scalar> to DeepSeek's layout, without a norm_weight. Inverse of
// to_parameters for DeepSeek parameters without norm_weight.
template <typename Scalar>
DeepSeekParameters<Scalar> to_deepseek(const Parameters<Scalar>& parameters) {
  detail::check_parameters("mhc::to_deepseek", parameters);
  const int n = parameters.streams;
  DeepSeekParameters<Scalar> deepseek;
  deepseek.streams = n;
  deepseek.channels = parameters.channels;
  deepseek.fn.resize(parameters.phi.cols(), parameters.phi.rows());
  deepseek.base.resize(parameters.bias.size());
  for (int k = 0; k < 2 * n; ++k) {
    deepseek.fn.row(k) = parameters.phi.col(k).transpose();
    deepseek.base(k) = parameters.bias(k);
  }
  for (int source = 0; source < n; ++source) {
    for (int destination = 0; destination < n; ++destination) {
      const int from = 2 * n + detail::library_res_index(source, destination, n);
      const int to = 2 * n + detail::deepseek_comb_index(source, destination, n);
      deepseek.fn.row(to) = parameters.phi.col(from).transpose();
      deepseek.base(to) = parameters.bias(from);
    }
  }
  deepseek.scale.resize(3);
  deepseek.scale << parameters.alpha_pre, parameters.alpha_post, parameters.alpha_res;
  return deepseek;
}

// DeepSeek settings that reproduce `options` exactly: both epsilons 0, post multiplier 2 and
// sinkhorn_repeat = options.sinkhorn.iterations. Throws for a positive Sinkhorn tolerance,
// because DeepSeek's iteration has no early stop.
inline DeepSeekOptions to_deepseek_options(const Options& options) {
  const char* function = "mhc::to_deepseek_options";
  detail::check_options(function, options);
  if (options.sinkhorn.tolerance != 0.0) {
    detail::throw_invalid_argument(function, "options.sinkhorn.tolerance", "0 (DeepSeek's Sinkhorn has no early stop)",
                                   detail::concat(options.sinkhorn.tolerance));
  }
  if (options.sinkhorn.iterations < 1) {
    detail::throw_invalid_argument(function, "options.sinkhorn.iterations", "at least 1",
                                   detail::concat(options.sinkhorn.iterations));
  }
  DeepSeekOptions deepseek;
  deepseek.rms_epsilon = options.rms_epsilon;
  deepseek.pre_epsilon = 0.0;
  deepseek.sinkhorn_epsilon = 0.0;
  deepseek.sinkhorn_repeat = options.sinkhorn.iterations;
  deepseek.post_multiplier = 2.0;
  return deepseek;
}

// Options equivalent to DeepSeek settings. Throws unless both epsilons are 0 and the post
// multiplier is 2, because Options cannot express those differences. Settings with them need
// compute_deepseek_coefficients instead.
inline Options to_options(const DeepSeekOptions& deepseek) {
  const char* function = "mhc::to_options";
  detail::check_deepseek_options(function, deepseek);
  if (deepseek.pre_epsilon != 0.0) {
    detail::throw_invalid_argument(function, "deepseek.pre_epsilon", "0 (Options has no H_pre epsilon)",
                                   detail::concat(deepseek.pre_epsilon));
  }
  if (deepseek.sinkhorn_epsilon != 0.0) {
    detail::throw_invalid_argument(function, "deepseek.sinkhorn_epsilon", "0 (Options has no Sinkhorn epsilon)",
                                   detail::concat(deepseek.sinkhorn_epsilon));
  }
  if (deepseek.post_multiplier != 2.0) {
    detail::throw_invalid_argument(function, "deepseek.post_multiplier", "2 (the mHC rule fixes H_post = 2 sigmoid)",
                                   detail::concat(deepseek.post_multiplier));
  }
  Options options;
  options.rms_epsilon = deepseek.rms_epsilon;
  options.sinkhorn.iterations = deepseek.sinkhorn_repeat;
  options.sinkhorn.tolerance = 0.0;
  return options;
}

}  // namespace mhc
