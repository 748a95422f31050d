"""The `torch` backend: PyTorch's own fused primitives, what a user would pick instead of this package.

It is also what `backend="auto"` runs on CPU, so a CPU user never gets the naive reference path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def fused_qkv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, num_heads: int):
    B, N, C = x.shape
    qkv = F.linear(x, weight, bias).reshape(B, N, 3, num_heads, C // num_heads)
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)  # views, no copy: SDPA takes any strides


def gelu_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate: str) -> torch.Tensor:
    return F.linear(F.gelu(F.linear(x, fc1_weight, fc1_bias), approximate=approximate), fc2_weight, fc2_bias)
