"""Bringing other ViTs onto the fused ops: Hugging Face checkpoints, and timm / HF models patched in place.

- `from_hf(state_dict, config)`: a Hugging Face `ViTForImageClassification` / `ViTModel` state dict ->
  our `VisionTransformer` (timm layout). q/k/v are concatenated into one `qkv` weight.
- `patch_timm(model)`, `patch_hf(model)`: replace the `forward` of each attention and MLP module of an
  existing model that is provably the computation of the fused ops (exact class + structure checks) by one
  that calls them on the module's own parameters; every other one is left alone and listed, with the
  reason, in the returned PatchSummary. No weight is copied or moved, the state dict is unchanged, and
  autograd reaches the same parameters. `patch_timm` also patches timm's pre-LN `Block` (LayerNorms, patched
  attention and MLP, no LayerScale) and `patch_hf` HF's `ViTLayer`, to run whole-block fused where
  `vit_kernels.ops.pre_ln_block.fuses_block` says so.

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

import functools
import importlib
import inspect
import logging
import math
import re
import sys
from dataclasses import dataclass, field

import torch
import torch.nn as nn

import vit_kernels as vk
from vit.model import VisionTransformer, _pair, bypassed, fused_block_forward, resize_pos_embed, submodule_record
from vit_kernels import dispatch
from vit_kernels.ops import pre_ln_block

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
    forms = {"gelu": "none", "gelu_python": "none", "gelu_pytorch_tanh": "tanh", "gelu_new": "tanh"}
    approximate = forms.get(hidden_act)
    if approximate is None:
        raise ValueError(f"hidden_act={hidden_act!r} is not supported ({', '.join(forms)})")
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
    else:  # the classifier's rows are the labels; a config that names another count is wrong
        classes = converted["head.weight"].shape[0]
        labels = config.get("num_labels") if isinstance(config, dict) else getattr(config, "num_labels", None)
        if labels is not None and labels != classes:
            raise ValueError(f"config num_labels={labels}, but the state dict's classifier has {classes} rows")
        kwargs["num_classes"] = classes
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
    expected = model.state_dict()
    mismatched = [f"{k} {tuple(t.shape)} vs {tuple(expected[k].shape)}" for k, t in converted.items()
                  if t.shape != expected[k].shape]  # fmt: skip
    if mismatched:
        raise ValueError(
            f"the Hugging Face state dict does not match the config: shapes (state dict vs config) {mismatched}"
        )
    model.load_state_dict(converted, strict=True)
    return model


def _diff_keys(model: nn.Module, sd: dict) -> tuple[list[str], list[str]]:
    ours = set(model.state_dict())
    return sorted(ours - set(sd)), sorted(set(sd) - ours)


# ----------------------------------------------------------------------------------------------------
# patching existing models in place
# ----------------------------------------------------------------------------------------------------
# A module is patched only where its forward is provably what the fused ops compute: its class is one of the
# classes below *by identity* (never by name: timm's BEiT, SAM and EfficientFormer each have an `Attention` of
# their own, and patching those by name changed or broke the model), and its structure passes the checks of
# that class (no submodule, parameter or buffer beyond the known set, a GELU, no dropout inside, a forward
# signature we know). Everything else keeps its own forward and is listed in the PatchSummary with the reason.
# A subclass of one of those classes is left alone too, and always listed (whatever its name): its forward, or
# what it adds, may compute something else, and an isinstance check would have replaced it.

logger = logging.getLogger(__name__)

# Names that look like an attention or MLP: used only to *report* modules left alone, never to patch.
_LOOKS_PATCHABLE = re.compile(r"attn|attention|mlp|ffn|feedforward|glu", re.IGNORECASE)
_CONTAINER = re.compile(r"Block|Layer|Stage|Encoder|Decoder|Model")


def _looks_patchable(name: str, m: nn.Module) -> bool:
    """An attention or MLP by its class or attribute name (XCiT's `attn` is an `XCA`), holding submodules (so
    not a dropout or activation named after one), and not a container (a block, layer or stage)."""
    cls = type(m).__name__
    named = _LOOKS_PATCHABLE.search(cls) or _LOOKS_PATCHABLE.search(name.rpartition(".")[2])
    container = isinstance(m, (nn.ModuleList, nn.ModuleDict, nn.Sequential)) or _CONTAINER.search(cls)
    return bool(named) and next(m.children(), None) is not None and not container


@dataclass
class PatchSummary:
    """What `patch_timm` / `patch_hf` did: the modules now on the fused ops, and those left alone, with why.

    `attention`, `mlp`: qualified module names now running the fused ops. `skipped`: (name, reason) of each
    attention- or MLP-like module that keeps its own forward. `blocks`: pre-LN blocks patched to run whole-block
    fused (vk.ln_fused_qkv -> vk.attention -> vk.proj_residual -> vk.ln_gelu_mlp) where
    `vit_kernels.ops.pre_ln_block.fuses_block` says so, and their patched attention and MLP otherwise; `unfused_blocks`:
    (name, reason) of blocks of a known class, or of a subclass of one, that keep their own forward (their
    attention and MLP may still be patched; these are not skips: `strict` ignores them). `str(summary)` is a
    readable report.
    """

    attention: list[str] = field(default_factory=list)
    mlp: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    blocks: list[str] = field(default_factory=list)
    unfused_blocks: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"patched {len(self.attention)} attention and {len(self.mlp)} MLP modules onto the fused ops "
            f"and {len(self.blocks)} blocks (fused whole where vit_kernels.ops.pre_ln_block.fuses_block says); "
            f"{len(self.skipped)} left on their own forward"
        ]
        lines += [f"  {name}: {reason}" for name, reason in self.skipped]
        lines += [f"  {name} (block not fused whole): {reason}" for name, reason in self.unfused_blocks]
        return "\n".join(lines)


class _Skip(Exception):
    """Why a module is not patched (internal: ends up in PatchSummary.skipped)."""


def _loaded_class(module: str, name: str):
    """The class `module.name` if that module is imported, else None: a model built from it imports it first."""
    return getattr(sys.modules.get(module), name, None)


def _check_signature(m: nn.Module, known: tuple[str, ...], var_keyword: bool = False) -> None:
    """The class's forward takes the first argument of `known` and then a prefix of the rest (and **kwargs
    iff `var_keyword`): an argument we do not know could change the computation."""
    params = list(inspect.signature(type(m).forward).parameters.values())[1:]
    names = [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    has_var_keyword = any(p.kind is p.VAR_KEYWORD for p in params)
    has_var_positional = any(p.kind is p.VAR_POSITIONAL for p in params)
    if not names or names != list(known[: len(names)]) or has_var_positional or has_var_keyword != var_keyword:
        shown = ", ".join(str(p) for p in params)
        raise _Skip(f"forward({shown}) is not a signature the fused forward knows ({', '.join(known)})")


def _check_children(m: nn.Module, kinds: dict[str, tuple[type, ...]], required: tuple[str, ...]) -> None:
    """Submodules exactly of the known names and classes, no hooks on them (the fused path bypasses some of
    them), and no parameter or buffer of the module's own."""
    children = dict(m.named_children())
    unknown = [f"{n} ({type(c).__name__})" for n, c in children.items() if n not in kinds]
    if unknown:
        raise _Skip(f"has submodules the fused ops do not compute: {', '.join(unknown)}")
    for n in required:
        if n not in children:
            raise _Skip(f"has no {n}")
    for n, child in children.items():
        if type(child) not in kinds[n]:
            expected = " or ".join(k.__name__ for k in kinds[n])
            raise _Skip(f"{n} is {type(child).__name__}, not {expected}: the fused ops do not compute it")
        if child._forward_hooks or child._forward_pre_hooks:
            raise _Skip(f"{n} has forward hooks, which the fused path would bypass")
    own = [n for n, _ in m.named_parameters(recurse=False)] + [n for n, _ in m.named_buffers(recurse=False)]
    if own:
        raise _Skip(f"has parameters or buffers of its own ({', '.join(own)}) that the fused ops would ignore")


def _check_no_dropout(p: float, what: str) -> None:
    if p:
        raise _Skip(f"{what} p={p}: the fused ops have no dropout inside attention or the MLP")


def _check_backend(backend: str, head_dim: int | None = None, **channels: int) -> None:
    """Shapes an explicitly chosen backend cannot run are refused now, not at the first forward."""
    support = dispatch.SUPPORT.get(backend)  # None for "auto", which always finds a backend that fits
    if support is None:
        return
    if head_dim is not None:
        if support.head_dims is not None and head_dim not in support.head_dims:
            raise _Skip(f"head dim {head_dim} is not supported by backend={backend!r} (supported: {support.head_dims})")
        channels["head dim"] = head_dim
    objection = dispatch.channel_objection(channels)(backend)
    if objection:
        raise _Skip(f"backend={backend!r} {objection}")


def _gelu_form(act: nn.Module) -> str:
    """The GELU form, "none" (erf) or "tanh", of an activation module of torch, timm or transformers (matched
    by class identity); anything else is not a GELU."""
    if type(act) is nn.GELU:
        return act.approximate
    if act.__class__ is _loaded_class("timm.layers.activations", "GELU"):
        return "none"
    if act.__class__ is _loaded_class("timm.layers.activations", "GELUTanh"):
        return "tanh"
    if act.__class__ is _loaded_class("transformers.activations", "GELUActivation"):
        # F.gelu, or its erf formula written out (use_gelu_python=True): the same function either way.
        return "none"
    if act.__class__ in (
        _loaded_class("transformers.activations", "GELUTanh"),
        _loaded_class("transformers.activations", "NewGELUActivation"),
    ):
        return "tanh"  # F.gelu(approximate="tanh") or the same tanh formula written out
    raise _Skip(f"activation {type(act).__module__}.{type(act).__name__} is not GELU; vk.gelu_mlp fuses GELU only")


def _has_call_args(args: tuple, kwargs: dict) -> bool:
    """Whether a call passed anything beyond x that is set (a mask, is_causal=True, ...)."""
    return any(a is not None and a is not False for a in (*args, *kwargs.values()))


def _bypasses_something(self: nn.Module, x: torch.Tensor) -> bool:
    """Whether the fused forward of a patched module would skip what its own forward does now, which the checks
    at patch time could not see: x of a dtype the ops do not take (float64), or what `vit.model.bypassed` finds
    (a submodule hooked or replaced since patching, a global hook)."""
    return x.dtype not in dispatch.DTYPES or bypassed(self._vk_submodules)


def _dropping(*dropouts: nn.Module | None) -> bool:
    """Whether one of the dropouts (or stochastic-depth layers: drop_prob) is active now (training, p > 0): a rate
    set after patching included."""
    return any(d is not None and d.training and getattr(d, "drop_prob", getattr(d, "p", 0.0)) for d in dropouts)


# ---- timm ----
def _timm_attention_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    # A mask or is_causal=True (timm passes them as arguments, e.g. NaFlex ViT's padding mask), or an input
    # that is not (B, N, C), is the original forward's to compute: falling back keeps the model's outputs.
    # So is dropout on the attention weights switched on after patching, and what `_bypasses_something` names.
    if (
        x.dim() != 3
        or _has_call_args(args, kwargs)
        or _dropping(getattr(self, "attn_drop", None))
        or _bypasses_something(self, x)
    ):
        return type(self).forward(self, x, *args, **kwargs)
    B, N, C = x.shape
    q, k, v = vk.fused_qkv(x, self.qkv.weight, self.qkv.bias, self.num_heads, backend=self._vk_backend)
    out = vk.attention(q, k, v, scale=self.scale, backend=self._vk_backend)  # (B, H, N, D)
    return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))


def _timm_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    if _dropping(getattr(self, "drop1", None)) or _bypasses_something(self, x):  # dropout after GELU; hooks
        return type(self).forward(self, x)
    fc1, fc2 = self.fc1, self.fc2
    y = vk.gelu_mlp(
        x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, approximate=self._vk_approximate, backend=self._vk_backend
    )
    return self.drop2(y)


def _check_timm_attention(m: nn.Module, backend: str) -> dict:
    # timm's Attention: qkv -> (q_norm, k_norm) -> SDPA (attn_drop) -> norm -> (gate) -> proj -> proj_drop.
    _check_signature(m, ("x", "attn_mask", "is_causal"))
    drop, ident = (nn.Dropout, nn.Identity), (nn.Identity,)
    kinds = dict(qkv=(nn.Linear,), q_norm=ident, k_norm=ident, attn_drop=drop, norm=ident, proj=(nn.Linear,))
    _check_children(m, {**kinds, "proj_drop": drop}, required=("qkv", "proj"))
    if getattr(m, "gate", None) is not None:
        raise _Skip("has a gate on the attention output, which the fused ops do not compute")
    if isinstance(getattr(m, "attn_drop", None), nn.Dropout):
        _check_no_dropout(m.attn_drop.p, "attn_drop")
    C, H = m.qkv.in_features, m.num_heads
    if m.qkv.out_features != 3 * C:
        raise _Skip(f"qkv maps {C} channels to {m.qkv.out_features}; vk.fused_qkv needs 3 * {C}")
    if C % H or getattr(m, "head_dim", C // H) != C // H:
        raise _Skip(f"head dim {getattr(m, 'head_dim', None)} is not dim / num_heads = {C} / {H}")
    D = C // H
    # timm's SDPA path uses D ** -0.5 whatever m.scale says; its manual path uses m.scale: they agree only here.
    if not math.isclose(m.scale, D**-0.5, rel_tol=1e-9):
        raise _Skip(f"scale {m.scale} is not head_dim ** -0.5 = {D**-0.5}")
    _check_backend(backend, head_dim=D, C=C)
    return {}


def _check_timm_mlp(m: nn.Module, backend: str) -> dict:
    # timm's Mlp: fc1 -> act -> drop1 -> norm -> fc2 -> drop2.
    _check_signature(m, ("x",))
    drop, ident = (nn.Dropout, nn.Identity), (nn.Identity,)
    kinds = dict(
        fc1=(nn.Linear,), act=(type(getattr(m, "act", None)),), drop1=drop, norm=ident, fc2=(nn.Linear,), drop2=drop
    )
    _check_children(m, kinds, required=("fc1", "act", "fc2"))
    approximate = _gelu_form(m.act)
    if isinstance(getattr(m, "drop1", None), nn.Dropout):
        _check_no_dropout(m.drop1.p, "drop1")
    _check_backend(backend, C=m.fc1.in_features, hidden=m.fc1.out_features, C_out=m.fc2.out_features)
    return {"_vk_approximate": approximate}


def _timm_block_dropping(self) -> bool:
    """Whether a stochastic module of the block is active now (training, p > 0): stochastic depth and the
    dropouts after proj and fc2 act before the residual add, which the fused epilogues cannot do; those inside
    attention and the MLP (a rate set after patching) are not in the fused ops at all."""
    optional = (getattr(self.attn, "proj_drop", None), getattr(self.mlp, "drop2", None))
    inside = (getattr(self.attn, "attn_drop", None), getattr(self.mlp, "drop1", None))
    return _dropping(self.drop_path1, self.drop_path2, *optional, *inside)


def _timm_block_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    # A mask or is_causal=True, a non-(B, N, C) input, active dropout / drop-path, or a backend on which
    # fuses_block says no (torch, reference; auto without a measurement) run the original forward, which
    # calls the (patched) attention and MLP.
    if (
        x.dim() != 3
        or _has_call_args(args, kwargs)
        or _timm_block_dropping(self)
        or _bypasses_something(self, x)
        or not pre_ln_block.fuses_block(self._vk_backend, x)
    ):
        return type(self).forward(self, x, *args, **kwargs)
    attn, mlp = self.attn, self.mlp
    return fused_block_forward(
        x, self.norm1, attn.qkv.weight, attn.qkv.bias, attn.num_heads, attn.scale, attn.proj, self.norm2, mlp.fc1,
        mlp.fc2, mlp._vk_approximate, self._vk_backend,
    )  # fmt: skip


def _check_layer_norm(name: str, norm: nn.Module, C: int) -> None:
    if norm.normalized_shape != (C,) or norm.weight is None or norm.bias is None:
        raise _Skip(f"{name} is not a LayerNorm over the {C} channels with weight and bias")
    if getattr(norm, "_fast_norm", False):
        raise _Skip(f"{name} uses timm's fast norm, which the fused LayerNorm does not reproduce")


def _forward_replaced_by_others(m: nn.Module) -> bool:
    own = m.__dict__.get("forward")
    return own is not None and not (isinstance(own, functools.partial) and own.func in _PATCHED_FORWARDS)


def _check_block_parts(parts, C: int, backend: str) -> dict:
    """A block fuses only around an attention and an MLP that are patched by us (the same checks) and that
    map back to the block's C channels. The fused forward reads the patched MLP's _vk_approximate."""
    for name, sub, check in parts:
        if _forward_replaced_by_others(sub):
            raise _Skip(f"its {name}'s forward was already replaced on the instance by someone else")
        try:
            check(sub, backend)
        except _Skip as why:
            raise _Skip(f"its {name} is not patched ({why})") from None
    mlp = parts[-1][1]
    if mlp.fc2.out_features != C:
        raise _Skip(f"mlp maps back to {mlp.fc2.out_features} channels, not the block's {C}")
    return {}


def _check_timm_block(m: nn.Module, backend: str) -> dict:
    # timm's Block: x + drop_path1(ls1(attn(norm1(x)))), then x + drop_path2(ls2(mlp(norm2(x)))).
    _check_signature(m, ("x", "attn_mask", "is_causal"))
    layer_norm = tuple(c for c in (nn.LayerNorm, _loaded_class("timm.layers.norm", "LayerNorm")) if c is not None)
    drop_path = tuple(c for c in (nn.Identity, _loaded_class("timm.layers.drop", "DropPath")) if c is not None)
    rules = _timm_rules(blocks=False)
    attn_kinds = tuple(c for c, rule in rules.items() if rule[0] == "attention")
    mlp_kinds = tuple(c for c, rule in rules.items() if rule[0] == "mlp")
    kinds = dict(norm1=layer_norm, attn=attn_kinds, ls1=(nn.Identity,), drop_path1=drop_path,
                 norm2=layer_norm, mlp=mlp_kinds, ls2=(nn.Identity,), drop_path2=drop_path)  # fmt: skip
    _check_children(m, kinds, required=tuple(kinds))
    C = m.attn.qkv.in_features
    _check_layer_norm("norm1", m.norm1, C)
    _check_layer_norm("norm2", m.norm2, C)
    return _check_block_parts((("attn", m.attn, _check_timm_attention), ("mlp", m.mlp, _check_timm_mlp)), C, backend)


def _timm_rules(blocks: bool = True) -> dict[type, tuple]:
    """class -> (kind, check, forward). Older timm defined its Attention in vision_transformer.py itself."""
    attention = ("attention", _check_timm_attention, _timm_attention_forward)
    found = {
        _loaded_class("timm.layers.attention", "Attention"): attention,
        _loaded_class("timm.models.vision_transformer", "Attention"): attention,
        _loaded_class("timm.layers.mlp", "Mlp"): ("mlp", _check_timm_mlp, _timm_mlp_forward),
    }
    if blocks:
        found[_loaded_class("timm.models.vision_transformer", "Block")] = (
            "block",
            _check_timm_block,
            _timm_block_forward,
        )
    found.pop(None, None)
    return found


# ---- Hugging Face transformers ----
# Model families whose attention and MLP classes are ViT's under another name (transformers' "modular"
# copies); None: the family's attention is its own (CLIP's and SigLIP's, patched for their MLPs only). Each class
# is patched only if its forward is ViT's code, checked at patch time.
_HF_FAMILIES = {
    "vit": ("ViTAttention", "ViTMLP"),
    "deit": ("DeiTAttention", "DeiTMLP"),
    "dinov2": ("Dinov2Attention", "Dinov2MLP"),
    "dinov2_with_registers": ("Dinov2WithRegistersAttention", "Dinov2WithRegistersMLP"),
    "beit": ("BeitAttention", "BeitMLP"),
    "vit_msn": ("ViTMSNAttention", "ViTMSNMLP"),
    "ijepa": ("IJepaAttention", "IJepaMLP"),
    "vit_mae": ("ViTMAEAttention", "ViTMAEMLP"),
    "vivit": ("VivitAttention", "VivitMLP"),
    "audio_spectrogram_transformer": ("ASTAttention", "ASTMLP"),
    "clip": (None, "CLIPMLP"),
    "siglip": (None, "SiglipMLP"),
    "siglip2": (None, "Siglip2MLP"),
}
# kwargs of the attention call that do not change what it computes; any other set kwarg -> original forward.
_HF_NEUTRAL_KWARGS = frozenset({"output_hidden_states", "return_dict"})


def _hf_attention_forward(self, hidden_states: torch.Tensor, attention_mask=None, **kwargs):
    # A mask (BEiT passes its relative position bias this way), requested attention weights, or any other
    # argument is the original forward's to compute: falling back keeps the model's outputs.
    # So is attention dropout switched on after patching, and what `_bypasses_something` names.
    if (
        attention_mask is not None
        or hidden_states.dim() != 3
        or _hf_wants_more(self.config, kwargs)
        or (self.training and self.attention_dropout)
        or _bypasses_something(self, hidden_states)
    ):
        return type(self).forward(self, hidden_states, attention_mask, **kwargs)
    B, N, C = hidden_states.shape
    weight, bias = _hf_qkv_parameters(self)
    q, k, v = vk.fused_qkv(hidden_states, weight, bias, self.num_attention_heads, backend=self._vk_backend)
    out = vk.attention(q, k, v, scale=self.scaling, backend=self._vk_backend)  # (B, H, N, D)
    return self.o_proj(out.transpose(1, 2).reshape(B, N, C)), None  # no attention weights: never formed


def _hf_qkv_parameters(attn: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One (3C, C) weight (and (3C,) bias) for the fused projection; the cat is tiny next to the GEMM and keeps
    HF's parameters."""
    projections = (attn.q_proj, attn.k_proj, attn.v_proj)
    weight = torch.cat([p.weight for p in projections])
    bias = None
    if any(p.bias is not None for p in projections):  # BEiT's k_proj has no bias: zeros in its place
        C = attn.q_proj.in_features
        bias = torch.cat([p.weight.new_zeros(C) if p.bias is None else p.bias for p in projections])
    return weight, bias


def _hf_wants_more(config, kwargs: dict) -> bool:
    """Attention weights requested, or a call argument that could change what attention computes."""
    return getattr(config, "output_attentions", False) or any(
        v is not None and v is not False for k, v in kwargs.items() if k not in _HF_NEUTRAL_KWARGS
    )


def _hf_layer_forward(self, hidden_states: torch.Tensor, attention_mask=None, **kwargs):
    # ViTLayer: x + dropout(attention(layernorm_before(x))), then x + dropout(mlp(layernorm_after(x))). A mask,
    # other arguments, active hidden dropout (training, p > 0), or a backend on which fuses_block says no run the
    # original forward, on the patched attention and MLP.
    attn, mlp, ln1, ln2, backend = (
        self.attention,
        self.mlp,
        self.layernorm_before,
        self.layernorm_after,
        self._vk_backend,
    )
    if (
        attention_mask is not None
        or hidden_states.dim() != 3
        or _hf_wants_more(attn.config, kwargs)
        or (self.dropout.training and self.dropout.p)
        or (attn.training and attn.attention_dropout)
        or _bypasses_something(self, hidden_states)
        or not pre_ln_block.fuses_block(backend, hidden_states)
    ):
        return type(self).forward(self, hidden_states, attention_mask, **kwargs)
    weight, bias = _hf_qkv_parameters(attn)
    return fused_block_forward(
        hidden_states, ln1, weight, bias, attn.num_attention_heads, attn.scaling, attn.o_proj, ln2, mlp.fc1, mlp.fc2,
        mlp._vk_approximate, backend,
    )  # fmt: skip


def _hf_mlp_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if _bypasses_something(self, hidden_states):
        return type(self).forward(self, hidden_states)
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


def _same_code(f, g) -> bool:
    a, b = f.__code__, g.__code__
    return (a.co_code, a.co_names, a.co_consts, a.co_varnames) == (b.co_code, b.co_names, b.co_consts, b.co_varnames)


def _check_same_forward_as_vit(m: nn.Module, vit_class: type | None) -> None:
    if vit_class is not None and type(m) is not vit_class and not _same_code(type(m).forward, vit_class.forward):
        raise _Skip(f"{type(m).__name__}.forward is not {vit_class.__name__}.forward's code in this transformers")


def _check_hf_attention(m: nn.Module, backend: str) -> dict:
    # q_proj, k_proj, v_proj -> attention interface (SDPA / eager / ...; mask, dropout, scaling) -> o_proj.
    _check_same_forward_as_vit(m, _hf_vit_class("ViTAttention"))
    _check_signature(m, ("hidden_states", "attention_mask"), var_keyword=True)
    linear = (nn.Linear,)
    projections = ("q_proj", "k_proj", "v_proj", "o_proj")
    _check_children(m, dict.fromkeys(projections, linear), required=projections)
    if getattr(m, "is_causal", False):
        raise _Skip("is_causal=True")
    _check_no_dropout(m.attention_dropout, "attention dropout (attention_probs_dropout_prob)")
    if any(getattr(m.config, f"use{s}_relative_position_bias", False) for s in ("", "_shared")):
        raise _Skip(
            "relative position bias: the layer passes it as attention_mask on every call, and the fused attention "
            "takes no bias (the patched forward would always fall back)"
        )
    C, H = m.q_proj.in_features, m.num_attention_heads
    shapes = {n: tuple(getattr(m, n).weight.shape) for n in projections}
    if any(s != (C, C) for s in shapes.values()):
        raise _Skip(f"projections {shapes} are not all (hidden, hidden) = ({C}, {C})")
    if C % H or m.head_dim != C // H:
        raise _Skip(f"head dim {m.head_dim} is not hidden_size / num_attention_heads = {C} / {H}")
    _check_backend(backend, head_dim=C // H, C=C)
    return {}


def _check_hf_mlp(m: nn.Module, backend: str) -> dict:
    # fc1 -> activation_fn -> fc2.
    _check_same_forward_as_vit(m, _hf_vit_class("ViTMLP"))
    _check_signature(m, ("hidden_states",))
    kinds = dict(fc1=(nn.Linear,), activation_fn=(type(getattr(m, "activation_fn", None)),), fc2=(nn.Linear,))
    _check_children(m, kinds, required=("fc1", "activation_fn", "fc2"))
    approximate = _gelu_form(m.activation_fn)
    _check_backend(backend, C=m.fc1.in_features, hidden=m.fc1.out_features, C_out=m.fc2.out_features)
    return {"_vk_approximate": approximate}


def _check_hf_layer(m: nn.Module, backend: str) -> dict:
    # ViTLayer: layernorm_before -> attention -> dropout -> add, layernorm_after -> mlp -> dropout -> add.
    _check_signature(m, ("hidden_states", "attention_mask"), var_keyword=True)
    kinds = dict(attention=(_hf_vit_class("ViTAttention"),), layernorm_before=(nn.LayerNorm,),
                 layernorm_after=(nn.LayerNorm,), mlp=(_hf_vit_class("ViTMLP"),), dropout=(nn.Dropout,))  # fmt: skip
    _check_children(m, kinds, required=tuple(kinds))
    C = m.attention.q_proj.in_features
    _check_layer_norm("layernorm_before", m.layernorm_before, C)
    _check_layer_norm("layernorm_after", m.layernorm_after, C)
    parts = (("attention", m.attention, _check_hf_attention), ("mlp", m.mlp, _check_hf_mlp))
    return _check_block_parts(parts, C, backend)


def _hf_vit_class(name: str):
    """ViT's own class: the reference the other families' forwards are compared with."""
    module = "transformers.models.vit.modeling_vit"
    if module not in sys.modules:
        importlib.import_module(module)
    return _loaded_class(module, name)


def _hf_rules() -> dict[type, tuple]:
    found = {}
    for family, (attention, mlp) in _HF_FAMILIES.items():
        module = f"transformers.models.{family}.modeling_{family}"
        if attention is not None:
            found[_loaded_class(module, attention)] = ("attention", _check_hf_attention, _hf_attention_forward)
        found[_loaded_class(module, mlp)] = ("mlp", _check_hf_mlp, _hf_mlp_forward)
    # The whole layer, ViT's own class only (the other families' layers differ: LayerScale, drop-path, ...).
    found[_loaded_class("transformers.models.vit.modeling_vit", "ViTLayer")] = ("block", _check_hf_layer,
                                                                               _hf_layer_forward)  # fmt: skip
    found.pop(None, None)
    return found


# ---- both ----
_PATCHED_FORWARDS = (
    _timm_attention_forward, _timm_mlp_forward, _timm_block_forward, _hf_attention_forward, _hf_mlp_forward,
    _hf_layer_forward,
)  # fmt: skip


def _subclassed_rule(cls: type, rules: dict[type, tuple]) -> tuple[type, tuple] | None:
    """(base, rule) of the nearest class in `cls`'s MRO (itself excluded) that `rules` patches, else None."""
    for base in cls.__mro__[1:]:
        if base in rules:
            return base, rules[base]
    return None


def _subclass_reason(cls: type, base: type, caller: str) -> str:
    what = "overrides forward" if cls.forward is not base.forward else "adds to it"
    return (
        f"{cls.__name__} is a subclass of {base.__module__}.{base.__qualname__} ({what}): {caller} patches that "
        "class itself only, since a subclass may compute something else"
    )


def _patch(
    model: nn.Module, rules: dict[type, tuple], backend: str, strict: bool, caller: str, advice: str = ""
) -> PatchSummary:
    if backend != "auto" and backend not in dispatch.BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + dispatch.BACKENDS}, got {backend!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    summary, plan = PatchSummary(), []
    for name, m in model.named_modules():
        name = name or type(model).__name__
        rule = rules.get(type(m))  # the class itself: never isinstance (see _subclassed_rule)
        if rule is None:
            subclassed = _subclassed_rule(type(m), rules)
            if subclassed is not None:
                base, (kind, _, _) = subclassed
                # A block keeps its forward and its attention and MLP may still be patched: not a skip.
                skips = summary.unfused_blocks if kind == "block" else summary.skipped
                skips.append((name, _subclass_reason(type(m), base, caller)))
            elif _looks_patchable(name, m):
                cls = f"{type(m).__module__}.{type(m).__qualname__}"
                summary.skipped.append((name, f"{cls} is not a class {caller} patches"))
            continue
        kind, check, forward = rule
        try:
            if _forward_replaced_by_others(m):
                raise _Skip("its forward was already replaced on the instance by someone else")
            attrs = check(m, backend)
        except (_Skip, AttributeError) as exc:  # AttributeError: a known class built without an attribute it reads
            why = exc if isinstance(exc, _Skip) else f"not the known structure ({exc})"
            # A block that cannot run whole keeps its forward, and its attention and MLP are still patched.
            skips = summary.unfused_blocks if kind == "block" else summary.skipped
            skips.append((name, f"{type(m).__name__}: {why}"))
            continue
        plan.append((m, forward, attrs))
        {"attention": summary.attention, "mlp": summary.mlp, "block": summary.blocks}[kind].append(name)
    # Decide before touching anything: a refusal leaves the model exactly as it was.
    if strict and summary.skipped:
        name, reason = summary.skipped[0]
        raise ValueError(f"{caller}(strict=True): {name} cannot be patched: {reason}\n{summary}")
    if not plan:
        raise ValueError(f"{caller} found nothing it can patch in {type(model).__name__}{advice}: {summary}")
    for m, forward, attrs in plan:
        for attr, value in attrs.items():
            setattr(m, attr, value)
        m._vk_backend = backend
        m._vk_submodules = submodule_record(m)
        # A partial, not a bound method: a bound method pickles by its function's name looked up on the module,
        # which has no attribute of that name, so torch.save(model) wrote a file that torch.load refused.
        m.forward = functools.partial(forward, m)
    (logger.warning if summary.skipped else logger.info)("%s: %s", caller, summary)
    return summary


def patch_timm(model: nn.Module, backend: str = "auto", *, strict: bool = False) -> PatchSummary:
    """Put a timm model's attention and MLP modules onto the fused ops, in place; returns a PatchSummary.

    Patched: modules whose class *is* timm's `Attention` (qkv -> SDPA -> proj) or `Mlp` (fc1 -> GELU -> fc2),
    with no q/k norm, scale norm, gate, dropout inside, or other extra, and shapes `backend` can run. Their
    forward then calls vk.fused_qkv + vk.attention or vk.gelu_mlp on the module's own weights (no copy; the
    state dict and autograd are unchanged). A call with an attention mask, is_causal=True or a non-(B, N, C)
    input runs the module's original forward, so outputs never change. A `vision_transformer.Block` whose norms
    are LayerNorms with weight and bias, whose attention and MLP are patched, with no LayerScale, and drop-path
    Identity or DropPath, is patched too (`summary.blocks`): where
    `vit_kernels.ops.pre_ln_block.fuses_block(backend, x)` says so (triton, cuda; auto where the measured table names
    one) it runs vk.ln_fused_qkv -> vk.attention ->
    vk.proj_residual -> vk.ln_gelu_mlp, and otherwise (other backends, a mask, active drop-path or dropout in
    training) its own forward on the patched attention and MLP. Blocks that cannot are listed, with the
    reason, in `summary.unfused_blocks` (not a skip: strict ignores them). Every other attention- or MLP-like
    module (BEiT's, EVA's, Swin's ... attention, SwiGLU MLPs) keeps its forward and is listed in
    `summary.skipped` with the reason; a summary with skips is logged as a warning. Classes are matched by
    identity, never isinstance: a subclass of `Attention`, `Mlp` or `Block` (which may compute something else)
    keeps its forward and is listed, in `skipped` (a `Block` subclass: in `unfused_blocks`).

    strict=True: ValueError naming the first module that cannot be patched (the model is left untouched).
    Nothing patchable: ValueError. A backend other than the five: ValueError.
    """
    return _patch(model, _timm_rules(), backend, strict, "patch_timm")


def patch_hf(model: nn.Module, backend: str = "auto", *, strict: bool = False) -> PatchSummary:
    """Put a Hugging Face ViT-family model onto the fused ops, in place; returns a PatchSummary.

    Patched: ViT's `ViTAttention` (q_proj/k_proj/v_proj/o_proj) and `ViTMLP` (fc1/fc2), the layout of
    transformers >= 5, and the same classes of DeiT, DINOv2 (with registers), BEiT, ViT-MSN, I-JEPA, ViT-MAE,
    ViViT and the Audio Spectrogram Transformer, and the MLPs of CLIP, SigLIP and SigLIP 2 (both towers; their
    attention is their own), where their forward is ViT's code (checked when patching), with no attention dropout
    and a GELU (CLIP's default quick_gelu is not one). BEiT with a
    relative position bias keeps its attention. A call with an attention mask or output_attentions runs the
    original forward (the patched one forms no attention weights), so outputs never change. ViT's own
    `ViTLayer` (not the other families') whose attention and MLP are patched is patched too (`summary.blocks`):
    whole-block fused where `vit_kernels.ops.pre_ln_block.fuses_block` says so, its own forward otherwise (a mask, other
    arguments, hidden dropout active in training, other backends). Other modules are listed in
    `summary.skipped` with the reason; a subclass of any of these classes keeps its forward and is listed too
    (in `skipped`; a `ViTLayer` subclass in `unfused_blocks`). transformers < 5 (ViTSelfAttention with query/key/value)
    has nothing patch_hf knows: convert it with `from_hf` instead. strict=True and errors as `patch_timm`.
    """
    advice = ""
    if isinstance(model, nn.Module) and any(type(m).__name__ == "ViTSelfAttention" for m in model.modules()):
        advice = " (a transformers < 5 ViT, with ViTSelfAttention, converts with vit.from_hf instead)"
    return _patch(model, _hf_rules(), backend, strict, "patch_hf", advice)
