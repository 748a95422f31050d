"""The ops, one module each: the public function, its input checks, its backend choice and its kernel op (the
custom ops and autograd of vit_kernels/kernel_op.py), with the backend kernel modules (vit_kernels/triton/,
vit_kernels/cuda/) below it.

    attention.py      vk.attention
    fused_qkv.py      vk.fused_qkv
    gelu_mlp.py       vk.gelu_mlp
    ln_fused_qkv.py   vk.ln_fused_qkv    \\
    proj_residual.py  vk.proj_residual    > the whole-block ops; what they share is pre_ln_block.py
    ln_gelu_mlp.py    vk.ln_gelu_mlp     /
"""
