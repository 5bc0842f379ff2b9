// Paged decode attention on tensor cores, cp.async version (sm_80+, any page size).
//
// One CTA = (sequence, KV head, head chunk, KV split). All query heads that share the KV head (a GQA group,
// up to 16) form the M dimension of an m16n8k16 MMA, so each K/V byte is read from HBM once per CTA and the
// math stays far off the critical path: decode is a streaming read of the KV cache.
//
// Each warp streams its own 16-token tiles (tile w, w + NW, ...) through a private STAGES-deep cp.async ring
// in shared memory, so warps never wait on each other until the final merge. Page gathering happens in the
// copy: every 16-byte chunk's global address is computed from the block table. On sm_90 with pages of at
// least 16 tokens the TMA kernel (decode_attention_tma_kernel.cuh) is used instead.
#pragma once
#include "decode_attention/warp_attention.cuh"

namespace mpskern::decode {

template <int D>
struct Config {
  static constexpr int kWarps = 4;
  // Per warp, kStages - 1 tiles stay in flight. Measured on H100 (BENCHMARKS.md): 3 stages beat 2 (a grid of
  // one CTA per SM needs the depth: 0.5B 64 x 8192 with 2 stages is 11% slower) and 4 (D = 64: 0 to 2%).
  // D = 128 then takes 104 KB of shared memory, 2 CTAs per SM; D = 64, 55 KB.
  static constexpr int kStages = D == 256 ? 2 : 3;
  static constexpr int kRow = D + 8;  // padded smem row: 16 B shift per row makes ldmatrix conflict-free
  static constexpr int kStageElems = 2 * kTileTokens * kRow;  // K tile then V tile
  static constexpr int kThreads = kWarps * 32;
};

template <typename T, int D, int M>
constexpr int smem_bytes() {
  using C = Config<D>;
  constexpr int ring = C::kWarps * C::kStages * C::kStageElems * static_cast<int>(sizeof(T));
  constexpr int merge = merge_smem_bytes<D, M, C::kWarps>();
  return ring > merge ? ring : merge;
}

// A stage of the ring: K rows then V rows, each padded to kRow elements.
template <typename T, int D>
struct PaddedTile {
  const T* ks;
  __device__ const T* k(int row, int chunk) const { return ks + row * Config<D>::kRow + chunk * 8; }
  __device__ const T* v(int row, int chunk) const { return k(row + kTileTokens, chunk); }
};

template <typename T, int D, int M>
__global__ void __launch_bounds__(Config<D>::kThreads) decode_attention_kernel(const DecodeParams p) {
  using C = Config<D>;
  constexpr int CHUNKS_PER_ROW = D / 8;  // 16-byte chunks in one K/V row

  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const WorkItem w(p, blockIdx.x);
  const int my_tiles = w.warp_tiles(warp, C::kWarps);

  // ---- The warp's copy ring.
  T* ring = reinterpret_cast<T*>(smem_raw) + warp * C::kStages * C::kStageElems;
  const T* kbase = static_cast<const T*>(p.k_cache);
  const T* vbase = static_cast<const T*>(p.v_cache);
  const long long token_stride = static_cast<long long>(p.kv_heads) * D;  // elements between rows of a page

  // Lane r holds the page id of row r % 16 of a tile; the copy loop takes each row's id with a shuffle. It
  // is read one tile ahead of the copy, so the block-table latency hides behind a tile of math instead of
  // stalling the copy issue.
  auto fetch_page = [&](int i) { return w.page_of(w.tile_start(warp, C::kWarps, i) + lane % kTileTokens); };
  auto load_tile = [&](int i, int stage, int page_of_row) {
    const int tok0 = w.tile_start(warp, C::kWarps, i);
    T* ks = ring + stage * C::kStageElems;
    T* vs = ks + kTileTokens * C::kRow;
#pragma unroll
    for (int it = 0; it < kTileTokens * CHUNKS_PER_ROW / 32; ++it) {
      const int c = it * 32 + lane;
      const int row = c / CHUNKS_PER_ROW;
      const int col = (c % CHUNKS_PER_ROW) * 8;
      const int tok = tok0 + row;
      const bool valid = tok < w.end;
      const long long page = __shfl_sync(0xffffffffu, page_of_row, row);
      const long long off = ((page << w.page_shift) + (tok & (p.page_size - 1))) * token_stride + w.kvh * D + col;
      ptx::cp_async_16<kL2PrefetchBytes<D>>(ks + row * C::kRow + col, kbase + (valid ? off : 0), valid);
      ptx::cp_async_16<kL2PrefetchBytes<D>>(vs + row * C::kRow + col, vbase + (valid ? off : 0), valid);
    }
  };

  int first_pages[C::kStages - 1];  // issued before the loop below needs seq_len
#pragma unroll
  for (int s = 0; s < C::kStages - 1; ++s) first_pages[s] = fetch_page(s);
  WarpAttention<T, D, M> att(p, w, lane);
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
    const PaddedTile<T, D> tile{ring + (i % C::kStages) * C::kStageElems};
    att.template consume<false>(tile, w.tile_start(warp, C::kWarps, i), w.end, lane);
  }
  ptx::cp_async_wait<0>();
  __syncthreads();  // every warp is done with its ring: the merge reuses the memory
  const MergeBuffer<D, M> merge{reinterpret_cast<float*>(smem_raw)};
  stash_partial<C::kWarps>(att, merge, warp);
  __syncthreads();
  write_merged<C::kWarps, T>(p, w, merge, C::kThreads);
}

}  // namespace mpskern::decode
