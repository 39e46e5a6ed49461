"""The four-stage pyramid shared by the Shunted Transformer and PVTv2.

stem / patch embed -> blocks -> LayerNorm, four times (strides 4, 8, 16, 32), then a token
mean-pool and a linear classifier. The families differ only in their fields: the stem, the
attention, the FFN and the widths; `shunted.py` and `pvt_v2.py` hold the official settings.

The blocks of a stage are one `nn.scan`, so a deep stage compiles as fast as a one-block stage;
their parameters carry a leading depth axis.
"""
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from shunted_jax.models.attention import (
    MultiScaleTokenAggregator,
    ShuntedSelfAttention,
    SpatialReductionAttention,
)
from shunted_jax.models.batch_norm import BatchNorm
from shunted_jax.models.ffn import FeedForward
from shunted_jax.models.layers import (
    BLOCK_NORM_EPS,
    TORCH_NORM_EPS,
    conv,
    conv_kernel_init,
    dense_kernel_init,
    drop_path,
    layer_norm,
    space_to_depth_conv,
)

Dtype = Any

ATTENTION_KINDS = ("ssa", "sra", "linear_sra", "aggregator")
STAGE_STRIDES = (4, 8, 16, 32)  # each stage's output, in input pixels per token
MULTI_SCALE_KINDS = ("ssa", "aggregator")  # attentions whose per-stage rates come from ssa_rates
STEM_KINDS = ("conv", "patch")


def official_ssa_rates(sr_ratio: int) -> Tuple[int, ...]:
    """The official Shunted head groups: two halves at r and r/2, or one global group at r = 1."""
    return (sr_ratio, sr_ratio // 2) if sr_ratio > 1 else (1,)


class StemConv(nn.Module):
    """A bias-free conv of the stem (nn.Conv's 'kernel', init and dtype promotion) that can take
    a BatchNorm folded in: conv(x, k) * scale + shift computed as conv(x, k * scale) + shift.
    With `space_to_depth` a stride-2 conv runs as `space_to_depth_conv`."""

    features: int
    size: int
    stride: int
    padding: int
    space_to_depth: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, scale=None, shift=None):
        kernel = self.param("kernel", conv_kernel_init(), (self.size, self.size, x.shape[-1], self.features),
                            self.param_dtype)
        if scale is not None:  # scale is in the compute dtype (`folded_batch_norm`), so is the product
            kernel = kernel * scale
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        if self.space_to_depth and self.stride == 2:
            y = space_to_depth_conv(x, kernel, self.padding)
        else:
            y = jax.lax.conv_general_dilated(x, kernel, (self.stride,) * 2, ((self.padding,) * 2,) * 2,
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y if shift is None else y + shift.astype(y.dtype)


def folded_batch_norm(bn: BatchNorm):
    """(scale, shift) with BN(y) = y * scale + shift in inference, from `bn`'s variables."""
    variables = bn.variables
    if "batch_stats" not in variables:
        raise ValueError(f"{bn.name} has no running statistics: apply the model with its 'batch_stats' collection "
                         "as well as its 'params'.")
    stats, params = variables["batch_stats"], variables["params"]
    dtype = jnp.promote_types(params["scale"].dtype, bn.dtype or jnp.float32)  # the compute dtype, as BN's own
    mean, var, gamma, beta = (a.astype(dtype) for a in (stats["mean"], stats["var"], params["scale"], params["bias"]))
    scale = gamma * jax.lax.rsqrt(var + bn.epsilon)
    return scale, beta - mean * scale


class ConvStem(nn.Module):
    """Shunted's stem ('Head'): 7x7/2 conv-BN-ReLU, `num_conv` x (3x3 conv-BN-ReLU), 2x2/2 conv,
    LayerNorm. Overall stride 4.

    In inference each BatchNorm is folded into its conv (conv, bias and ReLU are then one cuDNN
    call instead of a conv and a pass over the map), and with `space_to_depth` the 7x7/2 conv
    runs as a 4x4 conv over 2x2 pixel blocks (`space_to_depth_conv`).
    """

    features: int
    num_conv: int = 0
    space_to_depth: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        fold = not (train or self.is_initializing())
        for i in range(self.num_conv + 1):
            first = i == 0
            conv_i = StemConv(self.features, 7 if first else 3, stride=2 if first else 1, padding=3 if first else 1,
                              space_to_depth=self.space_to_depth, name=f"conv_{i}", **kw)
            bn = BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=f"bn_{i}", **kw)
            x = nn.relu(conv_i(x, *folded_batch_norm(bn)) if fold else bn(conv_i(x)))
        x = conv(self.features, 2, stride=2, name="proj", **kw)(x)
        return layer_norm(TORCH_NORM_EPS, name="norm", kernels=self.kernels, **kw)(x)


class PatchEmbed(nn.Module):
    """Overlapping patch embedding: a strided conv with symmetric padding, then LayerNorm."""

    features: int
    kernel: int = 3
    stride: int = 2
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = conv(self.features, self.kernel, stride=self.stride, padding=self.kernel // 2, name="proj", **kw)(x)
        return layer_norm(TORCH_NORM_EPS, name="norm", kernels=self.kernels, **kw)(x)


class Block(nn.Module):
    """Pre-norm residual block: x + DropPath(Attn(LN(x))), then x + DropPath(FFN(LN(x))).

    Written as a scan body: takes (map, drop-path rate) and returns (map, None).
    """

    num_heads: int
    mlp_ratio: float
    attention: str = "ssa"
    rates: Sequence[int] = (1,)
    ffn: str = "detail"
    deterministic: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x, drop_path_rate):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernels=self.kernels)
        dim = x.shape[-1]
        if self.attention in MULTI_SCALE_KINDS:
            kind = ShuntedSelfAttention if self.attention == "ssa" else MultiScaleTokenAggregator
            attn = kind(self.num_heads, tuple(self.rates), name="attn", **kw)
        else:
            attn = SpatialReductionAttention(self.num_heads, sr_ratio=self.rates[0],
                                             linear=self.attention == "linear_sra", name="attn", **kw)
        y = attn(layer_norm(BLOCK_NORM_EPS, name="norm1", **kw)(x))
        x = x + drop_path(y, drop_path_rate, self.deterministic, self)
        y = FeedForward(int(dim * self.mlp_ratio), self.ffn, name="mlp", **kw)(
            layer_norm(BLOCK_NORM_EPS, name="norm2", **kw)(x))
        x = x + drop_path(y, drop_path_rate, self.deterministic, self)
        return x, None


def scanned_blocks(depth: int, unroll: int, **block_fields) -> nn.Module:
    """`depth` Blocks as one nn.scan: params (and sown intermediates) get a leading depth axis,
    each block its own init and dropout keys. Call it with (map, per-block drop-path rates)."""
    return nn.scan(
        Block,
        variable_axes={"params": 0, "intermediates": 0},
        split_rngs={"params": True, "dropout": True},
        length=depth,
        unroll=max(1, min(unroll, depth)),
    )(**block_fields)


class PyramidVisionTransformer(nn.Module):
    """A four-stage pyramid vision transformer on NHWC images.

    `apply(variables, images, train=False)` returns logits; `method="features"` returns the
    stage outputs (strides 4, 8, 16, 32, NHWC) for dense tasks, those of `out_indices` when given;
    `feature_info()` gives their channels and strides.
    """

    num_classes: int = 1000
    embed_dims: Sequence[int] = (64, 128, 256, 512)
    depths: Sequence[int] = (1, 2, 4, 1)
    num_heads: Sequence[int] = (2, 4, 8, 16)
    mlp_ratios: Sequence[float] = (8, 8, 4, 4)
    sr_ratios: Sequence[int] = (8, 4, 2, 1)
    attention: str = "ssa"
    ssa_rates: Optional[Sequence[Sequence[int]]] = None
    ffn: str = "detail"
    stem: str = "conv"
    num_conv: int = 0
    drop_path_rate: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernels: str = "auto"  # how each operation runs: `shunted_jax.kernels.dispatch`
    scan_unroll: int = 1  # blocks per loop iteration: more compiles slower, may run faster
    stem_space_to_depth: bool = True  # the conv stem's 7x7/2 conv as a 4x4 conv over 2x2 pixel blocks

    def stage_rates(self) -> Tuple[Tuple[int, ...], ...]:
        """Per stage: the SSA group (or aggregator branch) rates, or the single SRA reduction ratio."""
        if self.attention in MULTI_SCALE_KINDS:
            if self.ssa_rates is not None:
                return tuple(tuple(r) for r in self.ssa_rates)
            return tuple(official_ssa_rates(r) for r in self.sr_ratios)
        return tuple((r,) for r in self.sr_ratios)

    def stage_grids(self, height: int, width: int):
        """The (H, W) token grid of each stage for an input image, with the official floors."""
        if self.stem == "conv":
            h, w = (-(-height // 2)) // 2, (-(-width // 2)) // 2
        else:
            h, w = -(-height // 4), -(-width // 4)
        grids = [(h, w)]
        for _ in range(3):
            h, w = -(-h // 2), -(-w // 2)
            grids.append((h, w))
        return grids

    def min_input_size(self) -> int:
        """The smallest height (or width) whose every stage grid fits its reduction convs."""
        for size in range(1, 4097):
            if self._misfit(size, size) is None:
                return size
        raise ValueError("No input size up to 4096 fits this configuration.")

    def _misfit(self, height: int, width: int):
        """(stage, grid, rate) of the first stage whose grid is smaller than a reduction conv, or None."""
        if self.attention == "linear_sra":
            return None
        for stage, (grid, rates) in enumerate(zip(self.stage_grids(height, width), self.stage_rates()), start=1):
            if min(grid) < max(rates):
                return stage, grid, max(rates)
        return None

    def feature_info(self) -> list:
        """Per stage, as timm's `feature_info`: `num_chs` (channels), `reduction` (stride in input
        pixels: the map of an H x W image is H / stride high where that divides; `stage_grids`
        gives it for any size) and `module` (the LayerNorm whose output it is)."""
        return [{"num_chs": dim, "reduction": stride, "module": f"norm{i + 1}"}
                for i, (dim, stride) in enumerate(zip(self.embed_dims, STAGE_STRIDES))]

    def _validate(self, images):
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"Unknown attention {self.attention!r}; choose one of {ATTENTION_KINDS}.")
        if self.stem not in STEM_KINDS:
            raise ValueError(f"Unknown stem {self.stem!r}; choose one of {STEM_KINDS}.")
        lengths = {len(f) for f in (self.embed_dims, self.depths, self.num_heads, self.mlp_ratios, self.sr_ratios)}
        if lengths != {4} or len(self.stage_rates()) != 4:
            raise ValueError("embed_dims, depths, num_heads, mlp_ratios, sr_ratios (and ssa_rates) need 4 entries each.")
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"Expected NHWC images with 3 channels, got shape {images.shape}.")
        height, width = images.shape[1:3]
        misfit = self._misfit(height, width)
        if misfit is not None:
            stage, grid, rate = misfit
            raise ValueError(
                f"Input {height}x{width} is too small: this model needs height and width >= "
                f"{self.min_input_size()} (the stage-{stage} grid {grid[0]}x{grid[1]} is smaller than its "
                f"{rate}x{rate} reduction conv)."
            )

    @nn.compact
    def __call__(self, images, train: bool = False, out_indices: Optional[Sequence[int]] = None):
        """Logits, or with `out_indices` the outputs of those stages (the later stages are not run)."""
        self._validate(images)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernels=self.kernels)
        drop_rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths))
        x = images.astype(self.dtype)
        features = []
        for i in range(4 if out_indices is None else max(out_indices) + 1):
            if i > 0:
                x = PatchEmbed(self.embed_dims[i], name=f"patch_embed{i + 1}", **kw)(x)
            elif self.stem == "conv":
                x = ConvStem(self.embed_dims[0], self.num_conv, self.stem_space_to_depth, name="patch_embed1",
                             **kw)(x, train)
            else:
                x = PatchEmbed(self.embed_dims[0], kernel=7, stride=4, name="patch_embed1", **kw)(x)
            start = sum(self.depths[:i])
            blocks = scanned_blocks(
                self.depths[i], self.scan_unroll, num_heads=self.num_heads[i], mlp_ratio=self.mlp_ratios[i],
                attention=self.attention, rates=self.stage_rates()[i], ffn=self.ffn, deterministic=not train,
                name=f"block{i + 1}", **kw)
            x, _ = blocks(x, jnp.asarray(drop_rates[start : start + self.depths[i]], jnp.float32))
            x = layer_norm(BLOCK_NORM_EPS, name=f"norm{i + 1}", **kw)(x)
            features.append(x)
        if out_indices is not None:
            return [features[i] for i in out_indices]
        pooled = jnp.mean(x, axis=(1, 2))
        head = nn.Dense(self.num_classes, kernel_init=dense_kernel_init, name="head", dtype=self.dtype,
                        param_dtype=self.param_dtype)
        return head(pooled)

    def features(self, images, train: bool = False, out_indices: Sequence[int] = (0, 1, 2, 3)):
        """The outputs of the stages in `out_indices` (0-3), in that order. Initialise through the
        default method: `features` creates no head."""
        if not out_indices or any(not 0 <= i < len(STAGE_STRIDES) for i in out_indices):
            raise ValueError(f"out_indices={tuple(out_indices)} must name stages 0 to {len(STAGE_STRIDES) - 1}, "
                             "e.g. (1, 2, 3) for the strides 8, 16 and 32")
        return self(images, train=train, out_indices=tuple(out_indices))
