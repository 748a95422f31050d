"""The ViT model (vit/model.py): timm layout, backend parity of logits and every gradient, attention maps,
position-embedding resampling, autocast, torch.compile, save/load, DDP, and the digits training job.

Models are tiny (depth 2, 32x32 images, patch 8: N = 17 tokens) so that the file runs in seconds on CPU.
Kernel backends are checked against a float64 copy of the same model with the FlashAttention rule:
their error may be at most ~2x the error of the `torch` backend in the same dtype.
"""

import copy
import io
import os
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import TOLERANCES, LowRankAdapter, rel_error

import vit
import vit_kernels as vk
from vit_kernels import reference

TINY = dict(img_size=32, patch_size=8, in_chans=3, num_classes=10, embed_dim=64, depth=2, num_heads=2)
# Head dim 32: the smallest the kernel backends support; 16x16 images, patch 8: N = 5 (odd, with a CLS row).
TINY_KERNEL = dict(img_size=16, patch_size=8, in_chans=3, num_classes=10, embed_dim=64, depth=2, num_heads=2)


def make(backend="torch", **overrides) -> vit.VisionTransformer:
    torch.manual_seed(0)
    return vit.VisionTransformer(backend=backend, **{**TINY, **overrides})


def with_backend(model: vit.VisionTransformer, backend: str) -> vit.VisionTransformer:
    """A copy of `model` (same weights, dtype and device) running `backend`."""
    other = vit.VisionTransformer.from_config(model.config, backend=backend)
    other.load_state_dict(model.state_dict())
    p = next(model.parameters())
    return other.to(device=p.device, dtype=p.dtype)


def run(model, x, grad_out=None, params_of=None):
    """Logits and every parameter's gradient (of `params_of`, default `model`) for a fixed upstream gradient."""
    params_of = params_of or model
    params_of.zero_grad(set_to_none=True)
    logits = model(x.to(next(params_of.parameters()).dtype))
    if grad_out is None:
        grad_out = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1)).to(logits.device)
    logits.backward(grad_out.to(logits.dtype))
    grads = {n: p.grad.detach().clone() for n, p in params_of.named_parameters()}
    assert all(g is not None for g in grads.values())
    return logits.detach(), grads, grad_out


class Float64ViT(torch.nn.Module):
    """The ViT forward written out on `vit_kernels.reference` ops, on a float64 copy of a model's weights.

    The fused ops accept fp32/fp16/bf16 only, so the float64 ground truth goes around them; it also
    checks the model's wiring (pre-LN, CLS, position embedding, head) independently of vit/model.py.
    """

    def __init__(self, model: vit.VisionTransformer):
        super().__init__()
        self.m = copy.deepcopy(model).double()
        self.eps, self.heads = model.config.norm_eps, model.config.num_heads

    def forward(self, x):
        m, C = self.m, self.m.config.embed_dim
        ln = lambda t, norm: F.layer_norm(t, (C,), norm.weight, norm.bias, self.eps)
        proj = m.patch_embed.proj
        x = F.conv2d(x.double(), proj.weight, proj.bias, stride=proj.stride).flatten(2).transpose(1, 2)
        x = torch.cat([m.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + m.pos_embed
        B, N, _ = x.shape
        for blk in m.blocks:
            q, k, v = reference.fused_qkv(ln(x, blk.norm1), blk.attn.qkv.weight, blk.attn.qkv.bias, self.heads)
            o = reference.attention(q, k, v).transpose(1, 2).reshape(B, N, C)
            x = x + F.linear(o, blk.attn.proj.weight, blk.attn.proj.bias)
            mlp = blk.mlp
            x = x + reference.gelu_mlp(ln(x, blk.norm2), mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)
        return F.linear(ln(x, m.norm)[:, 0], m.head.weight, m.head.bias)


def errors(model, x):
    """rel_error of logits and of each parameter gradient of `model` against its float64 written-out twin."""
    ref64 = Float64ViT(model)
    logits, grads, g = run(model, x)
    ref_logits, ref_grads, _ = run(ref64, x, g.double(), params_of=ref64.m)
    out = {"logits": rel_error(logits, ref_logits)}
    out.update({n: rel_error(grads[n], ref_grads[n]) for n in ref_grads})
    return out


# ----------------------------------------------------------------------------------------------------
# layout
# ----------------------------------------------------------------------------------------------------
def expected_timm_keys(depth, C, hidden, num_classes, in_chans, patch, n_tokens):
    keys = [("cls_token", (1, 1, C)), ("pos_embed", (1, n_tokens, C))]
    keys += [("patch_embed.proj.weight", (C, in_chans, patch, patch)), ("patch_embed.proj.bias", (C,))]
    for i in range(depth):
        b = f"blocks.{i}."
        keys += [(b + "norm1.weight", (C,)), (b + "norm1.bias", (C,))]
        keys += [(b + "attn.qkv.weight", (3 * C, C)), (b + "attn.qkv.bias", (3 * C,))]
        keys += [(b + "attn.proj.weight", (C, C)), (b + "attn.proj.bias", (C,))]
        keys += [(b + "norm2.weight", (C,)), (b + "norm2.bias", (C,))]
        keys += [(b + "mlp.fc1.weight", (hidden, C)), (b + "mlp.fc1.bias", (hidden,))]
        keys += [(b + "mlp.fc2.weight", (C, hidden)), (b + "mlp.fc2.bias", (C,))]
    keys += [("norm.weight", (C,)), ("norm.bias", (C,))]
    keys += [("head.weight", (num_classes, C)), ("head.bias", (num_classes,))]
    return keys


def test_state_dict_is_timm_layout():
    model = make()
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert got == expected_timm_keys(depth=2, C=64, hidden=256, num_classes=10, in_chans=3, patch=8, n_tokens=17)


# Parameter counts of timm's models of these names (timm.create_model(name).parameters(), timm 1.0.31).
TIMM_PARAMS = {
    "vit_tiny_patch16_224": 5_717_416,
    "vit_small_patch16_224": 22_050_664,
    "vit_base_patch16_224": 86_567_656,
    "vit_base_patch16_384": 86_859_496,
    "vit_large_patch16_224": 304_326_632,
    "vit_huge_patch14_224": 630_764_800,  # no head, as in timm (an in21k feature extractor)
}


@pytest.mark.parametrize("name", sorted(TIMM_PARAMS))
def test_factories_match_timm_sizes(name):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = getattr(vit, name)()
    assert sum(p.numel() for p in model.parameters()) == TIMM_PARAMS[name]
    if name == "vit_huge_patch14_224":
        assert model.config.head_dim == 80 and model.pos_embed.shape == (1, 257, 1280)


def test_init_is_truncated_normal():
    model = vit.VisionTransformer(**{**TINY, "embed_dim": 128, "depth": 1, "num_heads": 4})
    w = model.blocks[0].mlp.fc1.weight
    assert abs(w.std().item() - 0.02 * 0.88) < 2e-3  # std of N(0, 0.02) cut at 2 sigma is 0.88 * 0.02
    assert w.abs().max().item() <= 0.04 + 1e-7
    assert torch.all(model.blocks[0].mlp.fc1.bias == 0) and torch.all(model.norm.weight == 1)
    assert model.norm.eps == 1e-6


def test_bad_image_size_is_a_value_error():
    with pytest.raises(ValueError, match="images must have shape"):
        make()(torch.randn(1, 3, 24, 24))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        vit.VisionTransformer(img_size=30, patch_size=8)


# Small, timm-shaped: 32x32 images, patch 16 (N = 5), head dim 32.
SMALL = dict(img_size=32, patch_size=16, num_classes=5, embed_dim=64, depth=2, num_heads=2, backend="torch")


# (arguments, error, what its message must name)
BAD_CONSTRUCTOR_ARGUMENTS = [
    (dict(num_heads=0), ValueError, "num_heads"),  # was ZeroDivisionError
    (dict(patch_size=0), ValueError, "patch_size"),  # was ZeroDivisionError
    (dict(img_size=0), ValueError, "img_size"),  # was accepted: the first forward wanted (B, 3, 0, 0)
    (dict(img_size=-32), ValueError, "img_size"),
    (dict(img_size=(32, 48, 64)), TypeError, "img_size"),  # was cut to (32, 48)
    (dict(img_size=32.0), TypeError, "img_size"),
    (dict(in_chans=0), ValueError, "in_chans"),
    (dict(embed_dim=0, num_heads=1), ValueError, "embed_dim"),
    (dict(depth=-1), ValueError, "depth"),  # was a model of 0 blocks
    (dict(num_classes=-3), ValueError, "num_classes"),  # was a headless model returning features
    (dict(num_heads=2.0), TypeError, "num_heads"),
    (dict(mlp_ratio=0.0), ValueError, "mlp_ratio"),
    (dict(mlp_ratio=-1.0), ValueError, "mlp_ratio"),
    (dict(mlp_ratio=float("nan")), ValueError, "mlp_ratio"),
    (dict(mlp_hidden_dim=0), ValueError, "mlp_hidden_dim"),
    (dict(drop_path_rate=-0.5), ValueError, "drop_path_rate"),  # was silently no stochastic depth
    (dict(drop_path_rate=1.5), ValueError, "drop_path_rate"),
    (dict(backend="bogus"), ValueError, "backend must be one of"),  # was an error at the first forward only
    (dict(drop_rate=True), TypeError, "drop_rate"),  # was Dropout(p=True): everything dropped in training
    (dict(norm_eps=True), TypeError, "norm_eps"),
]


@pytest.mark.parametrize(
    "bad, error, match",
    BAD_CONSTRUCTOR_ARGUMENTS,
    ids=[",".join(f"{k}={v}" for k, v in bad.items()) for bad, _, _ in BAD_CONSTRUCTOR_ARGUMENTS],
)
def test_constructor_rejects_bad_arguments(bad, error, match):
    with pytest.raises(error, match=match):
        vit.VisionTransformer(**{**SMALL, **bad})


def test_constructor_edge_arguments_that_build():
    # depth 0 is a legal timm / Hugging Face model (embeddings, final norm, head); img_size may be any int pair.
    x = torch.randn(3, 3, 32, 32)
    assert vit.VisionTransformer(**{**SMALL, "depth": 0})(x).shape == (3, 5)
    model = vit.VisionTransformer(**{**SMALL, "img_size": [32, 48]})
    assert model.config.img_size == (32, 48) and model(torch.randn(2, 3, 32, 48)).shape == (2, 5)


def test_drop_path_rate_one_drops_the_branch():
    """drop_path_rate=1.0 gave 0 / 0 = NaN in training; as in timm, p = 1 drops the branch (zeros, no rescale)."""
    x = torch.randn(4, 7, 16, requires_grad=True)
    out = vit.model.DropPath(1.0).train()(x)
    assert torch.equal(out, torch.zeros_like(x))
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        vit.model.DropPath(1.5)
    # The last block's rate is drop_path_rate: in training block 1 is the identity, block 0 (rate 0) runs.
    model = vit.VisionTransformer(**{**SMALL, "drop_path_rate": 1.0}).train()
    images = torch.randn(3, 3, 32, 32)
    logits = model(images)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, model.forward_head(model.norm(model.blocks[0](model.embed(images)))))
    logits.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ----------------------------------------------------------------------------------------------------
# backend parity: logits and every parameter gradient
# ----------------------------------------------------------------------------------------------------
def test_float64_twin_is_the_model():
    model = make("reference")
    x = torch.randn(2, 3, 32, 32)
    assert rel_error(model(x), Float64ViT(model)(x)) < 1e-6


def test_torch_backend_matches_reference_fp32():
    model = make("torch")
    ref = with_backend(model, "reference")
    x = torch.randn(3, 3, 32, 32)
    logits, grads, g = run(model, x)
    ref_logits, ref_grads, _ = run(ref, x, g)
    assert rel_error(logits, ref_logits) < 1e-5
    for name in ref_grads:
        assert rel_error(grads[name], ref_grads[name]) < 1e-5, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_backend_matches_reference_low_precision(dtype):
    model = make("torch").to(dtype)
    x = torch.randn(3, 3, 32, 32)
    err_torch, err_ref = errors(model, x), errors(with_backend(model, "reference"), x)
    for name, err in err_torch.items():
        # Both round differently (fused SDPA vs the naive path); neither may be much worse than the other.
        assert err < 4 * TOLERANCES[dtype], (name, err)
        assert err <= 2 * err_ref[name] + TOLERANCES[dtype], (name, err, err_ref[name])


def _kernel_parity(backend, device, dtype, cfg):
    torch.manual_seed(0)
    model = vit.VisionTransformer(backend="torch", **cfg).to(device=device, dtype=dtype)
    x = torch.randn(2, cfg["in_chans"], cfg["img_size"], cfg["img_size"], device=device)
    err_kernel, err_torch = errors(with_backend(model, backend), x), errors(model, x)
    for name, err in err_kernel.items():
        assert err <= max(2 * err_torch[name], TOLERANCES[dtype]), (name, err, err_torch[name])


@pytest.mark.skipif(
    "triton" not in vk.available_backends("cpu"), reason="needs triton and TRITON_INTERPRET=1 (set by conftest on CPU)"
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_backend_whole_model_interpreter(dtype, highest_precision):
    _kernel_parity("triton", "cpu", dtype, TINY_KERNEL)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cfg", [TINY, dict(TINY, embed_dim=160, img_size=48)], ids=["D32-N17", "D80-N37"])
def test_kernel_backends_gpu(backend, dtype, cfg, highest_precision):
    if backend not in vk.available_backends("cuda"):
        pytest.skip(f"backend {backend!r} is not available on this CUDA device")
    _kernel_parity(backend, "cuda", dtype, cfg)


def test_backend_reaches_every_op(monkeypatch):
    """The model passes its backend to each fused op (and never decides anything itself)."""
    seen = []
    for op in ("fused_qkv", "attention", "gelu_mlp"):
        original = getattr(vk, op)

        def spy(*args, _original=original, _op=op, **kwargs):
            seen.append((_op, kwargs["backend"]))
            return _original(*args, **kwargs)

        monkeypatch.setattr(vk, op, spy)
    make("reference")(torch.randn(1, 3, 32, 32))
    assert seen == [("fused_qkv", "reference"), ("attention", "reference"), ("gelu_mlp", "reference")] * 2


# ----------------------------------------------------------------------------------------------------
# attention maps and rollout
# ----------------------------------------------------------------------------------------------------
def test_attention_maps_are_the_reference_softmax():
    model = make("torch").eval()
    x = torch.randn(2, 3, 32, 32)
    maps = model.attention_maps(x)
    assert len(maps) == 2 and all(m.shape == (2, 2, 17, 17) for m in maps)
    for m in maps:
        torch.testing.assert_close(m.sum(-1), torch.ones(2, 2, 17), atol=1e-6, rtol=0)
    # Layer 0 recomputed by hand, and tied to vit_kernels.reference.attention: probs @ v is its output.
    blk = model.blocks[0]
    h = blk.norm1(model.embed(x))
    q, k, v = reference.fused_qkv(h, blk.attn.qkv.weight, blk.attn.qkv.bias, 2)
    expected = torch.softmax(q @ k.transpose(-2, -1) / 32**0.5, dim=-1)
    torch.testing.assert_close(maps[0], expected.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(maps[0] @ v.detach(), reference.attention(q, k, v).detach(), atol=1e-6, rtol=1e-5)
    # Layer 1 sees the residual stream after block 0.
    h1 = model.blocks[1].norm1(model.blocks[0](model.embed(x)))
    torch.testing.assert_close(maps[1], model.blocks[1].attn.probs(h1).detach(), atol=1e-6, rtol=1e-5)


def test_attention_rollout():
    maps = make("torch").attention_maps(torch.randn(2, 3, 32, 32))
    r = vit.attention_rollout(maps)
    assert r.shape == (2, 17, 17)
    torch.testing.assert_close(r.sum(-1), torch.ones(2, 17), atol=1e-5, rtol=0)
    a0 = 0.5 * maps[0].mean(1) + 0.5 * torch.eye(17)
    a1 = 0.5 * maps[1].mean(1) + 0.5 * torch.eye(17)
    torch.testing.assert_close(r, a1 @ a0, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------
# position embedding resampling
# ----------------------------------------------------------------------------------------------------
def test_resize_pos_embed():
    pos = torch.randn(1, 1 + 16, 8)
    assert vit.resize_pos_embed(pos, 4) is pos
    out = vit.resize_pos_embed(pos, (6, 3))
    assert out.shape == (1, 1 + 18, 8)
    torch.testing.assert_close(out[:, :1], pos[:, :1])  # CLS kept as is
    grid = pos[:, 1:].reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(6, 3), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(out[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 18, 8))
    const = torch.ones(1, 1 + 16, 8)
    torch.testing.assert_close(vit.resize_pos_embed(const, 7), torch.ones(1, 50, 8))  # constants stay constant
    with pytest.raises(ValueError, match="not a square"):
        vit.resize_pos_embed(torch.randn(1, 1 + 12, 8), 4)


def test_checkpoint_of_another_image_size_loads():
    small = make("torch")  # 32 px: 4x4 grid
    big = make("torch", img_size=48)  # 6x6 grid
    big.load_state_dict(small.state_dict(), strict=True)
    torch.testing.assert_close(big.pos_embed.data, vit.resize_pos_embed(small.pos_embed.data, 6))
    torch.testing.assert_close(big.blocks[1].mlp.fc2.weight, small.blocks[1].mlp.fc2.weight)
    assert big(torch.randn(1, 3, 48, 48)).shape == (1, 10)


def _unresamplable_checkpoints(C: int = 64) -> dict[str, dict[str, torch.Tensor]]:
    """State dicts for SMALL (2 x 2 grid) whose pos_embed is not 1 class token + a square grid, as timm writes them."""
    ours = vit.VisionTransformer(**SMALL).state_dict()
    with_reg = {**ours, "reg_token": torch.randn(1, 4, C), "pos_embed": torch.randn(1, 1 + 4 + 4, C)}
    no_embed_class = {**ours, "pos_embed": torch.randn(1, 4, C)}  # the grid only
    non_square = vit.VisionTransformer(**{**SMALL, "img_size": (32, 64)}).state_dict()  # a 2 x 4 grid
    return {"reg_tokens": with_reg, "no_embed_class": no_embed_class, "non_square": non_square}


@pytest.mark.parametrize("kind", ["reg_tokens", "no_embed_class", "non_square"])
@pytest.mark.parametrize("strict", [True, False])
def test_load_of_unresamplable_pos_embed_says_what_to_do(kind, strict):
    """It raised resize_pos_embed's "pass old_grid=(gh, gw)", which load_state_dict gives no way to pass; now the
    message says what the checkpoint's pos_embed is and names the manual path."""
    state = _unresamplable_checkpoints()[kind]
    model = vit.VisionTransformer(**SMALL)
    shape = re.escape(str(tuple(state["pos_embed"].shape)))
    with pytest.raises(
        ValueError, match=rf"pos_embed in the checkpoint is {shape}.*vit\.resize_pos_embed\(.*old_grid="
    ):
        model.load_state_dict(state, strict=strict)
    if kind == "reg_tokens":
        with pytest.raises(ValueError, match="this one has reg_token"):
            model.load_state_dict(state, strict=strict)
    if kind == "non_square":  # the manual path the message names
        state["pos_embed"] = vit.resize_pos_embed(state["pos_embed"], (2, 2), old_grid=(2, 4))
        model.load_state_dict(state, strict=True)
        torch.testing.assert_close(model.pos_embed.data, state["pos_embed"])


# ----------------------------------------------------------------------------------------------------
# autocast, compile, save/load
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_autocast_bf16_cpu(backend):
    model = make(backend)
    x = torch.randn(2, 3, 32, 32)
    fp32_logits = model(x).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    assert logits.dtype == torch.bfloat16
    assert rel_error(logits, fp32_logits) < 3e-2
    logits.float().sum().backward()
    assert all(
        p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
        for p in model.parameters()
    )


def test_torch_compile_fullgraph():
    model = make("torch", depth=1)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 32, 32)
    logits, grads, g = run(model, x)
    c_logits, c_grads, _ = run(compiled, x, g, params_of=model)
    assert rel_error(c_logits, logits) < 1e-6
    for name in grads:
        assert rel_error(c_grads[name], grads[name]) < 1e-6, name


def test_save_and_load():
    model = make("torch").eval()
    x = torch.randn(2, 3, 32, 32)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = vit.VisionTransformer(backend="torch", **TINY).eval()
    fresh.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)
    buf = io.BytesIO()
    torch.save(model, buf)  # the whole module: config and backend travel with it
    buf.seek(0)
    whole = torch.load(buf, weights_only=False)
    assert whole.config == model.config and whole.backend == "torch"
    torch.testing.assert_close(whole(x), model(x), atol=0, rtol=0)


def test_deepcopy_and_drop_path_train_mode():
    model = make("torch", drop_path_rate=0.5, drop_rate=0.1)
    clone = copy.deepcopy(model)
    x = torch.randn(4, 3, 32, 32)
    model.eval(), clone.eval()
    torch.testing.assert_close(model(x), clone(x), atol=0, rtol=0)  # eval: no stochastic depth
    model.train()
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    b = model(x)
    assert not torch.equal(a, b)  # train: stochastic depth and dropout are active


# ----------------------------------------------------------------------------------------------------
# DistributedDataParallel, 2 CPU processes over gloo
# ----------------------------------------------------------------------------------------------------
# It takes seconds. A CI run once hung here until CI's 90-minute limit, with nothing printed to say where; so every
# wait is bounded: gloo on the loopback interface (not whatever the host name resolves to), a store / collective
# timeout, each rank dumps its stack and exits when stuck, and the test kills the ranks at a deadline.
DDP_DEADLINE_S = 240
DDP_RANK_STUCK_S = 150


def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    import datetime
    import faulthandler
    import socket

    import torch.distributed as dist

    faulthandler.dump_traceback_later(DDP_RANK_STUCK_S, exit=True)  # a stuck rank prints where, then exits 1
    if "lo" in {name for _, name in socket.if_nameindex()}:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        # The DDP model is freed when _ddp_train returns, while the process group still exists. Freed after
        # destroy_process_group, on _ddp_worker's own return, a rank once hung there: CI at dd18ca5 printed its stack
        # stopped in torch's spawn wrapper at the call, with the worker's frame gone and its timer cancelled.
        _ddp_train(rank, out_dir)
    finally:
        dist.destroy_process_group()
    faulthandler.cancel_dump_traceback_later()


def _ddp_train(rank: int, out_dir: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)  # same initial weights on both ranks (DDP also broadcasts rank 0's)
    model = DDP(vit.VisionTransformer(backend="auto", **TINY))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(100 + rank)  # different data per rank
    for _ in range(2):
        x, y = torch.randn(2, 3, 32, 32, generator=gen), torch.randint(0, 10, (2,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.save({"grads": grads, "params": params}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_ddp_two_processes_gloo(tmp_path):
    import signal
    import time

    import torch.multiprocessing as mp

    # Python's fault handler in the ranks from their first line, so that SIGABRT at the deadline prints where each
    # one is even if it hangs before _ddp_worker arms its own timer (a CI run hung so, and printed nothing).
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PYTHONFAULTHANDLER", "1")
        ranks = mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + DDP_DEADLINE_S
    while not ranks.join(timeout=2):  # raises as soon as a rank fails
        if time.monotonic() > deadline:
            for process in ranks.processes:
                if process.is_alive():
                    os.kill(process.pid, signal.SIGABRT)  # the fault handler dumps every thread's stack
            time.sleep(2)
            for process in ranks.processes:
                process.kill()
            pytest.fail(f"the DDP ranks were still running after {DDP_DEADLINE_S} s and were killed (their stacks "
                        "are in the captured stderr)")  # fmt: skip
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["grads"].abs().sum() > 0
    torch.testing.assert_close(r0["grads"], r1["grads"], atol=0, rtol=0)  # all-reduced: identical
    torch.testing.assert_close(r0["params"], r1["params"], atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------------
# the end-to-end job
# ----------------------------------------------------------------------------------------------------
def test_train_digits_reaches_accuracy(tmp_path):
    pytest.importorskip("sklearn", reason="the digits data set comes from scikit-learn (pip install scikit-learn)")
    from vit.train import TrainConfig, train

    cfg = TrainConfig(epochs=12, depth=2, out=str(tmp_path), progress=False, device="cpu")
    metrics = train(cfg)
    # Seeded: on this setting the held-out accuracy is ~0.9; chance is 0.1.
    assert metrics["test_accuracy"] >= 0.80, metrics["test_accuracy_per_epoch"]
    assert (tmp_path / "loss_curve.png").stat().st_size > 0 and (tmp_path / "metrics.json").exists()
    reloaded = vit.VisionTransformer(
        img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0
    )
    reloaded.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))


def test_visualize_cli_random_model(tmp_path):
    pytest.importorskip("matplotlib", reason="vit.visualize draws with matplotlib")
    import matplotlib.pyplot as plt

    from vit import visualize

    image = tmp_path / "in.png"
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 40), torch.linspace(0, 1, 50), indexing="ij")
    plt.imsave(image, torch.stack([xx, yy, (xx - yy).abs()], -1).numpy())
    out = tmp_path / "maps.png"
    maps = visualize.main([str(image), "--out", str(out), "--random-model", "--img-size", "64", "--layers", "0", "11"])
    assert out.stat().st_size > 0
    assert list(maps) == ["layer 0", "layer 11", "rollout"] and all(m.shape == (4, 4) for m in maps.values())
    assert 0 < maps["rollout"].sum() < 1  # the CLS row of a row-stochastic matrix, without its CLS column
    with pytest.raises(SystemExit):
        visualize.main([str(image), "--out", str(out)])  # neither --checkpoint nor --random-model


# ----------------------------------------------------------------------------------------------------
# the command-line tools never lose or fake a result (issue 32)
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flag, value",
    [("--batch-size", "0"), ("--batch-size", "-4"), ("--epochs", "0"), ("--epochs", "-1"), ("--lr", "0")],
)
def test_train_cli_rejects_bad_arguments(tmp_path, capsys, monkeypatch, flag, value):
    """Before the fix: --batch-size 0 raised ZeroDivisionError, --epochs 0 IndexError, and --batch-size -4 trained
    nothing and wrote an untrained model with rc 0. Now an argparse error (exit 2) naming the argument, nothing run."""
    from vit import train as train_mod

    monkeypatch.setattr(train_mod, "_train", lambda *a: pytest.fail("training started despite a bad argument"))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        train_mod.main([flag, value, "--out", str(out), "--no-progress", "--device", "cpu"])
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["--device", "bogus"],  # torch.device's RuntimeError
        ["--device", f"cuda:{torch.cuda.device_count()}"],  # no such CUDA device (any CUDA device on a CPU machine)
        ["--seed", "-1", "--device", "cpu"],  # scikit-learn's split refuses it
        ["--seed", str(2**32), "--device", "cpu"],
        ["--backend", "cuda", "--device", "cpu"],  # the cuda backend needs CUDA tensors
    ],
    ids=lambda argv: " ".join(argv),
)
def test_train_cli_rejects_settings_that_cannot_run(tmp_path, capsys, monkeypatch, argv):
    """These crashed with a traceback after --out was created and the data loaded; now an argparse error (exit 2)
    naming the argument, with nothing run and no --out. The library function refuses them too, before --out."""
    from vit import train as train_mod

    monkeypatch.setattr(train_mod, "load_digits", lambda *a: pytest.fail("data loaded despite a bad argument"))
    monkeypatch.setattr(train_mod, "_train", lambda *a: pytest.fail("training started despite a bad argument"))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        train_mod.main([*argv, "--out", str(out), "--no-progress"])
    assert exc.value.code == 2
    assert f"error: {argv[0]}:" in capsys.readouterr().err
    assert not out.exists()
    cfg = {"device": "cpu", "seed": 0, "backend": "auto"}
    for flag, value in zip(argv[::2], argv[1::2], strict=True):
        cfg[flag[2:]] = int(value) if flag == "--seed" else value
    with pytest.raises(ValueError, match=argv[0][2:]):
        train_mod.train(train_mod.TrainConfig(out=str(out), progress=False, **cfg))
    assert not out.exists()


def test_train_cli_checks_out_before_training(tmp_path, capsys, monkeypatch):
    """An --out that cannot be created fails at once, not after the whole run."""
    from vit import train as train_mod

    monkeypatch.setattr(train_mod, "_train", lambda *a: pytest.fail("training started before --out was checked"))
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(SystemExit) as exc:
        train_mod.main(["--out", str(blocker / "run"), "--no-progress", "--device", "cpu"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--out" in err and str(blocker / "run") in err


def test_train_never_overwrites_a_run_without_overwrite(tmp_path, capsys):
    pytest.importorskip("sklearn", reason="the digits data set comes from scikit-learn (pip install scikit-learn)")
    from vit import train as train_mod

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text('{"earlier": "run"}')
    args = ["--out", str(out), "--epochs", "1", "--no-progress", "--device", "cpu"]
    with pytest.raises(SystemExit) as exc:
        train_mod.main(args)
    assert exc.value.code == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "metrics.json").read_text() == '{"earlier": "run"}' and not (out / "model.pt").exists()
    # The library function refuses too: it is what writes the files.
    with pytest.raises(FileExistsError, match="overwrite"):
        train_mod.train(train_mod.TrainConfig(epochs=1, out=str(out), progress=False, device="cpu"))
    train_mod.main([*args, "--overwrite"])
    assert "earlier" not in (out / "metrics.json").read_text() and (out / "model.pt").exists()


def test_train_default_output_is_git_ignored():
    """`runs/` (vit.train's default --out) must not show up as untracked files."""
    import shutil
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if shutil.which("git") is None or not os.path.isdir(os.path.join(root, ".git")):
        pytest.skip("not a git checkout")
    result = subprocess.run(["git", "check-ignore", "-q", "runs/digits/metrics.json"], cwd=root, check=False)
    assert result.returncode == 0, "runs/ is not in .gitignore"


def _save_image(path, array, mode=None):
    from PIL import Image

    Image.fromarray(array, mode=mode).save(path)
    return str(path)


@pytest.mark.parametrize(
    "suffix, make, expected",
    [
        # all-1 uint8: nearly black, not white (the old code rescaled only when the max was > 1)
        pytest.param("tif", lambda np: np.ones((8, 8, 3), np.uint8), 1 / 255, id="uint8_ones_tif"),
        pytest.param("png", lambda np: np.ones((8, 8, 3), np.uint8), 1 / 255, id="uint8_ones_png"),
        pytest.param("tif", lambda np: np.full((8, 8), 255, np.uint8), 1.0, id="uint8_white_tif"),
        # 16-bit: full scale is 65535 (the old code divided by 255: values up to 257)
        pytest.param("tif", lambda np: np.full((8, 8), 65535, np.uint16), 1.0, id="uint16_white_tif"),
        pytest.param("png", lambda np: np.full((8, 8), 32768, np.uint16), 32768 / 65535, id="uint16_half_png"),
        pytest.param("tif", lambda np: np.full((8, 8), 65535, np.int32), 1.0, id="mode_I_white_tif"),
        pytest.param("tif", lambda np: np.full((8, 8), 0.25, np.float32), 0.25, id="mode_F_kept_tif"),
    ],
)
def test_visualize_scales_images_by_dtype(tmp_path, suffix, make, expected):
    np = pytest.importorskip("numpy")
    pytest.importorskip("PIL", reason="images are read with Pillow")
    from vit import visualize

    path = _save_image(tmp_path / f"in.{suffix}", make(np))
    images, display = visualize.load_image(path, (8, 8), in_chans=3)
    torch.testing.assert_close(display, torch.full((8, 8, 3), expected), atol=1e-6, rtol=0)
    mean, std = torch.tensor(visualize.IMAGENET_MEAN), torch.tensor(visualize.IMAGENET_STD)
    torch.testing.assert_close(images[0, :, 0, 0], (expected - mean) / std, atol=1e-5, rtol=0)


def test_visualize_rejects_out_of_range_float_image(tmp_path):
    np = pytest.importorskip("numpy")
    pytest.importorskip("PIL", reason="images are read with Pillow")
    from vit import visualize

    path = _save_image(tmp_path / "in.tif", np.full((8, 8), 3.0, np.float32))
    with pytest.raises(ValueError, match="in.tif"):
        visualize.load_image(path, (8, 8))


def _visualize_fails(argv, capsys, monkeypatch) -> str:
    """Run vit.visualize with `argv`; it must exit 2 before computing any map. Returns stderr."""
    pytest.importorskip("matplotlib", reason="vit.visualize draws with matplotlib")
    from vit import visualize

    monkeypatch.setattr(visualize, "cls_maps", lambda *a: pytest.fail("maps computed despite a bad argument"))
    with pytest.raises(SystemExit) as exc:
        visualize.main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


@pytest.fixture
def png(tmp_path):
    np = pytest.importorskip("numpy")
    pytest.importorskip("PIL", reason="images are read with Pillow")
    return _save_image(tmp_path / "in.png", np.zeros((20, 20, 3), np.uint8))


def test_visualize_missing_image(tmp_path, capsys, monkeypatch):
    missing = str(tmp_path / "nope.png")
    err = _visualize_fails([missing, "--out", str(tmp_path / "m.png"), "--random-model"], capsys, monkeypatch)
    assert missing in err


def test_visualize_not_an_image(tmp_path, capsys, monkeypatch):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    err = _visualize_fails([str(text), "--out", str(tmp_path / "m.png"), "--random-model"], capsys, monkeypatch)
    assert str(text) in err


@pytest.mark.parametrize("size", ["0", "-16"])
def test_visualize_bad_img_size(tmp_path, png, capsys, monkeypatch, size):
    err = _visualize_fails(
        [png, "--out", str(tmp_path / "m.png"), "--random-model", "--img-size", size], capsys, monkeypatch
    )
    assert "--img-size" in err


def test_visualize_missing_out_folder(tmp_path, png, capsys, monkeypatch):
    out = str(tmp_path / "missing" / "m.png")
    err = _visualize_fails([png, "--out", out, "--random-model", "--img-size", "32"], capsys, monkeypatch)
    assert "--out" in err and str(tmp_path / "missing") in err


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(lambda p: torch.save(torch.zeros(3), p), id="a_tensor"),
        pytest.param(lambda p: torch.save({"head.weight": "text"}, p), id="dict_of_strings"),
        pytest.param(lambda p: p.write_text("not a checkpoint"), id="not_torch"),
        pytest.param(lambda p: None, id="missing"),
        pytest.param(lambda p: torch.save({"head.weight": torch.zeros(3, 192)}, p), id="wrong_keys"),
    ],
)
def test_visualize_bad_checkpoint(tmp_path, png, capsys, monkeypatch, content):
    ckpt = tmp_path / "ckpt.pt"
    content(ckpt)
    err = _visualize_fails([png, "--out", str(tmp_path / "m.png"), "--checkpoint", str(ckpt)], capsys, monkeypatch)
    assert "--checkpoint" in err and str(ckpt) in err


def test_visualize_checkpoint_of_another_image_size(tmp_path, png, capsys, monkeypatch):
    """--img-size with a checkpoint trained at another size was refused (pos_embed shape), though the model's loader
    resamples it, as --img-size's help says; a pos_embed the loader cannot resample is still an argparse error."""
    pytest.importorskip("matplotlib", reason="vit.visualize draws with matplotlib")
    from vit import visualize

    trained = vit.create_model("vit_tiny_patch16_224", backend="torch", img_size=64, num_classes=3)  # 4 x 4 grid
    ckpt = tmp_path / "ckpt.pt"
    torch.save(trained.state_dict(), ckpt)
    out = tmp_path / "maps.png"
    loaded, cls_maps = [], visualize.cls_maps
    monkeypatch.setattr(visualize, "cls_maps", lambda model, *a: loaded.append(model) or cls_maps(model, *a))
    visualize.main([png, "--out", str(out), "--checkpoint", str(ckpt), "--img-size", "32", "--layers", "0"])
    assert out.stat().st_size > 0
    torch.testing.assert_close(loaded[0].pos_embed.data, vit.resize_pos_embed(trained.pos_embed.data, 2))
    torch.testing.assert_close(loaded[0].head.weight.data, trained.head.weight.data)

    state = trained.state_dict()
    state["pos_embed"] = torch.randn(1, 1 + 8, 192)  # a 2 x 4 grid: not resamplable from the token count
    torch.save(state, ckpt)
    err = _visualize_fails([png, "--out", str(out), "--checkpoint", str(ckpt), "--img-size", "32"], capsys, monkeypatch)
    assert "--checkpoint" in err and "pos_embed (1, 9, 192) vs (1, 5, 192)" in err


@pytest.mark.parametrize("backend", ["auto", "torch", "reference"])
def test_forward_on_meta_tensors_gives_the_shapes(backend):
    """A model built and run on the meta device (shape inference, no memory): the block's autocast check asked
    torch.is_autocast_enabled("meta"), which raises; now the forward gives the logits' shape."""
    with torch.device("meta"):
        model = vit.VisionTransformer(**{**SMALL, "backend": backend})
        logits = model(torch.empty(2, 3, 32, 32))
    assert logits.shape == (2, 5) and logits.is_meta


# ----------------------------------------------------------------------------------------------------
# what a user adds to a built model; the backend attribute; argument checks of the helpers
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "reference", "triton"])
def test_hooks_adapters_and_pruning_added_after_building_are_honoured(backend, highest_precision):
    """The modules read qkv / fc1 / fc2's weights straight into the fused ops (and on triton the fused block skips
    the norms, attn and mlp): a hook added later never ran, an adapter in place of qkv was ignored on every backend,
    and torch.nn.utils.prune's pre-hook never ran (the second training step failed). Now each runs as in a plain
    module tree."""
    if backend not in vk.available_backends("cpu"):
        pytest.skip(f"{backend} cannot run on cpu here")
    x = torch.randn(2, 3, 32, 32)
    model = vit.VisionTransformer(**{**SMALL, "backend": backend}).eval()
    seen = []
    model.blocks[0].attn.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    model.blocks[1].norm1.register_forward_pre_hook(lambda m, i: (i[0] * 2.0,))
    doubled = copy.deepcopy(model)
    with torch.no_grad():
        out = model(x)
    assert seen == [torch.Size([2, 5, 64])]
    # the pre-hook, written into the weights instead: norm1's input doubled is the same LayerNorm of x (eps aside)
    reference_model = vit.VisionTransformer(**{**SMALL, "backend": "reference", "norm_eps": 1e-6}).eval()
    reference_model.load_state_dict(doubled.state_dict())
    reference_model.blocks[1].norm1.eps = 0.25e-6  # LN(2x, eps) == LN(x, eps / 4)
    with torch.no_grad():
        assert rel_error(out, reference_model(x)) < 1e-5

    model = vit.VisionTransformer(**{**SMALL, "backend": backend}).eval()
    merged = copy.deepcopy(model)
    adapter = LowRankAdapter(model.blocks[0].attn.qkv)
    model.blocks[0].attn.qkv = adapter
    fc1_adapter = LowRankAdapter(model.blocks[1].mlp.fc1)
    model.blocks[1].mlp.fc1 = fc1_adapter
    merged.blocks[0].attn.qkv, merged.blocks[1].mlp.fc1 = adapter.merged(), fc1_adapter.merged()
    with torch.no_grad():
        assert rel_error(model(x), merged(x)) < 1e-5

    from torch.nn.utils import prune

    model = vit.VisionTransformer(**{**SMALL, "backend": backend})
    prune.l1_unstructured(model.blocks[0].mlp.fc1, "weight", amount=0.5)
    prune.l1_unstructured(model.blocks[0].attn.proj, "weight", amount=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):  # the second step failed: "backward through the graph a second time"
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    with torch.no_grad():
        model(x)  # prune's pre-hook recomputes weight from the stepped weight_orig
    fc1 = model.blocks[0].mlp.fc1
    assert torch.equal(fc1.weight, fc1.weight_orig * fc1.weight_mask) and (fc1.weight == 0).float().mean() >= 0.5


def test_setting_the_models_backend_switches_every_op():
    """model.backend was stored once and copied into every attention and MLP: setting it changed nothing that ran,
    and any string was taken. Now it is checked and reaches every op."""
    model = vit.VisionTransformer(**SMALL)
    model.backend = "reference"
    assert {m.backend for m in model.modules() if isinstance(m, (vit.model.Attention, vit.model.Mlp))} == {"reference"}
    with pytest.raises(ValueError, match="backend must be one of"):
        model.backend = "bogus"
    assert model.backend == "reference"


def test_checkpoint_with_other_top_level_tensors_still_resamples():
    """An MAE checkpoint (mask_token, decoder_pos_embed beside a 1 + square pos_embed) at another image size was
    refused as if those were prefix tokens; it resamples, and strict=False lists them as unexpected."""
    trained = vit.VisionTransformer(**{**SMALL, "img_size": 64})  # a 4 x 4 grid
    state = {**trained.state_dict(), "mask_token": torch.randn(1, 1, 64), "decoder_pos_embed": torch.randn(1, 17, 32)}
    model = vit.VisionTransformer(**SMALL)  # 2 x 2
    result = model.load_state_dict(state, strict=False)
    assert sorted(result.unexpected_keys) == ["decoder_pos_embed", "mask_token"] and not result.missing_keys
    torch.testing.assert_close(model.pos_embed.data, vit.resize_pos_embed(trained.pos_embed.data, 2))


def test_numpy_sizes_build_a_model_that_runs():
    np = pytest.importorskip("numpy")
    model = vit.VisionTransformer(**{**SMALL, "num_heads": np.int64(2), "embed_dim": np.int32(64)})
    assert type(model.config.num_heads) is int and model(torch.randn(1, 3, 32, 32)).shape == (1, 5)


def test_resize_pos_embed_checks_its_arguments():
    np = pytest.importorskip("numpy")
    pos = torch.randn(1, 1 + 16, 8)
    assert vit.resize_pos_embed(pos, np.int64(2)).shape == (1, 5, 8)
    for bad, error, match in [
        (dict(new_grid=(2, 2, 2)), TypeError, "new_grid must be an int or a pair"),  # was cut to (2, 2)
        (dict(new_grid=0), ValueError, "new_grid must be positive"),
        (dict(new_grid=2, old_grid=(4, 4, 1)), TypeError, "old_grid must be an int or a pair"),
        (dict(new_grid=2, num_prefix_tokens=-1), ValueError, "num_prefix_tokens"),
        (dict(new_grid=2, num_prefix_tokens=17), ValueError, "num_prefix_tokens"),  # no grid token left
    ]:
        with pytest.raises(error, match=match):
            vit.resize_pos_embed(pos, **bad)


def test_images_of_the_wrong_channels_dtype_or_device_name_the_images():
    model = vit.VisionTransformer(**SMALL)
    with pytest.raises(ValueError, match=r"images must have shape \(B, 3, 32, 32\), got \(1, 4, 32, 32\)"):
        model(torch.randn(1, 4, 32, 32))
    with pytest.raises(TypeError, match="images must be floating point"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(TypeError, match="images must be torch.float32, the model's dtype, got torch.float64"):
        model(torch.randn(1, 3, 32, 32, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts the convolution's operands itself
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)


def test_attention_rollout_refuses_maps_that_are_not_b_h_n_n():
    model = vit.VisionTransformer(**SMALL).eval()
    maps = model.attention_maps(torch.randn(5, 3, 32, 32))  # B == N == 5
    assert vit.attention_rollout(maps).shape == (5, 5, 5)
    with pytest.raises(ValueError, match=r"maps\[0\] must be \(B, H, N, N\)"):
        vit.attention_rollout([m.mean(1) for m in maps])  # head-fused already: was averaged over queries
    with pytest.raises(ValueError, match=r"maps\[1\] must be \(B, H, N, N\) probabilities, all of one B and N"):
        vit.attention_rollout([maps[0], maps[1][:2]])
