// The Hopper GEMM linear_bias_gelu (gemm_sm90.h) in fp16 and bf16, built for sm_90a only.
#include "gemm_sm90_impl.cuh"

using vk::sm90::index_t;
VK_SM90_FOR_16BIT(VK_SM90_LINEAR_BIAS_GELU)
