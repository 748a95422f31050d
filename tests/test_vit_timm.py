"""timm's VisionTransformer <-> ours: checkpoints load with strict=True and give the same logits and
gradients; patch_timm puts an existing timm model onto the fused ops with the same outputs.

timm needs torchvision, which does not import beside the CPU torch of the main environment; CI runs this
file in a second environment (torch 2.14.1, torchvision 0.29.1, timm).
"""

import copy

import pytest
import torch

import vit


def _import_timm():
    try:
        import timm

        return timm, None
    except Exception as exc:  # not installed, or a torchvision that does not import beside this torch
        return None, f"needs timm and torchvision (the timm CI environment): {type(exc).__name__}: {exc}"


timm, TIMM_MISSING = _import_timm()
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
    patched = vit.patch_timm(copy.deepcopy(timm_model), backend="torch")
    assert patched.blocks[0].attn._vk_backend == "torch" and patched.blocks[0].mlp._vk_backend == "torch"
    x, g = torch.randn(2, 3, 32, 32), torch.randn(2, 10)
    ref_logits, ref_grads = logits_and_grads(timm_model, x, g)
    logits, grads = logits_and_grads(patched, x, g)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    assert patched.state_dict().keys() == timm_model.state_dict().keys()


def test_patch_timm_rejects_what_the_fused_ops_cannot_do():
    from timm.models.vision_transformer import VisionTransformer

    with pytest.raises(ValueError, match="q_norm"):
        vit.patch_timm(VisionTransformer(**TINY, qk_norm=True))
    with pytest.raises(ValueError, match="attn_drop"):
        vit.patch_timm(VisionTransformer(**TINY, attn_drop_rate=0.1))


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
