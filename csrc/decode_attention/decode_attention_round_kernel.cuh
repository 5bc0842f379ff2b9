// Paged decode attention on tensor cores, TMA version with CTA-wide rounds (sm_90, D >= 128, pages of at least
// 16 tokens). D = 64 takes the per-warp TMA kernel (decode_attention_tma_kernel.cuh).
//
// The CTA's 4 math warps share each round of kRoundTokens tokens, in a ring of kStages rounds:
//   1. each warp computes S = Q K^T for its own kWarpTokens of the round (full D);
//   2. the row maxima meet in shared memory (barrier), and every warp rescales with the round's maximum;
//   3. P goes through shared memory as MMA A-fragments (barrier);
//   4. each warp accumulates O += P V over the whole round for its own D / 4 columns.
// A warp then holds a quarter of the accumulator and no K/V fragments: 96 to 122 registers at D = 128
// (the per-warp kernel needs 194), so shared memory, not registers, sets the CTAs per SM. Measured on H200
// (BENCHMARKS.md), 16 warps per SM, not more bytes in flight, is what closed most of the gap to cuDNN.
//
// Three shapes, chosen per launch by the grid (decode_attention.cu):
//   narrow: 32-token rounds, warp 0 refills a stage at the first barrier of the round after its last use;
//           48 KB of ring at D = 128, 4 CTAs (16 warps) per SM, for grids that fill the GPU.
//   wide:   64-token rounds and a fifth warp that only issues copies (waiting on `empty`), so the refill
//           is off the math warps' path; 96 KB, 2 CTAs per SM. A lone narrow CTA streams about 18 GB/s
//           (its rounds are latency-bound), a wide one about 32: grids of at most one wide wave take it.
//   triple: three wide pipelines of 2 stages in one CTA (192 KB at D = 128, one CTA per SM), for grids of at
//           most one CTA per SM. Each pipeline takes a third of the CTA's range; their states merge in shared
//           memory at the end. On H200 (BENCHMARKS.md) a deep CTA's rate is set by its copy warp's issue:
//           one pipeline with a 6-round ring fell 0.5 to 2% short of SDPA at 3B 64 x 8192, two pipelines
//           of 3 rounds matched it and three of 2 beat it. At D = 256 one wide ring is already 192 KB, so
//           there is no triple shape.
#pragma once
#include <cuda.h>

#include "common/tma.cuh"
#include "decode_attention/tma_tile.cuh"
#include "decode_attention/warp_attention.cuh"

namespace mpskern::decode {

enum class RoundShape { kNarrow, kWide, kTriple };

template <int D, RoundShape kShape>
struct RoundConfig {
  static constexpr int kWarps = 4;                                  // math warps of a pipeline
  static constexpr bool kProducer = kShape != RoundShape::kNarrow;  // a fifth warp issues the copies
  static constexpr int kGroups = kShape == RoundShape::kTriple ? 3 : 1;  // pipelines in the CTA
  static constexpr int kMathThreads = kGroups * kWarps * 32;
  static constexpr int kThreads = kGroups * (kWarps + kProducer) * 32;
  // The register budget: 0 leaves it to ptxas, as narrow and wide were tuned. Told nothing, ptxas held a
  // 320-thread CTA of two pipelines to 96 registers and spilled; it needs to know that one CTA per SM is the aim.
  static constexpr int kMinCtasPerSm = kGroups > 1 ? 1 : 0;
  static constexpr int kWarpTokens = kProducer ? 16 : 8;  // S columns per warp per round
  static constexpr int kRoundTokens = kWarps * kWarpTokens;
  static constexpr int kTiles = kRoundTokens / kTileTokens;  // 16-row TMA tiles per round
  static constexpr int kStageBytes = kTiles * TmaTile<D>::kBytes;
  // Measured at D = 128 on the grids each shape serves (BENCHMARKS.md): narrow with 2 stages (6 CTAs per SM)
  // was 1 to 15% slower, 32-token rounds with 4 stages (3 CTAs) up to 18%; wide with 2 stages 0 to 10%;
  // triple against two pipelines of 3 stages, 0 to 1% faster.
  static constexpr int kStages = kShape == RoundShape::kTriple ? 2 : 3;
  static constexpr int kRingBytes = kGroups * kStages * kStageBytes;
  static constexpr int kCols = D / kWarps;  // O columns per math warp
  static_assert(32 % kTiles == 0, "a round's page ids come from one 32-tile window");
};

// The rings (with slack to align them by hand), then, with several pipelines, their merge buffer (M <= 16).
template <int D, RoundShape kShape>
constexpr int round_smem_bytes() {
  using C = RoundConfig<D, kShape>;
  return C::kRingBytes + kTmaSwizzleAlign + (C::kGroups > 1 ? merge_smem_bytes<D, 16, C::kGroups>() : 0);
}

// Rows of the output staged for bulk copies: 16 bytes of padding put the 8 rows of one store instruction in
// different banks.
template <int D>
constexpr int kStageRow = D + 8;

// Bulk copies need 16-byte aligned rows: the output's base and strides.
template <typename T, int D>
__device__ __forceinline__ bool bulk_store_ok(const DecodeParams& p) {
  return ((reinterpret_cast<uintptr_t>(p.out) | (p.out_stride_b * sizeof(T)) | (p.out_stride_h * sizeof(T))) % 16) == 0;
}

// Triple only where its rings fit in one CTA's shared memory (D = 128).
template <int D>
constexpr bool kHasTripleShape = RoundConfig<D, RoundShape::kTriple>::kRingBytes <= (192 << 10);

// tmap_k / tmap_v: the caches as 4-D maps {64 columns, rows, D / 64 panels, kv_heads} with a {64, 16, D / 64, 1} box
// (kv_tensor_map in decode_attention.cu).
template <typename T, int D, int M, RoundShape kShape>
__global__ void __launch_bounds__(RoundConfig<D, kShape>::kThreads, RoundConfig<D, kShape>::kMinCtasPerSm)
    decode_attention_round_kernel(const __grid_constant__ DecodeParams p, const __grid_constant__ CUtensorMap tmap_k,
                                  const __grid_constant__ CUtensorMap tmap_v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using C = RoundConfig<D, kShape>;
  constexpr int R = M / 8;                // accumulator rows per thread: g (and g + 8 when M == 16)
  constexpr int KSTEPS = D / 16;
  constexpr int NT = C::kWarpTokens / 8;  // n8 tiles of S per warp
  constexpr int ONT = C::kCols / 8;       // n8 tiles of O per warp
  constexpr int S = C::kStages;
  constexpr int G = C::kGroups;
  static_assert(M * kStageRow<D> * sizeof(T) <= C::kRingBytes && kStageRow<D> * sizeof(T) % 16 == 0,
                "the output's bulk-copy stage fits in the ring, its rows 16-byte aligned");

  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ uint64_t full_g[G][S], empty_g[G][S];
  __shared__ uint2 pbuf_g[G][C::kRoundTokens / 8][32];  // P of a round as A-fragment halves, one n8 tile per row
  __shared__ float red_g[G][C::kWarps][M];              // per-warp row maxima; at the end, row sums
  __shared__ uint64_t merged;                            // G > 1: every math thread has stashed its state

  // Warps [0, G kWarps) compute, pipeline by pipeline; the G issuing warps come after them.
  const int lane = threadIdx.x % 32;
  const bool issuer = threadIdx.x >= C::kMathThreads;
  const int grp = G == 1 ? 0 : issuer ? threadIdx.x / 32 - G * C::kWarps : threadIdx.x / (32 * C::kWarps);
  const int warp = G == 1 ? threadIdx.x / 32 : issuer ? C::kWarps : threadIdx.x / 32 % C::kWarps;  // in the pipeline
  constexpr int kIssuer = C::kProducer ? C::kWarps : 0;
  const int g = lane / 4, tq = lane % 4;
  unsigned char* ring = swizzle_aligned(smem_raw) + grp * S * C::kStageBytes;
  uint64_t* full = full_g[grp];
  uint64_t* empty = empty_g[grp];
  auto& pbuf = pbuf_g[grp];
  auto& red = red_g[grp];
  WorkItem w(p, blockIdx.x);
  if constexpr (G > 1) w.take_part(grp, G, C::kTiles);
  const int n_rounds = (w.n_tiles + C::kTiles - 1) / C::kTiles;
  if (threadIdx.x == 0) {
    for (int i = 0; i < G * S; ++i) {
      tma::mbar_init(&full_g[i / S][i % S], 1);  // the issuer's arrive; the copies add their bytes
      if constexpr (C::kProducer) tma::mbar_init(&empty_g[i / S][i % S], C::kWarps);  // one arrive per math warp
    }
    if constexpr (G > 1) tma::mbar_init(&merged, C::kMathThreads);
    tma::mbar_init_fence();
  }
  __syncthreads();

  // The issuing warp's lane l holds the page id of tile 32 k + l of the CTA's range, and of the next window.
  auto page_of_tile = [&](int t) { return w.page_of(w.begin + t * kTileTokens); };
  int ids = 0, ids_next = 0;
  if (warp == kIssuer) {
    ids = page_of_tile(lane);
    ids_next = page_of_tile(32 + lane);
  }
  auto issue = [&](int r) {  // the issuing warp, rounds in increasing order
    const int t0 = r * C::kTiles;
    if ((t0 & 31) == 0 && t0 > 0) {
      ids = ids_next;
      ids_next = page_of_tile(t0 + 32 + lane);
    }
    int pg[C::kTiles];
#pragma unroll
    for (int j = 0; j < C::kTiles; ++j) pg[j] = __shfl_sync(0xffffffffu, ids, (t0 + j) & 31);
    if (lane == 0) {
      const int nt = min(C::kTiles, w.n_tiles - t0);  // the last round may end early
      unsigned char* st = ring + (r % S) * C::kStageBytes;
      tma::fence_proxy_async();  // the math warps' reads of this stage come before the copies' writes
      tma::mbar_arrive_expect_tx(&full[r % S], nt * TmaTile<D>::kBytes);
#pragma unroll
      for (int j = 0; j < C::kTiles; ++j) {
        const int row = pg[j] * p.page_size + ((w.begin + (t0 + j) * kTileTokens) & (p.page_size - 1));
        if (j < nt) load_tile<D>(st + j * TmaTile<D>::kBytes, &tmap_k, &tmap_v, w.kvh, row, &full[r % S]);
      }
    }
  };
  if constexpr (C::kProducer) {
    if (warp == kIssuer) {
      for (int r = 0; r < n_rounds; ++r) {
        if (r >= S) tma::mbar_wait(&empty[r % S], (r / S - 1) & 1);
        issue(r);
      }
      return;  // the math warps synchronise among themselves from here on
    }
  } else if (warp == kIssuer) {
    for (int r = 0; r < S && r < n_rounds; ++r) issue(r);
  }
  // The math warps' barrier. Without a producer it is the CTA's: bar.sync 1 with a thread count in its place
  // was 0.3 to 1.4% slower at D = 128 (A/B on H200, BENCHMARKS.md).
  auto sync_math = [grp] {
    if constexpr (C::kProducer) {
      asm volatile("bar.sync %0, %1;\n" ::"r"(1 + grp), "n"(C::kWarps * 32) : "memory");
    } else {
      __syncthreads();
    }
  };

  uint32_t qa[KSTEPS][4];
  load_q_fragments<T, D, M>(qa, p, w, lane);
  const float scale_log2 = log2_scale(p);
  float m_run[R], l_run[R], o[ONT][2 * R];  // the softmax state is the same in every warp; O is this warp's columns
  reset_softmax_state(m_run, l_run, o);

  // Narrow at D = 128: each tile's P V goes into its own zeroed accumulators, added to the rescaled O after the
  // round, so neither the rescale nor the previous tile sits on the MMA chain. With the four-chain S below, 0.2
  // to 0.5% faster on the narrow benchmark shapes (H200, BENCHMARKS.md); the rounds are latency-bound, not
  // MMA-bound (half the MMAs: +0.3%). Wide's four tiles, or D = 256, would cost 32 or more registers.
  constexpr bool kTilePartials = kShape == RoundShape::kNarrow && D == 128;
  const int mat = lane / 8;  // the ldmatrix matrix this lane addresses
  const int wt0 = warp * C::kWarpTokens;
  for (int rnd = 0; rnd < n_rounds; ++rnd) {
    tma::mbar_wait(&full[rnd % S], (rnd / S) & 1);
    const unsigned char* st = ring + (rnd % S) * C::kStageBytes;
    const int round0 = w.begin + rnd * C::kRoundTokens;

    // 1. S = Q K^T for this warp's tokens, the k steps in independent MMA chains (two per n8 tile, or four).
    const SwizzledTile<T, D> ktile{st + (wt0 / kTileTokens) * TmaTile<D>::kBytes};
    float s[NT][4] = {}, s_odd[NT][4] = {};
    if constexpr (NT == 2) {  // 16 tokens: matrices (tok 0-7, k lo), (tok 0-7, k hi), (tok 8-15, lo), (8-15, hi)
#pragma unroll
      for (int kk = 0; kk < KSTEPS; ++kk) {
        uint32_t kb[4];
        ptx::ldmatrix_x4(kb, ktile.k((mat >> 1) * 8 + lane % 8, kk * 2 + (mat & 1)));
        const uint32_t b0[2] = {kb[0], kb[1]}, b1[2] = {kb[2], kb[3]};
        ptx::mma_16816<T>(kk % 2 ? s_odd[0] : s[0], qa[kk], b0);
        ptx::mma_16816<T>(kk % 2 ? s_odd[1] : s[1], qa[kk], b1);
      }
    } else {  // 8 tokens: one x4 holds (k lo, k hi) of k steps kk and kk + 1; four chains of KSTEPS / 4
      const int row0 = wt0 % kTileTokens;
      static_assert(KSTEPS % 4 == 0, "four chains of k steps");
      float s2[4] = {}, s3[4] = {};
#pragma unroll
      for (int kk = 0; kk < KSTEPS; kk += 4) {
        uint32_t kb[4], kc[4];
        ptx::ldmatrix_x4(kb, ktile.k(row0 + lane % 8, kk * 2 + mat));
        ptx::ldmatrix_x4(kc, ktile.k(row0 + lane % 8, kk * 2 + 4 + mat));
        const uint32_t b0[2] = {kb[0], kb[1]}, b1[2] = {kb[2], kb[3]}, b2[2] = {kc[0], kc[1]}, b3[2] = {kc[2], kc[3]};
        ptx::mma_16816<T>(s[0], qa[kk], b0);
        ptx::mma_16816<T>(s_odd[0], qa[kk + 1], b1);
        ptx::mma_16816<T>(s2, qa[kk + 2], b2);
        ptx::mma_16816<T>(s3, qa[kk + 3], b3);
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        s[0][j] += s2[j];
        s_odd[0][j] += s3[j];
      }
    }

#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int j = 0; j < 4; ++j) s[n][j] += s_odd[n][j];

    // 2. Mask, scale, the warp's row maxima, then the round's.
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float mx = masked_row_max(s, r, round0 + wt0, w.end, tq, scale_log2);
      if (tq == 0) red[warp][g + 8 * r] = mx;
    }
    sync_math();  // maxima in; every warp is also done with the previous round's stage
    if constexpr (!C::kProducer) {
      if (warp == kIssuer && rnd > 0 && rnd - 1 + S < n_rounds) issue(rnd - 1 + S);
    }
    float rescale[R];  // l_run: this thread's tokens only, summed over quads and warps at the end
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float m_new = m_run[r];
#pragma unroll
      for (int v = 0; v < C::kWarps; ++v) m_new = fmaxf(m_new, red[v][g + 8 * r]);
      rescale[r] = online_softmax_row(s, r, m_new, m_run[r], l_run[r]);
    }
    if constexpr (!kTilePartials) {
#pragma unroll
      for (int n = 0; n < ONT; ++n)
#pragma unroll
        for (int j = 0; j < 2 * R; ++j) o[n][j] *= rescale[j / 2];
    }
    float pv[kTilePartials ? C::kTiles : 1][ONT][2 * R] = {};

    // 3. P's accumulator layout is the A-fragment layout: n8 tile t holds a0/a1 (t even) or a2/a3 (t odd) of
    // k step t / 2. With M = 8, rows 8..15 are zero.
#pragma unroll
    for (int n = 0; n < NT; ++n)
      pbuf[warp * NT + n][lane] =
          make_uint2(ptx::pack2<T>(s[n][0], s[n][1]), R == 2 ? ptx::pack2<T>(s[n][2], s[n][3]) : 0u);
    sync_math();  // P in

    // 4. O += P V over the round's tiles, this warp's columns.
#pragma unroll
    for (int j = 0; j < C::kTiles; ++j) {
      const int valid = w.end - (round0 + j * kTileTokens);
      if (valid <= 0) break;  // not loaded: the last round ended early
      const uint2 lo = pbuf[2 * j][lane], hi = pbuf[2 * j + 1][lane];
      const uint32_t pa[4] = {lo.x, lo.y, hi.x, hi.y};
      uint32_t vmask[2];
      v_token_masks(vmask, tq, valid);
      const SwizzledTile<T, D> vtile{st + j * TmaTile<D>::kBytes};
#pragma unroll
      for (int nd = 0; nd < C::kCols / 16; ++nd) {
        uint32_t vb[4];  // matrices: (tok 0-7, d lo), (tok 8-15, d lo), (tok 0-7, d hi), (tok 8-15, d hi)
        ptx::ldmatrix_x4_trans(vb, vtile.v((mat & 1) * 8 + lane % 8, warp * (C::kCols / 8) + nd * 2 + (mat >> 1)));
        if constexpr (kTilePartials) {
          mma_pv_16cols<T, R>(pv[j][2 * nd], pv[j][2 * nd + 1], pa, vb, vmask);
        } else {
          mma_pv_16cols<T, R>(o[2 * nd], o[2 * nd + 1], pa, vb, vmask);
        }
      }
    }
    if constexpr (kTilePartials) {
#pragma unroll
      for (int n = 0; n < ONT; ++n)
#pragma unroll
        for (int q = 0; q < 2 * R; ++q) {
          float acc = o[n][q] * rescale[q / 2];
#pragma unroll
          for (int j = 0; j < C::kTiles; ++j) acc += pv[j][n][q];
          o[n][q] = acc;
        }
    }
    if constexpr (C::kProducer) {
      __syncwarp();
      if (lane == 0) tma::mbar_arrive(&empty[rnd % S]);  // this warp is done with the stage
    }
  }

  // Row sums over the quad, then over the warps (red is free: its last reads came before the last P barrier).
#pragma unroll
  for (int r = 0; r < R; ++r) {
    float l = l_run[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    if (tq == 0) red[warp][g + 8 * r] = l;
  }
  sync_math();
  float l_row[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    l_row[r] = 0.f;
#pragma unroll
    for (int v = 0; v < C::kWarps; ++v) l_row[r] += red[v][g + 8 * r];
  }
  if constexpr (G > 1) {
    // The pipelines' states meet in their own buffer past the rings: each math warp stashes its columns, then
    // every math thread writes merged heads (unsplit: the triple shape never takes a split launch). The copy warps
    // have left, so the math threads meet on their own barrier.
    const MergeBuffer<D, M> buf{reinterpret_cast<float*>(swizzle_aligned(smem_raw) + C::kRingBytes)};
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int row = g + 8 * r;
      float* dst = buf.o(grp, row) + warp * C::kCols + tq * 2;
#pragma unroll
      for (int n = 0; n < ONT; ++n) *reinterpret_cast<float2*>(dst + n * 8) = make_float2(o[n][2 * r], o[n][2 * r + 1]);
      if (warp == 0 && tq == 0) {
        buf.template ml<G>(grp, row)[0] = m_run[r];
        buf.template ml<G>(grp, row)[1] = l_row[r];
      }
    }
    // An mbarrier, not `bar.sync 4, 384`: the same order, but racecheck reports a race across a counted barrier
    // once the pipelines have passed their own barriers a different number of times
    // (scripts/racecheck_named_barrier.cu).
    tma::mbar_arrive(&merged);
    tma::mbar_wait(&merged, 0);
    write_merged<G, T>(p, w, buf, C::kMathThreads);
    return;
  }
  const bool direct = p.num_splits == 1;
  float inv[R];  // an empty range writes zeros (and LSE -inf)
#pragma unroll
  for (int r = 0; r < R; ++r) inv[r] = l_row[r] > 0.f ? 1.f / l_row[r] : 0.f;
  if (direct && bulk_store_ok<T, D>(p)) {
    // Every round has been consumed and every warp is past the row-sum barrier, so the ring is free: the heads'
    // rows are staged there and each goes out in one bulk copy, which the CTA waits for only until it is read.
    // Against per-thread stores, 0.2 to 0.6% faster on the narrow benchmark shapes (H200, BENCHMARKS.md).
    T* stage = reinterpret_cast<T*>(ring);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int row = g + 8 * r;
#pragma unroll
      for (int n = 0; n < ONT; ++n) {
        const int d = warp * C::kCols + n * 8 + tq * 2;
        *reinterpret_cast<uint32_t*>(stage + row * kStageRow<D> + d) =
            ptx::pack2<T>(o[n][2 * r] * inv[r], o[n][2 * r + 1] * inv[r]);
      }
    }
    tma::fence_proxy_async();  // these writes come before the bulk copies' reads
    sync_math();
    if (threadIdx.x < w.nheads) {
      const int h = w.head0 + threadIdx.x;
      tma::store_bulk(static_cast<T*>(p.out) + w.b * p.out_stride_b + h * p.out_stride_h,
                      stage + threadIdx.x * kStageRow<D>, D * sizeof(T));
    }
    return;
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int row = g + 8 * r;
    if (row >= w.nheads) continue;
    const int h = w.head0 + row;
    const long long bh = static_cast<long long>(w.b) * p.heads + h;
#pragma unroll
    for (int n = 0; n < ONT; ++n) {
      const int d = warp * C::kCols + n * 8 + tq * 2;
      const float x = o[n][2 * r] * inv[r], y = o[n][2 * r + 1] * inv[r];
      if (direct) {
        T* dst = static_cast<T*>(p.out) + w.b * p.out_stride_b + h * p.out_stride_h + d;
        dst[0] = ptx::from_float<T>(x);
        dst[1] = ptx::from_float<T>(y);
      } else {
        *reinterpret_cast<float2*>(p.o_partial + (bh * p.num_splits + w.split) * D + d) = make_float2(x, y);
      }
    }
    if (!direct && warp == 0 && tq == 0) {
      p.lse[bh * p.num_splits + w.split] = natural_lse(m_run[r], l_row[r]);
    }
  }
#endif
}

}  // namespace mpskern::decode
