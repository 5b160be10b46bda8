// Per-token building blocks of the fused kernels in <mhc/fused.hpp>.
//
// Every function here works on one token in the accumulation type Acc (float or double),
// through raw pointers that the caller has checked. The products with phi work on groups of
// tokens and live in <mhc/detail/fused_projection.hpp>. Vector code uses Eigen's packet
// primitives, so it is correct for any instruction set Eigen targets and uses wider registers
// when the compiler is allowed to (-march=native).
// Template parameter N is the stream count when it is fixed at compile time, or 0 when it is
// only known at run time (then the argument `streams` is used).
#pragma once

#include <mhc/common.hpp>
#include <mhc/detail/fused_projection.hpp>
#include <mhc/layer.hpp>
#include <mhc/sinkhorn.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

// Packet types such as __m128 carry vector attributes, and GCC warns that they are ignored when
// such a type is a template argument. Here the packet types only select overloads and sizes, so
// the warning is off in this header, as Eigen turns it off in its own.
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"
#endif

namespace mhc::detail::fused {

using Eigen::Index;

// Stream count as a compile-time constant when N > 0.
template <int N>
constexpr int stream_count(int streams) {
  return N > 0 ? N : streams;
}

// ---------------------------------------------------------------------------------------------
// Conversions between the storage type and the accumulation type.

template <typename Acc, typename Storage>
void convert_row(const Storage* source, Index count, Acc* target) {
  for (Index k = 0; k < count; ++k) target[k] = static_cast<Acc>(source[k]);
}

// bfloat16 is the upper half of a float, so widening is a shift. Both conversions work on the
// bits in plain loops, which the compiler can vectorise.
inline void convert_row(const Eigen::bfloat16* source, Index count, float* target) {
  for (Index k = 0; k < count; ++k) {
    const std::uint32_t bits = std::uint32_t(Eigen::numext::bit_cast<std::uint16_t>(source[k])) << 16;
    target[k] = Eigen::numext::bit_cast<float>(bits);
  }
}

// Rounds to the nearest bfloat16, ties to even, as Eigen's conversion does; NaN stays NaN.
inline void convert_row(const float* source, Index count, Eigen::bfloat16* target) {
  for (Index k = 0; k < count; ++k) {
    const std::uint32_t bits = Eigen::numext::bit_cast<std::uint32_t>(source[k]);
    const std::uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    const bool is_nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
    const auto half = static_cast<std::uint16_t>(is_nan ? ((bits >> 16) | 0x0040u) : rounded);
    target[k] = Eigen::numext::bit_cast<Eigen::bfloat16>(half);
  }
}

// Copies columns [0, columns) of `tokens` rows of x (row stride `stride`) to `packed` in the
// order that accumulate_phi_gradient reads. That is tiles of kGradientTileRows columns (the last
// one narrower), each stored token by token. So the tile starting at column i0 begins at
// packed + i0 * tokens and has row stride min(kGradientTileRows, columns - i0).
// The segments of x are read row by row, and each is prefetched a few rows ahead, because they
// come from memory and are too short for the hardware prefetcher to follow.
template <typename Storage, typename Acc>
void pack_gradient_block(const Storage* x, Index stride, Index tokens, Index columns, Acc* packed) {
  constexpr Index kAhead = 4;  // rows
  constexpr Index kLine = 64 / sizeof(Storage);
  for (Index t = 0; t < tokens; ++t) {
    const Storage* row = x + t * stride;
    if (t + kAhead < tokens) {
      for (Index i = 0; i < columns; i += kLine) Eigen::internal::prefetch(row + kAhead * stride + i);
    }
    for (Index first = 0; first < columns; first += kGradientTileRows) {
      const Index width = std::min<Index>(kGradientTileRows, columns - first);
      Acc* tile_row = packed + first * tokens + t * width;
      if constexpr (std::is_same_v<Storage, Acc>) {
        if (width == kGradientTileRows) {
          for (int i = 0; i < kGradientTileRows; ++i) tile_row[i] = row[first + i];  // one or two vector moves
        } else {
          std::copy(row + first, row + first + width, tile_row);
        }
      } else {
        convert_row(row + first, width, tile_row);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Row reductions and the two stream mixes.

template <typename Acc>
Acc sum_of_squares(const Acc* row, Index count) {
  using P = Packet<Acc>;
  constexpr Index L = packet_size<Acc>;
  P sums[4] = {Eigen::internal::pset1<P>(Acc(0)), Eigen::internal::pset1<P>(Acc(0)),
               Eigen::internal::pset1<P>(Acc(0)), Eigen::internal::pset1<P>(Acc(0))};
  Index k = 0;
  for (; k + 4 * L <= count; k += 4 * L) {
    for (int u = 0; u < 4; ++u) {
      const P value = Eigen::internal::ploadu<P>(row + k + u * L);
      sums[u] = Eigen::internal::pmadd(value, value, sums[u]);
    }
  }
  for (; k + L <= count; k += L) {
    const P value = Eigen::internal::ploadu<P>(row + k);
    sums[0] = Eigen::internal::pmadd(value, value, sums[0]);
  }
  const P total = Eigen::internal::padd(Eigen::internal::padd(sums[0], sums[1]),
                                        Eigen::internal::padd(sums[2], sums[3]));
  Acc sum = Eigen::internal::predux(total);
  for (; k < count; ++k) sum += row[k] * row[k];
  return sum;
}

// out[c] = sum_i weights[i] * x[i * channels + c]: the branch input h_in = H_pre x of one token.
template <int N, typename Acc>
void aggregate_row(const Acc* x, int streams, Index channels, const Acc* weights, Acc* out) {
  using P = Packet<Acc>;
  constexpr Index L = packet_size<Acc>;
  const int n = stream_count<N>(streams);
  Index c = 0;
  for (; c + L <= channels; c += L) {
    P sum = Eigen::internal::pmul(Eigen::internal::pset1<P>(weights[0]), Eigen::internal::ploadu<P>(x + c));
    for (int i = 1; i < n; ++i) {
      sum = Eigen::internal::pmadd(Eigen::internal::pset1<P>(weights[i]),
                                   Eigen::internal::ploadu<P>(x + i * channels + c), sum);
    }
    Eigen::internal::pstoreu(out + c, sum);
  }
  for (; c < channels; ++c) {
    Acc sum = weights[0] * x[c];
    for (int i = 1; i < n; ++i) sum += weights[i] * x[i * channels + c];
    out[c] = sum;
  }
}

// Non-temporal stores of one packet, for outputs larger than the last-level cache: they skip the
// read-for-ownership of each written line, which otherwise adds n*C reads per token to the merge.
// `address` must be aligned to the packet size. Without SSE2 this is an ordinary store.
#if defined(__AVX512F__)
inline void stream_packet(float* address, const __m512& value) { _mm512_stream_ps(address, value); }
inline void stream_packet(double* address, const __m512d& value) { _mm512_stream_pd(address, value); }
#endif
#if defined(__AVX__)
inline void stream_packet(float* address, const __m256& value) { _mm256_stream_ps(address, value); }
inline void stream_packet(double* address, const __m256d& value) { _mm256_stream_pd(address, value); }
#endif
#if defined(__SSE2__)
inline void stream_packet(float* address, const __m128& value) { _mm_stream_ps(address, value); }
inline void stream_packet(double* address, const __m128d& value) { _mm_stream_pd(address, value); }
#endif
template <typename Acc, typename P>
void stream_packet(Acc* address, const P& value) {
  Eigen::internal::pstoreu(address, value);
}

// Orders earlier non-temporal stores before later stores, so that other threads see the data
// once the thread pool reports the task done.
inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// Stores one packet of output, non-temporally when kStream and the address is aligned.
template <bool kStream, typename Acc, typename P>
void store_output(Acc* address, const P& value) {
  if constexpr (kStream) {
    if (reinterpret_cast<std::uintptr_t>(address) % sizeof(P) == 0) {
      stream_packet(address, value);
      return;
    }
  }
  Eigen::internal::pstoreu(address, value);
}

// Channels per tile of the dynamic-n merge: n + 2 rows of this many values stay in L1.
constexpr Index kMergeTile = 256;

// out[i * channels + c] = sum_j mixing[i * n + j] * x[j * channels + c] + post[i] * h[c]: the
// residual update x_next = H_res x + H_post^T h_out of one token. `out` must not overlap x or h.
// With kStream, aligned packets of `out` are written with non-temporal stores.
template <int N, bool kStream, typename Acc>
void merge_row(const Acc* x, int streams, Index channels, const Acc* h, const Acc* mixing, const Acc* post,
               Acc* out) {
  using P = Packet<Acc>;
  constexpr Index L = packet_size<Acc>;
  const int n = stream_count<N>(streams);
  for (Index tile = 0; tile < channels; tile += kMergeTile) {
    const Index end = std::min(channels, tile + kMergeTile);
    for (int i = 0; i < n; ++i) {
      const Acc* mixing_row = mixing + i * n;
      const P post_i = Eigen::internal::pset1<P>(post[i]);
      Acc* out_i = out + i * channels;
      Index c = tile;
      for (; c + L <= end; c += L) {
        P sum = Eigen::internal::pmul(post_i, Eigen::internal::ploadu<P>(h + c));
        for (int j = 0; j < n; ++j) {
          sum = Eigen::internal::pmadd(Eigen::internal::pset1<P>(mixing_row[j]),
                                       Eigen::internal::ploadu<P>(x + j * channels + c), sum);
        }
        store_output<kStream>(out_i + c, sum);
      }
      for (; c < end; ++c) {
        Acc sum = post[i] * h[c];
        for (int j = 0; j < n; ++j) sum += mixing_row[j] * x[j * channels + c];
        out_i[c] = sum;
      }
    }
  }
}

// Backward of merge_row for one token, given grad_next = dL/dx_next (n x C):
//   grad_x[j * channels + c] = sum_i mixing[i * n + j] * grad_next[i * channels + c]  (H_res^T dx_next)
//   grad_h[c]                = sum_i post[i] * grad_next[i * channels + c]
//   grad_post[i]             = <grad_next[stream i], h>
//   grad_mixing[i * n + j]   = <grad_next[stream i], x[stream j]>
// `partial_sums` is scratch for (n*n + n) packets of partial dot products. The outputs must not
// overlap the inputs. With kStream, aligned packets of grad_x are written with non-temporal
// stores.
template <int N, bool kStream, typename Acc>
void merge_row_backward(const Acc* x, int streams, Index channels, const Acc* h, const Acc* mixing, const Acc* post,
                        const Acc* grad_next, Acc* grad_x, Acc* grad_h, Acc* grad_post, Acc* grad_mixing,
                        Acc* partial_sums) {
  using P = Packet<Acc>;
  constexpr Index L = packet_size<Acc>;
  const int n = stream_count<N>(streams);
  const int dots = n * n + n;  // mixing entries first, then post
  for (int d = 0; d < dots; ++d) Eigen::internal::pstoreu(partial_sums + d * L, Eigen::internal::pset1<P>(Acc(0)));

  for (Index tile = 0; tile < channels; tile += kMergeTile) {
    const Index end = std::min(channels, tile + kMergeTile);
    const Index packet_end = tile + (end - tile) / L * L;

    // The two stream mixes, each output written once.
    for (int j = 0; j < n; ++j) {
      for (Index c = tile; c < packet_end; c += L) {
        P sum = Eigen::internal::pmul(Eigen::internal::pset1<P>(mixing[j]), Eigen::internal::ploadu<P>(grad_next + c));
        for (int i = 1; i < n; ++i) {
          sum = Eigen::internal::pmadd(Eigen::internal::pset1<P>(mixing[i * n + j]),
                                       Eigen::internal::ploadu<P>(grad_next + i * channels + c), sum);
        }
        store_output<kStream>(grad_x + j * channels + c, sum);
      }
    }
    for (Index c = tile; c < packet_end; c += L) {
      P sum = Eigen::internal::pmul(Eigen::internal::pset1<P>(post[0]), Eigen::internal::ploadu<P>(grad_next + c));
      for (int i = 1; i < n; ++i) {
        sum = Eigen::internal::pmadd(Eigen::internal::pset1<P>(post[i]),
                                     Eigen::internal::ploadu<P>(grad_next + i * channels + c), sum);
      }
      Eigen::internal::pstoreu(grad_h + c, sum);
    }

    // Dot products of grad_next with x and h over the tile, which is still in L1.
    for (int i = 0; i < n; ++i) {
      const Acc* grad_i = grad_next + i * channels;
      for (int j = 0; j <= n; ++j) {
        const Acc* other = j < n ? x + j * channels : h;
        Acc* partial = partial_sums + (j < n ? i * n + j : n * n + i) * L;
        P sum = Eigen::internal::ploadu<P>(partial);
        for (Index c = tile; c < packet_end; c += L) {
          sum = Eigen::internal::pmadd(Eigen::internal::ploadu<P>(grad_i + c), Eigen::internal::ploadu<P>(other + c), sum);
        }
        Eigen::internal::pstoreu(partial, sum);
      }
    }

    // Channels after the last whole packet of the tile.
    for (Index c = packet_end; c < end; ++c) {
      Acc sum_h = 0;
      for (int i = 0; i < n; ++i) sum_h += post[i] * grad_next[i * channels + c];
      grad_h[c] = sum_h;
      for (int j = 0; j < n; ++j) {
        Acc sum = 0;
        for (int i = 0; i < n; ++i) sum += mixing[i * n + j] * grad_next[i * channels + c];
        grad_x[j * channels + c] = sum;
      }
    }
  }

  for (int i = 0; i < n; ++i) {
    for (int j = 0; j <= n; ++j) {
      const Acc* other = j < n ? x + j * channels : h;
      const int d = j < n ? i * n + j : n * n + i;
      Acc sum = Eigen::internal::predux(Eigen::internal::ploadu<P>(partial_sums + d * L));
      for (Index tile = 0; tile < channels; tile += kMergeTile) {
        const Index end = std::min(channels, tile + kMergeTile);
        for (Index c = tile + (end - tile) / L * L; c < end; ++c) sum += grad_next[i * channels + c] * other[c];
      }
      if (j < n) {
        grad_mixing[i * n + j] = sum;
      } else {
        grad_post[i] = sum;
      }
    }
  }
}

// Backward of aggregate_row for one token, given grad_h = dL/dh_in (C values):
//   grad_x[i * channels + c] (+)= weights[i] * grad_h[c]  (added when kAccumulate)
//   grad_weights[i]             = <grad_h, x[stream i]>
template <int N, bool kAccumulate, typename Acc>
void aggregate_row_backward(const Acc* x, int streams, Index channels, const Acc* weights, const Acc* grad_h,
                            Acc* grad_x, Acc* grad_weights) {
  using P = Packet<Acc>;
  constexpr Index L = packet_size<Acc>;
  const int n = stream_count<N>(streams);
  for (int i = 0; i < n; ++i) {
    const Acc* x_i = x + i * channels;
    Acc* grad_i = grad_x + i * channels;
    const P weight = Eigen::internal::pset1<P>(weights[i]);
    P dot = Eigen::internal::pset1<P>(Acc(0));
    Index c = 0;
    for (; c + L <= channels; c += L) {
      const P g = Eigen::internal::ploadu<P>(grad_h + c);
      dot = Eigen::internal::pmadd(g, Eigen::internal::ploadu<P>(x_i + c), dot);
      P value = Eigen::internal::pmul(weight, g);
      if constexpr (kAccumulate) value = Eigen::internal::padd(Eigen::internal::ploadu<P>(grad_i + c), value);
      Eigen::internal::pstoreu(grad_i + c, value);
    }
    Acc sum = Eigen::internal::predux(dot);
    for (; c < channels; ++c) {
      sum += grad_h[c] * x_i[c];
      grad_i[c] = kAccumulate ? grad_i[c] + weights[i] * grad_h[c] : weights[i] * grad_h[c];
    }
    grad_weights[i] = sum;
  }
}

// ---------------------------------------------------------------------------------------------
// Coefficients of one token.

template <typename Acc>
Acc sigmoid(Acc z) {
  return Acc(1) / (Acc(1) + std::exp(-z));
}

// Scalars that turn one token's projection into coefficients.
template <typename Acc>
struct CoefficientRule {
  const Acc* bias = nullptr;  // n*n + 2n, ordered [pre | post | res]
  Acc alpha_pre = 0, alpha_post = 0, alpha_res = 0;
  double rms_epsilon = 0;
  Index width = 0;  // n*C, the length of vec(x)
  SinkhornOptions sinkhorn;
};

// max |column sum - 1| of exp(matrix) for an n x n matrix of logarithms.
template <typename Acc>
Acc log_domain_column_error(const Acc* matrix, int n) {
  Acc error = 0;
  for (int j = 0; j < n; ++j) {
    Acc sum = 0;
    for (int i = 0; i < n; ++i) sum += std::exp(matrix[i * n + j]);
    error = std::max(error, std::abs(sum - Acc(1)));
  }
  return error;
}

// Log-domain Sinkhorn-Knopp on the n x n logits in `matrix` (overwritten with the result):
// alternately subtracts the log-sum-exp of each column and of each row. Slower than the linear
// iteration but free of underflow, so it serves as the fallback when a row of exp(logits)
// underflows to zero. With a positive tolerance it stops after a round once
// max |column sum - 1| <= tolerance, like the linear iteration.
template <typename Acc>
void sinkhorn_log_domain(Acc* matrix, int n, const SinkhornOptions& options) {
  const Acc tolerance = static_cast<Acc>(options.tolerance);
  for (int round = 0; round < options.iterations; ++round) {
    for (int j = 0; j < n; ++j) {
      Acc largest = matrix[j];
      for (int i = 1; i < n; ++i) largest = std::max(largest, matrix[i * n + j]);
      Acc sum = 0;
      for (int i = 0; i < n; ++i) sum += std::exp(matrix[i * n + j] - largest);
      const Acc shift = largest + std::log(sum);
      for (int i = 0; i < n; ++i) matrix[i * n + j] -= shift;
    }
    for (int i = 0; i < n; ++i) {
      Acc* row = matrix + i * n;
      const Acc largest = *std::max_element(row, row + n);
      Acc sum = 0;
      for (int j = 0; j < n; ++j) sum += std::exp(row[j] - largest);
      const Acc shift = largest + std::log(sum);
      for (int j = 0; j < n; ++j) row[j] -= shift;
    }
    if (tolerance > 0 && log_domain_column_error(matrix, n) <= tolerance) break;
  }
  for (int k = 0; k < n * n; ++k) matrix[k] = std::exp(matrix[k]);
}

// Sinkhorn-Knopp on the n x n logits in `matrix`, overwritten with the doubly stochastic result.
// Each column's maximum is subtracted before exp: the column normalisation comes first, so this
// leaves the result unchanged and keeps exp from overflowing. Rows are normalised last, so row
// sums are exact to rounding. With a positive tolerance the iteration stops at the start of a
// round once max |column sum - 1| <= tolerance (checked after at least one round).
// Returns false, with `matrix` undefined, when a row of exp(logits) underflowed to zero.
template <int N, typename Acc>
bool sinkhorn_linear(Acc* matrix, int streams, const SinkhornOptions& options) {
  const int n = stream_count<N>(streams);
  constexpr int kStackStreams = N > 0 ? N : 32;
  Acc column_scale_stack[kStackStreams];
  std::vector<Acc> column_scale_heap;
  Acc* column_scale = column_scale_stack;
  if (n > kStackStreams) {
    // NOTE: stream counts above 32 allocate here once per token.
    column_scale_heap.resize(static_cast<std::size_t>(n));
    column_scale = column_scale_heap.data();
  }

  for (int j = 0; j < n; ++j) {
    Acc largest = matrix[j];
    for (int i = 1; i < n; ++i) largest = std::max(largest, matrix[i * n + j]);
    column_scale[j] = largest;
  }
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j < n; ++j) matrix[i * n + j] = std::exp(matrix[i * n + j] - column_scale[j]);
  }

  const Acc tolerance = static_cast<Acc>(options.tolerance);
  for (int round = 0; round < options.iterations; ++round) {
    for (int j = 0; j < n; ++j) column_scale[j] = 0;
    for (int i = 0; i < n; ++i) {
      for (int j = 0; j < n; ++j) column_scale[j] += matrix[i * n + j];
    }
    if (round > 0 && tolerance > 0) {
      Acc column_error = 0;
      for (int j = 0; j < n; ++j) column_error = std::max(column_error, std::abs(column_scale[j] - Acc(1)));
      if (column_error <= tolerance) return true;
    }
    // Every column contains its maximum, exp(0) = 1, before the first round and keeps a
    // positive sum afterwards, so only the row sums below can vanish.
    for (int j = 0; j < n; ++j) column_scale[j] = Acc(1) / column_scale[j];
    for (int i = 0; i < n; ++i) {
      Acc* row = matrix + i * n;
      Acc row_sum = 0;
      for (int j = 0; j < n; ++j) {
        row[j] *= column_scale[j];
        row_sum += row[j];
      }
      if (!(row_sum > std::numeric_limits<Acc>::min())) return false;
      const Acc row_scale = Acc(1) / row_sum;
      for (int j = 0; j < n; ++j) row[j] *= row_scale;
    }
  }
  return true;
}

// 1/r = (mean(row^2) + epsilon)^(-1/2) of one token row of `width` values, or NaN when the row
// has a NaN or infinite entry. The vectorised sum of squares runs in Acc. When it overflows
// (float entries above about 1e18), the reference kernels' inverse_rms computes 1/r again, in
// double and with the row scaled by its largest magnitude.
template <typename Acc>
Acc token_inverse_rms(const Acc* row, Index width, double epsilon) {
  const Acc squares = sum_of_squares(row, width);
  if (std::isfinite(squares)) {
    return Acc(1) / std::sqrt(squares / static_cast<Acc>(width) + static_cast<Acc>(epsilon));
  }
  const Eigen::Map<const RowVector<Acc>> values(row, width);
  if (!values.allFinite()) return std::numeric_limits<Acc>::quiet_NaN();
  return mhc::detail::inverse_rms<Acc>(values, epsilon);
}

// Computes H_pre, H_post and H_res of one token from its projection vec(x) phi (M values) and
// its 1/r.
template <int N, typename Acc>
void token_coefficients(const Acc* projection, Acc inverse_r, int streams, const CoefficientRule<Acc>& rule,
                        Acc* pre, Acc* post, Acc* res) {
  const int n = stream_count<N>(streams);
  const Acc pre_scale = rule.alpha_pre * inverse_r;
  const Acc post_scale = rule.alpha_post * inverse_r;
  const Acc res_scale = rule.alpha_res * inverse_r;
  for (int i = 0; i < n; ++i) {
    pre[i] = sigmoid(pre_scale * projection[i] + rule.bias[i]);
    post[i] = Acc(2) * sigmoid(post_scale * projection[n + i] + rule.bias[n + i]);
  }
  for (int k = 0; k < n * n; ++k) res[k] = res_scale * projection[2 * n + k] + rule.bias[2 * n + k];

  // Zero rounds leave exp(logits) unnormalised, without the column shift that the rounds undo.
  if (rule.sinkhorn.iterations == 0) {
    for (int k = 0; k < n * n; ++k) res[k] = std::exp(res[k]);
    return;
  }
  if (rule.sinkhorn.method == SinkhornMethod::linear) {
    if (sinkhorn_linear<N>(res, n, rule.sinkhorn)) return;
    for (int k = 0; k < n * n; ++k) res[k] = res_scale * projection[2 * n + k] + rule.bias[2 * n + k];
  }
  sinkhorn_log_domain(res, n, rule.sinkhorn);
}


// ---------------------------------------------------------------------------------------------
// Backward through the coefficients of one token.

// Values of scratch that token_logit_gradient needs: the n x n logits, the n x n Sinkhorn state
// and 2n normalisers per round.
inline Index logit_gradient_scratch_size(int streams, const SinkhornOptions& sinkhorn) {
  const Index n = streams;
  return 2 * n * n + 2 * n * std::max(sinkhorn.iterations, 0);
}

// Writes to grad_logits (n*n + 2n values, order [pre | post | res]) the gradient of one token's
// coefficient logits, given its projection vec(x) phi, its 1/r and the gradients of its H_pre,
// H_post and H_res (n, n and n*n values). The logits are recomputed as token_coefficients()
// computes them, and the res block goes through the Sinkhorn-Knopp kernels that
// mhc::sinkhorn_knopp_backward runs, so both give the same gradient to rounding. `scratch`
// has room for logit_gradient_scratch_size() values. `solver` is used only for
// SinkhornGradient::implicit, and must then be an n x n solver.
template <typename Acc>
void token_logit_gradient(const Acc* projection, Acc inverse_r, const Acc* grad_pre, const Acc* grad_post,
                          const Acc* grad_res, int n, const CoefficientRule<Acc>& rule, Acc* scratch,
                          mhc::detail::ImplicitGradientSolver<Acc>* solver, Acc* grad_logits) {
  const Acc pre_scale = rule.alpha_pre * inverse_r;
  const Acc post_scale = rule.alpha_post * inverse_r;
  const Acc res_scale = rule.alpha_res * inverse_r;
  for (int i = 0; i < n; ++i) {
    const Acc pre = sigmoid(pre_scale * projection[i] + rule.bias[i]);
    grad_logits[i] = grad_pre[i] * pre * (Acc(1) - pre);

    // H_post = 2 sigmoid(z), so dH_post / dz = 2 sigmoid(z) (1 - sigmoid(z)).
    const Acc post = sigmoid(post_scale * projection[n + i] + rule.bias[n + i]);
    grad_logits[n + i] = grad_post[i] * Acc(2) * post * (Acc(1) - post);
  }

  using SquareMap = Eigen::Map<RowMatrix<Acc>>;
  SquareMap logits(scratch, n, n);
  SquareMap state(scratch + n * n, n, n);
  SquareMap grad(grad_logits + 2 * n, n, n);
  Acc* trace = scratch + 2 * n * n;
  for (int k = 0; k < n * n; ++k) {
    logits.data()[k] = res_scale * projection[2 * n + k] + rule.bias[2 * n + k];
    grad.data()[k] = grad_res[k];
  }

  const SinkhornOptions& sinkhorn = rule.sinkhorn;
  const bool log_domain = sinkhorn.method == SinkhornMethod::log_domain;
  if (sinkhorn.gradient == SinkhornGradient::implicit) {
    mhc::detail::project(logits, state, sinkhorn.iterations, sinkhorn.tolerance, log_domain);
    solver->apply(state, grad);
    return;
  }
  mhc::detail::unrolled_backward(logits, state, grad, sinkhorn.iterations, sinkhorn.tolerance, log_domain, trace);
}

// Turns the gradient of one token's logits into the gradient of its projections, in place, and
// returns the factor c by which the token's row v of x enters dL/dx through 1/r: the term is
// c * (v / r). Adds the token's share of the bias and alpha gradients to `partial` (M values,
// then alpha_pre, alpha_post, alpha_res). `projection` is the token's vec(x) phi (M values) and
// `width` is n*C.
template <typename Acc>
Acc scale_logit_gradient(const Acc* projection, Acc inverse_r, const CoefficientRule<Acc>& rule, int n, Index width,
                         Acc* grad_logits, Acc* partial) {
  const Index count = Index(n) * n + 2 * n;
  const Acc alpha[3] = {rule.alpha_pre, rule.alpha_post, rule.alpha_res};
  const Index block_begin[4] = {0, n, 2 * n, count};

  // Logit k = alpha * projection_k / r + bias_k: the gradient of projection k is alpha / r times
  // the logit's, and 1/r collects alpha * projection_k times the logit's. Every product takes
  // projection_k / r first: for huge x both the logit gradient (through H_pre, which weights x)
  // and the projection are large, and their plain product would overflow a float.
  Acc scaled_grad_inverse_r(0);  // the gradient of 1/r, times 1/r
  for (int block = 0; block < 3; ++block) {
    Acc grad_alpha(0);
    for (Index k = block_begin[block]; k < block_begin[block + 1]; ++k) {
      const Acc scaled_projection = projection[k] * inverse_r;
      partial[k] += grad_logits[k];
      grad_alpha += grad_logits[k] * scaled_projection;
      scaled_grad_inverse_r += grad_logits[k] * alpha[block] * scaled_projection;
      grad_logits[k] *= alpha[block] * inverse_r;
    }
    partial[count + block] += grad_alpha;
  }
  // 1/r = (mean(v^2) + epsilon)^(-1/2) has the derivative -(1/r)^3 v / (n*C). Applied as
  // c * (v / r) with c = -(g / r) / (n*C) / r, no intermediate leaves the float range.
  return -scaled_grad_inverse_r / static_cast<Acc>(width) * inverse_r;
}

}  // namespace mhc::detail::fused

#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
