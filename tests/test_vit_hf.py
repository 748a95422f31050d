"""Hugging Face ViT -> ours (vit/convert.py): from_hf for both key-naming schemes, and patch_hf.

A random-weight tiny ViTForImageClassification is the source; every comparison is of logits (and, for
patch_hf, every parameter gradient) in fp32 on CPU.
"""

import copy
import re

import pytest
import torch
from conftest import counting_fused_ops

transformers = pytest.importorskip("transformers", reason="needs transformers (pip install transformers)")

import vit  # noqa: E402

HF_TINY = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=96,  # not 4 * hidden: from_hf must take intermediate_size, not mlp_ratio
    image_size=32,
    patch_size=8,
    num_channels=3,
    num_labels=10,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)

# classic (transformers < 5) <-> newer (transformers >= 5) layer names, as in transformers' conversion_mapping.
CLASSIC_TO_NEW = [
    (r"encoder\.layer\.(\d+)\.", r"layers.\1."),
    (r"attention\.attention\.query", "attention.q_proj"),
    (r"attention\.attention\.key", "attention.k_proj"),
    (r"attention\.attention\.value", "attention.v_proj"),
    (r"attention\.output\.dense", "attention.o_proj"),
    (r"intermediate\.dense", "mlp.fc1"),
    (r"(?<!attention\.)output\.dense", "mlp.fc2"),
]
NEW_TO_CLASSIC = [
    (r"layers\.(\d+)\.", r"encoder.layer.\1."),
    (r"attention\.q_proj", "attention.attention.query"),
    (r"attention\.k_proj", "attention.attention.key"),
    (r"attention\.v_proj", "attention.attention.value"),
    (r"attention\.o_proj", "attention.output.dense"),
    (r"mlp\.fc1", "intermediate.dense"),
    (r"mlp\.fc2", "output.dense"),
]


def rename(sd, table):
    out = {}
    for key, value in sd.items():
        for pattern, repl in table:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def both_namings(sd):
    """(classic, newer) versions of a state dict in whichever naming the installed transformers writes."""
    if any(".encoder.layer." in k or k.startswith("encoder.layer.") for k in sd):
        return sd, rename(sd, CLASSIC_TO_NEW)
    return rename(sd, NEW_TO_CLASSIC), sd


@pytest.fixture
def hf_model():
    torch.manual_seed(0)
    config = transformers.ViTConfig(**HF_TINY)
    model = transformers.ViTForImageClassification(config).eval()
    with torch.no_grad():  # HF zero-inits biases and unit-inits norms: randomise them so the mapping matters
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layernorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def hf_logits(model, x):
    return model(pixel_values=x).logits


@pytest.mark.parametrize("naming", ["classic", "newer"])
def test_from_hf_logits(hf_model, naming):
    x = torch.randn(2, 3, 32, 32)
    classic, newer = both_namings(hf_model.state_dict())
    assert any("encoder.layer.0.attention.attention.query" in k for k in classic)
    assert any("layers.0.attention.q_proj" in k for k in newer)
    ours = vit.from_hf(classic if naming == "classic" else newer, hf_model.config, backend="torch").eval()
    assert ours.config.norm_eps == 1e-12 and ours.config.hidden_dim == 96
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf_logits(hf_model, x), atol=1e-5, rtol=1e-5)


def test_from_hf_with_dict_config_and_reference_backend(hf_model):
    x = torch.randn(2, 3, 32, 32)
    config = {k: v for k, v in HF_TINY.items() if "dropout" not in k} | {"layer_norm_eps": 1e-12, "qkv_bias": True}
    ours = vit.from_hf(hf_model.state_dict(), config, backend="reference").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf_logits(hf_model, x), atol=1e-5, rtol=1e-5)


def test_from_hf_takes_the_label_count_from_the_classifier(hf_model):
    """A dict config without num_labels (documented optional) loads a classifier checkpoint with its classifier;
    a num_labels or num_channels that disagrees with the weights is a ValueError naming it, not torch's
    RuntimeError from load_state_dict. gelu_python (the erf formula written out) is exact GELU."""
    x = torch.randn(2, 3, 32, 32)
    config = {k: v for k, v in HF_TINY.items() if "dropout" not in k and k != "num_labels"}
    ours = vit.from_hf(hf_model.state_dict(), config | {"hidden_act": "gelu_python"}, backend="torch").eval()
    assert ours.config.num_classes == hf_model.config.num_labels
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf_logits(hf_model, x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"num_labels=7, but the state dict's classifier has \d+ rows"):
        vit.from_hf(hf_model.state_dict(), config | {"num_labels": 7})
    with pytest.raises(ValueError, match=r"shapes .*patch_embed\.proj\.weight"):
        vit.from_hf(hf_model.state_dict(), config | {"num_channels": 1})


def test_from_hf_vitmodel_gives_features(hf_model):
    """A ViTModel state dict (no classifier, a pooler) gives a headless model: the final-normed CLS token."""
    torch.manual_seed(0)
    base = transformers.ViTModel(hf_model.config, add_pooling_layer=True).eval()
    assert any(k.startswith("pooler.") for k in base.state_dict())
    ours = vit.from_hf(base.state_dict(), base.config, backend="torch").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), base(pixel_values=x).last_hidden_state[:, 0], atol=1e-5, rtol=1e-5)


def test_from_hf_other_image_size(hf_model):
    ours = vit.from_hf(hf_model.state_dict(), hf_model.config, img_size=48, backend="torch")
    assert ours.pos_embed.shape == (1, 1 + 36, 64)
    torch.testing.assert_close(ours.pos_embed[:, 0], hf_model.vit.embeddings.position_embeddings[:, 0])
    assert ours(torch.randn(1, 3, 48, 48)).shape == (1, 10)


def test_from_hf_rejects_missing_and_unexpected_keys(hf_model):
    sd = hf_model.state_dict()
    missing_key = next(k for k in sd if "layernorm_after.bias" in k)
    broken = {k: v for k, v in sd.items() if k != missing_key}
    with pytest.raises(ValueError, match=r"missing keys \['blocks\.0\.norm2\.bias'\]"):
        vit.from_hf(broken, hf_model.config)
    with pytest.raises(ValueError, match=r"unexpected keys .*vit\.layers\.0\.attention\.rotary\.weight"):
        vit.from_hf({**sd, "vit.layers.0.attention.rotary.weight": torch.zeros(1)}, hf_model.config)
    no_value = {k: v for k, v in sd.items() if "v_proj.weight" not in k or ".0." not in k}
    with pytest.raises(ValueError, match="missing keys: layer 0 has no v weight"):
        vit.from_hf(no_value, hf_model.config)
    with pytest.raises(ValueError, match=r"missing keys \[.blocks\.2\."):  # a config deeper than the checkpoint
        vit.from_hf(sd, {**HF_TINY, "num_hidden_layers": 3})


def test_patch_hf_logits_and_grads(hf_model):
    patched = copy.deepcopy(hf_model)
    summary = vit.patch_hf(patched, backend="torch")
    assert summary.attention == ["vit.layers.0.attention", "vit.layers.1.attention"]  # transformers >= 5 layout
    assert len(summary.mlp) == 2 and summary.skipped == []
    x = torch.randn(2, 3, 32, 32)
    g = torch.randn(2, 10)
    results = []
    for model in (hf_model, patched):
        model.zero_grad()
        logits = hf_logits(model, x)
        logits.backward(g)
        results.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (ref_logits, ref_grads), (logits, grads) = results
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    # The weights stayed where they were: same state dict.
    assert patched.state_dict().keys() == hf_model.state_dict().keys()


def test_patch_hf_runs_the_fused_ops(hf_model, monkeypatch):
    """With backend="torch" a patched model computes the same maths as HF's, so equal logits cannot show that
    the patch is in use: count the fused ops' calls, forward and backward (issue 16, item 2)."""
    x = torch.randn(2, 3, 32, 32)
    with counting_fused_ops(monkeypatch) as counts:
        hf_logits(hf_model, x)
    assert counts == dict(fused_qkv=0, attention=0, gelu_mlp=0)  # the counter sees only the fused ops
    vit.patch_hf(hf_model, backend="torch")
    with counting_fused_ops(monkeypatch) as counts:
        hf_logits(hf_model, x).sum().backward()
    assert counts == dict(fused_qkv=2, attention=2, gelu_mlp=2)  # 2 layers: one of each per layer
    assert all(p.grad is not None for p in hf_model.parameters())


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_patch_hf_falls_back_where_it_would_change_outputs(attn_implementation, monkeypatch):
    """output_attentions (weights the fused attention never forms) and an attention mask run HF's own forward:
    the same outputs as the unpatched model, attentions included, and no fused attention call."""
    torch.manual_seed(0)
    config = transformers.ViTConfig(**HF_TINY, attn_implementation=attn_implementation)
    model = transformers.ViTForImageClassification(config).eval()
    patched = copy.deepcopy(model)
    vit.patch_hf(patched, backend="torch")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), counting_fused_ops(monkeypatch) as counts:
        ref, out = model(pixel_values=x, output_attentions=True), patched(pixel_values=x, output_attentions=True)
        torch.testing.assert_close(out.logits, ref.logits, atol=0, rtol=0)
        assert len(out.attentions) == len(ref.attentions)
        for a, b in zip(out.attentions, ref.attentions):
            assert (a is None and b is None) or torch.equal(a, b)
        attention = patched.vit.layers[0].attention
        h, mask = torch.randn(1, 17, 64), torch.randn(1, 1, 17, 17)
        torch.testing.assert_close(attention(h, mask)[0], type(attention).forward(attention, h, mask)[0])
        assert counts["attention"] == 0
        patched(pixel_values=x)
        assert counts["attention"] == 2


def test_patch_hf_skips_and_refuses(hf_model):
    """Attention dropout: the attention is left alone and listed; strict=True names it; nothing patchable and
    unknown backends are ValueErrors."""
    config = transformers.ViTConfig(**{**HF_TINY, "attention_probs_dropout_prob": 0.1})
    model = transformers.ViTForImageClassification(config).eval()
    summary = vit.patch_hf(model, backend="torch")
    assert summary.attention == [] and len(summary.mlp) == 2 and len(summary.skipped) == 2
    assert "attention dropout (attention_probs_dropout_prob) p=0.1" in summary.skipped[0][1]
    with pytest.raises(ValueError, match=r"patch_hf\(strict=True\): \S+\.0\.attention cannot be patched"):
        vit.patch_hf(transformers.ViTForImageClassification(config), strict=True)
    with pytest.raises(ValueError, match="patch_hf found nothing it can patch in Sequential"):
        vit.patch_hf(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="backend must be one of"):
        vit.patch_hf(hf_model, backend="fast")


def test_patch_hf_family_class_must_have_vits_forward(monkeypatch):
    """DeiT's attention is patched because its forward is ViT's code; a transformers in which it is not (here
    DeiTAttention.forward replaced by one that adds a bias) keeps it on its own forward, with the reason."""
    from transformers.models.deit import modeling_deit

    config = transformers.DeiTConfig(**{k: v for k, v in HF_TINY.items() if k != "num_labels"})
    original = modeling_deit.DeiTAttention.forward

    def forward_with_a_bias(self, hidden_states, attention_mask=None, **kwargs):
        out, weights = original(self, hidden_states, attention_mask, **kwargs)
        return out + 1.0, weights

    monkeypatch.setattr(modeling_deit.DeiTAttention, "forward", forward_with_a_bias)
    model = transformers.DeiTModel(config).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = model(pixel_values=x).last_hidden_state
    summary = vit.patch_hf(model, backend="torch")
    assert summary.attention == [] and len(summary.mlp) == 2
    assert "DeiTAttention.forward is not ViTAttention.forward's code" in summary.skipped[0][1]
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x).last_hidden_state, ref, atol=1e-5, rtol=1e-5)
