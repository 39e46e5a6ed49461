"""Building blocks shared by every model family: initialisers, convs, norms, drop path.

Each helper pins down one detail that the official PyTorch code fixes and Flax's
defaults get wrong (GELU form, LayerNorm eps, symmetric padding, the depthwise fan-out).
The depthwise conv and LayerNorm hold their parameters here and compute in `shunted_jax.kernels`.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from shunted_jax import kernels

Dtype = Any

# Official LayerNorm eps: 1e-6 for block and stage norms, 1e-5 (PyTorch's default) elsewhere.
BLOCK_NORM_EPS = 1e-6
TORCH_NORM_EPS = 1e-5

dense_kernel_init = nn.initializers.normal(stddev=0.02)
"""timm's trunc_normal_(std=.02) cuts at +-2 absolute, i.e. 100 sigma: a plain normal."""


def conv_kernel_init(groups: int = 1):
    """N(0, 2 / fan_out) with fan_out = kh * kw * out / groups, the official conv init.

    Flax's variance_scaling counts a depthwise kernel's fan-out as kh * kw * C; the
    official rule gives kh * kw, so depthwise kernels get std sqrt(2 / 9), not sqrt(2 / 9C).
    """

    def init(key, shape, dtype=jnp.float32):
        kh, kw, _, out = shape
        fan_out = kh * kw * out // groups
        return jax.random.normal(key, shape, dtype) * np.sqrt(2.0 / fan_out)

    return init


def gelu(x):
    """Exact (erf) GELU, as torch.nn.GELU(); Flax's default is the tanh approximation."""
    return nn.gelu(x, approximate=False)


def conv(
    features: int,
    kernel: int,
    *,
    name: str,
    dtype: Dtype,
    param_dtype: Dtype,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
    use_bias: bool = True,
) -> nn.Conv:
    """A Conv2d with PyTorch's symmetric padding (never 'SAME') and the official init."""
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        feature_group_count=groups,
        use_bias=use_bias,
        kernel_init=conv_kernel_init(groups),
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


def space_to_depth_conv(x, kernel, padding: int):
    """A stride-2 convolution (NHWC x, square HWIO kernel, `padding` zeros on every side)
    computed as a stride-1 one over the map's 2x2 pixel blocks folded into channels.

    The same sums in another order (the kernel gets zero taps). Input channels are zero-padded
    to a multiple of 8, which cuDNN's tensor-core kernels want: over 3 channels the stem's 7x7/2
    conv is much faster this way (BENCHMARKS.md).
    """
    batch, height, width, channels = x.shape
    size = kernel.shape[0]
    if kernel.shape[1] != size:
        raise ValueError(f"space_to_depth_conv takes a square kernel, got {kernel.shape[:2]}.")
    lead = padding % 2  # zero taps in front, so that every pair of taps starts on an even offset
    taps = -(-(size + lead) // 2)
    wide = -(-4 * channels // 8) * 8
    kernel = jnp.pad(kernel, ((lead, 2 * taps - size - lead), (lead, 2 * taps - size - lead), (0, 0), (0, 0)))
    kernel = kernel.reshape(taps, 2, taps, 2, channels, -1).transpose(0, 2, 1, 3, 4, 5)
    kernel = jnp.pad(kernel.reshape(taps, taps, 4 * channels, -1), ((0, 0), (0, 0), (0, wide - 4 * channels), (0, 0)))
    x = jnp.pad(x, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)))
    blocks = x.reshape(batch, -(-height // 2), 2, -(-width // 2), 2, channels).transpose(0, 1, 3, 2, 4, 5)
    blocks = blocks.reshape(*blocks.shape[:3], 4 * channels)

    def block_padding(length, block_length):
        out = (length + 2 * padding - size) // 2 + 1
        before = (padding + lead) // 2
        return before, out + taps - 1 - before - block_length, 0

    edges = [(0, 0, 0), block_padding(height, blocks.shape[1]), block_padding(width, blocks.shape[2]),
             (0, wide - 4 * channels, 0)]
    blocks = jax.lax.pad(blocks, jnp.zeros((), blocks.dtype), edges)
    return jax.lax.conv_general_dilated(blocks, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def dense(features: int, *, name: str, dtype: Dtype, param_dtype: Dtype) -> nn.Dense:
    return nn.Dense(features, kernel_init=dense_kernel_init, dtype=dtype, param_dtype=param_dtype, name=name)


class DenseWithPendingBias(nn.Module):
    """nn.Dense's parameters ('kernel', 'bias') and product x W + b, returned as a
    `kernels.PendingBias`: the depthwise conv that reads it adds b inside its kernel."""

    features: int
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x):
        x, kernel, bias = _dense_operands(self, x)
        return kernels.PendingBias(_product(x, kernel), bias)


class DepthwiseConv3x3(nn.Module):
    """nn.Conv(features, 3x3, padding 1, groups=features), then, with `residual`, plus its input
    (Shunted's FFN computes u + DWConv(u)) and, with `apply_gelu`, the exact GELU."""

    features: int
    residual: bool = False
    apply_gelu: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x):
        if x.ndim != 4 or x.shape[-1] != self.features:
            raise ValueError(f"DepthwiseConv3x3({self.features}) takes an NHWC map with {self.features} channels, "
                             f"got shape {x.shape}.")
        kernel = self.param("kernel", conv_kernel_init(self.features), (3, 3, 1, self.features), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        kernel, bias = nn.dtypes.promote_dtype(kernel, bias, dtype=self.dtype)
        return kernels.depthwise_conv3x3(x, kernel, bias, self.kernels, residual=self.residual,
                                         apply_gelu=self.apply_gelu)


class LayerNorm(nn.Module):
    """nn.LayerNorm(epsilon, use_fast_variance=False): the two-pass variance, as torch computes
    it (E[x^2] - E[x]^2 loses float32 digits); then the exact GELU with `apply_gelu`."""

    epsilon: float
    apply_gelu: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (channels,), self.param_dtype)
        return kernels.layer_norm(x, scale, bias, self.kernels, epsilon=self.epsilon, dtype=self.dtype,
                                  apply_gelu=self.apply_gelu)


def layer_norm(eps: float, *, name: str, dtype: Dtype, param_dtype: Dtype, kernels: str,
               apply_gelu: bool = False) -> LayerNorm:
    return LayerNorm(eps, apply_gelu, dtype=dtype, param_dtype=param_dtype, kernels=kernels, name=name)


class ColumnBlockDense(nn.Module):
    """nn.Dense's parameters ('kernel', 'bias'), initialisation and numerics, returning its output
    as `column_blocks` products, one per contiguous block of output columns of equal width.

    SSA's head groups own contiguous head-major channel blocks of the query, so each group's
    query comes from its own kernel columns and bias entries: slicing the whole query instead
    costs a copy per group on a GPU, where cuDNN's fused attention takes dense operands.
    """

    features: int
    column_blocks: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x, kernel, bias = _dense_operands(self, x)
        if self.features % self.column_blocks:
            raise ValueError(f"{self.features} features cannot be split into {self.column_blocks} equal column blocks.")
        width = self.features // self.column_blocks
        blocks = [slice(b * width, (b + 1) * width) for b in range(self.column_blocks)]
        return tuple(_product(x, kernel[:, cols]) + bias[cols] for cols in blocks)


def _dense_operands(module: nn.Module, x):
    """nn.Dense's 'kernel' and 'bias' of `module` (its `features`, dtypes and init), promoted with x."""
    kernel = module.param("kernel", dense_kernel_init, (x.shape[-1], module.features), module.param_dtype)
    bias = module.param("bias", nn.initializers.zeros, (module.features,), module.param_dtype)
    return nn.dtypes.promote_dtype(x, kernel, bias, dtype=module.dtype)


def _product(x, kernel):
    """x @ kernel over x's last axis, as nn.Dense computes it."""
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def drop_path(x, rate, deterministic: bool, rng_module: nn.Module):
    """Per-sample stochastic depth (timm's DropPath): keep mask floor(keep + U), x / keep * mask.

    `rate` may be a traced scalar (it is scanned along with the blocks of a stage); a rate of
    zero keeps every sample because floor(1 + U) = 1 for U in [0, 1).
    """
    if deterministic:
        return x
    keep = 1.0 - rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    noise = jax.random.uniform(rng_module.make_rng("dropout"), shape, dtype=jnp.float32)
    mask = jnp.floor(keep + noise)
    return (x / keep * mask).astype(x.dtype)
