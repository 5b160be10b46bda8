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
// each the maximum over tokens. Numbers that do not fit their column switch to scientific
// notation, a NaN in any token shows as nan, and a composite gain beyond the double range shows
// as inf. Exits with status 1 when the streams overflow the double range before the last layer,
// and with status 2 on invalid options.
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
      // Divides by sqrt(mean square + 1e-6). stableNorm and hypot keep that finite for rows with
      // entries above 1e154, whose squares overflow.
      const double rms = normalized.row(t).stableNorm() / std::sqrt(double(normalized.cols()));
      normalized.row(t) /= std::hypot(rms, 1e-3);
    }
    Matrix hidden = normalized * first;
    // GELU, tanh approximation.
    const double root = std::sqrt(2.0 / 3.14159265358979323846);
    hidden = (0.5 * hidden.array() * (1.0 + (root * (hidden.array() + 0.044715 * hidden.array().cube())).tanh()))
                 .matrix();
    return hidden * second;
  }
};

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInfinity = std::numeric_limits<double>::infinity();

// std::max and std::min return their first argument when either is NaN, which would hide a NaN
// token behind the running maximum, so these return NaN instead.
double max_with_nan(double a, double b) { return std::isnan(a) || std::isnan(b) ? kNaN : std::max(a, b); }
double min_with_nan(double a, double b) { return std::isnan(a) || std::isnan(b) ? kNaN : std::min(a, b); }

// Mean, minimum and maximum of a set of values. All three are NaN once a NaN is added.
struct Summary {
  double mean = 0.0;
  double minimum = kInfinity;
  double maximum = -kInfinity;
  long count = 0;

  void add(double value) {
    mean += (value - mean) / double(++count);
    minimum = min_with_nan(minimum, value);
    maximum = max_with_nan(maximum, value);
  }
};

double forward_gain(const Matrix& mixing) {
  return mixing.rowwise().sum().cwiseAbs().maxCoeff<Eigen::PropagateNaN>();
}
double backward_gain(const Matrix& mixing) {
  return mixing.colwise().sum().cwiseAbs().maxCoeff<Eigen::PropagateNaN>();
}

// mhc::doubly_stochastic_error, but NaN when any row or column sum is NaN.
double stochastic_error(const Matrix& mixing) {
  const double row_error = (mixing.rowwise().sum().array() - 1.0).abs().maxCoeff<Eigen::PropagateNaN>();
  const double column_error = (mixing.colwise().sum().array() - 1.0).abs().maxCoeff<Eigen::PropagateNaN>();
  return max_with_nan(row_error, column_error);
}

// Product H_res(l) ... H_res(1) of one token. An unconstrained product can grow past the
// largest double, and then inf - inf turns its entries into NaN. Its gains are then reported as
// inf, and a NaN in H_res itself still shows as NaN.
struct CompositeMixing {
  Matrix product;
  bool overflowed = false;

  void multiply(const Matrix& mixing) {
    product = mixing * product;
    if (mixing.allFinite() && !product.allFinite()) overflowed = true;
  }
  double forward() const { return overflowed ? kInfinity : forward_gain(product); }
  double backward() const { return overflowed ? kInfinity : backward_gain(product); }
};

// Formats `value` right-aligned in `width` characters, in fixed notation with `decimals` digits
// after the point when that fits, and otherwise in scientific notation with as many digits as fit.
// Every double fits in 7 characters ("-1e+308"), and nan and inf in 4.
std::string format_number(double value, int width, int decimals) {
  char text[512];
  std::snprintf(text, sizeof text, "%*.*f", width, decimals, value);
  for (int digits = decimals; digits >= 0 && static_cast<int>(std::strlen(text)) > width; --digits) {
    std::snprintf(text, sizeof text, "%*.*e", width, digits, value);
  }
  return text;
}

// Formats `value` right-aligned in `width` characters in scientific notation, with `digits`
// digits after the point, or fewer when that does not fit.
std::string format_scientific(double value, int width, int digits) {
  char text[64];
  std::snprintf(text, sizeof text, "%*.*e", width, digits, value);
  for (--digits; digits >= 0 && static_cast<int>(std::strlen(text)) > width; --digits) {
    std::snprintf(text, sizeof text, "%*.*e", width, digits, value);
  }
  return text;
}

// Column widths of the table. Each is at least 7, so that any double fits.
constexpr int kCoefficientWidth = 7;  // mean, minimum and maximum of H_pre and H_post
constexpr int kDiagonalWidth = 9;
constexpr int kErrorWidth = 9;
constexpr int kLayerGainWidth = 7;
constexpr int kCompositeGainWidth = 9;

std::string format_summary(const Summary& summary) {
  return format_number(summary.mean, kCoefficientWidth, 3) + " [" +
         format_number(summary.minimum, kCoefficientWidth, 3) + ", " +
         format_number(summary.maximum, kCoefficientWidth, 3) + "]";
}

std::string format_gains(double forward, double backward, int width) {
  return format_number(forward, width, 3) + " / " + format_number(backward, width, 3);
}

// Statistics of one layer over all tokens. Each is NaN when the value of any token is NaN.
struct LayerStatistics {
  Summary pre;
  Summary post;
  Summary diagonal;
  double stochastic_error = 0.0;
  double layer_forward = 0.0;
  double layer_backward = 0.0;
  double composite_forward = 0.0;
  double composite_backward = 0.0;
};

// Summarizes the coefficients of one layer and multiplies each token's H_res into `composite`.
LayerStatistics summarize_layer(const mhc::Coefficients<double>& coefficients, int n,
                                std::vector<CompositeMixing>& composite) {
  LayerStatistics statistics;
  for (Eigen::Index t = 0; t < coefficients.res.rows(); ++t) {
    const Matrix mixing = Eigen::Map<const Matrix>(coefficients.res.row(t).data(), n, n);
    for (int i = 0; i < n; ++i) {
      statistics.pre.add(coefficients.pre(t, i));
      statistics.post.add(coefficients.post(t, i));
      statistics.diagonal.add(mixing(i, i));
    }
    statistics.stochastic_error = max_with_nan(statistics.stochastic_error, stochastic_error(mixing));
    statistics.layer_forward = max_with_nan(statistics.layer_forward, forward_gain(mixing));
    statistics.layer_backward = max_with_nan(statistics.layer_backward, backward_gain(mixing));

    CompositeMixing& product = composite[static_cast<std::size_t>(t)];
    product.multiply(mixing);
    statistics.composite_forward = max_with_nan(statistics.composite_forward, product.forward());
    statistics.composite_backward = max_with_nan(statistics.composite_backward, product.backward());
  }
  return statistics;
}

void print_header() {
  const int summary_width = 3 * kCoefficientWidth + 5;
  std::printf("%5s  %-*s  %-*s  %*s  %*s  %-*s  %s\n", "layer", summary_width, "H_pre mean [min, max]",
              summary_width, "H_post mean [min, max]", kDiagonalWidth, "res diag", kErrorWidth, "DS error",
              2 * kLayerGainWidth + 3, "gain fwd / bwd", "composite fwd / bwd");
}

void print_row(int layer, const LayerStatistics& statistics) {
  std::printf("%5d  %s  %s  %s  %s  %s  %s\n", layer, format_summary(statistics.pre).c_str(),
              format_summary(statistics.post).c_str(),
              format_number(statistics.diagonal.mean, kDiagonalWidth, 4).c_str(),
              format_scientific(statistics.stochastic_error, kErrorWidth, 2).c_str(),
              format_gains(statistics.layer_forward, statistics.layer_backward, kLayerGainWidth).c_str(),
              format_gains(statistics.composite_forward, statistics.composite_backward, kCompositeGainWidth).c_str());
}

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
    print_header();

    const Matrix embedding = random_matrix(settings.tokens, channels, 1.0, generator);
    Matrix state = mhc::expand_streams(embedding, n);
    // Running product H_res(l) ... H_res(1) of every token, for the composite gains.
    std::vector<CompositeMixing> composite(static_cast<std::size_t>(settings.tokens),
                                           CompositeMixing{Matrix::Identity(n, n)});

    for (int layer = 0; layer < settings.layers; ++layer) {
      auto block = mhc::HyperConnection<double>::create(settings.connection, n, channels, layer);
      std::visit(NoiseAdder{settings.noise, generator}, block.parameters());
      MlpBranch branch;
      branch.first = random_matrix(channels, 2 * channels, 1.0 / std::sqrt(double(channels)), generator);
      branch.second = random_matrix(2 * channels, channels, 1.0 / std::sqrt(double(2 * channels)), generator);

      const mhc::BranchInput<double> prepared = block.prepare_branch(state);
      const LayerStatistics statistics = summarize_layer(prepared.coefficients, n, composite);
      state = block.merge(prepared.coefficients, state, branch(prepared.input));
      print_row(layer, statistics);

      // The next layer cannot run on infinite streams, because the rules that compute their
      // coefficients from the streams reject them and the branch's RMSNorm turns them into NaN.
      if (!state.allFinite()) {
        std::fflush(stdout);
        std::fprintf(stderr,
                     "mhc_stack: stopped after %d of %d layers: the streams overflowed the double range "
                     "(above 1.8e308); use fewer --layers or a smaller --noise\n",
                     layer + 1, settings.layers);
        return 1;
      }
    }

    const Matrix output = mhc::reduce_streams(state, n);
    // stableNorm, because the squares of entries above 1e154 overflow.
    const double rms = output.stableNorm() / std::sqrt(double(output.size()));
    std::printf("output: %d x %d after reducing the streams, RMS %.6g, %s\n", settings.tokens, channels, rms,
                output.allFinite() ? "all finite" : "NOT all finite");
  } catch (const std::invalid_argument& error) {
    std::fprintf(stderr, "mhc_stack: %s\n", error.what());
    return 2;
  }
  return 0;
}
