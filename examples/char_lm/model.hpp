// A small byte-level language model whose layers are joined by one of the library's residual
// connections, with its forward pass, cross-entropy loss and hand-written backward pass.
//
// For T prediction tasks (see Batch), C channels, n streams and a context window of k bytes:
//   context   T x (k*C)   the embeddings of the k previous bytes, nearest first
//   h0        T x C       context * context_weight: a learned mixing of the window
//   x0        T x (n*C)   h0 copied into every stream (mhc::expand_streams)
//   layer l   x_{l+1} = H_res x_l + H_post^T F_l(H_pre x_l), with the MLP branch
//             F_l(h) = GELU(RMSNorm(h) up + up_bias) down + down_bias   (C -> 4C -> C)
//   y         T x C       sum of the streams of x_L (mhc::reduce_streams)
//   logits    T x 256     RMSNorm(y) output + output_bias
//   loss                  mean cross-entropy of the target bytes, in nats
#pragma once

#include "connection.hpp"
#include "corpus.hpp"

#include <mhc/streams.hpp>
#include <mhc/variants.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace char_lm {

inline constexpr int vocabulary_size = 256;  // one token per byte value

// Shape of the model and its residual connection.
struct ModelConfig {
  int channels = 64;  // C
  int layers = 4;     // L
  int streams = 4;    // n, except that the plain residual connection always uses 1
  int window = 8;     // k, previous bytes visible to each prediction
  mhc::Connection connection = mhc::Connection::mhc;

  int hidden() const { return 4 * channels; }
  int effective_streams() const { return connection == mhc::Connection::residual ? 1 : streams; }
};

// Learned values of one layer: the MLP branch and the residual connection around it.
template <typename Scalar>
struct LayerWeights {
  RowVector<Scalar> norm_gain;  // C, RMSNorm weight of the branch input
  RowMatrix<Scalar> up;         // C x 4C
  RowVector<Scalar> up_bias;    // 4C
  RowMatrix<Scalar> down;       // 4C x C
  RowVector<Scalar> down_bias;  // C
  ConnectionParameters<Scalar> connection;
};

// Learned values of the whole model. A gradient has the same type and shapes.
template <typename Scalar>
struct Weights {
  RowMatrix<Scalar> embedding;       // 256 x C
  RowMatrix<Scalar> context_weight;  // (k*C) x C
  std::vector<LayerWeights<Scalar>> layers;
  RowVector<Scalar> final_gain;   // C, RMSNorm weight before the output projection
  RowMatrix<Scalar> output;       // C x 256
  RowVector<Scalar> output_bias;  // 256
};

// Calls visit(name, data, size, decay) for every learned tensor, always in the same order, so
// that walking a model and its gradient side by side pairs each tensor with its gradient.
template <typename Scalar, typename Visitor>
void for_each_tensor(Weights<Scalar>& weights, Visitor&& visit) {
  const auto tensor = [&](const std::string& name, auto& values, bool decay) {
    visit(name, values.data(), values.size(), decay);
  };
  tensor("embedding", weights.embedding, true);
  tensor("context_weight", weights.context_weight, true);
  for (std::size_t l = 0; l < weights.layers.size(); ++l) {
    LayerWeights<Scalar>& layer = weights.layers[l];
    const std::string prefix = "layer" + std::to_string(l) + ".";
    tensor(prefix + "norm_gain", layer.norm_gain, false);
    tensor(prefix + "up", layer.up, true);
    tensor(prefix + "up_bias", layer.up_bias, false);
    tensor(prefix + "down", layer.down, true);
    tensor(prefix + "down_bias", layer.down_bias, false);
    for_each_tensor<Scalar>(layer.connection, [&](const char* name, Scalar* data, Eigen::Index size, bool decay) {
      visit(prefix + "connection." + name, data, size, decay);
    });
  }
  tensor("final_gain", weights.final_gain, false);
  tensor("output", weights.output, true);
  tensor("output_bias", weights.output_bias, false);
}

// Returns a copy of `weights` with every learned value set to zero: an empty gradient.
template <typename Scalar>
Weights<Scalar> zeros_like(const Weights<Scalar>& weights) {
  Weights<Scalar> zeros = weights;
  for_each_tensor(zeros, [](const std::string&, Scalar* data, Eigen::Index size, bool) {
    std::fill(data, data + size, Scalar(0));
  });
  return zeros;
}

namespace detail {

template <typename Scalar>
RowMatrix<Scalar> gaussian(Eigen::Index rows, Eigen::Index cols, double deviation, std::mt19937& generator) {
  std::normal_distribution<double> normal(0.0, deviation);
  RowMatrix<Scalar> matrix(rows, cols);
  for (Eigen::Index i = 0; i < matrix.size(); ++i) matrix.data()[i] = static_cast<Scalar>(normal(generator));
  return matrix;
}

inline void check_config(const ModelConfig& config) {
  const auto require_positive = [](const char* name, int value) {
    if (value < 1) {
      throw std::invalid_argument(std::string("char_lm::initial_weights: invalid config.") + name +
                                  ": expected at least 1, got " + std::to_string(value));
    }
  };
  require_positive("channels", config.channels);
  require_positive("layers", config.layers);
  require_positive("streams", config.streams);
  require_positive("window", config.window);
}

}  // namespace detail

// Draws the initial weights from `seed`. The embedding has deviation 1 and each projection
// matrix 1 / sqrt(fan-in), so activations start near unit RMS. The branch's down projection is
// further scaled by 1 / sqrt(2 L) so that the residual stream does not grow with depth. Every
// connection starts as its rule's identity-like initialisation reading stream l mod n.
template <typename Scalar>
Weights<Scalar> initial_weights(const ModelConfig& config, std::uint32_t seed) {
  detail::check_config(config);
  const int c = config.channels;
  const int n = config.effective_streams();
  std::mt19937 generator(seed);

  Weights<Scalar> weights;
  weights.embedding = detail::gaussian<Scalar>(vocabulary_size, c, 1.0, generator);
  weights.context_weight = detail::gaussian<Scalar>(Eigen::Index(config.window) * c, c,
                                                    1.0 / std::sqrt(double(config.window) * c), generator);
  for (int l = 0; l < config.layers; ++l) {
    LayerWeights<Scalar> layer;
    layer.norm_gain.setOnes(c);
    layer.up = detail::gaussian<Scalar>(c, config.hidden(), 1.0 / std::sqrt(double(c)), generator);
    layer.up_bias.setZero(config.hidden());
    layer.down = detail::gaussian<Scalar>(config.hidden(), c,
                                          1.0 / std::sqrt(double(config.hidden()) * 2.0 * config.layers), generator);
    layer.down_bias.setZero(c);
    layer.connection = mhc::HyperConnection<Scalar>::create(config.connection, n, c, l).parameters();
    weights.layers.push_back(std::move(layer));
  }
  weights.final_gain.setOnes(c);
  weights.output = detail::gaussian<Scalar>(c, vocabulary_size, 1.0 / std::sqrt(double(c)), generator);
  weights.output_bias.setZero(vocabulary_size);
  return weights;
}

// Values of one layer's forward pass that its backward pass reads.
template <typename Scalar>
struct LayerActivations {
  RowMatrix<Scalar> state;  // x_l, T x (n*C)
  mhc::Coefficients<Scalar> coefficients;
  RowMatrix<Scalar> normalized;        // h_in / rms(h_in), T x C, before the gain
  RowVector<Scalar> inverse_rms;       // T
  RowMatrix<Scalar> hidden;            // before GELU, T x 4C
  RowMatrix<Scalar> activated;         // GELU(hidden)
  RowMatrix<Scalar> branch_output;     // h_out, T x C
};

// Values of the model's forward pass that its backward pass reads, and the loss.
template <typename Scalar>
struct Activations {
  RowMatrix<Scalar> context;  // T x (k*C)
  std::vector<LayerActivations<Scalar>> layers;
  RowMatrix<Scalar> final_normalized;  // T x C
  RowVector<Scalar> final_inverse_rms;  // T
  RowMatrix<Scalar> probabilities;     // softmax of the logits, T x 256
  double loss = 0.0;                   // mean cross-entropy in nats
};

namespace detail {

inline constexpr double rms_epsilon = 1e-6;

// RMSNorm without its gain: writes x / sqrt(mean(x^2) + epsilon) row by row and the inverse RMS.
template <typename Scalar>
void normalize_rows(const RowMatrix<Scalar>& x, RowMatrix<Scalar>& normalized, RowVector<Scalar>& inverse_rms) {
  inverse_rms.resize(x.rows());
  normalized.resize(x.rows(), x.cols());
  for (Eigen::Index t = 0; t < x.rows(); ++t) {
    const Scalar mean_square = x.row(t).squaredNorm() / Scalar(x.cols());
    inverse_rms(t) = Scalar(1) / std::sqrt(mean_square + Scalar(rms_epsilon));
    normalized.row(t) = x.row(t) * inverse_rms(t);
  }
}

// Backward of y = normalized * diag(gain): accumulates the gain gradient and returns dx.
// With n = x * s, s = 1 / rms: dx = s * (dn - n * mean(dn .* n)) where dn = dy * diag(gain).
template <typename Scalar>
RowMatrix<Scalar> normalize_rows_backward(const RowMatrix<Scalar>& normalized, const RowVector<Scalar>& inverse_rms,
                                          const RowVector<Scalar>& gain, const RowMatrix<Scalar>& grad_output,
                                          RowVector<Scalar>& grad_gain) {
  grad_gain += (grad_output.array() * normalized.array()).colwise().sum().matrix();
  const RowMatrix<Scalar> grad_normalized = grad_output * gain.asDiagonal();
  RowMatrix<Scalar> grad_x(normalized.rows(), normalized.cols());
  for (Eigen::Index t = 0; t < normalized.rows(); ++t) {
    const Scalar mean_inner = grad_normalized.row(t).dot(normalized.row(t)) / Scalar(normalized.cols());
    grad_x.row(t) = inverse_rms(t) * (grad_normalized.row(t) - mean_inner * normalized.row(t));
  }
  return grad_x;
}

inline constexpr double inverse_sqrt2 = 0.70710678118654752440;     // 1 / sqrt(2)
inline constexpr double inverse_sqrt_2pi = 0.39894228040143267794;  // 1 / sqrt(2 pi)

// Exact GELU, x * Phi(x) with Phi the standard normal CDF, and its derivative Phi(x) + x * phi(x).
template <typename Scalar>
Scalar gelu(Scalar x) {
  return Scalar(0.5) * x * (Scalar(1) + std::erf(x * Scalar(inverse_sqrt2)));
}

template <typename Scalar>
Scalar gelu_derivative(Scalar x) {
  const Scalar cdf = Scalar(0.5) * (Scalar(1) + std::erf(x * Scalar(inverse_sqrt2)));
  const Scalar pdf = Scalar(inverse_sqrt_2pi) * std::exp(Scalar(-0.5) * x * x);
  return cdf + x * pdf;
}

}  // namespace detail

// The model: its configuration, weights and the options of its residual connections.
template <typename Scalar>
class Model {
 public:
  Model(const ModelConfig& config, std::uint32_t seed)
      : config_(config), weights_(initial_weights<Scalar>(config, seed)) {}

  const ModelConfig& config() const { return config_; }
  Weights<Scalar>& weights() { return weights_; }
  const Weights<Scalar>& weights() const { return weights_; }

  // Runs the model on `batch` and returns the activations and the mean cross-entropy. An empty
  // batch has loss 0 and no layer activations.
  Activations<Scalar> forward(const Batch& batch) const {
    check_batch(batch);
    const int c = config_.channels;
    const int n = config_.effective_streams();
    const auto tokens = static_cast<Eigen::Index>(batch.size());

    Activations<Scalar> activations;
    // An empty batch returns here: column blocks of the model's empty matrices would offset
    // their null data pointers, which UndefinedBehaviorSanitizer rejects.
    if (tokens == 0) return activations;
    activations.context.resize(tokens, Eigen::Index(config_.window) * c);
    for (Eigen::Index t = 0; t < tokens; ++t) {
      for (int j = 0; j < config_.window; ++j) {
        const unsigned char byte = batch.context[static_cast<std::size_t>(t * config_.window + j)];
        activations.context.block(t, Eigen::Index(j) * c, 1, c) = weights_.embedding.row(byte);
      }
    }
    RowMatrix<Scalar> state = mhc::expand_streams(activations.context * weights_.context_weight, n);

    for (const LayerWeights<Scalar>& layer : weights_.layers) {
      LayerActivations<Scalar> cache;
      state = layer_forward(layer, std::move(state), cache);
      activations.layers.push_back(std::move(cache));
    }

    const RowMatrix<Scalar> reduced = mhc::reduce_streams(state, n);
    detail::normalize_rows(reduced, activations.final_normalized, activations.final_inverse_rms);
    RowMatrix<Scalar> logits = activations.final_normalized * weights_.final_gain.asDiagonal() * weights_.output;
    logits.rowwise() += weights_.output_bias;
    activations.loss = softmax_cross_entropy(logits, batch.targets, activations.probabilities);
    return activations;
  }

  // Returns the mean cross-entropy of the model on `batch`, in nats.
  double loss(const Batch& batch) const { return forward(batch).loss; }

  // Returns the gradient of the mean cross-entropy with respect to every weight, given the
  // activations of forward(batch). An empty batch gives a zero gradient.
  Weights<Scalar> backward(const Batch& batch, const Activations<Scalar>& activations) const {
    check_batch(batch);
    if (batch.size() == 0) return zeros_like(weights_);
    if (activations.layers.size() != weights_.layers.size() ||
        activations.probabilities.rows() != static_cast<Eigen::Index>(batch.size())) {
      throw std::invalid_argument("char_lm::Model::backward: invalid activations: expected those of forward(batch) "
                                  "with " + std::to_string(weights_.layers.size()) + " layers and " +
                                  std::to_string(batch.size()) + " tokens, got " +
                                  std::to_string(activations.layers.size()) + " layers and " +
                                  std::to_string(activations.probabilities.rows()) + " tokens");
    }
    const int c = config_.channels;
    const int n = config_.effective_streams();
    const auto tokens = static_cast<Eigen::Index>(batch.size());
    Weights<Scalar> gradient = zeros_like(weights_);

    // d loss / d logits = (softmax - one_hot(target)) / T.
    RowMatrix<Scalar> grad_logits = activations.probabilities;
    for (Eigen::Index t = 0; t < tokens; ++t) grad_logits(t, batch.targets[static_cast<std::size_t>(t)]) -= Scalar(1);
    grad_logits /= Scalar(tokens);

    const RowMatrix<Scalar> final_output = activations.final_normalized * weights_.final_gain.asDiagonal();
    gradient.output.noalias() = final_output.transpose() * grad_logits;
    gradient.output_bias = grad_logits.colwise().sum();
    const RowMatrix<Scalar> grad_final_output = grad_logits * weights_.output.transpose();
    const RowMatrix<Scalar> grad_reduced =
        detail::normalize_rows_backward(activations.final_normalized, activations.final_inverse_rms,
                                        weights_.final_gain, grad_final_output, gradient.final_gain);

    // The reduction sums the streams, so every stream receives the full gradient.
    RowMatrix<Scalar> grad_state = mhc::expand_streams(grad_reduced, n);
    for (std::size_t l = weights_.layers.size(); l-- > 0;) {
      grad_state = layer_backward(weights_.layers[l], activations.layers[l], grad_state, gradient.layers[l]);
    }

    // The expansion copies h0 into every stream, so h0 receives the sum of the stream gradients.
    const RowMatrix<Scalar> grad_h0 = mhc::reduce_streams(grad_state, n);
    gradient.context_weight.noalias() = activations.context.transpose() * grad_h0;
    const RowMatrix<Scalar> grad_context = grad_h0 * weights_.context_weight.transpose();
    for (Eigen::Index t = 0; t < tokens; ++t) {
      for (int j = 0; j < config_.window; ++j) {
        const unsigned char byte = batch.context[static_cast<std::size_t>(t * config_.window + j)];
        gradient.embedding.row(byte) += grad_context.block(t, Eigen::Index(j) * c, 1, c);
      }
    }
    return gradient;
  }

  // Returns the per-layer mixing matrices H_res (each T x n*n) of a forward pass, for mhc::layer_gains.
  static std::vector<RowMatrix<Scalar>> mixing_matrices(const Activations<Scalar>& activations) {
    std::vector<RowMatrix<Scalar>> matrices;
    for (const LayerActivations<Scalar>& layer : activations.layers) matrices.push_back(layer.coefficients.res);
    return matrices;
  }

 private:
  void check_batch(const Batch& batch) const {
    if (batch.window != config_.window ||
        batch.context.size() != batch.targets.size() * static_cast<std::size_t>(config_.window)) {
      throw std::invalid_argument("char_lm::Model: invalid batch: expected a context window of " +
                                  std::to_string(config_.window) + " bytes per target, got a window of " +
                                  std::to_string(batch.window) + " and " + std::to_string(batch.context.size()) +
                                  " context bytes for " + std::to_string(batch.targets.size()) + " targets");
    }
  }

  // Runs one layer on `state` (x_l) and returns x_{l+1}, keeping what the backward pass needs.
  RowMatrix<Scalar> layer_forward(const LayerWeights<Scalar>& layer, RowMatrix<Scalar> state,
                                  LayerActivations<Scalar>& cache) const {
    mhc::BranchInput<Scalar> prepared = std::visit(
        [&](const auto& rule) {
          mhc::BranchInput<Scalar> result;
          result.coefficients = mhc::compute_coefficients(rule, state, options_);
          result.input = mhc::aggregate_streams<Scalar>(result.coefficients, state);
          return result;
        },
        layer.connection);

    detail::normalize_rows(prepared.input, cache.normalized, cache.inverse_rms);
    cache.hidden = cache.normalized * layer.norm_gain.asDiagonal() * layer.up;
    cache.hidden.rowwise() += layer.up_bias;
    cache.activated = cache.hidden.unaryExpr([](Scalar value) { return detail::gelu(value); });
    cache.branch_output = cache.activated * layer.down;
    cache.branch_output.rowwise() += layer.down_bias;

    RowMatrix<Scalar> next = mhc::merge_streams<Scalar>(prepared.coefficients, state, cache.branch_output);
    cache.coefficients = std::move(prepared.coefficients);
    cache.state = std::move(state);
    return next;
  }

  // Returns the gradient of x_l given that of x_{l+1}, and writes the layer's weight gradients.
  RowMatrix<Scalar> layer_backward(const LayerWeights<Scalar>& layer, const LayerActivations<Scalar>& cache,
                                   const RowMatrix<Scalar>& grad_next, LayerWeights<Scalar>& gradient) const {
    const auto branch_backward = [&](const RowMatrix<Scalar>& grad_branch_output) {
      gradient.down.noalias() = cache.activated.transpose() * grad_branch_output;
      gradient.down_bias = grad_branch_output.colwise().sum();
      const RowMatrix<Scalar> grad_activated = grad_branch_output * layer.down.transpose();
      const RowMatrix<Scalar> grad_hidden =
          grad_activated.cwiseProduct(cache.hidden.unaryExpr([](Scalar value) { return detail::gelu_derivative(value); }));
      const RowMatrix<Scalar> branch_normalized = cache.normalized * layer.norm_gain.asDiagonal();
      gradient.up.noalias() = branch_normalized.transpose() * grad_hidden;
      gradient.up_bias = grad_hidden.colwise().sum();
      const RowMatrix<Scalar> grad_branch_normalized = grad_hidden * layer.up.transpose();
      return detail::normalize_rows_backward(cache.normalized, cache.inverse_rms, layer.norm_gain,
                                             grad_branch_normalized, gradient.norm_gain);
    };
    ConnectionGradients<Scalar> result = connection_backward<Scalar>(
        layer.connection, cache.state, cache.coefficients, cache.branch_output, grad_next, branch_backward, options_);
    gradient.connection = std::move(result.parameters);
    return std::move(result.x);
  }

  // Writes the softmax of each row into `probabilities` and returns the mean of
  // -log(probability of the target).
  static double softmax_cross_entropy(const RowMatrix<Scalar>& logits, const std::vector<unsigned char>& targets,
                                      RowMatrix<Scalar>& probabilities) {
    probabilities.resize(logits.rows(), logits.cols());
    double total = 0.0;
    for (Eigen::Index t = 0; t < logits.rows(); ++t) {
      const Scalar maximum = logits.row(t).maxCoeff();
      probabilities.row(t) = (logits.row(t).array() - maximum).exp().matrix();
      const Scalar sum = probabilities.row(t).sum();
      probabilities.row(t) /= sum;
      const Scalar target_logit = logits(t, targets[static_cast<std::size_t>(t)]);
      total += static_cast<double>(maximum + std::log(sum) - target_logit);
    }
    return logits.rows() == 0 ? 0.0 : total / static_cast<double>(logits.rows());
  }

  ModelConfig config_;
  Weights<Scalar> weights_;
  mhc::Options options_;
};

}  // namespace char_lm
