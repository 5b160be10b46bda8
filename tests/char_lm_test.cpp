// Tests of the character-level language model of examples/char_lm: gradients against central
// differences, and a short training run for every residual connection.
#include "../examples/char_lm/command_line.hpp"
#include "../examples/char_lm/svg_plot.hpp"
#include "../examples/char_lm/training.hpp"

#include "support.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <stdexcept>
#include <set>
#include <sstream>
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
  // eps * |loss| / h. With h = 1e-5 both stay near 1e-10 for a loss of about 5, so the
  // tolerance leaves a factor of about 1000 for larger third derivatives.
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

// An empty batch has zero loss and zero gradient for every connection, and a batch with a
// wrong context length is rejected.
TEST(CharLmModel, EmptyBatchAndBadBatch) {
  for (mhc::Connection connection : all_connections) {
    ModelConfig config;
    config.channels = 4;
    config.layers = 2;
    config.streams = 2;
    config.window = 3;
    config.connection = connection;
    Model<double> model(config, 1);
    Batch empty;
    empty.window = 3;
    const char_lm::Activations<double> activations = model.forward(empty);
    EXPECT_EQ(activations.loss, 0.0) << mhc::to_string(connection);
    Weights<double> gradient = model.backward(empty, activations);
    EXPECT_EQ(char_lm::AdamW<double>::global_norm(gradient), 0.0) << mhc::to_string(connection);

    Batch bad;
    bad.window = 3;
    bad.context = {'a', 'b'};
    bad.targets = {'c'};
    EXPECT_THROW(model.forward(bad), std::invalid_argument) << mhc::to_string(connection);
  }
}

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

TEST(CharLmTrain, RejectsInvalidOptions) {
  ModelConfig config;
  config.channels = 4;
  config.layers = 1;
  config.window = 2;
  Model<double> model(config, 1);
  const char_lm::Corpus corpus = char_lm::split_corpus(char_lm::generate_corpus(2000, 2), 0.1, config.window);
  char_lm::TrainingOptions options;
  options.eval_every = 0;
  EXPECT_THROW(char_lm::train(model, corpus, options, [](const char_lm::Evaluation&) {}), std::invalid_argument);
}

INSTANTIATE_TEST_SUITE_P(Connections, CharLmTraining, ::testing::ValuesIn(all_connections),
                         [](const ::testing::TestParamInfo<mhc::Connection>& info) {
                           return std::string(mhc::to_string(info.param));
                         });

// Parses `line` split at spaces, as the shell would pass it.
char_lm::Settings parse(const std::string& line) {
  std::vector<std::string> arguments;
  std::istringstream stream(line);
  for (std::string word; stream >> word;) arguments.push_back(word);
  return char_lm::parse_command_line(arguments);
}

// Returns the message of the UsageError that parsing `line` throws, or "" if it throws none.
std::string usage_error(const std::string& line) {
  try {
    parse(line);
  } catch (const char_lm::UsageError& error) {
    return error.what();
  }
  return "";
}

TEST(CharLmCommandLine, ParsesOptions) {
  const char_lm::Settings settings =
      parse("--connection all --steps 12 --lr=0.02 --streams 3 --width 8 --data in.txt --sample 5");
  EXPECT_EQ(settings.connections.size(), 5u);
  EXPECT_EQ(settings.training.steps, 12);
  EXPECT_DOUBLE_EQ(settings.training.learning_rate, 0.02);
  EXPECT_EQ(settings.model.streams, 3);
  EXPECT_EQ(settings.model.channels, 8);
  EXPECT_EQ(settings.data_path, "in.txt");
  EXPECT_EQ(settings.sample_bytes, 5);
  EXPECT_FALSE(settings.help);
}

TEST(CharLmCommandLine, RejectsInvalidInput) {
  EXPECT_EQ(usage_error("--bogus 1"), "unknown option '--bogus'");
  EXPECT_EQ(usage_error("--steps"), "missing value for --steps");
  EXPECT_EQ(usage_error("--steps 12x"), "invalid value for --steps: expected an integer, got '12x'");
  EXPECT_EQ(usage_error("--steps 0"), "invalid value for --steps: expected an integer in [1, 2147483647], got 0");
  EXPECT_EQ(usage_error("--lr nan"), "invalid value for --lr: expected a finite number, got 'nan'");
  EXPECT_EQ(usage_error("--lr -1"), "invalid value for --lr: expected a number > 0, got -1");
  EXPECT_EQ(usage_error("--validation 0.9"), "invalid value for --validation: expected a number > 0 and <= 0.5, got 0.9");
  EXPECT_EQ(usage_error("--connection hc"),
            "invalid value for --connection: expected residual, static_hc, dynamic_hc, mhc, mhc_lite or all, got 'hc'");
  EXPECT_EQ(usage_error("--connection mhc_lite --streams 7"),
            "invalid value for --streams: mhc_lite accepts at most 6 streams, got 7");
}

TEST(CharLmCorpus, MissingFileThrows) {
  EXPECT_THROW(char_lm::read_text_file("/nonexistent/char_lm_input.txt"), std::runtime_error);
}

TEST(CharLmCorpus, GeneratedTextIsDeterministic) {
  const std::string text = char_lm::generate_corpus(5000, 9);
  EXPECT_GE(text.size(), 5000u);
  EXPECT_EQ(text, char_lm::generate_corpus(5000, 9));
  EXPECT_NE(text, char_lm::generate_corpus(5000, 10));
}

TEST(CharLmCorpus, SplitRejectsShortText) {
  EXPECT_THROW(char_lm::split_corpus("abcdefghij", 0.1, 4), std::invalid_argument);
  const char_lm::Corpus corpus = char_lm::split_corpus(std::string(100, 'a'), 0.1, 4);
  EXPECT_EQ(corpus.train.size(), 90u);
  EXPECT_EQ(corpus.validation.size(), 10u);
}

TEST(CharLmCorpus, TaskContextIsNearestFirst) {
  Batch batch;
  batch.window = 3;
  char_lm::append_task(batch, "abcdef", 4);
  ASSERT_EQ(batch.context.size(), 3u);
  EXPECT_EQ(batch.context[0], 'd');
  EXPECT_EQ(batch.context[1], 'c');
  EXPECT_EQ(batch.context[2], 'b');
  ASSERT_EQ(batch.targets.size(), 1u);
  EXPECT_EQ(batch.targets[0], 'e');
}

// With bias correction, Adam's first step moves every weight by the learning rate against the
// sign of its gradient, whatever the gradient's size.
TEST(CharLmAdamW, FirstStepIsSignedLearningRate) {
  ModelConfig config;
  config.channels = 2;
  config.layers = 1;
  config.window = 1;
  config.connection = mhc::Connection::residual;
  Model<double> model(config, 1);
  Weights<double> before = model.weights();
  Weights<double> gradient = char_lm::zeros_like(before);
  gradient.output(0, 0) = 3.0;
  gradient.output(1, 5) = -1e-3;

  char_lm::AdamWOptions options;
  options.weight_decay = 0.0;
  options.clip_norm = 0.0;
  char_lm::AdamW<double> optimizer(model.weights(), options);
  const double norm = optimizer.step(model.weights(), gradient, 0.01);

  EXPECT_NEAR(norm, std::sqrt(9.0 + 1e-6), 1e-12);
  EXPECT_NEAR(model.weights().output(0, 0), before.output(0, 0) - 0.01 * 3.0 / (3.0 + 1e-8), 1e-12);
  // epsilon = 1e-8 in the denominator is not negligible next to |g| = 1e-3.
  EXPECT_NEAR(model.weights().output(1, 5), before.output(1, 5) + 0.01 * 1e-3 / (1e-3 + 1e-8), 1e-12);
  EXPECT_EQ(model.weights().output(1, 1), before.output(1, 1));
}

TEST(CharLmSvg, DrawsCurvesAndLegend) {
  char_lm::Panel panel{"Loss <nats>", "step", "loss", "", false, {}};
  panel.curves.push_back({"mhc", "#1f77b4", false, {{0, 5.5}, {10, 2.0}}});
  panel.curves.push_back({"hc", "#d62728", true, {{0, 5.5}, {10, std::nan("")}}});
  const std::string svg = char_lm::render_svg({panel});
  EXPECT_EQ(svg.rfind("<svg", 0), 0u);
  EXPECT_NE(svg.find("Loss &lt;nats&gt;"), std::string::npos);
  EXPECT_NE(svg.find(">mhc</text>"), std::string::npos);
  EXPECT_NE(svg.find(">hc</text>"), std::string::npos);
  EXPECT_NE(svg.find("stroke-dasharray"), std::string::npos);
  EXPECT_EQ(svg.find("nan"), std::string::npos);
}

}  // namespace
