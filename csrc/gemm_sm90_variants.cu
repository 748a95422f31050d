// Configuration variants of the sm_90a linear_bias GEMM (bf16 only), built to be timed beside the shipped
// configuration (Sm90Tile: cooperative 128 x 256 x 64, 2 x 1 cluster) by benchmarks/probe_gemm.py, so that one GPU
// run can choose between them. No op runs them. The candidates are the two benchmarks/NOTES.md names for a product
// that comes out under cuBLAS: a 1 x 1 cluster (no multicast barrier), and the ping-pong schedule, where each
// consumer warpgroup owns a 128 x 128 tile and one tile's epilogue overlaps the other warpgroup's mainloop.
#include <stdexcept>

#include "gemm_sm90_impl.cuh"

namespace vk {
namespace sm90 {

struct Sm90TileCluster1x1 : Sm90Tile {
  using Cluster = cute::Shape<cute::_1, cute::_1, cute::_1>;
  static constexpr const char* kCluster = "1x1";
};

struct Sm90Tall1x2 : Sm90Tile {
  using Tile = cute::Shape<cute::_256, cute::_128, cute::_64>;  // each consumer warpgroup: 128 x 128
  using Cluster = cute::Shape<cute::_1, cute::_2, cute::_1>;    // the A tile multicast to two N neighbours
  static constexpr const char* kTile = "256x128x64";
  static constexpr const char* kCluster = "1x2";
};

struct Sm90PingPong {
  using Tile = cute::Shape<cute::_128, cute::_128, cute::_64>;  // one consumer warpgroup's tile: 2 x wgmma 64 x 128
  using Cluster = cute::Shape<cute::_2, cute::_1, cute::_1>;
  using Mainloop = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
  using Epilogue = cutlass::epilogue::TmaWarpSpecialized;
  static constexpr int kAlign = 8;
  static constexpr const char* kTile = "128x128x64";
  static constexpr const char* kCluster = "2x1";
  static constexpr const char* kSchedule = "pingpong";
};

template <class Cfg>
using LinearBiasBf16 =
    GemmOf<__nv_bfloat16, RowMajor, ColumnMajor,
           fusion::LinCombPerColBias<cutlass::bfloat16_t, float, cutlass::bfloat16_t, cutlass::bfloat16_t, float>,
           cutlass::gemm::PersistentScheduler, void, Cfg>;

const char* const kLinearBiasVariants[3] = {"cooperative_cluster1x1", "pingpong_128x128",
                                            "cooperative_256x128_cluster1x2"};

template <class Cfg>
void run_variant(const __nv_bfloat16* a, index_t lda, const __nv_bfloat16* w, index_t ldw, const __nv_bfloat16* bias,
                 __nv_bfloat16* d, index_t ldd, int M, int N, int K, cudaStream_t stream, const char* name) {
  using G = LinearBiasBf16<Cfg>;
  const auto args = linear_bias_args<__nv_bfloat16, G>(a, lda, w, ldw, bias, d, ldd, M, N, K, hardware_info());
  run<typename G::Gemm>(args, stream, name);
}

void linear_bias_variant(const std::string& variant, const __nv_bfloat16* a, index_t lda, const __nv_bfloat16* w,
                         index_t ldw, const __nv_bfloat16* bias, __nv_bfloat16* d, index_t ldd, int M, int N, int K,
                         cudaStream_t stream) {
  if (variant == kLinearBiasVariants[0]) {
    run_variant<Sm90TileCluster1x1>(a, lda, w, ldw, bias, d, ldd, M, N, K, stream,
                                    "sm90 linear_bias cooperative_cluster1x1");
  } else if (variant == kLinearBiasVariants[1]) {
    run_variant<Sm90PingPong>(a, lda, w, ldw, bias, d, ldd, M, N, K, stream, "sm90 linear_bias pingpong_128x128");
  } else if (variant == kLinearBiasVariants[2]) {
    run_variant<Sm90Tall1x2>(a, lda, w, ldw, bias, d, ldd, M, N, K, stream,
                             "sm90 linear_bias cooperative_256x128_cluster1x2");
  } else {
    throw std::invalid_argument("unknown linear_bias variant '" + variant +
                                "' (built: cooperative_cluster1x1, pingpong_128x128, "
                                "cooperative_256x128_cluster1x2)");
  }
}

void describe_variants(std::vector<KernelFacts>& out) {
  out.push_back(facts_of<LinearBiasBf16<Sm90TileCluster1x1>>("linear_bias", "bf16", "persistent"));
  out.back().variant = kLinearBiasVariants[0];
  out.push_back(facts_of<LinearBiasBf16<Sm90PingPong>>("linear_bias", "bf16", "persistent"));
  out.back().variant = kLinearBiasVariants[1];
  out.push_back(facts_of<LinearBiasBf16<Sm90Tall1x2>>("linear_bias", "bf16", "persistent"));
  out.back().variant = kLinearBiasVariants[2];
}

}  // namespace sm90
}  // namespace vk
