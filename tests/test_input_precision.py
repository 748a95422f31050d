"""Which dot precision every Triton launch is given, for each dtype and each torch matmul precision.

The interpreter used to ignore `input_precision` (conftest.py now makes it truncate fp32 operands for "tf32"), and a
GPU only shows the difference as ~1e-3 of error, so this checks the launches themselves: every module-level
`@triton.jit` kernel of vit_kernels.triton is wrapped with a recorder, and the public ops run forward and backward.
  fp32, torch.get_float32_matmul_precision() == "highest" (PyTorch's default) -> "ieee" (exact fp32 dots)
  fp32, "high" or "medium"                                                 -> "tf32"
  fp16 / bf16, any setting                                                  -> "tf32": the launchers' one value for
      16-bit dots, whose products are exact with fp32 accumulation whatever the flag (it only picks fp32's path)
"""

import pytest
import torch
from conftest import spy_triton_launches

import vit_kernels as vk
from vit_kernels import triton as vit_triton
from vit_kernels.triton import attention as triton_attention
from vit_kernels.triton import linear as triton_linear
from vit_kernels.triton import tma_gemm

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


@pytest.fixture
def launches(monkeypatch):
    """The (kernel name, INPUT_PRECISION) of every Triton launch made while the test runs."""
    return spy_triton_launches(
        monkeypatch,
        (triton_attention, triton_linear, tma_gemm),
        lambda name, grid, args, kwargs: (name, kwargs.get("INPUT_PRECISION")),
    )


@pytest.fixture
def matmul_precision():
    old = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(old)


def _run_ops(dtype, device):
    """Forward and backward of the three public ops on the triton backend."""
    B, N, C, H = 1, 9, 64, 2
    x = torch.randn(B, N, C, device=device).to(dtype).requires_grad_(True)
    w_qkv = (torch.randn(3 * C, C, device=device) * C**-0.5).to(dtype).requires_grad_(True)
    w1 = (torch.randn(2 * C, C, device=device) * C**-0.5).to(dtype).requires_grad_(True)
    w2 = (torch.randn(C, 2 * C, device=device) * C**-0.5).to(dtype).requires_grad_(True)
    q, k, v = vk.fused_qkv(x, w_qkv, None, num_heads=H, backend="triton")
    o = vk.attention(q, k, v, backend="triton")
    y = vk.gelu_mlp(o.transpose(1, 2).reshape(B, N, C), w1, None, w2, None, backend="triton")
    y.backward(torch.randn_like(y))  # a real gradient: y.sum()'s stride-0 ones go to the pointer kernel (no TMA)


# GEMM launches: qkv 1 forward + 2 backward; mlp 2 forward + 4 backward. Attention: forward, dK/dV, dQ (the
# backward's delta preprocess has no dot and takes no precision).
ATTENTION_DOT_LAUNCHES = {"_attn_fwd_kernel": 1, "_attn_bwd_dkdv_kernel": 1, "_attn_bwd_dq_kernel": 1}
# The same nine GEMMs on each path: linear.py's pointer kernel (exact fp32, sm_80), or the entry kernels of
# tma_gemm.py (Hopper and the interpreter, 16-bit and tf32): the eager fused_qkv writes one packed (B, N, 3C)
# buffer with a plain store, and 9 tokens are too few to split the weight gradients.
GEMM_DOT_LAUNCHES = {
    "pointer": {"_gemm_kernel": 9},
    "tma": {"_gelu_kernel": 1, "_dgelu_kernel": 1, "_store_kernel": 7},
}


@pytest.mark.parametrize(
    "dtype, setting, expected",
    [
        (F32, "highest", "ieee"),
        (F32, "high", "tf32"),
        (F32, "medium", "tf32"),
        (F16, "highest", "tf32"),
        (BF16, "highest", "tf32"),
        (BF16, "high", "tf32"),
    ],
)
def test_each_launch_gets_the_precision_asked_for(launches, matmul_precision, device, dtype, setting, expected):
    matmul_precision(setting)
    _run_ops(dtype, device)
    counts = {}
    for name, precision in launches:
        if precision is not None:
            counts[name] = counts.get(name, 0) + 1
            assert precision == expected, f"{name} launched with {precision!r}, expected {expected!r}"
    arch = vit_triton.arch(torch.empty(0, device=device).device)
    path = "tma" if expected == "tf32" and arch in triton_linear.TMA_ARCHS else "pointer"
    assert counts == {**GEMM_DOT_LAUNCHES[path], **ATTENTION_DOT_LAUNCHES}, f"launches with a dot: {counts}"
