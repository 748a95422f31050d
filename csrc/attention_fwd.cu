// Flash attention forward: the kernels and the op launcher attention_fwd (bound in bind_attention.cpp).
// The design, masking and memory layout, and everything shared with the backward (tile configurations,
// shared-memory tiles, warp GEMMs, softmax helpers, launcher checks), are in attention_common.cuh.
//
// Kernels (each followed by check_launch in its launcher):
//   attn_fwd_kernel      out (B, N, H, D memory) and lse (B, H, N) = natural-log log-sum-exp of each row
//   attn_fwd_simt_kernel the same for fp32
#include <cstdint>

#include "attention_common.cuh"

namespace vk {
namespace attn {

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

// ====================================================================================================
// fp32 SIMT kernel: one warp per row (row helpers in attention_common.cuh)
// ====================================================================================================
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

}  // namespace attn

// ----------------------------------------------------------------------------------------------------
// op launcher (bound in bind_attention.cpp). Pointers are device addresses as integers; strides are
// (B, H, N) element strides with unit stride along D; lse is contiguous.
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
  check_rows_distinct("out", out_strides, B, H, N, D);
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

}  // namespace vk
