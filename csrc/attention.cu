// Flash attention (FlashAttention-2 style), forward and deterministic backward, without an N x N matrix.
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
//   attn_fwd_kernel      out (B, N, H, D memory) and lse (B, H, N) = natural-log log-sum-exp of each row
//   attn_delta_kernel    delta (B, H, N) = rowsum(dO * O), fp32 (backward preprocess, every dtype)
//   attn_dkdv_kernel     a block owns 64 keys and loops over query tiles: dV = P^T dO, dK = scale dS^T Q
//   attn_dq_kernel       a block owns 64 queries and loops over key tiles: dQ = scale dS K
//   attn_*_simt_kernel   the same three products for fp32
// dK dV and dQ each own their outputs (no atomics), so the backward is deterministic.
//
// Masking: rows (queries) and columns (keys) >= N are zero-filled by cp.async and never stored; scores of
// keys >= N are -inf before the row max (forward) and P = 0 for keys or queries >= N (backward). Every row
// has at least one valid key, but the softmax still guards a row whose running max is -inf (no NaN).
//
// Memory layout: q, k, v, out, dout are (B, H, N, D) with any (B, H, N) strides and unit stride along D;
// 16-bit inputs also need 16-byte aligned pointers and strides that are multiples of 8 elements (16-byte
// cp.async). The launchers check this; vit_kernels/cuda/attention.py copies inputs that break it.
// dq, dk, dv, lse and delta are contiguous.
//
// Instantiated: {fp16, bf16} x D in {32, 48, 64, 80, 96, 128} x {fwd, dkdv, dq} tensor-core kernels,
// delta for {fp32, fp16, bf16}, and the fp32 SIMT kernels (runtime D <= 128).
// To add a head dim: a multiple of 16 up to 128, as a case in dispatch_head_dim (and in dispatch.py).
// To add a tile shape: the traits structs FwdTile / DkdvTile / DqTile.
//
// Sections: dtype + PTX helpers | shared-memory tiles and warp GEMMs | kernels | launchers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

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
// delta = rowsum(dO * O). dq = sum_j dS_j k_j cancels, so it amplifies any disagreement: fp32 dq was 4e-4 instead
// of 1e-5 at logits ~ -144 on an H100 while the backward fused S * scale - lse.
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
  T *dq, *dk, *dv;   // (B, H, N, D) contiguous
  Strides sq, sk, sv, so, sdo;
  int H, N, D;
  float scale, scale_log2;
};

template <class T>
__device__ __forceinline__ const T* head(const T* base, const Strides& s, int b, int h) {
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
// tensor-core kernels
// ====================================================================================================
// Grid (ceil(N / kBM), H, B). Warp w owns query rows m0 + 16w .. m0 + 16w + 15; thread (g, t) holds rows
// g and g + 8 of them (index r = 0, 1 below) and, per n8 tile, columns 2t and 2t + 1.
template <class T, int D>
__global__ void __launch_bounds__(FwdTile<D>::kThreads) attn_fwd_kernel(const FwdParams<T> p) {
  using Cfg = FwdTile<D>;
  using QTile = typename Cfg::QTile;
  using KVTile = typename Cfg::KVTile;
  constexpr int BN = Cfg::kBN, NT_S = BN / 8, NT_O = D / 8;

  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t s_q = smem_u32(smem);
  const uint32_t s_k = s_q + QTile::kBytes;                          // stage s at s_k + s * KVTile::kBytes
  const uint32_t s_v = s_k + Cfg::kStages * KVTile::kBytes;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int m0 = blockIdx.x * Cfg::kBM, h = blockIdx.y, b = blockIdx.z;
  const int N = p.N;
  const T* q = head(p.q, p.sq, b, h);
  const T* k = head(p.k, p.sk, b, h);
  const T* v = head(p.v, p.sv, b, h);
  const int n_tiles = (N + BN - 1) / BN;

  auto load_kv = [&](int tile, int stage) {
    KVTile::template load<Cfg::kThreads>(s_k + stage * KVTile::kBytes, k, p.sk.n, tile * BN, N, tid);
    KVTile::template load<Cfg::kThreads>(s_v + stage * KVTile::kBytes, v, p.sv.n, tile * BN, N, tid);
  };

  // Pipeline invariant: commit group j holds K/V tile j (group 0 also Q), empty groups included, so
  // "at most kStages - 2 groups pending" means tile j has landed.
  QTile::template load<Cfg::kThreads>(s_q, q, p.sq.n, m0, N, tid);
#pragma unroll
  for (int s = 0; s < Cfg::kStages - 1; ++s) {
    if (s < n_tiles) load_kv(s, s);
    cp_async_commit();
  }

  float o[NT_O][4];
  zero(o);
  float m_run[2] = {kNegInf, kNegInf};  // running max of the base-2 scores of rows g, g + 8
  float l_run[2] = {0.0f, 0.0f};        // this thread's share of the running sum of exp2(score - max)

  for (int j = 0; j < n_tiles; ++j) {
    cp_async_wait<Cfg::kStages - 2>();
    __syncthreads();  // tile j visible to all; every warp is done with tile j - 1, whose stage is refilled next
    const int next = j + Cfg::kStages - 1;
    if (next < n_tiles) load_kv(next, next % Cfg::kStages);
    cp_async_commit();
    const int stage = j % Cfg::kStages;

    float s[NT_S][4];
    zero(s);
    warp_gemm_ss<T, QTile, KVTile, NT_S, D>(s, s_q, warp * 16, s_k + stage * KVTile::kBytes, lane);

    // Base-2 scores; keys >= N get -inf after scaling (a negative scale must not turn them into +inf).
    const int key0 = j * BN + 2 * (lane & 3);
#pragma unroll
    for (int nt = 0; nt < NT_S; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float x = mul_rounded(s[nt][e], p.scale_log2);
        s[nt][e] = key0 + nt * 8 + (e & 1) < N ? x : kNegInf;
      }

    // Online softmax: rescale what was accumulated under the old max, then exponentiate against the new one.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = kNegInf;
#pragma unroll
      for (int nt = 0; nt < NT_S; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
      mx = quad_max(mx);
      const float m_new = fmaxf(m_run[r], mx);
      const float m_use = m_new == kNegInf ? 0.0f : m_new;  // all keys so far masked: exp2(-inf - 0) = 0, no NaN
      const float alpha = exp2f(m_run[r] - m_use);
      m_run[r] = m_new;
      float sum = 0.0f;
#pragma unroll
      for (int nt = 0; nt < NT_S; ++nt) {
        s[nt][2 * r] = exp2f(s[nt][2 * r] - m_use);
        s[nt][2 * r + 1] = exp2f(s[nt][2 * r + 1] - m_use);
        sum += s[nt][2 * r] + s[nt][2 * r + 1];
      }
      l_run[r] = l_run[r] * alpha + sum;
#pragma unroll
      for (int nt = 0; nt < NT_O; ++nt) {
        o[nt][2 * r] *= alpha;
        o[nt][2 * r + 1] *= alpha;
      }
    }

    uint32_t pa[BN / 16][4];
    acc_to_a<T, BN / 16>(s, pa);
    warp_gemm_rs<T, KVTile, BN / 16, D>(o, pa, s_v + stage * KVTile::kBytes, lane);
  }
  cp_async_wait<0>();

  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = quad_sum(l_run[r]);
    inv[r] = l > 0.0f ? 1.0f / l : 0.0f;
    const int row = m0 + warp * 16 + (lane >> 2) + 8 * r;
    if (row < N && (lane & 3) == 0) {
      // natural-log lse = ln 2 * (max + log2 sum), the max in base-2 units
      p.lse[contiguous_row(b, h, p.H, N, row)] = l > 0.0f ? (m_run[r] + log2f(l)) * kLn2 : kNegInf;
    }
  }
  store_rows<T, D>(p.out + b * p.so.b + h * p.so.h, p.so.n, m0 + warp * 16, N, o, inv[0], inv[1], lane);
}

// delta = rowsum(dO * O) in fp32, one warp per row of the flattened (B, H, N); every dtype.
template <class T>
__global__ void __launch_bounds__(128) attn_delta_kernel(const BwdParams<T> p, index_t rows) {
  const int lane = threadIdx.x & 31;
  const index_t row = static_cast<index_t>(blockIdx.x) * 4 + (threadIdx.x >> 5);
  if (row >= rows) return;
  const int i = static_cast<int>(row % p.N);
  const index_t bh = row / p.N;
  const int h = static_cast<int>(bh % p.H), b = static_cast<int>(bh / p.H);
  const T* o = head(p.out, p.so, b, h) + i * p.so.n;
  const T* dout = head(p.dout, p.sdo, b, h) + i * p.sdo.n;
  float acc = 0.0f;
  for (int d = lane; d < p.D; d += 32) acc = fmaf(to_float(o[d]), to_float(dout[d]), acc);
  acc = warp_sum(acc);
  if (lane == 0) p.delta[row] = acc;
}

// Grid (ceil(N / 64), H, B). Warp w owns keys n0 + 16w .. + 15 and computes transposed products
// (rows = its keys, columns = the tile's queries), so P^T and dS^T are already in A-fragment form for
// dV += P^T dO and dK += dS^T Q; no cross-warp reduction.
// __launch_bounds__(.., 1): lets ptxas use up to 255 registers by its own measure; with the default
// heuristic it spilled 8 bytes at D = 80 on sm_80 while using only 168.
template <class T, int D>
__global__ void __launch_bounds__(DkdvTile<D>::kThreads, 1) attn_dkdv_kernel(const BwdParams<T> p) {
  using Cfg = DkdvTile<D>;
  using KVTile = typename Cfg::KVTile;
  using QTile = typename Cfg::QTile;
  constexpr int BM = Cfg::kBM, NT_S = BM / 8, NT_D = D / 8;
  // One stage = [Q tile | dO tile | lse (BM floats) | delta (BM floats)].
  constexpr int kStageBytes = 2 * QTile::kBytes + 2 * Cfg::kVecBytes;

  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t s_k = smem_u32(smem);
  const uint32_t s_v = s_k + KVTile::kBytes;
  unsigned char* stages = smem + 2 * KVTile::kBytes;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int n0 = blockIdx.x * Cfg::kBN, h = blockIdx.y, b = blockIdx.z;
  const int N = p.N;
  const T* q = head(p.q, p.sq, b, h);
  const T* dout = head(p.dout, p.sdo, b, h);
  const float* lse = p.lse + contiguous_row(b, h, p.H, N, 0);
  const float* delta = p.delta + contiguous_row(b, h, p.H, N, 0);
  const int m_tiles = (N + BM - 1) / BM;

  auto load_q = [&](int tile, int stage) {
    unsigned char* st = stages + stage * kStageBytes;
    const int row0 = tile * BM;
    QTile::template load<Cfg::kThreads>(smem_u32(st), q, p.sq.n, row0, N, tid);
    QTile::template load<Cfg::kThreads>(smem_u32(st + QTile::kBytes), dout, p.sdo.n, row0, N, tid);
    if (tid < BM) {
      const bool valid = row0 + tid < N;
      const int i = valid ? row0 + tid : 0;
      float* vec = reinterpret_cast<float*>(st + 2 * QTile::kBytes);
      cp_async_4(smem_u32(vec + tid), lse + i, valid);
      cp_async_4(smem_u32(vec + BM + tid), delta + i, valid);
    }
  };

  // Group 0: this block's K and V (resident) and query tile 0; group j: query tile j.
  KVTile::template load<Cfg::kThreads>(s_k, head(p.k, p.sk, b, h), p.sk.n, n0, N, tid);
  KVTile::template load<Cfg::kThreads>(s_v, head(p.v, p.sv, b, h), p.sv.n, n0, N, tid);
#pragma unroll
  for (int s = 0; s < Cfg::kStages - 1; ++s) {
    if (s < m_tiles) load_q(s, s);
    cp_async_commit();
  }

  float dk[NT_D][4], dv[NT_D][4];
  zero(dk);
  zero(dv);

  for (int i = 0; i < m_tiles; ++i) {
    cp_async_wait<Cfg::kStages - 2>();
    __syncthreads();
    const int next = i + Cfg::kStages - 1;
    if (next < m_tiles) load_q(next, next % Cfg::kStages);
    cp_async_commit();
    unsigned char* st = stages + (i % Cfg::kStages) * kStageBytes;
    const uint32_t s_q = smem_u32(st), s_do = s_q + QTile::kBytes;
    const float* s_lse = reinterpret_cast<const float*>(st + 2 * QTile::kBytes);
    const float* s_delta = s_lse + BM;

    // S^T = K Q^T, then P^T = exp2(S^T * scale * log2 e - lse * log2 e). Queries >= N contribute nothing, and
    // padded keys >= N get P = 0 too: their zero-filled logits against a very negative lse would give inf, then
    // inf * 0 = NaN in dS, which the store guard hides today but debug runs and NaN poisoning would not.
    float pt[NT_S][4];
    zero(pt);
    warp_gemm_ss<T, KVTile, QTile, NT_S, D>(pt, s_k, warp * 16, s_q, lane);
#pragma unroll
    for (int nt = 0; nt < NT_S; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = nt * 8 + 2 * (lane & 3) + (e & 1);
        const int key = n0 + warp * 16 + (lane >> 2) + 8 * (e >> 1);
        const float x = mul_rounded(pt[nt][e], p.scale_log2) - mul_rounded(s_lse[col], kLog2e);
        pt[nt][e] = i * BM + col < N && key < N ? exp2f(x) : 0.0f;
      }
    uint32_t a[BM / 16][4];
    acc_to_a<T, BM / 16>(pt, a);
    warp_gemm_rs<T, QTile, BM / 16, D>(dv, a, s_do, lane);  // dV += P^T dO

    // dP^T = V dO^T;  dS^T = P^T * (dP^T - delta)
    float ds[NT_S][4];
    zero(ds);
    warp_gemm_ss<T, KVTile, QTile, NT_S, D>(ds, s_v, warp * 16, s_do, lane);
#pragma unroll
    for (int nt = 0; nt < NT_S; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = nt * 8 + 2 * (lane & 3) + (e & 1);
        ds[nt][e] = pt[nt][e] * (ds[nt][e] - s_delta[col]);
      }
    acc_to_a<T, BM / 16>(ds, a);
    warp_gemm_rs<T, QTile, BM / 16, D>(dk, a, s_q, lane);  // dK += dS^T Q  (times scale at the end)
  }
  cp_async_wait<0>();

  const index_t base = contiguous_row(b, h, p.H, N, 0) * D;
  store_rows<T, D>(p.dk + base, D, n0 + warp * 16, N, dk, p.scale, p.scale, lane);
  store_rows<T, D>(p.dv + base, D, n0 + warp * 16, N, dv, 1.0f, 1.0f, lane);
}

// Grid (ceil(N / 64), H, B). Warp w owns query rows m0 + 16w .. + 15 (rows g, g + 8 per thread, as in
// the forward) and streams every K / V tile: dQ = scale * sum_j dS_j K_j.
template <class T, int D>
__global__ void __launch_bounds__(DqTile<D>::kThreads) attn_dq_kernel(const BwdParams<T> p) {
  using Cfg = DqTile<D>;
  using QTile = typename Cfg::QTile;
  using KVTile = typename Cfg::KVTile;
  constexpr int BN = Cfg::kBN, NT_S = BN / 8, NT_D = D / 8;

  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t s_q = smem_u32(smem);
  const uint32_t s_do = s_q + QTile::kBytes;
  const uint32_t s_k = s_do + QTile::kBytes;  // stage s at s_k + s * KVTile::kBytes
  const uint32_t s_v = s_k + Cfg::kStages * KVTile::kBytes;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int m0 = blockIdx.x * Cfg::kBM, h = blockIdx.y, b = blockIdx.z;
  const int N = p.N;
  const T* k = head(p.k, p.sk, b, h);
  const T* v = head(p.v, p.sv, b, h);
  const int n_tiles = (N + BN - 1) / BN;

  auto load_kv = [&](int tile, int stage) {
    KVTile::template load<Cfg::kThreads>(s_k + stage * KVTile::kBytes, k, p.sk.n, tile * BN, N, tid);
    KVTile::template load<Cfg::kThreads>(s_v + stage * KVTile::kBytes, v, p.sv.n, tile * BN, N, tid);
  };

  QTile::template load<Cfg::kThreads>(s_q, head(p.q, p.sq, b, h), p.sq.n, m0, N, tid);
  QTile::template load<Cfg::kThreads>(s_do, head(p.dout, p.sdo, b, h), p.sdo.n, m0, N, tid);
#pragma unroll
  for (int s = 0; s < Cfg::kStages - 1; ++s) {
    if (s < n_tiles) load_kv(s, s);
    cp_async_commit();
  }

  // lse (pre-multiplied into base-2 units) and delta of this thread's two rows; rows >= N are never stored.
  float lse2[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = m0 + warp * 16 + (lane >> 2) + 8 * r;
    const index_t idx = contiguous_row(b, h, p.H, N, row < N ? row : 0);
    lse2[r] = row < N ? mul_rounded(p.lse[idx], kLog2e) : 0.0f;
    delta[r] = row < N ? p.delta[idx] : 0.0f;
  }

  float dq[NT_D][4];
  zero(dq);

  for (int j = 0; j < n_tiles; ++j) {
    cp_async_wait<Cfg::kStages - 2>();
    __syncthreads();
    const int next = j + Cfg::kStages - 1;
    if (next < n_tiles) load_kv(next, next % Cfg::kStages);
    cp_async_commit();
    const uint32_t sk = s_k + (j % Cfg::kStages) * KVTile::kBytes;
    const uint32_t sv = s_v + (j % Cfg::kStages) * KVTile::kBytes;

    float s[NT_S][4], dp[NT_S][4];
    zero(s);
    zero(dp);
    warp_gemm_ss<T, QTile, KVTile, NT_S, D>(s, s_q, warp * 16, sk, lane);    // S = Q K^T
    warp_gemm_ss<T, QTile, KVTile, NT_S, D>(dp, s_do, warp * 16, sv, lane);  // dP = dO V^T
    // dS = P * (dP - delta), P = exp2(S * scale * log2 e - lse * log2 e); keys >= N contribute nothing.
    const int key0 = j * BN + 2 * (lane & 3);
#pragma unroll
    for (int nt = 0; nt < NT_S; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        const float pv = key0 + nt * 8 + (e & 1) < N ? exp2f(mul_rounded(s[nt][e], p.scale_log2) - lse2[r]) : 0.0f;
        s[nt][e] = pv * (dp[nt][e] - delta[r]);
      }
    uint32_t a[BN / 16][4];
    acc_to_a<T, BN / 16>(s, a);
    warp_gemm_rs<T, KVTile, BN / 16, D>(dq, a, sk, lane);  // dQ += dS K
  }
  cp_async_wait<0>();

  store_rows<T, D>(p.dq + contiguous_row(b, h, p.H, N, 0) * D, D, m0 + warp * 16, N, dq, p.scale, p.scale, lane);
}

// ====================================================================================================
// fp32 SIMT kernels: one warp per row, lane l holds head-dim elements l, l + 32, l + 64, l + 96
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

// Grid (ceil(N / 4), H, B): query row i, keys one at a time with the online softmax.
template <class T>
__global__ void __launch_bounds__(32 * kSimtWarps) attn_fwd_simt_kernel(const FwdParams<T> p) {
  const int lane = threadIdx.x & 31;
  const int i = blockIdx.x * kSimtWarps + (threadIdx.x >> 5), h = blockIdx.y, b = blockIdx.z;
  if (i >= p.N) return;  // no block-level synchronisation below
  const T* k = head(p.k, p.sk, b, h);
  const T* v = head(p.v, p.sv, b, h);
  float qi[kSimtPerLane], o[kSimtPerLane] = {};
  load_row(head(p.q, p.sq, b, h) + i * p.sq.n, p.D, lane, qi);
  float m = kNegInf, l = 0.0f;
  for (int j = 0; j < p.N; ++j) {
    const float x = mul_rounded(warp_dot(qi, k + j * p.sk.n, p.D, lane), p.scale_log2);
    const float m_new = fmaxf(m, x);
    const float alpha = exp2f(m - m_new);  // 0 on the first key (m = -inf)
    const float pj = exp2f(x - m_new);
    l = l * alpha + pj;
    const T* vj = v + j * p.sv.n;
#pragma unroll
    for (int c = 0; c < kSimtPerLane; ++c) {
      const int d = lane + 32 * c;
      if (d < p.D) o[c] = fmaf(pj, to_float(vj[d]), o[c] * alpha);
    }
    m = m_new;
  }
  store_row(p.out + b * p.so.b + h * p.so.h + i * p.so.n, p.D, lane, o, 1.0f / l);
  if (lane == 0) p.lse[contiguous_row(b, h, p.H, p.N, i)] = (m + log2f(l)) * kLn2;
}

// Grid (ceil(N / 4), H, B): key row j, queries one at a time. dV_j = sum_i P_ij dO_i, dK_j = scale sum_i dS_ij Q_i.
template <class T>
__global__ void __launch_bounds__(32 * kSimtWarps) attn_dkdv_simt_kernel(const BwdParams<T> p) {
  const int lane = threadIdx.x & 31;
  const int j = blockIdx.x * kSimtWarps + (threadIdx.x >> 5), h = blockIdx.y, b = blockIdx.z;
  if (j >= p.N) return;
  const T* q = head(p.q, p.sq, b, h);
  const T* dout = head(p.dout, p.sdo, b, h);
  const float* lse = p.lse + contiguous_row(b, h, p.H, p.N, 0);
  const float* delta = p.delta + contiguous_row(b, h, p.H, p.N, 0);
  float kj[kSimtPerLane], vj[kSimtPerLane], dk[kSimtPerLane] = {}, dv[kSimtPerLane] = {};
  load_row(head(p.k, p.sk, b, h) + j * p.sk.n, p.D, lane, kj);
  load_row(head(p.v, p.sv, b, h) + j * p.sv.n, p.D, lane, vj);
  for (int i = 0; i < p.N; ++i) {
    const T* qi = q + i * p.sq.n;
    const T* doi = dout + i * p.sdo.n;
    const float pij = exp2f(mul_rounded(warp_dot(kj, qi, p.D, lane), p.scale_log2) - mul_rounded(lse[i], kLog2e));
    const float ds = pij * (warp_dot(vj, doi, p.D, lane) - delta[i]);
#pragma unroll
    for (int c = 0; c < kSimtPerLane; ++c) {
      const int d = lane + 32 * c;
      if (d < p.D) {
        dv[c] = fmaf(pij, to_float(doi[d]), dv[c]);
        dk[c] = fmaf(ds, to_float(qi[d]), dk[c]);
      }
    }
  }
  const index_t row = contiguous_row(b, h, p.H, p.N, j) * p.D;
  store_row(p.dk + row, p.D, lane, dk, p.scale);
  store_row(p.dv + row, p.D, lane, dv, 1.0f);
}

// Grid (ceil(N / 4), H, B): query row i, keys one at a time. dQ_i = scale sum_j dS_ij K_j.
template <class T>
__global__ void __launch_bounds__(32 * kSimtWarps) attn_dq_simt_kernel(const BwdParams<T> p) {
  const int lane = threadIdx.x & 31;
  const int i = blockIdx.x * kSimtWarps + (threadIdx.x >> 5), h = blockIdx.y, b = blockIdx.z;
  if (i >= p.N) return;
  const T* k = head(p.k, p.sk, b, h);
  const T* v = head(p.v, p.sv, b, h);
  const index_t ri = contiguous_row(b, h, p.H, p.N, i);
  const float lse2 = mul_rounded(p.lse[ri], kLog2e), delta = p.delta[ri];
  float qi[kSimtPerLane], doi[kSimtPerLane], dq[kSimtPerLane] = {};
  load_row(head(p.q, p.sq, b, h) + i * p.sq.n, p.D, lane, qi);
  load_row(head(p.dout, p.sdo, b, h) + i * p.sdo.n, p.D, lane, doi);
  for (int j = 0; j < p.N; ++j) {
    const T* kj = k + j * p.sk.n;
    const float pij = exp2f(mul_rounded(warp_dot(qi, kj, p.D, lane), p.scale_log2) - lse2);
    const float ds = pij * (warp_dot(doi, v + j * p.sv.n, p.D, lane) - delta);
#pragma unroll
    for (int c = 0; c < kSimtPerLane; ++c) {
      const int d = lane + 32 * c;
      if (d < p.D) dq[c] = fmaf(ds, to_float(kj[d]), dq[c]);
    }
  }
  store_row(p.dq + ri * p.D, p.D, lane, dq, p.scale);
}

// ====================================================================================================
// launchers
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

// ----------------------------------------------------------------------------------------------------
// op launchers (bound in bind_attention.cpp). Pointers are device addresses as integers; strides are
// (B, H, N) element strides with unit stride along D; lse, delta, dq, dk, dv are contiguous.
// ----------------------------------------------------------------------------------------------------
using attn::index_t;
using attn::Strides3;

// out (B, H, N, D) at `out` with out_strides, lse (B, H, N) = softmax(q k^T * scale) v and its log-sum-exp.
void attention_fwd(uintptr_t q, Strides3 q_strides, uintptr_t k, Strides3 k_strides, uintptr_t v, Strides3 v_strides,
                   uintptr_t out, Strides3 out_strides, uintptr_t lse, index_t B, index_t H, index_t N, index_t D,
                   double scale, int dtype, uintptr_t stream) {
  using namespace attn;
  check_shape(dtype, B, H, N, D);
  const bool vec = dtype != static_cast<int>(DType::kFloat32);
  check_operand("q", q, q_strides, vec);
  check_operand("k", k, k_strides, vec);
  check_operand("v", v, v_strides, vec);
  check_operand("out", out, out_strides, vec);
  require(lse % 4 == 0, "lse: pointer must be 4-byte aligned");
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const FwdParams<T> p{reinterpret_cast<const T*>(q), reinterpret_cast<const T*>(k), reinterpret_cast<const T*>(v),
                         reinterpret_cast<T*>(out), reinterpret_cast<float*>(lse), to_strides(q_strides),
                         to_strides(k_strides), to_strides(v_strides), to_strides(out_strides),
                         static_cast<int>(H), static_cast<int>(N), static_cast<int>(D),
                         static_cast<float>(scale * 1.4426950408889634)};
    if constexpr (kTensorCores<T>) {
      dispatch_head_dim(D, [&](auto d) {
        constexpr int kD = decltype(d)::value;
        using Cfg = FwdTile<kD>;
        auto kernel = attn_fwd_kernel<T, kD>;
        set_smem(kernel, Cfg::kSmemBytes, "attn_fwd_kernel");
        kernel<<<grid_for(N, Cfg::kBM, H, B), Cfg::kThreads, Cfg::kSmemBytes, s>>>(p);
        check_launch("attn_fwd_kernel");
      });
    } else {
      attn_fwd_simt_kernel<T><<<grid_for(N, kSimtWarps, H, B), 32 * kSimtWarps, 0, s>>>(p);
      check_launch("attn_fwd_simt_kernel");
    }
  });
}

// dq, dk, dv (B, H, N, D) contiguous from dout, q, k, v, out (strided) and lse; delta (B, H, N) fp32 is scratch.
void attention_bwd(uintptr_t dout, Strides3 dout_strides, uintptr_t q, Strides3 q_strides, uintptr_t k,
                   Strides3 k_strides, uintptr_t v, Strides3 v_strides, uintptr_t out, Strides3 out_strides,
                   uintptr_t lse, uintptr_t delta, uintptr_t dq, uintptr_t dk, uintptr_t dv, index_t B, index_t H,
                   index_t N, index_t D, double scale, int dtype, uintptr_t stream) {
  using namespace attn;
  check_shape(dtype, B, H, N, D);
  const bool vec = dtype != static_cast<int>(DType::kFloat32);
  check_operand("dout", dout, dout_strides, vec);
  check_operand("q", q, q_strides, vec);
  check_operand("k", k, k_strides, vec);
  check_operand("v", v, v_strides, vec);
  check_operand("out", out, out_strides, vec);
  require(lse % 4 == 0 && delta % 4 == 0, "lse and delta: pointers must be 4-byte aligned");
  // Outputs are written in 4-byte pairs (16-bit) or elements (fp32); contiguous rows of D elements.
  require(dq % 4 == 0 && dk % 4 == 0 && dv % 4 == 0, "dq, dk, dv: pointers must be 4-byte aligned");
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const BwdParams<T> p{reinterpret_cast<const T*>(q), reinterpret_cast<const T*>(k), reinterpret_cast<const T*>(v),
                         reinterpret_cast<const T*>(out), reinterpret_cast<const T*>(dout),
                         reinterpret_cast<const float*>(lse), reinterpret_cast<float*>(delta),
                         reinterpret_cast<T*>(dq), reinterpret_cast<T*>(dk), reinterpret_cast<T*>(dv),
                         to_strides(q_strides), to_strides(k_strides), to_strides(v_strides),
                         to_strides(out_strides), to_strides(dout_strides), static_cast<int>(H),
                         static_cast<int>(N), static_cast<int>(D), static_cast<float>(scale),
                         static_cast<float>(scale * 1.4426950408889634)};
    const index_t rows = B * H * N;
    require((rows + 3) / 4 < (index_t{1} << 31), "B * H * N is too large for the delta kernel's grid");
    attn_delta_kernel<T><<<static_cast<unsigned>((rows + 3) / 4), 128, 0, s>>>(p, rows);
    check_launch("attn_delta_kernel");
    if constexpr (kTensorCores<T>) {
      dispatch_head_dim(D, [&](auto d) {
        constexpr int kD = decltype(d)::value;
        using KvCfg = DkdvTile<kD>;
        using QCfg = DqTile<kD>;
        auto dkdv = attn_dkdv_kernel<T, kD>;
        auto dqk = attn_dq_kernel<T, kD>;
        set_smem(dkdv, KvCfg::kSmemBytes, "attn_dkdv_kernel");
        set_smem(dqk, QCfg::kSmemBytes, "attn_dq_kernel");
        dkdv<<<grid_for(N, KvCfg::kBN, H, B), KvCfg::kThreads, KvCfg::kSmemBytes, s>>>(p);
        check_launch("attn_dkdv_kernel");
        dqk<<<grid_for(N, QCfg::kBM, H, B), QCfg::kThreads, QCfg::kSmemBytes, s>>>(p);
        check_launch("attn_dq_kernel");
      });
    } else {
      attn_dkdv_simt_kernel<T><<<grid_for(N, kSimtWarps, H, B), 32 * kSimtWarps, 0, s>>>(p);
      check_launch("attn_dkdv_simt_kernel");
      attn_dq_simt_kernel<T><<<grid_for(N, kSimtWarps, H, B), 32 * kSimtWarps, 0, s>>>(p);
      check_launch("attn_dq_simt_kernel");
    }
  });
}

}  // namespace vk
