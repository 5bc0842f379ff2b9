// What the reports need to know about a custom kernel's launch: resources and theoretical occupancy for the
// configuration actually used.
#pragma once
#include <cuda_runtime.h>

#include "common/cuda_check.h"

namespace mpskern {

struct KernelInfo {
  const char* name = "";
  int registers = 0;           // per thread
  int static_smem = 0;         // bytes per block
  int dynamic_smem = 0;        // bytes per block
  int block_size = 0;          // threads per block
  long long grid_size = 0;     // blocks in the launch
  int blocks_per_sm = 0;       // cudaOccupancyMaxActiveBlocksPerMultiprocessor
  int num_sms = 0;
  int max_threads_per_sm = 0;
  double theoretical_occupancy = 0.0;  // active warps / max warps per SM
  int binary_version = 0;      // SASS the device runs (90 = sm_90): which architecture's code was loaded
};

inline int current_device() {
  int dev = 0;
  MPSK_CUDA_CHECK(cudaGetDevice(&dev));
  return dev;
}

inline int device_attribute(cudaDeviceAttr attr) {
  int value = 0;
  MPSK_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, current_device()));
  return value;
}

// Raises the kernel's dynamic shared-memory limit (needed above 48 KB) and reads its resources.
template <typename Kernel>
KernelInfo query_kernel(const char* name, Kernel kernel, int block_size, int dynamic_smem) {
  if (dynamic_smem > 48 * 1024) {
    MPSK_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, dynamic_smem));
  }
  cudaFuncAttributes attr{};
  MPSK_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  KernelInfo info;
  info.name = name;
  info.registers = attr.numRegs;
  info.static_smem = static_cast<int>(attr.sharedSizeBytes);
  info.dynamic_smem = dynamic_smem;
  info.binary_version = attr.binaryVersion;
  info.block_size = block_size;
  MPSK_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&info.blocks_per_sm, kernel, block_size, dynamic_smem));
  info.num_sms = device_attribute(cudaDevAttrMultiProcessorCount);
  info.max_threads_per_sm = device_attribute(cudaDevAttrMaxThreadsPerMultiProcessor);
  info.theoretical_occupancy =
      static_cast<double>(info.blocks_per_sm * block_size) / static_cast<double>(info.max_threads_per_sm);
  return info;
}

}  // namespace mpskern
