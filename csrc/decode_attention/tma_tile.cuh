// How a 16-token K/V tile of one KV head lands in shared memory through TMA, shared by both TMA kernels.
//
// The cache is viewed as [KV head][D / 64 panels][page rows][64 columns] (a 4-D map over its [rows][KV head][D]
// memory); a tile is 16 page rows of one KV head, fetched as one box for K and one for V, each landing as D / 64
// panels of 16 rows x 128 bytes, 128B-swizzled. No per-thread address arithmetic and no copy instructions in the
// math warps: one lane issues the copies, which complete on an mbarrier.
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
  // A decode step reads each KV row once: evict-first keeps L2 for what is read again (the block table, seq_lens,
  // the output; an engine's next kernels). Measured on H200 (BENCHMARKS.md): evict-normal copies were 4 to 15%
  // slower on the narrow round shapes (eleventh session), 2.9 to 15% on the deep and wide ones (fifth).
  const uint64_t policy = ptx::evict_first_policy();
  // One box per tile for all of K's panels (half the copies of a box per panel at D = 128): 0.3 to 1.0% faster
  // on every round-kernel benchmark shape (H200, eleventh session, BENCHMARKS.md).
  tma::load_4d(dst, tmap_k, 0, row, 0, kvh, bar, policy);
  tma::load_4d(dst + TmaTile<D>::kPanels * kPanelBytes, tmap_v, 0, row, 0, kvh, bar, policy);
}

}  // namespace mpskern::decode
