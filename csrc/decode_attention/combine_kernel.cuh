// The combine step of split-KV decode: merges the per-split partial outputs of one (sequence, head).
#pragma once
#include "common/ptx.cuh"
#include "decode_attention/decode_attention.h"

namespace mpskern::decode {

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
