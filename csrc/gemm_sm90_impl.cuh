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
};

// A GEMM with row-major output D (M, N); LayoutA / LayoutB in CUTLASS's sense (A RowMajor = K-major, B
// ColumnMajor = K-major); Fusion: a cutlass::epilogue::fusion operation; Scheduler: persistent or stream-K.
template <class T, class LayoutA, class LayoutB, class Fusion, class Scheduler = cutlass::gemm::PersistentScheduler,
          class Cfg = Sm90Tile>
struct GemmOf {
  using E = typename CutlassType<T>::type;
  using RowMajor = cutlass::layout::RowMajor;
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, typename Cfg::Tile, typename Cfg::Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, RowMajor, Cfg::kAlign, E, RowMajor,
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
  using StrideA = typename Kernel::StrideA;
  using StrideB = typename Kernel::StrideB;
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

inline std::string status_text(cutlass::Status s) { return cutlassGetStatusString(s); }

// can_implement, workspace, initialize, run: each failure raises with the kernel's name and CUTLASS's reason.
template <class Gemm>
void run(const typename Gemm::Arguments& args, cudaStream_t stream, const char* name) {
  Gemm gemm;
  const cutlass::Status ok = gemm.can_implement(args);
  require(ok == cutlass::Status::kSuccess, std::string(name) + ": CUTLASS refuses the problem (" + status_text(ok) + ")");
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

template <class T>
void linear_bias(const T* a, index_t lda, const T* w, index_t ldw, const T* bias, T* d, index_t ldd, int M, int N,
                 int K, cudaStream_t stream) {
  using G = LinearBias<T>;
  typename G::Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGemm,
                                   {M, N, K, 1},
                                   {cptr(a), strided<typename G::StrideA>(lda), cptr(w),
                                    strided<typename G::StrideB>(ldw)},
                                   {{}, nullptr, strided<typename G::StrideD>(ldd), mptr(d),
                                    strided<typename G::StrideD>(ldd)},
                                   hardware_info()};
  args.epilogue.thread.bias_ptr = cptr(bias);
  run<typename G::Gemm>(args, stream, "sm90 linear_bias");
}

template <class T>
using LinearBiasGelu =
    GemmOf<T, RowMajor, ColumnMajor,
           fusion::LinCombPerColBiasEltActAux<RowMajor, Gelu, typename CutlassType<T>::type, float,
                                              typename CutlassType<T>::type, typename CutlassType<T>::type,
                                              typename CutlassType<T>::type, float>>;

template <class T>
void linear_bias_gelu(const T* a, index_t lda, const T* w, index_t ldw, const T* bias, T* h, index_t ldh, T* act,
                      index_t ld_act, int M, int N, int K, bool tanh_form, cudaStream_t stream) {
  using G = LinearBiasGelu<T>;
  typename G::Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGemm,
                                   {M, N, K, 1},
                                   {cptr(a), strided<typename G::StrideA>(lda), cptr(w),
                                    strided<typename G::StrideB>(ldw)},
                                   {{}, nullptr, strided<typename G::StrideD>(ld_act), mptr(act),
                                    strided<typename G::StrideD>(ld_act)},
                                   hardware_info()};
  args.epilogue.thread.bias_ptr = cptr(bias);
  args.epilogue.thread.aux_ptr = mptr(h);
  args.epilogue.thread.dAux = strided<decltype(args.epilogue.thread.dAux)>(ldh);
  args.epilogue.thread.activation.tanh_form = tanh_form ? 1 : 0;
  run<typename G::Gemm>(args, stream, "sm90 linear_bias_gelu");
}

template <class T>
using DGelu = GemmOf<T, RowMajor, RowMajor,
                     fusion::LinCombDeEltAct<RowMajor, GeluGrad, typename CutlassType<T>::type, float,
                                             typename CutlassType<T>::type, typename CutlassType<T>::type, float>>;

template <class T>
void dgelu(const T* dy, index_t ldy, const T* w, index_t ldw, const T* h, index_t ldh, T* dh, index_t lddh, int M,
           int N, int K, bool tanh_form, cudaStream_t stream) {
  using G = DGelu<T>;
  typename G::Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGemm,
                                   {M, N, K, 1},
                                   {cptr(dy), strided<typename G::StrideA>(ldy), cptr(w),
                                    strided<typename G::StrideB>(ldw)},
                                   {{}, nullptr, strided<typename G::StrideD>(lddh), mptr(dh),
                                    strided<typename G::StrideD>(lddh)},
                                   hardware_info()};
  args.epilogue.thread.aux_ptr = cptr(h);
  args.epilogue.thread.dAux = strided<decltype(args.epilogue.thread.dAux)>(ldh);
  args.epilogue.thread.activation.tanh_form = tanh_form ? 1 : 0;
  run<typename G::Gemm>(args, stream, "sm90 dgelu");
}

template <class T>
using MatmulNN =
    GemmOf<T, RowMajor, RowMajor, fusion::LinearCombination<typename CutlassType<T>::type, float, void, float>>;

template <class T>
void matmul_nn(const T* a, index_t lda, const T* b, index_t ldb, T* d, index_t ldd, int M, int N, int K,
               cudaStream_t stream) {
  using G = MatmulNN<T>;
  typename G::Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGemm,
                                   {M, N, K, 1},
                                   {cptr(a), strided<typename G::StrideA>(lda), cptr(b),
                                    strided<typename G::StrideB>(ldb)},
                                   {{}, nullptr, strided<typename G::StrideD>(ldd), mptr(d),
                                    strided<typename G::StrideD>(ldd)},
                                   hardware_info()};
  run<typename G::Gemm>(args, stream, "sm90 matmul_nn");
}

template <class T>
using MatmulWgrad =
    GemmOf<T, ColumnMajor, RowMajor, fusion::LinearCombination<typename CutlassType<T>::type, float, void, float>,
           cutlass::gemm::StreamKScheduler>;

template <class T>
void matmul_tn_wgrad(const T* a, index_t lda, const T* b, index_t ldb, T* d, index_t ldd, int M, int N, int K,
                     cudaStream_t stream) {
  using G = MatmulWgrad<T>;
  typename G::Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGemm,
                                   {M, N, K, 1},
                                   {cptr(a), strided<typename G::StrideA>(lda), cptr(b),
                                    strided<typename G::StrideB>(ldb)},
                                   {{}, nullptr, strided<typename G::StrideD>(ldd), mptr(d),
                                    strided<typename G::StrideD>(ldd)},
                                   hardware_info()};
  // Deterministic: each tile's K-slices are reduced in a fixed order through the fp32 workspace.
  args.scheduler.reduction_mode = G::Kernel::TileScheduler::ReductionMode::Deterministic;
  run<typename G::Gemm>(args, stream, "sm90 matmul_tn_wgrad");
}

template <class G>
KernelFacts facts_of(const char* product, const char* dtype, const char* scheduler) {
  using K = typename G::Kernel;
  return {product, dtype, "128x256x64", "2x1", scheduler, K::CollectiveMainloop::DispatchPolicy::Stages,
          static_cast<int>(K::SharedStorageSize), static_cast<int>(K::MaxThreadsPerBlock)};
}

template <class T>
void describe(std::vector<KernelFacts>& out) {
  const char* dtype = std::is_same_v<T, __half> ? "fp16" : "bf16";
  out.push_back(facts_of<LinearBias<T>>("linear_bias", dtype, "persistent"));
  out.push_back(facts_of<LinearBiasGelu<T>>("linear_bias_gelu", dtype, "persistent"));
  out.push_back(facts_of<DGelu<T>>("dgelu", dtype, "persistent"));
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
  template void vk::sm90::linear_bias_gelu<T>(const T*, index_t, const T*, index_t, const T*, T*, index_t, T*,     \
                                              index_t, int, int, int, bool, cudaStream_t);                          \
  template void vk::sm90::dgelu<T>(const T*, index_t, const T*, index_t, const T*, index_t, T*, index_t, int, int,  \
                                   int, bool, cudaStream_t);                                                        \
  template void vk::sm90::matmul_nn<T>(const T*, index_t, const T*, index_t, T*, index_t, int, int, int,            \
                                       cudaStream_t);                                                               \
  template void vk::sm90::matmul_tn_wgrad<T>(const T*, index_t, const T*, index_t, T*, index_t, int, int, int,      \
                                             cudaStream_t);                                                         \
  template void vk::sm90::describe<T>(std::vector<vk::sm90::KernelFacts>&);
