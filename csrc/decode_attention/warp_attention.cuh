// The per-warp math of paged decode attention, shared by both decode kernels: which work a CTA owns, the
// Q fragments, S = Q K^T and O += P V on m16n8k16 tensor cores for one 16-token KV tile with an online
// softmax (log2 domain), and the final merge of the warps' partial softmax states.
//
// The kernels differ only in how a tile reaches shared memory (per-warp cp.async rings into padded rows, or
// TMA into 128-byte-swizzled panels), which a Layout hides: layout.k(row, chunk) / layout.v(row, chunk) give
// the shared address of 16-byte chunk `chunk` (8 elements along D) of token row `row` of the K / V tile.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
#include <cstdint>

#include "common/ptx.cuh"
#include "decode_attention/decode_attention.h"

namespace mpskern::decode {

constexpr int kTileTokens = 16;  // tokens per warp tile: the K dimension of the P.V MMA

// Bytes L2 fetches around each KV read (cp.async L2:: hint, TMA L2 promotion). A 128-byte row (D = 64) also
// pulls in the same token's row of the neighbouring KV head, which its CTA reads next: 2 to 2.5% faster on
// H100. From D = 128 on, 128 B: rows are whole lines already, and on H200 the TMA kernel's 256 B promotion made
// each 128-byte panel collide with its sibling's request (L2 hit rate 26%, 3 to 6% slower).
template <int D>
constexpr int kL2PrefetchBytes = D == 64 ? 256 : 128;

// What one CTA computes: (sequence, KV head, head chunk, KV split), flattened with the split fastest so the
// CTAs of one sequence run side by side.
struct WorkItem {
  int b, kvh, split;
  int head0, nheads;  // the query heads of this CTA
  int begin, end;     // token range [begin, end), clamped to the sequence and the block table
  int n_tiles;
  const int* table;   // this sequence's block-table row
  int page_shift, last_token;

  __device__ WorkItem(const DecodeParams& p, long long bid) {
    split = static_cast<int>(bid % p.num_splits);
    bid /= p.num_splits;
    const int chunk = static_cast<int>(bid % p.head_chunks);
    bid /= p.head_chunks;
    kvh = static_cast<int>(bid % p.kv_heads);
    b = static_cast<int>(bid / p.kv_heads);
    const int group = p.heads / p.kv_heads;
    head0 = kvh * group + chunk * p.heads_per_chunk;
    nheads = min(p.heads_per_chunk, group - chunk * p.heads_per_chunk);
    const int seq_len = min(max(p.seq_lens[b], 0), p.max_pages * p.page_size);
    begin = split * p.tokens_per_split;
    end = min(begin + p.tokens_per_split, seq_len);
    n_tiles = end > begin ? (end - begin + kTileTokens - 1) / kTileTokens : 0;
    table = p.block_table + static_cast<long long>(b) * p.max_pages;
    page_shift = __ffs(p.page_size) - 1;
    last_token = p.max_pages * p.page_size - 1;
  }

  // Narrow the range to part `part` of `parts` near-equal parts, cut at multiples of `tiles` tiles.
  __device__ void take_part(int part, int parts, int tiles) {
    const int chunks = (n_tiles + tiles - 1) / tiles;
    const int per = (chunks + parts - 1) / parts * tiles;
    const int first = begin;
    begin = first + min(part * per, n_tiles) * kTileTokens;
    end = min(end, first + min((part + 1) * per, n_tiles) * kTileTokens);
    n_tiles = end > begin ? (end - begin + kTileTokens - 1) / kTileTokens : 0;
  }

  // Warp w of nw takes tiles w, w + nw, ...: its count, and the first token of its i-th tile.
  __device__ int warp_tiles(int warp, int nw) const { return warp < n_tiles ? (n_tiles - warp + nw - 1) / nw : 0; }
  __device__ int tile_start(int warp, int nw, int i) const { return begin + (warp + i * nw) * kTileTokens; }

  // The page holding token `tok`. Clamped to the table row, not to seq_len, so reads can be issued before
  // seq_len arrives (its latency and the table's overlap at CTA start); ids past the end go unused.
  __device__ int page_of(int tok) const { return __ldg(table + (min(tok, last_token) >> page_shift)); }
};

// The CTA's query heads as m16n8k16 A-fragments over D: a0 (g, k..k+1), a1 (g+8, k..), a2 (g, k+8..),
// a3 (g+8, k+8..) for k step kk, with g = lane / 4 and k = 16 kk + 2 (lane % 4). Rows past the CTA's heads
// (or past M) are zero. Q is read once, by this CTA only: evict-first keeps it from displacing in L2 what is
// written or read again (7B 1024 x 512 on H200: 1.4% faster; the other shapes the same; BENCHMARKS.md).
template <typename T, int D, int M>
__device__ __forceinline__ void load_q_fragments(uint32_t (&qa)[D / 16][4], const DecodeParams& p, const WorkItem& w,
                                                 int lane) {
  const int g = lane / 4, tq = lane % 4;
  const T* qb = static_cast<const T*>(p.q) + w.b * p.q_stride_b;
  const uint64_t policy = ptx::evict_first_policy();
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = g + 8 * r;
    const bool ok = row < w.nheads && row < M;
    const T* qrow = qb + (w.head0 + (ok ? row : 0)) * p.q_stride_h;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const int k = kk * 16 + tq * 2;
      qa[kk][r] = ok ? ptx::ld_global_u32(qrow + k, policy) : 0u;
      qa[kk][r + 2] = ok ? ptx::ld_global_u32(qrow + k + 8, policy) : 0u;
    }
  }
}

// Masks for the two B-fragment registers of a 16-token V slice loaded with ldmatrix.trans, which hands this
// lane tokens (2 tq, 2 tq + 1), low half first, and +8 for the second register: they keep the halves of the
// first `valid` tokens. V rows past the end may hold anything (a TMA tile covers whole page rows), so their
// P.V contribution is zeroed in registers, where 0 * (inf or nan) would otherwise poison the sum.
__device__ __forceinline__ void v_token_masks(uint32_t (&vmask)[2], int tq, int valid) {
#pragma unroll
  for (int h = 0; h < 2; ++h)
    vmask[h] = (2 * tq + 8 * h < valid ? 0x0000ffffu : 0u) | (2 * tq + 8 * h + 1 < valid ? 0xffff0000u : 0u);
}

// The softmax scale in the log2 domain the kernels work in (exp2 instead of exp).
__device__ __forceinline__ float log2_scale(const DecodeParams& p) { return p.scale * 1.4426950408889634f; }

// A row's log2-domain maximum and sum back to the natural-log LSE of its scaled scores (-inf when empty).
__device__ __forceinline__ float natural_lse(float m_log2, float l) {
  return l > 0.f ? (m_log2 + log2f(l)) * 0.6931471805599453f : -INFINITY;
}

// An empty softmax state: R rows' running maxima and sums, and NT n8 tiles of the O accumulator.
template <int R, int NT>
__device__ __forceinline__ void reset_softmax_state(float (&m_run)[R], float (&l_run)[R], float (&o)[NT][2 * R]) {
#pragma unroll
  for (int r = 0; r < R; ++r) {
    m_run[r] = -INFINITY;
    l_run[r] = 0.f;
  }
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int j = 0; j < 2 * R; ++j) o[n][j] = 0.f;
}

// Online softmax over one row of a lane's scores s[NT][4] (n8 tiles of an m16n8 accumulator: row g in
// entries 0-1, row g + 8 in 2-3, tokens tok0 + 8 n + 2 tq + {0, 1}); a row lives in one quad of lanes.
// First: scale into the log2 domain, mask tokens >= end, and return the row's maximum over the quad.
template <int NT>
__device__ __forceinline__ float masked_row_max(float (&s)[NT][4], int r, int tok0, int end, int tq,
                                                float scale_log2) {
  float mx = -INFINITY;
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int tok = tok0 + n * 8 + tq * 2 + j;
      float x = s[n][2 * r + j] * scale_log2;
      x = tok < end ? x : -INFINITY;  // a select: stale or garbage K rows (even nan) never leak through
      s[n][2 * r + j] = x;
      mx = fmaxf(mx, x);
    }
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
  return fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
}

// Then, with the new running maximum m_new: the row's probabilities in place, this lane's share of the
// running sum, and the factor the accumulator must be rescaled by.
template <int NT>
__device__ __forceinline__ float online_softmax_row(float (&s)[NT][4], int r, float m_new, float& m_run,
                                                    float& l_run) {
  const float m_use = m_new == -INFINITY ? 0.f : m_new;  // fully masked so far: keep exp2 finite
  const float rescale = exp2f(m_run - m_use);
  m_run = m_new;
  float sum = 0.f;
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const float e = exp2f(s[n][2 * r + j] - m_use);
      s[n][2 * r + j] = e;
      sum += e;
    }
  l_run = l_run * rescale + sum;
  return rescale;
}

// O += P V for one 16-token k step and 16 columns: vb is V's ldmatrix.trans x4 (two n8 column tiles), vmask
// its token masks (v_token_masks); lo / hi hold the two tiles' accumulators, rows g and (R == 2) g + 8.
template <typename T, int R>
__device__ __forceinline__ void mma_pv_16cols(float (&lo)[2 * R], float (&hi)[2 * R], const uint32_t (&pa)[4],
                                              const uint32_t (&vb)[4], const uint32_t (&vmask)[2]) {
  auto step = [&](float(&o)[2 * R], int h) {
    const uint32_t bfrag[2] = {vb[2 * h] & vmask[0], vb[2 * h + 1] & vmask[1]};
    float acc[4] = {o[0], o[1], 0.f, 0.f};
    if constexpr (R == 2) {
      acc[2] = o[2];
      acc[3] = o[3];
    }
    ptx::mma_16816<T>(acc, pa, bfrag);
#pragma unroll
    for (int j = 0; j < 2 * R; ++j) o[j] = acc[j];
  };
  step(lo, 0);
  step(hi, 1);
}

// M = 8 or 16 query heads per CTA. With M = 8 rows 8..15 of the MMA tiles are zero padding that is never
// kept in registers.
template <typename T, int D, int M>
struct WarpAttention {
  static constexpr int R = M / 8;  // accumulator rows per thread: row g (and g + 8 when M == 16)
  static constexpr int KSTEPS = D / 16;
  static constexpr int NTILES = D / 8;

  int g, tq;  // MMA row group, thread in quad
  uint32_t qa[KSTEPS][4];  // Q as A-fragments: a0 (g, k..k+1), a1 (g+8, k..), a2 (g, k+8..), a3 (g+8, k+8..)
  float m_run[R], l_run[R];  // running max (log2 domain) and sum
  float o[NTILES][2 * R];
  float scale_log2;  // softmax scale in the log2 domain

  __device__ WarpAttention(const DecodeParams& p, const WorkItem& w, int lane)
      : g(lane / 4), tq(lane % 4), scale_log2(log2_scale(p)) {
    load_q_fragments<T, D, M>(qa, p, w, lane);
    reset_softmax_state(m_run, l_run, o);
  }

  // A tile's K and V as MMA B-fragments: once they are in registers the tile's shared memory can be reused.
  struct Fragments {
    uint32_t k[KSTEPS][4];  // matrices: (tok 0-7, k lo), (tok 0-7, k hi), (tok 8-15, k lo), (tok 8-15, k hi)
    uint32_t v[D / 16][4];  // matrices: (tok 0-7, d lo), (tok 8-15, d lo), (tok 0-7, d hi), (tok 8-15, d hi)
  };

  // ldmatrix sources of the fragments: lane l addresses row l % 8 of matrix l / 8 of an x4 load.
  template <typename Layout>
  __device__ __forceinline__ static void load_k(uint32_t (&r)[4], const Layout& lay, int kk, int lane) {
    const int mat = lane / 8;
    ptx::ldmatrix_x4(r, lay.k((mat >> 1) * 8 + lane % 8, kk * 2 + (mat & 1)));
  }
  template <typename Layout>
  __device__ __forceinline__ static void load_v(uint32_t (&r)[4], const Layout& lay, int nd, int lane) {
    const int mat = lane / 8;
    ptx::ldmatrix_x4_trans(r, lay.v((mat & 1) * 8 + lane % 8, nd * 2 + (mat >> 1)));
  }

  template <typename Layout>
  __device__ __forceinline__ static void load(Fragments& f, const Layout& lay, int lane) {
#pragma unroll
    for (int kk = 0; kk < KSTEPS; ++kk) load_k(f.k[kk], lay, kk, lane);
#pragma unroll
    for (int nd = 0; nd < D / 16; ++nd) load_v(f.v[nd], lay, nd, lane);
  }

  // One 16-token tile starting at token tok0; tokens >= end are masked. kMaskV: V rows past `end` are zeroed
  // in registers (v_token_masks); the cp.async path zero-fills them in shared memory instead.
  // consume() reads the fragments from shared memory as the math needs them (fewest live registers);
  // compute() takes them preloaded, so the caller can reuse the tile's shared memory first.
  template <bool kMaskV, typename Layout>
  __device__ __forceinline__ void consume(const Layout& lay, int tok0, int end, int lane) {
    tile_math<kMaskV>([&](uint32_t(&r)[4], int kk) { load_k(r, lay, kk, lane); },
                      [&](uint32_t(&r)[4], int nd) { load_v(r, lay, nd, lane); }, tok0, end);
  }

  template <bool kMaskV>
  __device__ __forceinline__ void compute(const Fragments& f, int tok0, int end) {
    auto copy = [](uint32_t(&r)[4], const uint32_t(&src)[4]) {
#pragma unroll
      for (int j = 0; j < 4; ++j) r[j] = src[j];
    };
    tile_math<kMaskV>([&](uint32_t(&r)[4], int kk) { copy(r, f.k[kk]); },
                      [&](uint32_t(&r)[4], int nd) { copy(r, f.v[nd]); }, tok0, end);
  }

  template <bool kMaskV, typename KFrag, typename VFrag>
  __device__ __forceinline__ void tile_math(KFrag&& k_frag, VFrag&& v_frag, int tok0, int end) {
    // S = Q K^T for 16 tokens (two n-tiles of 8). Up to D = 128 the k steps run as two independent MMA
    // chains, halving the dependent latency; at D = 256 the 8 extra registers would spill.
    constexpr bool kTwoChains = D <= 128;
    float s[2][4] = {}, s_odd[2][4] = {};
#pragma unroll
    for (int kk = 0; kk < KSTEPS; ++kk) {
      uint32_t kb[4];
      k_frag(kb, kk);
      const uint32_t b0[2] = {kb[0], kb[1]};
      const uint32_t b1[2] = {kb[2], kb[3]};
      const bool odd = kTwoChains && kk % 2;
      ptx::mma_16816<T>(odd ? s_odd[0] : s[0], qa[kk], b0);
      ptx::mma_16816<T>(odd ? s_odd[1] : s[1], qa[kk], b1);
    }
    if constexpr (kTwoChains) {
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int j = 0; j < 4; ++j) s[n][j] += s_odd[n][j];
    }

    // Mask tokens past the end, rescale, online softmax per row.
    float rescale[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float mx = masked_row_max(s, r, tok0, end, tq, scale_log2);
      rescale[r] = online_softmax_row(s, r, fmaxf(m_run[r], mx), m_run[r], l_run[r]);
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
    uint32_t vmask[2] = {0xffffffffu, 0xffffffffu};
    if constexpr (kMaskV) v_token_masks(vmask, tq, end - tok0);
#pragma unroll
    for (int nd = 0; nd < D / 16; ++nd) {
      uint32_t vb[4];
      v_frag(vb, nd);
      mma_pv_16cols<T, R>(o[2 * nd], o[2 * nd + 1], pa, vb, vmask);
    }
  }
};

// Padded fp32 row of the warp-merge buffer: a half-warp's float2 stores (rows g..g+3, quads of columns) then
// hit 32 distinct banks. Unpadded, the 8 rows of a store shared one bank (ncu: 8-way conflicts).
template <int D>
constexpr int kMergeRow = D + 8;

template <int D, int M, int kWarps>
constexpr int merge_smem_bytes() {
  return kWarps * M * (kMergeRow<D> + 2) * static_cast<int>(sizeof(float));
}

// The warps' partial states meet in shared memory (merge_smem_bytes, free by then): each warp stashes its
// own, then every thread of the CTA helps write the merged heads, straight to `out` when unsplit, else the
// normalised partial and its LSE for the combine kernel.
template <int D, int M>
struct MergeBuffer {
  static constexpr int MR = kMergeRow<D>;
  float* smem;
  __device__ float* o(int warp, int row) const { return smem + (warp * M + row) * MR; }
  template <int kWarps>
  __device__ float* ml(int warp, int row) const { return smem + kWarps * M * MR + (warp * M + row) * 2; }
};

template <int kWarps, typename T, int D, int M>
__device__ void stash_partial(const WarpAttention<T, D, M>& att, MergeBuffer<D, M> buf, int warp) {
#pragma unroll
  for (int r = 0; r < M / 8; ++r) {
    float l = att.l_run[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int row = att.g + 8 * r;
    float* dst = buf.o(warp, row);
#pragma unroll
    for (int n = 0; n < WarpAttention<T, D, M>::NTILES; ++n)
      *reinterpret_cast<float2*>(dst + n * 8 + att.tq * 2) = make_float2(att.o[n][2 * r], att.o[n][2 * r + 1]);
    if (att.tq == 0) {
      buf.template ml<kWarps>(warp, row)[0] = att.m_run[r];
      buf.template ml<kWarps>(warp, row)[1] = l;
    }
  }
}

// After every warp's stash_partial and a __syncthreads; called by all nthreads threads of the CTA.
template <int kWarps, typename T, int D, int M>
__device__ void write_merged(const DecodeParams& p, const WorkItem& w, MergeBuffer<D, M> buf, int nthreads) {
  const bool direct = p.num_splits == 1;
  for (int idx = threadIdx.x; idx < w.nheads * D; idx += nthreads) {
    const int row = idx / D;
    const int d = idx % D;
    float m_max = -INFINITY;
#pragma unroll
    for (int v = 0; v < kWarps; ++v) m_max = fmaxf(m_max, buf.template ml<kWarps>(v, row)[0]);
    float l_sum = 0.f, acc = 0.f;
    if (m_max != -INFINITY) {
#pragma unroll
      for (int v = 0; v < kWarps; ++v) {
        const float* ml = buf.template ml<kWarps>(v, row);
        const float f = exp2f(ml[0] - m_max);
        l_sum += ml[1] * f;
        acc += buf.o(v, row)[d] * f;
      }
    }
    const float val = l_sum > 0.f ? acc / l_sum : 0.f;
    const int h = w.head0 + row;
    if (direct) {
      static_cast<T*>(p.out)[w.b * p.out_stride_b + h * p.out_stride_h + d] = ptx::from_float<T>(val);
    } else {
      const long long bh = static_cast<long long>(w.b) * p.heads + h;
      p.o_partial[(bh * p.num_splits + w.split) * D + d] = val;
      if (d == 0) {
        p.lse[bh * p.num_splits + w.split] = natural_lse(m_max, l_sum);
      }
    }
  }
}

}  // namespace mpskern::decode
