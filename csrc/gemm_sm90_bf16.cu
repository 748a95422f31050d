// The Hopper GEMMs (gemm_sm90_impl.cuh) for bf16, built for sm_90a only.
#include "gemm_sm90_impl.cuh"

using vk::sm90::index_t;
VK_SM90_INSTANTIATE(__nv_bfloat16)
