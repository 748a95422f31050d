// pybind11 module vit_kernels._C: raw pointers, sizes, strides and the caller's stream in; launchers run;
// errors come back as Python exceptions. No torch headers, so it loads under any torch version.
#include <pybind11/pybind11.h>

#include "common.cuh"

namespace py = pybind11;

// Each op's launchers are bound in its own file (bind_attention.cpp, bind_gemm.cpp).
namespace vk {
void bind_attention(py::module_& m);
void bind_gemm(py::module_& m);
}  // namespace vk

namespace {

py::dict build_info() {
  py::dict info;
  info["cuda_version"] = CUDART_VERSION;
  info["nvcc_version"] = VK_NVCC_VERSION;
  info["archs"] = VK_CUDA_ARCHS;
  info["cuda_flags"] = VK_CUDA_FLAGS;
  // The Hopper GEMMs: "CUTLASS <version> (<headers>)" when built, else why not (the cuda backend then runs the
  // mma.sync GEMMs on sm_90 too).
  info["sm90_gemm"] = VK_SM90_GEMM;
#if defined(VK_HAVE_SM90_GEMM)
  info["sm90_gemm_built"] = true;
#else
  info["sm90_gemm_built"] = false;
#endif
  return info;
}

// Number of visible devices; raises (with CUDA's reason, e.g. error 35 when there is no driver) if the
// runtime cannot start, so callers learn why before passing any pointer.
int device_count() {
  int count = 0;
  vk::check_cuda(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
  return count;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "vit-kernels CUDA C++ kernels (raw-pointer interface; see vit_kernels/cuda.py)";
  m.def("build_info", &build_info, "CUDA version, target archs and compile flags of this build");
  m.def("device_count", &device_count, "visible CUDA devices; raises RuntimeError if the CUDA runtime cannot start");
  vk::bind_attention(m);
  vk::bind_gemm(m);
}
