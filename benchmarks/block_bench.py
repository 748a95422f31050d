"""One pre-LN ViT block, x + attn(LN(x)) then x + MLP(LN(x)), unfused and fused (issue 14), on triton and cuda.

    python benchmarks/block_bench.py                          # ViT-B/16 at batch 256 on GPU, ViT-S/16 at 1 on CPU
    python benchmarks/block_bench.py --shapes "64,197,768,3072,12" --mode fwd

providers (same weights, vit.model.Block):
  eager     the block on backend "torch": nn.LayerNorm, F.linear, SDPA, F.gelu, two adds (timm's block, op for op)
  compile   torch.compile of eager
  unfused   the block's unfused path on backend "triton": vk.fused_qkv, vk.attention, vk.gelu_mlp, torch LN and adds
  fused     the block's fused path on backend "triton": vk.ln_fused_qkv, vk.attention, vk.proj_residual,
            vk.ln_gelu_mlp (LayerNorm in the GEMM prologues, residual adds in the epilogues)
  unfused_cuda  as unfused, on backend "cuda" (the same three ops on csrc's kernels)
  fused_cuda    the block's fused path on backend "cuda" (vit_kernels/cuda/block.py): the same four ops; LayerNorm on
                the Triton row kernels (LN(x) written once, read by csrc's GEMM), residual adds in the GEMM epilogues
The fused providers are skipped where vit_kernels.ops.pre_ln_block.fuses_block says the block would not fuse.
auto_table.py reads `fused` and `fused_cuda` (against `eager`) into `auto`'s block entries.

FLOPs: 2MC(3C) + 4BN^2C + 2MC^2 + 4MC*hidden forward; backward 2x the GEMMs and 2.5x attention.
`pred fwd GB` is the activation + weight traffic each variant must move in forward if every kernel reads its
inputs and writes its outputs once (M = B * N tokens, e = bytes per element), counted per pass:
  eager     LN 2MC, qkv 4MC, attention 4MC, proj 2MC, add 3MC, LN 2MC, fc1 MC + MHd, GELU 2MHd, fc2 MHd + MC, add 3MC
            = 22MC + 4MHd
  compile   as eager, but Inductor fuses the first residual add with LayerNorm 2 (-1MC): 21MC + 4MHd (an assumption,
            not read from its generated code)
  unfused   as eager, but gelu_mlp's fc1 writes hidden and GELU(hidden), fc2 reads the latter: 22MC + 3MHd. That is
            the pointer path; on Hopper's TMA path, timed under no_grad, fc1 writes GELU(hidden) only: 22MC + 2MHd
  fused     stats MC, ln_qkv 4MC, attention 4MC, proj_residual 3MC, stats MC, fc1 MC + MHd, fc2 MHd + 2MC
            = 16MC + 2MHd (timed under no_grad, fc1 writes GELU(hidden) only; with autograd it also writes hidden).
            That is the pointer path (LayerNorm in the GEMM prologue). On Hopper's TMA path a row kernel writes LN(x)
            and the GEMM reads it (LN rows 2MC where stats is MC): 18MC + 2MHd; the column keeps 16MC + 2MHd
  unfused_cuda  as unfused on the TMA path (under no_grad the cuda fc1 writes GELU(hidden) only, on both of its
            GEMM paths): 22MC + 2MHd
  fused_cuda    LN rows 2MC (reads x, writes LN(x)), qkv 4MC, attention 4MC, proj_residual 3MC, LN rows 2MC,
            fc1 MC + MHd (under no_grad GELU(hidden) only), fc2 MHd + 2MC = 18MC + 2MHd: triton's Hopper path.
            On sm_90 the CUTLASS qkv GEMM (both cuda providers) writes an (M, 3C) scratch that a second pass splits
            into q, k, v: +6MC there, not in the column
  plus the weights (4C^2 + 2C*Hd) e for all. ViT-B/16, batch 256, bf16: eager 2.96 GB, fused 1.87 GB, fused_cuda
  2.03 GB. The GPU run shows how much of that saving turns into time. No fwd_bwd byte model is given (column left
  empty).
Every provider is checked first against the float64 (CPU) / float32 (GPU) reference block written out on
vit_kernels.reference: outputs, and for fwd_bwd the gradients of x and of every parameter.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if "--include-interpreter" in sys.argv and not __import__("torch").cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel module is imported

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from vit.model import Block, ViTConfig  # noqa: E402
from vit_kernels import reference  # noqa: E402
from vit_kernels.ops import pre_ln_block  # noqa: E402

PROVIDERS = ("eager", "compile", "unfused", "fused", "unfused_cuda", "fused_cuda")
# The backend each provider's vit.model.Block runs on; FUSED run the block's fused path (Block.forward), the others
# its unfused composition (`unfused_forward`; for eager and compile that is what Block.forward runs on "torch").
BACKEND = {"eager": "torch", "compile": "torch", "unfused": "triton", "fused": "triton", "unfused_cuda": "cuda",
           "fused_cuda": "cuda"}  # fmt: skip
FUSED = ("fused", "fused_cuda")
MODES = ("fwd", "fwd_bwd")


Shape = common.LayerShape


def default_shapes(device: str) -> list[Shape]:
    if device == "cpu":
        return [Shape("ViT-S/16", 1, 197, 384, 1536, 6)]
    return [Shape("ViT-B/16", 256, 197, 768, 3072, 12)]


def parse_shapes(text: str) -> list[Shape]:
    return common.parse_layer_shapes(text)


def flops(s: Shape, mode: str) -> float:
    """QKV, proj and the MLP's two GEMMs (common.linear_flops, mlp_flops), plus attention (common.attention_flops)."""
    qkv_proj = common.linear_flops(s.M, s.C, 3 * s.C, mode) + common.linear_flops(s.M, s.C, s.C, mode)
    attn = common.attention_flops(s.B, s.heads, s.N, s.C // s.heads, mode)  # Block checks C % heads == 0
    return qkv_proj + common.mlp_flops(s.M, s.C, s.hidden, mode) + attn


def predicted_fwd_bytes(provider: str, s: Shape, elem: int) -> float:
    mc, mh = s.M * s.C, s.M * s.hidden
    act = {
        "eager": 22 * mc + 4 * mh,
        "compile": 21 * mc + 4 * mh,
        "unfused": 22 * mc + 3 * mh,
        "fused": 16 * mc + 2 * mh,
        "unfused_cuda": 22 * mc + 2 * mh,
        "fused_cuda": 18 * mc + 2 * mh,
    }
    return (act[provider] + 4 * s.C * s.C + 2 * s.C * s.hidden) * elem


def skip_reason(provider: str, device: str, args) -> str | None:
    """Why `provider` cannot run on `device` at all, or None. The cuda backend's fused block also needs Triton on
    the device (its LayerNorm row kernels), as vit_kernels.ops.pre_ln_block's own check says."""
    backend = BACKEND[provider]
    if backend == "torch":
        return None
    why = common.kernel_skip_reason(backend, device, args.include_interpreter)
    if why is None and provider == "fused_cuda":
        triton_why = common.kernel_skip_reason("triton", device, args.include_interpreter)
        if triton_why is not None:
            why = f"its LayerNorm runs on the Triton row kernels, and {triton_why}"
    return why


# ----------------------------------------------------------------------------------------------------
# the block per provider, and the reference
# ----------------------------------------------------------------------------------------------------
def make_block(s: Shape, backend: str, dtype, device: str) -> Block:
    torch.manual_seed(0)  # the same weights for every provider
    cfg = ViTConfig(embed_dim=s.C, num_heads=s.heads, mlp_hidden_dim=s.hidden)
    return Block(cfg, 0.0, backend).to(device=device, dtype=dtype).eval()


def unfused_forward(blk: Block, x: torch.Tensor) -> torch.Tensor:
    x = x + blk.attn(blk.norm1(x))
    return x + blk.mlp(blk.norm2(x))


def provider_fn(provider: str, s: Shape, dtype, device: str):
    """(block, fn(x)) for a provider."""
    blk = make_block(s, BACKEND[provider], dtype, device)
    if provider == "compile":
        return blk, torch.compile(blk)
    return blk, (blk if provider in ("eager", *FUSED) else lambda x: unfused_forward(blk, x))


def reference_block(blk: Block, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    p, (B, N, C), eps = params, x.shape, blk.norm1.eps
    q, k, v = reference.ln_fused_qkv(
        x, p["norm1.weight"], p["norm1.bias"], eps, p["attn.qkv.weight"], p["attn.qkv.bias"], blk.attn.num_heads
    )
    o = reference.attention(q, k, v).transpose(1, 2).reshape(B, N, C)
    x = reference.proj_residual(o, p["attn.proj.weight"], p["attn.proj.bias"], x)
    return reference.ln_gelu_mlp(x, p["norm2.weight"], p["norm2.bias"], eps, p["mlp.fc1.weight"],
                                 p["mlp.fc1.bias"], p["mlp.fc2.weight"], p["mlp.fc2.bias"])  # fmt: skip


def check(blk: Block, f, x: torch.Tensor, dout: torch.Tensor | None) -> float:
    """Largest relative error of the output (and, with dout, of the gradients of x and every parameter)."""
    ref_dtype = torch.float64 if x.device.type == "cpu" else torch.float32
    params = tuple(blk.parameters())
    ref_params = {n: p.detach().to(ref_dtype).requires_grad_(dout is not None) for n, p in blk.named_parameters()}
    ref_x = x.detach().to(ref_dtype).requires_grad_(dout is not None)
    if dout is None:
        with torch.no_grad():
            return common.rel_error(f(x), reference_block(blk, ref_x, ref_params))
    out, ref = f(x), reference_block(blk, ref_x, ref_params)
    grads = torch.autograd.grad(out, (x, *params), dout)
    ref_grads = torch.autograd.grad(ref, (ref_x, *ref_params.values()), dout.to(ref_dtype))
    return max(common.rel_error(a, b) for a, b in zip((out, *grads), (ref, *ref_grads), strict=True))


def run_cell(report, provider: str, s: Shape, mode: str, args, dtype) -> dict | None:
    elem = torch.finfo(dtype).bits // 8
    grad = mode == "fwd_bwd"

    def prepare():
        blk, f = provider_fn(provider, s, dtype, args.device)
        params = tuple(blk.parameters())
        n_sets = common.n_input_sets((2 if grad else 1) * s.M * s.C * elem, args.device)
        xs = [torch.randn(s.B, s.N, s.C, device=args.device, dtype=dtype).requires_grad_(grad) for _ in range(n_sets)]
        douts = [torch.randn_like(x) for x in xs] if grad else None
        if provider in FUSED and not pre_ln_block.fuses_block(BACKEND[provider], xs[0]):
            raise common.Skip(f"vit.model.Block on backend {BACKEND[provider]!r} would not take its fused path here")
        err = common.first_call(lambda: check(blk, f, xs[0], douts[0] if grad else None))

        def step(i):
            if not grad:
                with torch.no_grad():
                    return f(xs[i])
            return torch.autograd.grad(f(xs[i]), (xs[i], *params), douts[i])

        return step, n_sets, err

    cell = common.run_cell(report, provider, f"{s} {mode}", args, prepare)
    if cell is None:
        return None
    ms = cell.timing.median_ms
    nbytes = predicted_fwd_bytes(provider, s, elem) if mode == "fwd" else None
    n_flops = flops(s, mode)
    return {
        "model": s.model, "B": s.B, "N": s.N, "C": s.C, "hidden": s.hidden, "heads": s.heads, "mode": mode,
        "provider": provider, "ms": ms, "ms_p20": cell.timing.p20_ms, "ms_p80": cell.timing.p80_ms,
        "tflops": n_flops / (ms * 1e-3) / 1e12, "pred_gb": nbytes / 1e9 if nbytes else None,
        "gbps": nbytes / (ms * 1e-3) / 1e9 if nbytes else None, "mem_mib": cell.mem_mib, "rel_err": cell.err,
        "flops": n_flops, "bytes": nbytes,
    }  # fmt: skip


COLUMNS = [
    ("model", "model"), ("B", "B"), ("N", "N"), ("C", "C"), ("mode", "mode"), ("provider", "provider"),
    ("ms (median)", "ms"), ("TFLOP/s", "tflops"), ("pred fwd GB", "pred_gb"), ("pred GB/s", "gbps"),
    ("peak MiB above inputs", "mem_mib"), ("speedup vs eager", "speedup"), ("rel err", "rel_err"),
]  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common.add_common_args(p)
    p.add_argument("--shapes", help='"B,N,C,hidden,heads;..." (default: ViT-B/16 batch 256 on GPU, ViT-S/16 on CPU)')
    p.add_argument("--mode", choices=["fwd", "fwd_bwd", "both"], default="both")
    p.add_argument("--include-interpreter", action="store_true", help="on CPU, time Triton under TRITON_INTERPRET=1")
    args = p.parse_args(argv)
    common.resolve_common_args(args)
    dtype = common.DTYPES[args.dtype]
    shapes = parse_shapes(args.shapes) if args.shapes else default_shapes(args.device)
    modes = MODES if args.mode == "both" else (args.mode,)

    env = common.Env.collect(args.device, args.dtype)
    report = common.Report("block_bench", env, None, args)
    runnable = report.runnable(PROVIDERS, args.providers, lambda pr: skip_reason(pr, args.device, args))
    report.print_header()
    cells = [(s, m, pr) for s in shapes for m in modes for pr in PROVIDERS if pr in runnable]
    report.run_cells(
        cells,
        lambda shape, mode, provider: f"{provider} {shape.model} {mode}",
        lambda shape, mode, provider: run_cell(report, provider, shape, mode, args, dtype),
    )
    report.set_speedups(("model", "B", "N", "C", "hidden", "heads", "mode"), baseline="eager")
    report.finish(common.markdown_table(COLUMNS, report.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
