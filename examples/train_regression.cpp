// Trains one mHC layer (n = 4 streams, C = 8 channels) around a small tanh MLP branch on a toy
// regression problem, with Adam written out below, and prints the loss as it falls.
//
//   train_regression [STEPS] [SEED]    STEPS in [1, 100000] (default 400), SEED in [0, 4294967295] (default 1)
//
// The model expands the input into the streams, runs the layer and sums the streams:
//   y = reduce_streams(layer(expand_streams(input)))
// and learns the fixed random map target = 4 input + sin(input A) B by minimising the mean
// squared error. The layer's gradients come from mhc::merge_backward and
// mhc::prepare_branch_backward, and the MLP's and the loss's from the code here. The program
// exits with status 1 unless the final loss is below a tenth of the initial loss, and with
// status 2 on invalid arguments.
#include <mhc/mhc.hpp>

#include <Eigen/Core>

#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <utility>
#include <vector>

namespace {

const char* const kUsage =
    "usage: train_regression [STEPS] [SEED]\n"
    "Trains one mHC layer (n = 4 streams, C = 8 channels) around a small tanh MLP branch on a toy\n"
    "regression problem with Adam, and prints the mean squared error every STEPS / 10 steps\n"
    "(rounded down, and at least every step).\n"
    "  STEPS       Adam steps, each over all 256 training tokens, 1 to 100000 (default 400)\n"
    "  SEED        seed of the training data and the initial weights, 0 to 4294967295 (default 1)\n"
    "  -h, --help  print this help and exit\n"
    "Exit status: 0 when the final loss is below a tenth of the initial loss, 1 when it is not,\n"
    "2 on invalid arguments.\n";

using Scalar = float;
using Matrix = mhc::RowMatrix<Scalar>;
using Vector = mhc::RowVector<Scalar>;
using Array = Eigen::Array<Scalar, Eigen::Dynamic, 1>;

constexpr int kStreams = 4;
constexpr int kChannels = 8;
constexpr int kHidden = 32;
constexpr int kTokens = 256;

Matrix random_matrix(Eigen::Index rows, Eigen::Index cols, double scale, std::mt19937& generator) {
  std::normal_distribution<double> normal(0.0, scale);
  Matrix matrix(rows, cols);
  for (Eigen::Index k = 0; k < matrix.size(); ++k) matrix.data()[k] = static_cast<Scalar>(normal(generator));
  return matrix;
}

// The branch: output = tanh(input w1 + b1) w2 + b2, input and output T x C.
struct Mlp {
  Matrix w1;  // C x H
  Vector b1;  // 1 x H
  Matrix w2;  // H x C
  Vector b2;  // 1 x C
};

struct MlpGradients {
  Mlp parameters;
  Matrix input;
};

Matrix mlp_hidden(const Mlp& mlp, const Matrix& input) {
  return ((input * mlp.w1).rowwise() + mlp.b1).array().tanh().matrix();
}

Matrix mlp_output(const Mlp& mlp, const Matrix& hidden) {
  return (hidden * mlp.w2).rowwise() + mlp.b2;
}

// Backward of the MLP, given its input, the tanh activations of the forward and the gradient
// of its output.
MlpGradients mlp_backward(const Mlp& mlp, const Matrix& input, const Matrix& hidden, const Matrix& grad_output) {
  MlpGradients gradients;
  gradients.parameters.w2 = hidden.transpose() * grad_output;
  gradients.parameters.b2 = grad_output.colwise().sum();
  // d tanh(z) / dz = 1 - tanh(z)^2.
  const Matrix grad_preactivation =
      ((grad_output * mlp.w2.transpose()).array() * (Scalar(1) - hidden.array().square())).matrix();
  gradients.parameters.w1 = input.transpose() * grad_preactivation;
  gradients.parameters.b1 = grad_preactivation.colwise().sum();
  gradients.input = grad_preactivation * mlp.w1.transpose();
  return gradients;
}

// Adam with bias correction, one pair of moment estimates per parameter tensor.
class Adam {
 public:
  explicit Adam(Scalar learning_rate) : learning_rate_(learning_rate) {}

  // Starts the next step. Call it before the update() calls of that step.
  void begin_step() {
    ++step_;
    next_tensor_ = 0;
  }

  // Updates `size` values at `values` from their gradients. Tensors must be passed in the same
  // order on every step, because each keeps its own moment estimates.
  void update(Scalar* values, const Scalar* gradients, Eigen::Index size) {
    if (next_tensor_ == moments_.size()) moments_.push_back({Array::Zero(size), Array::Zero(size)});
    Moments& moments = moments_[next_tensor_++];
    Eigen::Map<Array> value(values, size);
    const Eigen::Map<const Array> gradient(gradients, size);

    moments.first = beta1_ * moments.first + (Scalar(1) - beta1_) * gradient;
    moments.second = beta2_ * moments.second + (Scalar(1) - beta2_) * gradient.square();
    const Scalar first_correction = Scalar(1) - std::pow(beta1_, Scalar(step_));
    const Scalar second_correction = Scalar(1) - std::pow(beta2_, Scalar(step_));
    value -= learning_rate_ * (moments.first / first_correction) /
             ((moments.second / second_correction).sqrt() + epsilon_);
  }

  template <typename Derived>
  void update(Eigen::PlainObjectBase<Derived>& values, const Eigen::PlainObjectBase<Derived>& gradients) {
    update(values.data(), gradients.data(), values.size());
  }

  void update(Scalar& value, Scalar gradient) { update(&value, &gradient, 1); }

 private:
  struct Moments {
    Array first;
    Array second;
  };

  Scalar learning_rate_;
  Scalar beta1_ = Scalar(0.9);
  Scalar beta2_ = Scalar(0.999);
  Scalar epsilon_ = Scalar(1e-8);
  int step_ = 0;
  std::size_t next_tensor_ = 0;
  std::vector<Moments> moments_;
};

struct Model {
  mhc::Parameters<Scalar> layer;
  Mlp branch;
  mhc::Options options;
};

// Runs one forward and backward pass over the whole training set, updates every parameter
// with Adam and returns the mean squared error before the update.
Scalar train_step(Model& model, Adam& adam, const Matrix& inputs, const Matrix& targets) {
  // Forward, keeping the coefficients, h_in, the tanh activations and h_out for the backward.
  const Matrix x = mhc::expand_streams(inputs, kStreams);
  mhc::BranchInput<Scalar> prepared = mhc::prepare_branch(model.layer, x, model.options);
  const Matrix hidden = mlp_hidden(model.branch, prepared.input);
  const Matrix branch_output = mlp_output(model.branch, hidden);
  const Matrix x_next = mhc::merge_streams(prepared.coefficients, x, branch_output);
  const Matrix prediction = mhc::reduce_streams(x_next, kStreams);

  const Matrix residual = prediction - targets;
  const Scalar count = static_cast<Scalar>(residual.size());
  const Scalar loss = residual.squaredNorm() / count;

  // Backward. reduce_streams sums the streams, so every stream receives the gradient of y.
  const Matrix grad_prediction = (Scalar(2) / count) * residual;
  const Matrix grad_x_next = mhc::expand_streams(grad_prediction, kStreams);
  const mhc::MergeBackward<Scalar> merged = mhc::merge_backward(
      model.layer, x, std::move(prepared.coefficients), branch_output, grad_x_next, model.options);
  const MlpGradients branch_gradients =
      mlp_backward(model.branch, prepared.input, hidden, merged.gradients.branch_output);
  const mhc::LayerGradients<Scalar> layer_gradients =
      mhc::prepare_branch_backward(model.layer, x, merged, branch_gradients.input, model.options);

  adam.begin_step();
  adam.update(model.layer.phi, layer_gradients.parameters.phi);
  adam.update(model.layer.bias, layer_gradients.parameters.bias);
  adam.update(model.layer.alpha_pre, layer_gradients.parameters.alpha_pre);
  adam.update(model.layer.alpha_post, layer_gradients.parameters.alpha_post);
  adam.update(model.layer.alpha_res, layer_gradients.parameters.alpha_res);
  adam.update(model.branch.w1, branch_gradients.parameters.w1);
  adam.update(model.branch.b1, branch_gradients.parameters.b1);
  adam.update(model.branch.w2, branch_gradients.parameters.w2);
  adam.update(model.branch.b2, branch_gradients.parameters.b2);
  return loss;
}

[[noreturn]] void fail(const std::string& message) {
  std::fprintf(stderr, "train_regression: %s\nRun train_regression --help for the arguments.\n", message.c_str());
  std::exit(2);
}

// Parses a decimal integer in [minimum, maximum], or exits with status 2 and a message that
// names the argument.
long long parse_integer(const char* text, const char* name, long long minimum, long long maximum) {
  char* end = nullptr;
  errno = 0;
  const long long value = std::strtoll(text, &end, 10);
  if (end == text || *end != '\0' || errno == ERANGE || value < minimum || value > maximum) {
    fail(std::string("invalid ") + name + " '" + text + "': expected an integer from " + std::to_string(minimum) +
         " to " + std::to_string(maximum));
  }
  return value;
}

}  // namespace

int main(int argc, char** argv) {
  for (int k = 1; k < argc; ++k) {
    if (std::strcmp(argv[k], "--help") == 0 || std::strcmp(argv[k], "-h") == 0) {
      std::fputs(kUsage, stdout);
      return 0;
    }
  }
  // An argument that starts with '-' and a letter, or with "--", is an option, not a negative number.
  for (int k = 1; k < argc; ++k) {
    const char* argument = argv[k];
    if (argument[0] == '-' && (argument[1] == '-' || std::isalpha(static_cast<unsigned char>(argument[1])))) {
      fail(std::string("unknown option '") + argument + "': expected -h, --help or the positional STEPS and SEED");
    }
  }
  if (argc > 3) {
    fail(std::string("unexpected argument '") + argv[3] + "': expected at most 2 arguments, STEPS and SEED, got " +
         std::to_string(argc - 1));
  }
  const long steps = argc > 1 ? static_cast<long>(parse_integer(argv[1], "STEPS", 1, 100000)) : 400;
  const auto seed = argc > 2 ? static_cast<std::uint32_t>(parse_integer(argv[2], "SEED", 0, 4294967295LL)) : 1U;
  std::mt19937 generator(seed);

  // Line buffering writes each progress line out at once. Without it, the C library buffers
  // whole blocks when stdout is a pipe or a file, and a long run shows nothing until it ends.
  std::setvbuf(stdout, nullptr, _IOLBF, BUFSIZ);

  // The products here are at most 256 x 32, too small to gain from Eigen's OpenMP threads. For
  // train_regression 4000, a second thread gave no speedup on an idle 2-core machine, and made
  // the run about five times slower while other processes kept the cores busy.
  Eigen::setNbThreads(1);

  // The training set: inputs and the fixed random map to learn.
  const Matrix inputs = random_matrix(kTokens, kChannels, 1.0, generator);
  const Matrix map_a = random_matrix(kChannels, kChannels, 1.0 / std::sqrt(double(kChannels)), generator);
  const Matrix map_b = random_matrix(kChannels, kChannels, 1.0 / std::sqrt(double(kChannels)), generator);
  const Matrix targets = Scalar(kStreams) * inputs + (inputs * map_a).array().sin().matrix() * map_b;

  // A layer that starts as a pre-norm residual connection, plus a small random branch.
  Model model;
  model.layer = mhc::Parameters<Scalar>::identity(kStreams, kChannels, 0);
  model.branch.w1 = random_matrix(kChannels, kHidden, 1.0 / std::sqrt(double(kChannels)), generator);
  model.branch.b1 = Vector::Zero(kHidden);
  model.branch.w2 = random_matrix(kHidden, kChannels, 0.1 / std::sqrt(double(kHidden)), generator);
  model.branch.b2 = Vector::Zero(kChannels);

  Adam adam(Scalar(0.01));
  const long report_every = steps >= 10 ? steps / 10 : 1;
  Scalar initial_loss = 0;
  Scalar loss = 0;
  for (long step = 0; step < steps; ++step) {
    loss = train_step(model, adam, inputs, targets);
    if (step == 0) initial_loss = loss;
    if (step % report_every == 0) std::printf("step %6ld  loss %.6f\n", step, double(loss));
  }
  std::printf("step %6ld  loss %.6f (initial %.6f)\n", steps - 1, double(loss), double(initial_loss));

  if (!(std::isfinite(loss) && loss < Scalar(0.1) * initial_loss)) {
    std::fprintf(stderr, "train_regression: the loss did not fall below a tenth of its initial value; try more STEPS\n");
    return 1;
  }
  return 0;
}
