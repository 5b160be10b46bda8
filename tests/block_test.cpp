// Tests of the HyperConnection block's backward pass under every rule.
#include <mhc/variants.hpp>

#include "support.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

namespace {

using mhc::Coefficients;
using mhc::Connection;
using mhc::DynamicParameters;
using mhc::HyperConnection;
using mhc::LiteParameters;
using mhc::Options;
using mhc::Parameters;
using mhc::ResidualParameters;
using mhc::RowMatrix;
using mhc::StaticParameters;
using mhc::test::random_matrix;
using mhc::test::TanhMlp;

const Connection kConnections[] = {Connection::residual, Connection::static_hc, Connection::dynamic_hc,
                                   Connection::mhc, Connection::mhc_lite};

// ---------------------------------------------------------------------------------------------
// Blocks with random parameters, and a flat view of their learned values.

// A block of the given rule whose every learned value is random, so that no gradient vanishes
// because of the identity-like initialisation. The residual rule has nothing to randomise.
template <typename Scalar>
HyperConnection<Scalar> random_block(Connection connection, int streams, int channels, std::uint32_t seed) {
  HyperConnection<Scalar> block = HyperConnection<Scalar>::create(connection, streams, channels, 1);
  const auto random = [&](Eigen::Index rows, Eigen::Index cols, double scale) {
    return random_matrix<Scalar>(rows, cols, seed++, scale);
  };
  const int n = streams;
  switch (connection) {
    case Connection::residual:
      break;
    case Connection::static_hc: {
      auto& parameters = std::get<StaticParameters<Scalar>>(block.parameters());
      parameters.pre = random(1, n, 1.0);
      parameters.post = random(1, n, 1.0);
      parameters.res = RowMatrix<Scalar>::Identity(n, n) + random(n, n, 0.3);
      break;
    }
    case Connection::dynamic_hc: {
      auto& parameters = std::get<DynamicParameters<Scalar>>(block.parameters());
      parameters.pre_weight = random(channels, 1, 0.7);
      parameters.post_weight = random(channels, 1, 0.7);
      parameters.res_weight = random(channels, n, 0.7);
      parameters.static_pre = random(1, n, 1.0);
      parameters.static_post = random(1, n, 1.0);
      parameters.static_res = RowMatrix<Scalar>::Identity(n, n) + random(n, n, 0.3);
      parameters.alpha_scale = Scalar(0.8);
      parameters.beta_scale = Scalar(-0.6);
      break;
    }
    case Connection::mhc: {
      auto& parameters = std::get<Parameters<Scalar>>(block.parameters());
      parameters.phi = random(parameters.phi.rows(), parameters.phi.cols(), 0.5);
      parameters.bias = random(1, parameters.bias.size(), 1.0);
      parameters.alpha_pre = Scalar(0.7);
      parameters.alpha_post = Scalar(-0.5);
      parameters.alpha_res = Scalar(0.9);
      break;
    }
    case Connection::mhc_lite: {
      auto& parameters = std::get<LiteParameters<Scalar>>(block.parameters());
      parameters.phi = random(parameters.phi.rows(), parameters.phi.cols(), 0.5);
      parameters.bias = random(1, parameters.bias.size(), 1.0);
      parameters.alpha_pre = Scalar(0.7);
      parameters.alpha_post = Scalar(-0.5);
      parameters.alpha_res = Scalar(0.9);
      break;
    }
  }
  return block;
}

// One learned tensor of a rule, as a pointer to its contiguous storage.
template <typename Scalar>
struct Field {
  std::string name;
  Scalar* data;
  Eigen::Index size;
};

template <typename Scalar, typename Matrix>
Field<Scalar> field(const char* name, Matrix& matrix) {
  return {name, matrix.data(), matrix.size()};
}

template <typename Scalar>
Field<Scalar> field(const char* name, Scalar& value) {
  return {name, &value, 1};
}

template <typename Scalar>
std::vector<Field<Scalar>> fields(ResidualParameters<Scalar>&) {
  return {};
}

template <typename Scalar>
std::vector<Field<Scalar>> fields(StaticParameters<Scalar>& p) {
  return {field<Scalar>("pre", p.pre), field<Scalar>("post", p.post), field<Scalar>("res", p.res)};
}

template <typename Scalar>
std::vector<Field<Scalar>> fields(DynamicParameters<Scalar>& p) {
  return {field<Scalar>("pre_weight", p.pre_weight),   field<Scalar>("post_weight", p.post_weight),
          field<Scalar>("res_weight", p.res_weight),   field<Scalar>("static_pre", p.static_pre),
          field<Scalar>("static_post", p.static_post), field<Scalar>("static_res", p.static_res),
          field("alpha_scale", p.alpha_scale),         field("beta_scale", p.beta_scale)};
}

template <typename Scalar>
std::vector<Field<Scalar>> fields(Parameters<Scalar>& p) {
  return {field<Scalar>("phi", p.phi), field<Scalar>("bias", p.bias), field("alpha_pre", p.alpha_pre),
          field("alpha_post", p.alpha_post), field("alpha_res", p.alpha_res)};
}

template <typename Scalar>
std::vector<Field<Scalar>> fields(LiteParameters<Scalar>& p) {
  return {field<Scalar>("phi", p.phi), field<Scalar>("bias", p.bias), field("alpha_pre", p.alpha_pre),
          field("alpha_post", p.alpha_post), field("alpha_res", p.alpha_res)};
}

template <typename Scalar>
std::vector<Field<Scalar>> rule_fields(typename HyperConnection<Scalar>::Rule& rule) {
  return std::visit([](auto& parameters) { return fields(parameters); }, rule);
}

// ---------------------------------------------------------------------------------------------
// The reference: the free functions of the rule, composed by hand.

// Gradients of x and of the rule's parameters from the free functions.
template <typename ParametersType>
struct FreeGradients {
  RowMatrix<typename ParametersType::scalar_type> x;
  ParametersType parameters;
};

// Composes compute_coefficients, aggregate_streams, the merge backward, the branch backward, the
// aggregation backward and compute_coefficients_backward, and sums the gradient of x as
// merge + aggregation + coefficients.
template <typename ParametersType, typename Scalar = typename ParametersType::scalar_type>
FreeGradients<ParametersType> free_backward(const ParametersType& parameters, const RowMatrix<Scalar>& x,
                                            const RowMatrix<Scalar>& grad_x_next, const TanhMlp<Scalar>& mlp) {
  const Coefficients<Scalar> coefficients = mhc::compute_coefficients(parameters, x);
  const RowMatrix<Scalar> input = mhc::aggregate_streams(coefficients, x);
  const RowMatrix<Scalar> output = mlp(input);
  const auto merged = mhc::merge_streams_backward(coefficients, x, output, grad_x_next);
  const RowMatrix<Scalar> grad_input = mlp.backward(input, merged.branch_output);
  const auto aggregated = mhc::aggregate_streams_backward(coefficients, x, grad_input);

  Coefficients<Scalar> grad_coefficients;
  grad_coefficients.pre = aggregated.pre;
  grad_coefficients.post = merged.post;
  grad_coefficients.res = merged.res;
  const auto through_coefficients = mhc::compute_coefficients_backward(parameters, x, grad_coefficients);

  FreeGradients<ParametersType> result;
  result.x = merged.x;
  result.x += aggregated.x;
  result.x += through_coefficients.x;
  result.parameters = through_coefficients.parameters;
  return result;
}

// The mHC rule has a one-call free backward of its own.
template <typename Scalar>
FreeGradients<Parameters<Scalar>> free_backward(const Parameters<Scalar>& parameters, const RowMatrix<Scalar>& x,
                                                const RowMatrix<Scalar>& grad_x_next, const TanhMlp<Scalar>& mlp) {
  const auto gradients = mhc::backward(parameters, x, grad_x_next, mlp,
                                       [&](const RowMatrix<Scalar>& input, const RowMatrix<Scalar>& grad_output) {
                                         return mlp.backward(input, grad_output);
                                       });
  return {gradients.x, gradients.parameters};
}

// ---------------------------------------------------------------------------------------------
// Comparisons.

template <typename Scalar>
void expect_bitwise_equal(const RowMatrix<Scalar>& actual, const RowMatrix<Scalar>& expected,
                          const std::string& label) {
  ASSERT_EQ(actual.rows(), expected.rows()) << label;
  ASSERT_EQ(actual.cols(), expected.cols()) << label;
  for (Eigen::Index k = 0; k < actual.size(); ++k) {
    EXPECT_EQ(actual.data()[k], expected.data()[k]) << label << " entry " << k;
  }
}

template <typename Scalar>
void expect_fields_bitwise_equal(std::vector<Field<Scalar>> actual, std::vector<Field<Scalar>> expected,
                                 const std::string& label) {
  ASSERT_EQ(actual.size(), expected.size()) << label;
  for (std::size_t f = 0; f < actual.size(); ++f) {
    ASSERT_EQ(actual[f].size, expected[f].size) << label << " " << expected[f].name;
    for (Eigen::Index k = 0; k < actual[f].size; ++k) {
      EXPECT_EQ(actual[f].data[k], expected[f].data[k]) << label << " " << expected[f].name << " entry " << k;
    }
  }
}

template <typename Scalar>
void expect_gradients_bitwise_equal(typename HyperConnection<Scalar>::Gradients actual,
                                    typename HyperConnection<Scalar>::Gradients expected, const std::string& label) {
  ASSERT_EQ(actual.parameters.index(), expected.parameters.index()) << label;
  expect_bitwise_equal(actual.x, expected.x, label + " x");
  expect_fields_bitwise_equal(rule_fields<Scalar>(actual.parameters), rule_fields<Scalar>(expected.parameters), label);
}

// Stream counts to sweep for a rule: residual takes only 1, and mHC-lite grows as n!, so it
// stops at 4 to keep the program fast.
std::vector<int> stream_counts(Connection connection) {
  if (connection == Connection::residual) return {1};
  if (connection == Connection::mhc_lite) return {1, 2, 3, 4};
  return {1, 2, 3, 4, 8};
}

std::string case_name(Connection connection, int n, int channels, Eigen::Index tokens) {
  return std::string(mhc::to_string(connection)) + " n " + std::to_string(n) + " C " + std::to_string(channels) +
         " T " + std::to_string(tokens);
}

// Expects `call` to throw std::invalid_argument whose message contains every part.
template <typename Call>
void expect_invalid_argument(Call&& call, const std::vector<std::string>& parts, const std::string& label) {
  try {
    call();
    ADD_FAILURE() << label << ": no exception thrown; expected one mentioning " << parts.front();
  } catch (const std::invalid_argument& error) {
    const std::string message = error.what();
    for (const std::string& part : parts) EXPECT_NE(message.find(part), std::string::npos) << label << ": " << message;
  }
}

template <typename Scalar>
class BlockBackward : public ::testing::Test {};
TYPED_TEST_SUITE(BlockBackward, mhc::test::ScalarTypes, mhc::test::ScalarTypeNames);

// ---------------------------------------------------------------------------------------------
// Tests.

TYPED_TEST(BlockBackward, MatchesFreeFunctions) {
  using Scalar = TypeParam;
  std::uint32_t seed = 100;
  for (Connection connection : kConnections) {
    for (int n : stream_counts(connection)) {
      for (int channels : {1, 5, 17}) {
        for (Eigen::Index tokens : {0, 1, 3}) {
          const std::string label = case_name(connection, n, channels, tokens);
          const HyperConnection<Scalar> block = random_block<Scalar>(connection, n, channels, seed);
          const TanhMlp<Scalar> mlp = TanhMlp<Scalar>::random(channels, 6, seed + 20);
          const RowMatrix<Scalar> x = random_matrix<Scalar>(tokens, n * channels, seed + 30);
          const RowMatrix<Scalar> grad_x_next = random_matrix<Scalar>(tokens, n * channels, seed + 31);
          seed += 40;

          auto actual = block.backward(x, grad_x_next, mlp, [&](const RowMatrix<Scalar>& input, const RowMatrix<Scalar>& grad) {
            return mlp.backward(input, grad);
          });
          ASSERT_EQ(static_cast<int>(actual.parameters.index()), static_cast<int>(connection)) << label;
          std::visit(
              [&](const auto& parameters) {
                using ParametersType = std::decay_t<decltype(parameters)>;
                auto expected = free_backward(parameters, x, grad_x_next, mlp);
                auto& gradient = std::get<ParametersType>(actual.parameters);
                EXPECT_EQ(gradient.streams, n) << label;
                EXPECT_EQ(gradient.channels, channels) << label;
                expect_bitwise_equal(actual.x, expected.x, label + " x");
                expect_fields_bitwise_equal(fields(gradient), fields(expected.parameters), label);
              },
              block.parameters());
        }
      }
    }
  }
}

TYPED_TEST(BlockBackward, HalvesMatchOneCall) {
  using Scalar = TypeParam;
  for (Connection connection : kConnections) {
    const int n = connection == Connection::residual ? 1 : 3;
    const HyperConnection<Scalar> block = random_block<Scalar>(connection, n, 7, 200);
    const TanhMlp<Scalar> mlp = TanhMlp<Scalar>::random(7, 5, 210);
    const RowMatrix<Scalar> x = random_matrix<Scalar>(4, n * 7, 220);
    const RowMatrix<Scalar> grad_x_next = random_matrix<Scalar>(4, n * 7, 221);
    const auto branch_backward = [&](const RowMatrix<Scalar>& input, const RowMatrix<Scalar>& grad) {
      return mlp.backward(input, grad);
    };

    const mhc::BranchInput<Scalar> prepared = block.prepare_branch(x);
    const RowMatrix<Scalar> output = mlp(prepared.input);
    const mhc::MergeBackward<Scalar> merged = block.merge_backward(x, output, grad_x_next);
    const RowMatrix<Scalar> grad_input = mlp.backward(prepared.input, merged.gradients.branch_output);
    expect_gradients_bitwise_equal<Scalar>(block.prepare_branch_backward(x, merged, grad_input),
                                           block.backward(x, grad_x_next, mlp, branch_backward),
                                           mhc::to_string(connection));
  }
}

TYPED_TEST(BlockBackward, KeptMatchesRecomputed) {
  using Scalar = TypeParam;
  Options options;
  options.rms_epsilon = 1e-3;
  options.sinkhorn.iterations = 7;
  for (Connection connection : kConnections) {
    const int n = connection == Connection::residual ? 1 : 4;
    const HyperConnection<Scalar> block = random_block<Scalar>(connection, n, 5, 300);
    const TanhMlp<Scalar> mlp = TanhMlp<Scalar>::random(5, 4, 310);
    const RowMatrix<Scalar> x = random_matrix<Scalar>(6, n * 5, 320);
    const RowMatrix<Scalar> grad_x_next = random_matrix<Scalar>(6, n * 5, 321);

    mhc::BranchInput<Scalar> prepared = block.prepare_branch(x, options);
    const RowMatrix<Scalar> output = mlp(prepared.input);
    const mhc::MergeBackward<Scalar> kept =
        block.merge_backward(x, std::move(prepared.coefficients), output, grad_x_next, options);
    const mhc::MergeBackward<Scalar> recomputed = block.merge_backward(x, output, grad_x_next, options);
    const std::string label = mhc::to_string(connection);
    expect_bitwise_equal(kept.coefficients.pre, recomputed.coefficients.pre, label + " pre");
    expect_bitwise_equal(kept.coefficients.post, recomputed.coefficients.post, label + " post");
    expect_bitwise_equal(kept.coefficients.res, recomputed.coefficients.res, label + " res");
    expect_bitwise_equal(kept.gradients.branch_output, recomputed.gradients.branch_output, label + " branch_output");

    const RowMatrix<Scalar> grad_input = mlp.backward(prepared.input, kept.gradients.branch_output);
    expect_gradients_bitwise_equal<Scalar>(block.prepare_branch_backward(x, kept, grad_input, options),
                                           block.prepare_branch_backward(x, recomputed, grad_input, options), label);
  }
}

// Central differences with step 1e-6 in double have a truncation error near 1e-12 and a rounding
// error near 1e-16 * |loss| / 1e-6, about 1e-9 for the losses below (|loss| < 100), so 1e-6
// absolute plus 1e-6 relative leaves a margin of about 1000.
double difference_tolerance(double value) { return 1e-6 * (1.0 + std::abs(value)); }

TEST(BlockBackwardDouble, MatchesFiniteDifferences) {
  const int channels = 4;
  const Eigen::Index tokens = 3;
  Options options;
  options.rms_epsilon = 1e-3;
  std::uint32_t seed = 400;
  for (Connection connection : kConnections) {
    for (int n : {1, 2, 3}) {
      if (connection == Connection::residual && n != 1) continue;
      const std::string label = case_name(connection, n, channels, tokens);
      HyperConnection<double> block = random_block<double>(connection, n, channels, seed);
      const TanhMlp<double> mlp = TanhMlp<double>::random(channels, 6, seed + 20);
      RowMatrix<double> x = random_matrix<double>(tokens, n * channels, seed + 30);
      const RowMatrix<double> grad_x_next = random_matrix<double>(tokens, n * channels, seed + 31);
      seed += 40;

      // loss = <grad_x_next, forward(x)>, so its gradient is label backward() returns.
      const auto loss = [&] { return (block.forward(x, mlp, options).array() * grad_x_next.array()).sum(); };
      const auto difference = [&](double& value) {
        const double saved = value;
        return mhc::test::central_difference(
            [&](double step) {
              value = saved + step;
              const double result = loss();
              value = saved;
              return result;
            },
            1e-6);
      };

      auto gradients = block.backward(
          x, grad_x_next, mlp, [&](const RowMatrix<double>& input, const RowMatrix<double>& grad) {
            return mlp.backward(input, grad);
          },
          options);
      for (Eigen::Index k = 0; k < x.size(); ++k) {
        const double numeric = difference(x.data()[k]);
        EXPECT_NEAR(gradients.x.data()[k], numeric, difference_tolerance(numeric)) << label << " x entry " << k;
      }

      const std::vector<Field<double>> analytic = rule_fields<double>(gradients.parameters);
      const std::vector<Field<double>> values = rule_fields<double>(block.parameters());
      ASSERT_EQ(analytic.size(), values.size()) << label;
      for (std::size_t f = 0; f < values.size(); ++f) {
        ASSERT_EQ(analytic[f].size, values[f].size) << label << " " << values[f].name;
        for (Eigen::Index k = 0; k < values[f].size; ++k) {
          const double numeric = difference(values[f].data[k]);
          EXPECT_NEAR(analytic[f].data[k], numeric, difference_tolerance(numeric))
              << label << " " << values[f].name << " entry " << k;
        }
      }
    }
  }
}

TYPED_TEST(BlockBackward, EmptyBatchGivesEmptyGradients) {
  using Scalar = TypeParam;
  for (Connection connection : kConnections) {
    const int n = connection == Connection::residual ? 1 : 2;
    const HyperConnection<Scalar> block = random_block<Scalar>(connection, n, 3, 500);
    const TanhMlp<Scalar> mlp = TanhMlp<Scalar>::random(3, 4, 510);
    const RowMatrix<Scalar> x(0, n * 3);
    auto gradients = block.backward(x, x, mlp, [&](const RowMatrix<Scalar>& input, const RowMatrix<Scalar>& grad) {
      return mlp.backward(input, grad);
    });
    const std::string label = mhc::to_string(connection);
    EXPECT_EQ(gradients.x.rows(), 0) << label;
    EXPECT_EQ(gradients.x.cols(), n * 3) << label;
    // The residual rule returns a copy of its parameters, which have no learned values. Every
    // other rule sums its gradients over no tokens.
    for (const Field<Scalar>& field : rule_fields<Scalar>(gradients.parameters)) {
      for (Eigen::Index k = 0; k < field.size; ++k) EXPECT_EQ(field.data[k], Scalar(0)) << label << " " << field.name;
    }
  }
}

TYPED_TEST(BlockBackward, RejectsBadInput) {
  using Scalar = TypeParam;
  const int channels = 3;
  const Eigen::Index tokens = 4;
  for (Connection connection : kConnections) {
    const int n = connection == Connection::residual ? 1 : 2;
    const int width = n * channels;
    const std::string label = mhc::to_string(connection);
    const HyperConnection<Scalar> block = random_block<Scalar>(connection, n, channels, 600);
    const TanhMlp<Scalar> mlp = TanhMlp<Scalar>::random(channels, 4, 610);
    const auto branch_backward = [&](const RowMatrix<Scalar>& input, const RowMatrix<Scalar>& grad) {
      return mlp.backward(input, grad);
    };
    const RowMatrix<Scalar> x = random_matrix<Scalar>(tokens, width, 620);
    const RowMatrix<Scalar> grad_x_next = random_matrix<Scalar>(tokens, width, 621);
    const mhc::BranchInput<Scalar> prepared = block.prepare_branch(x);
    const RowMatrix<Scalar> output = mlp(prepared.input);
    const mhc::MergeBackward<Scalar> merged = block.merge_backward(x, output, grad_x_next);
    const RowMatrix<Scalar> grad_input = mlp.backward(prepared.input, merged.gradients.branch_output);

    const std::string one_call = "mhc::HyperConnection::backward";
    const std::string merge = "mhc::HyperConnection::merge_backward";
    const std::string second_half = "mhc::HyperConnection::prepare_branch_backward";
    const std::string width_text = std::to_string(width) + " columns";

    const RowMatrix<Scalar> wide_x = random_matrix<Scalar>(tokens, width + 1, 630);
    expect_invalid_argument([&] { block.backward(wide_x, grad_x_next, mlp, branch_backward); },
                            {one_call, "invalid x", width_text}, label);
    expect_invalid_argument([&] { block.merge_backward(wide_x, output, grad_x_next); },
                            {merge, "invalid x", width_text}, label);
    expect_invalid_argument([&] { block.prepare_branch_backward(wide_x, merged, grad_input); },
                            {second_half, "invalid x", width_text}, label);

    const RowMatrix<Scalar> short_grad = grad_x_next.topRows(tokens - 1);
    expect_invalid_argument([&] { block.backward(x, short_grad, mlp, branch_backward); },
                            {one_call, "grad_x_next", "got 3 x"}, label);
    expect_invalid_argument([&] { block.merge_backward(x, output, short_grad); }, {merge, "grad_x_next"}, label);

    const RowMatrix<Scalar> narrow_output = output.leftCols(channels - 1);
    expect_invalid_argument([&] { block.merge_backward(x, narrow_output, grad_x_next); },
                            {merge, "branch_output", "shape 4 x 3", "got 4 x 2"}, label);

    const auto wide_branch = [&](const RowMatrix<Scalar>& input) {
      return RowMatrix<Scalar>(RowMatrix<Scalar>::Zero(input.rows(), channels + 1));
    };
    expect_invalid_argument([&] { block.backward(x, grad_x_next, wide_branch, branch_backward); },
                            {one_call, "branch output", "got 4 x 4"}, label);
    const auto short_branch_backward = [&](const RowMatrix<Scalar>&, const RowMatrix<Scalar>&) {
      return RowMatrix<Scalar>(RowMatrix<Scalar>::Zero(tokens - 1, channels));
    };
    expect_invalid_argument([&] { block.backward(x, grad_x_next, mlp, short_branch_backward); },
                            {one_call, "branch_backward output", "got 3 x 3"}, label);

    Coefficients<Scalar> short_coefficients = prepared.coefficients;
    short_coefficients.res.conservativeResize(tokens - 1, Eigen::NoChange);
    expect_invalid_argument([&] { block.merge_backward(x, short_coefficients, output, grad_x_next); },
                            {merge, "coefficients.res", "got 3 x"}, label);

    mhc::MergeBackward<Scalar> short_merged = merged;
    short_merged.gradients.post.conservativeResize(tokens - 1, Eigen::NoChange);
    expect_invalid_argument([&] { block.prepare_branch_backward(x, short_merged, grad_input); },
                            {second_half, "merged.gradients.post"}, label);
    const RowMatrix<Scalar> narrow_grad_input = grad_input.leftCols(channels - 1);
    expect_invalid_argument([&] { block.prepare_branch_backward(x, merged, narrow_grad_input); },
                            {second_half, "grad_branch_input", "got 4 x 2"}, label);

    Options zero_epsilon;
    zero_epsilon.rms_epsilon = 0.0;
    expect_invalid_argument([&] { block.backward(x, grad_x_next, mlp, branch_backward, zero_epsilon); },
                            {one_call, "options.rms_epsilon"}, label);
    expect_invalid_argument([&] { block.merge_backward(x, output, grad_x_next, zero_epsilon); },
                            {merge, "options.rms_epsilon"}, label);
  }
}

TYPED_TEST(BlockBackward, RejectsBrokenParameters) {
  using Scalar = TypeParam;
  const TanhMlp<Scalar> mlp = TanhMlp<Scalar>::random(3, 4, 700);
  const auto branch_backward = [&](const RowMatrix<Scalar>& input, const RowMatrix<Scalar>& grad) {
    return mlp.backward(input, grad);
  };
  const auto expect_rejected = [&](const HyperConnection<Scalar>& block, const std::string& argument,
                                   const std::string& label) {
    const RowMatrix<Scalar> x = random_matrix<Scalar>(2, block.streams() * 3, 710);
    expect_invalid_argument([&] { block.backward(x, x, mlp, branch_backward); },
                            {"mhc::HyperConnection::backward", argument}, label);
  };

  ResidualParameters<Scalar> residual = ResidualParameters<Scalar>::identity(3);
  residual.streams = 2;
  expect_rejected(HyperConnection<Scalar>(residual), "parameters.streams", "residual");

  StaticParameters<Scalar> fixed = StaticParameters<Scalar>::identity(2, 3, 0);
  fixed.pre.resize(3);
  expect_rejected(HyperConnection<Scalar>(fixed), "parameters.pre", "static_hc");

  DynamicParameters<Scalar> dynamic = DynamicParameters<Scalar>::identity(2, 3, 0);
  dynamic.res_weight.resize(3, 3);
  expect_rejected(HyperConnection<Scalar>(dynamic), "parameters.res_weight", "dynamic_hc");

  Parameters<Scalar> layer = Parameters<Scalar>::identity(2, 3, 0);
  layer.alpha_res = std::numeric_limits<Scalar>::quiet_NaN();
  expect_rejected(HyperConnection<Scalar>(layer), "parameters.alpha_res", "mhc");

  LiteParameters<Scalar> lite = LiteParameters<Scalar>::identity(2, 3, 0);
  lite.bias.resize(5);
  expect_rejected(HyperConnection<Scalar>(lite), "parameters.bias", "mhc_lite");

  // Only the mHC rule runs Sinkhorn-Knopp, so only it rejects a negative iteration count.
  Options negative_iterations;
  negative_iterations.sinkhorn.iterations = -1;
  const RowMatrix<Scalar> x = random_matrix<Scalar>(2, 6, 720);
  const auto mhc_block = HyperConnection<Scalar>::create(Connection::mhc, 2, 3, 0);
  expect_invalid_argument([&] { mhc_block.backward(x, x, mlp, branch_backward, negative_iterations); },
                          {"mhc::HyperConnection::backward", "options.sinkhorn.iterations", "got -1"}, "mhc");
  const auto static_block = HyperConnection<Scalar>::create(Connection::static_hc, 2, 3, 0);
  EXPECT_NO_THROW(static_block.backward(x, x, mlp, branch_backward, negative_iterations));
}

}  // namespace
