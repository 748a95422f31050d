"""Draw where a ViT's class token looks: per-layer CLS attention and attention rollout over an image.

    python -m vit.visualize IMAGE --out maps.png [--model vit_tiny_patch16_224] [--checkpoint ckpt.pt]
                            [--random-model] [--layers 0 5 11] [--img-size 384]

IMAGE is anything Pillow reads (PNG, JPEG, TIFF, ...). Its samples are scaled to [0, 1] by their type, never
by their values: 8-bit / 255, 16-bit / 65535, float kept (it must lie in [0, 1]). The image is resized to the
model's input size and normalised with ImageNet's mean and std. The checkpoint is a
state dict in timm layout (a timm checkpoint, or one saved from `vit`); `--random-model` draws an
untrained model's maps instead, so the tool runs without any checkpoint. Attention probabilities come
from `VisionTransformer.attention_maps` (the reference path: the fused kernels never form them).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from vit.model import PRESETS, VisionTransformer, attention_rollout, create_model, resize_pos_embed

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# Pillow modes holding more than 8 bits per sample. A 16-bit grayscale PNG opens as "I;16" or, in older Pillow,
# as 32-bit "I": both are 16-bit data (full scale 65535). 16-bit RGB(A) PNGs open as 8-bit "RGB(A)".
_WIDE_MODES = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0, "I": 65535.0, "F": 1.0}


def read_image(path: str) -> torch.Tensor:
    """(H, W, 3) float32 in [0, 1], scaled by the file's sample type: 8-bit / 255, 16-bit / 65535, float kept.

    Scaling by the values instead (divide when the max is > 1) read an all-1 8-bit image as white and left
    16-bit images in 0..257. Alpha is dropped. OSError if the file cannot be opened as an image (Pillow's
    UnidentifiedImageError is one), ValueError if its samples fall outside the range their type implies.
    """
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        if im.mode in _WIDE_MODES:
            full_scale = _WIDE_MODES[im.mode]
            arr = np.asarray(im).astype(np.float32)  # also native byte order (I;16B is big-endian)
        else:  # 1-, 2-, 4- and 8-bit modes (L, P, RGB, RGBA, CMYK, ...) all convert to 8-bit RGBA
            full_scale = 255.0
            arr = np.asarray(im.convert("RGBA"))[..., :3].astype(np.float32)
        mode = im.mode
    img = torch.from_numpy(arr) / full_scale
    lo, hi = (img.min().item(), img.max().item()) if img.numel() else (0.0, 0.0)
    if not (0.0 <= lo and hi <= 1.0):  # also catches NaN
        raise ValueError(
            f"image {path!r} (mode {mode!r}) has values in [{lo * full_scale:g}, {hi * full_scale:g}], outside "
            f"[0, {full_scale:g}], the range its sample type implies"
        )
    if img.dim() == 2:
        img = img[..., None].expand(-1, -1, 3)
    return img


def load_image(path: str, size: tuple[int, int], in_chans: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(model input (1, in_chans, H, W) normalised, display image (H, W, 3) in [0, 1])."""
    return to_model_input(read_image(path), size, in_chans)


def to_model_input(img: torch.Tensor, size: tuple[int, int], in_chans: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """`read_image`'s (H, W, 3) in [0, 1] -> (model input (1, in_chans, *size) normalised, display (*size, 3))."""
    img = F.interpolate(img.permute(2, 0, 1)[None], size=size, mode="bilinear", align_corners=False, antialias=True)
    display = img[0].permute(1, 2, 0).clamp(0, 1)
    if in_chans == 1:
        return (img.mean(1, keepdim=True) - 0.5) / 0.5, display
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (img - mean) / std, display


def load_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """The state dict in `path` (bare, or under "model" / "state_dict"); ValueError saying why if it is not one."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError("no such file") from None
    except Exception as e:  # torch.load raises many types on a non-checkpoint (UnpicklingError, EOFError, ...)
        # The weights-only unpickler's own reason comes after torch's long preamble about weights_only=False.
        text = str(e).split("WeightsUnpickler error:")[-1]
        detail = next((line.strip() for line in text.splitlines() if line.strip()), type(e).__name__)
        raise ValueError(
            f"torch.load(weights_only=True) cannot read it: not a torch.save'd file, or it holds objects other "
            f"than tensors ({detail})"
        ) from None
    if isinstance(state, dict):
        state = state.get("model", state.get("state_dict", state))
    if not (
        isinstance(state, dict)
        and state
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
    ):
        got = type(state).__name__
        if isinstance(state, dict):
            got = f"a dict of {sorted({type(v).__name__ for v in state.values()}) or 'nothing'}"
        raise ValueError(f"not a state dict (a dict of parameter name -> tensor): got {got}")
    return state


def state_dict_mismatch(model: VisionTransformer, state: dict[str, torch.Tensor]) -> str:
    """'' if `state` loads into `model` strictly, else a short description of the first differences.

    A pos_embed of another patch grid is no difference when the model's loader resamples it (a checkpoint trained
    at another image size, then run at --img-size); one that cannot be resampled is.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape and not (k == "pos_embed" and _resamples_to(state[k], model))
    ]
    parts = [
        f"{what} ({len(keys)}): {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}"
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape (checkpoint vs model)", shapes))
        if keys
    ]
    return "; ".join(parts)


def _resamples_to(pos_embed: torch.Tensor, model: VisionTransformer) -> bool:
    """Whether `model.load_state_dict` turns this checkpoint pos_embed into the model's by `resize_pos_embed`."""
    try:
        resized = resize_pos_embed(pos_embed, model.config.grid_size)
    except ValueError:  # not (1, 1 + gh * gw, C) with a square grid: the loader refuses it too
        return False
    return resized.shape == model.pos_embed.shape


def cls_maps(model: VisionTransformer, images: torch.Tensor, layers: list[int]) -> dict[str, torch.Tensor]:
    """{title: (gh, gw) map of the CLS token's attention over the patches} for image 0, heads averaged."""
    gh, gw = model.config.grid_size
    maps = model.attention_maps(images)
    out = {f"layer {i}": maps[i][0, :, 0, 1:].mean(0).reshape(gh, gw) for i in layers}
    out["rollout"] = attention_rollout(maps)[0, 0, 1:].reshape(gh, gw)
    return out


def draw(display: torch.Tensor, maps: dict[str, torch.Tensor], path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    H, W, _ = display.shape
    n = 1 + len(maps)
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 2.9))
    axes[0].imshow(display.numpy())
    axes[0].set_title("image")
    for ax, (name, m) in zip(axes[1:], maps.items(), strict=True):
        up = F.interpolate(m[None, None], size=(H, W), mode="bilinear", align_corners=False)[0, 0]
        up = (up - up.min()) / (up.max() - up.min()).clamp_min(1e-12)
        ax.imshow(display.numpy())
        ax.imshow(up.numpy(), cmap="inferno", alpha=0.6)
        ax.set_title(name)
    for ax in axes:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, torch.Tensor]:
    p = argparse.ArgumentParser(prog="python -m vit.visualize", description=__doc__.split("\n\n")[0])
    p.add_argument("image")
    p.add_argument("--out", default="maps.png", help="the figure to write (its folder must exist)")
    p.add_argument("--model", default="vit_tiny_patch16_224", choices=sorted(PRESETS))
    p.add_argument("--checkpoint", help="state dict in timm layout (torch.save'd)")
    p.add_argument("--random-model", action="store_true", help="no checkpoint: an untrained, seeded model")
    p.add_argument(
        "--img-size", type=_positive_int, default=None, help="input size (default: the preset's; pos_embed resampled)"
    )
    p.add_argument(
        "--num-classes", type=_non_negative_int, default=None, help="head size of the checkpoint (default: inferred)"
    )
    p.add_argument("--layers", type=int, nargs="*", default=None, help="block indices (default: first, middle, last)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if (a.checkpoint is None) == (not a.random_model):
        p.error("give exactly one of --checkpoint PATH or --random-model")
    # Every input is checked before the (slow) model and maps: a bad one used to fail only after them.
    out_dir = Path(a.out).parent
    if not out_dir.is_dir():
        p.error(f"--out {a.out}: the folder {str(out_dir)!r} does not exist")
    if Path(a.out).is_dir():
        p.error(f"--out {a.out}: is a folder; give the path of the figure to write, e.g. {a.out}/maps.png")
    try:
        image = read_image(a.image)
    except (OSError, ValueError) as e:  # missing, a folder, not an image (UnidentifiedImageError), out of range
        p.error(f"cannot read image {a.image!r}: {e}")

    state = None
    overrides = {}
    if a.checkpoint:
        try:
            state = load_checkpoint(a.checkpoint)
        except ValueError as e:
            p.error(f"--checkpoint {a.checkpoint}: {e}")
        if a.num_classes is not None:
            overrides["num_classes"] = a.num_classes
        else:
            overrides["num_classes"] = state["head.weight"].shape[0] if "head.weight" in state else 0
    if a.img_size is not None:
        overrides["img_size"] = a.img_size
    torch.manual_seed(a.seed)
    try:
        model = create_model(a.model, backend="auto", **overrides).eval()
    except ValueError as e:  # e.g. an --img-size that is not a multiple of the patch size
        p.error(f"cannot build {a.model}: {e}")
    if state is not None:
        mismatch = state_dict_mismatch(model, state)
        if mismatch:
            p.error(f"--checkpoint {a.checkpoint} does not fit --model {a.model}: {mismatch}")
        try:
            model.load_state_dict(state, strict=True)
        except (RuntimeError, ValueError) as e:  # what the pre-check cannot see (the loader's own refusals)
            p.error(f"--checkpoint {a.checkpoint} does not fit --model {a.model}: {e}")
    depth = model.config.depth
    layers = a.layers if a.layers is not None else sorted({0, depth // 2, depth - 1})
    bad = [i for i in layers if not 0 <= i < depth]
    if bad:
        p.error(f"--layers {bad} out of range for a model of depth {depth}")
    images, display = to_model_input(image, model.patch_embed.img_size, model.config.in_chans)
    maps = cls_maps(model, images, layers)
    source = "random weights" if a.random_model else a.checkpoint
    draw(display, maps, a.out, title=f"{a.model} ({source}): CLS attention, heads averaged")
    print(f"wrote {a.out}: layers {layers} and rollout")
    return maps


def _positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def _non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def _int_at_least(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < least:
        raise argparse.ArgumentTypeError(f"must be an integer >= {least}, got {text!r}")
    return value


if __name__ == "__main__":
    main()
