// sm_90 wrappers: shared-memory mbarriers with transaction counts, and TMA tensor loads that complete on them.
// Only called from code compiled for __CUDA_ARCH__ >= 900.
#pragma once
#include <cuda.h>  // CUtensorMap

#include <cstdint>

#include "common/ptx.cuh"

namespace mpskern::tma {

__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(ptx::smem_addr(bar)), "r"(count));
}

// Makes the initialised barriers visible to the async proxy (the TMA unit) before any copy signals them.
__device__ __forceinline__ void mbar_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::); }

// Arrives and tells the barrier to also wait for `bytes` of copies that will signal it.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(ptx::smem_addr(bar)), "r"(bytes)
               : "memory");
}

// A plain arrival (count 1).
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(ptx::smem_addr(bar)) : "memory");
}

// Waits until the phase with the given parity has completed (acquire: its copies' data is then visible).
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(ptx::smem_addr(bar)), "r"(parity)
        : "memory");
  } while (!done);
}

// Orders this thread's earlier generic-proxy shared-memory accesses before its later async-proxy (TMA) ones.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// One box of a 4-D tensor map into shared memory under an L2 cache policy; completion adds the box's bytes to
// `bar`'s transaction count.
__device__ __forceinline__ void load_4d(void* smem, const CUtensorMap* map, int c0, int c1, int c2, int c3,
                                        uint64_t* bar, uint64_t l2_policy) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1, "
      "{%2, %3, %4, %5}], [%6], %7;\n" ::"r"(ptx::smem_addr(smem)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(ptx::smem_addr(bar)),
      "l"(l2_policy)
      : "memory");
}

// Copies `bytes` (a multiple of 16, both addresses 16-byte aligned) from shared to global memory and waits until
// the shared side has been read, so the buffer may be reused or the CTA may exit; the write completes on its own.
// Generic-proxy writes to `smem` must be ordered before it (fence_proxy_async by each writer, then a barrier).
__device__ __forceinline__ void store_bulk(void* gmem, const void* smem, uint32_t bytes) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;\n" ::"l"(gmem),
               "r"(ptx::smem_addr(smem)), "r"(bytes)
               : "memory");
  asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
  asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
}

}  // namespace mpskern::tma
