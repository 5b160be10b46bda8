// A model-shaped stack of hyper-connection layers: embeds T random tokens, expands them into n
// streams, runs L layers that each wrap a small MLP branch (RMSNorm, linear, GELU, linear, fixed
// random weights), reduces the streams and prints per-layer coefficient statistics. Each layer
// starts from its rule's identity-like initialisation plus Gaussian noise on every learned value,
// a stand-in for training that makes the rules differ.
//
//   mhc_stack [--connection NAME] [--streams N] [--layers L] [--channels C] [--tokens T]
//             [--seed S] [--noise SIGMA]
//
// The gain columns follow the Amax gain magnitude: forward gain max_i |sum_j H_res[i][j]|,
// backward gain max_j |sum_i H_res[i][j]|, for one layer and for the product of all layers so far,
// each the maximum over tokens.
#include <mhc/mhc.hpp>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <variant>
#include <vector>

namespace {

using Matrix = mhc::RowMatrix<double>;

const char* const kUsage =
    "usage: mhc_stack [--connection NAME] [--streams N] [--layers L] [--channels C] [--tokens T]\n"
    "                 [--seed S] [--noise SIGMA]\n"
    "  --connection NAME  residual, static_hc, dynamic_hc, mhc or mhc_lite (default mhc)\n"
    "  --streams N        residual streams n, 1 to 16; mhc_lite accepts at most 6 and residual\n"
    "                     only 1 (default 4, or 1 for residual)\n"
    "  --layers L         number of layers, 1 to 1000 (default 8)\n"
    "  --channels C       hidden size of each stream, 1 to 4096 (default 64)\n"
    "  --tokens T         tokens in the batch, 1 to 65536 (default 32)\n"
    "  --seed S           seed of the input and the weights, 0 to 4294967295 (default 1)\n"
    "  --noise SIGMA      standard deviation of the noise added to the coefficient weights and\n"
    "                     biases of every layer, 0 to 10; 0 keeps the initialisation (default 0.5)\n";

struct Settings {
  mhc::Connection connection = mhc::Connection::mhc;
  int streams = 4;
  bool streams_given = false;
  int layers = 8;
  int channels = 64;
  int tokens = 32;
  unsigned long seed = 1;
  double noise = 0.5;
};

[[noreturn]] void fail(const std::string& message) {
  std::fprintf(stderr, "mhc_stack: %s\nRun mhc_stack --help for the options.\n", message.c_str());
  std::exit(2);
}

double parse_real(const std::string& flag, const char* text, double minimum, double maximum, const char* range) {
  char* end = nullptr;
  const double value = std::strtod(text, &end);
  if (end == text || *end != '\0' || !(value >= minimum && value <= maximum)) {
    fail("invalid " + flag + " '" + text + "': expected a number from " + range);
  }
  return value;
}

long parse_integer(const std::string& flag, const char* text, long minimum, long maximum) {
  char* end = nullptr;
  errno = 0;
  const long value = std::strtol(text, &end, 10);
  if (end == text || *end != '\0' || errno == ERANGE || value < minimum || value > maximum) {
    fail("invalid " + flag + " '" + text + "': expected an integer from " + std::to_string(minimum) + " to " +
         std::to_string(maximum));
  }
  return value;
}

Settings parse_settings(int argc, char** argv) {
  Settings settings;
  for (int k = 1; k < argc; ++k) {
    const std::string flag = argv[k];
    if (flag == "--help" || flag == "-h") {
      std::fputs(kUsage, stdout);
      std::exit(0);
    }
    if (k + 1 >= argc) fail("missing value after " + flag);
    const char* value = argv[++k];
    if (flag == "--connection") {
      try {
        settings.connection = mhc::parse_connection(value);
      } catch (const std::invalid_argument&) {
        fail(std::string("invalid --connection '") + value +
             "': expected residual, static_hc, dynamic_hc, mhc or mhc_lite");
      }
    } else if (flag == "--streams") {
      settings.streams = static_cast<int>(parse_integer(flag, value, 1, 16));
      settings.streams_given = true;
    } else if (flag == "--layers") {
      settings.layers = static_cast<int>(parse_integer(flag, value, 1, 1000));
    } else if (flag == "--channels") {
      settings.channels = static_cast<int>(parse_integer(flag, value, 1, 4096));
    } else if (flag == "--tokens") {
      settings.tokens = static_cast<int>(parse_integer(flag, value, 1, 65536));
    } else if (flag == "--seed") {
      settings.seed = static_cast<unsigned long>(parse_integer(flag, value, 0, 4294967295L));
    } else if (flag == "--noise") {
      settings.noise = parse_real(flag, value, 0.0, 10.0, "0 to 10");
    } else {
      fail("unknown option '" + flag + "'");
    }
  }

  if (settings.connection == mhc::Connection::residual) {
    if (settings.streams_given && settings.streams != 1) {
      fail("invalid --streams " + std::to_string(settings.streams) +
           " for --connection residual: a plain residual connection has 1 stream");
    }
    settings.streams = 1;
  }
  if (settings.connection == mhc::Connection::mhc_lite && settings.streams > mhc::max_lite_streams) {
    fail("invalid --streams " + std::to_string(settings.streams) +
         " for --connection mhc_lite: expected at most 6, because it mixes all n! permutations");
  }
  return settings;
}

Matrix random_matrix(Eigen::Index rows, Eigen::Index cols, double scale, std::mt19937& generator) {
  std::normal_distribution<double> normal(0.0, scale);
  Matrix matrix(rows, cols);
  for (Eigen::Index k = 0; k < matrix.size(); ++k) matrix.data()[k] = normal(generator);
  return matrix;
}

template <typename Derived>
void add_noise(Eigen::MatrixBase<Derived>& values, double sigma, std::mt19937& generator) {
  std::normal_distribution<double> normal(0.0, sigma);
  for (Eigen::Index r = 0; r < values.rows(); ++r) {
    for (Eigen::Index c = 0; c < values.cols(); ++c) values(r, c) += normal(generator);
  }
}

// Adds N(0, sigma^2) to every learned bias or static coefficient of the rule, and N(0, sigma^2 /
// fan_in) to its projection weights. The residual rule has nothing to perturb.
struct NoiseAdder {
  double sigma;
  std::mt19937& generator;

  void operator()(mhc::ResidualParameters<double>&) const {}
  void operator()(mhc::StaticParameters<double>& parameters) const {
    add_noise(parameters.pre, sigma, generator);
    add_noise(parameters.post, sigma, generator);
    add_noise(parameters.res, sigma, generator);
  }
  void operator()(mhc::DynamicParameters<double>& parameters) const {
    const double weight_sigma = sigma / std::sqrt(double(parameters.channels));
    add_noise(parameters.pre_weight, weight_sigma, generator);
    add_noise(parameters.post_weight, weight_sigma, generator);
    add_noise(parameters.res_weight, weight_sigma, generator);
    add_noise(parameters.static_pre, sigma, generator);
    add_noise(parameters.static_post, sigma, generator);
    add_noise(parameters.static_res, sigma, generator);
  }
  void operator()(mhc::Parameters<double>& parameters) const {
    add_noise(parameters.phi, sigma / std::sqrt(double(parameters.phi.rows())), generator);
    add_noise(parameters.bias, sigma, generator);
  }
  void operator()(mhc::LiteParameters<double>& parameters) const {
    add_noise(parameters.phi, sigma / std::sqrt(double(parameters.phi.rows())), generator);
    add_noise(parameters.bias, sigma, generator);
  }
};

// The branch of one layer: h -> GELU(RMSNorm(h) W1) W2, hidden width 2C, with weights drawn once
// from N(0, 1 / fan_in) so that activations keep about unit scale.
struct MlpBranch {
  Matrix first;   // C x 2C
  Matrix second;  // 2C x C

  Matrix operator()(const Matrix& input) const {
    Matrix normalized = input;
    for (Eigen::Index t = 0; t < normalized.rows(); ++t) {
      const double mean_square = normalized.row(t).squaredNorm() / double(normalized.cols());
      normalized.row(t) /= std::sqrt(mean_square + 1e-6);
    }
    Matrix hidden = normalized * first;
    // GELU, tanh approximation.
    const double root = std::sqrt(2.0 / 3.14159265358979323846);
    hidden = (0.5 * hidden.array() * (1.0 + (root * (hidden.array() + 0.044715 * hidden.array().cube())).tanh()))
                 .matrix();
    return hidden * second;
  }
};

// Mean, minimum and maximum of a set of values.
struct Summary {
  double mean = 0.0;
  double minimum = std::numeric_limits<double>::infinity();
  double maximum = -std::numeric_limits<double>::infinity();
  long count = 0;

  void add(double value) {
    mean += (value - mean) / double(++count);
    minimum = std::min(minimum, value);
    maximum = std::max(maximum, value);
  }
};

double forward_gain(const Matrix& mixing) { return mixing.rowwise().sum().cwiseAbs().maxCoeff(); }
double backward_gain(const Matrix& mixing) { return mixing.colwise().sum().cwiseAbs().maxCoeff(); }

}  // namespace

int main(int argc, char** argv) {
  const Settings settings = parse_settings(argc, argv);
  const int n = settings.streams;
  const int channels = settings.channels;
  std::mt19937 generator(static_cast<std::uint32_t>(settings.seed));

  try {
    std::printf("connection %s, n = %d streams, %d layers, C = %d, T = %d tokens, seed %lu, noise %g\n",
                mhc::to_string(settings.connection), n, settings.layers, channels, settings.tokens, settings.seed,
                settings.noise);
    std::printf("%5s  %-24s  %-24s  %9s  %9s  %-15s  %-17s\n", "layer", "H_pre mean [min, max]",
                "H_post mean [min, max]", "res diag", "DS error", "gain fwd / bwd", "composite fwd/bwd");

    const Matrix embedding = random_matrix(settings.tokens, channels, 1.0, generator);
    Matrix state = mhc::expand_streams(embedding, n);
    // Running product H_res(l) ... H_res(1) of every token, for the composite gains.
    std::vector<Matrix> composite(static_cast<std::size_t>(settings.tokens), Matrix::Identity(n, n));

    for (int layer = 0; layer < settings.layers; ++layer) {
      auto block = mhc::HyperConnection<double>::create(settings.connection, n, channels, layer);
      std::visit(NoiseAdder{settings.noise, generator}, block.parameters());
      MlpBranch branch;
      branch.first = random_matrix(channels, 2 * channels, 1.0 / std::sqrt(double(channels)), generator);
      branch.second = random_matrix(2 * channels, channels, 1.0 / std::sqrt(double(2 * channels)), generator);

      const mhc::BranchInput<double> prepared = block.prepare_branch(state);
      const mhc::Coefficients<double>& coefficients = prepared.coefficients;
      Summary pre, post, diagonal;
      double stochastic_error = 0.0, layer_forward = 0.0, layer_backward = 0.0;
      double composite_forward = 0.0, composite_backward = 0.0;
      for (Eigen::Index t = 0; t < state.rows(); ++t) {
        const Matrix mixing = Eigen::Map<const Matrix>(coefficients.res.row(t).data(), n, n);
        for (int i = 0; i < n; ++i) {
          pre.add(coefficients.pre(t, i));
          post.add(coefficients.post(t, i));
          diagonal.add(mixing(i, i));
        }
        stochastic_error = std::max(stochastic_error, mhc::doubly_stochastic_error(mixing));
        layer_forward = std::max(layer_forward, forward_gain(mixing));
        layer_backward = std::max(layer_backward, backward_gain(mixing));
        Matrix& product = composite[static_cast<std::size_t>(t)];
        product = mixing * product;
        composite_forward = std::max(composite_forward, forward_gain(product));
        composite_backward = std::max(composite_backward, backward_gain(product));
      }
      state = block.merge(coefficients, state, branch(prepared.input));

      std::printf("%5d  %6.3f [%6.3f, %6.3f]  %6.3f [%6.3f, %6.3f]  %9.4f  %9.2e  %6.3f / %6.3f  %7.3f / %7.3f\n",
                  layer, pre.mean, pre.minimum, pre.maximum, post.mean, post.minimum, post.maximum, diagonal.mean,
                  stochastic_error, layer_forward, layer_backward, composite_forward, composite_backward);
    }

    const Matrix output = mhc::reduce_streams(state, n);
    const double rms = std::sqrt(output.squaredNorm() / double(output.size()));
    std::printf("output: %d x %d after reducing the streams, RMS %.4f, %s\n", settings.tokens, channels, rms,
                output.allFinite() ? "all finite" : "NOT all finite");
  } catch (const std::invalid_argument& error) {
    std::fprintf(stderr, "mhc_stack: %s\n", error.what());
    return 2;
  }
  return 0;
}
