"""patch_timm / patch_hf over a zoo of ViT-family models: each is patched with its outputs unchanged, or
partly patched / refused with a reason listed; never a silent change, never a crash (issue 17).

Every model is built offline with small dims and random weights, every parameter perturbed so that the
tables timm and transformers zero-initialise (relative position biases, layer scales, position embeddings,
biases) are not zero. Expected outcomes are pinned per model, so a patch that starts skipping what it
patched before fails here too. While the patched model runs, the fused ops are counted: each patched
attention calls vk.fused_qkv and vk.attention once, each patched MLP vk.gelu_mlp once.

The timm models need the timm CI environment (torch 2.14.1, torchvision, timm); the Hugging Face ones
need transformers (both environments). backend="torch" runs on the CPU (outputs there are bit-identical:
the same SDPA and GEMMs); backend="triton" on the test device (the Triton interpreter on CPU), with the
five costliest models under the interpreter (pit, twins, swin, crossvit, tnt) marked slow.
"""

import copy
import functools

import pytest
import torch
from conftest import DEVICE, TOLERANCES, LowRankAdapter, counting_fused_ops, import_timm, rel_error

import vit
import vit_kernels as vk

timm, TIMM_MISSING = import_timm()
try:
    import transformers
except ImportError:
    transformers = None
needs_timm = pytest.mark.skipif(timm is None, reason=str(TIMM_MISSING))
needs_transformers = pytest.mark.skipif(transformers is None, reason="needs transformers (pip install transformers)")
TRITON_HERE = "triton" in vk.available_backends(DEVICE)
needs_triton = pytest.mark.skipif(not TRITON_HERE, reason=f"the triton backend cannot run on {DEVICE} here")


def expect(attention=0, mlp=0, skipped=(), refused=None, blocks=0):
    """The pinned outcome of patch_*(backend="torch"): counts of patched modules and, per skipped module, a
    piece of its reason (one entry per module, in module order); or `refused`, a piece of the ValueError.
    `blocks`: how many pre-LN blocks are patched to run whole-block fused (timm's Block without LayerScale, HF's
    ViTLayer)."""
    return dict(attention=attention, mlp=mlp, skipped=list(skipped), refused=refused, blocks=blocks)


# ----------------------------------------------------------------------------------------------------
# the zoo
# ----------------------------------------------------------------------------------------------------
SMALL = dict(embed_dim=64, depth=2, num_heads=2)  # head dim 32: one the triton kernels have
# (id, timm name, create_model kwargs, image size, outcome, triton: "fast" | "slow" | None (nothing to run))
TIMM_ZOO = [
    ("vit", "vit_tiny_patch16_224", dict(img_size=32, **SMALL), 32, expect(2, 2, blocks=2), "fast"),
    (
        "deit_distilled",
        "deit_tiny_distilled_patch16_224",
        dict(img_size=32, **SMALL),
        32,
        expect(2, 2, blocks=2),
        "fast",
    ),
    ("deit3", "deit3_small_patch16_224", dict(img_size=32, **SMALL), 32, expect(2, 2), "fast"),
    ("dinov2_reg4", "vit_small_patch14_reg4_dinov2", dict(img_size=28, **SMALL), 28, expect(2, 2), "fast"),
    (
        "siglip",
        "vit_base_patch16_siglip_224",
        dict(img_size=32, **SMALL),
        32,
        expect(2, 3, ["attention_pool.AttentionPoolLatent is not a class patch_timm patches"], blocks=2),
        "fast",
    ),
    ("clip", "vit_base_patch16_clip_224", dict(img_size=32, **SMALL), 32, expect(2, 2, blocks=2), "fast"),
    (
        "clip_quickgelu",
        "vit_base_patch16_clip_quickgelu_224",
        dict(img_size=32, **SMALL),
        32,
        expect(2, 0, ["QuickGELU is not GELU"] * 2),
        "fast",
    ),
    (
        "vit_gelu_tanh",  # nn.GELU(approximate="tanh")
        "vit_tiny_patch16_224",
        dict(img_size=32, act_layer=functools.partial(torch.nn.GELU, approximate="tanh"), **SMALL),
        32,
        expect(2, 2, blocks=2),
        "fast",
    ),
    (
        "vit_timm_gelu_tanh",
        "vit_tiny_patch16_224",
        dict(img_size=32, act_layer="gelu_tanh", **SMALL),
        32,
        expect(2, 2, blocks=2),
        None,
    ),
    ("flexivit", "flexivit_small", dict(img_size=32, **SMALL), 32, expect(2, 2, blocks=2), "fast"),
    ("vit_gap", "vit_medium_patch16_gap_256", dict(img_size=32, **SMALL), 32, expect(2, 2), "fast"),
    (
        "vit_qk_norm",
        "vit_tiny_patch16_224",
        dict(img_size=32, qk_norm=True, **SMALL),
        32,
        expect(0, 2, ["q_norm is LayerNorm, not Identity"] * 2),
        "fast",
    ),
    (
        "vit_attn_drop",
        "vit_tiny_patch16_224",
        dict(img_size=32, attn_drop_rate=0.1, **SMALL),
        32,
        expect(0, 2, ["attn_drop p=0.1"] * 2),
        "fast",
    ),
    (
        "vit_scale_norms",
        "vit_tiny_patch16_224",
        dict(img_size=32, scale_attn_norm=True, scale_mlp_norm=True, **SMALL),
        32,
        expect(refused="blocks.0.attn: Attention: norm is LayerNorm"),
        None,
    ),
    (
        "vit_relpos",
        "vit_relpos_small_patch16_224",
        dict(img_size=32, **SMALL),
        32,
        expect(0, 2, ["RelPosAttention is not", "RelPosMlp is not", "ReLU is not GELU"] * 2),
        "fast",
    ),
    (
        "beit",
        "beit_base_patch16_224",
        dict(img_size=32, **SMALL),
        32,
        expect(0, 2, ["timm.models.beit.Attention is not a class patch_timm patches"] * 2),
        "fast",
    ),
    (
        "beitv2",
        "beitv2_base_patch16_224",
        dict(img_size=32, **SMALL),
        32,
        expect(0, 2, ["timm.models.beit.Attention is not"] * 2),
        "fast",
    ),
    (
        "samvit",
        "samvit_base_patch16",
        dict(img_size=64, global_attn_indexes=(1,), window_size=2, neck_chans=16, **SMALL),
        64,
        expect(0, 2, ["vision_transformer_sam.Attention is not"] * 2),
        "fast",
    ),
    (
        "efficientformer",
        "efficientformer_l1",
        dict(depths=(1, 1, 1, 2), embed_dims=(16, 16, 32, 64)),  # its attention is built for 224 px
        224,
        expect(0, 1, ["ConvMlpWithNorm is not"] * 4 + ["efficientformer.Attention is not"]),
        "fast",
    ),
    (
        "cait",
        "cait_xxs24_224",
        dict(img_size=32, depth_token_only=1, **SMALL),
        32,
        expect(0, 3, ["TalkingHeadAttn is not"] * 2 + ["ClassAttn is not"]),
        "fast",
    ),
    (
        "xcit",
        "xcit_nano_12_p16_224",
        dict(img_size=32, cls_attn_layers=1, **SMALL),
        32,
        expect(0, 3, ["xcit.XCA is not"] * 2 + ["ClassAttn is not"]),
        "fast",
    ),
    (
        "eva02_rope_swiglu",
        "eva02_tiny_patch14_224",
        dict(img_size=28, **SMALL),
        28,
        expect(refused="blocks.0.attn: timm.models.eva.EvaAttention is not a class patch_timm patches"),
        None,
    ),
    ("pit", "pit_ti_224", dict(img_size=64, depth=(1, 1, 1)), 64, expect(3, 3, blocks=3), "slow"),
    ("levit", "levit_128s", dict(img_size=64, depth=(1, 1, 1)), 64, expect(refused="levit.Attention"), None),
    (
        "twins",
        "twins_svt_small",
        dict(img_size=64, embed_dims=(32, 64, 64, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 2)),
        64,
        expect(0, 4, ["LocallyGroupedAttn is not"] * 4),
        "slow",
    ),
    (
        "swin",  # its Mlp sees (B, H, W, C) tokens
        "swin_tiny_patch4_window7_224",
        dict(img_size=64, window_size=2, embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 2)),
        64,
        expect(0, 4, ["WindowAttention is not"] * 4),
        "slow",
    ),
    (
        "crossvit",
        "crossvit_tiny_240",
        dict(embed_dim=[32, 64], depth=[[1, 1, 0]], num_heads=[1, 2]),
        240,
        expect(2, 2, ["CrossAttention is not"] * 2, blocks=2),
        "slow",
    ),
    (
        "tnt",
        "tnt_s_patch16_224",
        dict(img_size=32, embed_dim=64, inner_dim=16, depth=2, num_heads_outer=2, num_heads_inner=2),
        32,
        expect(0, 4, ["tnt.Attention is not"] * 4),
        "slow",
    ),
]

HF_SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8, num_labels=5)
HF_VIT = dict(HF_SMALL, intermediate_size=96)


def _two_towers(**vision) -> dict:
    """A CLIP / SigLIP config: small vision and text towers."""
    tower = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96)
    return dict(vision_config=dict(tower, image_size=32, patch_size=8, **vision), text_config=tower, num_labels=5)


# SigLIP (1 and 2): the encoder MLPs and the pooling head's; its attention and the head's are their own
_SIGLIP_OUTCOME = expect(0, 3, ["Attention is not a class patch_hf patches"] * 2
                         + ["MultiheadAttentionPoolingHead is not", "MultiheadAttention is not"])  # fmt: skip
# (id, model class name, config class name, config kwargs, outcome)
HF_ZOO = [
    ("vit", "ViTForImageClassification", "ViTConfig", HF_VIT, expect(2, 2, blocks=2)),
    (
        "vit_gelu_tanh",
        "ViTForImageClassification",
        "ViTConfig",
        dict(HF_VIT, hidden_act="gelu_pytorch_tanh"),
        expect(2, 2, blocks=2),
    ),
    (
        "vit_gelu_new",
        "ViTForImageClassification",
        "ViTConfig",
        dict(HF_VIT, hidden_act="gelu_new"),
        expect(2, 2, blocks=2),
    ),
    (
        "vit_quick_gelu",
        "ViTForImageClassification",
        "ViTConfig",
        dict(HF_VIT, hidden_act="quick_gelu"),
        expect(2, 0, ["QuickGELUActivation is not GELU"] * 2),
    ),
    (
        "vit_attention_dropout",
        "ViTForImageClassification",
        "ViTConfig",
        dict(HF_VIT, attention_probs_dropout_prob=0.1),
        expect(0, 2, ["attention dropout (attention_probs_dropout_prob) p=0.1"] * 2),
    ),
    ("deit_with_teacher", "DeiTForImageClassificationWithTeacher", "DeiTConfig", HF_VIT, expect(2, 2)),
    ("beit", "BeitForImageClassification", "BeitConfig", HF_VIT, expect(2, 2)),  # k_proj has no bias
    (
        "beit_relative_position_bias",
        "BeitForImageClassification",
        "BeitConfig",
        dict(HF_VIT, use_relative_position_bias=True, layer_scale_init_value=0.1),
        expect(0, 2, ["relative position bias"] * 2),
    ),
    ("dinov2", "Dinov2ForImageClassification", "Dinov2Config", dict(HF_SMALL, mlp_ratio=2), expect(2, 2)),
    (
        "dinov2_swiglu",
        "Dinov2ForImageClassification",
        "Dinov2Config",
        dict(HF_SMALL, use_swiglu_ffn=True),
        expect(2, 0, ["Dinov2SwiGLUFFN is not a class patch_hf patches"] * 2),
    ),
    (
        "dinov2_registers",
        "Dinov2WithRegistersForImageClassification",
        "Dinov2WithRegistersConfig",
        dict(HF_SMALL, num_register_tokens=2),
        expect(2, 2),
    ),
    ("vit_msn", "ViTMSNForImageClassification", "ViTMSNConfig", HF_VIT, expect(2, 2)),
    ("vit_mae", "ViTMAEModel", "ViTMAEConfig", HF_VIT, expect(2, 2)),  # HF_INPUTS: a fixed masking noise
    (
        "vivit",  # default hidden_act "gelu_fast"
        "VivitForVideoClassification",
        "VivitConfig",
        dict(HF_VIT, num_frames=4, tubelet_size=[2, 8, 8]),
        expect(2, 0, ["FastGELUActivation is not GELU"] * 2),
    ),
    (
        "vivit_gelu",
        "VivitForVideoClassification",
        "VivitConfig",
        dict(HF_VIT, num_frames=4, tubelet_size=[2, 8, 8], hidden_act="gelu"),
        expect(2, 2),
    ),
    (
        "audio_spectrogram_transformer",
        "ASTForAudioClassification",
        "ASTConfig",
        dict(
            HF_SMALL,
            intermediate_size=96,
            max_length=64,
            num_mel_bins=32,
            patch_size=16,
            frequency_stride=10,
            time_stride=10,
        ),
        expect(2, 2, ["ASTMLPHead is not a class patch_hf patches"]),
    ),
    # CLIP and SigLIP: the MLPs only (their attention is not ViT's code)
    (
        "clip",
        "CLIPForImageClassification",
        "CLIPConfig",
        _two_towers(hidden_act="gelu"),
        expect(0, 2, ["CLIPAttention is not a class patch_hf patches"] * 2),
    ),
    (
        "clip_quick_gelu",
        "CLIPForImageClassification",
        "CLIPConfig",
        _two_towers(),  # CLIP's default activation
        expect(refused="QuickGELUActivation is not GELU"),
    ),
    ("siglip", "SiglipForImageClassification", "SiglipConfig", _two_towers(), _SIGLIP_OUTCOME),  # tanh GELU
    ("siglip2", "Siglip2ForImageClassification", "Siglip2Config", _two_towers(num_patches=16), _SIGLIP_OUTCOME),
]
# The inputs and the output of the entries that do not take a (2, 3, 32, 32) image and give logits.
_MAE_NOISE = torch.linspace(0, 1, 16).repeat(2, 1)  # ViT-MAE's masking noise per patch: the same on every call
_SIGLIP2_PATCHES = dict(
    pixel_attention_mask=torch.ones(2, 16, dtype=torch.long), spatial_shapes=torch.tensor([[4, 4]] * 2)
)
HF_INPUTS = {
    "vit_mae": (lambda: torch.randn(2, 3, 32, 32), lambda m, x: m(pixel_values=x, noise=_MAE_NOISE).last_hidden_state),
    "vivit": (lambda: torch.randn(2, 4, 3, 32, 32), None),
    "vivit_gelu": (lambda: torch.randn(2, 4, 3, 32, 32), None),
    "audio_spectrogram_transformer": (lambda: torch.randn(2, 64, 32), lambda m, x: m(input_values=x).logits),
    "siglip2": (lambda: torch.randn(2, 16, 3 * 8 * 8), lambda m, x: m(pixel_values=x, **_SIGLIP2_PATCHES).logits),
}


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------
def perturb(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter plus 0.1 * N(0, 1): zero-initialised biases, layer scales and position tables matter."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g).to(p.dtype))
    return model.eval()


_BUILT = {}


def timm_model(entry):
    """A fresh copy of the zoo entry's perturbed model (built once per session; the build is most of the cost)."""
    key = ("timm", entry[0])
    if key not in _BUILT:
        torch.manual_seed(0)
        _BUILT[key] = perturb(timm.create_model(entry[1], pretrained=False, num_classes=5, **entry[2]))
    return copy.deepcopy(_BUILT[key])


def hf_model(entry):
    key = ("hf", entry[0])
    if key not in _BUILT:
        torch.manual_seed(0)
        config = getattr(transformers, entry[2])(**entry[3])
        _BUILT[key] = perturb(getattr(transformers, entry[1])(config))
    return copy.deepcopy(_BUILT[key])


def _hf_forward_is_vits(model_class: str) -> bool:
    """Whether this transformers' attention and MLP forwards of `model_class`'s layers are ViT's bytecode, which
    is what patch_hf patches on a non-ViT class. Transformers 5.24 (CI) gives DINOv2 ViT's code; 5.17 (the GPU
    image) does not, and there patch_hf must refuse DINOv2 with that reason and leave it as it was."""
    import importlib

    from transformers.models.vit import modeling_vit

    module = importlib.import_module(getattr(transformers, model_class).__module__)
    prefix = model_class.removesuffix("ForImageClassification")
    pairs = [
        (getattr(module, f"{prefix}{part}", None), getattr(modeling_vit, f"ViT{part}")) for part in ("Attention", "MLP")
    ]
    return all(
        ours is not None and ours.forward.__code__.co_code == vit_.forward.__code__.co_code for ours, vit_ in pairs
    )


def hf_outcome(entry):
    """The zoo entry's pinned outcome, or, for DINOv2 on a transformers whose DINOv2 code is not ViT's, a refusal."""
    if entry[0].startswith("dinov2") and not _hf_forward_is_vits(entry[1]):
        return expect(refused="Attention.forward is not ViTAttention.forward's code in this transformers")
    return entry[4]


def check_hf_refusal(model, backend, refused):
    with pytest.raises(ValueError, match="patch_hf found nothing it can patch") as err:
        vit.patch_hf(model, backend=backend)
    assert refused in str(err.value)
    assert instance_forwards(model) == []  # refused: left exactly as it was


def instance_forwards(model):
    """Names of the modules whose forward was replaced on the instance (what patching does)."""
    patched = vit.convert._PATCHED_FORWARDS
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m.__dict__.get("forward"), functools.partial) and m.__dict__["forward"].func in patched
    ]


def check_outcome(summary, outcome, patched_model):
    assert (len(summary.attention), len(summary.mlp)) == (outcome["attention"], outcome["mlp"]), str(summary)
    assert len(summary.skipped) == len(outcome["skipped"]), str(summary)
    for (name, reason), piece in zip(summary.skipped, outcome["skipped"]):
        assert piece in reason, f"{name}: {reason!r} does not say {piece!r}"
    assert len(summary.blocks) == outcome["blocks"], str(summary)
    assert sorted(instance_forwards(patched_model)) == sorted(summary.attention + summary.mlp + summary.blocks)
    assert str(len(summary.skipped)) in str(summary) and all(name in str(summary) for name, _ in summary.skipped)
    assert all(name in str(summary) for name, _ in summary.unfused_blocks)


BLOCK_OPS = vk.dispatch.BLOCK_OPS
# vk's whole-block ops wrapped to count their calls, as counting_fused_ops does for the others
counting_block_ops = functools.partial(counting_fused_ops, names=BLOCK_OPS)


def run_patched(patch, model, x, backend, outcome, monkeypatch, call):
    """Patch `model`; check the outcome, that its output equals the original's, and that the fused ops ran:
    on triton each patched block runs whole-block fused (one call of each block op instead of its attention's
    fused_qkv and its MLP's gelu_mlp), on torch it runs its patched attention and MLP."""
    with torch.no_grad():
        ref = call(model, x)
    patched = copy.deepcopy(model)
    summary = patch(patched, backend=backend)
    with counting_fused_ops(monkeypatch) as counts, counting_block_ops(monkeypatch) as block_counts, torch.no_grad():
        out = call(patched, x)
    fused = len(summary.blocks) if backend == "triton" else 0
    assert block_counts == dict.fromkeys(BLOCK_OPS, fused)
    assert counts == dict(
        attention=len(summary.attention), fused_qkv=len(summary.attention) - fused, gelu_mlp=len(summary.mlp) - fused
    )
    assert rel_error(out, ref) <= TOLERANCES[torch.float32], f"patched output changed by {rel_error(out, ref):.2e}"
    return summary, patched


def timm_call(model, x):
    return model(x)


def hf_call(model, x):
    return model(pixel_values=x).logits


# ----------------------------------------------------------------------------------------------------
# timm
# ----------------------------------------------------------------------------------------------------
@needs_timm
@pytest.mark.parametrize("entry", TIMM_ZOO, ids=[e[0] for e in TIMM_ZOO])
def test_timm_zoo_torch_backend(entry, monkeypatch):
    _, _, _, img, outcome, _ = entry
    model, x = timm_model(entry), torch.randn(2, 3, img, img)
    if outcome["refused"] is not None:
        with pytest.raises(ValueError, match="patch_timm found nothing it can patch") as err:
            vit.patch_timm(model, backend="torch")
        assert outcome["refused"] in str(err.value)
        assert instance_forwards(model) == []  # refused: left exactly as it was
        with pytest.raises(ValueError, match=r"patch_timm\(strict=True\)"):
            vit.patch_timm(model, backend="torch", strict=True)
        return
    summary, patched = run_patched(vit.patch_timm, model, x, "torch", outcome, monkeypatch, timm_call)
    check_outcome(summary, outcome, patched)
    if summary.skipped:  # strict refuses the same model, naming its first skipped module, and leaves it alone
        first = summary.skipped[0][0]
        fresh = timm_model(entry)
        with pytest.raises(ValueError, match=rf"patch_timm\(strict=True\): {first} cannot be patched"):
            vit.patch_timm(fresh, backend="torch", strict=True)
        assert instance_forwards(fresh) == []


TIMM_TRITON = [pytest.param(e, marks=[pytest.mark.slow] if e[5] == "slow" else [], id=e[0]) for e in TIMM_ZOO if e[5]]


@needs_timm
@needs_triton
@pytest.mark.parametrize("entry", TIMM_TRITON)
def test_timm_zoo_triton_backend(entry, monkeypatch, highest_precision):
    """The same models on the Triton kernels: what the kernels cannot run (head dim, channel multiples) is
    skipped with a reason naming the backend, the rest patched as with torch, outputs within fp32 tolerance."""
    _, _, _, img, outcome, _ = entry
    model, x = timm_model(entry).to(DEVICE), torch.randn(1, 3, img, img, device=DEVICE)
    torch_summary = vit.patch_timm(copy.deepcopy(model), backend="torch")
    summary, _ = run_patched(vit.patch_timm, model, x, "triton", outcome, monkeypatch, timm_call)
    assert set(summary.attention) <= set(torch_summary.attention) and set(summary.mlp) <= set(torch_summary.mlp)
    newly_skipped = [(n, r) for n, r in summary.skipped if (n, r) not in torch_summary.skipped]
    assert len(newly_skipped) == len(torch_summary.attention + torch_summary.mlp) - len(summary.attention + summary.mlp)
    assert all("backend='triton'" in r for _, r in newly_skipped), newly_skipped
    assert summary.attention or summary.mlp


@needs_timm
@needs_triton
def test_timm_block_runs_whole_fused_with_the_same_gradients_and_falls_back(monkeypatch, highest_precision):
    """A timm ViT patched on triton: in eval its blocks run whole-block fused, with the original's outputs and
    parameter gradients; in training with drop-path, and with an attention mask, they run the original forward
    (on the patched attention and MLP). LayerScale blocks are not fused whole, and say why."""
    torch.manual_seed(0)
    kwargs = dict(pretrained=False, num_classes=5, img_size=32, **SMALL)
    model = perturb(timm.create_model("vit_tiny_patch16_224", drop_path_rate=0.1, **kwargs)).to(DEVICE)
    patched = copy.deepcopy(model)
    summary = vit.patch_timm(patched, backend="triton")
    assert summary.blocks == ["blocks.0", "blocks.1"] and summary.unfused_blocks == []
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    with counting_block_ops(monkeypatch) as counts:
        out = patched(x)
    assert counts == dict.fromkeys(BLOCK_OPS, 2)
    ref = model(x)
    assert rel_error(out, ref) <= TOLERANCES[torch.float32]
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, list(patched.parameters()), dout)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()), dout)
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads, strict=True):
        assert rel_error(g, r) <= 2 * TOLERANCES[torch.float32], f"{name}: {rel_error(g, r):.2e}"

    # training: blocks.1's DropPath(0.1) is active, so it runs its own forward; blocks.0 has drop-path rate 0
    patched.train()
    with counting_block_ops(monkeypatch) as counts, counting_fused_ops(monkeypatch) as unfused, torch.no_grad():
        patched(x)
    assert counts == dict.fromkeys(BLOCK_OPS, 1) and unfused["fused_qkv"] == 1
    patched.eval()
    tokens, mask = torch.randn(1, 5, 64, device=DEVICE), torch.zeros(1, 1, 5, 5, device=DEVICE)
    mask[..., -1] = float("-inf")
    with counting_block_ops(monkeypatch) as counts, torch.no_grad():
        masked = patched.blocks[0](tokens, attn_mask=mask)
        assert rel_error(masked, model.blocks[0](tokens, attn_mask=mask)) <= TOLERANCES[torch.float32]
    assert counts == dict.fromkeys(BLOCK_OPS, 0)

    scaled = timm.create_model("vit_tiny_patch16_224", init_values=1e-5, **kwargs)
    summary = vit.patch_timm(scaled, backend="triton")
    assert summary.blocks == [] and len(summary.attention) == 2 and len(summary.mlp) == 2
    assert [reason for _, reason in summary.unfused_blocks] == ["Block: ls1 is LayerScale, not Identity: "
                                                                 "the fused ops do not compute it"] * 2  # fmt: skip
    assert "blocks.1 (block not fused whole): Block: ls1 is LayerScale" in str(summary)


# ----------------------------------------------------------------------------------------------------
# Hugging Face transformers
# ----------------------------------------------------------------------------------------------------
@needs_transformers
@pytest.mark.parametrize("entry", HF_ZOO, ids=[e[0] for e in HF_ZOO])
def test_hf_zoo_torch_backend(entry, monkeypatch):
    outcome = hf_outcome(entry)
    make_input, call = HF_INPUTS.get(entry[0], (lambda: torch.randn(2, 3, 32, 32), None))
    model, x = hf_model(entry), make_input()
    if outcome["refused"] is not None:
        check_hf_refusal(model, "torch", outcome["refused"])
        return
    summary, patched = run_patched(vit.patch_hf, model, x, "torch", outcome, monkeypatch, call or hf_call)
    check_outcome(summary, outcome, patched)


@needs_transformers
@needs_triton
@pytest.mark.parametrize(
    "entry", [e for e in HF_ZOO if e[0] in ("vit", "beit", "dinov2_registers", "clip", "siglip")], ids=lambda e: e[0]
)
def test_hf_zoo_triton_backend(entry, monkeypatch, highest_precision):
    outcome = hf_outcome(entry)
    model, x = hf_model(entry).to(DEVICE), torch.randn(1, 3, 32, 32, device=DEVICE)
    if outcome["refused"] is not None:
        check_hf_refusal(model, "triton", outcome["refused"])
        return
    summary, patched = run_patched(vit.patch_hf, model, x, "triton", outcome, monkeypatch, hf_call)
    check_outcome(summary, outcome, patched)


@needs_transformers
@needs_triton
def test_hf_vit_layer_runs_whole_fused_with_the_same_gradients_and_falls_back(monkeypatch, highest_precision):
    """HF's ViTLayer patched on triton: in eval it runs whole-block fused with the original's outputs and parameter
    gradients; with hidden dropout active (training) or an attention mask it runs its own forward."""
    torch.manual_seed(0)
    config = transformers.ViTConfig(**HF_VIT, hidden_dropout_prob=0.1)
    model = perturb(transformers.ViTForImageClassification(config)).to(DEVICE)
    patched = copy.deepcopy(model)
    summary = vit.patch_hf(patched, backend="triton")
    assert summary.blocks == ["vit.layers.0", "vit.layers.1"] and summary.unfused_blocks == []
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    with counting_block_ops(monkeypatch) as counts:
        out = hf_call(patched, x)
    assert counts == dict.fromkeys(BLOCK_OPS, 2)
    ref = hf_call(model, x)
    assert rel_error(out, ref) <= TOLERANCES[torch.float32]
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, list(patched.parameters()), dout)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()), dout)
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads, strict=True):
        if name.endswith("k_proj.bias"):  # zero in exact arithmetic (softmax ignores a per-query shift): rounding
            assert g.norm() <= 1e-4 * grads[0].norm() and r.norm() <= 1e-4 * ref_grads[0].norm(), name
            continue
        assert rel_error(g, r) <= 2 * TOLERANCES[torch.float32], f"{name}: {rel_error(g, r):.2e}"

    patched.train()  # hidden dropout p=0.1 active: the layers' own forward
    with counting_block_ops(monkeypatch) as counts, counting_fused_ops(monkeypatch) as unfused, torch.no_grad():
        hf_call(patched, x)
    assert counts == dict.fromkeys(BLOCK_OPS, 0) and unfused["fused_qkv"] == 2
    patched.eval()
    tokens, mask = torch.randn(1, 5, 64, device=DEVICE), torch.zeros(1, 1, 5, 5, device=DEVICE)
    mask[..., -1] = float("-inf")
    layer, ref_layer = patched.vit.layers[0], model.vit.layers[0]
    with counting_block_ops(monkeypatch) as counts, torch.no_grad():
        assert rel_error(layer(tokens, attention_mask=mask), ref_layer(tokens, attention_mask=mask)) <= 1e-6
    assert counts == dict.fromkeys(BLOCK_OPS, 0)


# ----------------------------------------------------------------------------------------------------
# subclasses of the patched classes: left alone (they may compute something else), and said so
# ----------------------------------------------------------------------------------------------------
# Each subclass overrides forward with a different computation on the same weights. patch_* patches a class
# *itself* only: an isinstance check would put these on the fused ops and change the outputs. On torch a patched
# block falls back to type(self).forward (the subclass's), so only the summary shows a wrongly patched block there;
# on triton the outputs do too.
def _timm_subclasses():
    from timm.layers import Mlp
    from timm.models.vision_transformer import Attention, Block

    class HalvedAttention(Attention):
        def forward(self, x, attn_mask=None, is_causal=False):
            return 0.5 * super().forward(x, attn_mask=attn_mask, is_causal=is_causal)

    class ShiftedMlp(Mlp):
        def forward(self, x):
            return super().forward(x) + 1.0

    class DampedBlock(Block):  # name matches the patcher's "container" pattern: never reported by name alone
        def forward(self, x, attn_mask=None, is_causal=False):
            return x + 0.5 * (super().forward(x, attn_mask=attn_mask, is_causal=is_causal) - x)

    return {"attention": (Attention, HalvedAttention), "mlp": (Mlp, ShiftedMlp), "block": (Block, DampedBlock)}


def _hf_subclasses():
    from transformers.models.vit.modeling_vit import ViTAttention, ViTLayer, ViTMLP

    class HalvedViTAttention(ViTAttention):
        def forward(self, hidden_states, attention_mask=None, **kwargs):
            out, weights = super().forward(hidden_states, attention_mask, **kwargs)
            return 0.5 * out, weights

    class ShiftedViTMLP(ViTMLP):
        def forward(self, hidden_states):
            return super().forward(hidden_states) + 1.0

    class DampedViTLayer(ViTLayer):
        def forward(self, hidden_states, attention_mask=None, **kwargs):
            out = super().forward(hidden_states, attention_mask, **kwargs)
            return hidden_states + 0.5 * (out - hidden_states)

    return {"attention": (ViTAttention, HalvedViTAttention), "mlp": (ViTMLP, ShiftedViTMLP),
            "block": (ViTLayer, DampedViTLayer)}  # fmt: skip


def _swap_class(model, base, sub) -> list[str]:
    """Every module of exactly class `base` becomes a `sub` (same weights); returns their names."""
    names = []
    for name, m in model.named_modules():
        if type(m) is base:
            m.__class__ = sub
            names.append(name)
    assert names, f"no {base.__name__} in the model"
    return names


def check_subclass_left_alone(patch, model, x, call, kind, base, sub, backend, monkeypatch):
    names = _swap_class(model, base, sub)
    model = model.to(DEVICE)
    with torch.no_grad():
        ref = call(model, x)
    patched = copy.deepcopy(model)
    summary = patch(patched, backend=backend)
    assert not any(n in instance_forwards(patched) for n in names), "a subclass's forward was replaced"
    listed = summary.unfused_blocks if kind == "block" else summary.skipped
    reasons = dict(listed)
    for n in names:  # each listed, with a reason naming the subclass and the class patch_* patches
        assert n in reasons, f"{n} ({sub.__name__}) is not listed in the summary:\n{summary}"
        assert sub.__name__ in reasons[n] and f"subclass of {base.__module__}.{base.__qualname__}" in reasons[n]
        assert n in str(summary)
    patched_names = summary.attention + summary.mlp + summary.blocks
    assert not set(names) & set(patched_names), str(summary)
    # The rest is still patched: both blocks' attention and MLP, except the subclassed kind.
    depth = 2  # SMALL, HF_SMALL
    expected = (0 if kind == "attention" else depth, 0 if kind == "mlp" else depth)
    assert (len(summary.attention), len(summary.mlp)) == expected, str(summary)
    if kind != "block":  # a block fuses only around an attention and MLP of the patched classes themselves
        assert summary.blocks == [], str(summary)
    with counting_block_ops(monkeypatch) as block_counts, torch.no_grad():
        out = call(patched, x)
    if kind == "block":
        assert block_counts == dict.fromkeys(BLOCK_OPS, 0)  # the subclass's forward ran, not the fused block
    assert rel_error(out, ref) <= TOLERANCES[torch.float32], f"patched output changed by {rel_error(out, ref):.2e}"
    if kind != "block":  # strict refuses a model with a subclassed attention / MLP, naming the first
        with pytest.raises(ValueError, match=rf"strict=True\): {names[0]} cannot be patched: .*{sub.__name__}"):
            patch(copy.deepcopy(model), backend=backend, strict=True)
    return summary


BACKENDS_HERE = ["torch", pytest.param("triton", marks=needs_triton)]


@needs_timm
@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("kind", ["attention", "mlp", "block"])
def test_timm_subclass_with_its_own_forward_is_left_alone(kind, backend, monkeypatch, highest_precision):
    base, sub = _timm_subclasses()[kind]
    model = timm_model(TIMM_ZOO[0])  # vit_tiny, small dims
    x = torch.randn(1, 3, 32, 32, device=DEVICE)
    check_subclass_left_alone(vit.patch_timm, model, x, timm_call, kind, base, sub, backend, monkeypatch)


@needs_transformers
@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("kind", ["attention", "mlp", "block"])
def test_hf_subclass_with_its_own_forward_is_left_alone(kind, backend, monkeypatch, highest_precision):
    base, sub = _hf_subclasses()[kind]
    model = hf_model(HF_ZOO[0])  # ViTForImageClassification, small dims
    x = torch.randn(1, 3, 32, 32, device=DEVICE)
    check_subclass_left_alone(vit.patch_hf, model, x, hf_call, kind, base, sub, backend, monkeypatch)


# ----------------------------------------------------------------------------------------------------
# what a user changes after patching: hooks, adapters, dropout rates, the dtype; and pickling
# ----------------------------------------------------------------------------------------------------
def _scale_output(module, inputs, output):
    return output * 0.5


def _scale_input(module, inputs):
    return (inputs[0] * 2.0,)


def _timm_change(model, change: str):
    block = model.blocks[0]
    if change == "hook on attn.qkv":
        block.attn.qkv.register_forward_hook(_scale_output)
    elif change == "hook on mlp.fc1":
        block.mlp.fc1.register_forward_hook(_scale_output)
    elif change == "hook on attn":  # bypassed where the block runs whole-block fused
        block.attn.register_forward_hook(_scale_output)
    elif change == "pre-hook on norm1":
        block.norm1.register_forward_pre_hook(_scale_input)
    elif change == "adapter in attn.qkv":
        block.attn.qkv = LowRankAdapter(block.attn.qkv)
    elif change == "adapter in mlp.fc1":
        block.mlp.fc1 = LowRankAdapter(block.mlp.fc1)
    elif change == "dropout rates":
        for b in model.blocks:
            b.attn.attn_drop.p, b.mlp.drop1.p = 0.5, 0.5
        model.train()
    elif change == "float64":
        model.double()
    return model


def _hf_change(model, change: str):
    layer = model.vit.layers[0]
    if change == "hook on attention.q_proj":
        layer.attention.q_proj.register_forward_hook(_scale_output)
    elif change == "hook on mlp.fc1":
        layer.mlp.fc1.register_forward_hook(_scale_output)
    elif change == "hook on attention":
        layer.attention.register_forward_hook(lambda m, i, o: (o[0] * 0.5, *o[1:]))
    elif change == "pre-hook on layernorm_before":
        layer.layernorm_before.register_forward_pre_hook(_scale_input)
    elif change == "adapter in attention.v_proj":
        layer.attention.v_proj = LowRankAdapter(layer.attention.v_proj)
    elif change == "adapter in mlp.fc2":
        layer.mlp.fc2 = LowRankAdapter(layer.mlp.fc2)
    elif change == "dropout rates":
        for lay in model.vit.layers:
            lay.attention.attention_dropout = 0.5
        model.train()
    elif change == "float64":
        model.double()
    return model


def check_change_after_patching(patch, model, x, call, change, apply_change, backend):
    """The patched model, changed after patching, gives what the original model changed the same way gives: the
    patched forwards see the change at call time and run the original forward where the fused one would skip it
    (on torch and triton alike; same seed, so dropout draws the same masks)."""
    patched = copy.deepcopy(model)
    patch(patched, backend=backend)
    model, patched = apply_change(model, change), apply_change(patched, change)
    if change == "float64":
        x = x.double()
    torch.manual_seed(3)
    with torch.no_grad():
        ref = call(model, x)
    torch.manual_seed(3)
    with torch.no_grad():
        out = call(patched, x)
    assert out.dtype == ref.dtype
    tol = 1e-6 if backend == "torch" or change in ("dropout rates", "float64") else TOLERANCES[torch.float32]
    assert rel_error(out, ref) <= tol, f"{change}: {rel_error(out, ref):.2e}"


TIMM_CHANGES = ["hook on attn.qkv", "hook on mlp.fc1", "hook on attn", "pre-hook on norm1", "adapter in attn.qkv",
                "adapter in mlp.fc1", "dropout rates", "float64"]  # fmt: skip
HF_CHANGES = ["hook on attention.q_proj", "hook on mlp.fc1", "hook on attention", "pre-hook on layernorm_before",
              "adapter in attention.v_proj", "adapter in mlp.fc2", "dropout rates", "float64"]  # fmt: skip


@needs_timm
@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("change", TIMM_CHANGES)
def test_timm_change_after_patching_is_seen(change, backend, highest_precision):
    model, x = timm_model(TIMM_ZOO[0]).to(DEVICE), torch.randn(2, 3, 32, 32, device=DEVICE)
    check_change_after_patching(vit.patch_timm, model, x, timm_call, change, _timm_change, backend)


@needs_transformers
@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("change", HF_CHANGES)
def test_hf_change_after_patching_is_seen(change, backend, highest_precision):
    model, x = hf_model(HF_ZOO[0]).to(DEVICE), torch.randn(2, 3, 32, 32, device=DEVICE)
    check_change_after_patching(vit.patch_hf, model, x, hf_call, change, _hf_change, backend)


@pytest.mark.parametrize(
    "framework", [pytest.param("timm", marks=needs_timm), pytest.param("hf", marks=needs_transformers)]
)
def test_patched_model_pickles_and_loads_back_patched(framework, monkeypatch):
    """torch.save(model) of a patched model wrote a file that torch.load refused (a bound method pickles by a name
    the module does not have): it loads back, still patched, with the same outputs."""
    import io
    import pickle

    model, call, patch = (
        (timm_model(TIMM_ZOO[0]), timm_call, vit.patch_timm) if framework == "timm"
        else (hf_model(HF_ZOO[0]), hf_call, vit.patch_hf)
    )  # fmt: skip
    summary = patch(model, backend="torch")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = call(model, x)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for loaded in (torch.load(buffer, weights_only=False), pickle.loads(pickle.dumps(model))):
        with counting_fused_ops(monkeypatch) as counts, torch.no_grad():
            out = call(loaded, x)
        assert counts["fused_qkv"] == len(summary.attention) and counts["gelu_mlp"] == len(summary.mlp)
        assert torch.equal(out, ref)
