// Flash attention deterministic backward: the kernels (with the dO . O row-sum preprocess) and the op launcher
// attention_bwd (bound in bind_attention.cpp). The design, masking and memory layout, and everything shared with
// the forward (tile configurations, shared-memory tiles, warp GEMMs, softmax helpers, launcher checks), are in
// attention_common.cuh.
//
// Kernels (each followed by check_launch in its launcher):
//   attn_delta_kernel    delta (B, H, N) = rowsum(dO * O), fp32 (backward preprocess, every dtype)
//   attn_dkdv_kernel     a block owns 64 keys and loops over query tiles: dV = P^T dO, dK = scale dS^T Q
//   attn_dq_kernel       a block owns 64 queries and loops over key tiles: dQ = scale dS K
//   attn_*_simt_kernel   the same two products (dkdv, dq) for fp32
// dK dV and dQ each own their outputs (no atomics), so the backward is deterministic.
#include <cstdint>

#include "attention_common.cuh"

namespace vk {
namespace attn {

// ====================================================================================================
// backward preprocess (every dtype) and tensor-core kernels
// ====================================================================================================
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

  store_rows<T, D>(out_head(p.dk, p.sg, b, h), p.sg.n, n0 + warp * 16, N, dk, p.scale, p.scale, lane);
  store_rows<T, D>(out_head(p.dv, p.sg, b, h), p.sg.n, n0 + warp * 16, N, dv, 1.0f, 1.0f, lane);
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

  store_rows<T, D>(out_head(p.dq, p.sg, b, h), p.sg.n, m0 + warp * 16, N, dq, p.scale, p.scale, lane);
}

// ====================================================================================================
// fp32 SIMT kernels: one warp per row (row helpers in attention_common.cuh)
// ====================================================================================================
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
  store_row(out_head(p.dk, p.sg, b, h) + j * p.sg.n, p.D, lane, dk, p.scale);
  store_row(out_head(p.dv, p.sg, b, h) + j * p.sg.n, p.D, lane, dv, 1.0f);
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
  store_row(out_head(p.dq, p.sg, b, h) + i * p.sg.n, p.D, lane, dq, p.scale);
}

}  // namespace attn

// ----------------------------------------------------------------------------------------------------
// op launcher (bound in bind_attention.cpp). Pointers are device addresses as integers; strides are
// (B, H, N) element strides with unit stride along D; lse, delta are contiguous.
// ----------------------------------------------------------------------------------------------------
using attn::index_t;
using attn::Strides3;


// dq, dk, dv (B, H, N, D), all three with the (B, H, N) strides grad_strides (contiguous, or the q / k / v slices
// of one packed (B, N, 3, H, D) buffer), from dout, q, k, v, out (strided) and lse; delta (B, H, N) fp32 is scratch.
void attention_bwd(uintptr_t dout, Strides3 dout_strides, uintptr_t q, Strides3 q_strides, uintptr_t k,
                   Strides3 k_strides, uintptr_t v, Strides3 v_strides, uintptr_t out, Strides3 out_strides,
                   uintptr_t lse, uintptr_t delta, uintptr_t dq, uintptr_t dk, uintptr_t dv, Strides3 grad_strides,
                   index_t B, index_t H, index_t N, index_t D, double scale, int dtype, uintptr_t stream) {
  using namespace attn;
  check_shape(dtype, B, H, N, D);
  const bool vec = dtype != static_cast<int>(DType::kFloat32);
  check_operand("dout", dout, dout_strides, vec);
  check_operand("q", q, q_strides, vec);
  check_operand("k", k, k_strides, vec);
  check_operand("v", v, v_strides, vec);
  check_operand("out", out, out_strides, vec);
  require(lse % 4 == 0 && delta % 4 == 0, "lse and delta: pointers must be 4-byte aligned");
  // Outputs are written in 4-byte pairs (16-bit) or elements (fp32): 4-byte aligned rows of D elements.
  require(dq % 4 == 0 && dk % 4 == 0 && dv % 4 == 0, "dq, dk, dv: pointers must be 4-byte aligned");
  require(!vec || (grad_strides[0] % 2 == 0 && grad_strides[1] % 2 == 0 && grad_strides[2] % 2 == 0),
          "dq, dk, dv: 16-bit gradients are stored in pairs, so their (B, H, N) strides must be even");
  require(N == 1 || grad_strides[2] >= D, "dq, dk, dv: rows of D elements must not overlap (N stride >= D)");
  check_rows_distinct("dq, dk, dv", grad_strides, B, H, N, D);
  require(dq != dk && dq != dv && dk != dv, "dq, dk, dv: three distinct buffers (or slices) are needed");
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const BwdParams<T> p{reinterpret_cast<const T*>(q), reinterpret_cast<const T*>(k), reinterpret_cast<const T*>(v),
                         reinterpret_cast<const T*>(out), reinterpret_cast<const T*>(dout),
                         reinterpret_cast<const float*>(lse), reinterpret_cast<float*>(delta),
                         reinterpret_cast<T*>(dq), reinterpret_cast<T*>(dk), reinterpret_cast<T*>(dv),
                         to_strides(q_strides), to_strides(k_strides), to_strides(v_strides),
                         to_strides(out_strides), to_strides(dout_strides), to_strides(grad_strides),
                         static_cast<int>(H),
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
