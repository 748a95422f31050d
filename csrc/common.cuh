// Shared by every kernel file: error checks that become Python exceptions, and dtype traits.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace vk {

// Every runtime call and launch goes through these: a failure raises std::runtime_error, which
// pybind11 turns into a Python RuntimeError naming the kernel (or call) and CUDA's own reason.
inline void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string(what) + " failed: CUDA error " + std::to_string(static_cast<int>(status)) +
                             " (" + cudaGetErrorName(status) + "): " + cudaGetErrorString(status));
  }
}

inline void check_launch(const char* kernel) { check_cuda(cudaGetLastError(), kernel); }

}  // namespace vk

namespace vk {

// Matches vit_kernels/cuda/__init__.py DTYPE_CODES.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

}  // namespace vk
