"""The GELU the Triton GEMM epilogues apply (vit_kernels/triton/linear.py), element by element, against float64 torch.

The MLP parity tests see GELU only through two GEMMs, where an error of a few 1e-6 in the activation (a constant
wrong in its 5th digit) disappears under the fp32 tolerance. Here the GEMMs are made exact so that the epilogues
show through: x = H (64, 64) holds the chosen pre-activations, fc1 and fc2 are identity matrices and there are no
biases, so with exact fp32 ("ieee") dots, where every product is by 0 or 1,
  - mlp_fwd:               hidden = H and y = GELU(H)                (the forward epilogue's GELU)
  - mlp_bwd with dy = 1:   dx = (dy @ W2 * GELU'(hidden)) @ W1 = GELU'(H)   (the backward epilogue's GELU')
  - mlp_bwd with dy = I:   dfc2_weight = dy^T @ GELU(hidden) = GELU(H)     (the GELU the backward recomputes)
each compared by maximum absolute error over |h| <= 6 with torch.nn.functional.gelu in float64 and its autograd
derivative, for both forms (erf and tanh).
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import nan_alloc

from vit_kernels import triton as vit_triton
from vit_kernels.triton import linear

# |error| <= ULPS * eps32 * max(|h|, 1): the fp32 evaluation of 0.5 h (1 + erf(h / sqrt 2)) (or the tanh form)
# rounds a few times at the scale of h. Measured under the interpreter (max |error| / (eps32 max(|h|, 1))): value
# 0.81 (erf) and 0.82 (tanh), derivative 0.89 (erf) and 3.3 (tanh: 1 - t^2 and 1 + t cancel). A constant wrong in
# its 5th significant digit moves the value by 2e-6 to 1e-5 near |h| ~ 1.5 (1 / sqrt 2 as 0.7071: 2.8e-6, 17 eps32
# there; 0.044715 as 0.0447: 8e-6, 35 eps32) and the derivative by more (1 / sqrt(2 pi) as 0.3989: 2.5e-5).
VALUE_ULPS, DERIVATIVE_ULPS = 4, 8
H_MAX = 6.0


@pytest.fixture
def pre_activations(device) -> torch.Tensor:
    """(64, 64) fp32 values spread evenly over [-6, 6], both ends and 0 included."""
    values = torch.linspace(-H_MAX, H_MAX, 64 * 64 - 1, dtype=torch.float64)
    values = torch.cat([values, torch.zeros(1, dtype=torch.float64)])
    return values.float().reshape(64, 64).to(device)


def _gelu64(h: torch.Tensor, approximate: str) -> tuple[torch.Tensor, torch.Tensor]:
    """GELU(h) and GELU'(h) in float64: torch's own GELU and its autograd derivative."""
    h = h.detach().double().requires_grad_(True)
    value = F.gelu(h, approximate=approximate)
    (derivative,) = torch.autograd.grad(value.sum(), h)
    return value.detach(), derivative


def _check_elementwise(name: str, got: torch.Tensor, ref: torch.Tensor, h: torch.Tensor, ulps: int) -> None:
    assert torch.isfinite(got).all(), f"{name}: not finite"
    err = (got.double() - ref).abs()
    bound = ulps * torch.finfo(torch.float32).eps * h.double().abs().clamp_min(1.0)
    worst = int((err / bound).argmax())
    assert (err <= bound).all(), (
        f"{name}: |error| {err.flatten()[worst]:.3g} at h = {h.flatten()[worst]:.4f} over {ulps} eps32 * max(|h|, 1)"
        f" (max |error| over |h| <= {H_MAX}: {err.max():.3g})"
    )


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_epilogues_match_float64(device, pre_activations, approximate, monkeypatch):
    monkeypatch.setattr(vit_triton, "alloc", nan_alloc)
    h = pre_activations
    eye = torch.eye(64, device=device)
    value_ref, derivative_ref = _gelu64(h, approximate)

    y, hidden = linear.mlp_fwd(h, eye, None, eye, None, approximate, False)
    assert torch.equal(hidden, h), "the identity fc1 must hand the epilogue exactly H"
    _check_elementwise(f"forward GELU ({approximate})", y, value_ref, h, VALUE_ULPS)

    dx, *_ = linear.mlp_bwd(torch.ones_like(h), h, eye, eye, hidden, False, False, approximate, False)
    _check_elementwise(f"backward GELU' ({approximate})", dx, derivative_ref, h, DERIVATIVE_ULPS)

    _dx, _dw1, _db1, dw2, _db2 = linear.mlp_bwd(eye, h, eye, eye, hidden, False, False, approximate, False)
    _check_elementwise(f"backward's recomputed GELU ({approximate})", dw2, value_ref, h, VALUE_ULPS)
    # Forward and backward evaluate GELU with different formulas (the backward shares erf / tanh with GELU'), so
    # the two may differ by rounding, never by more.
    _check_elementwise(f"forward vs backward GELU ({approximate})", dw2, y.double(), h, VALUE_ULPS)
