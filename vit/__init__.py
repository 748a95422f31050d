"""A Vision Transformer on the fused ops of `vit_kernels`, with timm's parameter names.

    import vit
    model = vit.vit_base_patch16_224(backend="auto")        # timm checkpoints load with load_state_dict
    model = vit.from_hf(hf_model.state_dict(), hf_model.config)
    vit.patch_timm(timm_model); vit.patch_hf(hf_model)     # existing models onto the fused ops, in place

Modules: `model` (config, presets, modules), `convert` (Hugging Face / timm), `visualize`
(`python -m vit.visualize`), `train` (`python -m vit.train --data digits`).
"""

from vit.convert import from_hf, patch_hf, patch_timm
from vit.model import (
    PRESETS,
    VisionTransformer,
    ViTConfig,
    attention_probs,
    attention_rollout,
    create_model,
    resize_pos_embed,
    vit_base_patch16_224,
    vit_base_patch16_384,
    vit_base_patch32_224,
    vit_huge_patch14_224,
    vit_large_patch16_224,
    vit_large_patch32_224,
    vit_small_patch16_224,
    vit_small_patch32_224,
    vit_tiny_patch16_224,
)

__all__ = [
    "PRESETS",
    "ViTConfig",
    "VisionTransformer",
    "attention_probs",
    "attention_rollout",
    "create_model",
    "from_hf",
    "patch_hf",
    "patch_timm",
    "resize_pos_embed",
    "vit_base_patch16_224",
    "vit_base_patch16_384",
    "vit_base_patch32_224",
    "vit_huge_patch14_224",
    "vit_large_patch16_224",
    "vit_large_patch32_224",
    "vit_small_patch16_224",
    "vit_small_patch32_224",
    "vit_tiny_patch16_224",
]
