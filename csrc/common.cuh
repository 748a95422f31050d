// Shared by every kernel file: error checks that become Python exceptions, and dtype traits.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace vk {

// Blocks along grid x; y and z stop at 65,535, so every launcher here puts its large counts on x.
constexpr int64_t kMaxGridX = (int64_t{1} << 31) - 1;

// Every runtime call and launch goes through these: a failure raises std::runtime_error, which
// pybind11 turns into a Python RuntimeError naming the kernel (or call) and CUDA's own reason.
inline void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string(what) + " failed: CUDA error " + std::to_string(static_cast<int>(status)) +
                             " (" + cudaGetErrorName(status) + "): " + cudaGetErrorString(status));
  }
}

inline void check_launch(const char* kernel) { check_cuda(cudaGetLastError(), kernel); }

// A launcher precondition: std::invalid_argument, which pybind11 raises as a Python ValueError.
inline void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument(what);
}

}  // namespace vk

namespace vk {

// Matches vit_kernels/cuda/__init__.py DTYPE_CODES.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

}  // namespace vk

// ====================================================================================================
// Device helpers shared by attention_*.cu and gemm.cu: dtype conversion and the sm_80 PTX wrappers
// (cp.async, ldmatrix, mma.sync m16n8k16). Device code only, so bindings.cpp can include this header.
// ====================================================================================================
#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace vk {

template <class T>
__device__ __forceinline__ float to_float(T v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, __half>) {
    return __half2float(v);
  } else {
    return __bfloat162float(v);
  }
}

template <class T>
__device__ __forceinline__ T from_float(float v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else {
    return __float2bfloat16_rn(v);
  }
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; `valid == false` writes 16 zero bytes and reads nothing (src-size 0).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}

// The "memory" clobbers keep the compiler from moving ordinary shared-memory accesses across the pipeline points.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// d += a (16 x 16, row-major) * b (16 x 8, col-major), fp32 accumulators. Fragment layouts (g = lane / 4,
// t = lane % 4): a[0] (g, 2t..2t+1), a[1] (g+8, 2t..), a[2] (g, 2t+8..), a[3] (g+8, 2t+8..);
// b[0] (k 2t..2t+1, n g), b[1] (k 2t+8.., n g); d[0..1] (g, 2t..2t+1), d[2..3] (g+8, 2t..2t+1).
template <class T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    static_assert(std::is_same_v<T, __nv_bfloat16>, "tensor-core path is fp16/bf16 only");
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

// dtype code (DType) -> element type, as a compile-time switch: f(T{}) is instantiated once per dtype.
template <class F>
void dispatch_dtype(int code, F&& f) {
  switch (static_cast<DType>(code)) {
    case DType::kFloat32:
      f(float{});
      break;
    case DType::kFloat16:
      f(__half{});
      break;
    case DType::kBFloat16:
      f(__nv_bfloat16{});
      break;
    default:
      throw std::invalid_argument("unknown dtype code " + std::to_string(code) + " (0 fp32, 1 fp16, 2 bf16)");
  }
}

}  // namespace vk
#endif  // __CUDACC__
