// How a 16-token K/V tile of one KV head lands in shared memory through TMA, shared by both TMA kernels.
//
// The cache is viewed as [page rows, KV head, D]; a tile is 16 page rows of one KV head, fetched as D / 64 boxes
// of 64 columns (128 bytes, one 128B-swizzled panel) for K and as many for V. No per-thread address arithmetic
// and no copy instructions in the math warps: one lane issues the copies, which complete on an mbarrier.
#pragma once
#include <cuda.h>

#include <cstdint>

#include "common/tma.cuh"
#include "decode_attention/warp_attention.cuh"

namespace mpskern::decode {

constexpr int kPanelCols = 64;                  // columns per swizzled panel: 128 bytes of 16-bit values
constexpr int kPanelBytes = kTileTokens * 128;  // 16 rows of 128 bytes
constexpr int kTmaSwizzleAlign = 1024;          // the 128B swizzle repeats every 8 rows: panels start 1 KB-aligned

template <int D>
struct TmaTile {
  static constexpr int kPanels = D / kPanelCols;
  static constexpr int kBytes = 2 * kPanels * kPanelBytes;  // K panels, then V panels
};

// The dynamic shared-memory base rounded up to the swizzle alignment (kernels reserve kTmaSwizzleAlign of slack).
__device__ __forceinline__ unsigned char* swizzle_aligned(unsigned char* smem) {
  return reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem) + kTmaSwizzleAlign - 1) &
                                          ~uintptr_t(kTmaSwizzleAlign - 1));
}

// A tile in 128B-swizzled panels: 16-byte chunk c of row r sits at chunk c ^ (r % 8) of the row's 128 bytes.
template <typename T, int D>
struct SwizzledTile {
  const unsigned char* base;
  __device__ const T* at(int panel0, int row, int chunk) const {
    const int panel = panel0 + chunk / 8;
    return reinterpret_cast<const T*>(base + panel * kPanelBytes + row * 128 + (((chunk % 8) ^ (row % 8)) << 4));
  }
  __device__ const T* k(int row, int chunk) const { return at(0, row, chunk); }
  __device__ const T* v(int row, int chunk) const { return at(TmaTile<D>::kPanels, row, chunk); }
};

// One thread: the copies of the tile at page row `row` of KV head kvh into dst; they add TmaTile<D>::kBytes
// to `bar`'s transaction count (the caller announces them with mbar_arrive_expect_tx).
template <int D>
__device__ __forceinline__ void load_tile(unsigned char* dst, const CUtensorMap* tmap_k, const CUtensorMap* tmap_v,
                                          int kvh, int row, uint64_t* bar) {
  constexpr int P = TmaTile<D>::kPanels;
  // A decode step reads each KV row once: evict-first keeps L2 for what is read again (the block table,
  // seq_lens and Q here; an engine's next kernels). Measured on H200 (BENCHMARKS.md): 0.5 to 2.7% faster on five
  // of the seven 0.5B/3B/7B shapes with batch >= 64, 1.1% slower at 7B 1024 x 512. Taken off the deep and wide
  // shapes alone (fifth session): 3B 64 x 8192 2.9% slower, 7B 64 x 8192 (wide) 15%.
  const uint64_t policy = tma::evict_first_policy();
  // All of K's panels, then V's: both 128-byte halves of a K row are requested back to back (0.8 to 1.2% faster
  // on the deep shape, 3B 64 x 8192; the same elsewhere).
#pragma unroll
  for (int pn = 0; pn < P; ++pn) tma::load_3d(dst + pn * kPanelBytes, tmap_k, pn * kPanelCols, kvh, row, bar, policy);
#pragma unroll
  for (int pn = 0; pn < P; ++pn)
    tma::load_3d(dst + (P + pn) * kPanelBytes, tmap_v, pn * kPanelCols, kvh, row, bar, policy);
}

}  // namespace mpskern::decode
