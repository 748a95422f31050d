"""Vision Transformer (Dosovitskiy et al. 2020) on the fused ops of `vit_kernels`.

A config dataclass with named presets, then the modules. The modules hold parameters and call
`vk.fused_qkv`, `vk.attention` and `vk.gelu_mlp` with the model's `backend`; they do no math of their
own beyond the residual adds, LayerNorm, the patch convolution and the head, so switching
`backend` switches every kernel and nothing else. Where `vit_kernels.ops.pre_ln_block.fuses_block` says so (the
`triton` and `cuda` backends, and `auto` where the measured table names one for the block ops; outside autocast and
stochastic depth), a block runs the whole-block fused ops instead:
`vk.ln_fused_qkv` -> `vk.attention` -> `vk.proj_residual` -> `vk.ln_gelu_mlp` (same weights, same math).
The fused ops read the Linear and LayerNorm weights directly; where a submodule has a hook (torch.nn.utils.prune's
too) or was replaced after building (an adapter), its owner calls the submodules instead (`bypassed`), so what was
added runs. `model.backend = ...` switches every op.

Parameter names and shapes are exactly timm's `VisionTransformer` (global_pool="token", class token,
no register tokens, no LayerScale), so a timm checkpoint loads with `load_state_dict(strict=True)`:

    cls_token                 (1, 1, C)
    pos_embed                 (1, 1 + gh * gw, C)       gh, gw = img_size // patch_size
    patch_embed.proj.weight   (C, in_chans, p, p)       .bias (C,)
    blocks.{i}.norm1.*        (C,)
    blocks.{i}.attn.qkv.*     (3C, C), (3C,)            rows ordered q | k | v, heads inside each
    blocks.{i}.attn.proj.*    (C, C), (C,)
    blocks.{i}.norm2.*        (C,)
    blocks.{i}.mlp.fc1.*      (hidden, C), (hidden,)
    blocks.{i}.mlp.fc2.*      (C, hidden), (C,)
    norm.*                    (C,)
    head.*                    (num_classes, C), (num_classes,)   absent when num_classes == 0

A checkpoint trained at another image size loads too: `pos_embed` is resampled (bicubic over the
patch grid, class token kept) by `resize_pos_embed` while loading. The token count gives the old grid only when it
is 1 class token + a square grid; any other pos_embed (register tokens, no_embed_class, a non-square grid) is a
ValueError that says so and names the manual path, `resize_pos_embed(..., old_grid=(h, w))` before loading.

FLOPs of one forward, per image (N = 1 + gh * gw tokens, matmuls only, multiply-add = 2):
    depth * (2*N*C*3C + 2*2*N*N*C + 2*N*C*C + 2*2*N*C*hidden) + 2*gh*gw*C*in_chans*p*p + 2*C*num_classes
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

import vit_kernels as vk
from vit_kernels.dispatch import BACKENDS
from vit_kernels.ops import pre_ln_block

# ----------------------------------------------------------------------------------------------------
# config and presets
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ViTConfig:
    img_size: int | tuple[int, int] = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000  # 0: no head, the model returns the final-normed CLS features (B, C)
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    mlp_hidden_dim: int | None = None  # overrides int(embed_dim * mlp_ratio) (Hugging Face's intermediate_size)
    qkv_bias: bool = True
    norm_eps: float = 1e-6  # timm; Hugging Face checkpoints use 1e-12
    gelu_approximate: str = "none"  # "none": exact erf (timm, HF "gelu"); "tanh"
    drop_rate: float = 0.0  # dropout after the position embedding and before the head (timm's drop_rate)
    drop_path_rate: float = 0.0  # stochastic depth, rising linearly to this over the blocks

    @property
    def grid_size(self) -> tuple[int, int]:
        h, w = _pair(self.img_size)
        return h // self.patch_size, w // self.patch_size

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid_size
        return gh * gw

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def hidden_dim(self) -> int:
        return self.mlp_hidden_dim if self.mlp_hidden_dim is not None else int(self.embed_dim * self.mlp_ratio)

    def flops(self) -> int:
        """Matmul FLOPs of one forward for one image (see the module docstring)."""
        N, C, hid = 1 + self.num_patches, self.embed_dim, self.hidden_dim
        per_block = 2 * N * C * 3 * C + 4 * N * N * C + 2 * N * C * C + 4 * N * C * hid
        patch = 2 * self.num_patches * C * self.in_chans * self.patch_size**2
        return self.depth * per_block + patch + 2 * C * self.num_classes


# The timm names; (embed_dim, depth, num_heads) from the ViT and DeiT papers. Like timm's, the two presets whose
# only checkpoints are ImageNet-21k feature extractors (orig_in21k) have no head: pass num_classes to add one.
PRESETS: dict[str, ViTConfig] = {
    "vit_tiny_patch16_224": ViTConfig(embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16_224": ViTConfig(embed_dim=384, depth=12, num_heads=6),
    "vit_small_patch32_224": ViTConfig(patch_size=32, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16_224": ViTConfig(embed_dim=768, depth=12, num_heads=12),
    "vit_base_patch32_224": ViTConfig(patch_size=32, embed_dim=768, depth=12, num_heads=12),
    "vit_base_patch16_384": ViTConfig(img_size=384, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16_224": ViTConfig(embed_dim=1024, depth=24, num_heads=16),
    "vit_large_patch32_224": ViTConfig(patch_size=32, embed_dim=1024, depth=24, num_heads=16, num_classes=0),
    "vit_huge_patch14_224": ViTConfig(patch_size=14, embed_dim=1280, depth=32, num_heads=16, num_classes=0),  # D=80
}


def _pair(x) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else (int(x[0]), int(x[1]))


def _grid(name: str, value) -> tuple[int, int]:
    """A patch grid given as an int or an (h, w) pair of ints, both positive: TypeError / ValueError naming it."""
    if _is_int(value):
        grid = (int(value), int(value))
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_int(v) for v in value):
        grid = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{name} must be an int or a pair of ints (h, w), got {value!r}")
    if min(grid) < 1:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return grid


# ----------------------------------------------------------------------------------------------------
# what a fused forward bypasses: submodules recorded when it was built, compared at each call
# ----------------------------------------------------------------------------------------------------
_GLOBAL_HOOKS = (
    nn.modules.module._global_forward_hooks, nn.modules.module._global_forward_pre_hooks,
    nn.modules.module._global_backward_hooks, nn.modules.module._global_backward_pre_hooks,
)  # fmt: skip


def submodule_record(m: nn.Module) -> tuple[tuple[nn.Module, str, nn.Module], ...]:
    """(parent, name, child) of every submodule below m, for `bypassed` to compare with later."""
    return tuple((parent, name, child) for parent in m.modules() for name, child in parent._modules.items()
                 if child is not None)  # fmt: skip


def bypassed(record: tuple[tuple[nn.Module, str, nn.Module], ...]) -> bool:
    """Whether a forward that reads the recorded submodules' weights directly (the fused ops) would skip what those
    submodules do now: a hook on one (a feature-grabbing hook, torch.nn.utils.prune's pre-hook) or a global hook, or
    one replaced since it was recorded (an adapter such as a LoRA layer in place of qkv or fc1). A flat walk, a few
    lookups per submodule."""
    if any(_GLOBAL_HOOKS):
        return True
    for parent, name, child in record:
        if parent._modules.get(name) is not child:
            return True
        if child._forward_hooks or child._forward_pre_hooks or child._backward_hooks or child._backward_pre_hooks:
            return True
    return False


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _checked_config(cfg: ViTConfig, backend: str) -> ViTConfig:
    """`cfg` with img_size as an int or a pair of ints, once every field and `backend` can build a model: otherwise
    TypeError or ValueError naming the first bad one. Unchecked, a zero size was a ZeroDivisionError, a negative one
    a smaller model or a torch error deep in a layer, and a bad backend failed only at the first forward."""
    sides = _grid("img_size", cfg.img_size)  # a 3-sequence used to be cut to its first two entries
    img_size = sides[0] if _is_int(cfg.img_size) else sides
    # depth 0 is a model of the embeddings and the final norm, as in timm and Hugging Face.
    least = {"patch_size": 1, "in_chans": 1, "embed_dim": 1, "num_heads": 1, "depth": 0, "num_classes": 0}
    if cfg.mlp_hidden_dim is not None:
        least["mlp_hidden_dim"] = 1
    ints = {}
    for name, at_least in least.items():
        value = getattr(cfg, name)
        if not _is_int(value):
            raise TypeError(f"{name} must be an int, got {value!r}")
        if value < at_least:
            raise ValueError(f"{name} must be >= {at_least}, got {value}")
        ints[name] = int(value)  # numpy ints too: the ops take Python ints
    reals = {}
    for name in ("mlp_ratio", "norm_eps", "drop_rate", "drop_path_rate"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):  # drop_rate=True was Dropout(p=True)
            raise TypeError(f"{name} must be a real number, got {value!r}")
        reals[name] = float(value)
    cfg = replace(cfg, **ints, **reals)
    if sides[0] % cfg.patch_size or sides[1] % cfg.patch_size:
        raise ValueError(f"img_size {cfg.img_size} must be a multiple of patch_size {cfg.patch_size}")
    if cfg.embed_dim % cfg.num_heads:
        raise ValueError(f"embed_dim={cfg.embed_dim} must be divisible by num_heads={cfg.num_heads}")
    if not 0 < cfg.mlp_ratio < math.inf:  # NaN fails too
        raise ValueError(f"mlp_ratio must be a positive number, got {cfg.mlp_ratio}")
    if cfg.hidden_dim < 1:
        raise ValueError(f"mlp_ratio={cfg.mlp_ratio} gives an MLP of int(embed_dim * mlp_ratio) = 0 units")
    if not 0 < cfg.norm_eps < math.inf:
        raise ValueError(f"norm_eps must be a positive number, got {cfg.norm_eps}")
    if cfg.gelu_approximate not in ("none", "tanh"):
        raise ValueError(f"gelu_approximate must be 'none' or 'tanh', got {cfg.gelu_approximate!r}")
    for name in ("drop_rate", "drop_path_rate"):
        rate = getattr(cfg, name)
        if not 0 <= rate <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {rate}")
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"backend must be one of {('auto', *BACKENDS)}, got {backend!r}")
    return replace(cfg, img_size=img_size, qkv_bias=bool(cfg.qkv_bias))


# ----------------------------------------------------------------------------------------------------
# position embedding resampling
# ----------------------------------------------------------------------------------------------------


def resize_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: int | tuple[int, int],
    old_grid: int | tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
) -> torch.Tensor:
    """Resample a learned position embedding (1, prefix + gh * gw, C) to another patch grid.

    The prefix (class) token embeddings are kept as they are; the grid part is resampled bicubically
    (with antialiasing when shrinking, as timm does), in fp32, and returned in `pos_embed`'s dtype.
    `old_grid` defaults to the square grid that the token count implies.
    """
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must have shape (1, prefix + gh * gw, C), got {tuple(pos_embed.shape)}")
    new_grid = _grid("new_grid", new_grid)
    if not _is_int(num_prefix_tokens) or not 0 <= num_prefix_tokens < pos_embed.shape[1]:
        raise ValueError(
            f"num_prefix_tokens must be an int in [0, {pos_embed.shape[1]}) for pos_embed of shape "
            f"{tuple(pos_embed.shape)} (at least one grid token), got {num_prefix_tokens!r}"
        )
    n_grid = pos_embed.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = math.isqrt(n_grid)
        if side * side != n_grid:
            raise ValueError(
                f"pos_embed has {n_grid} grid tokens (after {num_prefix_tokens} prefix tokens), not a square; "
                "pass old_grid=(gh, gw)"
            )
        old_grid = (side, side)
    old_grid = _grid("old_grid", old_grid)
    if old_grid[0] * old_grid[1] != n_grid:
        raise ValueError(f"old_grid {old_grid} does not hold the {n_grid} grid tokens of pos_embed")
    if old_grid == new_grid:
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    C = pos_embed.shape[-1]
    grid = grid.float().reshape(1, *old_grid, C).permute(0, 3, 1, 2)  # (1, C, gh, gw)
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False, antialias=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], C).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


# ----------------------------------------------------------------------------------------------------
# modules
# ----------------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """(B, in_chans, H, W) -> (B, gh * gw, C) by a stride-p convolution (timm's `patch_embed.proj`)."""

    def __init__(self, img_size, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size = _pair(img_size)
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight
        if x.dim() != 4 or x.shape[1] != self.proj.in_channels or tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(
                f"images must have shape (B, {self.proj.in_channels}, {self.img_size[0]}, {self.img_size[1]}), "
                f"got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"images must be floating point (the model is {weight.dtype}), got {x.dtype}")
        if x.device != weight.device:
            raise ValueError(f"images are on {x.device} but the model is on {weight.device}")
        autocast = x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type)
        if x.dtype != weight.dtype and not autocast:  # under autocast the convolution casts both
            raise TypeError(f"images must be {weight.dtype}, the model's dtype, got {x.dtype}")
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, gh * gw, C)


class Attention(nn.Module):
    """Multi-head self-attention: vk.fused_qkv -> vk.attention -> proj. (B, N, C) -> (B, N, C)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, backend: str):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self._submodules = submodule_record(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        if bypassed(self._submodules):  # qkv hooked or replaced: call it, then split the heads
            qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = vk.fused_qkv(x, self.qkv.weight, self.qkv.bias, self.num_heads, backend=self.backend)
        out = vk.attention(q, k, v, backend=self.backend)  # (B, H, N, D), memory (B, N, H, D) on kernel backends
        return self.proj(out.transpose(1, 2).reshape(B, N, C))

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        """The attention probabilities (B, H, N, N) of input x (B, N, C), formed by the reference path.

        The fused kernels never materialise them; this is for inspection (`attention_maps`), not training.
        """
        q, k, _ = vk.fused_qkv(x, self.qkv.weight, self.qkv.bias, self.num_heads, backend="reference")
        return attention_probs(q, k)


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 as one vk.gelu_mlp call; fc1/fc2 are nn.Linear to hold timm-named weights, and are called
    as modules only where something was added to them (`bypassed`)."""

    def __init__(self, dim: int, hidden_dim: int, approximate: str, backend: str):
        super().__init__()
        self.approximate = approximate
        self.backend = backend
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self._submodules = submodule_record(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bypassed(self._submodules):  # fc1 or fc2 hooked, pruned or replaced: call them
            return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))
        return vk.gelu_mlp(
            x,
            self.fc1.weight,
            self.fc1.bias,
            self.fc2.weight,
            self.fc2.bias,
            approximate=self.approximate,
            backend=self.backend,
        )


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a sample's residual branch with probability p (kept ones rescaled by
    1 / (1 - p)); p = 1 zeroes every sample's branch."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"DropPath p must be in [0, 1], got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep_prob = 1.0 - self.p
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep_prob)
        # p = 1 drops every sample, as in timm: rescaling by 1 / 0 would turn its zeros into NaN.
        return x * keep / keep_prob if keep_prob > 0.0 else x * keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, cfg: ViTConfig, drop_path: float, backend: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg.embed_dim, cfg.num_heads, cfg.qkv_bias, backend)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.mlp = Mlp(cfg.embed_dim, cfg.hidden_dim, cfg.gelu_approximate, backend)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self._submodules = submodule_record(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, C) -> (B, N, C)
        # Stochastic depth scales a branch before its residual add, which the fused epilogues cannot do; the fused
        # ops also skip the norms', attention's and MLP's modules, so a hook on one or one replaced runs unfused.
        dropping = self.training and isinstance(self.drop_path1, DropPath)
        if (
            not dropping
            and self.attn.backend == self.mlp.backend
            and pre_ln_block.fuses_block(self.attn.backend, x)
            and not bypassed(self._submodules)
        ):
            return self._fused_forward(x)
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        attn, mlp = self.attn, self.mlp
        return fused_block_forward(
            x, self.norm1, attn.qkv.weight, attn.qkv.bias, attn.num_heads, None, attn.proj, self.norm2, mlp.fc1,
            mlp.fc2, mlp.approximate, attn.backend,
        )  # fmt: skip


def fused_block_forward(
    x: torch.Tensor,
    norm1: nn.LayerNorm,
    qkv_weight: torch.Tensor,
    qkv_bias: torch.Tensor | None,
    num_heads: int,
    scale: float | None,
    proj: nn.Linear,
    norm2: nn.LayerNorm,
    fc1: nn.Linear,
    fc2: nn.Linear,
    approximate: str,
    backend: str,
) -> torch.Tensor:
    """A pre-LN block, x + proj(attention(qkv(norm1(x)))) then x + fc2(GELU(fc1(norm2(x)))), with LayerNorm inside
    the qkv / fc1 GEMMs and the residual adds inside proj / fc2 (vit_kernels.ops.pre_ln_block); Block and the
    blocks that patch_timm / patch_hf fuse all run this. scale None is head_dim ** -0.5."""
    B, N, C = x.shape
    q, k, v = vk.ln_fused_qkv(x, norm1.weight, norm1.bias, norm1.eps, qkv_weight, qkv_bias, num_heads, backend=backend)
    o = vk.attention(q, k, v, scale=scale, backend=backend).transpose(1, 2).reshape(B, N, C)  # free on kernel backends
    x = vk.proj_residual(o, proj.weight, proj.bias, x, backend=backend)
    return vk.ln_gelu_mlp(x, norm2.weight, norm2.bias, norm2.eps, fc1.weight, fc1.bias, fc2.weight, fc2.bias,
                          approximate=approximate, backend=backend)  # fmt: skip


class VisionTransformer(nn.Module):
    """ViT with a class token, learned position embedding, pre-LN blocks, final LayerNorm and a linear head.

    images (B, in_chans, H, W) -> logits (B, num_classes), or the normed CLS features (B, C) if num_classes == 0.
    `backend` ("auto" | "triton" | "cuda" | "torch" | "reference") goes to every fused op; see vit_kernels.
    Arguments that cannot build a working model are a TypeError or ValueError naming them, raised here.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        backend: str = "auto",
        *,
        mlp_hidden_dim: int | None = None,
        norm_eps: float = 1e-6,
        gelu_approximate: str = "none",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        cfg = _checked_config(
            ViTConfig(
                img_size=img_size,
                patch_size=patch_size,
                in_chans=in_chans,
                num_classes=num_classes,
                embed_dim=embed_dim,
                depth=depth,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                mlp_hidden_dim=mlp_hidden_dim,
                qkv_bias=qkv_bias,
                norm_eps=norm_eps,
                gelu_approximate=gelu_approximate,
                drop_rate=drop_rate,
                drop_path_rate=drop_path_rate,
            ),
            backend,
        )
        self.config = cfg
        self._backend = backend
        C, depth = cfg.embed_dim, cfg.depth  # from the checked config: numpy ints became ints there

        # Registration order gives timm's state_dict order: own parameters first, then submodules.
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.num_patches, C))
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, C)
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        dpr = [cfg.drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.Sequential(*[Block(cfg, dpr[i], backend) for i in range(depth)])
        self.norm = nn.LayerNorm(C, eps=cfg.norm_eps)
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(C, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.reset_parameters()

    @property
    def backend(self) -> str:
        """The backend of every fused op. Setting it checks the name and switches every block's attention and MLP
        (each holds its own, which is what runs)."""
        return self._backend

    @backend.setter
    def backend(self, backend: str) -> None:
        if backend not in ("auto", *BACKENDS):
            raise ValueError(f"backend must be one of {('auto', *BACKENDS)}, got {backend!r}")
        self._backend = backend
        for m in self.modules():
            if isinstance(m, (Attention, Mlp)):
                m.backend = backend

    @classmethod
    def from_config(cls, cfg: ViTConfig, backend: str = "auto") -> VisionTransformer:
        return cls(backend=backend, **asdict(cfg))

    def reset_parameters(self) -> None:
        """timm's default init: truncated normal (std 0.02, cut at 2 std) for linears, class token and
        position embedding; zero biases; unit LayerNorms; PyTorch's default for the patch convolution."""
        std = 0.02
        nn.init.trunc_normal_(self.pos_embed, std=std, a=-2 * std, b=2 * std)
        nn.init.trunc_normal_(self.cls_token, std=std, a=-2 * std, b=2 * std)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                m.reset_parameters()

    # -- forward ---------------------------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, in_chans, H, W) -> tokens (B, 1 + gh * gw, C), class token first, position embedded."""
        x = self.patch_embed(images)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return self.pos_drop(torch.cat([cls, x], dim=1) + self.pos_embed)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """images -> final-normed tokens (B, 1 + gh * gw, C)."""
        return self.norm(self.blocks(self.embed(images)))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """tokens (B, N, C) -> logits (B, num_classes) from the class token."""
        return self.head(self.head_drop(x[:, 0]))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))

    # -- inspection --------------------------------------------------------------------------------------
    @torch.no_grad()
    def attention_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The attention probabilities of every block: a list of `depth` tensors (B, H, N, N), rows sum to 1.

        The fused kernels never form these, so each block's probabilities come from the reference
        path (`Attention.probs`) while the residual stream runs the model's own backend. Combine
        them with `attention_rollout`. The model runs in its own mode: call `.eval()` first for maps that do not
        change with dropout and stochastic depth.
        """
        x = self.embed(images)
        maps = []
        for blk in self.blocks:
            maps.append(blk.attn.probs(blk.norm1(x)).float())
            x = blk(x)
        return maps

    # -- loading -----------------------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint from another image size: resample its grid of position embeddings to ours.
        key = prefix + "pos_embed"
        if key in state_dict and state_dict[key].shape != self.pos_embed.shape:
            src = state_dict[key]
            if src.dim() == 3 and src.shape[0] == 1 and src.shape[-1] == self.pos_embed.shape[-1]:
                self._check_resamplable(src, key, state_dict, prefix)
                state_dict[key] = resize_pos_embed(src, self.config.grid_size)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _check_resamplable(self, src: torch.Tensor, key: str, state_dict, prefix: str) -> None:
        """ValueError unless `src` (1, N, C) is 1 class token + a square grid, the only layout the token count
        alone can resample. Raised here, since torch's size mismatch would not say why nor what to do instead."""
        own = dict(self.named_parameters(recurse=False)) | dict(self.named_buffers(recurse=False))
        names = [k[len(prefix) :] for k in state_dict if k.startswith(prefix)]
        # Top-level (1, k, C) tokens we lack (timm's reg_token, DeiT's dist_token) are prefix tokens inside pos_embed
        # too; an MAE checkpoint's mask_token (and decoder_pos_embed) are not.
        C = self.pos_embed.shape[-1]
        extra = sorted(
            n for n in names
            if "." not in n and n not in own and n.endswith("_token") and n != "mask_token"
            and state_dict[prefix + n].dim() == 3 and state_dict[prefix + n].shape[-1] == C
        )  # fmt: skip
        n_grid = src.shape[1] - 1
        if not extra and n_grid > 0 and math.isqrt(n_grid) ** 2 == n_grid:
            return
        gh, gw = self.config.grid_size
        raise ValueError(
            f"{key} in the checkpoint is {tuple(src.shape)}: not 1 class token + a square grid of patches ({n_grid} "
            f"tokens remain), so the token count alone cannot resample it to this model's 1 + {gh} x {gw} tokens. "
            "Checkpoints with more prefix tokens (register or distillation tokens"
            + (f"; this one has {', '.join(extra)})" if extra else ")")
            + " or timm's no_embed_class do not fit this model's layout. For one trained on a non-square grid "
            f"(h, w), resample it before loading: state_dict[{key!r}] = "
            f"vit.resize_pos_embed(state_dict[{key!r}], ({gh}, {gw}), old_grid=(h, w))"
        )


# ----------------------------------------------------------------------------------------------------
# attention probabilities and rollout (inspection only)
# ----------------------------------------------------------------------------------------------------


def attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q @ k^T * scale) over the last dim, computed in fp32: q, k (B, H, N, D) -> (B, H, N, N).

    The first half of `vit_kernels.reference.attention`, which does not return its probabilities.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return (q.float() @ k.float().transpose(-2, -1) * scale).softmax(dim=-1)


def attention_rollout(maps: list[torch.Tensor], residual: bool = True, head_fusion: str = "mean") -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020): how much each output token draws on each input token.

    maps: per-layer (B, H, N, N) probabilities, first layer first. Heads are fused by mean (or max),
    the residual connection is modelled as 0.5 * (A + I) with rows renormalised, and the layers are
    multiplied: R = A_L @ ... @ A_1. Returns R (B, N, N); `R[:, 0, 1:]` is the CLS token's map over patches.
    """
    if not maps:
        raise ValueError("maps must hold at least one (B, H, N, N) tensor")
    if head_fusion not in ("mean", "max"):
        raise ValueError(f"head_fusion must be 'mean' or 'max', got {head_fusion!r}")
    first = maps[0]
    for i, a in enumerate(maps):  # head-fused (B, N, N) maps with B == N were averaged over queries, silently
        if a.dim() != 4 or a.shape[-1] != a.shape[-2] or (a.shape[0], a.shape[-1]) != (first.shape[0], first.shape[-1]):
            raise ValueError(
                f"maps[{i}] must be (B, H, N, N) probabilities, all of one B and N, got {tuple(a.shape)} "
                f"(maps[0]: {tuple(first.shape)})"
            )
    rollout = None
    for a in maps:
        a = a.float()
        a = a.mean(dim=1) if head_fusion == "mean" else a.amax(dim=1)  # (B, N, N)
        if residual:
            a = 0.5 * a + 0.5 * torch.eye(a.shape[-1], device=a.device)
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    return rollout


# ----------------------------------------------------------------------------------------------------
# factories (timm's names)
# ----------------------------------------------------------------------------------------------------


def create_model(name: str, backend: str = "auto", **overrides) -> VisionTransformer:
    """A preset by name, with any config field overridden (e.g. num_classes=10, img_size=384)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; presets: {sorted(PRESETS)}")
    return VisionTransformer.from_config(replace(PRESETS[name], **overrides), backend=backend)


def vit_tiny_patch16_224(backend: str = "auto", **overrides) -> VisionTransformer:
    return create_model("vit_tiny_patch16_224", backend, **overrides)


def vit_small_patch16_224(backend: str = "auto", **overrides) -> VisionTransformer:
    return create_model("vit_small_patch16_224", backend, **overrides)


def vit_small_patch32_224(backend: str = "auto", **overrides) -> VisionTransformer:
    return create_model("vit_small_patch32_224", backend, **overrides)


def vit_base_patch16_224(backend: str = "auto", **overrides) -> VisionTransformer:
    return create_model("vit_base_patch16_224", backend, **overrides)


def vit_base_patch32_224(backend: str = "auto", **overrides) -> VisionTransformer:
    return create_model("vit_base_patch32_224", backend, **overrides)


def vit_base_patch16_384(backend: str = "auto", **overrides) -> VisionTransformer:
    return create_model("vit_base_patch16_384", backend, **overrides)


def vit_large_patch16_224(backend: str = "auto", **overrides) -> VisionTransformer:
    return create_model("vit_large_patch16_224", backend, **overrides)


def vit_large_patch32_224(backend: str = "auto", **overrides) -> VisionTransformer:
    return create_model("vit_large_patch32_224", backend, **overrides)


def vit_huge_patch14_224(backend: str = "auto", **overrides) -> VisionTransformer:
    return create_model("vit_huge_patch14_224", backend, **overrides)
