// Does compute-sanitizer's racecheck model the triple round CTA's merge? A 480-thread CTA of 12 "math" warps
// (3 groups of 128 threads) and 3 "copy" warps, as that kernel. The math threads stash values (every thread,
// and one lane of four), pass a barrier of the 384 math threads, and read another group's. Modes:
//   0: the copy warps exit at once; `bar.sync 4, 384`.
//   1: each copy warp bulk-copies 16 KB into its group's region (mbarrier complete_tx); the math threads wait,
//      read it, pass `bar.sync 4, 384`, then stash over those copied bytes.
//   2: as 1, but the stash goes to bytes no copy wrote.
//   3: as 0, but the copy warps stay until the math threads are done (they wait on an mbarrier).
//   4: as 0, but first each group runs rounds of its own barrier (`bar.sync 1 + g, 128`, id in a register, as
//      the kernel's per-pipeline barrier): 3 (g + 1) rounds for group g.
//   5: as 4, 3 rounds in every group.
//   6: as 4, the group barrier's id an immediate.
//   7: as 4, the final barrier an mbarrier (every math thread arrives, then waits for the phase).
// On H200 (CUDA 13.0, BENCHMARKS.md) every mode computes the right values, and racecheck reports RAW hazards
// only in modes 4 and 6: it loses a counted barrier's order once the groups have passed their own barriers a
// different number of times. The triple kernel's pipelines do (their rounds differ), so it merges after an
// mbarrier (mode 7).
// Build: nvcc -std=c++20 -arch=sm_90a -Icsrc -o /tmp/racecheck_toy scripts/racecheck_named_barrier.cu
// Run:   for m in 0 1 2 3 4 5 6 7; do compute-sanitizer --tool racecheck /tmp/racecheck_toy $m; done
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <vector>

#include "common/tma.cuh"

#define CHECK(call)                                                                  \
  do {                                                                               \
    const cudaError_t e = (call);                                                    \
    if (e != cudaSuccess) {                                                          \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e)); \
      std::exit(2);                                                                  \
    }                                                                                \
  } while (0)

constexpr int kMath = 384, kThreads = 480, kRegion = 16 << 10, kGroups = 3;

__device__ __forceinline__ void bulk_copy(void* dst, const void* src, int bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                   mpskern::ptx::smem_addr(dst)),
               "l"(src), "r"(bytes), "r"(mpskern::ptx::smem_addr(bar))
               : "memory");
}

__global__ void __launch_bounds__(kThreads, 1) toy(const float* src, float* out, int mode) {
  extern __shared__ __align__(128) unsigned char smem[];
  float* copied = reinterpret_cast<float*>(smem);                      // kGroups regions of kRegion bytes
  float* fresh = reinterpret_cast<float*>(smem + kGroups * kRegion);  // kMath + kMath / 4 floats
  __shared__ uint64_t full[kGroups], done, stashed;
  const int t = threadIdx.x, warp = t / 32, lane = t % 32;
  if (t == 0) {
    for (int g = 0; g < kGroups; ++g) mpskern::tma::mbar_init(&full[g], 1);
    mpskern::tma::mbar_init(&done, kMath);
    mpskern::tma::mbar_init(&stashed, kMath);
    mpskern::tma::mbar_init_fence();
  }
  __syncthreads();
  const bool copies = mode == 1 || mode == 2;
  if (warp >= kMath / 32) {  // copy warps
    const int g = warp - kMath / 32;
    if (copies && lane == 0) {
      mpskern::tma::mbar_arrive_expect_tx(&full[g], kRegion);
      bulk_copy(smem + g * kRegion, src + (blockIdx.x * kGroups + g) * (kRegion / 4), kRegion, &full[g]);
    }
    if (mode == 3) mpskern::tma::mbar_wait(&done, 0);
    return;
  }
  const int g = t / 128;
  float v = static_cast<float>(blockIdx.x * kMath + t);
  if (copies) {
    mpskern::tma::mbar_wait(&full[g], 0);
    v += copied[g * (kRegion / 4) + (t % 128) * 8];
    asm volatile("bar.sync 4, %0;\n" ::"n"(kMath) : "memory");  // every copied byte read before the stash
  }
  if (mode >= 4) {  // each group's own rounds: write, group barrier, read a neighbour, group barrier
    auto group_barrier = [&] {  // inlined at each call: two barrier sites a round, as the kernel's rounds have
      if (mode == 6) {
        if (g == 0) asm volatile("bar.sync 1, 128;\n" ::: "memory");
        else if (g == 1) asm volatile("bar.sync 2, 128;\n" ::: "memory");
        else asm volatile("bar.sync 3, 128;\n" ::: "memory");
      } else {
        asm volatile("bar.sync %0, 128;\n" ::"r"(1 + g) : "memory");
      }
    };
    float* scratch = copied;
    const int rounds = mode == 5 ? 3 : 3 * (g + 1);
    for (int r = 0; r < rounds; ++r) {
      scratch[t] = v + r;
      group_barrier();
      v += 0.f * scratch[g * 128 + (t + 1) % 128];
      group_barrier();
    }
  }
  float* stash = mode == 1 ? copied : fresh;
  stash[t] = v;
  if (lane % 4 == 0) stash[kMath + t / 4] = 2.f * v;
  if (mode == 7) {
    mpskern::tma::mbar_arrive(&stashed);
    mpskern::tma::mbar_wait(&stashed, 0);
  } else {
    asm volatile("bar.sync 4, %0;\n" ::"n"(kMath) : "memory");
  }
  const int u = (t + 128) % kMath;
  out[blockIdx.x * kMath + t] = stash[u] + stash[kMath + u / 4];
  if (mode == 3) mpskern::tma::mbar_arrive(&done);
}

int main(int argc, char** argv) {
  const int mode = argc > 1 ? atoi(argv[1]) : 0, blocks = 8;
  if (mode < 0 || mode > 7) {
    std::fprintf(stderr, "mode must be 0..7\n");
    return 2;
  }
  const size_t n_src = static_cast<size_t>(blocks) * kGroups * kRegion / 4;
  std::vector<float> h_src(n_src);
  for (size_t i = 0; i < n_src; ++i) h_src[i] = static_cast<float>(i % 977);
  float *src, *out;
  CHECK(cudaMalloc(&src, n_src * 4));
  CHECK(cudaMalloc(&out, blocks * kMath * 4));
  CHECK(cudaMemcpy(src, h_src.data(), n_src * 4, cudaMemcpyHostToDevice));
  const int smem = kGroups * kRegion + (kMath + kMath / 4) * 4;
  CHECK(cudaFuncSetAttribute(toy, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  toy<<<blocks, kThreads, smem>>>(src, out, mode);
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());
  std::vector<float> h_out(blocks * kMath);
  CHECK(cudaMemcpy(h_out.data(), out, h_out.size() * 4, cudaMemcpyDeviceToHost));
  int bad = 0;
  for (int b = 0; b < blocks; ++b)
    for (int t = 0; t < kMath; ++t) {
      auto value = [&](int x) {
        float v = static_cast<float>(b * kMath + x);
        if (mode == 1 || mode == 2) v += h_src[(static_cast<size_t>(b) * kGroups + x / 128) * (kRegion / 4) + (x % 128) * 8];
        return v;
      };
      const int u = (t + 128) % kMath;
      const float want = value(u) + 2.f * value(u / 4 * 4);
      bad += h_out[b * kMath + t] != want;
    }
  printf("mode %d: %d wrong of %d\n", mode, bad, blocks * kMath);
  CHECK(cudaFree(src));
  CHECK(cudaFree(out));
  return bad != 0;
}
