// Why mHC is stable: composite gains of the stream-mixing matrices H_res over a deep stack.
//
// Builds the same stack of L layers (default 60, n = 4 streams) under three rules and runs one
// batch of random tokens through each:
//   static_hc   static hyper-connections with H_res = I + E(l)
//   dynamic_hc  dynamic hyper-connections whose static part is A_r = (I + E(l))^T, so H_res is
//               again I + E(l) plus small token-dependent tanh terms
//   mhc         mHC whose res bias is the identity initialisation 6 I - 3 plus the same E(l),
//               projected onto the doubly stochastic matrices by Sinkhorn-Knopp
// E(l) has entries drawn from N(0, sigma^2), one matrix per layer shared by the three rules.
// H_pre, H_post (or their biases) and the projection weights get the same kind of noise, and
// every layer wraps the same fixed random MLP branch in all three stacks.
//
// NOTE: these parameters are random perturbations of the identity initialisations, a stand-in
// for the drift of learned matrices. They do not come from a trained model, so the numbers show
// the mechanism, not the magnitudes that DeepSeek reports for trained networks.
//
// For every layer l (1-based) the program collects Coefficients::res of every token and reports,
// averaged over tokens (mhc::layer_gains):
//   forward gain   max_i |sum_j P[i][j]| of P = H_res(l) ... H_res(1), what the input has gone through
//   backward gain  max_j |sum_i P[i][j]| of P = H_res(L) ... H_res(l), what a gradient from the top
//                  goes through on its way down to layer l
// Unconstrained products drift away from 1 by orders of magnitude with depth: with the defaults
// their gains reach about 1e4 (seeds 1 to 3), while at sigma = 0.2 they stay within a factor of
// about 10 to 1000. Products of doubly stochastic matrices have every row and column sum equal to
// 1. Sinkhorn-Knopp makes the row sums exact and leaves its truncation error in the column sums,
// so mHC's backward gains sit slightly above 1.
//
//   stability [--layers L] [--streams N] [--channels C] [--tokens T] [--sigma S] [--seed K]
//             [--csv PATH] [--svg PATH]
#include <mhc/mhc.hpp>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <variant>
#include <vector>

namespace {

using Matrix = mhc::RowMatrix<double>;

const char* const kUsage =
    "usage: stability [--layers L] [--streams N] [--channels C] [--tokens T] [--sigma S] [--seed K]\n"
    "                 [--csv PATH] [--svg PATH]\n"
    "  --layers L    depth of the stack, 1 to 1000 (default 60)\n"
    "  --streams N   residual streams n, 1 to 16 (default 4)\n"
    "  --channels C  hidden size of each stream, 1 to 4096 (default 32)\n"
    "  --tokens T    tokens in the batch, 1 to 4096 (default 16)\n"
    "  --sigma S     standard deviation of the perturbation E(l) of H_res and of the noise on the\n"
    "                other learned values, 0 to 2 (default 0.4)\n"
    "  --seed K      seed of the tokens, the perturbations and the branch weights,\n"
    "                0 to 4294967295 (default 1)\n"
    "  --csv PATH    also write the per-layer gains as CSV to PATH\n"
    "  --svg PATH    also write a plot of the composite gains as SVG to PATH\n";

struct Settings {
  int layers = 60;
  int streams = 4;
  int channels = 32;
  int tokens = 16;
  double sigma = 0.4;
  unsigned long seed = 1;
  std::string csv_path;
  std::string svg_path;
};

[[noreturn]] void fail(const std::string& message) {
  std::fprintf(stderr, "stability: %s\nRun stability --help for the options.\n", message.c_str());
  std::exit(2);
}

double parse_real(const std::string& flag, const char* text, double minimum, double maximum) {
  char* end = nullptr;
  const double value = std::strtod(text, &end);
  if (end == text || *end != '\0' || !(value >= minimum && value <= maximum)) {
    fail("invalid " + flag + " '" + text + "': expected a number from " + mhc::detail::concat(minimum) + " to " +
         mhc::detail::concat(maximum));
  }
  return value;
}

long long parse_integer(const std::string& flag, const char* text, long long minimum, long long maximum) {
  char* end = nullptr;
  errno = 0;
  const long long value = std::strtoll(text, &end, 10);
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
    if (flag == "--layers") {
      settings.layers = static_cast<int>(parse_integer(flag, value, 1, 1000));
    } else if (flag == "--streams") {
      settings.streams = static_cast<int>(parse_integer(flag, value, 1, 16));
    } else if (flag == "--channels") {
      settings.channels = static_cast<int>(parse_integer(flag, value, 1, 4096));
    } else if (flag == "--tokens") {
      settings.tokens = static_cast<int>(parse_integer(flag, value, 1, 4096));
    } else if (flag == "--sigma") {
      settings.sigma = parse_real(flag, value, 0.0, 2.0);
    } else if (flag == "--seed") {
      settings.seed = static_cast<unsigned long>(parse_integer(flag, value, 0, 4294967295LL));
    } else if (flag == "--csv" || flag == "--svg") {
      if (*value == '\0') fail("invalid " + flag + " '': expected a file path");
      (flag == "--csv" ? settings.csv_path : settings.svg_path) = value;
    } else {
      fail("unknown option '" + flag + "'");
    }
  }
  return settings;
}

Matrix random_matrix(Eigen::Index rows, Eigen::Index cols, double scale, std::mt19937& generator) {
  std::normal_distribution<double> normal(0.0, scale);
  Matrix matrix(rows, cols);
  for (Eigen::Index k = 0; k < matrix.size(); ++k) matrix.data()[k] = normal(generator);
  return matrix;
}

// ---------------------------------------------------------------------------------------------
// The stack: per-layer random draws shared by every rule, and the rules built from them.

// The branch of one layer: h -> tanh(RMSNorm(h) W1) W2, hidden width 2C, weights N(0, 1 / fan-in).
struct MlpBranch {
  Matrix first;   // C x 2C
  Matrix second;  // 2C x C

  Matrix operator()(const Matrix& input) const {
    Matrix normalized = input;
    for (Eigen::Index t = 0; t < normalized.rows(); ++t) {
      const double mean_square = normalized.row(t).squaredNorm() / double(normalized.cols());
      normalized.row(t) /= std::sqrt(mean_square + 1e-6);
    }
    return (normalized * first).array().tanh().matrix() * second;
  }
};

// Everything random about one layer, drawn once and shared by the three stacks.
struct LayerDraw {
  Matrix res_noise;    // E(l), n x n
  Matrix pre_noise;    // 1 x n, added to H_pre or to its bias
  Matrix post_noise;   // 1 x n, added to H_post or to its bias
  Matrix weight_noise; // C x (n*n + 2n), N(0, sigma^2 / C): the rows of the projection weights
  MlpBranch branch;
};

LayerDraw draw_layer(const Settings& settings, std::mt19937& generator) {
  const int n = settings.streams;
  const int channels = settings.channels;
  LayerDraw draw;
  draw.res_noise = random_matrix(n, n, settings.sigma, generator);
  draw.pre_noise = random_matrix(1, n, settings.sigma, generator);
  draw.post_noise = random_matrix(1, n, settings.sigma, generator);
  draw.weight_noise = random_matrix(channels, n * n + 2 * n, settings.sigma / std::sqrt(double(channels)), generator);
  draw.branch.first = random_matrix(channels, 2 * channels, 1.0 / std::sqrt(double(channels)), generator);
  draw.branch.second = random_matrix(2 * channels, channels, 1.0 / std::sqrt(double(2 * channels)), generator);
  return draw;
}

// The rules compared, in table, CSV and plot order.
const mhc::Connection kRules[] = {mhc::Connection::static_hc, mhc::Connection::dynamic_hc, mhc::Connection::mhc};
constexpr int kRuleCount = 3;

// Builds layer `layer` of a stack under `connection` from its identity initialisation and `draw`.
mhc::HyperConnection<double> build_layer(mhc::Connection connection, const Settings& settings, int layer,
                                         const LayerDraw& draw) {
  const int n = settings.streams;
  auto block = mhc::HyperConnection<double>::create(connection, n, settings.channels, layer);
  if (auto* fixed = std::get_if<mhc::StaticParameters<double>>(&block.parameters())) {
    fixed->res += draw.res_noise;
    fixed->pre += draw.pre_noise;
    fixed->post += draw.post_noise;
  } else if (auto* dynamic = std::get_if<mhc::DynamicParameters<double>>(&block.parameters())) {
    // static_res is A_r, source stream on the rows, so its transpose is the drifted H_res.
    dynamic->static_res += draw.res_noise.transpose();
    dynamic->static_pre += draw.pre_noise;
    dynamic->static_post += draw.post_noise;
    dynamic->pre_weight += draw.weight_noise.col(0);
    dynamic->post_weight += draw.weight_noise.col(1);
    dynamic->res_weight += draw.weight_noise.middleCols(2, n);
  } else if (auto* layer_parameters = std::get_if<mhc::Parameters<double>>(&block.parameters())) {
    // Bias order [pre | post | res]; res entry i*n + j is the logit of H_res[i][j].
    layer_parameters->bias.head(n) += draw.pre_noise;
    layer_parameters->bias.segment(n, n) += draw.post_noise;
    layer_parameters->bias.tail(n * n) += Eigen::Map<const mhc::RowVector<double>>(draw.res_noise.data(), n * n);
    // phi has n*C rows. Every stream's block of rows gets the same C x (n*n + 2n) noise, as dynamic
    // HC shares its weights across streams, divided by sqrt(n) so that each entry has variance
    // sigma^2 / (n*C), the fan-in of the projection.
    for (int stream = 0; stream < n; ++stream) {
      layer_parameters->phi.middleRows(Eigen::Index(stream) * settings.channels, settings.channels) +=
          draw.weight_noise / std::sqrt(double(n));
    }
  }
  return block;
}

// Runs the tokens through one stack and returns Coefficients::res of every layer.
std::vector<Matrix> collect_mixing(mhc::Connection connection, const Settings& settings,
                                   const std::vector<LayerDraw>& draws, const Matrix& embedding) {
  std::vector<Matrix> res_per_layer;
  Matrix state = mhc::expand_streams(embedding, settings.streams);
  for (int layer = 0; layer < settings.layers; ++layer) {
    const LayerDraw& draw = draws[static_cast<std::size_t>(layer)];
    const auto block = build_layer(connection, settings, layer, draw);
    const mhc::BranchInput<double> prepared = block.prepare_branch(state);
    state = block.merge(prepared.coefficients, state, draw.branch(prepared.input));
    res_per_layer.push_back(prepared.coefficients.res);
  }
  return res_per_layer;
}

// ---------------------------------------------------------------------------------------------
// Output: table, CSV and SVG.

// Composite gains of one rule, layer by layer.
struct Curve {
  std::vector<double> forward;
  std::vector<double> backward;
};

Curve composite_curve(const std::vector<mhc::LayerGain>& gains) {
  Curve curve;
  for (const mhc::LayerGain& gain : gains) {
    curve.forward.push_back(gain.forward_composite.forward_max);
    curve.backward.push_back(gain.backward_composite.backward_max);
  }
  return curve;
}

void print_table(const Settings& settings, const std::vector<Curve>& curves) {
  std::printf("%5s", "layer");
  for (mhc::Connection rule : kRules) {
    std::printf("  %12s %-4s %12s %-4s", mhc::to_string(rule), "fwd", mhc::to_string(rule), "bwd");
  }
  std::printf("\n");
  // About 15 rows: every `step` layers, plus the first and the last.
  const int step = std::max(1, settings.layers / 15);
  for (int layer = 0; layer < settings.layers; ++layer) {
    if (layer != 0 && (layer + 1) % step != 0 && layer + 1 != settings.layers) continue;
    std::printf("%5d", layer + 1);
    for (const Curve& curve : curves) {
      const auto index = static_cast<std::size_t>(layer);
      std::printf("  %17.4g %17.4g", curve.forward[index], curve.backward[index]);
    }
    std::printf("\n");
  }
}

// Opens `path` for writing or exits with the reason.
std::FILE* open_output(const std::string& flag, const std::string& path) {
  std::FILE* file = std::fopen(path.c_str(), "w");
  if (file == nullptr) fail("cannot write " + flag + " '" + path + "': " + std::strerror(errno));
  return file;
}

void close_output(const std::string& flag, const std::string& path, std::FILE* file) {
  const bool failed = std::ferror(file) != 0;
  if (std::fclose(file) != 0 || failed) fail("failed to write " + flag + " '" + path + "'");
}

// One row per layer: layer, then the forward and backward composite gains of every rule, and
// the single-layer forward and backward gains of every rule.
void write_csv(const std::string& path, const Settings& settings, const std::vector<Curve>& curves,
               const std::vector<std::vector<mhc::LayerGain>>& gains) {
  std::FILE* file = open_output("--csv", path);
  std::fprintf(file, "layer");
  for (mhc::Connection rule : kRules) {
    const char* name = mhc::to_string(rule);
    std::fprintf(file, ",%s_composite_forward,%s_composite_backward", name, name);
  }
  for (mhc::Connection rule : kRules) {
    const char* name = mhc::to_string(rule);
    std::fprintf(file, ",%s_layer_forward,%s_layer_backward", name, name);
  }
  std::fprintf(file, "\n");
  for (int layer = 0; layer < settings.layers; ++layer) {
    const auto index = static_cast<std::size_t>(layer);
    std::fprintf(file, "%d", layer + 1);
    for (const Curve& curve : curves) std::fprintf(file, ",%.9g,%.9g", curve.forward[index], curve.backward[index]);
    for (const auto& rule_gains : gains) {
      std::fprintf(file, ",%.9g,%.9g", rule_gains[index].layer.forward_max, rule_gains[index].layer.backward_max);
    }
    std::fprintf(file, "\n");
  }
  close_output("--csv", path, file);
}

// A tick spacing of 1, 2 or 5 times a power of ten that gives at most about `count` ticks.
int tick_step(int range, int count) {
  for (int scale = 1;; scale *= 10) {
    for (int factor : {1, 2, 5}) {
      if (range / (factor * scale) <= count) return factor * scale;
    }
  }
}

// Plot of the composite gains against the layer index: log-scale y axis with a grid line per
// decade, forward gains as solid lines, backward gains as dashed lines, one colour per rule.
void write_svg(const std::string& path, const Settings& settings, const std::vector<Curve>& curves) {
  const double width = 960, height = 560;
  const double left = 90, right = 230, top = 60, bottom = 70;
  const double plot_width = width - left - right, plot_height = height - top - bottom;
  const char* const colours[kRuleCount] = {"#d62728", "#ff7f0e", "#1f77b4"};
  const double stroke_widths[kRuleCount] = {1.5, 4.0, 2.0};
  // A gain of exactly 0 has no logarithm, so it is drawn at the floor of the axis.
  const double smallest_drawn = 1e-300;

  double low = 0.0, high = 0.0;  // log10 range, always containing 10^0
  for (const Curve& curve : curves) {
    for (const std::vector<double>* values : {&curve.forward, &curve.backward}) {
      for (double value : *values) {
        const double exponent = std::log10(std::max(value, smallest_drawn));
        low = std::min(low, exponent);
        high = std::max(high, exponent);
      }
    }
  }
  const int decade_low = static_cast<int>(std::floor(low - 0.05));
  const int decade_high = static_cast<int>(std::ceil(high + 0.05));
  const int decade_step = tick_step(decade_high - decade_low, 12);
  const int last_layer = settings.layers;

  const auto x_of = [&](double layer) {
    return left + (last_layer == 1 ? 0.5 : (layer - 1.0) / (last_layer - 1.0)) * plot_width;
  };
  const auto y_of = [&](double value) {
    const double exponent = std::log10(std::max(value, smallest_drawn));
    return top + (decade_high - exponent) / (decade_high - decade_low) * plot_height;
  };

  std::FILE* file = open_output("--svg", path);
  std::fprintf(file,
               "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%g\" height=\"%g\" viewBox=\"0 0 %g %g\" "
               "font-family=\"sans-serif\" font-size=\"13\">\n",
               width, height, width, height);
  std::fprintf(file, "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n");
  std::fprintf(file,
               "<text x=\"%g\" y=\"28\" font-size=\"16\" text-anchor=\"middle\">Composite gain of H_res over %d "
               "layers (n = %d, sigma = %g, random perturbations, not a trained model)</text>\n",
               width / 2, last_layer, settings.streams, settings.sigma);

  // Horizontal grid and y labels, one per decade step. The line at 10^0 = 1 is darker.
  for (int decade = decade_low; decade <= decade_high; decade += decade_step) {
    const double y = y_of(std::pow(10.0, decade));
    std::fprintf(file, "<line x1=\"%g\" y1=\"%.2f\" x2=\"%g\" y2=\"%.2f\" stroke=\"%s\"/>\n", left, y,
                 left + plot_width, y, decade == 0 ? "#888888" : "#e0e0e0");
    std::fprintf(file, "<text x=\"%g\" y=\"%.2f\" text-anchor=\"end\">1e%d</text>\n", left - 8, y + 4, decade);
  }
  // Vertical ticks and x labels.
  std::vector<int> layer_ticks = {1};
  const int layer_step = tick_step(last_layer, 10);
  for (int layer = layer_step; layer <= last_layer; layer += layer_step) {
    if (layer != 1) layer_ticks.push_back(layer);
  }
  for (int layer : layer_ticks) {
    const double x = x_of(layer);
    std::fprintf(file, "<line x1=\"%.2f\" y1=\"%g\" x2=\"%.2f\" y2=\"%g\" stroke=\"#e0e0e0\"/>\n", x, top, x,
                 top + plot_height);
    std::fprintf(file, "<text x=\"%.2f\" y=\"%g\" text-anchor=\"middle\">%d</text>\n", x, top + plot_height + 20,
                 layer);
  }
  std::fprintf(file, "<rect x=\"%g\" y=\"%g\" width=\"%g\" height=\"%g\" fill=\"none\" stroke=\"black\"/>\n", left,
               top, plot_width, plot_height);
  std::fprintf(file, "<text x=\"%g\" y=\"%g\" text-anchor=\"middle\">layer l</text>\n", left + plot_width / 2,
               height - 22);
  std::fprintf(file,
               "<text x=\"24\" y=\"%g\" text-anchor=\"middle\" transform=\"rotate(-90 24 %g)\">composite gain "
               "(max abs row or column sum, log scale)</text>\n",
               top + plot_height / 2, top + plot_height / 2);

  // The curves, then the legend. Static and dynamic HC nearly coincide, so dynamic HC is drawn
  // first and wider, and static HC thinner on top of it.
  for (int rule : {1, 0, 2}) {
    const Curve& curve = curves[static_cast<std::size_t>(rule)];
    for (int direction = 0; direction < 2; ++direction) {
      const std::vector<double>& values = direction == 0 ? curve.forward : curve.backward;
      std::fprintf(file, "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"%g\"%s points=\"", colours[rule],
                   stroke_widths[rule], direction == 0 ? "" : " stroke-dasharray=\"7 4\"");
      for (std::size_t layer = 0; layer < values.size(); ++layer) {
        std::fprintf(file, "%.2f,%.2f ", x_of(double(layer + 1)), y_of(values[layer]));
      }
      std::fprintf(file, "\"/>\n");
    }
  }
  const double legend_x = left + plot_width + 20;
  for (int rule = 0; rule < kRuleCount; ++rule) {
    for (int direction = 0; direction < 2; ++direction) {
      const double y = top + 12 + 24 * (2 * rule + direction);
      std::fprintf(file, "<line x1=\"%g\" y1=\"%g\" x2=\"%g\" y2=\"%g\" stroke=\"%s\" stroke-width=\"%g\"%s/>\n",
                   legend_x, y, legend_x + 34, y, colours[rule], stroke_widths[rule],
                   direction == 0 ? "" : " stroke-dasharray=\"7 4\"");
      std::fprintf(file, "<text x=\"%g\" y=\"%g\">%s %s</text>\n", legend_x + 42, y + 4,
                   mhc::to_string(kRules[rule]), direction == 0 ? "forward" : "backward");
    }
  }
  std::fprintf(file,
               "<text x=\"%g\" y=\"%g\" font-size=\"11\" fill=\"#555555\">forward: H_res(l)...H_res(1)</text>\n",
               legend_x, top + 12 + 24 * 6 + 4);
  std::fprintf(file,
               "<text x=\"%g\" y=\"%g\" font-size=\"11\" fill=\"#555555\">backward: H_res(L)...H_res(l)</text>\n",
               legend_x, top + 12 + 24 * 6 + 20);
  std::fprintf(file, "</svg>\n");
  close_output("--svg", path, file);
}

}  // namespace

int main(int argc, char** argv) {
  const Settings settings = parse_settings(argc, argv);
  std::mt19937 generator(static_cast<std::uint32_t>(settings.seed));

  try {
    const Matrix embedding = random_matrix(settings.tokens, settings.channels, 1.0, generator);
    std::vector<LayerDraw> draws;
    for (int layer = 0; layer < settings.layers; ++layer) draws.push_back(draw_layer(settings, generator));

    std::vector<std::vector<mhc::LayerGain>> gains;
    std::vector<Curve> curves;
    for (mhc::Connection rule : kRules) {
      gains.push_back(mhc::layer_gains(collect_mixing(rule, settings, draws, embedding)));
      curves.push_back(composite_curve(gains.back()));
    }

    std::printf("%d layers, n = %d streams, C = %d, T = %d tokens, sigma %g, seed %lu\n", settings.layers,
                settings.streams, settings.channels, settings.tokens, settings.sigma, settings.seed);
    std::printf("composite gains averaged over tokens: fwd of H_res(l)...H_res(1), bwd of H_res(L)...H_res(l)\n");
    print_table(settings, curves);

    if (!settings.csv_path.empty()) {
      write_csv(settings.csv_path, settings, curves, gains);
      std::printf("wrote %s\n", settings.csv_path.c_str());
    }
    if (!settings.svg_path.empty()) {
      write_svg(settings.svg_path, settings, curves);
      std::printf("wrote %s\n", settings.svg_path.c_str());
    }
  } catch (const std::invalid_argument& error) {
    std::fprintf(stderr, "stability: %s\n", error.what());
    return 2;
  }
  return 0;
}
