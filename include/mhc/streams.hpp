// Stream expansion at a model's input and reduction at its output.
//
// A model expands its embedding into n streams once, runs every layer on the T x (n*C) state,
// and reduces once before the final norm. Expanding and reducing inside every layer would
// discard the extra streams and turn the model back into a plain residual network.
#pragma once

#include <mhc/common.hpp>
#include <mhc/detail/layer_checks.hpp>

namespace mhc {

// Copies the T x C `embedding` into each of `streams` streams: returns T x (streams * C).
template <typename Derived>
RowMatrix<typename Derived::Scalar> expand_streams(const Eigen::MatrixBase<Derived>& embedding, int streams) {
  detail::check_positive("mhc::expand_streams", "streams", streams);
  const Eigen::Index channels = embedding.cols();
  RowMatrix<typename Derived::Scalar> state(embedding.rows(), streams * channels);
  // Column blocks of an empty matrix would offset a null pointer, so T = 0 returns here.
  if (embedding.rows() == 0) return state;
  for (int i = 0; i < streams; ++i) state.middleCols(i * channels, channels) = embedding;
  return state;
}

// Sums the streams of the T x (streams * C) `state`: returns T x C.
template <typename Derived>
RowMatrix<typename Derived::Scalar> reduce_streams(const Eigen::MatrixBase<Derived>& state, int streams) {
  const char* function = "mhc::reduce_streams";
  detail::check_positive(function, "streams", streams);
  detail::check_width_multiple(function, "state", state, streams);
  const Eigen::Index channels = state.cols() / streams;
  if (state.rows() == 0) return RowMatrix<typename Derived::Scalar>(0, channels);
  RowMatrix<typename Derived::Scalar> sum = state.leftCols(channels);
  for (int i = 1; i < streams; ++i) sum += state.middleCols(i * channels, channels);
  return sum;
}

}  // namespace mhc
