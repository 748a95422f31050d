"""Draw where a ViT's class token looks: per-layer CLS attention and attention rollout over an image.

    python -m vit.visualize IMAGE --out maps.png [--model vit_tiny_patch16_224] [--checkpoint ckpt.pt]
                            [--random-model] [--layers 0 5 11] [--img-size 384]

IMAGE is anything matplotlib.image.imread reads (PNG natively; JPEG etc. through Pillow). The image is
resized to the model's input size and normalised with ImageNet's mean and std. The checkpoint is a
state dict in timm layout (a timm checkpoint, or one saved from `vit`); `--random-model` draws an
untrained model's maps instead, so the tool runs without any checkpoint. Attention probabilities come
from `VisionTransformer.attention_maps` (the reference path: the fused kernels never form them).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from vit.model import PRESETS, VisionTransformer, attention_rollout, create_model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_image(path: str, size: tuple[int, int], in_chans: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(model input (1, in_chans, H, W) normalised, display image (H, W, 3) in [0, 1])."""
    import matplotlib.image as mpimg

    img = torch.as_tensor(mpimg.imread(path)).float()
    if img.max() > 1.0:  # 8-bit formats come back as 0..255
        img = img / 255.0
    if img.dim() == 2:
        img = img[..., None].expand(-1, -1, 3)
    img = img[..., :3]  # drop alpha
    img = F.interpolate(img.permute(2, 0, 1)[None], size=size, mode="bilinear", align_corners=False, antialias=True)
    display = img[0].permute(1, 2, 0).clamp(0, 1)
    if in_chans == 1:
        return (img.mean(1, keepdim=True) - 0.5) / 0.5, display
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (img - mean) / std, display


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
    p.add_argument("--out", default="maps.png")
    p.add_argument("--model", default="vit_tiny_patch16_224", choices=sorted(PRESETS))
    p.add_argument("--checkpoint", help="state dict in timm layout (torch.save'd)")
    p.add_argument("--random-model", action="store_true", help="no checkpoint: an untrained, seeded model")
    p.add_argument("--img-size", type=int, default=None, help="input size (default: the preset's; pos_embed resampled)")
    p.add_argument("--num-classes", type=int, default=None, help="head size of the checkpoint (default: inferred)")
    p.add_argument("--layers", type=int, nargs="*", default=None, help="block indices (default: first, middle, last)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if (a.checkpoint is None) == (not a.random_model):
        p.error("give exactly one of --checkpoint PATH or --random-model")

    state = None
    overrides = {}
    if a.checkpoint:
        state = torch.load(a.checkpoint, map_location="cpu", weights_only=True)
        state = state.get("model", state.get("state_dict", state))
        if a.num_classes is not None:
            overrides["num_classes"] = a.num_classes
        else:
            overrides["num_classes"] = state["head.weight"].shape[0] if "head.weight" in state else 0
    if a.img_size is not None:
        overrides["img_size"] = a.img_size
    torch.manual_seed(a.seed)
    model = create_model(a.model, backend="auto", **overrides).eval()
    if state is not None:
        model.load_state_dict(state, strict=True)
    depth = model.config.depth
    layers = a.layers if a.layers is not None else sorted({0, depth // 2, depth - 1})
    bad = [i for i in layers if not 0 <= i < depth]
    if bad:
        p.error(f"--layers {bad} out of range for a model of depth {depth}")
    images, display = load_image(a.image, model.patch_embed.img_size, model.config.in_chans)
    maps = cls_maps(model, images, layers)
    source = "random weights" if a.random_model else a.checkpoint
    draw(display, maps, a.out, title=f"{a.model} ({source}): CLS attention, heads averaged")
    print(f"wrote {a.out}: layers {layers} and rollout")
    return maps


if __name__ == "__main__":
    main()
