// What the Hopper GEMMs are (describe) and whether CUTLASS accepts a problem (can_implement), in fp16 and bf16:
// host code over the kernels' types, which launches nothing, so no kernel is compiled here.
#include "gemm_sm90_impl.cuh"

VK_SM90_FOR_16BIT(VK_SM90_FACTS)
