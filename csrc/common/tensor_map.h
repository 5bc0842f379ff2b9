// Host side of TMA: tensor maps encoded through the driver entry point the runtime hands out, so the module
// needs no link against libcuda.
#pragma once
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/cuda_check.h"

namespace mpskern {

inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult found{};
    MPSK_CUDA_CHECK(
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &found));
    if (found != cudaDriverEntryPointSuccess || ptr == nullptr) {
      throw std::runtime_error("the CUDA driver does not provide cuTensorMapEncodeTiled (needs a CUDA 12+ driver)");
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
  }();
  return fn;
}

// An N-D tiled map: dims innermost first, byte strides of dims 1 to N - 1 (in any order), the box copied per load.
template <int N>
inline CUtensorMap tiled_map(const void* base, CUtensorMapDataType dtype, const cuuint64_t (&dims)[N],
                             const cuuint64_t (&strides)[N - 1], const cuuint32_t (&box)[N],
                             CUtensorMapSwizzle swizzle, CUtensorMapL2promotion l2_promotion) {
  CUtensorMap map;
  cuuint32_t elem_strides[N];
  for (int i = 0; i < N; ++i) elem_strides[i] = 1;
  const CUresult r = tensor_map_encoder()(&map, dtype, N, const_cast<void*>(base), dims, strides, box, elem_strides,
                                          CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, l2_promotion,
                                          CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    throw std::runtime_error("cuTensorMapEncodeTiled failed with CUresult " + std::to_string(static_cast<int>(r)));
  }
  return map;
}

}  // namespace mpskern
