#include <mhc/mhc.hpp>

#include "support.hpp"

#include <gtest/gtest.h>

#include <vector>

namespace {

using mhc::RowMatrix;

// Stores the row-major n x n matrices `per_token` as the rows of a T x (n*n) matrix.
RowMatrix<double> stack_tokens(const std::vector<RowMatrix<double>>& per_token) {
  const Eigen::Index n = per_token.front().rows();
  RowMatrix<double> res(static_cast<Eigen::Index>(per_token.size()), n * n);
  for (std::size_t t = 0; t < per_token.size(); ++t) {
    res.row(static_cast<Eigen::Index>(t)) = Eigen::Map<const mhc::RowVector<double>>(per_token[t].data(), n * n);
  }
  return res;
}

RowMatrix<double> matrix2(double a, double b, double c, double d) {
  RowMatrix<double> m(2, 2);
  m << a, b, c, d;
  return m;
}

// Asymmetric on purpose: rows and columns have different sums, so swapping them fails.
//   A = [[1, 2], [0, 0.5]]  row sums 3, 0.5   column sums 1, 2.5
//   B = [[0, 1], [3, -1]]   row sums 1, 2     column sums 3, 0
//   C = [[2, 0], [1, 1]]    row sums 2, 2     column sums 3, 1
const RowMatrix<double> kA = matrix2(1, 2, 0, 0.5);
const RowMatrix<double> kB = matrix2(0, 1, 3, -1);
const RowMatrix<double> kC = matrix2(2, 0, 1, 1);

TEST(MixingGain, RowsAreForwardColumnsBackward) {
  const mhc::MixingGain gain = mhc::mixing_gain(kA);
  EXPECT_DOUBLE_EQ(gain.forward_max, 3.0);
  EXPECT_DOUBLE_EQ(gain.forward_min, 0.5);
  EXPECT_DOUBLE_EQ(gain.backward_max, 2.5);
  EXPECT_DOUBLE_EQ(gain.backward_min, 1.0);
}

TEST(MixingGain, UsesAbsoluteSums) {
  const mhc::MixingGain gain = mhc::mixing_gain(matrix2(-4, 1, 0.5, 0.25));
  EXPECT_DOUBLE_EQ(gain.forward_max, 3.0);
  EXPECT_DOUBLE_EQ(gain.forward_min, 0.75);
  EXPECT_DOUBLE_EQ(gain.backward_max, 3.5);
  EXPECT_DOUBLE_EQ(gain.backward_min, 1.25);
}

TEST(MixingGain, RejectsNonSquare) {
  EXPECT_THROW(mhc::mixing_gain(RowMatrix<double>::Ones(2, 3)), std::invalid_argument);
  EXPECT_THROW(mhc::mixing_gain(RowMatrix<double>(0, 0)), std::invalid_argument);
}

TEST(MeanMixingGain, AveragesOverTokens) {
  const RowMatrix<double> res = stack_tokens({kA, RowMatrix<double>::Identity(2, 2)});
  const mhc::MixingGain gain = mhc::mean_mixing_gain(res);
  EXPECT_DOUBLE_EQ(gain.forward_max, (3.0 + 1.0) / 2);
  EXPECT_DOUBLE_EQ(gain.forward_min, (0.5 + 1.0) / 2);
  EXPECT_DOUBLE_EQ(gain.backward_max, (2.5 + 1.0) / 2);
  EXPECT_DOUBLE_EQ(gain.backward_min, (1.0 + 1.0) / 2);
}

TEST(MeanMixingGain, ZeroTokensGiveZero) {
  const mhc::MixingGain gain = mhc::mean_mixing_gain(RowMatrix<float>(0, 9));
  EXPECT_EQ(gain.forward_max, 0.0);
  EXPECT_EQ(gain.backward_max, 0.0);
}

TEST(MeanMixingGain, RejectsNonSquareWidth) {
  EXPECT_THROW(mhc::mean_mixing_gain(RowMatrix<double>::Ones(3, 5)), std::invalid_argument);
  EXPECT_THROW(mhc::mean_mixing_gain(RowMatrix<double>::Ones(3, 0)), std::invalid_argument);
}

TEST(LayerGains, CompositeOrder) {
  // Layers 0, 1, 2 apply A, then B, then C. Forward composites: A, BA, CBA.
  // Backward composites: CBA, CB, C.
  //   BA  = [[0, 0.5], [3, 5.5]]  row sums 0.5, 8.5  column sums 3, 6
  //   CB  = [[0, 2], [3, 0]]      row sums 2, 3      column sums 3, 2
  //   CBA = [[0, 1], [3, 6]]      row sums 1, 9      column sums 3, 7
  const std::vector<RowMatrix<double>> layers = {stack_tokens({kA}), stack_tokens({kB}), stack_tokens({kC})};
  const std::vector<mhc::LayerGain> gains = mhc::layer_gains(layers);
  ASSERT_EQ(gains.size(), 3u);

  EXPECT_DOUBLE_EQ(gains[1].layer.forward_max, 2.0);
  EXPECT_DOUBLE_EQ(gains[1].layer.backward_min, 0.0);

  EXPECT_DOUBLE_EQ(gains[0].forward_composite.forward_max, 3.0);
  EXPECT_DOUBLE_EQ(gains[1].forward_composite.forward_max, 8.5);
  EXPECT_DOUBLE_EQ(gains[1].forward_composite.forward_min, 0.5);
  EXPECT_DOUBLE_EQ(gains[1].forward_composite.backward_max, 6.0);
  EXPECT_DOUBLE_EQ(gains[2].forward_composite.forward_max, 9.0);
  EXPECT_DOUBLE_EQ(gains[2].forward_composite.backward_max, 7.0);

  EXPECT_DOUBLE_EQ(gains[0].backward_composite.backward_max, 7.0);
  EXPECT_DOUBLE_EQ(gains[0].backward_composite.forward_max, 9.0);
  EXPECT_DOUBLE_EQ(gains[1].backward_composite.backward_max, 3.0);
  EXPECT_DOUBLE_EQ(gains[1].backward_composite.forward_min, 2.0);
  EXPECT_DOUBLE_EQ(gains[2].backward_composite.backward_max, 3.0);
  EXPECT_DOUBLE_EQ(gains[2].backward_composite.backward_min, 1.0);
}

TEST(LayerGains, AveragesCompositesOverTokens) {
  const RowMatrix<double> identity = RowMatrix<double>::Identity(2, 2);
  const std::vector<RowMatrix<double>> layers = {stack_tokens({kA, identity}), stack_tokens({kB, identity})};
  const std::vector<mhc::LayerGain> gains = mhc::layer_gains(layers);
  EXPECT_DOUBLE_EQ(gains[1].forward_composite.forward_max, (8.5 + 1.0) / 2);
  EXPECT_DOUBLE_EQ(gains[0].backward_composite.backward_max, (6.0 + 1.0) / 2);
}

TEST(LayerGains, DoublyStochasticStackStaysAtOne) {
  // Sixty layers of converged Sinkhorn projections of random logits: every composite stays
  // doubly stochastic, so all gains stay at 1 up to the projection's column error.
  mhc::SinkhornOptions options;
  options.iterations = 200;
  const int n = 4;
  std::vector<RowMatrix<double>> layers;
  for (int l = 0; l < 60; ++l) {
    const RowMatrix<double> logits = mhc::test::random_matrix<double>(n, n, 100 + l, 2.0);
    const RowMatrix<double> mixing = mhc::sinkhorn_knopp(logits, options);
    layers.push_back(stack_tokens({mixing}));
  }
  const std::vector<mhc::LayerGain> gains = mhc::layer_gains(layers);
  const double bound = 60 * mhc::test::tolerance<double>(200.0 * n);
  EXPECT_NEAR(gains.back().forward_composite.forward_max, 1.0, bound);
  EXPECT_NEAR(gains.back().forward_composite.backward_max, 1.0, bound);
  EXPECT_NEAR(gains.front().backward_composite.backward_max, 1.0, bound);
  EXPECT_NEAR(gains.front().backward_composite.forward_min, 1.0, bound);
}

TEST(LayerGains, EmptyStackAndShapeMismatch) {
  EXPECT_TRUE(mhc::layer_gains(std::vector<RowMatrix<double>>{}).empty());
  const std::vector<RowMatrix<double>> mismatched = {RowMatrix<double>::Ones(2, 4), RowMatrix<double>::Ones(3, 4)};
  EXPECT_THROW(mhc::layer_gains(mismatched), std::invalid_argument);
}

}  // namespace
