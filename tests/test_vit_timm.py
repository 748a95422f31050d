"""timm's VisionTransformer <-> ours: checkpoints load with strict=True and give the same logits and
gradients; patch_timm puts an existing timm model onto the fused ops with the same outputs.

timm needs torchvision, which does not import beside the CPU torch of the main environment; CI runs this
file in a second environment (torch 2.14.1, torchvision 0.29.1, timm).
"""

import copy

import pytest
import torch
from conftest import counting_fused_ops, import_timm

import vit

timm, TIMM_MISSING = import_timm()
# A skip mark rather than a module-level importorskip: the tests are still collected, so running this file
# alone where timm is missing reports skips (exit 0) instead of "no tests collected" (exit 5).
pytestmark = pytest.mark.skipif(timm is None, reason=str(TIMM_MISSING))

TINY = dict(img_size=32, patch_size=8, in_chans=3, num_classes=10, embed_dim=64, depth=2, num_heads=2)


@pytest.fixture
def timm_model():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(**TINY).eval()
    with torch.no_grad():  # timm zero-inits biases and unit-inits norms: randomise them so the mapping matters
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def logits_and_grads(model, x, g):
    model.zero_grad(set_to_none=True)
    logits = model(x)
    logits.backward(g)
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_timm_checkpoint_loads_strict_with_same_logits_and_grads(timm_model, backend):
    ours = vit.VisionTransformer(backend=backend, **TINY).eval()
    sd = timm_model.state_dict()
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [(k, v.shape) for k, v in sd.items()]
    ours.load_state_dict(sd, strict=True)
    x, g = torch.randn(2, 3, 32, 32), torch.randn(2, 10)
    ref_logits, ref_grads = logits_and_grads(timm_model, x, g)
    logits, grads = logits_and_grads(ours, x, g)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_patch_timm_same_logits_and_grads(timm_model):
    patched = copy.deepcopy(timm_model)
    summary = vit.patch_timm(patched, backend="torch")
    assert summary.attention == ["blocks.0.attn", "blocks.1.attn"] and summary.mlp == ["blocks.0.mlp", "blocks.1.mlp"]
    assert summary.skipped == [] and "patched 2 attention and 2 MLP modules" in str(summary)
    x, g = torch.randn(2, 3, 32, 32), torch.randn(2, 10)
    ref_logits, ref_grads = logits_and_grads(timm_model, x, g)
    logits, grads = logits_and_grads(patched, x, g)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    assert patched.state_dict().keys() == timm_model.state_dict().keys()


def test_patch_timm_runs_the_fused_ops(timm_model, monkeypatch):
    """With backend="torch" a patched model computes the same maths as timm's, so equal logits cannot show
    that the patch is in use: count the fused ops' calls, forward and backward (issue 16, item 2)."""
    x = torch.randn(2, 3, 32, 32)
    with counting_fused_ops(monkeypatch) as counts:
        timm_model(x)
    assert counts == dict(fused_qkv=0, attention=0, gelu_mlp=0)  # the counter sees only the fused ops
    vit.patch_timm(timm_model, backend="torch")
    with counting_fused_ops(monkeypatch) as counts:
        timm_model(x).sum().backward()
    assert counts == dict(fused_qkv=2, attention=2, gelu_mlp=2)  # depth 2: one of each per block
    assert all(p.grad is not None for p in timm_model.parameters())


def test_patch_timm_falls_back_for_masks(timm_model, monkeypatch):
    """A mask or is_causal (timm passes them as arguments) runs timm's own forward: same result, no fused op."""
    vit.patch_timm(timm_model, backend="torch")
    attn = timm_model.blocks[0].attn
    x = torch.randn(2, 5, 64)
    mask = torch.randn(2, 1, 5, 5)
    original = type(attn).forward
    with counting_fused_ops(monkeypatch) as counts:
        torch.testing.assert_close(attn(x, attn_mask=mask), original(attn, x, attn_mask=mask), atol=0, rtol=0)
        torch.testing.assert_close(attn(x, None, True), original(attn, x, is_causal=True), atol=0, rtol=0)
        assert counts["attention"] == 0
        torch.testing.assert_close(attn(x, attn_mask=None), original(attn, x), atol=1e-6, rtol=1e-5)
        assert counts["attention"] == 1


def test_patch_timm_skips_what_the_fused_ops_cannot_do():
    """q/k norm, dropout inside attention: left alone and listed; strict=True refuses, naming the module."""
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(**TINY, qk_norm=True)
    summary = vit.patch_timm(model)
    assert summary.attention == [] and summary.mlp == ["blocks.0.mlp", "blocks.1.mlp"]
    assert summary.skipped[0] == (
        "blocks.0.attn",
        "Attention: q_norm is LayerNorm, not Identity: the fused ops do not compute it",
    )
    assert "forward" not in model.blocks[0].attn.__dict__
    strict_model = VisionTransformer(**TINY, attn_drop_rate=0.1)
    with pytest.raises(ValueError, match=r"strict=True\): blocks\.0\.attn cannot be patched: .*attn_drop p=0\.1"):
        vit.patch_timm(strict_model, strict=True)
    assert not any("forward" in m.__dict__ for m in strict_model.modules())  # refused: untouched, MLPs too


def test_patch_timm_refuses_models_with_nothing_to_patch():
    """A ValueError at patch time, never an AttributeError or a failure at the first forward."""
    from timm.models.vision_transformer import VisionTransformer

    with pytest.raises(ValueError, match="patch_timm found nothing it can patch in Sequential"):
        vit.patch_timm(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="(?s)nothing it can patch.*blocks.0.attn: Attention: norm is LayerNorm"):
        vit.patch_timm(VisionTransformer(**TINY, scale_attn_norm=True, scale_mlp_norm=True))
    with pytest.raises(ValueError, match="backend must be one of"):
        vit.patch_timm(VisionTransformer(**TINY), backend="fast")


def test_patch_timm_backend_shapes_checked_at_patch_time():
    """Head dim 16 is not a kernel head dim: with backend="triton" the attention is skipped with the reason
    (the MLP, 64 -> 256 -> 64 channels, still fits), instead of failing at the first forward."""
    from timm.models.vision_transformer import VisionTransformer

    summary = vit.patch_timm(VisionTransformer(**{**TINY, "num_heads": 4}), backend="triton")
    assert summary.attention == [] and len(summary.mlp) == 2
    assert "head dim 16 is not supported by backend='triton'" in summary.skipped[0][1]


@pytest.mark.parametrize("name", sorted(vit.PRESETS))
def test_factories_have_timm_state_dict(name):
    with torch.device("meta"):
        ref = timm.create_model(name, pretrained=False)
        ours = getattr(vit, name)()
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [(k, v.shape) for k, v in ref.state_dict().items()]


def test_timm_checkpoint_at_another_image_size(timm_model):
    """A 32 px timm checkpoint into a 48 px model: pos_embed resampled like timm's resample_abs_pos_embed."""
    from timm.layers import resample_abs_pos_embed

    ours = vit.VisionTransformer(backend="torch", **{**TINY, "img_size": 48})
    ours.load_state_dict(timm_model.state_dict(), strict=True)
    expected = resample_abs_pos_embed(timm_model.pos_embed.detach(), new_size=(6, 6), num_prefix_tokens=1)
    torch.testing.assert_close(ours.pos_embed.detach(), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "timm_kwargs",
    [dict(reg_tokens=4), dict(no_embed_class=True), dict(img_size=(32, 64))],
    ids=["reg", "noembed", "32x64"],
)
def test_load_of_unresamplable_timm_checkpoint(timm_kwargs):
    """A timm checkpoint with register tokens, no_embed_class or a non-square grid: a ValueError that says what its
    pos_embed is and names the manual path (it was resize_pos_embed's unactionable "pass old_grid", even with
    strict=False)."""
    kwargs = dict(img_size=32, patch_size=16, num_classes=5, embed_dim=64, depth=1, num_heads=2)
    state = timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**kwargs, **timm_kwargs}).state_dict()
    model = vit.VisionTransformer(**{**kwargs, "backend": "torch"})
    for strict in (True, False):
        with pytest.raises(ValueError, match=r"not 1 class token \+ a square grid.*vit\.resize_pos_embed"):
            model.load_state_dict(state, strict=strict)
