"""A single-scale baseline: ViT-style patchify, then plain global attention at one coarse scale.

The blocks are the pyramid's (SRA at ratio 1 is plain multi-head attention, "plain" is the
transformer MLP), so an ablation against it changes only what it means to change: one scale
of tokens instead of four, and no multi-scale keys. Names follow the pyramid's first stage
(patch_embed1, block1, norm1, head) so that summaries and MAC counts read the same.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from shunted_jax.models.layers import BLOCK_NORM_EPS, conv, dense_kernel_init, layer_norm
from shunted_jax.models.pyramid import scanned_blocks

Dtype = Any


class VisionTransformer(nn.Module):
    """patch_size x patch_size patchify conv + learned position embedding, `depth` pre-norm
    blocks, LayerNorm, token mean-pool, linear classifier. NHWC images in, logits out.

    The position embedding is sized by the grid of the images it is initialised with; other
    image sizes are refused rather than silently interpolated.
    """

    num_classes: int = 1000
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4
    patch_size: int = 16
    attention: str = "sra"  # "sra" at ratio 1 is plain attention; "ssa" adds the local enhancement of V
    ffn: str = "plain"
    drop_path_rate: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernels: str = "auto"  # how each operation runs: `shunted_jax.kernels.dispatch`
    scan_unroll: int = 1

    def stage_grids(self, height: int, width: int):
        return [(height // self.patch_size, width // self.patch_size)]

    def min_input_size(self) -> int:
        return self.patch_size

    @nn.compact
    def __call__(self, images, train: bool = False):
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"Expected NHWC images with 3 channels, got shape {images.shape}.")
        if min(images.shape[1:3]) < self.patch_size:
            raise ValueError(f"Input {images.shape[1]}x{images.shape[2]} is smaller than one "
                             f"{self.patch_size}x{self.patch_size} patch; use larger images or a smaller patch_size.")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = conv(self.embed_dim, self.patch_size, stride=self.patch_size, name="patch_embed1", **kw)(
            images.astype(self.dtype))
        grid = x.shape[1:3]
        if self.has_variable("params", "pos_embed"):
            built = self.get_variable("params", "pos_embed").shape[1:3]
            if built != grid:
                raise ValueError(f"This model's position embedding covers a {built[0]}x{built[1]} patch grid, "
                                 f"the images give {grid[0]}x{grid[1]}: use the image size it was built for.")
        pos_embed = self.param("pos_embed", nn.initializers.normal(0.02), (1, *grid, self.embed_dim),
                               self.param_dtype)
        x = x + pos_embed.astype(self.dtype)
        drop_rates = jnp.asarray(np.linspace(0.0, self.drop_path_rate, self.depth), jnp.float32)
        blocks = scanned_blocks(self.depth, self.scan_unroll, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                                attention=self.attention, rates=(1,), ffn=self.ffn, deterministic=not train,
                                kernels=self.kernels, name="block1", **kw)
        x, _ = blocks(x, drop_rates)
        x = layer_norm(BLOCK_NORM_EPS, name="norm1", kernels=self.kernels, **kw)(x)
        head = nn.Dense(self.num_classes, kernel_init=dense_kernel_init, name="head", **kw)
        return head(jnp.mean(x, axis=(1, 2)))


VARIANTS = {
    "vit_ti16": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_s16": dict(embed_dim=384, depth=12, num_heads=6),
}
