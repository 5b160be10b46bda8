// Training loop, evaluation and sampling for the character model.
#pragma once

#include "adamw.hpp"
#include "corpus.hpp"
#include "model.hpp"

#include <mhc/diagnostics.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <functional>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

namespace char_lm {

struct TrainingOptions {
  int steps = 1000;
  double learning_rate = 3e-3;  // peak, after the warmup
  int warmup_steps = 100;       // linear warmup, followed by a cosine decay to 10 % of the peak
  int batch_sequences = 16;     // runs of consecutive tasks per batch
  int sequence_length = 64;     // tasks per run
  int eval_every = 100;         // steps between evaluations, which also run before step 1 and after the last
  int eval_batches = 4;         // fixed validation batches per evaluation
  std::uint32_t seed = 1;       // batch order
  AdamWOptions adamw;
};

// One evaluation of a run.
struct Evaluation {
  int step = 0;
  // Mean training loss over the steps since the previous evaluation. Before step 1 it is the
  // loss on eval_batches fixed training batches.
  double train_loss = 0.0;
  double validation_loss = 0.0;  // mean over the fixed validation batches, in nats per byte
  std::vector<mhc::LayerGain> gains;  // of H_res per layer, averaged over the first validation batch
  double tokens_per_second = 0.0;     // training steps only, since the start of the run
  double elapsed_seconds = 0.0;       // including evaluations
  double remaining_seconds = 0.0;     // estimate from the mean elapsed time per step so far
};

// Learning rate at `step` (1-based) of `steps`: linear warmup, then cosine decay to 10 %.
inline double learning_rate_at(const TrainingOptions& options, int step) {
  const int warmup = std::min(options.warmup_steps, options.steps);
  if (step <= warmup) return options.learning_rate * step / std::max(warmup, 1);
  const double progress = double(step - warmup) / std::max(options.steps - warmup, 1);
  const double cosine = 0.5 * (1.0 + std::cos(3.14159265358979323846 * progress));
  return options.learning_rate * (0.1 + 0.9 * cosine);
}

// Returns the mean loss over `batches`, and the per-layer gains of the first batch in `gains`.
template <typename Scalar>
double evaluate(const Model<Scalar>& model, const std::vector<Batch>& batches, std::vector<mhc::LayerGain>* gains) {
  double total = 0.0;
  for (std::size_t b = 0; b < batches.size(); ++b) {
    const Activations<Scalar> activations = model.forward(batches[b]);
    total += activations.loss;
    if (b == 0 && gains != nullptr) *gains = mhc::layer_gains(Model<Scalar>::mixing_matrices(activations));
  }
  return batches.empty() ? 0.0 : total / static_cast<double>(batches.size());
}

namespace detail {

inline void check_training_options(const TrainingOptions& options) {
  const auto require = [](bool valid, const char* name, const std::string& expected, double actual) {
    if (!valid) {
      throw std::invalid_argument(std::string("char_lm::train: invalid options.") + name + ": expected " + expected +
                                  ", got " + mhc::detail::concat(actual));
    }
  };
  require(options.steps >= 0, "steps", "at least 0", options.steps);
  require(options.learning_rate > 0.0, "learning_rate", "a positive value", options.learning_rate);
  require(options.warmup_steps >= 0, "warmup_steps", "at least 0", options.warmup_steps);
  require(options.batch_sequences >= 1, "batch_sequences", "at least 1", options.batch_sequences);
  require(options.sequence_length >= 1, "sequence_length", "at least 1", options.sequence_length);
  require(options.eval_every >= 1, "eval_every", "at least 1", options.eval_every);
  require(options.eval_batches >= 1, "eval_batches", "at least 1", options.eval_batches);
}

}  // namespace detail

// Trains `model` on corpus.train for options.steps steps with AdamW and calls on_evaluation
// before the first step, every options.eval_every steps and after the last step.
template <typename Scalar>
void train(Model<Scalar>& model, const Corpus& corpus, const TrainingOptions& options,
           const std::function<void(const Evaluation&)>& on_evaluation) {
  detail::check_training_options(options);
  const int window = model.config().window;
  const std::vector<Batch> validation =
      evaluation_batches(corpus.validation, window, options.batch_sequences, options.sequence_length,
                         options.eval_batches);
  std::mt19937 generator(options.seed);
  AdamW<Scalar> optimizer(model.weights(), options.adamw);
  const auto start = std::chrono::steady_clock::now();
  const double tokens_per_step = double(options.batch_sequences) * options.sequence_length;

  double training_seconds = 0.0;
  double train_loss_sum = 0.0;
  int train_loss_count = 0;
  const auto report = [&](int step) {
    Evaluation evaluation;
    evaluation.step = step;
    if (train_loss_count > 0) {
      evaluation.train_loss = train_loss_sum / train_loss_count;
    } else {
      evaluation.train_loss = evaluate(model, evaluation_batches(corpus.train, window, options.batch_sequences,
                                                                 options.sequence_length, options.eval_batches),
                                       nullptr);
    }
    evaluation.validation_loss = evaluate(model, validation, &evaluation.gains);
    evaluation.elapsed_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (step > 0) {
      evaluation.tokens_per_second = tokens_per_step * step / training_seconds;
      evaluation.remaining_seconds = evaluation.elapsed_seconds / step * (options.steps - step);
    }
    train_loss_sum = 0.0;
    train_loss_count = 0;
    on_evaluation(evaluation);
  };

  report(0);
  for (int step = 1; step <= options.steps; ++step) {
    const auto step_start = std::chrono::steady_clock::now();
    const Batch batch =
        sample_batch(corpus.train, window, options.batch_sequences, options.sequence_length, generator);
    const Activations<Scalar> activations = model.forward(batch);
    Weights<Scalar> gradient = model.backward(batch, activations);
    optimizer.step(model.weights(), gradient, learning_rate_at(options, step));
    training_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - step_start).count();
    train_loss_sum += activations.loss;
    ++train_loss_count;
    if (step % options.eval_every == 0 || step == options.steps) report(step);
  }
}

// Returns `count` bytes sampled from the model after `prompt`, one at a time. A `temperature`
// below 1 sharpens the distribution and must be positive. A prompt shorter than the context
// window is padded on the left with spaces.
template <typename Scalar>
std::string sample_text(const Model<Scalar>& model, const std::string& prompt, int count, double temperature,
                        std::uint32_t seed) {
  const int window = model.config().window;
  std::string text = std::string(static_cast<std::size_t>(std::max(0, window - int(prompt.size()))), ' ') + prompt;
  std::mt19937 generator(seed);
  std::string continuation;
  for (int i = 0; i < count; ++i) {
    Batch batch;
    batch.window = window;
    append_task(batch, text + ' ', text.size());  // the appended byte is a placeholder target
    const Activations<Scalar> activations = model.forward(batch);

    Eigen::ArrayXd weights = activations.probabilities.row(0).transpose().template cast<double>();
    weights = (weights.max(1e-30).log() / temperature).eval();
    weights = (weights - weights.maxCoeff()).exp();
    const double threshold = weights.sum() * (double(generator()) / 4294967296.0);
    double cumulative = 0.0;
    int byte = vocabulary_size - 1;
    for (int k = 0; k < vocabulary_size; ++k) {
      cumulative += weights(k);
      if (cumulative > threshold) {
        byte = k;
        break;
      }
    }
    text += static_cast<char>(byte);
    continuation += static_cast<char>(byte);
  }
  return continuation;
}

}  // namespace char_lm
