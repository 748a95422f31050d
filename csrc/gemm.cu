// GEMMs of the fused QKV projection and the GELU-MLP, forward and backward, with fused epilogues.
//
// Every GEMM here is one kernel:   C[m, n] = epilogue( sum_k A[m, k] * B[n, k] )
// where A (M x K) and B (N x K) are *operands*: small structs that map (row, k) to an address. Strided
// operands cover x @ W^T, dY @ W and dY^T @ X by their strides alone (no transposed copies); the QKV
// gradient operand reads the virtual (M, 3C) matrix dQKV straight out of dq, dk, dv (B, H, N, D).
//
//   fp16 / bf16: tensor cores (mma.sync m16n8k16, fp32 accumulators), ldmatrix from swizzled shared
//                memory, cp.async multi-stage pipeline. 16-byte loads need K-stride 1 ("K-major") or
//                row-stride 1 ("MN-major") operands with 16-byte aligned pointers and leading strides;
//                the launchers check this and vit_kernels/cuda/linear.py copies inputs that do not comply.
//   fp32:        a plain SIMT kernel with fp32 FMA (full fp32 precision; `allow_tf32` is ignored).
//
// Bias gradients are column sums of the output gradient, not fused into the weight-gradient GEMM: a
// deterministic two-pass reduction (colsum_partial_kernel over row splits into an fp32 scratch the caller
// passes, then colsum_finish_kernel).
//
// Instantiated (through dispatch_dtype and the op launchers at the bottom): 8 (operand, operand, epilogue)
// combinations x {fp16, bf16} tensor-core kernels, the same 8 as fp32 SIMT kernels, and the column sums.
// To add a dtype: a case in dispatch_dtype, to_float/from_float/store2/load2 and (tensor cores) mma_16816.
// To add a tile shape: another TileConfig struct, chosen in run_gemm.
//
// Sections: dtype + PTX helpers | operands | epilogues | shared-memory tiles | kernels | launchers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <initializer_list>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "common.cuh"
#include "gemm_sm90.h"

namespace vk {
namespace gemm {

using index_t = int64_t;

// ====================================================================================================
// dtype and PTX helpers of this file (the shared ones are in common.cuh)
// ====================================================================================================
// Two adjacent elements (n, n + 1): callers guarantee n even and an even leading dimension, so the
// pair is aligned to its own size.
template <class T>
__device__ __forceinline__ void store2(T* p, float a, float b) {
  if constexpr (std::is_same_v<T, float>) {
    *reinterpret_cast<float2*>(p) = make_float2(a, b);
  } else if constexpr (std::is_same_v<T, __half>) {
    *reinterpret_cast<__half2*>(p) = __floats2half2_rn(a, b);
  } else {
    *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b);
  }
}

template <class T>
__device__ __forceinline__ float2 load2(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return *reinterpret_cast<const float2*>(p);
  } else if constexpr (std::is_same_v<T, __half>) {
    return __half22float2(*reinterpret_cast<const __half2*>(p));
  } else {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
  }
}

// GELU and its derivative in fp32; `tanh_form` selects approximate="tanh", otherwise exact erf.
__device__ __forceinline__ float gelu(float x, bool tanh_form) {
  if (tanh_form) {
    const float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);  // sqrt(2/pi) (x + 0.044715 x^3)
    return 0.5f * x * (1.0f + tanhf(u));
  }
  return 0.5f * x * (1.0f + erff(x * 0.7071067811865476f));  // M_SQRT1_2
}

__device__ __forceinline__ float gelu_grad(float x, bool tanh_form) {
  if (tanh_form) {
    const float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
    const float t = tanhf(u);
    const float du = 0.7978845608028654f * (1.0f + 3.0f * 0.044715f * x * x);
    return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * du;
  }
  // Phi(x) + x * phi(x), phi the standard normal density (1 / sqrt(2 pi) = 0.3989...).
  return 0.5f * (1.0f + erff(x * 0.7071067811865476f)) + x * 0.3989422804014327f * expf(-0.5f * x * x);
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// store2/load2 access element pairs as one 2 * sizeof(T) word: the pointer and the row stride must keep
// every even-indexed pair aligned to it.
template <class T>
void require_pairs(const T* p, index_t ld, const std::string& name) {
  require(reinterpret_cast<uintptr_t>(p) % (2 * sizeof(T)) == 0 && ld % 2 == 0,
          name + ": needs a pointer aligned to two elements and an even row stride (stored in pairs)");
}

// ====================================================================================================
// operands: (row, k) -> address of element [row, k] of A (M x K) or B (N x K)
// ====================================================================================================
// kKMajor: 8 consecutive k of one row are contiguous (16-byte chunks run along k); otherwise 8
// consecutive rows of one k are (chunks run along rows). The shared-memory layout follows from it.

// A plain strided matrix. K-major needs s_k == 1, MN-major s_row == 1 (checked by validate()).
template <class T, bool KMAJOR>
struct Strided {
  static constexpr bool kKMajor = KMAJOR;
  const T* ptr;
  index_t s_row, s_k;

  __device__ __forceinline__ const T* addr(index_t row, index_t k) const { return ptr + row * s_row + k * s_k; }

  void validate(index_t rows, index_t K, bool vectorized, const std::string& name) const {
    if (!vectorized) return;  // the SIMT path reads element by element, any strides
    require(aligned16(ptr), name + ": pointer must be 16-byte aligned");
    if (KMAJOR) {
      require(s_k == 1 && s_row % 8 == 0,
              name + ": needs unit stride along K and a row stride that is a multiple of 8, got (" +
                  std::to_string(s_row) + ", " + std::to_string(s_k) + ")");
      require(K % 8 == 0, name + ": K=" + std::to_string(K) + " must be a multiple of 8");
    } else {
      require(s_row == 1 && s_k % 8 == 0,
              name + ": needs unit row stride and a K stride that is a multiple of 8, got (" +
                  std::to_string(s_row) + ", " + std::to_string(s_k) + ")");
      require(rows % 8 == 0, name + ": rows=" + std::to_string(rows) + " must be a multiple of 8");
    }
  }
};

// The virtual dQKV (M, 3C) of the QKV backward, read in place from dq, dk, dv (B, H, N, D), which share
// the strides (s_b, s_h, s_t) and have unit stride along D. Column j of dQKV is (which = j / C,
// head = (j % C) / D, d = j % D); row m is (b = m / N, t = m % N): the inverse of the forward head split.
// TOKEN_IS_ROW: the operand is dQKV itself (rows = tokens, K-major: 8 consecutive j stay inside one head
// because D % 8 == 0); otherwise dQKV^T (rows = j, MN-major).
template <class T, bool TOKEN_IS_ROW>
struct QkvGrad {
  static constexpr bool kKMajor = TOKEN_IS_ROW;
  const T *dq, *dk, *dv;
  index_t s_b, s_h, s_t;
  int tokens, channels, head_dim;

  __device__ __forceinline__ const T* addr(index_t row, index_t k) const {
    const int token = static_cast<int>(TOKEN_IS_ROW ? row : k);
    const int j = static_cast<int>(TOKEN_IS_ROW ? k : row);
    const int which = j / channels;
    const int c = j - which * channels;
    const int h = c / head_dim;
    const int d = c - h * head_dim;
    const int b = token / tokens;
    const int t = token - b * tokens;
    const T* base = which == 0 ? dq : (which == 1 ? dk : dv);  // a select, not an indexed array: no local memory
    return base + b * s_b + h * s_h + t * s_t + d;
  }

  void validate(index_t rows, index_t K, bool vectorized, const std::string& name) const {
    require(head_dim % 8 == 0, name + ": head dim " + std::to_string(head_dim) + " must be a multiple of 8");
    require(channels % head_dim == 0, name + ": channels must be a multiple of the head dim");
    if (!vectorized) return;
    require(aligned16(dq) && aligned16(dk) && aligned16(dv), name + ": dq, dk, dv must be 16-byte aligned");
    require(s_b % 8 == 0 && s_h % 8 == 0 && s_t % 8 == 0,
            name + ": dq, dk, dv strides (B, H, N) must be multiples of 8");
    (void)rows;
    (void)K;
  }
};

// ====================================================================================================
// epilogues: called once per pair of adjacent outputs (m, n), (m, n + 1) with m < M, n even, n + 1 < N
// ====================================================================================================
template <class T>
struct EpiStore {  // (a) out = acc
  T* out;
  index_t ld;
  __device__ __forceinline__ void operator()(int m, int n, float v0, float v1) const {
    store2(out + m * ld + n, v0, v1);
  }
  void validate(const std::string& name) const { require_pairs(out, ld, name + " output"); }
};

template <class T>
struct EpiBias {  // (b) out = acc + bias + res (bias and res may be null): proj and fc2 with the residual add
  T* out;
  index_t ld;
  const T* bias;
  const T* res = nullptr;  // (M, ld_res): added in fp32 before the one rounding
  index_t ld_res = 0;
  __device__ __forceinline__ void operator()(int m, int n, float v0, float v1) const {
    if (bias != nullptr) {
      v0 += to_float(bias[n]);
      v1 += to_float(bias[n + 1]);
    }
    if (res != nullptr) {
      const float2 r = load2(res + m * ld_res + n);
      v0 += r.x;
      v1 += r.y;
    }
    store2(out + m * ld + n, v0, v1);
  }
  void validate(const std::string& name) const {
    require_pairs(out, ld, name + " output");
    if (res != nullptr) require_pairs(res, ld_res, name + " residual");
  }
};

template <class T>
struct EpiBiasGelu {  // (c) pre = acc + bias (saved for backward; null without autograd), act = gelu(pre), (M, ld)
  T* pre;
  T* act;
  index_t ld;
  const T* bias;
  bool tanh_form;
  __device__ __forceinline__ void operator()(int m, int n, float v0, float v1) const {
    if (bias != nullptr) {
      v0 += to_float(bias[n]);
      v1 += to_float(bias[n + 1]);
    }
    // GELU of the rounded pre-activation: backward recomputes it from the stored (rounded) value, as the
    // Triton kernel and the eager reference do.
    v0 = to_float(from_float<T>(v0));
    v1 = to_float(from_float<T>(v1));
    if (pre != nullptr) store2(pre + m * ld + n, v0, v1);
    store2(act + m * ld + n, gelu(v0, tanh_form), gelu(v1, tanh_form));
  }
  void validate(const std::string& name) const {
    if (pre != nullptr) require_pairs(pre, ld, name + " pre-activation");
    require_pairs(act, ld, name + " activation");
  }
};

template <class T>
struct EpiQkvSplit {  // (d) column n of (M, 3C) -> q/k/v (B, H, N, D) contiguous, plus bias (may be null)
  T *q, *k, *v;
  const T* bias;
  int tokens, channels, head_dim, heads;
  __device__ __forceinline__ void operator()(int m, int n, float v0, float v1) const {
    if (bias != nullptr) {
      v0 += to_float(bias[n]);
      v1 += to_float(bias[n + 1]);
    }
    const int which = n / channels;
    const int c = n - which * channels;
    const int h = c / head_dim;
    const int d = c - h * head_dim;  // even, and d + 1 < head_dim since head_dim is even
    const int b = m / tokens;
    const int t = m - b * tokens;
    T* base = which == 0 ? q : (which == 1 ? k : v);
    store2(base + ((static_cast<index_t>(b) * heads + h) * tokens + t) * head_dim + d, v0, v1);
  }
  void validate(const std::string& name) const {
    require_pairs(q, head_dim, name + " q");
    require_pairs(k, head_dim, name + " k");
    require_pairs(v, head_dim, name + " v");
  }
};

template <class T>
struct EpiDGelu {  // (e) dpre = acc * gelu'(pre); also act = gelu(pre), the operand of dW2 (saves a pass)
  T* dpre;
  T* act;
  index_t ld;
  const T* pre;
  index_t ld_pre;
  bool tanh_form;
  __device__ __forceinline__ void operator()(int m, int n, float v0, float v1) const {
    const float2 h = load2(pre + m * ld_pre + n);
    store2(dpre + m * ld + n, v0 * gelu_grad(h.x, tanh_form), v1 * gelu_grad(h.y, tanh_form));
    store2(act + m * ld + n, gelu(h.x, tanh_form), gelu(h.y, tanh_form));
  }
  void validate(const std::string& name) const {
    require_pairs(dpre, ld, name + " dhidden");
    require_pairs(act, ld, name + " activation");
    require_pairs(pre, ld_pre, name + " hidden");
  }
};

// ====================================================================================================
// tile configuration and shared-memory tiles (tensor-core path)
// ====================================================================================================
// 128 x 128 x 32 with 8 warps as 2 (M) x 4 (N), each warp 64 x 32 = 4 x 4 mma tiles; 4 stages of
// 16 KiB keep ~3 tiles of loads in flight and still fit two CTAs per SM on A100 and H100 (64 KiB smem
// and <= 128 registers per thread each, which kMinBlocksPerSm makes ptxas guarantee).
struct TileConfig128x128 {
  static constexpr int kBM = 128, kBN = 128, kBK = 32, kStages = 4, kMinBlocksPerSm = 2;
  static constexpr int kWarpsM = 2, kWarpsN = 4;
  static constexpr int kThreads = 32 * kWarpsM * kWarpsN;
  static constexpr int kWarpM = kBM / kWarpsM, kWarpN = kBN / kWarpsN;
  static constexpr int kMmaM = kWarpM / 16, kMmaN = kWarpN / 8;
  static_assert(kMmaN % 2 == 0, "B fragments are loaded 16 rows (two n8 tiles) at a time");
};

// One operand's tile of ROWS x BK 16-bit elements, stored in 16-byte chunks with an XOR swizzle so that
// both the cp.async stores and the ldmatrix reads (8 rows of 16 bytes per phase) are bank-conflict free.
//   K-major:  [ROWS][BK], BK = 32 (4 chunks per row): chunk kc of row r lives at kc ^ ((r >> 1) & 3);
//             rows r..r+7 then cover all 8 bank groups (two rows per 128 bytes).
//   MN-major: [BK][ROWS], ROWS >= 64: chunk rc of k-row k lives at rc ^ (k & 7); ldmatrix.trans reads
//             8 consecutive k-rows at one chunk column, which the XOR spreads over 8 bank groups.
template <int ROWS, int BK, bool KMAJOR>
struct SmemTile {
  static constexpr int kElems = ROWS * BK;
  static constexpr int kChunks = kElems / 8;
  static_assert(!KMAJOR || BK == 32, "the K-major swizzle assumes 4 chunks per row");
  static_assert(KMAJOR || ROWS % 64 == 0, "the MN-major swizzle needs at least 8 chunks per k-row");

  // Element offset of the chunk that starts at (row, k); k % 8 == 0 (K-major) or row % 8 == 0 (MN-major).
  __device__ __forceinline__ static int offset(int row, int k) {
    if constexpr (KMAJOR) {
      return row * BK + ((((k >> 3) ^ (row >> 1)) & 3) << 3);
    } else {
      return k * ROWS + (((row >> 3) ^ (k & 7)) << 3);
    }
  }

  // Chunk `id` of the tile -> (row, k) of its first element; consecutive ids walk the contiguous
  // direction in global memory, so a warp's cp.asyncs coalesce.
  __device__ __forceinline__ static void chunk_coords(int id, int& row, int& k) {
    if constexpr (KMAJOR) {
      row = id / (BK / 8);
      k = (id % (BK / 8)) * 8;
    } else {
      k = id / (ROWS / 8);
      row = (id % (ROWS / 8)) * 8;
    }
  }

  // The 16 x 16 block at (row0, k0) in mma A-fragment order: r[0] rows 0-7 / k 0-7, r[1] rows 8-15 /
  // k 0-7, r[2] rows 0-7 / k 8-15, r[3] rows 8-15 / k 8-15. Each thread gets (row lane/4,
  // k 2*(lane%4) + {0,1}) of each 8x8 matrix; .trans delivers that from the MN-major layout.
  __device__ __forceinline__ static void load_16x16(uint32_t base, int row0, int k0, int lane, uint32_t (&r)[4]) {
    if constexpr (KMAJOR) {
      const int row = row0 + (lane & 15);
      const int k = k0 + ((lane >> 4) << 3);
      ldmatrix_x4(r, base + 2 * offset(row, k));
    } else {
      const int k = k0 + (lane & 7) + ((lane >> 4) << 3);
      const int row = row0 + (((lane >> 3) & 1) << 3);
      ldmatrix_x4_trans(r, base + 2 * offset(row, k));
    }
  }
};

// ====================================================================================================
// kernels
// ====================================================================================================
// (m0, n0) of this block's output tile in the flat grid of grid_for: ceil(M / BM) * ceil(N / BN) blocks along x,
// the N-tiles of one M-tile adjacent (they share its A rows in L2), the order the former (N-tiles, M-tiles) 2-D
// grid ran in. One axis, because grid y stops at 65,535 M-tiles (8.4M rows, 4.2M for the 64-row SIMT tiles).
struct TileOrigin {
  int m0, n0;
};

template <int BM, int BN>
__device__ __forceinline__ TileOrigin tile_origin(int N) {
  const unsigned n_tiles = (static_cast<unsigned>(N) + BN - 1) / BN;
  const unsigned m_tile = blockIdx.x / n_tiles;
  return {static_cast<int>(m_tile * BM), static_cast<int>((blockIdx.x - m_tile * n_tiles) * BN)};
}

// Tensor-core GEMM, fp16/bf16 in, fp32 accumulate. Grid: ceil(M / BM) * ceil(N / BN) (tile_origin); rows >= M,
// columns >= N and k >= K are zero-filled by cp.async and never stored.
template <class Cfg, class T, class OpA, class OpB, class Epi>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocksPerSm) gemm_tc_kernel(OpA a, OpB b, Epi epi, int M, int N, int K) {
  using TileA = SmemTile<Cfg::kBM, Cfg::kBK, OpA::kKMajor>;
  using TileB = SmemTile<Cfg::kBN, Cfg::kBK, OpB::kKMajor>;
  constexpr int kStageBytes = (TileA::kElems + TileB::kElems) * 2;
  static_assert(TileA::kChunks % Cfg::kThreads == 0 && TileB::kChunks % Cfg::kThreads == 0, "even chunk split");

  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t smem_base = smem_u32(smem);
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int warp_m = warp / Cfg::kWarpsN;
  const int warp_n = warp % Cfg::kWarpsN;
  const TileOrigin tile = tile_origin<Cfg::kBM, Cfg::kBN>(N);
  const int m0 = tile.m0, n0 = tile.n0;

  auto load_stage = [&](int stage, int k_tile) {
    const int k_base = k_tile * Cfg::kBK;
    const uint32_t sa = smem_base + stage * kStageBytes;
    const uint32_t sb = sa + TileA::kElems * 2;
#pragma unroll
    for (int i = 0; i < TileA::kChunks / Cfg::kThreads; ++i) {
      int r, k;
      TileA::chunk_coords(tid + i * Cfg::kThreads, r, k);
      // Chunks are all-or-nothing: K % 8 == 0 (K-major) and M % 8 == 0 (MN-major) are launcher checks.
      const bool valid = m0 + r < M && k_base + k < K;
      cp_async_16(sa + 2 * TileA::offset(r, k), a.addr(valid ? m0 + r : 0, valid ? k_base + k : 0), valid);
    }
#pragma unroll
    for (int i = 0; i < TileB::kChunks / Cfg::kThreads; ++i) {
      int r, k;
      TileB::chunk_coords(tid + i * Cfg::kThreads, r, k);
      const bool valid = n0 + r < N && k_base + k < K;
      cp_async_16(sb + 2 * TileB::offset(r, k), b.addr(valid ? n0 + r : 0, valid ? k_base + k : 0), valid);
    }
  };

  float acc[Cfg::kMmaM][Cfg::kMmaN][4];
#pragma unroll
  for (int i = 0; i < Cfg::kMmaM; ++i)
#pragma unroll
    for (int j = 0; j < Cfg::kMmaN; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

  const int k_tiles = (K + Cfg::kBK - 1) / Cfg::kBK;
#pragma unroll
  for (int s = 0; s < Cfg::kStages - 1; ++s) {
    if (s < k_tiles) load_stage(s, s);
    cp_async_commit();  // possibly empty: keeps "group i holds tile i" for the wait below
  }

  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<Cfg::kStages - 2>();  // tile kt has landed (for this thread) ...
    __syncthreads();                    // ... for all threads, and everyone is done with tile kt - 1
    const int next = kt + Cfg::kStages - 1;
    if (next < k_tiles) load_stage(next % Cfg::kStages, next);  // overwrites the stage of tile kt - 1
    cp_async_commit();

    const uint32_t sa = smem_base + (kt % Cfg::kStages) * kStageBytes;
    const uint32_t sb = sa + TileA::kElems * 2;
#pragma unroll
    for (int ks = 0; ks < Cfg::kBK; ks += 16) {
      uint32_t af[Cfg::kMmaM][4];
      uint32_t bfrag[Cfg::kMmaN][2];
#pragma unroll
      for (int i = 0; i < Cfg::kMmaM; ++i) TileA::load_16x16(sa, warp_m * Cfg::kWarpM + i * 16, ks, lane, af[i]);
#pragma unroll
      for (int j = 0; j < Cfg::kMmaN; j += 2) {
        uint32_t r[4];
        TileB::load_16x16(sb, warp_n * Cfg::kWarpN + j * 8, ks, lane, r);
        bfrag[j][0] = r[0];  // n 0-7, k 0-7
        bfrag[j][1] = r[2];  // n 0-7, k 8-15
        bfrag[j + 1][0] = r[1];
        bfrag[j + 1][1] = r[3];
      }
#pragma unroll
      for (int i = 0; i < Cfg::kMmaM; ++i)
#pragma unroll
        for (int j = 0; j < Cfg::kMmaN; ++j) mma_16816<T>(acc[i][j], af[i], bfrag[j]);
    }
  }
  cp_async_wait<0>();

  // Accumulator layout of m16n8: c0, c1 at (lane / 4, 2 * (lane % 4) + {0, 1}); c2, c3 eight rows down.
#pragma unroll
  for (int i = 0; i < Cfg::kMmaM; ++i) {
    const int row = m0 + warp_m * Cfg::kWarpM + i * 16 + (lane >> 2);
#pragma unroll
    for (int j = 0; j < Cfg::kMmaN; ++j) {
      const int col = n0 + warp_n * Cfg::kWarpN + j * 8 + ((lane & 3) << 1);
      if (col < N) {  // N is even, so col + 1 < N too
        if (row < M) epi(row, col, acc[i][j][0], acc[i][j][1]);
        if (row + 8 < M) epi(row + 8, col, acc[i][j][2], acc[i][j][3]);
      }
    }
  }
}

// fp32 SIMT GEMM: 64 x 64 tiles, 16 x 16 threads each computing 4 x 4 outputs, element-wise masked loads
// (any strides). Correctness path for fp32, full fp32 precision.
struct SimtConfig {
  static constexpr int kBM = 64, kBN = 64, kBK = 16, kThreads = 256;
};

template <class T, class OpA, class OpB, class Epi>
__global__ void __launch_bounds__(SimtConfig::kThreads) gemm_simt_kernel(OpA a, OpB b, Epi epi, int M, int N, int K) {
  constexpr int BM = SimtConfig::kBM, BN = SimtConfig::kBN, BK = SimtConfig::kBK, NT = SimtConfig::kThreads;
  __shared__ float as[BK][BM];
  __shared__ float bs[BK][BN];
  const int tid = threadIdx.x;
  const int tx = tid % 16, ty = tid / 16;
  const TileOrigin tile = tile_origin<BM, BN>(N);
  const int m0 = tile.m0, n0 = tile.n0;

  float acc[4][4] = {};
  for (int k0 = 0; k0 < K; k0 += BK) {
#pragma unroll
    for (int i = 0; i < BM * BK / NT; ++i) {
      const int e = tid + i * NT;
      const int r = OpA::kKMajor ? e / BK : e % BM;
      const int k = OpA::kKMajor ? e % BK : e / BM;
      as[k][r] = (m0 + r < M && k0 + k < K) ? to_float(*a.addr(m0 + r, k0 + k)) : 0.0f;
    }
#pragma unroll
    for (int i = 0; i < BN * BK / NT; ++i) {
      const int e = tid + i * NT;
      const int r = OpB::kKMajor ? e / BK : e % BN;
      const int k = OpB::kKMajor ? e % BK : e / BN;
      bs[k][r] = (n0 + r < N && k0 + k < K) ? to_float(*b.addr(n0 + r, k0 + k)) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < BK; ++k) {
      float av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = as[k][ty * 4 + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) bv[j] = bs[k][tx * 4 + j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int row = m0 + ty * 4 + i;
#pragma unroll
    for (int j = 0; j < 4; j += 2) {
      const int col = n0 + tx * 4 + j;
      if (row < M && col < N) epi(row, col, acc[i][j], acc[i][j + 1]);
    }
  }
}

// Column sums (bias gradients), pass 1: block (32, 8) sums rows [split * rows_per_split, ...) of 32 columns
// (split = blockIdx.y) into scratch[split * cols + col], fp32. Splitting the rows is what fills the GPU: one pass
// has only cols / 32 blocks (72 for ViT-B's dQKV, 24 for dy), each over every row (benchmarks/NOTES.md, fused_qkv).
template <class T, class Op>
__global__ void __launch_bounds__(256) colsum_partial_kernel(Op src, float* scratch, int rows, int cols,
                                                             int rows_per_split) {
  __shared__ float partial[8][33];
  const int col = blockIdx.x * 32 + threadIdx.x;
  const int r0 = blockIdx.y * rows_per_split;
  const int r1 = min(rows, r0 + rows_per_split);
  float s = 0.0f;
  if (col < cols) {
    for (int r = r0 + threadIdx.y; r < r1; r += 8) s += to_float(*src.addr(r, col));
  }
  partial[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    float total = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; ++i) total += partial[i][threadIdx.x];
    scratch[static_cast<index_t>(blockIdx.y) * cols + col] = total;
  }
}

// Pass 2: out[col] = the split sums of column col (split s at scratch[s * ld + col]), added in split order
// (deterministic). Also sums the sm_90a d-GELU epilogue's per-tile partial sums (ld: N rounded up to its tile).
template <class T>
__global__ void __launch_bounds__(256) colsum_finish_kernel(const float* scratch, T* out, int splits, int cols,
                                                            int ld) {
  const int col = blockIdx.x * 256 + threadIdx.x;
  if (col >= cols) return;
  float total = 0.0f;
  for (int s = 0; s < splits; ++s) total += scratch[static_cast<index_t>(s) * ld + col];
  out[col] = from_float<T>(total);
}

// ====================================================================================================
// launchers
// ====================================================================================================
template <class T>
inline constexpr bool kTensorCores = !std::is_same_v<T, float>;

// The flat grid tile_origin<BM, BN> reads, or a ValueError where even 2^31 - 1 blocks are too few.
inline dim3 grid_for(index_t M, index_t N, int bm, int bn, const std::string& name) {
  const index_t blocks = ((M + bm - 1) / bm) * ((N + bn - 1) / bn);
  require(blocks <= kMaxGridX, name + ": " + std::to_string(blocks) + " output tiles exceed the 2^31 - 1 blocks of a "
                                          "CUDA grid; split the batch");
  return dim3(static_cast<unsigned>(blocks));
}

template <class T, class OpA, class OpB, class Epi>
void run_gemm(const OpA& a, const OpB& b, const Epi& epi, index_t M, index_t N, index_t K, cudaStream_t stream,
              const char* name) {
  const std::string n = name;
  require(M > 0 && N > 0 && K > 0, n + ": M, N, K must be positive");
  require(M < (index_t{1} << 31) && N < (index_t{1} << 31) && K < (index_t{1} << 31), n + ": sizes exceed int32");
  require(N % 2 == 0, n + ": N must be even (the epilogue stores pairs)");
  a.validate(M, K, kTensorCores<T>, n + " operand A");
  b.validate(N, K, kTensorCores<T>, n + " operand B");
  epi.validate(n);
  if constexpr (kTensorCores<T>) {
    using Cfg = TileConfig128x128;
    constexpr int kSmem = Cfg::kStages * (Cfg::kBM + Cfg::kBN) * Cfg::kBK * 2;  // 2 bytes per element
    const dim3 grid = grid_for(M, N, Cfg::kBM, Cfg::kBN, n);
    auto kernel = gemm_tc_kernel<Cfg, T, OpA, OpB, Epi>;
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem),
               "cudaFuncSetAttribute(gemm_tc_kernel)");
    kernel<<<grid, Cfg::kThreads, kSmem, stream>>>(a, b, epi, static_cast<int>(M), static_cast<int>(N),
                                                    static_cast<int>(K));
  } else {
    const dim3 grid = grid_for(M, N, SimtConfig::kBM, SimtConfig::kBN, n);
    gemm_simt_kernel<T><<<grid, SimtConfig::kThreads, 0, stream>>>(a, b, epi, static_cast<int>(M),
                                                                  static_cast<int>(N), static_cast<int>(K));
  }
  check_launch(name);
}

// Row splits of a column sum: at least kColsumMinRows rows each (32 loads per thread), at most
// kColsumMaxSplits, and as many as the caller's scratch (scratch_floats fp32) holds rows of.
constexpr index_t kColsumMinRows = 256;
constexpr index_t kColsumMaxSplits = 64;

inline void check_colsum_scratch(uintptr_t scratch, index_t scratch_floats, index_t cols, const std::string& name) {
  require(scratch != 0 && scratch_floats >= cols, name + ": the fp32 scratch must hold at least one row of " +
                                                      std::to_string(cols) + " column sums, got " +
                                                      std::to_string(scratch_floats) + " floats");
  require(scratch % 4 == 0, name + ": the fp32 scratch must be 4-byte aligned");
}

// Pass 2 alone: out[col] = the sum of `splits` rows of fp32 partial sums (row stride ld) in scratch.
template <class T>
void run_colsum_finish(const float* scratch, T* out, index_t splits, index_t cols, index_t ld, cudaStream_t stream,
                       const char* name) {
  colsum_finish_kernel<T><<<static_cast<unsigned>((cols + 255) / 256), 256, 0, stream>>>(
      scratch, out, static_cast<int>(splits), static_cast<int>(cols), static_cast<int>(ld));
  check_launch(name);
}

template <class T, class Op>
void run_colsum(const Op& src, T* out, index_t rows, index_t cols, float* scratch, index_t scratch_floats,
                cudaStream_t stream, const char* name) {
  check_colsum_scratch(reinterpret_cast<uintptr_t>(scratch), scratch_floats, cols, name);
  const index_t splits = std::max<index_t>(
      1, std::min({kColsumMaxSplits, rows / kColsumMinRows, scratch_floats / cols}));
  const index_t rows_per_split = (rows + splits - 1) / splits;
  const dim3 grid(static_cast<unsigned>((cols + 31) / 32), static_cast<unsigned>(splits));
  colsum_partial_kernel<T><<<grid, dim3(32, 8), 0, stream>>>(src, scratch, static_cast<int>(rows),
                                                             static_cast<int>(cols), static_cast<int>(rows_per_split));
  check_launch(name);
  run_colsum_finish(scratch, out, splits, cols, cols, stream, name);
}

template <class T>
const T* in(uintptr_t p) {
  return reinterpret_cast<const T*>(p);
}
template <class T>
T* out(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}
inline cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

// Shape checks shared by the op launchers; all run before any CUDA call.
inline void check_dtype(int code) {
  require(code >= 0 && code <= 2, "unknown dtype code " + std::to_string(code) + " (0 fp32, 1 fp16, 2 bf16)");
}

inline void check_channels(const char* name, index_t c) {
  require(c > 0 && c % 8 == 0, std::string(name) + "=" + std::to_string(c) + " must be a positive multiple of 8");
}

inline int check_qkv_shape(index_t batch, index_t tokens, index_t channels, index_t heads) {
  require(batch > 0 && tokens > 0, "batch and tokens must be positive");
  check_channels("C", channels);
  require(heads > 0 && channels % heads == 0,
          "C=" + std::to_string(channels) + " must be divisible by num_heads=" + std::to_string(heads));
  const index_t d = channels / heads;
  require(d % 8 == 0, "head dim D=C/num_heads=" + std::to_string(d) + " must be a multiple of 8");
  require(batch * tokens < (index_t{1} << 31), "B*N exceeds int32");
  return static_cast<int>(d);
}

// ====================================================================================================
// the Hopper path's element-wise passes (the GEMMs themselves are CUTLASS's, gemm_sm90_impl.cuh)
// ====================================================================================================
// act (M, Hd) = gelu(hidden): the operand dfc2_weight = dy^T @ act needs, recomputed in backward (CUTLASS's
// d-activation epilogue writes dhidden alone). 8 elements (16 bytes) per thread.
template <class T>
__global__ void __launch_bounds__(256) gelu_rows_kernel(const T* hidden, index_t ldh, T* act, int M, int Hd,
                                                        bool tanh_form) {
  const index_t chunk = static_cast<index_t>(blockIdx.x) * 256 + threadIdx.x;
  const int chunks_per_row = Hd / 8;
  if (chunk >= static_cast<index_t>(M) * chunks_per_row) return;
  const int m = static_cast<int>(chunk / chunks_per_row);
  const int c = static_cast<int>(chunk - static_cast<index_t>(m) * chunks_per_row) * 8;
  const T* src = hidden + m * ldh + c;
  T* dst = act + static_cast<index_t>(m) * Hd + c;
#pragma unroll
  for (int i = 0; i < 8; i += 2) {
    const float2 h = load2(src + i);
    store2(dst + i, gelu(h.x, tanh_form), gelu(h.y, tanh_form));
  }
}

// q, k, v (B, H, N, D) contiguous from the packed product qkv (B*N, 3C): column j = (which, head, d). 8 elements
// (16 bytes; D % 8 == 0) per thread, read along a row of qkv and written inside one head's row.
template <class T>
__global__ void __launch_bounds__(256) qkv_split_kernel(const T* qkv, T* q, T* k, T* v, int tokens, int channels,
                                                        int head_dim, int heads, int rows) {
  const index_t chunk = static_cast<index_t>(blockIdx.x) * 256 + threadIdx.x;
  const int chunks_per_row = 3 * channels / 8;
  if (chunk >= static_cast<index_t>(rows) * chunks_per_row) return;
  const int m = static_cast<int>(chunk / chunks_per_row);
  const int j = static_cast<int>(chunk - static_cast<index_t>(m) * chunks_per_row) * 8;
  const int which = j / channels, c = j - which * channels;
  const int h = c / head_dim, d = c - h * head_dim;
  const int b = m / tokens, t = m - b * tokens;
  T* base = which == 0 ? q : (which == 1 ? k : v);
  const uint4 val = *reinterpret_cast<const uint4*>(qkv + static_cast<index_t>(m) * 3 * channels + j);
  *reinterpret_cast<uint4*>(base + ((static_cast<index_t>(b) * heads + h) * tokens + t) * head_dim + d) = val;
}

inline unsigned chunk_blocks(index_t rows, index_t cols, const std::string& name) {
  const index_t blocks = (rows * (cols / 8) + 255) / 256;
  require(blocks <= kMaxGridX, name + ": too many elements for one grid");
  return static_cast<unsigned>(blocks);
}

// The sm_90a GEMMs take fp16 / bf16 only: checked first, with the shapes.
inline void check_half(int dtype, const std::string& name) {
  require(dtype == static_cast<int>(DType::kFloat16) || dtype == static_cast<int>(DType::kBFloat16),
          name + ": the sm_90a GEMMs take fp16 or bf16, got dtype code " + std::to_string(dtype));
}

// What every sm_90a op launcher checks first, before its operands: a known dtype, 0 < M < 2^31, each channel size
// a positive multiple of 8, and a 16-bit dtype (the sm_90a GEMMs have no fp32 instantiation).
inline void check_sm90_sizes(int dtype, index_t M, std::initializer_list<std::pair<const char*, index_t>> channels,
                             const std::string& name) {
  check_dtype(dtype);
  require(M > 0 && M < (index_t{1} << 31), "M must be positive and below 2^31");
  for (const auto& [channel, size] : channels) check_channels(channel, size);
  check_half(dtype, name);
}

// Checked after the operands, before the first launch: this build has the sm_90a GEMMs, and the current device is
// compute capability 9.0 exactly (an sm_90a cubin loads nowhere else).
inline void check_sm90_device(const std::string& name) {
#if !defined(VK_HAVE_SM90_GEMM)
  throw std::runtime_error(name + ": this build has no sm_90a GEMMs (" VK_SM90_GEMM ")");
#else
  int device = 0, major = 0, minor = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), "cudaDeviceGetAttribute");
  check_cuda(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device), "cudaDeviceGetAttribute");
  require(major == 9 && minor == 0, name + ": the sm_90a GEMMs need compute capability 9.0, this device is " +
                                        std::to_string(major) + "." + std::to_string(minor));
#endif
}

// The 16-bit dtypes as a compile-time switch (the sm_90a GEMMs have no fp32 instantiation).
template <class F>
void dispatch_half(int code, F&& f) {
  if (code == static_cast<int>(DType::kFloat16)) {
    f(__half{});
  } else {
    f(__nv_bfloat16{});
  }
}

}  // namespace gemm

// ----------------------------------------------------------------------------------------------------
// op launchers (bound in bind_gemm.cpp). Pointers are device addresses as integers; "ld" arguments are
// row strides in elements of 2-D row-major (unit column stride) matrices; outputs are contiguous.
// ----------------------------------------------------------------------------------------------------
using gemm::index_t;

// q, k, v (B, H, N, D) = split(x (B*N, C) @ w (3C, C)^T + bias (3C,) or 0).
void gemm_qkv_fwd(uintptr_t x, index_t ldx, uintptr_t w, index_t ldw, uintptr_t bias, uintptr_t q, uintptr_t k,
                  uintptr_t v, index_t batch, index_t tokens, index_t channels, index_t heads, int dtype,
                  uintptr_t stream) {
  using namespace gemm;
  check_dtype(dtype);
  const int d = check_qkv_shape(batch, tokens, channels, heads);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const Strided<T, true> a{in<T>(x), ldx, 1};
    const Strided<T, true> b{in<T>(w), ldw, 1};
    const EpiQkvSplit<T> epi{out<T>(q), out<T>(k), out<T>(v), in<T>(bias), static_cast<int>(tokens),
                             static_cast<int>(channels), d, static_cast<int>(heads)};
    run_gemm<T>(a, b, epi, batch * tokens, 3 * channels, channels, as_stream(stream), "qkv_fwd gemm_kernel");
  });
}

// From dq, dk, dv (B, H, N, D) sharing strides (s_b, s_h, s_t, 1):
//   dx (B*N, C) = dQKV @ w,  dw (3C, C) = dQKV^T @ x,  dbias (3C,) = column sums of dQKV (if dbias != 0),
//   through `scratch` (scratch_floats fp32, >= 3C; ignored without dbias).
void gemm_qkv_bwd(uintptr_t dq, uintptr_t dk, uintptr_t dv, index_t s_b, index_t s_h, index_t s_t, uintptr_t x,
                  index_t ldx, uintptr_t w, index_t ldw, uintptr_t dx, uintptr_t dw, uintptr_t dbias,
                  uintptr_t scratch, index_t scratch_floats, index_t batch, index_t tokens, index_t channels,
                  index_t heads, int dtype, uintptr_t stream) {
  using namespace gemm;
  check_dtype(dtype);
  const int d = check_qkv_shape(batch, tokens, channels, heads);
  const index_t M = batch * tokens;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const int n_tok = static_cast<int>(tokens), c = static_cast<int>(channels);
    const QkvGrad<T, true> dqkv{in<T>(dq), in<T>(dk), in<T>(dv), s_b, s_h, s_t, n_tok, c, d};
    const QkvGrad<T, false> dqkv_t{in<T>(dq), in<T>(dk), in<T>(dv), s_b, s_h, s_t, n_tok, c, d};
    // Validate every GEMM's operands before launching the first, so a bad call launches nothing.
    const Strided<T, false> w_t{in<T>(w), 1, ldw};  // B[c, j] = w[j, c]
    const Strided<T, false> x_t{in<T>(x), 1, ldx};  // B[c, m] = x[m, c]
    const bool vec = kTensorCores<T>;
    dqkv.validate(M, 3 * channels, vec, "qkv_bwd dQKV");
    dqkv_t.validate(3 * channels, M, vec, "qkv_bwd dQKV^T");
    w_t.validate(channels, 3 * channels, vec, "qkv_bwd weight");
    x_t.validate(channels, M, vec, "qkv_bwd x");
    const EpiStore<T> dx_epi{out<T>(dx), channels}, dw_epi{out<T>(dw), channels};
    dx_epi.validate("qkv_bwd dx");
    dw_epi.validate("qkv_bwd dweight");
    if (dbias != 0) check_colsum_scratch(scratch, scratch_floats, 3 * channels, "qkv_bwd dbias");
    run_gemm<T>(dqkv, w_t, dx_epi, M, channels, 3 * channels, as_stream(stream), "qkv_bwd dx gemm_kernel");
    run_gemm<T>(dqkv_t, x_t, dw_epi, 3 * channels, channels, M, as_stream(stream), "qkv_bwd dweight gemm_kernel");
    if (dbias != 0) {
      run_colsum(dqkv, out<T>(dbias), M, 3 * channels, reinterpret_cast<float*>(scratch), scratch_floats,
                 as_stream(stream), "qkv_bwd dbias colsum");
    }
  });
}

// hidden (M, Hd) = x (M, C) @ w1 (Hd, C)^T + b1;  act (M, Hd) = gelu(hidden);
// y (M, Cout) = act @ w2 (Cout, Hd)^T + b2 + res (M, Cout) with row stride ld_res (the block's residual add).
// act is caller-provided scratch. b1 / b2 / res may be 0 (none); hidden may be 0: not stored (no autograd).
void gemm_mlp_fwd(uintptr_t x, index_t ldx, uintptr_t w1, index_t ldw1, uintptr_t b1, uintptr_t w2, index_t ldw2,
                  uintptr_t b2, uintptr_t res, index_t ld_res, uintptr_t hidden, uintptr_t act, uintptr_t y,
                  index_t M, index_t C, index_t Hd, index_t Cout, bool tanh_form, int dtype, uintptr_t stream) {
  using namespace gemm;
  check_dtype(dtype);
  require(M > 0, "M must be positive");
  check_channels("C", C);
  check_channels("hidden", Hd);
  check_channels("C_out", Cout);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const Strided<T, true> x_op{in<T>(x), ldx, 1};
    const Strided<T, true> w1_op{in<T>(w1), ldw1, 1};
    const Strided<T, true> act_op{in<T>(act), Hd, 1};
    const Strided<T, true> w2_op{in<T>(w2), ldw2, 1};
    const bool vec = kTensorCores<T>;
    act_op.validate(M, Hd, vec, "mlp_fwd act");
    w2_op.validate(Cout, Hd, vec, "mlp_fwd fc2_weight");
    const EpiBiasGelu<T> fc1_epi{out<T>(hidden), out<T>(act), Hd, in<T>(b1), tanh_form};
    const EpiBias<T> fc2_epi{out<T>(y), Cout, in<T>(b2), in<T>(res), ld_res};
    fc1_epi.validate("mlp_fwd fc1");
    fc2_epi.validate("mlp_fwd fc2");
    run_gemm<T>(x_op, w1_op, fc1_epi, M, Hd, C, as_stream(stream), "mlp_fwd fc1 gemm_kernel");
    run_gemm<T>(act_op, w2_op, fc2_epi, M, Cout, Hd, as_stream(stream), "mlp_fwd fc2 gemm_kernel");
  });
}

// dhidden (M, Hd) = (dy (M, Cout) @ w2 (Cout, Hd)) * gelu'(hidden), act = gelu(hidden) (scratch);
// dw2 (Cout, Hd) = dy^T @ act;  dw1 (Hd, C) = dhidden^T @ x;  dx (M, C) = dhidden @ w1 (Hd, C);
// db2 = colsum(dy), db1 = colsum(dhidden) when their pointers are non-zero, one after the other through
// `scratch` (scratch_floats fp32, >= the larger of Hd and Cout; ignored without biases).
void gemm_mlp_bwd(uintptr_t dy, index_t ldy, uintptr_t x, index_t ldx, uintptr_t w1, index_t ldw1, uintptr_t w2,
                  index_t ldw2, uintptr_t hidden, index_t ldh, uintptr_t dhidden, uintptr_t act, uintptr_t dx,
                  uintptr_t dw1, uintptr_t db1, uintptr_t dw2, uintptr_t db2, uintptr_t scratch,
                  index_t scratch_floats, index_t M, index_t C, index_t Hd, index_t Cout, bool tanh_form, int dtype,
                  uintptr_t stream) {
  using namespace gemm;
  check_dtype(dtype);
  require(M > 0, "M must be positive");
  check_channels("C", C);
  check_channels("hidden", Hd);
  check_channels("C_out", Cout);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const cudaStream_t s = as_stream(stream);
    const Strided<T, true> dy_op{in<T>(dy), ldy, 1};
    const Strided<T, false> w2_t{in<T>(w2), 1, ldw2};  // B[h, o] = w2[o, h]
    const Strided<T, false> dy_t{in<T>(dy), 1, ldy};   // A[o, m] = dy[m, o]
    const Strided<T, false> act_t{in<T>(act), 1, Hd};  // B[h, m] = act[m, h]
    const Strided<T, false> dh_t{in<T>(dhidden), 1, Hd};
    const Strided<T, false> x_t{in<T>(x), 1, ldx};
    const Strided<T, true> dh_op{in<T>(dhidden), Hd, 1};
    const Strided<T, false> w1_t{in<T>(w1), 1, ldw1};  // B[c, h] = w1[h, c]
    const bool vec = kTensorCores<T>;
    dy_op.validate(M, Cout, vec, "mlp_bwd dy");
    w2_t.validate(Hd, Cout, vec, "mlp_bwd fc2_weight");
    dy_t.validate(Cout, M, vec, "mlp_bwd dy^T");
    act_t.validate(Hd, M, vec, "mlp_bwd act");
    dh_t.validate(Hd, M, vec, "mlp_bwd dhidden^T");
    x_t.validate(C, M, vec, "mlp_bwd x");
    dh_op.validate(M, Hd, vec, "mlp_bwd dhidden");
    w1_t.validate(C, Hd, vec, "mlp_bwd fc1_weight");
    const EpiDGelu<T> dh_epi{out<T>(dhidden), out<T>(act), Hd, in<T>(hidden), ldh, tanh_form};
    const EpiStore<T> dw2_epi{out<T>(dw2), Hd}, dw1_epi{out<T>(dw1), C}, dx_epi{out<T>(dx), C};
    dh_epi.validate("mlp_bwd");
    dw2_epi.validate("mlp_bwd dfc2_weight");
    dw1_epi.validate("mlp_bwd dfc1_weight");
    dx_epi.validate("mlp_bwd dx");
    if (db2 != 0) check_colsum_scratch(scratch, scratch_floats, Cout, "mlp_bwd dfc2_bias");
    if (db1 != 0) check_colsum_scratch(scratch, scratch_floats, Hd, "mlp_bwd dfc1_bias");
    run_gemm<T>(dy_op, w2_t, dh_epi, M, Hd, Cout, s, "mlp_bwd dhidden gemm_kernel");
    run_gemm<T>(dy_t, act_t, dw2_epi, Cout, Hd, M, s, "mlp_bwd dfc2_weight gemm_kernel");
    run_gemm<T>(dh_t, x_t, dw1_epi, Hd, C, M, s, "mlp_bwd dfc1_weight gemm_kernel");
    run_gemm<T>(dh_op, w1_t, dx_epi, M, C, Hd, s, "mlp_bwd dx gemm_kernel");
    float* sums = reinterpret_cast<float*>(scratch);
    if (db2 != 0) run_colsum(dy_op, out<T>(db2), M, Cout, sums, scratch_floats, s, "mlp_bwd dfc2_bias colsum");
    if (db1 != 0) run_colsum(dh_op, out<T>(db1), M, Hd, sums, scratch_floats, s, "mlp_bwd dfc1_bias colsum");
  });
}

// out (M, N) = a (M, K) @ w (N, K)^T + bias (N,) + res (M, N) with row stride ld_res; bias / res may be 0 (none).
// The projection of the block ops (proj_residual) and fused_qkv's packed (B*N, 3C) forward.
void gemm_linear_fwd(uintptr_t a, index_t lda, uintptr_t w, index_t ldw, uintptr_t bias, uintptr_t res,
                     index_t ld_res, uintptr_t out_ptr, index_t ldo, index_t M, index_t N, index_t K, int dtype,
                     uintptr_t stream) {
  using namespace gemm;
  check_dtype(dtype);
  require(M > 0 && M < (index_t{1} << 31), "M must be positive and below 2^31");
  check_channels("N", N);
  check_channels("K", K);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const Strided<T, true> a_op{in<T>(a), lda, 1};
    const Strided<T, true> w_op{in<T>(w), ldw, 1};
    const bool vec = kTensorCores<T>;
    a_op.validate(M, K, vec, "linear_fwd a");
    w_op.validate(N, K, vec, "linear_fwd weight");
    const EpiBias<T> epi{out<T>(out_ptr), ldo, in<T>(bias), in<T>(res), ld_res};
    epi.validate("linear_fwd");
    run_gemm<T>(a_op, w_op, epi, M, N, K, as_stream(stream), "linear_fwd gemm_kernel");
  });
}

// The backward of out = a @ w^T + bias: da (M, K) = dout (M, N) @ w (N, K);  dw (N, K) = dout^T @ a;
// dbias (N,) = column sums of dout (if dbias != 0) through `scratch` (scratch_floats fp32, >= N).
void gemm_linear_bwd(uintptr_t dout, index_t ld_dout, uintptr_t a, index_t lda, uintptr_t w, index_t ldw,
                     uintptr_t da, uintptr_t dw, uintptr_t dbias, uintptr_t scratch, index_t scratch_floats,
                     index_t M, index_t N, index_t K, int dtype, uintptr_t stream) {
  using namespace gemm;
  check_dtype(dtype);
  require(M > 0 && M < (index_t{1} << 31), "M must be positive and below 2^31");
  check_channels("N", N);
  check_channels("K", K);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const cudaStream_t s = as_stream(stream);
    const Strided<T, true> dout_op{in<T>(dout), ld_dout, 1};
    const Strided<T, false> w_t{in<T>(w), 1, ldw};        // B[k, n] = w[n, k]
    const Strided<T, false> dout_t{in<T>(dout), 1, ld_dout};  // A[n, m] = dout[m, n]
    const Strided<T, false> a_t{in<T>(a), 1, lda};        // B[k, m] = a[m, k]
    const bool vec = kTensorCores<T>;
    dout_op.validate(M, N, vec, "linear_bwd dout");
    w_t.validate(K, N, vec, "linear_bwd weight");
    dout_t.validate(N, M, vec, "linear_bwd dout^T");
    a_t.validate(K, M, vec, "linear_bwd a");
    const EpiStore<T> da_epi{out<T>(da), K}, dw_epi{out<T>(dw), K};
    da_epi.validate("linear_bwd da");
    dw_epi.validate("linear_bwd dweight");
    if (dbias != 0) check_colsum_scratch(scratch, scratch_floats, N, "linear_bwd dbias");
    run_gemm<T>(dout_op, w_t, da_epi, M, K, N, s, "linear_bwd da gemm_kernel");
    run_gemm<T>(dout_t, a_t, dw_epi, N, K, M, s, "linear_bwd dweight gemm_kernel");
    if (dbias != 0) {
      run_colsum(dout_op, out<T>(dbias), M, N, reinterpret_cast<float*>(scratch), scratch_floats, s,
                 "linear_bwd dbias colsum");
    }
  });
}

// ----------------------------------------------------------------------------------------------------
// op launchers on the Hopper GEMMs (sm_90a, CUTLASS): the same products as above, every 2-D operand a row-major
// matrix with unit column stride, 16-byte aligned rows and K % 8 == 0 (TMA). Bias sums and the element-wise
// passes are this file's kernels. Built in every configuration; without CUTLASS they raise (check_sm90_device).
// ----------------------------------------------------------------------------------------------------
#if defined(VK_HAVE_SM90_GEMM)
#define VK_SM90_CALL(call) call
#else
#define VK_SM90_CALL(call) (void)0
#endif

namespace gemm {
// d = a @ w^T + bias [+ res]: the one place that picks linear_bias or linear_bias_residual (res == nullptr: none).
template <class T>
void sm90_linear(const T* a, index_t lda, const T* w, index_t ldw, const T* bias, const T* res, index_t ld_res, T* d,
                 index_t ldd, int M, int N, int K, cudaStream_t s) {
  if (res != nullptr) {
    VK_SM90_CALL((sm90::linear_bias_residual<T>(a, lda, w, ldw, bias, res, ld_res, d, ldd, M, N, K, s)));
  } else {
    VK_SM90_CALL((sm90::linear_bias<T>(a, lda, w, ldw, bias, d, ldd, M, N, K, s)));
  }
}
}  // namespace gemm

// qkv (B*N, 3C) = x @ w^T + bias (scratch), then split into q, k, v (B, H, N, D) contiguous.
void gemm_qkv_fwd_sm90(uintptr_t x, index_t ldx, uintptr_t w, index_t ldw, uintptr_t bias, uintptr_t qkv,
                       uintptr_t q, uintptr_t k, uintptr_t v, index_t batch, index_t tokens, index_t channels,
                       index_t heads, int dtype, uintptr_t stream) {
  using namespace gemm;
  check_dtype(dtype);
  const int d = check_qkv_shape(batch, tokens, channels, heads);
  const index_t M = batch * tokens;
  check_half(dtype, "qkv_fwd_sm90");
  dispatch_half(dtype, [&](auto tag) {
    using T = decltype(tag);
    Strided<T, true>{in<T>(x), ldx, 1}.validate(M, channels, true, "qkv_fwd_sm90 x");
    Strided<T, true>{in<T>(w), ldw, 1}.validate(3 * channels, channels, true, "qkv_fwd_sm90 weight");
    Strided<T, true>{in<T>(qkv), 3 * channels, 1}.validate(M, 3 * channels, true, "qkv_fwd_sm90 qkv scratch");
    for (uintptr_t p : {q, k, v}) require(p % 16 == 0, "qkv_fwd_sm90: q, k, v must be 16-byte aligned");
    require(bias % 16 == 0, "qkv_fwd_sm90: the bias must be 16-byte aligned (read in 16-byte row broadcasts)");
    check_sm90_device("qkv_fwd_sm90");
    const cudaStream_t s = as_stream(stream);
    VK_SM90_CALL((sm90::linear_bias<T>(in<T>(x), ldx, in<T>(w), ldw, in<T>(bias), out<T>(qkv), 3 * channels,
                                       static_cast<int>(M), static_cast<int>(3 * channels),
                                       static_cast<int>(channels), s)));
    qkv_split_kernel<T><<<chunk_blocks(M, 3 * channels, "qkv_fwd_sm90 split"), 256, 0, s>>>(
        in<T>(qkv), out<T>(q), out<T>(k), out<T>(v), static_cast<int>(tokens), static_cast<int>(channels), d,
        static_cast<int>(heads), static_cast<int>(M));
    check_launch("qkv_fwd_sm90 split");
  });
}

// As gemm_mlp_fwd: fc1 with the bias + GELU + aux epilogue (hidden is the aux, act the output; hidden 0: the
// product without the aux store), fc2 with bias.
void gemm_mlp_fwd_sm90(uintptr_t x, index_t ldx, uintptr_t w1, index_t ldw1, uintptr_t b1, uintptr_t w2,
                       index_t ldw2, uintptr_t b2, uintptr_t res, index_t ld_res, uintptr_t hidden, uintptr_t act,
                       uintptr_t y, index_t M, index_t C, index_t Hd, index_t Cout, bool tanh_form, int dtype,
                       uintptr_t stream) {
  using namespace gemm;
  check_sm90_sizes(dtype, M, {{"C", C}, {"hidden", Hd}, {"C_out", Cout}}, "mlp_fwd_sm90");
  dispatch_half(dtype, [&](auto tag) {
    using T = decltype(tag);
    Strided<T, true>{in<T>(x), ldx, 1}.validate(M, C, true, "mlp_fwd_sm90 x");
    Strided<T, true>{in<T>(w1), ldw1, 1}.validate(Hd, C, true, "mlp_fwd_sm90 fc1_weight");
    Strided<T, true>{in<T>(w2), ldw2, 1}.validate(Cout, Hd, true, "mlp_fwd_sm90 fc2_weight");
    if (hidden != 0) Strided<T, true>{in<T>(hidden), Hd, 1}.validate(M, Hd, true, "mlp_fwd_sm90 hidden");
    Strided<T, true>{in<T>(act), Hd, 1}.validate(M, Hd, true, "mlp_fwd_sm90 act");
    Strided<T, true>{in<T>(y), Cout, 1}.validate(M, Cout, true, "mlp_fwd_sm90 y");
    if (res != 0) Strided<T, true>{in<T>(res), ld_res, 1}.validate(M, Cout, true, "mlp_fwd_sm90 residual");
    require(b1 % 16 == 0 && b2 % 16 == 0, "mlp_fwd_sm90: biases must be 16-byte aligned (16-byte row broadcasts)");
    check_sm90_device("mlp_fwd_sm90");
    const cudaStream_t s = as_stream(stream);
    [[maybe_unused]] const int m = static_cast<int>(M), c = static_cast<int>(C), hd = static_cast<int>(Hd);
    VK_SM90_CALL((sm90::linear_bias_gelu<T>(in<T>(x), ldx, in<T>(w1), ldw1, in<T>(b1), out<T>(hidden), Hd,
                                            out<T>(act), Hd, m, hd, c, tanh_form, s)));
    sm90_linear<T>(in<T>(act), Hd, in<T>(w2), ldw2, in<T>(b2), in<T>(res), ld_res, out<T>(y), Cout, m,
                   static_cast<int>(Cout), hd, s);
  });
}

namespace gemm {
// The operands of one sm_90a linear layer (linear_fwd_sm90 and its configuration variants): a (M, K), w (N, K),
// out (M, N), the residual (M, N) when res != 0, the bias's 16-byte alignment; then the device.
template <class T>
void check_sm90_linear(uintptr_t a, index_t lda, uintptr_t w, index_t ldw, uintptr_t bias, uintptr_t res,
                       index_t ld_res, uintptr_t out_ptr, index_t ldo, index_t M, index_t N, index_t K,
                       const std::string& name) {
  Strided<T, true>{in<T>(a), lda, 1}.validate(M, K, true, name + " a");
  Strided<T, true>{in<T>(w), ldw, 1}.validate(N, K, true, name + " weight");
  Strided<T, true>{in<T>(out_ptr), ldo, 1}.validate(M, N, true, name + " output");
  if (res != 0) Strided<T, true>{in<T>(res), ld_res, 1}.validate(M, N, true, name + " residual");
  require(bias % 16 == 0, name + ": the bias must be 16-byte aligned (read in 16-byte row broadcasts)");
  check_sm90_device(name);
}
}  // namespace gemm

// As gemm_linear_fwd, on the sm_90a GEMMs: bias, or bias + residual as the epilogue's source.
void gemm_linear_fwd_sm90(uintptr_t a, index_t lda, uintptr_t w, index_t ldw, uintptr_t bias, uintptr_t res,
                          index_t ld_res, uintptr_t out_ptr, index_t ldo, index_t M, index_t N, index_t K, int dtype,
                          uintptr_t stream) {
  using namespace gemm;
  check_sm90_sizes(dtype, M, {{"N", N}, {"K", K}}, "linear_fwd_sm90");
  dispatch_half(dtype, [&](auto tag) {
    using T = decltype(tag);
    check_sm90_linear<T>(a, lda, w, ldw, bias, res, ld_res, out_ptr, ldo, M, N, K, "linear_fwd_sm90");
    sm90_linear<T>(in<T>(a), lda, in<T>(w), ldw, in<T>(bias), in<T>(res), ld_res, out<T>(out_ptr), ldo,
                   static_cast<int>(M), static_cast<int>(N), static_cast<int>(K), as_stream(stream));
  });
}

// As gemm_linear_fwd_sm90 without the residual, on a configuration variant of linear_bias (bf16 only; see
// gemm_sm90_variants.cu): what benchmarks/probe_gemm.py times beside the shipped configuration.
void gemm_linear_fwd_sm90_variant(const std::string& variant, uintptr_t a, index_t lda, uintptr_t w, index_t ldw,
                                  uintptr_t bias, uintptr_t out_ptr, index_t ldo, index_t M, index_t N, index_t K,
                                  int dtype, uintptr_t stream) {
  using namespace gemm;
  check_sm90_sizes(dtype, M, {{"N", N}, {"K", K}}, "linear_fwd_sm90_variant");
  require(dtype == static_cast<int>(DType::kBFloat16),
          "linear_fwd_sm90_variant: the variants are built for bf16 only, got dtype code " + std::to_string(dtype));
  using T = __nv_bfloat16;
  check_sm90_linear<T>(a, lda, w, ldw, bias, 0, 0, out_ptr, ldo, M, N, K, "linear_fwd_sm90_variant");
  VK_SM90_CALL((sm90::linear_bias_variant(variant, in<T>(a), lda, in<T>(w), ldw, in<T>(bias), out<T>(out_ptr), ldo,
                                          static_cast<int>(M), static_cast<int>(N), static_cast<int>(K),
                                          as_stream(stream))));
}

// As gemm_linear_bwd, on the sm_90a GEMMs: da by the NN GEMM, dw by the stream-K GEMM, dbias by the column sum.
// Also the QKV backward on Hopper: dout = dQKV (M, 3C) (dq, dk, dv packed, or their copy), a = x, w (3C, C).
void gemm_linear_bwd_sm90(uintptr_t dout, index_t ld_dout, uintptr_t a, index_t lda, uintptr_t w, index_t ldw,
                          uintptr_t da, uintptr_t dw, uintptr_t dbias, uintptr_t scratch, index_t scratch_floats,
                          index_t M, index_t N, index_t K, int dtype, uintptr_t stream) {
  using namespace gemm;
  check_sm90_sizes(dtype, M, {{"N", N}, {"K", K}}, "linear_bwd_sm90");
  dispatch_half(dtype, [&](auto tag) {
    using T = decltype(tag);
    const Strided<T, true> g{in<T>(dout), ld_dout, 1};
    g.validate(M, N, true, "linear_bwd_sm90 dout");
    Strided<T, true>{in<T>(a), lda, 1}.validate(M, K, true, "linear_bwd_sm90 a");
    Strided<T, true>{in<T>(w), ldw, 1}.validate(N, K, true, "linear_bwd_sm90 weight");
    Strided<T, true>{in<T>(da), K, 1}.validate(M, K, true, "linear_bwd_sm90 da");
    Strided<T, true>{in<T>(dw), K, 1}.validate(N, K, true, "linear_bwd_sm90 dweight");
    if (dbias != 0) check_colsum_scratch(scratch, scratch_floats, N, "linear_bwd_sm90 dbias");
    check_sm90_device("linear_bwd_sm90");
    const cudaStream_t s = as_stream(stream);
    [[maybe_unused]] const int m = static_cast<int>(M), n = static_cast<int>(N), k = static_cast<int>(K);
    VK_SM90_CALL((sm90::matmul_nn<T>(in<T>(dout), ld_dout, in<T>(w), ldw, out<T>(da), K, m, k, n, s)));
    VK_SM90_CALL((sm90::matmul_tn_wgrad<T>(in<T>(dout), ld_dout, in<T>(a), lda, out<T>(dw), K, n, k, m, s)));
    if (dbias != 0) {
      run_colsum(g, out<T>(dbias), M, N, reinterpret_cast<float*>(scratch), scratch_floats, s,
                 "linear_bwd_sm90 dbias colsum");
    }
  });
}

// As gemm_mlp_bwd: dhidden by the d-GELU epilogue (hidden read there), the weight gradients by the stream-K GEMM,
// dx by the NN GEMM, dfc2_bias by the two-pass column sum. act = gelu(hidden): with act_in_epilogue, stored by the
// d-GELU epilogue (sm90::dgelu_act), else by a row pass over hidden. dfc1_bias: with dfc1_bias_in_epilogue, from the
// d-GELU epilogue's per-tile partial sums (into the scratch, which then holds sm90::DGeluColSumsFloats(M, Hd) floats
// at least) and one finishing pass, else by the two-pass column sum of dhidden.
void gemm_mlp_bwd_sm90(uintptr_t dy, index_t ldy, uintptr_t x, index_t ldx, uintptr_t w1, index_t ldw1, uintptr_t w2,
                       index_t ldw2, uintptr_t hidden, index_t ldh, uintptr_t dhidden, uintptr_t act, uintptr_t dx,
                       uintptr_t dw1, uintptr_t db1, uintptr_t dw2, uintptr_t db2, uintptr_t scratch,
                       index_t scratch_floats, index_t M, index_t C, index_t Hd, index_t Cout, bool tanh_form,
                       bool act_in_epilogue, bool dfc1_bias_in_epilogue, int dtype, uintptr_t stream) {
  using namespace gemm;
  check_sm90_sizes(dtype, M, {{"C", C}, {"hidden", Hd}, {"C_out", Cout}}, "mlp_bwd_sm90");
  dispatch_half(dtype, [&](auto tag) {
    using T = decltype(tag);
    const Strided<T, true> dy_op{in<T>(dy), ldy, 1}, dh_op{in<T>(dhidden), Hd, 1};
    dy_op.validate(M, Cout, true, "mlp_bwd_sm90 dy");
    Strided<T, true>{in<T>(x), ldx, 1}.validate(M, C, true, "mlp_bwd_sm90 x");
    Strided<T, true>{in<T>(w1), ldw1, 1}.validate(Hd, C, true, "mlp_bwd_sm90 fc1_weight");
    Strided<T, true>{in<T>(w2), ldw2, 1}.validate(Cout, Hd, true, "mlp_bwd_sm90 fc2_weight");
    Strided<T, true>{in<T>(hidden), ldh, 1}.validate(M, Hd, true, "mlp_bwd_sm90 hidden");
    dh_op.validate(M, Hd, true, "mlp_bwd_sm90 dhidden");
    Strided<T, true>{in<T>(act), Hd, 1}.validate(M, Hd, true, "mlp_bwd_sm90 act");
    Strided<T, true>{in<T>(dx), C, 1}.validate(M, C, true, "mlp_bwd_sm90 dx");
    Strided<T, true>{in<T>(dw1), C, 1}.validate(Hd, C, true, "mlp_bwd_sm90 dfc1_weight");
    Strided<T, true>{in<T>(dw2), Hd, 1}.validate(Cout, Hd, true, "mlp_bwd_sm90 dfc2_weight");
    if (db2 != 0) check_colsum_scratch(scratch, scratch_floats, Cout, "mlp_bwd_sm90 dfc2_bias");
    const bool partials = db1 != 0 && dfc1_bias_in_epilogue;
    if (partials) {
      const index_t need = sm90::DGeluColSumsFloats(M, Hd);
      require(scratch != 0 && scratch_floats >= need && scratch % 16 == 0,
              "mlp_bwd_sm90 dfc1_bias: the d-GELU epilogue's partial sums need a 16-byte aligned fp32 scratch of "
              "ceil(M / " + std::to_string(sm90::kTileM) + ") x (hidden rounded up to " +
              std::to_string(sm90::kTileN) + ") = " + std::to_string(need) + " floats, got " +
              std::to_string(scratch_floats));
    } else if (db1 != 0) {
      check_colsum_scratch(scratch, scratch_floats, Hd, "mlp_bwd_sm90 dfc1_bias");
    }
    check_sm90_device("mlp_bwd_sm90");
    const cudaStream_t s = as_stream(stream);
    [[maybe_unused]] const int m = static_cast<int>(M), c = static_cast<int>(C), hd = static_cast<int>(Hd);
    [[maybe_unused]] const int co = static_cast<int>(Cout);
    float* sums = reinterpret_cast<float*>(scratch);
    if (act_in_epilogue || partials) {
      VK_SM90_CALL((sm90::dgelu_act<T>(in<T>(dy), ldy, in<T>(w2), ldw2, in<T>(hidden), ldh, out<T>(dhidden), Hd,
                                       act_in_epilogue ? out<T>(act) : nullptr, Hd, partials ? sums : nullptr, m, hd,
                                       co, tanh_form, s)));
    } else {
      VK_SM90_CALL((sm90::dgelu<T>(in<T>(dy), ldy, in<T>(w2), ldw2, in<T>(hidden), ldh, out<T>(dhidden), Hd, m, hd,
                                   co, tanh_form, s)));
    }
    if (partials) {  // summed now: the scratch is dfc2_bias's next
      run_colsum_finish(sums, out<T>(db1), (M + sm90::kTileM - 1) / sm90::kTileM, Hd, sm90::DGeluColSumsLd(Hd), s,
                        "mlp_bwd_sm90 dfc1_bias: sum of the d-GELU epilogue's partial sums");
    }
    if (!act_in_epilogue) {
      gelu_rows_kernel<T><<<chunk_blocks(M, Hd, "mlp_bwd_sm90 act"), 256, 0, s>>>(in<T>(hidden), ldh, out<T>(act),
                                                                                    m, hd, tanh_form);
      check_launch("mlp_bwd_sm90 act");
    }
    VK_SM90_CALL((sm90::matmul_tn_wgrad<T>(in<T>(dy), ldy, in<T>(act), Hd, out<T>(dw2), Hd, co, hd, m, s)));
    VK_SM90_CALL((sm90::matmul_tn_wgrad<T>(in<T>(dhidden), Hd, in<T>(x), ldx, out<T>(dw1), C, hd, c, m, s)));
    VK_SM90_CALL((sm90::matmul_nn<T>(in<T>(dhidden), Hd, in<T>(w1), ldw1, out<T>(dx), C, m, c, hd, s)));
    if (db2 != 0) run_colsum(dy_op, out<T>(db2), M, Cout, sums, scratch_floats, s, "mlp_bwd_sm90 dfc2_bias colsum");
    if (db1 != 0 && !partials) {
      run_colsum(dh_op, out<T>(db1), M, Hd, sums, scratch_floats, s, "mlp_bwd_sm90 dfc1_bias colsum");
    }
  });
}

}  // namespace vk
