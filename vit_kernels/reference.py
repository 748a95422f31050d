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


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim, written out: two passes (mean, then the mean of squared deviations)."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def ln_fused_qkv(x, ln_weight, ln_bias, eps, weight, bias, num_heads):
    """fused_qkv(LN(x)): x (B, N, C) -> q, k, v (B, H, N, C // H)."""
    return fused_qkv(layer_norm(x, ln_weight, ln_bias, eps), weight, bias, num_heads)


def proj_residual(o: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor):
    """residual + o @ weight^T + bias: o (B, N, C_in), weight (C, C_in), residual (B, N, C)."""
    out = o @ weight.t()
    if bias is not None:
        out = out + bias
    return residual + out


def ln_gelu_mlp(x, ln_weight, ln_bias, eps, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate="none",
                residual=True):  # fmt: skip
    """x + gelu_mlp(LN(x)) (without `x +` when residual is False): x (B, N, C) -> (B, N, C_out)."""
    out = gelu_mlp(layer_norm(x, ln_weight, ln_bias, eps), fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate)
    return x + out if residual else out
