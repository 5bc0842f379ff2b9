// Paged decode attention on tensor cores.
//
// One CTA = (sequence, KV head, head chunk, KV split). All query heads that share the KV head (a GQA group,
// up to 16) form the M dimension of an m16n8k16 MMA, so each K/V byte is read from HBM once per CTA and the
// math stays far off the critical path: decode is a streaming read of the KV cache.
//
// Each warp streams its own 16-token tiles (tile w, w + NW, ...) through a private STAGES-deep cp.async ring
// in shared memory, so warps never wait on each other until the final merge. Page gathering happens in the
// copy: every 16-byte chunk's global address is computed from the block table.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
#include <cstdint>

#include "common/ptx.cuh"
#include "decode_attention/decode_attention.h"

namespace mpskern::decode {

constexpr int kTileTokens = 16;  // tokens per warp tile: the K dimension of the P.V MMA

template <int D>
struct Config {
  static constexpr int kWarps = 4;
  // Per warp, kStages - 1 tiles stay in flight. Measured on H100 (BENCHMARKS.md): 3 stages beat 2 (a grid of
  // one CTA per SM needs the depth: 0.5B 64 x 8192 with 2 stages is 11% slower) and 4 (D = 64: 0 to 2%).
  // D = 128 then takes 104 KB of shared memory, 2 CTAs per SM; D = 64, 55 KB.
#ifdef MPSK_DECODE_STAGES  // tuning experiments: -DMPSK_DECODE_STAGES=2 etc.
  static constexpr int kStages = D == 256 ? 2 : MPSK_DECODE_STAGES;
#else
  static constexpr int kStages = D == 256 ? 2 : 3;
#endif
  static constexpr int kRow = D + 8;  // padded smem row: 16 B shift per row makes ldmatrix conflict-free
  // Padded fp32 row of the warp-merge buffer: a half-warp's float2 stores (rows g..g+3, quads of columns)
  // then hit 32 distinct banks. Unpadded, the 8 rows of a store shared one bank (ncu: 8-way conflicts).
  static constexpr int kMergeRow = D + 8;
  static constexpr int kStageElems = 2 * kTileTokens * kRow;  // K tile then V tile
  // A 128-byte row (D = 64) also pulls the next 128 B into L2: the same token's row of the neighbouring KV
  // head (another CTA's) or the next token's. Measured on the 0.5B shapes: 2 to 2.5% faster; no gain at
  // D = 128, where 128 B prefetch is 1 to 2% better than none.
  static constexpr int kL2Prefetch = D == 64 ? 256 : 128;
  static constexpr int kThreads = kWarps * 32;
};

template <typename T, int D, int M>
constexpr int smem_bytes() {
  using C = Config<D>;
  constexpr int ring = C::kWarps * C::kStages * C::kStageElems * static_cast<int>(sizeof(T));
  constexpr int merge = C::kWarps * M * (C::kMergeRow + 2) * static_cast<int>(sizeof(float));
  return ring > merge ? ring : merge;
}

// M = 8 or 16 query heads per CTA. With M = 8 rows 8..15 of the MMA tiles are zero padding that is never
// kept in registers.
template <typename T, int D, int M>
__global__ void __launch_bounds__(Config<D>::kThreads)
    decode_attention_kernel(const DecodeParams p) {
  using C = Config<D>;
  constexpr int R = M / 8;  // accumulator rows per thread: row g (and g + 8 when M == 16)
  constexpr int KSTEPS = D / 16;
  constexpr int NTILES = D / 8;
  constexpr int CHUNKS_PER_ROW = D / 8;  // 16-byte chunks in one K/V row

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);

  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int g = lane / 4;  // MMA row group
  const int tq = lane % 4;  // thread in quad

  // Decode the flattened grid: split fastest, so the CTAs of one sequence run side by side.
  long long bid = blockIdx.x;
  const int split = static_cast<int>(bid % p.num_splits);
  bid /= p.num_splits;
  const int chunk = static_cast<int>(bid % p.head_chunks);
  bid /= p.head_chunks;
  const int kvh = static_cast<int>(bid % p.kv_heads);
  const int b = static_cast<int>(bid / p.kv_heads);

  const int group = p.heads / p.kv_heads;
  const int head0 = kvh * group + chunk * p.heads_per_chunk;
  const int nheads = min(p.heads_per_chunk, group - chunk * p.heads_per_chunk);

  const int seq_len = min(max(p.seq_lens[b], 0), p.max_pages * p.page_size);
  const int begin = split * p.tokens_per_split;
  const int end = min(begin + p.tokens_per_split, seq_len);
  const int n_tiles = end > begin ? (end - begin + kTileTokens - 1) / kTileTokens : 0;
  const int my_tiles = warp < n_tiles ? (n_tiles - warp + C::kWarps - 1) / C::kWarps : 0;

  // ---- Q as MMA A-fragments, loaded once. a0: (g, k..k+1), a1: (g+8, k..), a2: (g, k+8..), a3: (g+8, k+8..)
  uint32_t qa[KSTEPS][4];
  {
    const T* qb = static_cast<const T*>(p.q) + b * p.q_stride_b;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = g + 8 * r;
      const bool ok = row < nheads && row < M;
      const T* qrow = qb + (head0 + (ok ? row : 0)) * p.q_stride_h;
#pragma unroll
      for (int kk = 0; kk < KSTEPS; ++kk) {
        const int k = kk * 16 + tq * 2;
        qa[kk][r] = ok ? *reinterpret_cast<const uint32_t*>(qrow + k) : 0u;
        qa[kk][r + 2] = ok ? *reinterpret_cast<const uint32_t*>(qrow + k + 8) : 0u;
      }
    }
  }

  // ---- The warp's copy ring.
  T* ring = smem + warp * C::kStages * C::kStageElems;
  const T* kbase = static_cast<const T*>(p.k_cache);
  const T* vbase = static_cast<const T*>(p.v_cache);
  const int* table = p.block_table + static_cast<long long>(b) * p.max_pages;
  const int page_shift = __ffs(p.page_size) - 1;
  const long long token_stride = static_cast<long long>(p.kv_heads) * D;  // elements between rows of a page

  // Lane r holds the page id of row r % 16 of a tile; the copy loop takes each row's id with a shuffle. It
  // is read one tile ahead of the copy, so the block-table latency hides behind a tile of math instead of
  // stalling the copy issue. The read is clamped to the table row, not to seq_len, so the first reads do not
  // wait for seq_len's load: the two latencies overlap at CTA start. Ids past the sequence are never used.
  const int last_token = p.max_pages * p.page_size - 1;
  auto fetch_page = [&](int i) {
    const int tok = min(begin + (warp + i * C::kWarps) * kTileTokens + lane % kTileTokens, last_token);
    return __ldg(table + (tok >> page_shift));
  };
  auto load_tile = [&](int i, int stage, int page_of_row) {
    const int tok0 = begin + (warp + i * C::kWarps) * kTileTokens;
    T* ks = ring + stage * C::kStageElems;
    T* vs = ks + kTileTokens * C::kRow;
#pragma unroll
    for (int it = 0; it < kTileTokens * CHUNKS_PER_ROW / 32; ++it) {
      const int c = it * 32 + lane;
      const int row = c / CHUNKS_PER_ROW;
      const int col = (c % CHUNKS_PER_ROW) * 8;
      const int tok = tok0 + row;
      const bool valid = tok < end;
      const long long page = __shfl_sync(0xffffffffu, page_of_row, row);
      const long long off = ((page << page_shift) + (tok & (p.page_size - 1))) * token_stride + kvh * D + col;
      ptx::cp_async_16<C::kL2Prefetch>(ks + row * C::kRow + col, kbase + (valid ? off : 0), valid);
      ptx::cp_async_16<C::kL2Prefetch>(vs + row * C::kRow + col, vbase + (valid ? off : 0), valid);
    }
  };

  // ---- Online-softmax state (log2 domain) and the O accumulator, rows g (+8 when M == 16).
  float m_run[R], l_run[R];
  float o[NTILES][2 * R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    m_run[r] = -INFINITY;
    l_run[r] = 0.f;
  }
#pragma unroll
  for (int n = 0; n < NTILES; ++n)
#pragma unroll
    for (int j = 0; j < 2 * R; ++j) o[n][j] = 0.f;

  const float scale_log2 = p.scale * 1.4426950408889634f;

  int first_pages[C::kStages - 1];  // issued before the loop below needs seq_len
#pragma unroll
  for (int s = 0; s < C::kStages - 1; ++s) first_pages[s] = fetch_page(s);
#pragma unroll
  for (int s = 0; s < C::kStages - 1; ++s) {
    if (s < my_tiles) load_tile(s, s, first_pages[s]);
    ptx::cp_async_commit();
  }
  int next_page = fetch_page(C::kStages - 1);

  for (int i = 0; i < my_tiles; ++i) {
    ptx::cp_async_wait<C::kStages - 2>();
    __syncwarp();
    {
      const int next = i + C::kStages - 1;
      if (next < my_tiles) load_tile(next, next % C::kStages, next_page);
      ptx::cp_async_commit();
      next_page = fetch_page(next + 1);
    }
    const T* ks = ring + (i % C::kStages) * C::kStageElems;
    const T* vs = ks + kTileTokens * C::kRow;
    const int tok0 = begin + (warp + i * C::kWarps) * kTileTokens;

    // S = Q K^T for 16 tokens: two n-tiles of 8 tokens.
    float s[2][4] = {};
#pragma unroll
    for (int kk = 0; kk < KSTEPS; ++kk) {
      uint32_t kb[4];  // matrices: (tok 0-7, k lo), (tok 0-7, k hi), (tok 8-15, k lo), (tok 8-15, k hi)
      const int mat = lane / 8;
      ptx::ldmatrix_x4(kb, ks + ((mat >> 1) * 8 + lane % 8) * C::kRow + kk * 16 + (mat & 1) * 8);
      const uint32_t b0[2] = {kb[0], kb[1]};
      const uint32_t b1[2] = {kb[2], kb[3]};
      ptx::mma_16816<T>(s[0], qa[kk], b0);
      ptx::mma_16816<T>(s[1], qa[kk], b1);
    }

    // Mask tokens past the end, rescale, online softmax per row (a row lives in one quad of lanes).
    float rescale[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int tok = tok0 + n * 8 + tq * 2 + j;
          float x = s[n][2 * r + j] * scale_log2;
          x = tok < end ? x : -INFINITY;
          s[n][2 * r + j] = x;
          mx = fmaxf(mx, x);
        }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m_run[r], mx);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;  // fully masked so far: keep exp2 finite
      rescale[r] = exp2f(m_run[r] - m_use);
      m_run[r] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const float e = exp2f(s[n][2 * r + j] - m_use);
          s[n][2 * r + j] = e;
          sum += e;
        }
      l_run[r] = l_run[r] * rescale[r] + sum;
    }
#pragma unroll
    for (int n = 0; n < NTILES; ++n)
#pragma unroll
      for (int j = 0; j < 2 * R; ++j) o[n][j] *= rescale[j / 2];

    // O += P V: P's accumulator layout is exactly the A-fragment layout of a k16 step.
    uint32_t pa[4];
    pa[0] = ptx::pack2<T>(s[0][0], s[0][1]);
    pa[2] = ptx::pack2<T>(s[1][0], s[1][1]);
    if constexpr (R == 2) {
      pa[1] = ptx::pack2<T>(s[0][2], s[0][3]);
      pa[3] = ptx::pack2<T>(s[1][2], s[1][3]);
    } else {
      pa[1] = 0u;
      pa[3] = 0u;
    }
#pragma unroll
    for (int nd = 0; nd < D / 16; ++nd) {
      uint32_t vb[4];  // matrices: (tok 0-7, d lo), (tok 8-15, d lo), (tok 0-7, d hi), (tok 8-15, d hi)
      const int mat = lane / 8;
      ptx::ldmatrix_x4_trans(vb, vs + ((mat & 1) * 8 + lane % 8) * C::kRow + nd * 16 + (mat >> 1) * 8);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint32_t bfrag[2] = {vb[2 * h], vb[2 * h + 1]};
        float acc[4] = {o[2 * nd + h][0], o[2 * nd + h][1], 0.f, 0.f};
        if constexpr (R == 2) {
          acc[2] = o[2 * nd + h][2];
          acc[3] = o[2 * nd + h][3];
        }
        ptx::mma_16816<T>(acc, pa, bfrag);
#pragma unroll
        for (int j = 0; j < 2 * R; ++j) o[2 * nd + h][j] = acc[j];
      }
    }
  }
  ptx::cp_async_wait<0>();

  // ---- Merge the warps' partial softmax states through shared memory (the ring is free now).
#pragma unroll
  for (int r = 0; r < R; ++r) {
    l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 1);
    l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 2);
  }
  __syncthreads();
  float* mo = reinterpret_cast<float*>(smem_raw);     // [warps][M][kMergeRow] partial O
  float* ml = mo + C::kWarps * M * C::kMergeRow;       // [warps][M][2]: m, l
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int row = g + 8 * r;
    float* dst = mo + (warp * M + row) * C::kMergeRow;
#pragma unroll
    for (int n = 0; n < NTILES; ++n)
      *reinterpret_cast<float2*>(dst + n * 8 + tq * 2) = make_float2(o[n][2 * r], o[n][2 * r + 1]);
    if (tq == 0) {
      ml[(warp * M + row) * 2] = m_run[r];
      ml[(warp * M + row) * 2 + 1] = l_run[r];
    }
  }
  __syncthreads();

  const bool direct = p.num_splits == 1;
  for (int idx = threadIdx.x; idx < nheads * D; idx += C::kThreads) {
    const int row = idx / D;
    const int d = idx % D;
    float m_max = -INFINITY;
#pragma unroll
    for (int w = 0; w < C::kWarps; ++w) m_max = fmaxf(m_max, ml[(w * M + row) * 2]);
    float l_sum = 0.f, acc = 0.f;
    if (m_max != -INFINITY) {
#pragma unroll
      for (int w = 0; w < C::kWarps; ++w) {
        const float f = exp2f(ml[(w * M + row) * 2] - m_max);
        l_sum += ml[(w * M + row) * 2 + 1] * f;
        acc += mo[(w * M + row) * C::kMergeRow + d] * f;
      }
    }
    const float val = l_sum > 0.f ? acc / l_sum : 0.f;
    const int h = head0 + row;
    if (direct) {
      static_cast<T*>(p.out)[b * p.out_stride_b + h * p.out_stride_h + d] = ptx::from_float<T>(val);
    } else {
      const long long bh = static_cast<long long>(b) * p.heads + h;
      p.o_partial[(bh * p.num_splits + split) * D + d] = val;
      if (d == 0) {
        // log2-domain max and sum back to the natural-log LSE of the scaled scores.
        p.lse[bh * p.num_splits + split] = l_sum > 0.f ? (m_max + log2f(l_sum)) * 0.6931471805599453f : -INFINITY;
      }
    }
  }
}

// Merge the per-split partials of one (sequence, head): out = sum_s exp(lse_s - LSE) * o_s / sum_s exp(...).
// Splits are spread over the block (not looped per thread), so the partials' L2 latency is paid once.
constexpr int kCombineThreads = 128;

template <typename T>
__global__ void __launch_bounds__(kCombineThreads) decode_combine_kernel(const DecodeParams p) {
  extern __shared__ float weights[];  // [num_splits], then [kCombineThreads] partial sums
  __shared__ float red[kCombineThreads / 32];
  const int bh = blockIdx.x;
  const int b = bh / p.heads;
  const int h = bh % p.heads;
  const int S = p.num_splits;
  const int D = p.head_dim;
  const float* lse = p.lse + static_cast<long long>(bh) * S;
  const float* op = p.o_partial + static_cast<long long>(bh) * S * D;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;

  float m = -INFINITY;
  for (int s = threadIdx.x; s < S; s += kCombineThreads) m = fmaxf(m, lse[s]);
  for (int o = 16; o; o /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  if (lane == 0) red[warp] = m;
  __syncthreads();
  m = red[0];
#pragma unroll
  for (int w = 1; w < kCombineThreads / 32; ++w) m = fmaxf(m, red[w]);
  float sum = 0.f;
  for (int s = threadIdx.x; s < S; s += kCombineThreads) {
    const float w = m == -INFINITY ? 0.f : __expf(lse[s] - m);
    weights[s] = w;
    sum += w;
  }
  for (int o = 16; o; o /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  __syncthreads();  // everyone has read red[] for the max
  if (lane == 0) red[warp] = sum;
  __syncthreads();
  float denom = 0.f;
#pragma unroll
  for (int w = 0; w < kCombineThreads / 32; ++w) denom += red[w];

  // Threads = (split lane, 4-float column); D / 4 columns, the rest of the block strides over splits.
  const int cols = D / 4;
  const int col = threadIdx.x % cols;
  const int rows = kCombineThreads / cols;
  const int row = threadIdx.x / cols;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 4
  for (int s = row; s < S; s += rows) {
    const float w = weights[s];
    const float4 v = reinterpret_cast<const float4*>(op + static_cast<long long>(s) * D)[col];
    acc.x += w * v.x;
    acc.y += w * v.y;
    acc.z += w * v.z;
    acc.w += w * v.w;
  }
  float4* part = reinterpret_cast<float4*>(weights + S + (S & 3 ? 4 - (S & 3) : 0));  // 16-byte aligned
  part[threadIdx.x] = acc;
  __syncthreads();
  if (row == 0) {
    for (int r = 1; r < rows; ++r) {
      const float4 v = part[r * cols + col];
      acc.x += v.x;
      acc.y += v.y;
      acc.z += v.z;
      acc.w += v.w;
    }
    const float inv = denom > 0.f ? 1.f / denom : 0.f;
    T* out = static_cast<T*>(p.out) + b * p.out_stride_b + h * p.out_stride_h + col * 4;
    out[0] = ptx::from_float<T>(acc.x * inv);
    out[1] = ptx::from_float<T>(acc.y * inv);
    out[2] = ptx::from_float<T>(acc.z * inv);
    out[3] = ptx::from_float<T>(acc.w * inv);
  }
}

// Dynamic shared memory of the combine kernel: the split weights, padded to 16 B, then the partial sums.
inline int combine_smem_bytes(int num_splits) {
  return ((num_splits + 3) / 4 * 4 + 4 * kCombineThreads) * static_cast<int>(sizeof(float));
}

}  // namespace mpskern::decode
