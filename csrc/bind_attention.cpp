// pybind11 bindings of the flash-attention launchers in attention_fwd.cu and attention_bwd.cu: device pointers and
// the stream as integers, (B, H, N) strides in elements as 3-tuples (unit stride along D), dtype as DType code.
// Wrapped by vit_kernels/cuda/attention.py. Precondition failures (std::invalid_argument) arrive in Python
// as ValueError, CUDA errors (std::runtime_error from check_cuda / check_launch) as RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>

namespace vk {

using index_t = int64_t;
using Strides3 = std::array<index_t, 3>;

void attention_fwd(uintptr_t q, Strides3 q_strides, uintptr_t k, Strides3 k_strides, uintptr_t v, Strides3 v_strides,
                   uintptr_t out, Strides3 out_strides, uintptr_t lse, index_t B, index_t H, index_t N, index_t D,
                   double scale, int dtype, uintptr_t stream);
void attention_bwd(uintptr_t dout, Strides3 dout_strides, uintptr_t q, Strides3 q_strides, uintptr_t k,
                   Strides3 k_strides, uintptr_t v, Strides3 v_strides, uintptr_t out, Strides3 out_strides,
                   uintptr_t lse, uintptr_t delta, uintptr_t dq, uintptr_t dk, uintptr_t dv, Strides3 grad_strides,
                   index_t B, index_t H, index_t N, index_t D, double scale, int dtype, uintptr_t stream);

void bind_attention(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("attention_fwd", &attention_fwd,
        "flash attention forward: out (B, H, N, D) at out_strides and lse (B, H, N) fp32 contiguous "
        "= softmax(q @ k^T * scale) @ v and its natural-log log-sum-exp",
        py::arg("q"), py::arg("q_strides"), py::arg("k"), py::arg("k_strides"), py::arg("v"), py::arg("v_strides"),
        py::arg("out"), py::arg("out_strides"), py::arg("lse"), py::arg("B"), py::arg("H"), py::arg("N"),
        py::arg("D"), py::arg("scale"), py::arg("dtype"), py::arg("stream"));
  m.def("attention_bwd", &attention_bwd,
        "flash attention backward: dq, dk, dv (B, H, N, D) at grad_strides (one layout for the three); delta (B, H, "
        "N) fp32 is scratch",
        py::arg("dout"), py::arg("dout_strides"), py::arg("q"), py::arg("q_strides"), py::arg("k"),
        py::arg("k_strides"), py::arg("v"), py::arg("v_strides"), py::arg("out"), py::arg("out_strides"),
        py::arg("lse"), py::arg("delta"), py::arg("dq"), py::arg("dk"), py::arg("dv"), py::arg("grad_strides"),
        py::arg("B"), py::arg("H"), py::arg("N"), py::arg("D"), py::arg("scale"), py::arg("dtype"),
        py::arg("stream"));
}

}  // namespace vk
