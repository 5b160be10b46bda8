// Per-token building blocks of the fused kernels in <mhc/fused.hpp>.
//
// Every function here works on one token (or a group of up to four tokens for the projection)
// in the accumulation type Acc (float or double), through raw pointers that the caller has
// checked. Vector code uses Eigen's packet primitives, so it is correct for any instruction set
// Eigen targets and uses wider registers when the compiler is allowed to (-march=native).
// Template parameter N is the stream count when it is fixed at compile time, or 0 when it is
// only known at run time (then the argument `streams` is used).
#pragma once

#include <mhc/common.hpp>
#include <mhc/sinkhorn.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace mhc::detail::fused {

using Eigen::Index;

template <typename Acc>
using Packet = typename Eigen::internal::packet_traits<Acc>::type;

template <typename Acc>
constexpr int packet_size = Eigen::internal::unpacket_traits<Packet<Acc>>::size;

// Packets per panel of the packed projection matrix, and tokens per projection group. Four
// tokens times three packets keeps 12 accumulators, 3 weights and 1 broadcast in the 16 vector
// registers of x86-64 (SSE and AVX2).
constexpr int kPanelPackets = 3;
constexpr int kGroupTokens = 4;

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

// ---------------------------------------------------------------------------------------------
// Projection vec(x) phi.
//
// phi (K x M, K = n*C, M = n*n + 2n) is packed once per call into column panels of up to
// kPanelPackets packets, each zero-padded to whole packets and stored as K consecutive rows, so
// the inner loop streams through one panel. Panel q starts at q * K * kPanelPackets * L.

template <typename Acc>
Index padded_coefficient_count(Index coefficients) {
  constexpr Index L = packet_size<Acc>;
  return (coefficients + L - 1) / L * L;
}

template <typename Acc>
Index packed_projection_size(Index depth, Index coefficients) {
  constexpr Index panel_width = Index(kPanelPackets) * packet_size<Acc>;
  const Index panels = (padded_coefficient_count<Acc>(coefficients) + panel_width - 1) / panel_width;
  return panels * panel_width * depth;
}

template <typename Acc>
void pack_projection(const RowMatrix<Acc>& phi, Acc* packed) {
  constexpr Index L = packet_size<Acc>;
  const Index depth = phi.rows();
  const Index padded = padded_coefficient_count<Acc>(phi.cols());
  for (Index first = 0; first < padded; first += kPanelPackets * L) {
    const Index width = std::min<Index>(kPanelPackets * L, padded - first);
    Acc* panel = packed + first * depth;
    for (Index k = 0; k < depth; ++k) {
      for (Index j = 0; j < width; ++j) {
        const Index column = first + j;
        panel[k * width + j] = column < phi.cols() ? phi(k, column) : Acc(0);
      }
    }
  }
}

// out[r * out_stride + j] = sum_k rows[r][k] * panel[k][j] for Rows tokens and the Packets
// packets of one panel.
template <int Rows, int Packets, typename Acc>
void project_panel(const Acc* const* rows, Index depth, const Acc* panel, Acc* out, Index out_stride) {
  using P = Packet<Acc>;
  constexpr int L = packet_size<Acc>;
  P sums[Rows][Packets];
  for (int r = 0; r < Rows; ++r) {
    for (int p = 0; p < Packets; ++p) sums[r][p] = Eigen::internal::pset1<P>(Acc(0));
  }
  for (Index k = 0; k < depth; ++k) {
    const Acc* weights_row = panel + k * (Packets * L);
    P weights[Packets];
    for (int p = 0; p < Packets; ++p) weights[p] = Eigen::internal::ploadu<P>(weights_row + p * L);
    for (int r = 0; r < Rows; ++r) {
      const P value = Eigen::internal::pset1<P>(rows[r][k]);
      for (int p = 0; p < Packets; ++p) sums[r][p] = Eigen::internal::pmadd(value, weights[p], sums[r][p]);
    }
  }
  for (int r = 0; r < Rows; ++r) {
    for (int p = 0; p < Packets; ++p) Eigen::internal::pstoreu(out + r * out_stride + p * L, sums[r][p]);
  }
}

template <int Rows, typename Acc>
void project_panel_dispatch(int packets, const Acc* const* rows, Index depth, const Acc* panel, Acc* out,
                            Index out_stride) {
  static_assert(kPanelPackets == 3, "update the dispatch below");
  switch (packets) {
    case 1: project_panel<Rows, 1>(rows, depth, panel, out, out_stride); break;
    case 2: project_panel<Rows, 2>(rows, depth, panel, out, out_stride); break;
    default: project_panel<Rows, 3>(rows, depth, panel, out, out_stride); break;
  }
}

// Projects `count` (1 to kGroupTokens) token rows of `depth` values onto every panel of the
// packed phi. Writes count rows of padded_coefficient_count values to `out` (row stride
// `out_stride`).
template <typename Acc>
void project_group(const Acc* const* rows, int count, Index depth, Index coefficients, const Acc* packed,
                   Acc* out, Index out_stride) {
  constexpr Index L = packet_size<Acc>;
  const Index padded = padded_coefficient_count<Acc>(coefficients);
  for (Index first = 0; first < padded; first += kPanelPackets * L) {
    const int packets = static_cast<int>(std::min<Index>(kPanelPackets * L, padded - first) / L);
    const Acc* panel = packed + first * depth;
    Acc* panel_out = out + first;
    switch (count) {
      case 1: project_panel_dispatch<1>(packets, rows, depth, panel, panel_out, out_stride); break;
      case 2: project_panel_dispatch<2>(packets, rows, depth, panel, panel_out, out_stride); break;
      case 3: project_panel_dispatch<3>(packets, rows, depth, panel, panel_out, out_stride); break;
      default: project_panel_dispatch<4>(packets, rows, depth, panel, panel_out, out_stride); break;
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

// Channels per tile of the dynamic-n merge: n + 2 rows of this many values stay in L1.
constexpr Index kMergeTile = 256;

// out[i * channels + c] = sum_j mixing[i * n + j] * x[j * channels + c] + post[i] * h[c]: the
// residual update x_next = H_res x + H_post^T h_out of one token. `out` must not overlap x or h.
template <int N, typename Acc>
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
        Eigen::internal::pstoreu(out_i + c, sum);
      }
      for (; c < end; ++c) {
        Acc sum = post[i] * h[c];
        for (int j = 0; j < n; ++j) sum += mixing_row[j] * x[j * channels + c];
        out_i[c] = sum;
      }
    }
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
  Acc rms_epsilon = 0;
  Index width = 0;  // n*C, the length of vec(x)
  SinkhornOptions sinkhorn;
};

// Log-domain Sinkhorn-Knopp on the n x n logits in `matrix` (overwritten with the result):
// alternately subtracts the log-sum-exp of each column and of each row. Slower than the linear
// iteration but free of underflow, so it serves as the fallback when a row of exp(logits)
// underflows to zero. It always runs every round: the tolerance of `options` is not checked.
template <typename Acc>
void sinkhorn_log_domain(Acc* matrix, int n, const SinkhornOptions& options) {
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
    // NOTE: only stream counts above 32 reach this allocation.
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

// Computes H_pre, H_post and H_res of one token from its projection vec(x) phi (M values) and
// its sum of squares.
template <int N, typename Acc>
void token_coefficients(const Acc* projection, Acc squares, int streams, const CoefficientRule<Acc>& rule,
                        Acc* pre, Acc* post, Acc* res) {
  const int n = stream_count<N>(streams);
  const Acc inverse_r =
      Acc(1) / std::sqrt(squares / static_cast<Acc>(rule.width) + rule.rms_epsilon);
  const Acc pre_scale = rule.alpha_pre * inverse_r;
  const Acc post_scale = rule.alpha_post * inverse_r;
  const Acc res_scale = rule.alpha_res * inverse_r;
  for (int i = 0; i < n; ++i) {
    pre[i] = sigmoid(pre_scale * projection[i] + rule.bias[i]);
    post[i] = Acc(2) * sigmoid(post_scale * projection[n + i] + rule.bias[n + i]);
  }
  for (int k = 0; k < n * n; ++k) res[k] = res_scale * projection[2 * n + k] + rule.bias[2 * n + k];
  if (sinkhorn_linear<N>(res, n, rule.sinkhorn)) return;

  for (int k = 0; k < n * n; ++k) res[k] = res_scale * projection[2 * n + k] + rule.bias[2 * n + k];
  sinkhorn_log_domain(res, n, rule.sinkhorn);
}

}  // namespace mhc::detail::fused
