// Command-line options of the char_lm example and their validation.
#pragma once

#include "model.hpp"
#include "svg_plot.hpp"
#include "training.hpp"

#include <mhc/variants.hpp>

#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

namespace char_lm {

// Invalid command-line input. The message names the option, the value and what is expected.
class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct Settings {
  std::vector<mhc::Connection> connections = {mhc::Connection::mhc};
  ModelConfig model;
  TrainingOptions training;
  std::string data_path;      // empty: generate the corpus
  std::size_t corpus_bytes = 400000;
  double validation_fraction = 0.1;
  int threads = 1;
  int sample_bytes = 0;
  double temperature = 0.8;
  std::string csv_path;
  std::string svg_path;
  bool help = false;
};

inline const char* usage_text() {
  return R"(Usage: char_lm [options]

Trains a byte-level language model whose layers are joined by the chosen residual connection
and prints the training and validation loss (cross-entropy in nats per byte) as it goes.

Model:
  --connection NAME    residual, static_hc, dynamic_hc, mhc, mhc_lite, or all to train
                       each in turn (default mhc); residual always uses 1 stream
  --streams N          residual streams n (default 4; mhc_lite accepts at most 6)
  --layers N           layers L (default 4)
  --width N            channels C (default 64); the MLP branch is C -> 4C -> C
  --window N           previous bytes each prediction sees (default 8)
Training:
  --steps N            AdamW steps per connection (default 1000)
  --lr X               peak learning rate (default 0.003), after a linear warmup
  --warmup N           warmup steps (default 100), then a cosine decay to 10 % of the peak
  --weight-decay X     AdamW decoupled weight decay on weight matrices (default 0.1)
  --clip X             maximum global gradient norm, 0 to disable (default 1)
  --batch N            sequences per batch (default 16)
  --sequence N         consecutive predictions per sequence (default 64)
  --seed N             seed of the initial weights, batch order and sampling (default 1)
  --threads N          Eigen threads for matrix products (default 1); needs an OpenMP build
Data and output:
  --data PATH          text file to train on (default: a generated corpus of sentences)
  --corpus-bytes N     size of the generated corpus in bytes (default 400000)
  --validation X       fraction of the text held out for validation (default 0.1)
  --eval-every N       steps between validation evaluations (default 100)
  --eval-batches N     fixed validation batches per evaluation (default 4)
  --sample N           after training, print N bytes sampled from the model (default 0)
  --temperature X      sampling temperature, greater than 0 (default 0.8)
  --csv PATH           write every evaluation: connection, step, losses, per-layer gains
  --svg PATH           write the loss curves (and the H_res gains) of all connections run
  --help               print this text
)";
}

namespace detail {

inline long long parse_integer(const std::string& option, const std::string& text, long long minimum,
                               long long maximum) {
  errno = 0;
  char* end = nullptr;
  const long long value = std::strtoll(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || errno == ERANGE) {
    throw UsageError("invalid value for " + option + ": expected an integer, got '" + text + "'");
  }
  if (value < minimum || value > maximum) {
    throw UsageError("invalid value for " + option + ": expected an integer in [" + std::to_string(minimum) + ", " +
                     std::to_string(maximum) + "], got " + text);
  }
  return value;
}

// Parses a finite number greater than `minimum` (or equal to it when `inclusive`).
inline double parse_number(const std::string& option, const std::string& text, double minimum, bool inclusive,
                           double maximum = 1e300) {
  errno = 0;
  char* end = nullptr;
  const double value = std::strtod(text.c_str(), &end);
  if (text.empty() || *end != '\0' || errno == ERANGE || !std::isfinite(value)) {
    throw UsageError("invalid value for " + option + ": expected a finite number, got '" + text + "'");
  }
  if ((inclusive ? value < minimum : value <= minimum) || value > maximum) {
    throw UsageError("invalid value for " + option + ": expected a number " + (inclusive ? ">= " : "> ") +
                     format_number(minimum) + (maximum < 1e300 ? " and <= " + format_number(maximum) : "") +
                     ", got " + text);
  }
  return value;
}

inline std::vector<mhc::Connection> parse_connections(const std::string& text) {
  if (text == "all") {
    return {mhc::Connection::residual, mhc::Connection::static_hc, mhc::Connection::dynamic_hc,
            mhc::Connection::mhc, mhc::Connection::mhc_lite};
  }
  try {
    return {mhc::parse_connection(text)};
  } catch (const std::invalid_argument&) {
    throw UsageError("invalid value for --connection: expected residual, static_hc, dynamic_hc, mhc, mhc_lite or "
                     "all, got '" + text + "'");
  }
}

}  // namespace detail

// Parses the arguments after the program name. Options take their value as the next argument
// or after '=' (--steps 500, --steps=500). Throws UsageError on an unknown option, a missing or
// invalid value, or settings that cannot run together.
inline Settings parse_command_line(const std::vector<std::string>& arguments) {
  Settings settings;
  for (std::size_t i = 0; i < arguments.size(); ++i) {
    std::string option = arguments[i];
    std::string value;
    bool has_value = false;
    const std::size_t equals = option.find('=');
    if (option.rfind("--", 0) == 0 && equals != std::string::npos) {
      value = option.substr(equals + 1);
      option = option.substr(0, equals);
      has_value = true;
    }
    if (option == "--help" || option == "-h") {
      settings.help = true;
      continue;
    }
    const auto next_value = [&]() -> std::string {
      if (has_value) return value;
      if (i + 1 >= arguments.size()) throw UsageError("missing value for " + option);
      return arguments[++i];
    };
    const auto integer = [&](long long minimum, long long maximum = 2147483647) {
      return static_cast<int>(detail::parse_integer(option, next_value(), minimum, maximum));
    };

    if (option == "--connection") settings.connections = detail::parse_connections(next_value());
    else if (option == "--streams") settings.model.streams = integer(1, 64);
    else if (option == "--layers") settings.model.layers = integer(1, 1000);
    else if (option == "--width") settings.model.channels = integer(1, 1 << 16);
    else if (option == "--window") settings.model.window = integer(1, 1 << 16);
    else if (option == "--steps") settings.training.steps = integer(1);
    else if (option == "--lr") settings.training.learning_rate = detail::parse_number(option, next_value(), 0.0, false);
    else if (option == "--warmup") settings.training.warmup_steps = integer(0);
    else if (option == "--weight-decay") settings.training.adamw.weight_decay = detail::parse_number(option, next_value(), 0.0, true);
    else if (option == "--clip") settings.training.adamw.clip_norm = detail::parse_number(option, next_value(), 0.0, true);
    else if (option == "--batch") settings.training.batch_sequences = integer(1, 1 << 20);
    else if (option == "--sequence") settings.training.sequence_length = integer(1, 1 << 20);
    else if (option == "--seed") settings.training.seed = static_cast<std::uint32_t>(detail::parse_integer(option, next_value(), 0, 4294967295LL));
    else if (option == "--threads") settings.threads = integer(1, 1024);
    else if (option == "--data") settings.data_path = next_value();
    else if (option == "--corpus-bytes") settings.corpus_bytes = static_cast<std::size_t>(integer(64));
    else if (option == "--validation") settings.validation_fraction = detail::parse_number(option, next_value(), 0.0, false, 0.5);
    else if (option == "--eval-every") settings.training.eval_every = integer(1);
    else if (option == "--eval-batches") settings.training.eval_batches = integer(1, 1 << 16);
    else if (option == "--sample") settings.sample_bytes = integer(0);
    else if (option == "--temperature") settings.temperature = detail::parse_number(option, next_value(), 0.0, false);
    else if (option == "--csv") settings.csv_path = next_value();
    else if (option == "--svg") settings.svg_path = next_value();
    else throw UsageError("unknown option '" + arguments[i] + "'");
  }

  for (mhc::Connection connection : settings.connections) {
    if (connection == mhc::Connection::mhc_lite && settings.model.streams > mhc::max_lite_streams) {
      throw UsageError("invalid value for --streams: mhc_lite accepts at most " +
                       std::to_string(mhc::max_lite_streams) + " streams, got " +
                       std::to_string(settings.model.streams));
    }
  }
  return settings;
}

}  // namespace char_lm
