// Flash attention (FlashAttention-2 style), forward and deterministic backward, without an N x N matrix: what the
// forward (attention_fwd.cu) and the backward (attention_bwd.cu) share.
//
//   out = softmax(q @ k^T * scale) @ v   for q, k, v (B, H, N, D), one (b, h) head per grid (y, z).
//
// fp16 / bf16: tensor cores (mma.sync m16n8k16, fp32 accumulators) fed by ldmatrix from padded shared
//   memory, with K / V (forward, dQ) or Q / dO (dK dV) streamed through a cp.async multi-stage pipeline.
//   Softmax runs in fp32 in base 2: scores are scaled by scale * log2(e) once, exp2 everywhere; P and dS
//   are rounded to the input dtype only as mma operands (as in FlashAttention).
// fp32: plain SIMT kernels, one warp per row, fp32 FMA throughout (full fp32 precision, `allow_tf32` is
//   ignored); written to be obviously correct, not fast.
//
// Kernels (each followed by check_launch in its launcher):
//   attention_fwd.cu  attn_fwd_kernel, attn_fwd_simt_kernel
//   attention_bwd.cu  attn_delta_kernel, attn_dkdv_kernel, attn_dq_kernel, attn_dkdv_simt_kernel, attn_dq_simt_kernel
//
// Masking: rows (queries) and columns (keys) >= N are zero-filled by cp.async and never stored; scores of
// keys >= N are -inf before the row max (forward) and P = 0 for keys or queries >= N (backward). Every row
// has at least one valid key, but the softmax still guards a row whose running max is -inf (no NaN).
//
// Memory layout: q, k, v, out, dout are (B, H, N, D) with any (B, H, N) strides and unit stride along D;
// 16-bit inputs also need 16-byte aligned pointers and strides that are multiples of 8 elements (16-byte
// cp.async). The launchers check this; vit_kernels/cuda/attention.py copies inputs that break it.
// dq, dk, dv share one set of (B, H, N) strides (contiguous, or the slices of a packed (B, N, 3, H, D) buffer),
// unit stride along D; lse and delta are contiguous.
//
// Instantiated: {fp16, bf16} x D in {32, 48, 64, 80, 96, 128} x {fwd, dkdv, dq} tensor-core kernels,
// delta for {fp32, fp16, bf16}, and the fp32 SIMT kernels (runtime D <= 128).
// To add a head dim: a multiple of 16 up to 128, as a case in dispatch_head_dim (and in dispatch.py).
// To add a tile shape: the traits structs FwdTile / DkdvTile / DqTile.
//
// Sections: dtype + PTX helpers | kernel arguments | shared-memory tiles and warp GEMMs | tile configurations |
// fp32 SIMT row helpers | launcher helpers (head-dim dispatch, precondition checks, grids).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "common.cuh"

namespace vk {
namespace attn {

using index_t = int64_t;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -__builtin_huge_valf();

// x * y rounded to fp32, never contracted into an FMA with what follows (nvcc and ptxas contract a plain multiply
// feeding an add). Every base-2 logit (S * scale * log2 e) and base-2 lse goes through it, so that the backward
// rounds each logit as the forward did and its P agrees, key by key, with the forward's P behind out and
// delta = rowsum(dO * O). dq = sum_j dS_j k_j cancels, so it amplifies any disagreement past fp32 tolerance at very
// negative logits when the backward fuses S * scale - lse (benchmarks/NOTES.md, attention).
__device__ __forceinline__ float mul_rounded(float x, float y) { return __fmul_rn(x, y); }

// ====================================================================================================
// dtype and PTX helpers of this file (the shared ones are in common.cuh)
// ====================================================================================================
// (a, b) rounded to T and packed in one register, a in the low half: the order of an mma fragment pair.
template <class T>
__device__ __forceinline__ uint32_t pack2(float a, float b) {
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&h);
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
}

// Two adjacent 16-bit elements (d, d + 1), d even: one 4-byte store.
template <class T>
__device__ __forceinline__ void store2(T* p, float a, float b) {
  *reinterpret_cast<uint32_t*>(p) = pack2<T>(a, b);
}

// 4-byte variant for the per-row fp32 vectors (lse, delta), whose rows need not be 16-byte aligned.
__device__ __forceinline__ void cp_async_4(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 4 : 0));
}

// Reductions over the 4 lanes of a quad (the lanes that share an accumulator row) and over a warp.
// xor butterflies: every lane ends with the same bits (fp add and max are commutative).
__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// ====================================================================================================
// kernel arguments
// ====================================================================================================
// Element strides of a (B, H, N, D) tensor along B, H, N; D has unit stride.
struct Strides {
  index_t b, h, n;
};

template <class T>
struct FwdParams {
  const T *q, *k, *v;
  T* out;
  float* lse;  // (B, H, N) contiguous
  Strides sq, sk, sv, so;
  int H, N, D;
  float scale_log2;  // scale * log2(e): scores in base-2 units
};

template <class T>
struct BwdParams {
  const T *q, *k, *v, *out, *dout;
  const float* lse;  // (B, H, N) contiguous, from the forward
  float* delta;      // (B, H, N) contiguous, written by attn_delta_kernel
  T *dq, *dk, *dv;   // (B, H, N, D), unit stride along D, strides sg (one layout for the three)
  Strides sq, sk, sv, so, sdo;
  Strides sg;  // contiguous (B, H, N, D), or the q / k / v slices of one packed (B, N, 3, H, D) buffer
  int H, N, D;
  float scale, scale_log2;
};

template <class T>
__device__ __forceinline__ const T* head(const T* base, const Strides& s, int b, int h) {
  return base + b * s.b + h * s.h;
}

// head() of an output (dq, dk, dv).
template <class T>
__device__ __forceinline__ T* out_head(T* base, const Strides& s, int b, int h) {
  return base + b * s.b + h * s.h;
}

// Offset of row `row` of head (b, h) in a contiguous (B, H, N, D) tensor or (B, H, N) vector (D = 1).
__device__ __forceinline__ index_t contiguous_row(int b, int h, int H, int N, int row) {
  return (static_cast<index_t>(b) * H + h) * N + row;
}

// ====================================================================================================
// shared-memory tiles and warp-level GEMMs (tensor-core path)
// ====================================================================================================
// ROWS x D tile of 16-bit elements, row-major with a padded row of D + 8 elements: D / 8 + 1 sixteen-byte
// chunks, an odd number for every supported D, so the 8 row addresses of one ldmatrix phase (same column,
// 8 consecutive rows) fall in 8 different 16-byte bank groups: conflict free without a swizzle.
template <int ROWS, int D>
struct SmemTile {
  static_assert(D % 16 == 0 && ((D / 8 + 1) & 1), "D must be a multiple of 16 with an odd padded chunk count");
  static constexpr int kRows = ROWS;
  static constexpr int kStride = D + 8;
  static constexpr int kElems = ROWS * kStride;
  static constexpr int kBytes = kElems * 2;
  static constexpr int kChunksPerRow = D / 8;
  static constexpr int kChunks = ROWS * kChunksPerRow;

  // Rows row0 .. row0 + ROWS - 1 of an (N, D) matrix with row stride s_n (elements); rows >= N become zeros.
  // Consecutive threads take consecutive chunks of a row, so a warp's copies coalesce.
  template <int THREADS, class T>
  __device__ __forceinline__ static void load(uint32_t dst, const T* src, index_t s_n, int row0, int N, int tid) {
#pragma unroll
    for (int c0 = 0; c0 < kChunks; c0 += THREADS) {
      const int c = c0 + tid;
      if (kChunks % THREADS == 0 || c < kChunks) {
        const int r = c / kChunksPerRow;
        const int col = (c - r * kChunksPerRow) * 8;
        const bool valid = row0 + r < N;
        const T* g = valid ? src + (row0 + r) * s_n + col : src;
        cp_async_16(dst + 2 * (r * kStride + col), g, valid);
      }
    }
  }

  // ldmatrix x4 over the 16 x 16 block at (row0, col0): lanes 0-7 address rows 0-7 / cols 0-7 (matrix 0),
  // lanes 8-15 rows 8-15 / cols 0-7 (1), lanes 16-23 rows 0-7 / cols 8-15 (2), lanes 24-31 rows 8-15 / cols 8-15 (3).
  __device__ __forceinline__ static uint32_t block_addr(uint32_t base, int row0, int col0, int lane) {
    return base + 2 * ((row0 + (lane & 15)) * kStride + col0 + ((lane >> 4) << 3));
  }

  // A fragment: rows row0..+15 (m), cols k0..+15 (k).
  __device__ __forceinline__ static void load_a(uint32_t base, int row0, int k0, int lane, uint32_t (&a)[4]) {
    ldmatrix_x4(a, block_addr(base, row0, k0, lane));
  }

  // B fragments of two n8 tiles when the tile stores B^T, i.e. rows are n and cols are k (K in S = Q K^T):
  // rows n0..n0+7 -> b0, n0+8..n0+15 -> b1; each thread gets (n g, k 2t..) = B (k 2t.., n g).
  __device__ __forceinline__ static void load_b_nk(uint32_t base, int n0, int k0, int lane, uint32_t (&b0)[2],
                                                   uint32_t (&b1)[2]) {
    uint32_t r[4];
    ldmatrix_x4(r, block_addr(base, n0, k0, lane));
    b0[0] = r[0];  // n 0-7,  k 0-7
    b0[1] = r[2];  // n 0-7,  k 8-15
    b1[0] = r[1];  // n 8-15, k 0-7
    b1[1] = r[3];  // n 8-15, k 8-15
  }

  // B fragments of two n8 tiles when the tile stores B itself, rows k and cols n (V in O = P V): .trans
  // hands each thread (row 2t.., col g) of every 8x8 matrix, i.e. B (k 2t.., n g).
  __device__ __forceinline__ static void load_b_kn(uint32_t base, int k0, int n0, int lane, uint32_t (&b0)[2],
                                                   uint32_t (&b1)[2]) {
    uint32_t r[4];
    ldmatrix_x4_trans(r, block_addr(base, k0, n0, lane));
    b0[0] = r[0];  // k 0-7,  n 0-7
    b0[1] = r[1];  // k 8-15, n 0-7
    b1[0] = r[2];  // k 0-7,  n 8-15
    b1[1] = r[3];  // k 8-15, n 8-15
  }
};

// acc (16 x 8*NT) += A (16 rows from a_row0 of tile TA, all D columns) @ B, where tile TB holds B^T
// (8*NT rows = n, D columns = k). Both operands from shared memory.
template <class T, class TA, class TB, int NT, int D>
__device__ __forceinline__ void warp_gemm_ss(float (&acc)[NT][4], uint32_t a_base, int a_row0, uint32_t b_base,
                                             int lane) {
  static_assert(NT % 2 == 0 && NT * 8 == TB::kRows, "B^T tile rows must be the n extent");
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    uint32_t a[4];
    TA::load_a(a_base, a_row0, ks * 16, lane, a);
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      uint32_t b0[2], b1[2];
      TB::load_b_nk(b_base, np * 16, ks * 16, lane, b0, b1);
      mma_16816<T>(acc[2 * np], a, b0);
      mma_16816<T>(acc[2 * np + 1], a, b1);
    }
  }
}

// acc (16 x D) += A (16 x 16*KS, register fragments) @ B, where tile TB holds B (16*KS rows = k, D cols = n).
template <class T, class TB, int KS, int D>
__device__ __forceinline__ void warp_gemm_rs(float (&acc)[D / 8][4], const uint32_t (&a)[KS][4], uint32_t b_base,
                                             int lane) {
  static_assert(KS * 16 == TB::kRows, "B tile rows must be the k extent");
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
#pragma unroll
    for (int np = 0; np < D / 16; ++np) {
      uint32_t b0[2], b1[2];
      TB::load_b_kn(b_base, ks * 16, np * 16, lane, b0, b1);
      mma_16816<T>(acc[2 * np], a[ks], b0);
      mma_16816<T>(acc[2 * np + 1], a[ks], b1);
    }
  }
}

// An accumulator (16 x 16*KS) rounded to T as the A operand of the next mma: the C layout of two
// adjacent n8 tiles is exactly the A layout of one k16 step (FlashAttention-2's register reuse).
template <class T, int KS>
__device__ __forceinline__ void acc_to_a(const float (&c)[2 * KS][4], uint32_t (&a)[KS][4]) {
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
    a[ks][0] = pack2<T>(c[2 * ks][0], c[2 * ks][1]);          // row g,   k 2t..
    a[ks][1] = pack2<T>(c[2 * ks][2], c[2 * ks][3]);          // row g+8, k 2t..
    a[ks][2] = pack2<T>(c[2 * ks + 1][0], c[2 * ks + 1][1]);  // row g,   k 8+2t..
    a[ks][3] = pack2<T>(c[2 * ks + 1][2], c[2 * ks + 1][3]);  // row g+8, k 8+2t..
  }
}

template <int NT>
__device__ __forceinline__ void zero(float (&acc)[NT][4]) {
#pragma unroll
  for (int i = 0; i < NT; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[i][e] = 0.0f;
}

// Stores a warp's 16 x D accumulator (times `mul`) to rows row0 + {g, g + 8} of a row-major matrix
// with row stride s_n; rows >= N are skipped.
template <class T, int D>
__device__ __forceinline__ void store_rows(T* base, index_t s_n, int row0, int N, const float (&acc)[D / 8][4],
                                           float mul0, float mul1, int lane) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + (lane >> 2) + 8 * r;
    if (row < N) {
      const float mul = r == 0 ? mul0 : mul1;
      T* p = base + row * s_n + 2 * (lane & 3);
#pragma unroll
      for (int nt = 0; nt < D / 8; ++nt) store2(p + nt * 8, acc[nt][2 * r] * mul, acc[nt][2 * r + 1] * mul);
    }
  }
}

// ====================================================================================================
// tile configurations
// ====================================================================================================
// Forward: 4 warps x 16 query rows; K and V tiles double-buffered. Keys per tile drop to 32 above D = 64
// to keep the fp32 S and O accumulators (BN / 2 + D / 2 registers) plus addressing within ~128 registers
// and shared memory near 48 KiB (52 KiB at D = 128), so several CTAs share an SM.
template <int D>
struct FwdTile {
  static constexpr int kWarps = 4, kThreads = 32 * kWarps, kStages = 2;
  static constexpr int kBM = 16 * kWarps;
  static constexpr int kBN = D <= 64 ? 64 : 32;
  using QTile = SmemTile<kBM, D>;
  using KVTile = SmemTile<kBN, D>;
  static constexpr int kSmemBytes = QTile::kBytes + 2 * kStages * KVTile::kBytes;
};

// dK dV: 4 warps x 16 keys own dK and dV (2 x D / 2 fp32 registers); Q, dO, lse and delta tiles stream
// through a double buffer. Query tiles of 32 above D = 64 keep S^T and dP^T small enough for 0 spills.
template <int D>
struct DkdvTile {
  static constexpr int kWarps = 4, kThreads = 32 * kWarps, kStages = 2;
  static constexpr int kBN = 16 * kWarps;           // keys per block
  static constexpr int kBM = D <= 64 ? 64 : 32;     // queries per streamed tile
  using KVTile = SmemTile<kBN, D>;
  using QTile = SmemTile<kBM, D>;
  static constexpr int kVecBytes = kBM * 4;         // one fp32 lse or delta tile
  static constexpr int kSmemBytes = 2 * KVTile::kBytes + kStages * (2 * QTile::kBytes + 2 * kVecBytes);
  static_assert(kThreads >= kBM, "one thread per lse / delta element");
};

// dQ: 4 warps x 16 queries own dQ; K and V tiles stream through a double buffer.
template <int D>
struct DqTile {
  static constexpr int kWarps = 4, kThreads = 32 * kWarps, kStages = 2;
  static constexpr int kBM = 16 * kWarps;        // queries per block
  static constexpr int kBN = D <= 64 ? 64 : 32;  // keys per streamed tile
  using QTile = SmemTile<kBM, D>;
  using KVTile = SmemTile<kBN, D>;
  static constexpr int kSmemBytes = 2 * QTile::kBytes + 2 * kStages * KVTile::kBytes;
};

// ====================================================================================================
// fp32 SIMT row helpers: one warp per row, lane l holds head-dim elements l, l + 32, l + 64, l + 96
// ====================================================================================================
constexpr int kSimtWarps = 4;     // rows per block
constexpr int kSimtPerLane = 4;   // D <= 128

template <class T>
__device__ __forceinline__ void load_row(const T* row, int D, int lane, float (&x)[kSimtPerLane]) {
#pragma unroll
  for (int c = 0; c < kSimtPerLane; ++c) {
    const int d = lane + 32 * c;
    x[c] = d < D ? to_float(row[d]) : 0.0f;
  }
}

// Dot product of a row held in registers with a row in memory, summed over the warp (every lane gets it).
template <class T>
__device__ __forceinline__ float warp_dot(const float (&x)[kSimtPerLane], const T* row, int D, int lane) {
  float acc = 0.0f;
#pragma unroll
  for (int c = 0; c < kSimtPerLane; ++c) {
    const int d = lane + 32 * c;
    if (d < D) acc = fmaf(x[c], to_float(row[d]), acc);
  }
  return warp_sum(acc);
}

template <class T>
__device__ __forceinline__ void store_row(T* row, int D, int lane, const float (&x)[kSimtPerLane], float mul) {
#pragma unroll
  for (int c = 0; c < kSimtPerLane; ++c) {
    const int d = lane + 32 * c;
    if (d < D) row[d] = from_float<T>(x[c] * mul);
  }
}

// ====================================================================================================
// launcher helpers
// ====================================================================================================
// head dim -> compile-time constant, next to vk::dispatch_dtype (common.cuh): f is instantiated once per case.
template <int D>
using HeadDim = std::integral_constant<int, D>;

template <class F>
void dispatch_head_dim(index_t d, F&& f) {
  switch (d) {
    case 32: f(HeadDim<32>{}); break;
    case 48: f(HeadDim<48>{}); break;
    case 64: f(HeadDim<64>{}); break;
    case 80: f(HeadDim<80>{}); break;
    case 96: f(HeadDim<96>{}); break;
    case 128: f(HeadDim<128>{}); break;
    default:
      throw std::invalid_argument("head dim D=" + std::to_string(d) +
                                  " is not supported (supported: 32, 48, 64, 80, 96, 128)");
  }
}

using Strides3 = std::array<index_t, 3>;

inline Strides to_strides(const Strides3& s) { return Strides{s[0], s[1], s[2]}; }

// Shape checks, then the layout the vectorised path needs; all before any CUDA call.
inline void check_shape(int dtype, index_t B, index_t H, index_t N, index_t D) {
  require(dtype >= 0 && dtype <= 2, "unknown dtype code " + std::to_string(dtype) + " (0 fp32, 1 fp16, 2 bf16)");
  require(B > 0 && H > 0 && N > 0, "B, H and N must be positive, got (" + std::to_string(B) + ", " +
                                       std::to_string(H) + ", " + std::to_string(N) + ")");
  require(D == 32 || D == 48 || D == 64 || D == 80 || D == 96 || D == 128,
          "head dim D=" + std::to_string(D) + " is not supported (supported: 32, 48, 64, 80, 96, 128)");
  require(B <= 65535 && H <= 65535, "B and H must be at most 65535 (grid z and y)");
  require(N * 64 < (index_t{1} << 31), "N is too large for 32-bit row indices");
}

inline void check_operand(const char* name, uintptr_t ptr, const Strides3& s, bool vectorized) {
  const std::string n = name;
  require(ptr % (vectorized ? 16 : 4) == 0, n + ": pointer must be " + (vectorized ? "16" : "4") + "-byte aligned");
  require(s[0] >= 0 && s[1] >= 0 && s[2] >= 0, n + ": strides must be non-negative");
  if (vectorized) {
    require(s[0] % 8 == 0 && s[1] % 8 == 0 && s[2] % 8 == 0,
            n + ": strides (B, H, N) must be multiples of 8 elements for 16-byte loads, got (" +
                std::to_string(s[0]) + ", " + std::to_string(s[1]) + ", " + std::to_string(s[2]) + ")");
  }
}

// An output every element of which has its own address (so that no two blocks write one row): (B, H, N) strides
// >= 0 and, in increasing order over the modes of size > 1, each at least the extent of the modes below it (the
// rows of D elements included). Contiguous (B, H, N, D), out's (B, N, H, D) memory order and the q / k / v slices
// of a packed (B, N, 3, H, D) buffer all pass.
inline void check_rows_distinct(const char* name, const Strides3& s, index_t B, index_t H, index_t N, index_t D) {
  const std::string n = name;
  require(s[0] >= 0 && s[1] >= 0 && s[2] >= 0, n + ": (B, H, N) strides must not be negative");
  std::array<std::pair<index_t, index_t>, 3> modes{{{s[0], B}, {s[1], H}, {s[2], N}}};  // (stride, size)
  std::sort(modes.begin(), modes.end());
  index_t extent = D;  // the elements one row spans
  for (const auto& [stride, size] : modes) {
    if (size <= 1) continue;
    require(stride >= extent, n + ": (B, H, N) strides (" + std::to_string(s[0]) + ", " + std::to_string(s[1]) +
                                  ", " + std::to_string(s[2]) + ") make rows overlap at B=" + std::to_string(B) +
                                  ", H=" + std::to_string(H) + ", N=" + std::to_string(N) + ", D=" + std::to_string(D));
    extent += stride * (size - 1);
  }
}

// Dynamic shared memory above the 48 KiB default needs an opt-in per kernel.
template <class Kernel>
void set_smem(Kernel kernel, int bytes, const char* name) {
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes),
             (std::string("cudaFuncSetAttribute(") + name + ")").c_str());
}

inline dim3 grid_for(index_t N, int rows_per_block, index_t H, index_t B) {
  return dim3(static_cast<unsigned>((N + rows_per_block - 1) / rows_per_block), static_cast<unsigned>(H),
              static_cast<unsigned>(B));
}

template <class T>
inline constexpr bool kTensorCores = !std::is_same_v<T, float>;

}  // namespace attn

}  // namespace vk
