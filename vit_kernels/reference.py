"""The naive eager versions of the three ops: the definition of "correct".

Tests compare every backend against these (in float64), and the benchmarks time them as
"naive eager". Attention here forms the full (N x N) probability matrix on purpose.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q @ k^T * scale) @ v for q, k, v of shape (B, H, N, D); returns (B, H, N, D)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    scores = q @ k.transpose(-2, -1) * scale  # (B, H, N, N)
    probs = scores.softmax(dim=-1)
    return probs @ v


def fused_qkv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, num_heads: int):
    """x (B, N, C) @ weight (3C, C)^T + bias, split into q, k, v of shape (B, H, N, C // H)."""
    B, N, C = x.shape
    qkv = F.linear(x, weight, bias)  # (B, N, 3C)
    qkv = qkv.reshape(B, N, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)  # (3, B, H, N, D)
    return qkv.unbind(0)


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    if approximate == "tanh":
        return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    return 0.5 * x * (1.0 + torch.erf(x * 0.7071067811865476))


def gelu_mlp(
    x: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    approximate: str = "none",
) -> torch.Tensor:
    """Linear -> GELU -> Linear, written out: x (..., C) -> (..., C_out)."""
    hidden = x @ fc1_weight.t()
    if fc1_bias is not None:
        hidden = hidden + fc1_bias
    out = gelu(hidden, approximate) @ fc2_weight.t()
    if fc2_bias is not None:
        out = out + fc2_bias
    return out
