// Tests of the character-level language model of examples/char_lm: gradients against central
// differences, and a short training run for every residual connection.
#include "../examples/char_lm/training.hpp"

#include "support.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <set>
#include <string>
#include <vector>

namespace {

using char_lm::Batch;
using char_lm::Model;
using char_lm::ModelConfig;
using char_lm::Weights;

const mhc::Connection all_connections[] = {mhc::Connection::residual, mhc::Connection::static_hc,
                                           mhc::Connection::dynamic_hc, mhc::Connection::mhc,
                                           mhc::Connection::mhc_lite};

// Adds N(0, scale^2) noise to every weight so that no gradient path sits at a special point
// (zero phi, exact identity coefficients, unit gains).
void perturb(Weights<double>& weights, double scale, std::uint32_t seed) {
  std::mt19937 generator(seed);
  std::normal_distribution<double> normal(0.0, scale);
  char_lm::for_each_tensor(weights, [&](const std::string&, double* data, Eigen::Index size, bool) {
    for (Eigen::Index i = 0; i < size; ++i) data[i] += normal(generator);
  });
}

class CharLmGradient : public ::testing::TestWithParam<mhc::Connection> {};

// Every gradient entry of a tiny double model matches a central difference of the loss. For
// the embedding only the rows of bytes in the batch are checked, because the other rows have
// zero gradient on both sides.
TEST_P(CharLmGradient, MatchesCentralDifferences) {
  ModelConfig config;
  config.channels = 3;
  config.layers = 2;
  config.streams = 3;
  config.window = 2;
  config.connection = GetParam();
  Model<double> model(config, 7);
  perturb(model.weights(), 0.3, 11);

  const std::string text = char_lm::generate_corpus(200, 5);
  std::mt19937 generator(3);
  const Batch batch = char_lm::sample_batch(text, config.window, 2, 3, generator);
  std::set<int> used_bytes(batch.context.begin(), batch.context.end());

  Weights<double> gradient = model.backward(batch, model.forward(batch));
  std::vector<double*> gradient_data;
  char_lm::for_each_tensor(gradient, [&](const std::string&, double* data, Eigen::Index, bool) {
    gradient_data.push_back(data);
  });

  // Central differences with step h have truncation error O(h^2) and rounding error about
  // eps * |loss| / h; h = 1e-5 balances both near 1e-10 for a loss of about 5.
  const double step = 1e-5;
  const double tolerance = 1e-7;
  std::size_t tensor = 0;
  int checked = 0;
  char_lm::for_each_tensor(model.weights(), [&](const std::string& name, double* data, Eigen::Index size, bool) {
    for (Eigen::Index i = 0; i < size; ++i) {
      if (name == "embedding" && used_bytes.count(static_cast<int>(i / config.channels)) == 0) continue;
      const double original = data[i];
      const double numeric = mhc::test::central_difference(
          [&](double offset) {
            data[i] = original + offset;
            return model.loss(batch);
          },
          step);
      data[i] = original;
      EXPECT_NEAR(gradient_data[tensor][i], numeric, tolerance * std::max(1.0, std::abs(numeric)))
          << name << "[" << i << "]";
      ++checked;
    }
    ++tensor;
  });
  EXPECT_GT(checked, 0);
}

INSTANTIATE_TEST_SUITE_P(Connections, CharLmGradient, ::testing::ValuesIn(all_connections),
                         [](const ::testing::TestParamInfo<mhc::Connection>& info) {
                           return std::string(mhc::to_string(info.param));
                         });

class CharLmTraining : public ::testing::TestWithParam<mhc::Connection> {};

// A few dozen AdamW steps on the generated corpus lower the validation loss well below its
// starting value of about ln(256) = 5.5 nats.
TEST_P(CharLmTraining, LossFalls) {
  ModelConfig config;
  config.channels = 16;
  config.layers = 2;
  config.streams = 4;
  config.window = 4;
  config.connection = GetParam();
  Model<double> model(config, 1);
  const char_lm::Corpus corpus = char_lm::split_corpus(char_lm::generate_corpus(20000, 2), 0.1, config.window);

  char_lm::TrainingOptions options;
  options.steps = 40;
  options.learning_rate = 1e-2;
  options.warmup_steps = 5;
  options.batch_sequences = 4;
  options.sequence_length = 16;
  options.eval_every = 40;
  options.eval_batches = 2;
  std::vector<char_lm::Evaluation> evaluations;
  char_lm::train(model, corpus, options, [&](const char_lm::Evaluation& e) { evaluations.push_back(e); });

  ASSERT_EQ(evaluations.size(), 2u);
  EXPECT_EQ(evaluations.back().step, 40);
  EXPECT_LT(evaluations.back().validation_loss, 0.75 * evaluations.front().validation_loss);
  EXPECT_LT(evaluations.back().train_loss, evaluations.front().train_loss);
  ASSERT_EQ(evaluations.back().gains.size(), 2u);
}

INSTANTIATE_TEST_SUITE_P(Connections, CharLmTraining, ::testing::ValuesIn(all_connections),
                         [](const ::testing::TestParamInfo<mhc::Connection>& info) {
                           return std::string(mhc::to_string(info.param));
                         });

}  // namespace
