// pybind11 bindings of the GEMM launchers in gemm.cu: device pointers and the stream as integers, sizes
// and row strides in elements, dtype as DType code. Wrapped by vit_kernels/cuda/linear.py.
// Precondition failures (std::invalid_argument) arrive in Python as ValueError, CUDA errors as RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <string>
#include <vector>

#include "gemm_sm90.h"

namespace vk {

using index_t = int64_t;

void gemm_qkv_fwd(uintptr_t x, index_t ldx, uintptr_t w, index_t ldw, uintptr_t bias, uintptr_t q, uintptr_t k,
                  uintptr_t v, index_t batch, index_t tokens, index_t channels, index_t heads, int dtype,
                  uintptr_t stream);
void gemm_qkv_bwd(uintptr_t dq, uintptr_t dk, uintptr_t dv, index_t s_b, index_t s_h, index_t s_t, uintptr_t x,
                  index_t ldx, uintptr_t w, index_t ldw, uintptr_t dx, uintptr_t dw, uintptr_t dbias,
                  uintptr_t scratch, index_t scratch_floats, index_t batch, index_t tokens, index_t channels,
                  index_t heads, int dtype, uintptr_t stream);
void gemm_mlp_fwd(uintptr_t x, index_t ldx, uintptr_t w1, index_t ldw1, uintptr_t b1, uintptr_t w2, index_t ldw2,
                  uintptr_t b2, uintptr_t res, index_t ld_res, uintptr_t hidden, uintptr_t act, uintptr_t y,
                  index_t M, index_t C, index_t Hd, index_t Cout, bool tanh_form, int dtype, uintptr_t stream);
void gemm_mlp_bwd(uintptr_t dy, index_t ldy, uintptr_t x, index_t ldx, uintptr_t w1, index_t ldw1, uintptr_t w2,
                  index_t ldw2, uintptr_t hidden, index_t ldh, uintptr_t dhidden, uintptr_t act, uintptr_t dx,
                  uintptr_t dw1, uintptr_t db1, uintptr_t dw2, uintptr_t db2, uintptr_t scratch,
                  index_t scratch_floats, index_t M, index_t C, index_t Hd, index_t Cout, bool tanh_form, int dtype,
                  uintptr_t stream);
void gemm_linear_fwd(uintptr_t a, index_t lda, uintptr_t w, index_t ldw, uintptr_t bias, uintptr_t res,
                     index_t ld_res, uintptr_t out, index_t ldo, index_t M, index_t N, index_t K, int dtype,
                     uintptr_t stream);
void gemm_linear_bwd(uintptr_t dout, index_t ld_dout, uintptr_t a, index_t lda, uintptr_t w, index_t ldw,
                     uintptr_t da, uintptr_t dw, uintptr_t dbias, uintptr_t scratch, index_t scratch_floats,
                     index_t M, index_t N, index_t K, int dtype, uintptr_t stream);
// The same products on the Hopper GEMMs (gemm_sm90_impl.cuh via gemm.cu): fp16/bf16, compute capability 9.0.
void gemm_qkv_fwd_sm90(uintptr_t x, index_t ldx, uintptr_t w, index_t ldw, uintptr_t bias, uintptr_t qkv,
                       uintptr_t q, uintptr_t k, uintptr_t v, index_t batch, index_t tokens, index_t channels,
                       index_t heads, int dtype, uintptr_t stream);
void gemm_mlp_fwd_sm90(uintptr_t x, index_t ldx, uintptr_t w1, index_t ldw1, uintptr_t b1, uintptr_t w2,
                       index_t ldw2, uintptr_t b2, uintptr_t res, index_t ld_res, uintptr_t hidden, uintptr_t act,
                       uintptr_t y, index_t M, index_t C, index_t Hd, index_t Cout, bool tanh_form, int dtype,
                       uintptr_t stream);
void gemm_mlp_bwd_sm90(uintptr_t dy, index_t ldy, uintptr_t x, index_t ldx, uintptr_t w1, index_t ldw1, uintptr_t w2,
                       index_t ldw2, uintptr_t hidden, index_t ldh, uintptr_t dhidden, uintptr_t act, uintptr_t dx,
                       uintptr_t dw1, uintptr_t db1, uintptr_t dw2, uintptr_t db2, uintptr_t scratch,
                       index_t scratch_floats, index_t M, index_t C, index_t Hd, index_t Cout, bool tanh_form,
                       bool act_in_epilogue, bool dfc1_bias_in_epilogue, int dtype, uintptr_t stream);
void gemm_linear_fwd_sm90(uintptr_t a, index_t lda, uintptr_t w, index_t ldw, uintptr_t bias, uintptr_t res,
                          index_t ld_res, uintptr_t out, index_t ldo, index_t M, index_t N, index_t K, int dtype,
                          uintptr_t stream);
void gemm_linear_bwd_sm90(uintptr_t dout, index_t ld_dout, uintptr_t a, index_t lda, uintptr_t w, index_t ldw,
                          uintptr_t da, uintptr_t dw, uintptr_t dbias, uintptr_t scratch, index_t scratch_floats,
                          index_t M, index_t N, index_t K, int dtype, uintptr_t stream);
void gemm_linear_fwd_sm90_variant(const std::string& variant, uintptr_t a, index_t lda, uintptr_t w, index_t ldw,
                                  uintptr_t bias, uintptr_t out, index_t ldo, index_t M, index_t N, index_t K,
                                  int dtype, uintptr_t stream);

// One dict per sm_90a GEMM instantiation (empty without them): product, dtype, tile, cluster, schedule (cooperative
// or pingpong), scheduler, mainloop stages, dynamic shared memory, threads per CTA, and variant ("" for the kernels
// the ops run, else the name linear_fwd_sm90_variant takes).
pybind11::list sm90_gemm_kernels() {
  std::vector<sm90::KernelFacts> facts;
#if defined(VK_HAVE_SM90_GEMM)
  sm90::describe<__nv_bfloat16>(facts);
  sm90::describe<__half>(facts);
  sm90::describe_variants(facts);
#endif
  pybind11::list out;
  for (const auto& f : facts) {
    pybind11::dict d;
    d["product"] = f.product;
    d["dtype"] = f.dtype;
    d["tile"] = f.tile;
    d["cluster"] = f.cluster;
    d["schedule"] = f.schedule;
    d["scheduler"] = f.scheduler;
    d["stages"] = f.stages;
    d["smem_bytes"] = f.smem_bytes;
    d["threads"] = f.threads;
    d["variant"] = f.variant;
    out.append(d);
  }
  return out;
}

// CUTLASS's can_implement for one sm_90a product, without a GPU: "" if accepted, else its reason.
std::string sm90_can_implement(const std::string& product, int dtype, int M, int N, int K) {
#if defined(VK_HAVE_SM90_GEMM)
  return dtype == 1 ? sm90::can_implement<__half>(product, M, N, K)
                    : sm90::can_implement<__nv_bfloat16>(product, M, N, K);
#else
  (void)product, (void)dtype, (void)M, (void)N, (void)K;
  return "this build has no sm_90a GEMMs";
#endif
}

void bind_gemm(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("sm90_can_implement", &sm90_can_implement,
        "CUTLASS's can_implement of an sm_90a product (see gemm_sm90.h) at M, N, K with packed operands, on the "
        "host: '' if accepted, else why",
        py::arg("product"), py::arg("dtype"), py::arg("M"), py::arg("N"), py::arg("K"));
  m.def("sm90_gemm_kernels", &sm90_gemm_kernels,
        "the sm_90a GEMM instantiations: product, dtype, tile, cluster, scheduler, stages, smem_bytes, threads");
  m.def("qkv_fwd", &gemm_qkv_fwd,
        "q, k, v (B, H, N, D) contiguous = head split of x (B*N, C) @ weight (3C, C)^T + bias (3C,) or 0",
        py::arg("x"), py::arg("ldx"), py::arg("weight"), py::arg("ldw"), py::arg("bias"), py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("batch"), py::arg("tokens"), py::arg("channels"), py::arg("heads"), py::arg("dtype"),
        py::arg("stream"));
  m.def("qkv_bwd", &gemm_qkv_bwd,
        "dx (B*N, C), dweight (3C, C), dbias (3C,) or 0 from dq, dk, dv (B, H, N, D) sharing strides (s_b, s_h, s_t, 1); "
        "the bias sum goes through scratch (scratch_floats fp32)",
        py::arg("dq"), py::arg("dk"), py::arg("dv"), py::arg("s_b"), py::arg("s_h"), py::arg("s_t"), py::arg("x"),
        py::arg("ldx"), py::arg("weight"), py::arg("ldw"), py::arg("dx"), py::arg("dweight"), py::arg("dbias"),
        py::arg("scratch"), py::arg("scratch_floats"), py::arg("batch"), py::arg("tokens"), py::arg("channels"), py::arg("heads"), py::arg("dtype"),
        py::arg("stream"));
  m.def("mlp_fwd", &gemm_mlp_fwd,
        "hidden = x @ fc1_weight^T + fc1_bias (0: not stored), act = gelu(hidden) (scratch), "
        "y = act @ fc2_weight^T + fc2_bias + residual (0: none, row stride ld_res)",
        py::arg("x"), py::arg("ldx"), py::arg("fc1_weight"), py::arg("ldw1"), py::arg("fc1_bias"),
        py::arg("fc2_weight"), py::arg("ldw2"), py::arg("fc2_bias"), py::arg("residual"), py::arg("ld_res"),
        py::arg("hidden"), py::arg("act"), py::arg("y"), py::arg("M"), py::arg("C"), py::arg("hidden_features"),
        py::arg("C_out"), py::arg("tanh"), py::arg("dtype"), py::arg("stream"));
  m.def("mlp_bwd", &gemm_mlp_bwd,
        "dx, dfc1_weight, dfc1_bias (or 0), dfc2_weight, dfc2_bias (or 0) of the GELU-MLP; dhidden, act and "
        "scratch (scratch_floats fp32, for the bias sums) are scratch",
        py::arg("dy"), py::arg("ldy"), py::arg("x"), py::arg("ldx"), py::arg("fc1_weight"), py::arg("ldw1"),
        py::arg("fc2_weight"), py::arg("ldw2"), py::arg("hidden"), py::arg("ldh"), py::arg("dhidden"), py::arg("act"),
        py::arg("dx"), py::arg("dfc1_weight"), py::arg("dfc1_bias"), py::arg("dfc2_weight"), py::arg("dfc2_bias"),
        py::arg("scratch"), py::arg("scratch_floats"), py::arg("M"), py::arg("C"), py::arg("hidden_features"), py::arg("C_out"), py::arg("tanh"), py::arg("dtype"),
        py::arg("stream"));
  m.def("linear_fwd", &gemm_linear_fwd,
        "out (M, N) = a (M, K) @ weight (N, K)^T + bias (or 0) + residual (or 0, row stride ld_res)", py::arg("a"),
        py::arg("lda"), py::arg("weight"), py::arg("ldw"), py::arg("bias"), py::arg("residual"), py::arg("ld_res"),
        py::arg("out"), py::arg("ldo"), py::arg("M"), py::arg("N"), py::arg("K"), py::arg("dtype"), py::arg("stream"));
  m.def("linear_bwd", &gemm_linear_bwd,
        "da (M, K) = dout @ weight, dweight (N, K) = dout^T @ a, dbias (N,) or 0 = column sums of dout through "
        "scratch (scratch_floats fp32)",
        py::arg("dout"), py::arg("ld_dout"), py::arg("a"), py::arg("lda"), py::arg("weight"), py::arg("ldw"),
        py::arg("da"), py::arg("dweight"), py::arg("dbias"), py::arg("scratch"), py::arg("scratch_floats"),
        py::arg("M"), py::arg("N"), py::arg("K"), py::arg("dtype"), py::arg("stream"));
  m.def("linear_fwd_sm90", &gemm_linear_fwd_sm90, "as linear_fwd, on the sm_90a GEMMs", py::arg("a"), py::arg("lda"),
        py::arg("weight"), py::arg("ldw"), py::arg("bias"), py::arg("residual"), py::arg("ld_res"), py::arg("out"),
        py::arg("ldo"), py::arg("M"), py::arg("N"), py::arg("K"), py::arg("dtype"), py::arg("stream"));
  m.def("linear_bwd_sm90", &gemm_linear_bwd_sm90, "as linear_bwd, on the sm_90a GEMMs", py::arg("dout"),
        py::arg("ld_dout"), py::arg("a"), py::arg("lda"), py::arg("weight"), py::arg("ldw"), py::arg("da"),
        py::arg("dweight"), py::arg("dbias"), py::arg("scratch"), py::arg("scratch_floats"), py::arg("M"),
        py::arg("N"), py::arg("K"), py::arg("dtype"), py::arg("stream"));
  m.def("qkv_fwd_sm90", &gemm_qkv_fwd_sm90,
        "as qkv_fwd on the sm_90a GEMMs: the product goes to qkv (B*N, 3C) scratch, then a split pass to q, k, v",
        py::arg("x"), py::arg("ldx"), py::arg("weight"), py::arg("ldw"), py::arg("bias"), py::arg("qkv"), py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("batch"), py::arg("tokens"), py::arg("channels"), py::arg("heads"),
        py::arg("dtype"), py::arg("stream"));
  m.def("linear_fwd_sm90_variant", &gemm_linear_fwd_sm90_variant,
        "as linear_fwd_sm90 without the residual, on a configuration variant of the sm_90a linear_bias GEMM (bf16; "
        "the names are sm90_gemm_kernels()' variant fields): for benchmarks/probe_gemm.py",
        py::arg("variant"), py::arg("a"), py::arg("lda"), py::arg("weight"), py::arg("ldw"), py::arg("bias"),
        py::arg("out"), py::arg("ldo"), py::arg("M"), py::arg("N"), py::arg("K"), py::arg("dtype"), py::arg("stream"));
  m.def("mlp_fwd_sm90", &gemm_mlp_fwd_sm90, "as mlp_fwd, on the sm_90a GEMMs", py::arg("x"), py::arg("ldx"),
        py::arg("fc1_weight"), py::arg("ldw1"), py::arg("fc1_bias"), py::arg("fc2_weight"), py::arg("ldw2"),
        py::arg("fc2_bias"), py::arg("residual"), py::arg("ld_res"), py::arg("hidden"), py::arg("act"), py::arg("y"),
        py::arg("M"), py::arg("C"), py::arg("hidden_features"), py::arg("C_out"), py::arg("tanh"), py::arg("dtype"),
        py::arg("stream"));
  m.def("mlp_bwd_sm90", &gemm_mlp_bwd_sm90, "as mlp_bwd, on the sm_90a GEMMs", py::arg("dy"), py::arg("ldy"),
        py::arg("x"), py::arg("ldx"), py::arg("fc1_weight"), py::arg("ldw1"), py::arg("fc2_weight"), py::arg("ldw2"),
        py::arg("hidden"), py::arg("ldh"), py::arg("dhidden"), py::arg("act"), py::arg("dx"), py::arg("dfc1_weight"),
        py::arg("dfc1_bias"), py::arg("dfc2_weight"), py::arg("dfc2_bias"), py::arg("scratch"),
        py::arg("scratch_floats"), py::arg("M"), py::arg("C"), py::arg("hidden_features"), py::arg("C_out"),
        py::arg("tanh"), py::arg("act_in_epilogue"), py::arg("dfc1_bias_in_epilogue"), py::arg("dtype"),
        py::arg("stream"));
  m.def(
      "sm90_dgelu_colsums_floats", [](index_t M, index_t N) { return sm90::DGeluColSumsFloats(M, N); },
      "the fp32 scratch (floats) the sm_90a d-GELU epilogue's per-tile column sums of an (M, N) dhidden take",
      py::arg("M"), py::arg("N"));
}

}  // namespace vk
