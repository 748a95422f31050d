"""CUDA C++ backend of the fused QKV projection and the GELU-MLP: tensors -> `vit_kernels._C` GEMM launchers.

Implements the linear part of the kernel-module contract (`vit_kernels/ops/fused_qkv.py`, `ops/gelu_mlp.py`: qkv_fwd,
qkv_bwd, mlp_fwd, mlp_bwd) with the kernels of csrc/gemm.cu. Every GEMM there is C = epilogue(A @ B^T) with A and B
given by pointer and strides, so x @ W^T, dY @ W and dY^T @ X run without transposed copies, and the QKV gradient dQKV
(M, 3C) is read in place from dq, dk, dv.

Layout rules (the only copies made here): fp16/bf16 operands are read in 16-byte chunks, so a 2-D operand
needs unit column stride, a row stride that is a multiple of 8 elements and a 16-byte aligned start
(`_rows`); dq, dk, dv need shared strides with unit stride along D (`_heads`). An input that breaks them
(a transposed or oddly offset view) is copied once to a contiguous tensor; the kernels would reject it.

Two GEMM paths (`gemm_path` says which runs, and `vk.explain_backend` quotes it):
- Hopper (compute capability 9.0, fp16/bf16, a build with CUTLASS's headers): csrc/gemm_sm90_impl.cuh, CUTLASS 3
  collectives (TMA, warp-specialised wgmma, persistent cooperative 128 x 256 x 64 tiles, 2 x 1 clusters) with
  the bias, bias + residual, bias + GELU (+ the pre-activation as aux, unless no autograd needs it) and d-GELU
  epilogues; weight gradients on the stream-K scheduler with its deterministic reduction. Operands are plain
  row-major matrices read by TMA, so fused_qkv's head split is not an epilogue here. The eager path (`packed=True`,
  PACKED_QKV) needs none: one GEMM writes the (B, N, 3, H, D) buffer whose q / k / v slices it returns. The
  custom op, whose outputs may not alias, gets the product in a (B*N, 3C) scratch that a 16-byte-per-thread pass
  splits (TMA stores need one strided 2-D box per tile; the (which, head, d) scatter is not one). The backward
  reads dq, dk, dv as one (B*N, 3C) matrix, in place when they are views of one packed tensor (what the eager
  path's attention backward writes: cuda/attention.py's PACKED_GRADS), else packed by one copy each.
- everywhere else (sm_80, fp32, or no CUTLASS at build time): csrc/gemm.cu's mma.sync / SIMT kernels above.

`linear_fwd` / `linear_bwd` (one GEMM with a bias and residual epilogue, and its backward) and mlp_fwd's residual
serve the block ops (vit_kernels/cuda/block.py).

Precision: fp16/bf16 on tensor cores with fp32 accumulation, outputs rounded once. fp32 runs a SIMT
kernel in full fp32, so `allow_tf32` is accepted for the contract and ignored.
"""

from __future__ import annotations

import functools

import torch

from vit_kernels import cuda as vit_cuda
from vit_kernels.cuda import check_cuda_tensors, check_like, dtype_code, extension, ptr, stream_of

# csrc/gemm.cu's kColsumMaxSplits: a bias gradient (column sum) adds up to this many row splits' fp32 partial
# sums, so its scratch holds this many rows of column sums.
_COLSUM_MAX_SPLITS = 64


# What the sm_90a d-GELU epilogue writes beside dhidden (sm90::dgelu_act). SM90_ACT_IN_EPILOGUE: act = gelu(hidden)
# (else a row pass re-reads hidden); SM90_DFC1_BIAS_IN_EPILOGUE: dfc1_bias's per-tile partial sums, added by one
# finishing pass (else the two-pass column sum re-reads dhidden). benchmarks/probe_gemm.py times both off beside
# both on; the rule that picks is in benchmarks/NOTES.md (off since the H200 run of 2026-12-04-2: the epilogue
# made the whole mlp_bwd 1.7x slower).
SM90_ACT_IN_EPILOGUE = False
SM90_DFC1_BIAS_IN_EPILOGUE = False


def _colsum_scratch(cols: int, like: torch.Tensor, at_least: int = 0) -> tuple[torch.Tensor, int]:
    """fp32 scratch for column sums of up to `cols` columns (and at least `at_least` floats), and its length."""
    scratch = vit_cuda.empty((max(_COLSUM_MAX_SPLITS * cols, at_least),), like, torch.float32)
    return scratch, scratch.numel()


def _aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A 2-D operand the 16-byte loads can read in place, copying only when they cannot (see module doc)."""
    if t.stride(1) == 1 and t.stride(0) % 8 == 0 and _aligned(t):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _heads(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor):
    """dq, dk, dv (B, H, N, D) readable in place as dQKV: shared strides (s_b, s_h, s_t, 1), each a multiple of 8."""
    s = dq.stride()
    in_place = (
        dk.stride() == s
        and dv.stride() == s
        and s[3] == 1
        and all(st % 8 == 0 for st in s[:3])
        and all(_aligned(t) for t in (dq, dk, dv))
    )
    if in_place:
        return dq, dk, dv
    return tuple(t.clone(memory_format=torch.contiguous_format) for t in (dq, dk, dv))


def _aligned_vector(t: torch.Tensor | None) -> torch.Tensor | None:
    """A bias as the kernels read it: element by element (mma.sync path) or by 16-byte row broadcasts (Hopper), so
    with unit stride and, unlike Triton's `vit_kernels.triton.contiguous_vector`, a 16-byte aligned start: t itself
    where it has both, else a copy; None stays None."""
    if t is None:
        return None
    return t if t.is_contiguous() and _aligned(t) else t.clone()


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=1)
def _sm90_build() -> tuple[bool, str]:
    info = extension().build_info()
    return bool(info.get("sm90_gemm_built")), str(info.get("sm90_gemm", "not built: an older _C"))


def gemm_path(device: torch.device, dtype: torch.dtype) -> str:
    """Which GEMMs the cuda backend runs for these tensors, and why (see the module doc)."""
    if dtype not in (torch.float16, torch.bfloat16):
        return "mma.sync GEMMs (csrc/gemm.cu): fp32 runs the SIMT kernel"
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = _capability(index)
    if (major, minor) != (9, 0):
        return f"mma.sync GEMMs (csrc/gemm.cu): the sm_90a GEMMs need compute capability 9.0, not {major}.{minor}"
    built, what = _sm90_build()
    if not built:
        return f"mma.sync GEMMs (csrc/gemm.cu): the sm_90a GEMMs are {what}"
    return f"sm_90a GEMMs on {what}: TMA + warp-specialised wgmma (csrc/gemm_sm90_impl.cuh)"


def _sm90(t: torch.Tensor) -> bool:
    return gemm_path(t.device, t.dtype).startswith("sm_90a")


def _packed_qkv(dq, dk, dv) -> tuple[torch.Tensor, int] | None:
    """dq, dk, dv (B, H, N, D) as one (B*N, 3C) matrix with row stride ld, if they are views of one packed
    (B, N, 3, H, D)-like tensor (rows 16-byte aligned); else None."""
    B, H, N, D = dq.shape
    C, elt, ld = H * D, dq.element_size(), dq.stride(2)
    if any(t.stride() != (N * ld, D, ld, 1) for t in (dq, dk, dv)) or ld < 3 * C or ld % 8 or not _aligned(dq):
        return None
    if dk.data_ptr() != dq.data_ptr() + C * elt or dv.data_ptr() != dq.data_ptr() + 2 * C * elt:
        return None
    return dq.as_strided((B * N, 3 * C), (ld, 1)), ld


# ----------------------------------------------------------------------------------------------------
# one linear layer with a bias and residual epilogue, and its backward (the block ops' projection)
# ----------------------------------------------------------------------------------------------------
def _residual(residual: torch.Tensor | None, M: int, N: int) -> tuple[torch.Tensor | None, int]:
    """The residual as an (M, N) matrix the epilogue reads (see `_rows`) and its row stride; (None, 0) for none."""
    if residual is None:
        return None, 0
    r = _rows(residual.reshape(M, N))
    return r, r.stride(0)


def linear_fwd(
    a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """a (M, K) any strides, weight (N, K), bias (N,) or None, residual (M, N)-shaped or None
    -> out (M, N) contiguous = a @ weight^T + bias + residual, the add in the epilogue (fp32, rounded once)."""
    check_cuda_tensors(a=a, weight=weight, bias=bias, residual=residual)
    M, K = a.shape
    N = weight.shape[0]
    check_like("a", a, weight=(weight, (N, K)), bias=(bias, (N,)))
    out = vit_cuda.empty((M, N), a)
    _linear_into(a, weight, bias, residual, out)
    return out


def _linear_into(a, weight, bias, residual, out: torch.Tensor) -> None:
    """out (M, N) with unit column stride = a @ weight^T + bias + residual (linear_fwd's launch)."""
    M, K = a.shape
    N = weight.shape[0]
    a2, w, b = _rows(a), _rows(weight), _aligned_vector(bias)
    res, ld_res = _residual(residual, M, N)
    launch = extension().linear_fwd_sm90 if _sm90(a) else extension().linear_fwd
    with torch.cuda.device(a.device):
        launch(
            ptr(a2), a2.stride(0), ptr(w), w.stride(0), ptr(b), ptr(res), ld_res, ptr(out), out.stride(0),
            M, N, K, dtype_code(a), stream_of(a),
        )  # fmt: skip


def linear_fwd_variant(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, variant: str) -> torch.Tensor:
    """linear_fwd without the residual on a configuration variant of the sm_90a linear_bias GEMM (bf16, compute
    capability 9.0; the names are `sm90_variants()`): what benchmarks/probe_gemm.py times beside the shipped one."""
    check_cuda_tensors(a=a, weight=weight, bias=bias)
    M, K = a.shape
    N = weight.shape[0]
    check_like("a", a, weight=(weight, (N, K)), bias=(bias, (N,)))
    a2, w, b = _rows(a), _rows(weight), _aligned_vector(bias)
    out = vit_cuda.empty((M, N), a)
    with torch.cuda.device(a.device):
        extension().linear_fwd_sm90_variant(
            variant, ptr(a2), a2.stride(0), ptr(w), w.stride(0), ptr(b), ptr(out), out.stride(0), M, N, K,
            dtype_code(a), stream_of(a),
        )  # fmt: skip
    return out


def sm90_variants() -> list[str]:
    """The configuration variants of linear_bias this _C was built with (none without the sm_90a GEMMs)."""
    kernels = getattr(extension(), "sm90_gemm_kernels", lambda: [])()
    return [k["variant"] for k in kernels if k.get("variant")]


def linear_bwd(dout: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, has_bias: bool):
    """dout (M, N), a (M, K) any strides; weight (N, K) -> da (M, K), dweight (N, K), dbias (N,) or None.

    da = dout @ weight, dweight = dout^T @ a (both GEMMs read the operands in place), dbias = column sums of dout
    (the two-pass reduction through fp32 scratch)."""
    check_cuda_tensors(dout=dout, a=a, weight=weight)
    M, K = a.shape
    N = weight.shape[0]
    check_like("a", a, weight=(weight, (N, K)), dout=(dout, (M, N)))
    g, a2, w = _rows(dout), _rows(a), _rows(weight)
    da = vit_cuda.empty((M, K), a)
    dweight = vit_cuda.empty((N, K), weight)
    dbias = vit_cuda.empty((N,), a) if has_bias else None
    scratch, scratch_floats = _colsum_scratch(N, a) if has_bias else (None, 0)
    launch = extension().linear_bwd_sm90 if _sm90(a) else extension().linear_bwd
    with torch.cuda.device(a.device):
        launch(
            ptr(g), g.stride(0), ptr(a2), a2.stride(0), ptr(w), w.stride(0), ptr(da), ptr(dweight), ptr(dbias),
            ptr(scratch), scratch_floats, M, N, K, dtype_code(a), stream_of(a),
        )  # fmt: skip
    return da, dweight, dbias


# ----------------------------------------------------------------------------------------------------
# fused QKV projection
# ----------------------------------------------------------------------------------------------------
# qkv_fwd takes packed=True (ops/fused_qkv.py's eager path): q, k, v are then the slices of one (B, N, 3, H, D) buffer.
PACKED_QKV = True


def qkv_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    num_heads: int,
    allow_tf32: bool,
    packed: bool = False,
):
    """x (B, N, C) any strides, weight (3C, C), bias (3C,) or None -> q, k, v contiguous (B, H, N, C // H), or with
    `packed` the q / k / v slices of one (B, N, 3, H, D) buffer (what `unbind` of the reference's reshape gives).

    mma.sync: one GEMM whose epilogue adds the bias and scatters column n of the (B*N, 3C) product to
    (which = n // C, head = n % C // D, d = n % D): no (B, N, 3C) intermediate. Hopper: see the module doc.
    Packed: one plain GEMM (bias epilogue) into the buffer, on either path.
    """
    check_cuda_tensors(x=x, weight=weight, bias=bias)
    if x.dim() != 3:
        raise ValueError(f"x must be 3-D (B, N, C), got shape {tuple(x.shape)}")
    B, N, C = x.shape
    check_like("x", x, weight=(weight, (3 * C, C)), bias=(bias, (3 * C,)))
    D = C // num_heads
    if packed:
        qkv = vit_cuda.empty((B, N, 3, num_heads, D), x)
        _linear_into(x.reshape(B * N, C), weight, bias, None, qkv.view(B * N, 3 * C))
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v
    x2 = _rows(x.reshape(B * N, C))
    w = _rows(weight)
    b = _aligned_vector(bias)
    q, k, v = (vit_cuda.empty((B, num_heads, N, D), x) for _ in range(3))
    if _sm90(x):
        qkv = vit_cuda.empty((B * N, 3 * C), x)  # the product, split into q, k, v by a second pass (module doc)
        with torch.cuda.device(x.device):
            extension().qkv_fwd_sm90(
                ptr(x2), x2.stride(0), ptr(w), w.stride(0), ptr(b), ptr(qkv), ptr(q), ptr(k), ptr(v),
                B, N, C, num_heads, dtype_code(x), stream_of(x),
            )  # fmt: skip
        return q, k, v
    with torch.cuda.device(x.device):
        extension().qkv_fwd(
            ptr(x2), x2.stride(0), ptr(w), w.stride(0), ptr(b), ptr(q), ptr(k), ptr(v),
            B, N, C, num_heads, dtype_code(x), stream_of(x),
        )  # fmt: skip
    return q, k, v


def qkv_bwd(dq, dk, dv, x: torch.Tensor, weight: torch.Tensor, has_bias: bool, allow_tf32: bool):
    """dq, dk, dv (B, H, N, D) any strides; x (B, N, C); weight (3C, C)
    -> dx (B, N, C), dweight (3C, C), dbias (3C,) or None.

    dx = dQKV @ weight and dweight = dQKV^T @ x, with dQKV (B*N, 3C) read in place from dq, dk, dv;
    dbias = column sums of dQKV (a separate two-pass reduction over row splits, through fp32 scratch).
    """
    check_cuda_tensors(dq=dq, dk=dk, dv=dv, x=x, weight=weight)
    if dq.dim() != 4:
        raise ValueError(f"dq must be 4-D (B, H, N, D), got shape {tuple(dq.shape)}")
    B, H, N, D = dq.shape
    C = H * D
    check_like(
        "x", x, x=(x, (B, N, C)), weight=(weight, (3 * C, C)), dq=(dq, (B, H, N, D)), dk=(dk, (B, H, N, D)),
        dv=(dv, (B, H, N, D)),
    )  # fmt: skip
    x2 = _rows(x.reshape(B * N, C))
    w = _rows(weight)
    dx = vit_cuda.empty((B, N, C), x)
    dweight = vit_cuda.empty((3 * C, C), weight)
    dbias = vit_cuda.empty((3 * C,), x) if has_bias else None
    scratch, scratch_floats = _colsum_scratch(3 * C, x) if has_bias else (None, 0)
    if _sm90(x):
        packed = _packed_qkv(dq, dk, dv)
        if packed is None:  # one copy into the (B, N, 3, H, D) layout the GEMMs read as (B*N, 3C)
            dqkv = vit_cuda.empty((B, N, 3, H, D), x)
            for i, g in enumerate((dq, dk, dv)):
                dqkv[:, :, i].copy_(g.transpose(1, 2))
            packed = dqkv.view(B * N, 3 * C), 3 * C
        dqkv, ld = packed
        with torch.cuda.device(x.device):  # the projection's backward with dout = dQKV (B*N, 3C): linear_bwd's
            extension().linear_bwd_sm90(
                ptr(dqkv), ld, ptr(x2), x2.stride(0), ptr(w), w.stride(0), ptr(dx), ptr(dweight), ptr(dbias),
                ptr(scratch), scratch_floats, B * N, 3 * C, C, dtype_code(x), stream_of(x),
            )  # fmt: skip
        return dx, dweight, dbias
    dq, dk, dv = _heads(dq, dk, dv)
    s_b, s_h, s_t, _ = dq.stride()
    with torch.cuda.device(x.device):
        extension().qkv_bwd(
            ptr(dq), ptr(dk), ptr(dv), s_b, s_h, s_t, ptr(x2), x2.stride(0), ptr(w), w.stride(0),
            ptr(dx), ptr(dweight), ptr(dbias), ptr(scratch), scratch_floats, B, N, C, H, dtype_code(x),
            stream_of(x),
        )  # fmt: skip
    return dx, dweight, dbias


# ----------------------------------------------------------------------------------------------------
# fused GELU-MLP
# ----------------------------------------------------------------------------------------------------
def mlp_fwd(
    x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate: str, allow_tf32: bool, residual=None, save_hidden=True
):
    """x (M, C) any strides; fc1 (Hd, C), (Hd,); fc2 (C_out, Hd), (C_out,) -> y (M, C_out), hidden (M, Hd) or None.

    fc1 GEMM with a bias + GELU epilogue storing hidden (the pre-activation, saved for backward since
    GELU' needs it) and act = gelu(hidden) (scratch, freed on return); fc2 GEMM with a bias epilogue, which also
    adds `residual` ((M, C_out)-shaped, any strides; the block op ln_gelu_mlp's x) when given. Without
    `save_hidden` (no autograd) hidden is never written (on Hopper, an fc1 kernel without the aux store) and None
    is returned for it.
    """
    check_cuda_tensors(
        x=x, fc1_weight=fc1_weight, fc1_bias=fc1_bias, fc2_weight=fc2_weight, fc2_bias=fc2_bias, residual=residual
    )
    if x.dim() != 2 or fc1_weight.dim() != 2 or fc2_weight.dim() != 2:
        raise ValueError("x, fc1_weight and fc2_weight must be 2-D")
    M, C = x.shape
    Hd, C_out = fc1_weight.shape[0], fc2_weight.shape[0]
    check_like(
        "x", x, fc1_weight=(fc1_weight, (Hd, C)), fc1_bias=(fc1_bias, (Hd,)), fc2_weight=(fc2_weight, (C_out, Hd)),
        fc2_bias=(fc2_bias, (C_out,)),
    )  # fmt: skip
    x2, w1, w2 = _rows(x), _rows(fc1_weight), _rows(fc2_weight)
    b1, b2 = _aligned_vector(fc1_bias), _aligned_vector(fc2_bias)
    hidden = vit_cuda.empty((M, Hd), x) if save_hidden else None
    act = vit_cuda.empty((M, Hd), x)
    y = vit_cuda.empty((M, C_out), x)
    res, ld_res = _residual(residual, M, C_out)
    launch = extension().mlp_fwd_sm90 if _sm90(x) else extension().mlp_fwd
    with torch.cuda.device(x.device):
        launch(
            ptr(x2), x2.stride(0), ptr(w1), w1.stride(0), ptr(b1), ptr(w2), w2.stride(0), ptr(b2), ptr(res), ld_res,
            ptr(hidden), ptr(act), ptr(y), M, C, Hd, C_out, approximate == "tanh", dtype_code(x), stream_of(x),
        )  # fmt: skip
    return y, hidden


def mlp_bwd(
    dy, x, fc1_weight, fc2_weight, hidden, has_fc1_bias: bool, has_fc2_bias: bool, approximate: str, allow_tf32: bool
):
    """dy (M, C_out), x (M, C), hidden (M, Hd) -> dx, dfc1_weight, dfc1_bias or None, dfc2_weight, dfc2_bias or None.

    dhidden = (dy @ fc2_weight) * GELU'(hidden) in one GEMM epilogue, which also writes act = gelu(hidden)
    (the recomputed activation dfc2_weight = dy^T @ act needs; it is not saved from forward);
    dfc1_weight = dhidden^T @ x; dx = dhidden @ fc1_weight; biases by column sums of dy and dhidden (on the sm_90a
    path dhidden's from the d-GELU epilogue's partial sums: see SM90_DFC1_BIAS_IN_EPILOGUE).
    """
    check_cuda_tensors(dy=dy, x=x, fc1_weight=fc1_weight, fc2_weight=fc2_weight, hidden=hidden)
    if x.dim() != 2 or fc1_weight.dim() != 2 or fc2_weight.dim() != 2:
        raise ValueError("x, fc1_weight and fc2_weight must be 2-D")
    M, C = x.shape
    Hd, C_out = fc1_weight.shape[0], fc2_weight.shape[0]
    check_like(
        "x", x, fc1_weight=(fc1_weight, (Hd, C)), fc2_weight=(fc2_weight, (C_out, Hd)), dy=(dy, (M, C_out)),
        hidden=(hidden, (M, Hd)),
    )  # fmt: skip
    dy2, x2, w1, w2, h = _rows(dy), _rows(x), _rows(fc1_weight), _rows(fc2_weight), _rows(hidden)
    dhidden = vit_cuda.empty((M, Hd), x)
    act = vit_cuda.empty((M, Hd), x)
    dx = vit_cuda.empty((M, C), x)
    dw1 = vit_cuda.empty((Hd, C), fc1_weight)
    dw2 = vit_cuda.empty((C_out, Hd), fc2_weight)
    db1 = vit_cuda.empty((Hd,), x) if has_fc1_bias else None
    db2 = vit_cuda.empty((C_out,), x) if has_fc2_bias else None
    # One scratch for both bias sums: they run one after the other on the stream.
    sm90 = _sm90(x)
    partials = sm90 and has_fc1_bias and SM90_DFC1_BIAS_IN_EPILOGUE
    cols = max(Hd if has_fc1_bias and not partials else 0, C_out if has_fc2_bias else 0)
    at_least = extension().sm90_dgelu_colsums_floats(M, Hd) if partials else 0
    scratch, scratch_floats = _colsum_scratch(cols, x, at_least) if cols or at_least else (None, 0)
    args = (
        ptr(dy2), dy2.stride(0), ptr(x2), x2.stride(0), ptr(w1), w1.stride(0), ptr(w2), w2.stride(0),
        ptr(h), h.stride(0), ptr(dhidden), ptr(act), ptr(dx), ptr(dw1), ptr(db1), ptr(dw2), ptr(db2),
        ptr(scratch), scratch_floats, M, C, Hd, C_out, approximate == "tanh",
    )  # fmt: skip
    with torch.cuda.device(x.device):
        if sm90:
            in_epilogue = (SM90_ACT_IN_EPILOGUE, SM90_DFC1_BIAS_IN_EPILOGUE)
            extension().mlp_bwd_sm90(*args, *in_epilogue, dtype_code(x), stream_of(x))
        else:
            extension().mlp_bwd(*args, dtype_code(x), stream_of(x))
    return dx, dw1, db1, dw2, db2
