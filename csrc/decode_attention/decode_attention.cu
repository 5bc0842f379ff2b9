// Paged decode attention: launch configuration, dtype/head_dim dispatch and kernel introspection.
#include <map>
#include <mutex>
#include <tuple>

#include "common/cuda_check.h"
#include "decode_attention/decode_attention.h"
#include "decode_attention/decode_attention_kernel.cuh"

namespace mpskern {
namespace {

using decode::Config;

// Queries (and sets the >48 KB shared-memory opt-in) once per device and kernel.
template <typename Kernel>
const KernelInfo& cached_info(const char* name, Kernel kernel, int block, int smem) {
  static std::mutex mu;
  static std::map<std::tuple<int, const void*>, KernelInfo> cache;
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(current_device(), reinterpret_cast<const void*>(kernel));
  auto it = cache.find(key);
  if (it == cache.end()) it = cache.emplace(key, query_kernel(name, kernel, block, smem)).first;
  return it->second;
}

template <typename T, int D, int M>
const KernelInfo& attention_info() {
  return cached_info("decode_attention", decode::decode_attention_kernel<T, D, M>, Config<D>::kThreads,
                     decode::smem_bytes<T, D, M>());
}

// Sized for the largest split count check_params allows, so one opt-in covers every launch.
constexpr int kMaxSplits = 4096;

template <typename T>
const KernelInfo& combine_info() {
  return cached_info("decode_combine", decode::decode_combine_kernel<T>, decode::kCombineThreads,
                     decode::combine_smem_bytes(kMaxSplits));
}

// Calls f.template operator()<T, D, M>() for the runtime dtype / head_dim / heads-per-CTA.
template <typename F>
auto dispatch(DType dtype, int head_dim, int heads_per_chunk, F&& f) {
  MPSK_REQUIRE(heads_per_chunk >= 1 && heads_per_chunk <= 16,
               "heads_per_chunk must be in [1, 16]; got " << heads_per_chunk);
  const bool wide = heads_per_chunk > 8;
  auto by_m = [&](auto t, auto d) {
    using T = decltype(t);
    constexpr int D = decltype(d)::value;
    return wide ? f.template operator()<T, D, 16>() : f.template operator()<T, D, 8>();
  };
  auto by_d = [&](auto t) {
    switch (head_dim) {
      case 64: return by_m(t, std::integral_constant<int, 64>{});
      case 128: return by_m(t, std::integral_constant<int, 128>{});
      case 256: return by_m(t, std::integral_constant<int, 256>{});
      default: invalid_argument("head_dim " + std::to_string(head_dim) + " is not supported (64, 128, 256)");
    }
  };
  switch (dtype) {
    case DType::kFloat16: return by_d(__half{});
    case DType::kBFloat16: return by_d(__nv_bfloat16{});
  }
  invalid_argument("dtype code must be 0 (float16) or 1 (bfloat16)");
}

void check_params(const DecodeParams& p) {
  MPSK_REQUIRE(p.q && p.k_cache && p.v_cache && p.block_table && p.seq_lens && p.out, "null tensor pointer");
  MPSK_REQUIRE(p.batch > 0 && p.heads > 0 && p.kv_heads > 0 && p.max_pages > 0, "sizes must be positive");
  MPSK_REQUIRE(p.heads % p.kv_heads == 0,
               "num_heads (" << p.heads << ") must be a multiple of num_kv_heads (" << p.kv_heads << ")");
  MPSK_REQUIRE(p.page_size >= 1 && p.page_size <= 256 && (p.page_size & (p.page_size - 1)) == 0,
               "page_size must be a power of two in [1, 256]; got " << p.page_size);
  MPSK_REQUIRE(p.num_splits >= 1 && p.num_splits <= kMaxSplits && p.tokens_per_split >= 1,
               "num_splits must be in [1, " << kMaxSplits << "] and tokens_per_split >= 1");
  MPSK_REQUIRE(p.tokens_per_split % decode::kTileTokens == 0,
               "tokens_per_split must be a multiple of " << decode::kTileTokens);
  MPSK_REQUIRE(p.head_chunks * p.heads_per_chunk >= p.heads / p.kv_heads,
               "head_chunks * heads_per_chunk must cover the GQA group");
  MPSK_REQUIRE(p.num_splits == 1 || (p.o_partial && p.lse), "num_splits > 1 needs the o_partial and lse workspaces");
}

}  // namespace

int decode_attention_tile_tokens() { return decode::kTileTokens * Config<128>::kWarps; }

KernelInfo decode_attention_info(DType dtype, int head_dim, int heads_per_chunk, long long grid_size) {
  KernelInfo info = dispatch(dtype, head_dim, heads_per_chunk,
                             []<typename T, int D, int M>() { return attention_info<T, D, M>(); });
  info.grid_size = grid_size;
  return info;
}

KernelInfo decode_combine_info(DType dtype, long long grid_size) {
  KernelInfo info = dtype == DType::kFloat16 ? combine_info<__half>() : combine_info<__nv_bfloat16>();
  info.grid_size = grid_size;
  return info;
}

void decode_attention(const DecodeParams& p, DType dtype, cudaStream_t stream) {
  check_params(p);
  const long long grid = static_cast<long long>(p.batch) * p.kv_heads * p.head_chunks * p.num_splits;
  MPSK_REQUIRE(grid < (1ll << 31), "launch too large: " << grid << " CTAs");
  dispatch(dtype, p.head_dim, p.heads_per_chunk, [&]<typename T, int D, int M>() {
    const KernelInfo& info = attention_info<T, D, M>();
    decode::decode_attention_kernel<T, D, M>
        <<<static_cast<unsigned>(grid), info.block_size, info.dynamic_smem, stream>>>(p);
    MPSK_LAUNCH_CHECK("decode_attention_kernel");
    if (p.num_splits > 1) {
      combine_info<T>();  // shared-memory opt-in
      decode::decode_combine_kernel<T>
          <<<p.batch * p.heads, decode::kCombineThreads, decode::combine_smem_bytes(p.num_splits), stream>>>(p);
      MPSK_LAUNCH_CHECK("decode_combine_kernel");
    }
  });
}

}  // namespace mpskern
