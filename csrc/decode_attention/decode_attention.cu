// Paged decode attention: launch configuration, dtype/head_dim dispatch and kernel introspection.
#include <climits>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <utility>

#include "common/cuda_check.h"
#include "common/tensor_map.h"
#include "decode_attention/combine_kernel.cuh"
#include "decode_attention/decode_attention.h"
#include "decode_attention/decode_attention_kernel.cuh"
#include "decode_attention/decode_attention_round_kernel.cuh"
#include "decode_attention/decode_attention_tma_kernel.cuh"

namespace mpskern {
namespace {

using decode::Config;
using decode::RoundConfig;
using decode::RoundShape;
using decode::TmaConfig;

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
const KernelInfo& cp_async_info() {
  return cached_info("decode_attention", decode::decode_attention_kernel<T, D, M>, Config<D>::kThreads,
                     decode::smem_bytes<T, D, M>());
}

template <typename T, int D, int M>
const KernelInfo& tma_info() {
  return cached_info("decode_attention_tma", decode::decode_attention_tma_kernel<T, D, M>, TmaConfig<D>::kThreads,
                     decode::tma_smem_bytes<T, D, M>());
}

constexpr const char* round_kernel_name(RoundShape shape) {
  switch (shape) {
    case RoundShape::kNarrow: return "decode_attention_round_narrow";
    case RoundShape::kWide: return "decode_attention_round_wide";
    case RoundShape::kTriple: return "decode_attention_round_triple";
  }
  return "";
}

template <typename T, int D, int M, RoundShape kShape>
const KernelInfo& round_info() {
  return cached_info(round_kernel_name(kShape), decode::decode_attention_round_kernel<T, D, M, kShape>,
                     RoundConfig<D, kShape>::kThreads, decode::round_smem_bytes<D, kShape>());
}

// Which attention kernel a launch takes. The TMA kernels need sm_90 code loaded for this device (a build for
// 80 only runs sm_80 code on Hopper, where their bodies are empty) and whole 16-token tiles inside one page;
// anything else takes cp.async. With TMA, D = 64 takes the per-warp kernel and D >= 128 the round kernel in
// the shape with the fewest CTAs per SM whose one wave holds the whole grid: triple (1 per SM, unsplit grids
// only), wide (2), else narrow (decode_attention_round_kernel.cuh). Split launches fill one wave of the kernel
// they take, and wide with twice the splits beat triple there (H200, 8 x 32768: 3B 68.8 against 70.2 us, 7B
// 128.8 against 129.3; BENCHMARKS.md).
enum class Kernel { kCpAsync, kTma, kRoundNarrow, kRoundWide, kRoundTriple };

// Calls f.template operator()<shape>() for a round kernel.
template <int D, typename F>
decltype(auto) with_round_shape(Kernel kernel, F&& f) {
  if constexpr (decode::kHasTripleShape<D>) {
    if (kernel == Kernel::kRoundTriple) return f.template operator()<RoundShape::kTriple>();
  }
  return kernel == Kernel::kRoundWide ? f.template operator()<RoundShape::kWide>()
                                      : f.template operator()<RoundShape::kNarrow>();
}

template <typename T, int D, int M>
Kernel choose_kernel(int page_size, long long grid, int num_splits) {
  if (page_size < decode::kTileTokens) return Kernel::kCpAsync;
  if constexpr (D == 64) {
    return tma_info<T, D, M>().binary_version >= 90 ? Kernel::kTma : Kernel::kCpAsync;
  } else {
    const KernelInfo& wide = round_info<T, D, M, RoundShape::kWide>();
    if (wide.binary_version < 90) return Kernel::kCpAsync;
    auto one_wave = [&](const KernelInfo& k) { return grid <= static_cast<long long>(k.blocks_per_sm) * k.num_sms; };
    if constexpr (decode::kHasTripleShape<D>) {
      if (num_splits == 1 && one_wave(round_info<T, D, M, RoundShape::kTriple>())) return Kernel::kRoundTriple;
    }
    return one_wave(wide) ? Kernel::kRoundWide : Kernel::kRoundNarrow;
  }
}

template <typename T, int D, int M>
const KernelInfo& attention_info(Kernel kernel) {
  if constexpr (D == 64) {
    if (kernel == Kernel::kTma) return tma_info<T, D, M>();
  } else if (kernel != Kernel::kCpAsync) {
    return with_round_shape<D>(kernel, [&]<RoundShape kShape>() -> const KernelInfo& {
      return round_info<T, D, M, kShape>();
    });
  }
  return cp_async_info<T, D, M>();
}

// The cache [num_pages * page_size rows][kv_heads][D] as a 4-D map {64 columns, rows, D / 64 panels, kv_heads}
// (the panel and head strides are smaller than the row's): a box {64, 16, D / 64, 1} is a 16-row tile of one KV
// head, landing panel by panel as the kernels' swizzled tiles expect (tma_tile.cuh).
template <typename T, int D>
CUtensorMap kv_tensor_map(const void* cache, const DecodeParams& p) {
  constexpr auto dtype = std::is_same_v<T, __half> ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  constexpr auto l2 = decode::kL2PrefetchBytes<D> == 256 ? CU_TENSOR_MAP_L2_PROMOTION_L2_256B
                                                         : CU_TENSOR_MAP_L2_PROMOTION_L2_128B;
  constexpr int panels = decode::TmaTile<D>::kPanels;
  const cuuint64_t dims[4] = {decode::kPanelCols, static_cast<cuuint64_t>(p.num_pages) * p.page_size, panels,
                              static_cast<cuuint64_t>(p.kv_heads)};
  const cuuint64_t strides[3] = {static_cast<cuuint64_t>(p.kv_heads) * D * sizeof(T), decode::kPanelCols * sizeof(T),
                                 D * sizeof(T)};
  const cuuint32_t box[4] = {decode::kPanelCols, decode::kTileTokens, panels, 1};
  return tiled_map<4>(cache, dtype, dims, strides, box, CU_TENSOR_MAP_SWIZZLE_128B, l2);
}

// The K and V maps of a launch. A decode loop launches on the same caches step after step, so the last pair
// is kept (per thread and instantiation) rather than encoded through the driver on every call.
template <typename T, int D>
std::pair<CUtensorMap, CUtensorMap> kv_tensor_maps(const DecodeParams& p) {
  thread_local std::tuple<const void*, const void*, int, int, int> key{};
  thread_local std::pair<CUtensorMap, CUtensorMap> maps;
  const auto now = std::make_tuple(p.k_cache, p.v_cache, p.num_pages, p.page_size, p.kv_heads);
  if (now != key) {
    maps = {kv_tensor_map<T, D>(p.k_cache, p), kv_tensor_map<T, D>(p.v_cache, p)};
    key = now;
  }
  return maps;
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
  MPSK_REQUIRE(p.batch > 0 && p.heads > 0 && p.kv_heads > 0 && p.max_pages > 0 && p.num_pages > 0,
               "sizes must be positive");
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

// A split's tokens are whole wide rounds (64), which the narrow rounds and the per-warp kernels' tiles divide.
int decode_attention_tile_tokens() { return RoundConfig<128, RoundShape::kWide>::kRoundTokens; }

KernelInfo decode_attention_info(DType dtype, int head_dim, int heads_per_chunk, int page_size,
                                 long long grid_size, int num_splits) {
  MPSK_REQUIRE(num_splits >= 1, "num_splits must be >= 1");
  KernelInfo info = dispatch(dtype, head_dim, heads_per_chunk, [&]<typename T, int D, int M>() {
    return attention_info<T, D, M>(choose_kernel<T, D, M>(page_size, grid_size, num_splits));
  });
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
    // TMA coordinates are int32 and its global addresses 16-byte aligned; anything else takes cp.async.
    const bool tma_ok = static_cast<long long>(p.num_pages) * p.page_size <= INT_MAX &&
                        reinterpret_cast<uintptr_t>(p.k_cache) % 16 == 0 && reinterpret_cast<uintptr_t>(p.v_cache) % 16 == 0;
    const Kernel kernel = tma_ok ? choose_kernel<T, D, M>(p.page_size, grid, p.num_splits) : Kernel::kCpAsync;
    const KernelInfo& info = attention_info<T, D, M>(kernel);
    const dim3 blocks(static_cast<unsigned>(grid));
    if (kernel == Kernel::kCpAsync) {
      decode::decode_attention_kernel<T, D, M><<<blocks, info.block_size, info.dynamic_smem, stream>>>(p);
      MPSK_LAUNCH_CHECK("decode_attention_kernel");
    } else {
      const auto [map_k, map_v] = kv_tensor_maps<T, D>(p);
      if constexpr (D == 64) {
        decode::decode_attention_tma_kernel<T, D, M>
            <<<blocks, info.block_size, info.dynamic_smem, stream>>>(p, map_k, map_v);
        MPSK_LAUNCH_CHECK("decode_attention_tma_kernel");
      } else {
        with_round_shape<D>(kernel, [&]<RoundShape kShape>() {
          decode::decode_attention_round_kernel<T, D, M, kShape>
              <<<blocks, info.block_size, info.dynamic_smem, stream>>>(p, map_k, map_v);
          MPSK_LAUNCH_CHECK(info.name);
        });
      }
    }
    if (p.num_splits > 1) {
      combine_info<T>();  // shared-memory opt-in
      decode::decode_combine_kernel<T>
          <<<p.batch * p.heads, decode::kCombineThreads, decode::combine_smem_bytes(p.num_splits), stream>>>(p);
      MPSK_LAUNCH_CHECK("decode_combine_kernel");
    }
  });
}

}  // namespace mpskern
