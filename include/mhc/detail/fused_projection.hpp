// Products with the projection matrix phi in the fused kernels of <mhc/fused.hpp>: the
// projection vec(x) phi of a group of tokens, and in the coefficient backward the two products
// with the gradient of the projections, dL/dx = dP phi^T and dL/dphi = x^T dP.
//
// Each kernel keeps a tile of its output in vector registers and streams through a copy of phi
// packed for its access pattern. The tile sizes are chosen so that a tile, its operands and one
// broadcast fit the register count of the target (16 for SSE and AVX2, 32 for AVX-512).
// NOTE: whether the compiler keeps a tile in registers depends on its unrolling. GCC 12 at -O2
// kept phi_gradient_tile's accumulators on the stack; the Release build uses -O3.
#pragma once

#include <mhc/common.hpp>

#include <algorithm>

// Packet types such as __m128 carry vector attributes, and GCC warns that they are ignored when
// such a type is a template argument. Here the packet types only select overloads and sizes, so
// the warning is off in this header, as Eigen turns it off in its own.
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"
#endif

namespace mhc::detail::fused {

using Eigen::Index;

template <typename Acc>
using Packet = typename Eigen::internal::packet_traits<Acc>::type;

template <typename Acc>
constexpr int packet_size = Eigen::internal::unpacket_traits<Packet<Acc>>::size;

// Packets per panel of the packed projection matrix.
constexpr int kPanelPackets = 3;

// Tokens per projection group. A group of G tokens on one panel keeps 3G accumulators, 3 weights
// and 1 broadcast in vector registers: G = 4 fits the 16 registers of SSE and AVX2, G = 8 the 32
// of AVX-512.
constexpr int kGroupTokens = EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS >= 32 ? 8 : 4;

// ---------------------------------------------------------------------------------------------
// Projection vec(x) phi.
//
// phi (K x M, K = n*C, M = n*n + 2n) is packed once per call into column panels of up to
// kPanelPackets packets, each zero-padded to whole packets and stored as K consecutive rows, so
// the inner loop streams through one panel. The packet is Eigen's full packet or its half
// packet, whichever pads M less (with AVX-512, M = 24 at n = 4 fills three 8-float packets
// exactly but needs two 16-float packets, a quarter of them padding).

template <typename Acc, bool kHalf>
using ProjectionPacket = typename Eigen::internal::conditional<kHalf, typename Eigen::internal::packet_traits<Acc>::half,
                                                              Packet<Acc>>::type;

// Layout of the packed phi and of the projections of one group.
struct ProjectionLayout {
  bool half_packets = false;  // use ProjectionPacket<Acc, true>
  Index lanes = 1;            // values per packet
  Index padded = 0;           // M rounded up to whole packets: the row stride of the projections
  Index depth = 0;            // K
  Index packed_size() const {
    const Index panel_width = kPanelPackets * lanes;
    return (padded + panel_width - 1) / panel_width * panel_width * depth;
  }
};

template <typename Acc>
ProjectionLayout projection_layout(Index depth, Index coefficients) {
  const Index full = packet_size<Acc>;
  const Index half = Eigen::internal::unpacket_traits<ProjectionPacket<Acc, true>>::size;
  const auto round_up = [coefficients](Index lanes) { return (coefficients + lanes - 1) / lanes * lanes; };
  ProjectionLayout layout;
  layout.half_packets = half < full && round_up(half) < round_up(full);
  layout.lanes = layout.half_packets ? half : full;
  layout.padded = round_up(layout.lanes);
  layout.depth = depth;
  return layout;
}

template <typename Acc>
void pack_projection(const RowMatrix<Acc>& phi, const ProjectionLayout& layout, Acc* packed) {
  const Index depth = phi.rows();
  for (Index first = 0; first < layout.padded; first += kPanelPackets * layout.lanes) {
    const Index width = std::min<Index>(kPanelPackets * layout.lanes, layout.padded - first);
    Acc* panel = packed + first * depth;
    for (Index k = 0; k < depth; ++k) {
      for (Index j = 0; j < width; ++j) {
        const Index column = first + j;
        panel[k * width + j] = column < phi.cols() ? phi(k, column) : Acc(0);
      }
    }
  }
}

// out[r * out_stride + j] = sum_k rows[r][k] * panel[k][j] for kGroupTokens tokens and the
// Packets packets of one panel.
template <typename P, int Packets, typename Acc>
void project_panel(const Acc* const* rows, Index depth, const Acc* panel, Acc* out, Index out_stride) {
  constexpr int L = Eigen::internal::unpacket_traits<P>::size;
  constexpr int G = kGroupTokens;
  P sums[G][Packets];
  for (int r = 0; r < G; ++r) {
    for (int p = 0; p < Packets; ++p) sums[r][p] = Eigen::internal::pset1<P>(Acc(0));
  }
  for (Index k = 0; k < depth; ++k) {
    const Acc* weights_row = panel + k * (Packets * L);
    P weights[Packets];
    for (int p = 0; p < Packets; ++p) weights[p] = Eigen::internal::ploadu<P>(weights_row + p * L);
    for (int r = 0; r < G; ++r) {
      const P value = Eigen::internal::pset1<P>(rows[r][k]);
      for (int p = 0; p < Packets; ++p) sums[r][p] = Eigen::internal::pmadd(value, weights[p], sums[r][p]);
    }
  }
  for (int r = 0; r < G; ++r) {
    for (int p = 0; p < Packets; ++p) Eigen::internal::pstoreu(out + r * out_stride + p * L, sums[r][p]);
  }
}

template <typename P, typename Acc>
void project_all_panels(const Acc* const* rows, const ProjectionLayout& layout, const Acc* packed, Acc* out) {
  static_assert(kPanelPackets == 3, "update the dispatch below");
  for (Index first = 0; first < layout.padded; first += kPanelPackets * layout.lanes) {
    const Index packets = std::min<Index>(kPanelPackets * layout.lanes, layout.padded - first) / layout.lanes;
    const Acc* panel = packed + first * layout.depth;
    switch (packets) {
      case 1: project_panel<P, 1>(rows, layout.depth, panel, out + first, layout.padded); break;
      case 2: project_panel<P, 2>(rows, layout.depth, panel, out + first, layout.padded); break;
      default: project_panel<P, 3>(rows, layout.depth, panel, out + first, layout.padded); break;
    }
  }
}

// Projects kGroupTokens token rows of K values onto the packed phi: writes kGroupTokens rows of
// layout.padded values to `out`. The caller fills a partial group by repeating a row.
template <typename Acc>
void project_group(const Acc* const* rows, const ProjectionLayout& layout, const Acc* packed, Acc* out) {
  if (layout.half_packets) {
    project_all_panels<ProjectionPacket<Acc, true>>(rows, layout, packed, out);
  } else {
    project_all_panels<ProjectionPacket<Acc, false>>(rows, layout, packed, out);
  }
}


// ---------------------------------------------------------------------------------------------
// Backward of the projection.
//
// The coefficient backward turns the gradient of each token's projections, dP (M values), into
// its share of dL/dx = dP phi^T (K values), and sums dL/dphi = x^T dP over the tokens.

// Columns of k per panel of the packed phi^T: the two packets that one step of
// backproject_group covers.
template <typename Acc>
constexpr Index transposed_panel_width = 2 * packet_size<Acc>;

// Packs phi^T (M x K) into `transposed` (M*K values) as panels of transposed_panel_width<Acc>
// columns of k (the last one narrower), each stored as M rows of its width. So the panel starting
// at column `first` begins at transposed + first * M, and a step of backproject_group reads it in
// order.
template <typename Acc>
void pack_transposed(const RowMatrix<Acc>& phi, Acc* transposed) {
  const Index depth = phi.rows();
  const Index count = phi.cols();
  for (Index first = 0; first < depth; first += transposed_panel_width<Acc>) {
    const Index width = std::min<Index>(transposed_panel_width<Acc>, depth - first);
    Acc* panel = transposed + first * count;
    for (Index m = 0; m < count; ++m) {
      for (Index i = 0; i < width; ++i) panel[m * width + i] = phi(first + i, m);
    }
  }
}

// One step of backproject_group over U packets of k starting at column `first` of x and out.
// `weights` points to the step's first column in a panel of row stride `weight_stride`.
template <bool kAccumulate, typename P, int U, typename Acc>
void backproject_step(const Acc* const* grad, Index count, const Acc* weights, Index weight_stride,
                      const Acc* const* x, const Acc* scale, const Acc* inverse_rms, Acc* const* out, Index first) {
  constexpr int L = Eigen::internal::unpacket_traits<P>::size;
  constexpr int G = kGroupTokens;
  P sums[G][U];
  for (int r = 0; r < G; ++r) {
    const P factor = Eigen::internal::pset1<P>(scale[r]);
    const P inverse = Eigen::internal::pset1<P>(inverse_rms[r]);
    for (int u = 0; u < U; ++u) {
      const P normalised = Eigen::internal::pmul(inverse, Eigen::internal::ploadu<P>(x[r] + first + u * L));
      sums[r][u] = Eigen::internal::pmul(factor, normalised);
    }
  }
  for (Index m = 0; m < count; ++m) {
    P row[U];
    for (int u = 0; u < U; ++u) row[u] = Eigen::internal::ploadu<P>(weights + m * weight_stride + u * L);
    for (int r = 0; r < G; ++r) {
      const P value = Eigen::internal::pset1<P>(grad[r][m]);
      for (int u = 0; u < U; ++u) sums[r][u] = Eigen::internal::pmadd(value, row[u], sums[r][u]);
    }
  }
  // The old value is added last, so the share rounds exactly as in an overwriting call.
  for (int r = 0; r < G; ++r) {
    for (int u = 0; u < U; ++u) {
      Acc* target = out[r] + first + u * L;
      if constexpr (kAccumulate) sums[r][u] = Eigen::internal::padd(Eigen::internal::ploadu<P>(target), sums[r][u]);
      Eigen::internal::pstoreu(target, sums[r][u]);
    }
  }
}

// For the kGroupTokens tokens r of a group, writes (or with kAccumulate, adds to out[r])
//   out[r][k] = scale[r] * (inverse_rms[r] * x[r][k]) + sum_m grad[r][m] * phi[k][m],   k < depth,
// the gradient of x through the projection plus the term of 1/r, which is a multiple of x. x is
// scaled by its 1/r first, so the term stays in range for huge x.
// `transposed` is phi^T from pack_transposed and `count` the number M of projections. A step
// of two packets of k keeps 2G accumulators, 2 weights and one broadcast in registers.
template <bool kAccumulate, typename Acc>
void backproject_group(const Acc* const* grad, Index count, const Acc* transposed, Index depth, const Acc* const* x,
                       const Acc* scale, const Acc* inverse_rms, Acc* const* out) {
  using P = Packet<Acc>;
  constexpr Index L = packet_size<Acc>;
  constexpr Index W = transposed_panel_width<Acc>;
  for (Index first = 0; first < depth; first += W) {
    const Index width = std::min<Index>(W, depth - first);
    const Acc* panel = transposed + first * count;
    if (width == W) {
      backproject_step<kAccumulate, P, 2>(grad, count, panel, W, x, scale, inverse_rms, out, first);
      continue;
    }
    Index k = 0;
    for (; k + L <= width; k += L) {
      backproject_step<kAccumulate, P, 1>(grad, count, panel + k, width, x, scale, inverse_rms, out, first + k);
    }
    for (; k < width; ++k) {
      for (int r = 0; r < kGroupTokens; ++r) {
        Acc sum = scale[r] * (inverse_rms[r] * x[r][first + k]);
        for (Index m = 0; m < count; ++m) sum += grad[r][m] * panel[m * width + k];
        out[r][first + k] = kAccumulate ? out[r][first + k] + sum : sum;
      }
    }
  }
}

// Rows of phi's gradient that one register tile of accumulate_phi_gradient covers. With up to
// three packets per panel the tile keeps 3R accumulators, 3 gradient packets and one broadcast in
// registers, as a projection group does.
constexpr int kGradientTileRows = kGroupTokens;

// block[i][j] += sum_t x[t][i] * grad[t][j] for the R rows i of one tile and one panel of
// Packets packets of j. The sum over t runs in token order.
template <typename P, int Packets, int R, typename Acc>
void phi_gradient_tile(const Acc* x, Index x_stride, Index tokens, const Acc* grad, Index grad_stride, Acc* block,
                       Index block_stride) {
  constexpr int L = Eigen::internal::unpacket_traits<P>::size;
  P sums[R][Packets];
  for (int i = 0; i < R; ++i) {
    for (int p = 0; p < Packets; ++p) sums[i][p] = Eigen::internal::ploadu<P>(block + i * block_stride + p * L);
  }
  for (Index t = 0; t < tokens; ++t) {
    P gradients[Packets];
    for (int p = 0; p < Packets; ++p) gradients[p] = Eigen::internal::ploadu<P>(grad + t * grad_stride + p * L);
    const Acc* x_row = x + t * x_stride;
    for (int i = 0; i < R; ++i) {
      const P value = Eigen::internal::pset1<P>(x_row[i]);
      for (int p = 0; p < Packets; ++p) sums[i][p] = Eigen::internal::pmadd(value, gradients[p], sums[i][p]);
    }
  }
  for (int i = 0; i < R; ++i) {
    for (int p = 0; p < Packets; ++p) Eigen::internal::pstoreu(block + i * block_stride + p * L, sums[i][p]);
  }
}

// One panel of Packets packets of j for every row of the block: whole tiles in registers, the
// rows of a narrower last tile one at a time.
template <typename P, int Packets, typename Acc>
void phi_gradient_panel(const Acc* packed, Index rows, Index tokens, const Acc* grad, Index grad_stride, Acc* block,
                        Index block_stride) {
  constexpr int R = kGradientTileRows;
  for (Index first = 0; first < rows; first += R) {
    const Index width = std::min<Index>(R, rows - first);
    const Acc* tile = packed + first * tokens;
    Acc* tile_block = block + first * block_stride;
    if (width == R) {
      phi_gradient_tile<P, Packets, R>(tile, R, tokens, grad, grad_stride, tile_block, block_stride);
      continue;
    }
    for (Index i = 0; i < width; ++i) {
      phi_gradient_tile<P, Packets, 1>(tile + i, width, tokens, grad, grad_stride, tile_block + i * block_stride,
                                       block_stride);
    }
  }
}

template <typename P, typename Acc>
void phi_gradient_all_panels(const Acc* packed, Index rows, Index tokens, const Acc* grad,
                             const ProjectionLayout& layout, Acc* block) {
  static_assert(kPanelPackets == 3, "update the dispatch below");
  const Index stride = layout.padded;
  for (Index first = 0; first < layout.padded; first += kPanelPackets * layout.lanes) {
    const Index packets = std::min<Index>(kPanelPackets * layout.lanes, layout.padded - first) / layout.lanes;
    switch (packets) {
      case 1: phi_gradient_panel<P, 1>(packed, rows, tokens, grad + first, stride, block + first, stride); break;
      case 2: phi_gradient_panel<P, 2>(packed, rows, tokens, grad + first, stride, block + first, stride); break;
      default: phi_gradient_panel<P, 3>(packed, rows, tokens, grad + first, stride, block + first, stride); break;
    }
  }
}

// Adds x^T grad to `block` for one block of `rows` rows of phi's gradient and one step of
// `tokens` tokens. `packed` is that part of x from pack_gradient_block, grad is
// tokens x layout.padded (the zero-padded gradient of the projections) and block is
// rows x layout.padded. Every entry adds its tokens in order, so the result does not depend on
// how the caller splits the rows among threads.
template <typename Acc>
void accumulate_phi_gradient(const Acc* packed, Index rows, Index tokens, const Acc* grad,
                             const ProjectionLayout& layout, Acc* block) {
  if (layout.half_packets) {
    phi_gradient_all_panels<ProjectionPacket<Acc, true>>(packed, rows, tokens, grad, layout, block);
  } else {
    phi_gradient_all_panels<ProjectionPacket<Acc, false>>(packed, rows, tokens, grad, layout, block);
  }
}

}  // namespace mhc::detail::fused

#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
