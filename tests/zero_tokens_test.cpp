// Every entry point with T = 0 tokens: empty results of the right shapes, no error. Under the
// sanitizer build this also checks that no kernel forms blocks from an empty matrix's null
// data pointer.
#include <mhc/mhc.hpp>

#include "support.hpp"

#include <gtest/gtest.h>

namespace {

using mhc::Connection;
using mhc::RowMatrix;

constexpr Connection kConnections[] = {Connection::residual, Connection::static_hc, Connection::dynamic_hc,
                                       Connection::mhc, Connection::mhc_lite};

template <typename Scalar>
class ZeroTokensTest : public ::testing::Test {};
TYPED_TEST_SUITE(ZeroTokensTest, mhc::test::ScalarTypes, mhc::test::ScalarTypeNames);

TYPED_TEST(ZeroTokensTest, StreamsExpandAndReduce) {
  using Scalar = TypeParam;
  const RowMatrix<Scalar> embedding(0, 5);

  const RowMatrix<Scalar> state = mhc::expand_streams(embedding, 3);
  const RowMatrix<Scalar> reduced = mhc::reduce_streams(state, 3);

  EXPECT_EQ(state.rows(), 0);
  EXPECT_EQ(state.cols(), 15);
  EXPECT_EQ(reduced.rows(), 0);
  EXPECT_EQ(reduced.cols(), 5);
}

TYPED_TEST(ZeroTokensTest, EveryConnectionForwardAndBackward) {
  using Scalar = TypeParam;
  const int channels = 3;
  for (const Connection connection : kConnections) {
    SCOPED_TRACE(mhc::to_string(connection));
    const int n = connection == Connection::residual ? 1 : 3;
    const auto block = mhc::HyperConnection<Scalar>::create(connection, n, channels, 1);
    const RowMatrix<Scalar> x(0, n * channels);
    const auto identity = [](const RowMatrix<Scalar>& h) { return h; };
    const auto identity_backward = [](const RowMatrix<Scalar>&, const RowMatrix<Scalar>& grad) { return grad; };

    const RowMatrix<Scalar> x_next = block.forward(x, identity);
    const auto gradients = block.backward(x, x_next, identity, identity_backward);

    EXPECT_EQ(x_next.rows(), 0);
    EXPECT_EQ(x_next.cols(), n * channels);
    EXPECT_EQ(gradients.x.rows(), 0);
    EXPECT_EQ(gradients.x.cols(), n * channels);
  }
}

TYPED_TEST(ZeroTokensTest, SinkhornBatchedForwardAndBackward) {
  using Scalar = TypeParam;
  const RowMatrix<Scalar> logits(0, 16);

  const RowMatrix<Scalar> projected = mhc::sinkhorn_knopp_batched(logits);
  const RowMatrix<Scalar> grad = mhc::sinkhorn_knopp_batched_backward(logits, projected);

  EXPECT_EQ(projected.rows(), 0);
  EXPECT_EQ(projected.cols(), 16);
  EXPECT_EQ(grad.rows(), 0);
}

TYPED_TEST(ZeroTokensTest, DiagnosticsOfEmptyBatch) {
  using Scalar = TypeParam;
  const std::vector<RowMatrix<Scalar>> layers(3, RowMatrix<Scalar>(0, 4));

  const std::vector<mhc::LayerGain> gains = mhc::layer_gains(layers);

  ASSERT_EQ(gains.size(), 3u);
  EXPECT_EQ(gains[0].forward_composite.forward_max, 0.0);
}

}  // namespace
