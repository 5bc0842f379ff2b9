// Paged decode attention on tensor cores, TMA version with per-warp rings (sm_90, D = 64, pages of at least
// 16 tokens). D >= 128 takes the round kernel (decode_attention_round_kernel.cuh).
//
// Same work split and math as the cp.async kernel (warp_attention.cuh); what changes is how KV reaches
// shared memory: one lane per warp fetches its tiles with TMA (tma_tile.cuh).
//
// Each warp feeds its own ring of kStagesPerWarp stages (tiles w, w + NW, ... of the CTA's range) and waits
// on them strictly in order, so a barrier phase is never more than one ahead of its waiter. The warp moves a
// landed tile into registers and refills its stage before doing the math, so the whole ring stays in flight.
// Measured on H200 (BENCHMARKS.md): a producer warp feeding all warps in order lost 5 to 35% to head-of-line
// blocking, and two CTAs per SM beat one CTA with a ring twice as deep.
#pragma once
#include <cuda.h>

#include "common/tma.cuh"
#include "decode_attention/tma_tile.cuh"
#include "decode_attention/warp_attention.cuh"

namespace mpskern::decode {

// Measured on H200 (BENCHMARKS.md): D = 64 needs 16 warps per SM (8 per CTA: 7 to 12% faster than 4), and
// two stages per warp beat three by 0 to 3%. 8 warps x 2 stages x 4 KB = 64 KB: two CTAs per SM (registers
// cap it there). At D = 64 this kernel beats the round kernel by 0 to 25% (BENCHMARKS.md).
template <int D>
struct TmaConfig {
  static_assert(D == 64, "the per-warp TMA kernel serves D = 64");
  static constexpr int kWarps = 8;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kStageBytes = TmaTile<D>::kBytes;
  static constexpr int kStagesPerWarp = 2;
  static constexpr int kStages = kWarps * kStagesPerWarp;
};

template <typename T, int D, int M>
constexpr int tma_smem_bytes() {
  using C = TmaConfig<D>;
  constexpr int ring = C::kStages * C::kStageBytes;
  constexpr int merge = merge_smem_bytes<D, M, C::kWarps>();
  return (ring > merge ? ring : merge) + kTmaSwizzleAlign;  // slack to align the ring by hand
}

// tmap_k / tmap_v: the caches as 4-D maps {64 columns, rows, D / 64 panels, kv_heads} with a {64, 16, D / 64, 1} box
// (kv_tensor_map in decode_attention.cu).
template <typename T, int D, int M>
__global__ void __launch_bounds__(TmaConfig<D>::kThreads)
    decode_attention_tma_kernel(const __grid_constant__ DecodeParams p, const __grid_constant__ CUtensorMap tmap_k,
                                const __grid_constant__ CUtensorMap tmap_v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using C = TmaConfig<D>;
  using Warp = WarpAttention<T, D, M>;
  constexpr int NW = C::kWarps;
  constexpr int SW = C::kStagesPerWarp;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* base = swizzle_aligned(smem_raw);
  __shared__ uint64_t full_all[C::kStages];

  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  uint64_t* full = full_all + warp * SW;
  unsigned char* ring = base + warp * SW * C::kStageBytes;
  if (lane == 0) {
    for (int s = 0; s < SW; ++s) tma::mbar_init(&full[s], 1);  // lane 0's arrive; the copies add their bytes
    tma::mbar_init_fence();
  }
  __syncwarp();

  const WorkItem w(p, blockIdx.x);
  const int my_tiles = w.warp_tiles(warp, NW);
  // Page id of the warp's k-th tile: lane l holds tile k0 + l's, and the next 32 are read 32 tiles ahead.
  auto page_of = [&](int k) { return w.page_of(w.tile_start(warp, NW, k)); };
  int ids = page_of(lane), ids_next = page_of(32 + lane);
  auto issue = [&](int k) {  // called for k = 0, 1, 2, ... in order
    if ((k & 31) == 0 && k > 0) {
      ids = ids_next;
      ids_next = page_of(k + 32 + lane);
    }
    const int pg = __shfl_sync(0xffffffffu, ids, k & 31);
    if (lane == 0) {
      tma::fence_proxy_async();  // the lanes' reads of this stage come before the copy's writes
      const int row = pg * p.page_size + (w.tile_start(warp, NW, k) & (p.page_size - 1));
      tma::mbar_arrive_expect_tx(&full[k % SW], C::kStageBytes);
      load_tile<D>(ring + (k % SW) * C::kStageBytes, &tmap_k, &tmap_v, w.kvh, row, &full[k % SW]);
    }
  };

  Warp att(p, w, lane);
  for (int k = 0; k < SW && k < my_tiles; ++k) issue(k);
  for (int i = 0; i < my_tiles; ++i) {
    tma::mbar_wait(&full[i % SW], (i / SW) & 1);
    const SwizzledTile<T, D> tile{ring + (i % SW) * C::kStageBytes};
    typename Warp::Fragments f;
    Warp::load(f, tile, lane);
    __syncwarp();
    if (i + SW < my_tiles) issue(i + SW);  // refills the stage just read
    att.template compute<true>(f, w.tile_start(warp, NW, i), w.end);
  }
  // Every copy was waited for, so the rings are free for the merge once all warps are here.
  __syncthreads();
  const MergeBuffer<D, M> merge{reinterpret_cast<float*>(base)};
  stash_partial<NW>(att, merge, warp);
  __syncthreads();
  write_merged<NW, T>(p, w, merge, C::kThreads);
#endif
}

}  // namespace mpskern::decode
