// Compares the library with the float64 PyTorch reference in tools/reference, through the golden
// data files in tests/data. Float runs convert the double inputs to float first, so their error
// includes the rounding of the inputs.
#include "golden.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <limits>
#include <mhc/mhc.hpp>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "support.hpp"

namespace {

using mhc::RowMatrix;
using mhc::test::golden_path;
using mhc::test::GoldenFile;

// Every layer case written by generate_golden.py. A listed file that is missing fails the tests.
const char* const kLayerCases[] = {
    "layer_n1_c5_t3",
    "layer_n2_c3_t1",
    "layer_n2_c7_t5",
    "layer_n3_c5_t3",
    "layer_n3_c12_t1",
    "layer_n4_c7_t5",
    "layer_n4_c12_t3",
    "layer_n4_c5_t3_iter5",
    "layer_n8_c3_t3",
    "layer_n4_c3_t0",
    "regression_swap_n2",
    "regression_cycle_n4",
    "regression_post_factor_n4",
    "regression_small_tokens_n3",
};

GoldenFile load_case(const std::string& stem) {
  return GoldenFile::load(golden_path(stem + ".txt"));
}

template <typename Scalar>
mhc::Parameters<Scalar> load_parameters(const GoldenFile& file) {
  mhc::Parameters<Scalar> parameters;
  parameters.streams = file.integer("streams");
  parameters.channels = file.integer("channels");
  parameters.phi = file.array_as<Scalar>("phi");
  parameters.bias = file.array_as<Scalar>("bias");
  parameters.alpha_pre = static_cast<Scalar>(file.scalar("alpha_pre"));
  parameters.alpha_post = static_cast<Scalar>(file.scalar("alpha_post"));
  parameters.alpha_res = static_cast<Scalar>(file.scalar("alpha_res"));
  return parameters;
}

mhc::Options load_options(const GoldenFile& file) {
  mhc::Options options;
  options.sinkhorn.iterations = file.integer("iterations");
  options.rms_epsilon = file.scalar("rms_epsilon");
  return options;
}

// The branch of every layer case: h_out = tanh(h_in w1 + b1) w2, with w1 C x H, b1 1 x H and
// w2 H x C. It records its last input and output so that tests can compare h_in and h_out.
template <typename Scalar>
struct MlpBranch {
  explicit MlpBranch(const GoldenFile& file)
      : w1(file.array_as<Scalar>("w1")),
        b1(file.array_as<Scalar>("b1")),
        w2(file.array_as<Scalar>("w2")) {}

  RowMatrix<Scalar> operator()(const RowMatrix<Scalar>& h_in) {
    RowMatrix<Scalar> hidden = h_in * w1;
    hidden.rowwise() += b1.row(0);
    last_input = h_in;
    last_output = hidden.array().tanh().matrix() * w2;
    return last_output;
  }

  RowMatrix<Scalar> w1, b1, w2;
  RowMatrix<Scalar> last_input, last_output;
};

// Rounding steps behind one layer output, for mhc::test::tolerance. The projection and the RMS
// sum n*C terms, and each Sinkhorn round makes two sums and two divisions over n entries. The
// branch sums C and H terms, and aggregation and merge sum n terms. The last term covers exp
// and sigmoid of logits up to about 10, whose relative error grows with the logit.
double layer_operations(const GoldenFile& file) {
  const double n = file.scalar("streams");
  const double channels = file.scalar("channels");
  const double hidden = file.scalar("hidden");
  const double iterations = file.scalar("iterations");
  return n * channels + 4.0 * n * iterations + channels + hidden + 2.0 * n + 10.0;
}

// Rounding steps behind one Sinkhorn output: four passes over n entries per round, and exp of
// logits as large as the largest |logit|, which scales the relative error of exp.
double sinkhorn_operations(const RowMatrix<double>& logits, int iterations) {
  return 4.0 * static_cast<double>(logits.rows()) * iterations + logits.cwiseAbs().maxCoeff() + 1.0;
}

// Expects |actual - expected| <= tolerance * max(1, |expected|) everywhere and reports the worst
// element, so a failure names one entry of one array instead of flooding the log.
template <typename Scalar>
void expect_near_golden(const RowMatrix<Scalar>& actual, const RowMatrix<double>& expected,
                        double tolerance, const std::string& name) {
  ASSERT_EQ(actual.rows(), expected.rows()) << name;
  ASSERT_EQ(actual.cols(), expected.cols()) << name;

  double worst_error = 0.0;
  Eigen::Index worst_row = 0;
  Eigen::Index worst_col = 0;
  for (Eigen::Index row = 0; row < expected.rows(); ++row) {
    for (Eigen::Index col = 0; col < expected.cols(); ++col) {
      const double reference = expected(row, col);
      double error = std::abs(static_cast<double>(actual(row, col)) - reference) /
                     std::max(1.0, std::abs(reference));
      if (!std::isfinite(error)) error = std::numeric_limits<double>::infinity();
      if (error > worst_error) {
        worst_error = error;
        worst_row = row;
        worst_col = col;
      }
    }
  }
  EXPECT_LE(worst_error, tolerance)
      << name << " at (" << worst_row << ", " << worst_col << "): actual "
      << (expected.size() ? static_cast<double>(actual(worst_row, worst_col)) : 0.0)
      << ", expected " << (expected.size() ? expected(worst_row, worst_col) : 0.0);
}

template <typename Scalar>
class GoldenTest : public ::testing::Test {};
// The empty third argument (the default name generator) keeps Clang's
// -Wgnu-zero-variadic-macro-arguments quiet with GoogleTest 1.12.
TYPED_TEST_SUITE(GoldenTest, mhc::test::ScalarTypes, );

TYPED_TEST(GoldenTest, CoefficientsMatchReference) {
  using Scalar = TypeParam;
  for (const char* stem : kLayerCases) {
    SCOPED_TRACE(stem);
    const GoldenFile file = load_case(stem);
    const mhc::Parameters<Scalar> parameters = load_parameters<Scalar>(file);
    const RowMatrix<Scalar> x = file.array_as<Scalar>("x");
    const double tolerance = mhc::test::tolerance<Scalar>(layer_operations(file));

    const mhc::Coefficients<Scalar> coefficients =
        mhc::compute_coefficients(parameters, x, load_options(file));

    expect_near_golden(coefficients.pre, file.array("pre"), tolerance, "pre");
    expect_near_golden(coefficients.post, file.array("post"), tolerance, "post");
    expect_near_golden(coefficients.res, file.array("res"), tolerance, "res");
  }
}

TYPED_TEST(GoldenTest, ForwardMatchesReference) {
  using Scalar = TypeParam;
  for (const char* stem : kLayerCases) {
    SCOPED_TRACE(stem);
    const GoldenFile file = load_case(stem);
    const mhc::Parameters<Scalar> parameters = load_parameters<Scalar>(file);
    const RowMatrix<Scalar> x = file.array_as<Scalar>("x");
    const double tolerance = mhc::test::tolerance<Scalar>(layer_operations(file));
    MlpBranch<Scalar> branch(file);

    const RowMatrix<Scalar> x_next = mhc::forward(parameters, x, branch, load_options(file));

    expect_near_golden(branch.last_input, file.array("h_in"), tolerance, "h_in");
    expect_near_golden(branch.last_output, file.array("h_out"), tolerance, "h_out");
    expect_near_golden(x_next, file.array("x_next"), tolerance, "x_next");
  }
}

TYPED_TEST(GoldenTest, SinkhornMatchesReference) {
  using Scalar = TypeParam;
  const GoldenFile file = GoldenFile::load(golden_path("sinkhorn.txt"));
  for (const int n : {1, 2, 3, 4, 8}) {
    for (const int scale : {1, 4}) {
      for (const int iterations : {1, 5, 20}) {
        const std::string prefix =
            mhc::detail::concat("n", n, "_scale", scale, "_iter", iterations);
        SCOPED_TRACE(prefix);
        const RowMatrix<double>& logits = file.array(prefix + ".logits");
        mhc::SinkhornOptions options;
        options.iterations = iterations;
        const double tolerance =
            mhc::test::tolerance<Scalar>(sinkhorn_operations(logits, iterations));

        const RowMatrix<Scalar> output = mhc::sinkhorn_knopp(logits.cast<Scalar>().eval(), options);

        expect_near_golden(output, file.array(prefix + ".output"), tolerance, "output");
      }
    }
  }
}

TYPED_TEST(GoldenTest, SinkhornBackwardMatchesReference) {
  using Scalar = TypeParam;
  const GoldenFile file = GoldenFile::load(golden_path("sinkhorn.txt"));
  for (const int n : {1, 2, 3, 4, 8}) {
    for (const int scale : {1, 4}) {
      for (const int iterations : {1, 5, 20}) {
        const std::string prefix =
            mhc::detail::concat("n", n, "_scale", scale, "_iter", iterations);
        SCOPED_TRACE(prefix);
        const RowMatrix<double>& logits = file.array(prefix + ".logits");
        const RowMatrix<double>& grad_output = file.array(prefix + ".grad_output");
        mhc::SinkhornOptions options;
        options.iterations = iterations;
        // The backward replays every round once more in reverse, so it has about twice the
        // forward's rounding steps, scaled by the size of the upstream gradient.
        const double tolerance = mhc::test::tolerance<Scalar>(
            2.0 * sinkhorn_operations(logits, iterations) * std::max(1.0, grad_output.cwiseAbs().maxCoeff()));

        const RowMatrix<Scalar> grad_logits = mhc::sinkhorn_knopp_backward(
            logits.cast<Scalar>().eval(), grad_output.cast<Scalar>().eval(), options);

        expect_near_golden(grad_logits, file.array(prefix + ".grad_logits"), tolerance, "grad_logits");
      }
    }
  }
}

// Recomputes x_next from the golden coefficients and branch output, with H_res transposed if
// `transpose_res` and H_post multiplied by `post_factor`. The test below requires each mistake
// to move x_next far beyond the float tolerance, or the comparisons above could not catch it.
RowMatrix<double> merge_with_mistake(const GoldenFile& file, bool transpose_res,
                                     double post_factor) {
  const int n = file.integer("streams");
  const int channels = file.integer("channels");
  const RowMatrix<double>& x = file.array("x");
  const RowMatrix<double>& res = file.array("res");
  const RowMatrix<double>& post = file.array("post");
  const RowMatrix<double>& h_out = file.array("h_out");

  RowMatrix<double> x_next = RowMatrix<double>::Zero(x.rows(), x.cols());
  for (Eigen::Index t = 0; t < x.rows(); ++t) {
    for (int i = 0; i < n; ++i) {
      for (int j = 0; j < n; ++j) {
        const double weight = transpose_res ? res(t, j * n + i) : res(t, i * n + j);
        x_next.row(t).segment(i * channels, channels) +=
            weight * x.row(t).segment(j * channels, channels);
      }
      x_next.row(t).segment(i * channels, channels) += post_factor * post(t, i) * h_out.row(t);
    }
  }
  return x_next;
}

TEST(GoldenData, MistakesMoveNextState) {
  const double minimum_change = 0.01;
  for (const char* stem : kLayerCases) {
    SCOPED_TRACE(stem);
    const GoldenFile file = load_case(stem);
    const RowMatrix<double>& x_next = file.array("x_next");
    EXPECT_LT(mhc::test::tolerance<float>(layer_operations(file)), minimum_change / 10);
    if (x_next.rows() == 0) continue;

    const double exact_change =
        (merge_with_mistake(file, false, 1.0) - x_next).cwiseAbs().maxCoeff();
    EXPECT_LE(exact_change, mhc::test::tolerance<double>(layer_operations(file)));

    const double post_change =
        (merge_with_mistake(file, false, 0.5) - x_next).cwiseAbs().maxCoeff();
    EXPECT_GE(post_change, minimum_change) << "dropping the factor 2 of H_post";

    // Every 2 x 2 doubly stochastic matrix is symmetric, so transposition shows only from n = 3.
    const bool has_asymmetric_mixing =
        file.integer("streams") >= 3 && std::string(stem) != "regression_post_factor_n4";
    if (has_asymmetric_mixing) {
      const double transpose_change =
          (merge_with_mistake(file, true, 1.0) - x_next).cwiseAbs().maxCoeff();
      EXPECT_GE(transpose_change, minimum_change) << "transposing H_res";
    }
  }
}

TEST(GoldenData, LayerGradientsAreConsistent) {
  // grad_x is the sum of its three paths, and the zero-token case has zero parameter gradients.
  for (const char* stem : kLayerCases) {
    SCOPED_TRACE(stem);
    const GoldenFile file = load_case(stem);
    const RowMatrix<double> paths = file.array("grad_x_merge") + file.array("grad_x_aggregate") +
                                    file.array("grad_x_coefficients");
    expect_near_golden(paths, file.array("grad_x"),
                       mhc::test::tolerance<double>(layer_operations(file)), "grad_x paths");
  }
  const GoldenFile empty = load_case("layer_n4_c3_t0");
  EXPECT_EQ(empty.array("grad_phi").cwiseAbs().maxCoeff(), 0.0);
  EXPECT_EQ(empty.array("grad_bias").cwiseAbs().maxCoeff(), 0.0);
}

// Writes `text` to a file in the test's temporary directory and returns its path.
std::string write_temporary(const std::string& file_name, const std::string& text) {
  const std::string path = ::testing::TempDir() + file_name;
  std::ofstream(path) << text;
  return path;
}

// Returns the message of the std::runtime_error that `load` throws, or "" if it throws none.
template <typename Function>
std::string runtime_error_message(Function&& load) {
  try {
    load();
  } catch (const std::runtime_error& error) {
    return error.what();
  }
  return "";
}

TEST(GoldenFile, ParsesArraysAndComments) {
  const std::string path = write_temporary(
      "golden_parse.txt",
      "# comment\n\nempty 0 3\nmatrix 2 3\n1 2 3\n4 5 -6.5e-1\n# between\nvalue 1 1\n0.25\n");

  const GoldenFile file = GoldenFile::load(path);

  EXPECT_EQ(file.names(), (std::vector<std::string>{"empty", "matrix", "value"}));
  EXPECT_EQ(file.array("empty").rows(), 0);
  EXPECT_EQ(file.array("empty").cols(), 3);
  EXPECT_EQ(file.array("matrix")(0, 2), 3.0);
  EXPECT_EQ(file.array("matrix")(1, 0), 4.0);
  EXPECT_EQ(file.array("matrix")(1, 2), -0.65);
  EXPECT_EQ(file.scalar("value"), 0.25);
  std::remove(path.c_str());
}

TEST(GoldenFile, ReadsDoublesExactly) {
  // 0.1 + 0.2 is 0.30000000000000004 in binary64, and repr writes exactly these 17 digits.
  const std::string path = write_temporary("golden_exact.txt", "sum 1 1\n0.30000000000000004\n");

  EXPECT_EQ(GoldenFile::load(path).scalar("sum"), 0.1 + 0.2);
  std::remove(path.c_str());
}

TEST(GoldenFile, ErrorsNamePathAndArray) {
  const std::string missing_path = golden_path("no_such_file.txt");
  const std::string missing_file = runtime_error_message([&] { GoldenFile::load(missing_path); });
  EXPECT_NE(missing_file.find(missing_path), std::string::npos) << missing_file;

  const std::string path = write_temporary("golden_errors.txt", "matrix 1 2\n1 2\n");
  const GoldenFile file = GoldenFile::load(path);
  const std::string missing_array = runtime_error_message([&] { file.array("absent"); });
  EXPECT_NE(missing_array.find("absent"), std::string::npos) << missing_array;
  EXPECT_NE(missing_array.find(path), std::string::npos) << missing_array;

  const std::string not_scalar = runtime_error_message([&] { file.scalar("matrix"); });
  EXPECT_NE(not_scalar.find("1 x 2"), std::string::npos) << not_scalar;
  std::remove(path.c_str());
}

TEST(GoldenFile, RejectsMalformedFiles) {
  const std::pair<const char*, const char*> cases[] = {
      {"bad header", "matrix 2\n1 2\n"},           {"too few numbers", "matrix 2 2\n1 2\n3\n"},
      {"too many numbers", "matrix 1 2\n1 2 3\n"}, {"invalid number", "matrix 1 2\n1 x\n"},
      {"infinite number", "matrix 1 1\ninf\n"},    {"duplicate name", "a 1 1\n1\na 1 1\n2\n"},
  };
  for (const auto& [label, text] : cases) {
    SCOPED_TRACE(label);
    const std::string path = write_temporary("golden_malformed.txt", text);
    const std::string message = runtime_error_message([&] { GoldenFile::load(path); });
    EXPECT_NE(message.find(path), std::string::npos) << message;
    std::remove(path.c_str());
  }
}

}  // namespace
