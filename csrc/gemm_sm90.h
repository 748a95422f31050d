// Hopper (sm_90a) GEMMs on CUTLASS 3 collectives: the entry points gemm.cu's sm90 op launchers call.
// Declarations only, so gemm.cu (built for sm_80 and sm_90a) needs no CUTLASS header; the definitions are in
// gemm_sm90_impl.cuh, instantiated per (family, dtype) in gemm_sm90_*.cu, built for sm_90a alone and only when
// CMake found the CUTLASS headers (VK_HAVE_SM90_GEMM).
//
// Every matrix is row-major with unit column stride; `ld*` are row strides in elements. All of them need 16-byte
// aligned pointers and row strides that are multiples of 8 elements (TMA), K % 8 == 0, N % 8 == 0; the op
// launchers in gemm.cu check this before the first launch. fp32 accumulation, one rounding at the store.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <vector>

namespace vk {
namespace sm90 {

using index_t = int64_t;

// d (M, N) = a (M, K) @ w (N, K)^T + bias (N,) or none.
template <class T>
void linear_bias(const T* a, index_t lda, const T* w, index_t ldw, const T* bias, T* d, index_t ldd, int M, int N,
                 int K, cudaStream_t stream);

// d (M, N) = a (M, K) @ w (N, K)^T + bias (N,) or none + res (M, N): the residual add of proj and fc2, read by the
// epilogue's source load (beta = 1) with its own row stride, and rounded once with the sum.
template <class T>
void linear_bias_residual(const T* a, index_t lda, const T* w, index_t ldw, const T* bias, const T* res,
                          index_t ld_res, T* d, index_t ldd, int M, int N, int K, cudaStream_t stream);

// h (M, N) = a @ w^T + bias (N,) or none, rounded to T; act (M, N) = gelu(h in fp32) (erf, or tanh if tanh_form).
// h == nullptr: act alone (no autograd, so nothing reads h), by a kernel without the aux store.
template <class T>
void linear_bias_gelu(const T* a, index_t lda, const T* w, index_t ldw, const T* bias, T* h, index_t ldh, T* act,
                      index_t ld_act, int M, int N, int K, bool tanh_form, cudaStream_t stream);

// dh (M, N) = (dy (M, K) @ w (K, N)) * gelu'(h (M, N)): w row-major (K, N), i.e. fc2's weight (C_out, Hd).
template <class T>
void dgelu(const T* dy, index_t ldy, const T* w, index_t ldw, const T* h, index_t ldh, T* dh, index_t lddh, int M,
           int N, int K, bool tanh_form, cudaStream_t stream);

// dgelu, and from the same epilogue, each where its pointer is not null: act (M, N) = gelu(h), rounded to T (the
// operand of dfc2_weight = dy^T @ act); and the column sums of dh (its fp32 values, before the rounding to T) per
// 128-row tile, into partials (fp32, DGeluColSumsFloats(M, N) of them): row m_tile, column n at
// m_tile * DGeluColSumsLd(N) + n. The caller adds the ceil(M / kTileM) rows in order (deterministic): dfc1_bias
// without a second read of dh.
template <class T>
void dgelu_act(const T* dy, index_t ldy, const T* w, index_t ldw, const T* h, index_t ldh, T* dh, index_t lddh, T* act,
               index_t ld_act, float* partials, int M, int N, int K, bool tanh_form, cudaStream_t stream);
// The CTA tile of every product (gemm_sm90_impl.cuh's Sm90Tile, which static_asserts these): the layout of
// dgelu_act's partial sums.
inline constexpr index_t kTileM = 128, kTileN = 256;
inline constexpr index_t DGeluColSumsLd(index_t N) { return (N + kTileN - 1) / kTileN * kTileN; }
inline constexpr index_t DGeluColSumsFloats(index_t M, index_t N) {
  return (M + kTileM - 1) / kTileM * DGeluColSumsLd(N);
}

// d (M, N) = a (M, K) @ b (K, N), both row-major: the input gradient dX = dY @ W.
template <class T>
void matmul_nn(const T* a, index_t lda, const T* b, index_t ldb, T* d, index_t ldd, int M, int N, int K,
               cudaStream_t stream);

// d (M, N) = a^T @ b with a (K, M) and b (K, N) row-major: the weight gradient dW = dY^T @ X over K = tokens.
// Stream-K / split-K over K so that a few output tiles still fill every SM, with CUTLASS's deterministic
// reduction (fp32 partials in a workspace, added in a fixed order; no atomics). The workspace is stream-ordered
// (cudaMallocAsync on `stream`, freed after the launch).
template <class T>
void matmul_tn_wgrad(const T* a, index_t lda, const T* b, index_t ldb, T* d, index_t ldd, int M, int N, int K,
                     cudaStream_t stream);

// What each instantiated kernel is, from its CUTLASS types (for benchmarks/kernel_report.py: cuobjdump sees only the
// static shared memory, and these kernels take theirs dynamically). variant: "" for the kernels the ops run, else
// the name linear_bias_variant takes.
struct KernelFacts {
  std::string product, dtype, tile, cluster, schedule, scheduler;
  int stages, smem_bytes, threads;
  std::string variant;
};

template <class T>
void describe(std::vector<KernelFacts>& out);

// Configuration variants of linear_bias in bf16 (gemm_sm90_variants.cu), built only to be timed beside the shipped
// configuration (benchmarks/probe_gemm.py): the same product and arguments as linear_bias<__nv_bfloat16>, run with
// the configuration `variant` names (one of kLinearBiasVariants; anything else raises std::invalid_argument).
extern const char* const kLinearBiasVariants[3];
void linear_bias_variant(const std::string& variant, const __nv_bfloat16* a, index_t lda, const __nv_bfloat16* w,
                         index_t ldw, const __nv_bfloat16* bias, __nv_bfloat16* d, index_t ldd, int M, int N, int K,
                         cudaStream_t stream);
void describe_variants(std::vector<KernelFacts>& out);

// CUTLASS's can_implement of one product ("linear_bias", "linear_bias_residual", "linear_bias_gelu",
// "linear_bias_gelu_act", "dgelu", "dgelu_act", "matmul_nn", "matmul_tn_wgrad") at (M, N, K) with packed
// operands: "" if accepted, else why. No CUDA call.
template <class T>
std::string can_implement(const std::string& product, int M, int N, int K);

}  // namespace sm90
}  // namespace vk
