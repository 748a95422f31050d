// Definitions of the Hopper GEMMs declared in gemm_sm90.h: CUTLASS 3 collectives (TMA loads and stores, warp-
// specialised wgmma, persistent cooperative kernels) instantiated with this project's epilogues. Included only by
// the gemm_sm90_*.cu units, which CMake builds for sm_90a alone.
//
// One configuration for every product (Sm90Tile): 128 x 256 x 64 tiles, two consumer warpgroups splitting the
// 128 rows (cooperative), one producer warp issuing TMA, a 2 x 1 cluster so that the two CTAs sharing a W tile
// load it once (multicast), as many mainloop stages as the shared memory left by the epilogue holds.
// The epilogues are CUTLASS's fusion operations (per-column bias, bias + activation + aux store, d-activation with
// an aux load) with GELU functors of our own: erf or tanh chosen by a runtime argument, so one kernel serves both.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <string>
#include <type_traits>
#include <vector>

#include "common.cuh"
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/kernel_hardware_info.h"
#include "gemm_sm90.h"

namespace vk {
namespace sm90 {

template <class T>
struct CutlassType;
template <>
struct CutlassType<__half> {
  using type = cutlass::half_t;
};
template <>
struct CutlassType<__nv_bfloat16> {
  using type = cutlass::bfloat16_t;
};

// ====================================================================================================
// GELU functors for CUTLASS's Sm90Compute node: called on fp32 fragments (cutlass::Array<float, N>) with the
// node's runtime Arguments, so the erf / tanh choice is a uniform branch, not a second kernel.
// ====================================================================================================
struct GeluArgs {
  int tanh_form = 0;
};

__device__ __forceinline__ float gelu_f32(float x, bool tanh_form) {
  if (tanh_form) {
    const float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);  // sqrt(2/pi) (x + 0.044715 x^3)
    return 0.5f * x * (1.0f + tanhf(u));
  }
  return 0.5f * x * (1.0f + erff(x * 0.7071067811865476f));
}

// One erf (or tanh) and one exp per element: Phi(x) + x phi(x), or the tanh form's derivative.
__device__ __forceinline__ float gelu_grad_f32(float x, bool tanh_form) {
  if (tanh_form) {
    const float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
    const float t = tanhf(u);
    const float du = 0.7978845608028654f * (1.0f + 3.0f * 0.044715f * x * x);
    return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * du;
  }
  return 0.5f * (1.0f + erff(x * 0.7071067811865476f)) + x * 0.3989422804014327f * __expf(-0.5f * x * x);
}

template <class T>
struct Gelu {
  using Arguments = GeluArgs;
  CUTLASS_DEVICE T operator()(T const& x, Arguments const& args) const {
    if constexpr (std::is_same_v<T, float>) {
      return gelu_f32(x, args.tanh_form != 0);
    } else {
      T y;
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < T::kElements; ++i) y[i] = gelu_f32(x[i], args.tanh_form != 0);
      return y;
    }
  }
};

// d-activation node: (dy, h) -> dy * gelu'(h).
template <class T>
struct GeluGrad {
  using Arguments = GeluArgs;
  CUTLASS_DEVICE T operator()(T const& dy, T const& h, Arguments const& args) const {
    if constexpr (std::is_same_v<T, float>) {
      return dy * gelu_grad_f32(h, args.tanh_form != 0);
    } else {
      T y;
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < T::kElements; ++i) y[i] = dy[i] * gelu_grad_f32(h[i], args.tanh_form != 0);
      return y;
    }
  }
};

// ====================================================================================================
// the kernel configuration and its assembly from CUTLASS's builders
// ====================================================================================================
struct Sm90Tile {
  using Tile = cute::Shape<cute::_128, cute::_256, cute::_64>;  // wgmma 64 x 256 x 16 per consumer warpgroup
  using Cluster = cute::Shape<cute::_2, cute::_1, cute::_1>;    // the W tile multicast to two M neighbours
  using Mainloop = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
  using Epilogue = cutlass::epilogue::TmaWarpSpecializedCooperative;
  static constexpr int kAlign = 8;  // 16 bytes of 16-bit elements: TMA's global alignment
  // What _C.sm90_gemm_kernels() reports (and benchmarks/kernel_report.py reads back from the kernels' names).
  static constexpr const char* kTile = "128x256x64";
  static constexpr const char* kCluster = "2x1";
  static constexpr const char* kSchedule = "cooperative";
};

// A GEMM with row-major output D (M, N); LayoutA / LayoutB in CUTLASS's sense (A RowMajor = K-major, B
// ColumnMajor = K-major); Fusion: a cutlass::epilogue::fusion operation; Scheduler: persistent or stream-K;
// Source: the element type of the epilogue's source matrix C (row-major, TMA-loaded), void for none.
template <class T, class LayoutA, class LayoutB, class Fusion, class Scheduler = cutlass::gemm::PersistentScheduler,
          class Source = void, class Cfg = Sm90Tile>
struct GemmOf {
  using E = typename CutlassType<T>::type;
  using RowMajor = cutlass::layout::RowMajor;
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, typename Cfg::Tile, typename Cfg::Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, Source, RowMajor, Cfg::kAlign, E, RowMajor,
      Cfg::kAlign, typename Cfg::Epilogue, Fusion>::CollectiveOp;
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, E, LayoutA, Cfg::kAlign, E, LayoutB, Cfg::kAlign, float,
      typename Cfg::Tile, typename Cfg::Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      typename Cfg::Mainloop>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue, Scheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using Config = Cfg;
  using StrideA = typename Kernel::StrideA;
  using StrideB = typename Kernel::StrideB;
  using StrideC = typename Kernel::StrideC;
  using StrideD = typename Kernel::StrideD;
};

// A (rows, cols, batch) stride of a matrix with row stride `ld` along whichever mode is dynamic: the static
// mode (cute::_1) is the contiguous one, so one helper serves K-major and MN-major operands alike.
template <class Stride>
Stride strided(index_t ld) {
  if constexpr (cute::is_static<cute::remove_cvref_t<decltype(cute::get<0>(Stride{}))>>::value) {
    return cute::make_stride(cute::Int<1>{}, ld, index_t{0});
  } else {
    return cute::make_stride(ld, cute::Int<1>{}, index_t{0});
  }
}

// The SM count CUTLASS's persistent scheduler sizes its grid with, read once per device.
inline cutlass::KernelHardwareInfo hardware_info() {
  static int sm_count[64] = {};
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  if (device < 64 && sm_count[device] == 0) {
    check_cuda(cudaDeviceGetAttribute(&sm_count[device], cudaDevAttrMultiProcessorCount, device),
               "cudaDeviceGetAttribute(multiprocessor count)");
  }
  cutlass::KernelHardwareInfo info;
  info.device_id = device;
  info.sm_count = device < 64 ? sm_count[device] : 0;
  return info;
}

// CUTLASS's sm90 kernels answer kInvalid ("Invalid status") when a collective's can_implement is false: say what that
// means.
inline std::string status_text(cutlass::Status s) {
  if (s == cutlass::Status::kInvalid) return "not implementable: an operand's alignment, stride or extent";
  return cutlassGetStatusString(s);
}

// can_implement, workspace, initialize, run: each failure raises with the kernel's name and CUTLASS's reason.
template <class Gemm>
void run(const typename Gemm::Arguments& args, cudaStream_t stream, const char* name) {
  Gemm gemm;
  const cutlass::Status ok = gemm.can_implement(args);
  require(ok == cutlass::Status::kSuccess,
          std::string(name) + ": CUTLASS refuses the problem (" + status_text(ok) + ")");
  const size_t bytes = Gemm::get_workspace_size(args);
  void* workspace = nullptr;
  if (bytes > 0) check_cuda(cudaMallocAsync(&workspace, bytes, stream), name);
  cutlass::Status st = gemm.initialize(args, workspace, stream);
  if (st == cutlass::Status::kSuccess) st = gemm.run(stream);
  const cudaError_t launch = cudaGetLastError();
  if (workspace != nullptr) check_cuda(cudaFreeAsync(workspace, stream), name);
  check_cuda(launch, name);
  if (st != cutlass::Status::kSuccess) {
    throw std::runtime_error(std::string(name) + ": CUTLASS launch failed (" + status_text(st) + ")");
  }
}

template <class T>
auto cptr(const T* p) {
  return reinterpret_cast<const typename CutlassType<T>::type*>(p);
}
template <class T>
auto mptr(T* p) {
  return reinterpret_cast<typename CutlassType<T>::type*>(p);
}

// The Arguments every product starts from: the problem (M, N, K), A and B with their row strides, the epilogue's
// source C (nullptr: none; its stride is then unused) and output D, and the SM count the persistent grid is sized
// for. Each product then sets its own epilogue fields (bias, aux, beta, activation, scheduler).
template <class G, class T>
typename G::Gemm::Arguments gemm_args(const T* a, index_t lda, const T* b, index_t ldb, const T* c, index_t ldc, T* d,
                                      index_t ldd, int M, int N, int K, cutlass::KernelHardwareInfo hw) {
  return {cutlass::gemm::GemmUniversalMode::kGemm,
          {M, N, K, 1},
          {cptr(a), strided<typename G::StrideA>(lda), cptr(b), strided<typename G::StrideB>(ldb)},
          {{}, cptr(c), strided<typename G::StrideC>(ldc), mptr(d), strided<typename G::StrideD>(ldd)},
          hw};
}

// ====================================================================================================
// the products
// ====================================================================================================
using cutlass::layout::ColumnMajor;
using cutlass::layout::RowMajor;
namespace fusion = cutlass::epilogue::fusion;

template <class T>
using LinearBias = GemmOf<T, RowMajor, ColumnMajor,
                          fusion::LinCombPerColBias<typename CutlassType<T>::type, float, typename CutlassType<T>::type,
                                                    typename CutlassType<T>::type, float>>;

// The CUTLASS arguments of linear_bias (hw: the SM count its grid is sized for); linear_bias launches them.
// G: LinearBias<T>, or one of its configuration variants (gemm_sm90_variants.cu).
template <class T, class G = LinearBias<T>>
auto linear_bias_args(const T* a, index_t lda, const T* w, index_t ldw, const T* bias, T* d, index_t ldd, int M, int N,
                      int K, cutlass::KernelHardwareInfo hw) {
  auto args = gemm_args<G, T>(a, lda, w, ldw, nullptr, ldd, d, ldd, M, N, K, hw);
  args.epilogue.thread.bias_ptr = cptr(bias);
  return args;
}

template <class T>
void linear_bias(const T* a, index_t lda, const T* w, index_t ldw, const T* bias, T* d, index_t ldd, int M, int N,
                 int K, cudaStream_t stream) {
  const auto args = linear_bias_args<T>(a, lda, w, ldw, bias, d, ldd, M, N, K, hardware_info());
  run<typename LinearBias<T>::Gemm>(args, stream, "sm90 linear_bias");
}

// D = acc + bias + C: the per-column bias epilogue with the residual as the source C and beta = 1 (alpha stays 1).
// Spelled as LinCombPerColBiasEltAct with the identity activation (the same computation) so that its kernel's name
// differs from linear_bias's by the fusion operation, which benchmarks/kernel_report.py reads.
template <class T>
using LinearBiasResidual =
    GemmOf<T, RowMajor, ColumnMajor,
           fusion::LinCombPerColBiasEltAct<cutlass::epilogue::thread::Identity, typename CutlassType<T>::type, float,
                                           typename CutlassType<T>::type, typename CutlassType<T>::type, float>,
           cutlass::gemm::PersistentScheduler, typename CutlassType<T>::type>;

// The CUTLASS arguments of linear_bias_residual (hw: the SM count its grid is sized for).
template <class T>
auto linear_bias_residual_args(const T* a, index_t lda, const T* w, index_t ldw, const T* bias, const T* res,
                               index_t ld_res, T* d, index_t ldd, int M, int N, int K, cutlass::KernelHardwareInfo hw) {
  using G = LinearBiasResidual<T>;
  auto args = gemm_args<G, T>(a, lda, w, ldw, res, ld_res, d, ldd, M, N, K, hw);
  args.epilogue.thread.beta = 1.0f;
  args.epilogue.thread.bias_ptr = cptr(bias);
  return args;
}

template <class T>
void linear_bias_residual(const T* a, index_t lda, const T* w, index_t ldw, const T* bias, const T* res,
                          index_t ld_res, T* d, index_t ldd, int M, int N, int K, cudaStream_t stream) {
  const auto args =
      linear_bias_residual_args<T>(a, lda, w, ldw, bias, res, ld_res, d, ldd, M, N, K, hardware_info());
  run<typename LinearBiasResidual<T>::Gemm>(args, stream, "sm90 linear_bias_residual");
}

template <class T>
using LinearBiasGelu =
    GemmOf<T, RowMajor, ColumnMajor,
           fusion::LinCombPerColBiasEltActAux<RowMajor, Gelu, typename CutlassType<T>::type, float,
                                              typename CutlassType<T>::type, typename CutlassType<T>::type,
                                              typename CutlassType<T>::type, float>>;

// The CUTLASS arguments of linear_bias_gelu (hw: the SM count its grid is sized for); linear_bias_gelu launches them.
template <class T>
auto linear_bias_gelu_args(const T* a, index_t lda, const T* w, index_t ldw, const T* bias, T* h, index_t ldh, T* act,
                           index_t ld_act, int M, int N, int K, bool tanh_form, cutlass::KernelHardwareInfo hw) {
  using G = LinearBiasGelu<T>;
  auto args = gemm_args<G, T>(a, lda, w, ldw, nullptr, ld_act, act, ld_act, M, N, K, hw);
  args.epilogue.thread.bias_ptr = cptr(bias);
  args.epilogue.thread.aux_ptr = mptr(h);
  args.epilogue.thread.dAux = strided<decltype(args.epilogue.thread.dAux)>(ldh);
  args.epilogue.thread.activation.tanh_form = tanh_form ? 1 : 0;
  return args;
}

// Without autograd nothing reads h: the same product storing act alone (the per-column bias + activation epilogue,
// no aux store), so the epilogue writes one (M, N) matrix instead of two.
template <class T>
using LinearBiasGeluAct =
    GemmOf<T, RowMajor, ColumnMajor,
           fusion::LinCombPerColBiasEltAct<Gelu, typename CutlassType<T>::type, float, typename CutlassType<T>::type,
                                           typename CutlassType<T>::type, float>>;

// The CUTLASS arguments of linear_bias_gelu without h (hw: the SM count its grid is sized for).
template <class T>
auto linear_bias_gelu_act_args(const T* a, index_t lda, const T* w, index_t ldw, const T* bias, T* act,
                               index_t ld_act, int M, int N, int K, bool tanh_form, cutlass::KernelHardwareInfo hw) {
  using G = LinearBiasGeluAct<T>;
  auto args = gemm_args<G, T>(a, lda, w, ldw, nullptr, ld_act, act, ld_act, M, N, K, hw);
  args.epilogue.thread.bias_ptr = cptr(bias);
  args.epilogue.thread.activation.tanh_form = tanh_form ? 1 : 0;
  return args;
}

template <class T>
void linear_bias_gelu(const T* a, index_t lda, const T* w, index_t ldw, const T* bias, T* h, index_t ldh, T* act,
                      index_t ld_act, int M, int N, int K, bool tanh_form, cudaStream_t stream) {
  if (h == nullptr) {
    const auto args =
        linear_bias_gelu_act_args<T>(a, lda, w, ldw, bias, act, ld_act, M, N, K, tanh_form, hardware_info());
    run<typename LinearBiasGeluAct<T>::Gemm>(args, stream, "sm90 linear_bias_gelu_act");
    return;
  }
  const auto args =
      linear_bias_gelu_args<T>(a, lda, w, ldw, bias, h, ldh, act, ld_act, M, N, K, tanh_form, hardware_info());
  run<typename LinearBiasGelu<T>::Gemm>(args, stream, "sm90 linear_bias_gelu");
}

template <class T>
using DGelu = GemmOf<T, RowMajor, RowMajor,
                     fusion::LinCombDeEltAct<RowMajor, GeluGrad, typename CutlassType<T>::type, float,
                                             typename CutlassType<T>::type, typename CutlassType<T>::type, float>>;

// The CUTLASS arguments of dgelu (hw: the SM count its grid is sized for); dgelu launches them.
template <class T>
auto dgelu_args(const T* dy, index_t ldy, const T* w, index_t ldw, const T* h, index_t ldh, T* dh, index_t lddh, int M,
                int N, int K, bool tanh_form, cutlass::KernelHardwareInfo hw) {
  using G = DGelu<T>;
  auto args = gemm_args<G, T>(dy, ldy, w, ldw, nullptr, lddh, dh, lddh, M, N, K, hw);
  args.epilogue.thread.aux_ptr = cptr(h);
  args.epilogue.thread.dAux = strided<decltype(args.epilogue.thread.dAux)>(ldh);
  args.epilogue.thread.activation.tanh_form = tanh_form ? 1 : 0;
  return args;
}

template <class T>
void dgelu(const T* dy, index_t ldy, const T* w, index_t ldw, const T* h, index_t ldh, T* dh, index_t lddh, int M,
           int N, int K, bool tanh_form, cudaStream_t stream) {
  const auto args = dgelu_args<T>(dy, ldy, w, ldw, h, ldh, dh, lddh, M, N, K, tanh_form, hardware_info());
  run<typename DGelu<T>::Gemm>(args, stream, "sm90 dgelu");
}

// dgelu that also writes act = gelu(h) and dfc1_bias's partial sums, each when its pointer is not null: the
// epilogue reads h once (one aux load) and computes from it dh = acc * gelu'(h) (stored as D) and gelu(h) (a TMA
// aux store, the operand dfc2_weight = dy^T @ act needs, so no row pass re-reads h); dh's fp32 values also go
// through CUTLASS's row-vector reduction without its final reduction (Sm90RowReduction, FinalReduction = false),
// which writes each 128-row tile's column sums to partials[m_tile * ld + n], ld = N rounded up to the tile's 256
// columns: no atomics and no tile counters, so the sum gemm.cu then takes over m_tile in order is deterministic.
// h feeds two nodes, so the callbacks are a DAG (Sm90TopologicalVisitor), not a tree.
template <class T>
struct DGeluActColSums
    : fusion::LinCombDeEltAct<RowMajor, GeluGrad, typename CutlassType<T>::type, float, typename CutlassType<T>::type,
                              typename CutlassType<T>::type, float> {};

// Its callbacks, node by node (EdgeTuple: each node's inputs). CUTLASS's epilogue builder passes the aux load's
// shared-memory layout and copy op (AtomS2R, CopyS2R) as for any fusion with one aux input; the aux store's are
// derived here the same way the builder derives them for an aux output.
template <class T, class CtaTile, class EpiTile, int StagesC, int StagesD, class AtomS2R, class CopyS2R>
struct DGeluActColSumsDag {
  using E = typename CutlassType<T>::type;
  using StrideAux = cutlass::gemm::TagToStrideC_t<RowMajor>;
  static constexpr auto RN = cutlass::FloatRoundStyle::round_to_nearest;
  using AtomR2S = decltype(cutlass::epilogue::collective::detail::sm90_get_epilogue_smem_swizzle_layout_atom<
                           StrideAux, E, EpiTile>());
  using CopyR2S = decltype(cutlass::epilogue::collective::detail::sm90_get_smem_store_op_for_accumulator<
                           StrideAux, E, EpiTile>());
  using type = fusion::Sm90TopologicalVisitor<
      float,
      cute::tuple<cute::seq<>,      // 0 acc = dy @ w
                  cute::seq<>,      // 1 h
                  cute::seq<0, 1>,  // 2 dh = acc * gelu'(h)
                  cute::seq<1>,     // 3 gelu(h)
                  cute::seq<3>,     // 4 act: stored (passes gelu(h) on)
                  cute::seq<2>,     // 5 column sums of dh (passes dh on)
                  cute::seq<5>>,    // 6 D = dh rounded to T
      fusion::Sm90AccFetch, fusion::Sm90AuxLoad<StagesC, EpiTile, E, StrideAux, AtomS2R, CopyS2R>,
      fusion::Sm90Compute<GeluGrad, float, float, RN>, fusion::Sm90Compute<Gelu, float, float, RN>,
      fusion::Sm90AuxStore<StagesD, EpiTile, E, RN, StrideAux, AtomR2S, CopyR2S>,
      fusion::Sm90RowReduction<cutlass::plus, cutlass::plus, cutlass::plus, 0, CtaTile, float, float, RN,
                               cute::Stride<cute::_0, cute::_1, cute::_0>, 4, /*EnableNullptr=*/true,
                               /*FinalReduction=*/false>,
      fusion::Sm90Compute<cutlass::epilogue::thread::Identity, E, float, RN>>;
};

}  // namespace sm90
}  // namespace vk

// CUTLASS's epilogue builder asks FusionCallbacks<policy, operation, ...> for an operation's callbacks: this
// specialisation answers for DGeluActColSums.
namespace cutlass::epilogue::fusion {
template <int StagesC, int StagesD, int FragmentSize, bool ReuseSmemC, bool DelayTmaStore, class T,
          class CtaTileShapeMNK, class EpilogueTile, class SmemLayoutAtom, class CopyOpS2R>
struct FusionCallbacks<epilogue::Sm90TmaWarpSpecialized<StagesC, StagesD, FragmentSize, ReuseSmemC, DelayTmaStore>,
                       vk::sm90::DGeluActColSums<T>, CtaTileShapeMNK, EpilogueTile, SmemLayoutAtom, CopyOpS2R>
    : vk::sm90::DGeluActColSumsDag<T, CtaTileShapeMNK, EpilogueTile, StagesC, StagesD, SmemLayoutAtom,
                                   CopyOpS2R>::type {
  using Impl = typename vk::sm90::DGeluActColSumsDag<T, CtaTileShapeMNK, EpilogueTile, StagesC, StagesD,
                                                     SmemLayoutAtom, CopyOpS2R>::type;
  using Operation = vk::sm90::DGeluActColSums<T>;
  using E = typename vk::sm90::CutlassType<T>::type;
  using StrideAux = gemm::TagToStrideC_t<layout::RowMajor>;

  struct Arguments {
    vk::sm90::GeluArgs activation{};
    E const* aux_ptr = nullptr;  // h (M, N)
    StrideAux dAux = {};
    E* act_ptr = nullptr;  // act (M, N), or null: not stored
    StrideAux dAct = {};
    float* partials_ptr = nullptr;  // (ceil(M / 128), N rounded up to 256) fp32, or null: no column sums

    operator typename Impl::Arguments() const {
      return {{}, {aux_ptr, E(0), dAux}, activation, activation, {act_ptr, dAct}, {partials_ptr, 0.0f, {}}, {}};
    }
  };

  using Impl::Impl;
};
}  // namespace cutlass::epilogue::fusion

namespace vk {
namespace sm90 {

template <class T>
using DGeluAct = GemmOf<T, RowMajor, RowMajor, DGeluActColSums<T>>;
static_assert(cute::size<0>(typename Sm90Tile::Tile{}) == kTileM && cute::size<1>(typename Sm90Tile::Tile{}) == kTileN,
              "gemm_sm90.h's kTileM / kTileN (the dgelu partial sums' layout) must be Sm90Tile's");

// The CUTLASS arguments of dgelu_act (hw: the SM count its grid is sized for).
template <class T>
auto dgelu_act_args(const T* dy, index_t ldy, const T* w, index_t ldw, const T* h, index_t ldh, T* dh, index_t lddh,
                    T* act, index_t ld_act, float* partials, int M, int N, int K, bool tanh_form,
                    cutlass::KernelHardwareInfo hw) {
  using G = DGeluAct<T>;
  auto args = gemm_args<G, T>(dy, ldy, w, ldw, nullptr, lddh, dh, lddh, M, N, K, hw);
  auto& epi = args.epilogue.thread;
  epi.activation.tanh_form = tanh_form ? 1 : 0;
  epi.aux_ptr = cptr(h);
  epi.dAux = strided<decltype(epi.dAux)>(ldh);
  epi.act_ptr = act == nullptr ? nullptr : mptr(act);
  epi.dAct = strided<decltype(epi.dAct)>(ld_act);
  epi.partials_ptr = partials;
  return args;
}

template <class T>
void dgelu_act(const T* dy, index_t ldy, const T* w, index_t ldw, const T* h, index_t ldh, T* dh, index_t lddh,
               T* act, index_t ld_act, float* partials, int M, int N, int K, bool tanh_form, cudaStream_t stream) {
  const auto args = dgelu_act_args<T>(dy, ldy, w, ldw, h, ldh, dh, lddh, act, ld_act, partials, M, N, K, tanh_form,
                                      hardware_info());
  run<typename DGeluAct<T>::Gemm>(args, stream, "sm90 dgelu_act");
}

template <class T>
using MatmulNN =
    GemmOf<T, RowMajor, RowMajor, fusion::LinearCombination<typename CutlassType<T>::type, float, void, float>>;

// The CUTLASS arguments of matmul_nn (hw: the SM count its grid is sized for); matmul_nn launches them.
template <class T>
auto matmul_nn_args(const T* a, index_t lda, const T* b, index_t ldb, T* d, index_t ldd, int M, int N, int K,
                    cutlass::KernelHardwareInfo hw) {
  using G = MatmulNN<T>;
  return gemm_args<G, T>(a, lda, b, ldb, nullptr, ldd, d, ldd, M, N, K, hw);
}

template <class T>
void matmul_nn(const T* a, index_t lda, const T* b, index_t ldb, T* d, index_t ldd, int M, int N, int K,
               cudaStream_t stream) {
  const auto args = matmul_nn_args<T>(a, lda, b, ldb, d, ldd, M, N, K, hardware_info());
  run<typename MatmulNN<T>::Gemm>(args, stream, "sm90 matmul_nn");
}

template <class T>
using MatmulWgrad =
    GemmOf<T, ColumnMajor, RowMajor, fusion::LinearCombination<typename CutlassType<T>::type, float, void, float>,
           cutlass::gemm::StreamKScheduler>;

// The CUTLASS arguments of matmul_tn_wgrad (hw: the SM count its grid is sized for); matmul_tn_wgrad launches them.
template <class T>
auto matmul_tn_wgrad_args(const T* a, index_t lda, const T* b, index_t ldb, T* d, index_t ldd, int M, int N, int K,
                          cutlass::KernelHardwareInfo hw) {
  using G = MatmulWgrad<T>;
  auto args = gemm_args<G, T>(a, lda, b, ldb, nullptr, ldd, d, ldd, M, N, K, hw);
  // Deterministic: each tile's K-slices are reduced in a fixed order through the fp32 workspace.
  args.scheduler.reduction_mode = G::Kernel::TileScheduler::ReductionMode::Deterministic;
  return args;
}

template <class T>
void matmul_tn_wgrad(const T* a, index_t lda, const T* b, index_t ldb, T* d, index_t ldd, int M, int N, int K,
                     cudaStream_t stream) {
  const auto args = matmul_tn_wgrad_args<T>(a, lda, b, ldb, d, ldd, M, N, K, hardware_info());
  run<typename MatmulWgrad<T>::Gemm>(args, stream, "sm90 matmul_tn_wgrad");
}

// CUTLASS's own can_implement for `product` at (M, N, K) with packed row strides and aligned stand-in pointers,
// on 132 SMs: "" if it accepts, else its reason. Host logic only (no CUDA call), so a CPU test can ask it.
template <class T>
std::string can_implement(const std::string& product, int M, int N, int K) {
  const cutlass::KernelHardwareInfo hw{0, 132};
  T* p = reinterpret_cast<T*>(uintptr_t{1} << 20);  // never dereferenced: can_implement reads shapes and strides
  cutlass::Status st = cutlass::Status::kErrorInvalidProblem;
  if (product == "linear_bias") {
    st = LinearBias<T>::Gemm::can_implement(linear_bias_args<T>(p, K, p, K, p, p, N, M, N, K, hw));
  } else if (product == "linear_bias_residual") {
    const auto args = linear_bias_residual_args<T>(p, K, p, K, p, p, N, p, N, M, N, K, hw);
    st = LinearBiasResidual<T>::Gemm::can_implement(args);
  } else if (product == "linear_bias_gelu") {
    const auto args = linear_bias_gelu_args<T>(p, K, p, K, p, p, N, p, N, M, N, K, false, hw);
    st = LinearBiasGelu<T>::Gemm::can_implement(args);
  } else if (product == "linear_bias_gelu_act") {
    const auto args = linear_bias_gelu_act_args<T>(p, K, p, K, p, p, N, M, N, K, false, hw);
    st = LinearBiasGeluAct<T>::Gemm::can_implement(args);
  } else if (product == "dgelu") {
    st = DGelu<T>::Gemm::can_implement(dgelu_args<T>(p, K, p, N, p, N, p, N, M, N, K, false, hw));
  } else if (product == "dgelu_act") {
    const auto args = dgelu_act_args<T>(p, K, p, N, p, N, p, N, p, N, reinterpret_cast<float*>(p), M, N, K, false, hw);
    st = DGeluAct<T>::Gemm::can_implement(args);
  } else if (product == "matmul_nn") {
    st = MatmulNN<T>::Gemm::can_implement(matmul_nn_args<T>(p, K, p, N, p, N, M, N, K, hw));
  } else if (product == "matmul_tn_wgrad") {
    st = MatmulWgrad<T>::Gemm::can_implement(matmul_tn_wgrad_args<T>(p, M, p, N, p, N, M, N, K, hw));
  } else {
    return "unknown product " + product;
  }
  return st == cutlass::Status::kSuccess ? std::string() : status_text(st);
}

template <class G>
KernelFacts facts_of(const char* product, const char* dtype, const char* scheduler) {
  using K = typename G::Kernel;
  using Cfg = typename G::Config;
  return {product, dtype, Cfg::kTile, Cfg::kCluster, Cfg::kSchedule, scheduler,
          K::CollectiveMainloop::DispatchPolicy::Stages, static_cast<int>(K::SharedStorageSize),
          static_cast<int>(K::MaxThreadsPerBlock), ""};
}

template <class T>
void describe(std::vector<KernelFacts>& out) {
  const char* dtype = std::is_same_v<T, __half> ? "fp16" : "bf16";
  out.push_back(facts_of<LinearBias<T>>("linear_bias", dtype, "persistent"));
  out.push_back(facts_of<LinearBiasResidual<T>>("linear_bias_residual", dtype, "persistent"));
  out.push_back(facts_of<LinearBiasGelu<T>>("linear_bias_gelu", dtype, "persistent"));
  out.push_back(facts_of<LinearBiasGeluAct<T>>("linear_bias_gelu_act", dtype, "persistent"));
  out.push_back(facts_of<DGelu<T>>("dgelu", dtype, "persistent"));
  out.push_back(facts_of<DGeluAct<T>>("dgelu_act", dtype, "persistent"));
  out.push_back(facts_of<MatmulNN<T>>("matmul_nn", dtype, "persistent"));
  out.push_back(facts_of<MatmulWgrad<T>>("matmul_tn_wgrad", dtype, "stream-K, deterministic"));
}

}  // namespace sm90
}  // namespace vk

// Explicit instantiation of every product for one dtype (gemm_sm90_<dtype>.cu: one unit per dtype, so that ninja
// compiles them side by side).
#define VK_SM90_INSTANTIATE(T)                                                                                      \
  template void vk::sm90::linear_bias<T>(const T*, index_t, const T*, index_t, const T*, T*, index_t, int, int, int, \
                                         cudaStream_t);                                                             \
  template void vk::sm90::linear_bias_residual<T>(const T*, index_t, const T*, index_t, const T*, const T*,       \
                                                  index_t, T*, index_t, int, int, int, cudaStream_t);              \
  template void vk::sm90::linear_bias_gelu<T>(const T*, index_t, const T*, index_t, const T*, T*, index_t, T*,     \
                                              index_t, int, int, int, bool, cudaStream_t);                          \
  template void vk::sm90::dgelu<T>(const T*, index_t, const T*, index_t, const T*, index_t, T*, index_t, int, int,  \
                                   int, bool, cudaStream_t);                                                        \
  template void vk::sm90::dgelu_act<T>(const T*, index_t, const T*, index_t, const T*, index_t, T*, index_t, T*,    \
                                       index_t, float*, int, int, int, bool, cudaStream_t);                         \
  template void vk::sm90::matmul_nn<T>(const T*, index_t, const T*, index_t, T*, index_t, int, int, int,            \
                                       cudaStream_t);                                                               \
  template void vk::sm90::matmul_tn_wgrad<T>(const T*, index_t, const T*, index_t, T*, index_t, int, int, int,      \
                                             cudaStream_t);                                                         \
  template void vk::sm90::describe<T>(std::vector<vk::sm90::KernelFacts>&);                                      \
  template std::string vk::sm90::can_implement<T>(const std::string&, int, int, int);
