"""Bringing other ViTs onto the fused ops: Hugging Face checkpoints, and timm / HF models patched in place.

- `from_hf(state_dict, config)`: a Hugging Face `ViTForImageClassification` / `ViTModel` state dict ->
  our `VisionTransformer` (timm layout). q/k/v are concatenated into one `qkv` weight.
- `patch_timm(model)`, `patch_hf(model)`: replace the `forward` of each attention and MLP module of an
  existing model by one that calls the fused ops on the module's own parameters. No weight is copied or
  moved, the state dict is unchanged, and autograd reaches the same parameters.

Hugging Face key names -> ours (`{i}` is the layer index; the prefix `vit.` of
`ViTForImageClassification` is optional, `ViTModel` has none):

    classic (transformers < 5)                    newer (transformers >= 5)        ours
    embeddings.cls_token                          (same)                           cls_token
    embeddings.position_embeddings                (same)                           pos_embed
    embeddings.patch_embeddings.projection.*      (same)                           patch_embed.proj.*
    encoder.layer.{i}.layernorm_before.*          layers.{i}.layernorm_before.*    blocks.{i}.norm1.*
    encoder.layer.{i}.attention.attention.query.* layers.{i}.attention.q_proj.*    blocks.{i}.attn.qkv.* rows [0, C)
    encoder.layer.{i}.attention.attention.key.*   layers.{i}.attention.k_proj.*    blocks.{i}.attn.qkv.* rows [C, 2C)
    encoder.layer.{i}.attention.attention.value.* layers.{i}.attention.v_proj.*    blocks.{i}.attn.qkv.* rows [2C, 3C)
    encoder.layer.{i}.attention.output.dense.*    layers.{i}.attention.o_proj.*    blocks.{i}.attn.proj.*
    encoder.layer.{i}.layernorm_after.*           layers.{i}.layernorm_after.*     blocks.{i}.norm2.*
    encoder.layer.{i}.intermediate.dense.*        layers.{i}.mlp.fc1.*             blocks.{i}.mlp.fc1.*
    encoder.layer.{i}.output.dense.*              layers.{i}.mlp.fc2.*             blocks.{i}.mlp.fc2.*
    layernorm.*                                   (same)                           norm.*
    classifier.*                                  (same)                           head.*

Known keys with no counterpart, dropped: `pooler.*` (ViTModel's tanh pooler; not part of the
classification path) and `embeddings.mask_token` (masked image modelling only). Any other key, or a
counterpart that is missing, is a ValueError that lists them.
"""

from __future__ import annotations

import re
import types

import torch
import torch.nn as nn

import vit_kernels as vk
from vit.model import VisionTransformer, _pair, resize_pos_embed

# (regex on the key without "vit." and without the ".weight"/".bias" suffix) -> our name; "{i}" from group 1.
_HF_GLOBAL = {
    r"embeddings\.cls_token": "cls_token",
    r"embeddings\.position_embeddings": "pos_embed",
    r"embeddings\.patch_embeddings\.projection": "patch_embed.proj",
    r"layernorm": "norm",
    r"classifier": "head",
}
_HF_LAYER_PREFIX = r"(?:encoder\.layer|layers)\.(\d+)\."
# Within a layer; "qkv:q" etc. mark the three slices of our fused qkv.
_HF_LAYER = {
    r"layernorm_before": "norm1",
    r"attention\.attention\.query|attention\.q_proj": "qkv:q",
    r"attention\.attention\.key|attention\.k_proj": "qkv:k",
    r"attention\.attention\.value|attention\.v_proj": "qkv:v",
    r"attention\.output\.dense|attention\.o_proj": "attn.proj",
    r"layernorm_after": "norm2",
    r"intermediate\.dense|mlp\.fc1": "mlp.fc1",
    r"output\.dense|mlp\.fc2": "mlp.fc2",
}
_HF_DROPPED = (r"pooler\..*", r"embeddings\.mask_token")


def _config_value(config, name: str, default=None):
    value = config.get(name, default) if isinstance(config, dict) else getattr(config, name, default)
    if value is None and default is None:
        raise ValueError(f"config is missing {name!r}")
    return value


def hf_config_to_kwargs(config) -> dict:
    """VisionTransformer keyword arguments from a transformers ViTConfig or a dict of its fields."""
    hidden_act = _config_value(config, "hidden_act", "gelu")
    approximate = {"gelu": "none", "gelu_pytorch_tanh": "tanh", "gelu_new": "tanh"}.get(hidden_act)
    if approximate is None:
        raise ValueError(f"hidden_act={hidden_act!r} is not supported (gelu, gelu_pytorch_tanh, gelu_new)")
    return dict(
        img_size=_config_value(config, "image_size"),
        patch_size=_config_value(config, "patch_size"),
        in_chans=_config_value(config, "num_channels", 3),
        num_classes=_config_value(config, "num_labels", 0),
        embed_dim=_config_value(config, "hidden_size"),
        depth=_config_value(config, "num_hidden_layers"),
        num_heads=_config_value(config, "num_attention_heads"),
        mlp_hidden_dim=_config_value(config, "intermediate_size"),
        qkv_bias=_config_value(config, "qkv_bias", True),
        norm_eps=_config_value(config, "layer_norm_eps", 1e-12),
        gelu_approximate=approximate,
    )


def convert_hf_state_dict(hf_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename (and fuse q/k/v of) a Hugging Face ViT state dict into ours; unknown keys raise ValueError."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}  # (layer, weight|bias) -> {q, k, v}
    unexpected = []
    for key, tensor in hf_state_dict.items():
        name = key[len("vit.") :] if key.startswith("vit.") else key
        base, dot, suffix = name.rpartition(".")
        if suffix not in ("weight", "bias"):
            base, dot, suffix = name, "", ""
        if any(re.fullmatch(p, name) for p in _HF_DROPPED):
            continue
        target = None
        for pattern, ours in _HF_GLOBAL.items():
            if re.fullmatch(pattern, base):
                target = ours
        m = re.match(_HF_LAYER_PREFIX, base)
        if m:
            i, rest = int(m.group(1)), base[m.end() :]
            for pattern, ours in _HF_LAYER.items():
                if re.fullmatch(pattern, rest):
                    target = ours if ours.startswith("qkv:") else f"blocks.{i}.{ours}"
            if target is not None and target.startswith("qkv:"):
                qkv.setdefault((i, suffix), {})[target[4:]] = tensor
                continue
        if target is None:
            unexpected.append(key)
            continue
        out[target + dot + suffix] = tensor
    if unexpected:
        raise ValueError(f"unexpected keys in the Hugging Face state dict: {unexpected}")
    for (i, suffix), parts in sorted(qkv.items()):
        missing = [p for p in "qkv" if p not in parts]
        if missing:
            raise ValueError(f"missing keys: layer {i} has no {', '.join(missing)} {suffix} of its attention")
        out[f"blocks.{i}.attn.qkv.{suffix}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def from_hf(
    hf_state_dict: dict[str, torch.Tensor],
    config,
    *,
    img_size: int | tuple[int, int] | None = None,
    backend: str = "auto",
) -> VisionTransformer:
    """A VisionTransformer holding the weights of a Hugging Face ViT state dict.

    config: a transformers ViTConfig or a dict with hidden_size, num_hidden_layers, num_attention_heads,
    intermediate_size, image_size, patch_size, and optionally num_channels (3), num_labels, layer_norm_eps
    (1e-12), qkv_bias (True), hidden_act ("gelu"). A state dict without `classifier.*` (a ViTModel) gives a
    model with num_classes=0, which returns the final-normed CLS features. `img_size` other than the
    config's resamples the position embedding. Missing or unexpected keys raise ValueError listing them.
    """
    kwargs = hf_config_to_kwargs(config)
    converted = convert_hf_state_dict(hf_state_dict)
    if "head.weight" not in converted:
        kwargs["num_classes"] = 0
    if img_size is not None:
        h, w = _pair(kwargs["img_size"])
        trained_grid = (h // kwargs["patch_size"], w // kwargs["patch_size"])
        kwargs["img_size"] = img_size
    model = VisionTransformer(backend=backend, **kwargs)
    if img_size is not None and "pos_embed" in converted:
        converted["pos_embed"] = resize_pos_embed(converted["pos_embed"], model.config.grid_size, trained_grid)
    missing, unexpected = _diff_keys(model, converted)
    if missing or unexpected:
        raise ValueError(
            "the Hugging Face state dict does not match the config (keys in our naming, see the table in "
            f"vit/convert.py): missing keys {missing}, unexpected keys {unexpected}"
        )
    model.load_state_dict(converted, strict=True)
    return model


def _diff_keys(model: nn.Module, sd: dict) -> tuple[list[str], list[str]]:
    ours = set(model.state_dict())
    return sorted(ours - set(sd)), sorted(set(sd) - ours)


# ----------------------------------------------------------------------------------------------------
# patching existing models in place
# ----------------------------------------------------------------------------------------------------


def _gelu_approximate(act: nn.Module, where: str) -> str:
    if isinstance(act, nn.GELU):
        return act.approximate
    # transformers' activations: GELUActivation (exact erf), PytorchGELUTanh / NewGELUActivation (tanh form).
    name = type(act).__name__
    if name == "GELUActivation" and not getattr(act, "use_gelu_python", False):
        return "none"
    if name in ("GELUTanh", "PytorchGELUTanh", "NewGELUActivation", "GELUPytorchTanh"):
        return "tanh"
    raise ValueError(f"{where}: activation {name} is not GELU; vk.gelu_mlp fuses GELU only")


def _require_identity(module: nn.Module, attr: str, where: str) -> None:
    m = getattr(module, attr, None)
    if m is not None and not isinstance(m, nn.Identity):
        raise ValueError(f"{where}.{attr} is {type(m).__name__}, which the fused ops do not implement")


def _require_no_dropout(p: float, where: str) -> None:
    if p:
        raise ValueError(f"{where} has dropout p={p}; the fused ops have no dropout inside attention or the MLP")


def _timm_attention_forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    if attn_mask is not None:
        raise ValueError("the fused attention takes no attn_mask")
    B, N, C = x.shape
    q, k, v = vk.fused_qkv(x, self.qkv.weight, self.qkv.bias, self.num_heads, backend=self._vk_backend)
    out = vk.attention(q, k, v, scale=self.scale, backend=self._vk_backend)  # (B, H, N, D)
    x = out.transpose(1, 2).reshape(B, N, -1)
    if hasattr(self, "norm"):
        x = self.norm(x)
    return self.proj_drop(self.proj(x))


def _timm_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    fc1, fc2 = self.fc1, self.fc2
    y = vk.gelu_mlp(
        x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, approximate=self._vk_approximate, backend=self._vk_backend
    )
    return self.drop2(y)


def patch_timm(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Make a timm VisionTransformer run on the fused ops, in place; returns the model.

    Every `Attention` (qkv -> SDPA -> proj) and `Mlp` (fc1 -> GELU -> fc2) gets a forward that calls
    vk.fused_qkv/vk.attention and vk.gelu_mlp on its own weights. Raises ValueError for modules the
    fused ops cannot reproduce (q/k norm, non-GELU activation, dropout inside attention or the MLP),
    and if nothing was patched.
    """
    n_attn = n_mlp = 0
    for name, m in model.named_modules():
        cls = type(m).__name__
        if cls == "Attention" and isinstance(getattr(m, "qkv", None), nn.Linear):
            _require_identity(m, "q_norm", name)
            _require_identity(m, "k_norm", name)
            _require_identity(m, "norm", name)
            _require_no_dropout(m.attn_drop.p, f"{name}.attn_drop")
            if m.qkv.out_features != 3 * m.qkv.in_features:
                raise ValueError(f"{name}.qkv has {m.qkv.out_features} outputs; fused_qkv needs 3 * dim")
            m._vk_backend = backend
            m.forward = types.MethodType(_timm_attention_forward, m)
            n_attn += 1
        elif cls == "Mlp" and isinstance(getattr(m, "fc1", None), nn.Linear):
            _require_identity(m, "norm", name)
            _require_no_dropout(m.drop1.p, f"{name}.drop1")
            m._vk_approximate = _gelu_approximate(m.act, name)
            m._vk_backend = backend
            m.forward = types.MethodType(_timm_mlp_forward, m)
            n_mlp += 1
    if n_attn == 0 and n_mlp == 0:
        raise ValueError(f"patch_timm found no timm Attention or Mlp module in {type(model).__name__}")
    return model


def _hf_attention_forward(self, hidden_states: torch.Tensor, attention_mask=None, **kwargs):
    if attention_mask is not None:
        raise ValueError("the fused attention takes no attention_mask")
    B, N, C = hidden_states.shape
    # One (3C, C) weight for the fused projection; the cat is tiny next to the GEMM and keeps HF's parameters.
    weight = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
    bias = None if self.q_proj.bias is None else torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
    q, k, v = vk.fused_qkv(hidden_states, weight, bias, self.num_attention_heads, backend=self._vk_backend)
    out = vk.attention(q, k, v, scale=self.scaling, backend=self._vk_backend)  # (B, H, N, D)
    return self.o_proj(out.transpose(1, 2).reshape(B, N, -1)), None  # no attention weights: never formed


def _hf_mlp_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    fc1, fc2 = self.fc1, self.fc2
    return vk.gelu_mlp(
        hidden_states,
        fc1.weight,
        fc1.bias,
        fc2.weight,
        fc2.bias,
        approximate=self._vk_approximate,
        backend=self._vk_backend,
    )


def patch_hf(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Make a Hugging Face ViT (ViTModel / ViTForImageClassification) run on the fused ops, in place.

    Patches `ViTAttention` (q_proj/k_proj/v_proj/o_proj) and `ViTMLP` (fc1/fc2), the module layout of
    transformers >= 5. The attention returns no attention weights (output_attentions gives None).
    Older transformers (ViTSelfAttention with query/key/value, ViTIntermediate/ViTOutput) raise
    ValueError: convert those with `from_hf` instead.
    """
    n = 0
    for name, m in model.named_modules():
        cls = type(m).__name__
        if cls == "ViTSelfAttention":
            raise ValueError(
                f"{name} is the transformers < 5 layout (ViTSelfAttention); patch_hf supports transformers >= 5 "
                "(ViTAttention.q_proj ...); use vit.from_hf(model.state_dict(), model.config) instead"
            )
        if cls == "ViTAttention" and isinstance(getattr(m, "q_proj", None), nn.Linear):
            _require_no_dropout(m.attention_dropout, f"{name} (attention_probs_dropout_prob)")
            m._vk_backend = backend
            m.forward = types.MethodType(_hf_attention_forward, m)
            n += 1
        elif cls == "ViTMLP" and isinstance(getattr(m, "fc1", None), nn.Linear):
            m._vk_approximate = _gelu_approximate(m.activation_fn, name)
            m._vk_backend = backend
            m.forward = types.MethodType(_hf_mlp_forward, m)
            n += 1
    if n == 0:
        raise ValueError(f"patch_hf found no ViTAttention or ViTMLP module in {type(model).__name__}")
    return model
