// Paged decode attention: host-side launch API (no PyTorch: raw device pointers, element strides, a stream).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "common/kernel_info.h"

namespace mpskern {

enum class DType : int { kFloat16 = 0, kBFloat16 = 1 };

struct DecodeParams {
  const void* q;  // [B, H, D], last dim contiguous
  int64_t q_stride_b, q_stride_h;
  const void* k_cache;  // [num_pages, page_size, KVH, D], contiguous
  const void* v_cache;
  int num_pages;
  const int* block_table;  // [B, max_pages]
  int max_pages;
  const int* seq_lens;  // [B]
  void* out;            // [B, H, D], last dim contiguous
  int64_t out_stride_b, out_stride_h;
  float* o_partial;  // [B, H, num_splits, D] fp32, per-split normalised (only when num_splits > 1)
  float* lse;        // [B, H, num_splits] fp32, natural-log sum-exp of the scaled scores
  int batch, heads, kv_heads, head_dim, page_size;
  int num_splits, tokens_per_split, head_chunks, heads_per_chunk;
  float scale;
};

// Resources and occupancy of the attention kernel a launch with these sizes, grid and split count would use
// (on sm_90 builds with pages of 16 tokens or more a TMA kernel, else the cp.async kernel; info.name says which).
KernelInfo decode_attention_info(DType dtype, int head_dim, int heads_per_chunk, int page_size,
                                 long long grid_size, int num_splits);
KernelInfo decode_combine_info(DType dtype, long long grid_size);
// The split planner rounds a split's tokens to a multiple of this.
int decode_attention_tile_tokens();

void decode_attention(const DecodeParams& p, DType dtype, cudaStream_t stream);

}  // namespace mpskern
