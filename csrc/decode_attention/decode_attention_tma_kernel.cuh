// Paged decode attention on tensor cores, TMA version (sm_90, pages of at least 16 tokens).
//
// Same work split and math as the cp.async kernel (warp_attention.cuh); what changes is how KV reaches
// shared memory. A 16-token tile of one KV head is a 16-row box of the cache viewed as [page rows, KV head,
// D], so one lane fetches it with D / 64 TMA copies for K and as many for V (64 columns, 128 bytes, per
// 128B-swizzled panel): no per-thread address arithmetic and no copy instructions in the math warps.
//
// Each warp feeds its own ring of kStagesPerWarp stages (tiles w, w + NW, ... of the CTA's range) and waits
// on them strictly in order, so a barrier phase is never more than one ahead of its waiter. The warp moves a
// landed tile into registers and refills its stage before doing the math (kEarlyRelease), so the whole ring
// stays in flight. Measured on H200 (BENCHMARKS.md): a producer warp feeding all warps in order lost 5 to
// 35% to head-of-line blocking, and two CTAs per SM beat one CTA with a ring twice as deep.
#pragma once
#include <cuda.h>

#include "common/tma.cuh"
#include "decode_attention/warp_attention.cuh"

namespace mpskern::decode {

constexpr int kPanelCols = 64;                  // columns per swizzled panel: 128 bytes of 16-bit values
constexpr int kPanelBytes = kTileTokens * 128;  // 16 rows of 128 bytes
constexpr int kTmaSwizzleAlign = 1024;          // the 128B swizzle repeats every 8 rows: panels start 1 KB-aligned

// Measured on H200 (BENCHMARKS.md): D = 64 needs 16 warps per SM (8 per CTA: 7 to 12% faster than 4);
// D = 128 is best at 4 warps (6 x 2 was 0 to 3% faster at 256+ tokens per CTA but 4 to 5% slower at 512;
// 8 warps in one CTA per SM, 1 to 5% slower). Two stages per warp beat three by 0 to 3% with fewer KV pages
// in flight (why was not measured); one stage is up to 10% slower.
template <int D>
struct TmaConfig {
  // D = 64: 8 warps x 2 stages x 4 KB; D = 128: 4 x 2 x 8 KB; both 64 KB, two CTAs (16 or 8 warps) per SM
  // (registers cap it there). D = 256: 4 x 2 x 16 KB = 128 KB, one CTA.
  static constexpr int kWarps = D == 64 ? 8 : 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kPanels = D / kPanelCols;
  static constexpr int kStageBytes = 2 * kPanels * kPanelBytes;  // K panels, then V panels
  static constexpr int kStagesPerWarp = 2;
  static constexpr int kStages = kWarps * kStagesPerWarp;
  // At D = 256 a tile's fragments (128 registers) do not fit beside O: the stage is held through the math.
  static constexpr bool kEarlyRelease = D <= 128;
};

template <typename T, int D, int M>
constexpr int tma_smem_bytes() {
  using C = TmaConfig<D>;
  constexpr int ring = C::kStages * C::kStageBytes;
  constexpr int merge = merge_smem_bytes<D, M, C::kWarps>();
  return (ring > merge ? ring : merge) + kTmaSwizzleAlign;  // slack to align the ring by hand
}

// A stage in 128B-swizzled panels: 16-byte chunk c of row r sits at chunk c ^ (r % 8) of the row's 128 bytes.
template <typename T, int D>
struct SwizzledTile {
  const unsigned char* base;
  __device__ const T* at(int panel0, int row, int chunk) const {
    const int panel = panel0 + chunk / 8;
    return reinterpret_cast<const T*>(base + panel * kPanelBytes + row * 128 + (((chunk % 8) ^ (row % 8)) << 4));
  }
  __device__ const T* k(int row, int chunk) const { return at(0, row, chunk); }
  __device__ const T* v(int row, int chunk) const { return at(TmaConfig<D>::kPanels, row, chunk); }
};

// One thread: the 16 rows from page row `row` of KV head kvh into a stage, signalling `bar` on arrival.
template <int D>
__device__ __forceinline__ void load_stage(unsigned char* dst, const CUtensorMap* tmap_k, const CUtensorMap* tmap_v,
                                           int kvh, int row, uint64_t* bar) {
  using C = TmaConfig<D>;
  tma::mbar_arrive_expect_tx(bar, C::kStageBytes);
#pragma unroll
  for (int pn = 0; pn < C::kPanels; ++pn) {
    tma::load_3d(dst + pn * kPanelBytes, tmap_k, pn * kPanelCols, kvh, row, bar);
    tma::load_3d(dst + (C::kPanels + pn) * kPanelBytes, tmap_v, pn * kPanelCols, kvh, row, bar);
  }
}

// tmap_k / tmap_v: the caches as 3-D tensors [num_pages * page_size][kv_heads][D] with a {64, 1, 16} box.
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
  unsigned char* base = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + kTmaSwizzleAlign - 1) & ~uintptr_t(kTmaSwizzleAlign - 1));
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
      load_stage<D>(ring + (k % SW) * C::kStageBytes, &tmap_k, &tmap_v, w.kvh, row, &full[k % SW]);
    }
  };

  Warp att(p, w, lane);
  constexpr int kAhead = C::kEarlyRelease ? SW : SW - 1;  // tiles in flight while one is worked on
  for (int k = 0; k < kAhead && k < my_tiles; ++k) issue(k);
  for (int i = 0; i < my_tiles; ++i) {
    tma::mbar_wait(&full[i % SW], (i / SW) & 1);
    const SwizzledTile<T, D> tile{ring + (i % SW) * C::kStageBytes};
    const int tok0 = w.tile_start(warp, NW, i);
    if constexpr (C::kEarlyRelease) {
      typename Warp::Fragments f;
      Warp::load(f, tile, lane);
      __syncwarp();
      if (i + SW < my_tiles) issue(i + SW);  // refills the stage just read
      att.template compute<true>(f, tok0, w.end);
    } else {
      if (i + SW - 1 < my_tiles) issue(i + SW - 1);  // the stage of tile i - 1, read before the last __syncwarp
      att.template consume<true>(tile, tok0, w.end, lane);
      __syncwarp();
    }
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
