// Error checking for CUDA runtime calls and launches: every failure becomes a C++ exception that pybind11
// turns into a Python RuntimeError carrying the call site.
#pragma once
#include <cuda_runtime.h>

#include <sstream>
#include <stdexcept>
#include <string>

namespace mpskern {

inline void cuda_check(cudaError_t err, const char* what, const char* file, int line) {
  if (err != cudaSuccess) {
    std::ostringstream msg;
    msg << "CUDA error " << cudaGetErrorName(err) << " (" << cudaGetErrorString(err) << ") at " << what << " ["
        << file << ":" << line << "]";
    throw std::runtime_error(msg.str());
  }
}

// Argument errors map to ValueError in Python (pybind11 translates std::invalid_argument).
[[noreturn]] inline void invalid_argument(const std::string& msg) { throw std::invalid_argument(msg); }

}  // namespace mpskern

#define MPSK_CUDA_CHECK(expr) ::mpskern::cuda_check((expr), #expr, __FILE__, __LINE__)
// After a launch: configuration errors show up here; asynchronous faults surface at the next sync.
#define MPSK_LAUNCH_CHECK(name) ::mpskern::cuda_check(cudaGetLastError(), name, __FILE__, __LINE__)
#define MPSK_REQUIRE(cond, msg)          \
  do {                                   \
    if (!(cond)) {                       \
      std::ostringstream _mpsk_msg;      \
      _mpsk_msg << msg;                  \
      ::mpskern::invalid_argument(_mpsk_msg.str()); \
    }                                    \
  } while (0)
