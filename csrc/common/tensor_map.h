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

// A 3-D tiled map: dims innermost first, byte strides of dims 1 and 2, the box copied per load.
inline CUtensorMap tiled_map_3d(const void* base, CUtensorMapDataType dtype, const cuuint64_t (&dims)[3],
                                const cuuint64_t (&strides)[2], const cuuint32_t (&box)[3],
                                CUtensorMapSwizzle swizzle, CUtensorMapL2promotion l2_promotion) {
  CUtensorMap map;
  const cuuint32_t elem_strides[3] = {1, 1, 1};
  const CUresult r = tensor_map_encoder()(&map, dtype, 3, const_cast<void*>(base), dims, strides, box, elem_strides,
                                          CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, l2_promotion,
                                          CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    throw std::runtime_error("cuTensorMapEncodeTiled failed with CUresult " + std::to_string(static_cast<int>(r)));
  }
  return map;
}

}  // namespace mpskern
