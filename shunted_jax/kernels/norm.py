"""LayerNorm over the channels, optionally followed by the exact GELU, as Pallas (Triton) kernels.

XLA spends a reduction kernel on the mean, one on the variance and an element-wise pass on the
output; here one program per block of rows holds its rows in registers: one read and one write
of the map. The backward is one kernel too (the gradient w.r.t. the input, and per-block sums for
'scale' and 'bias' that XLA adds up). Numerics are nn.LayerNorm's with `use_fast_variance=False`.
Off the GPU, Pallas' interpreter runs them (for tests).
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from shunted_jax.kernels.common import Target, gelu_slope, multiply_add, normal_cdf

_BLOCK_ELEMENTS = 4096
"""Elements (rows x channels, padded to a power of two) per Pallas program."""


class _Rows:
    """Where a Pallas program works: a block of rows of a (rows, channels) array, all channels."""

    def __init__(self, rows: int, channels: int, block_rows: int, block_c: int):
        self.rows = pl.program_id(0) * block_rows + jnp.arange(block_rows)
        self.lanes = jnp.arange(block_c)
        self.channels = channels
        self.in_map = (self.rows < rows)[:, None] & (self.lanes < channels)[None, :]
        self._clipped = (jnp.minimum(self.rows, rows - 1)[:, None], jnp.minimum(self.lanes, channels - 1)[None, :])

    def load(self, ref, dtype):
        """Indices clipped into the array and the load masked: no load leaves it, and Pallas'
        interpreter runs the same kernel."""
        return plt.load(ref.at[self._clipped], mask=self.in_map, other=0).astype(dtype)

    def load_channels(self, ref, dtype):
        return plt.load(ref.at[self._clipped[1][0]], mask=self.lanes < self.channels, other=0).astype(dtype)[None, :]

    def store(self, ref, value):
        plt.store(ref.at[self.rows[:, None], self.lanes[None, :]], value.astype(ref.dtype), mask=self.in_map)

    def standardize(self, x, epsilon):
        """(x - mean) / sqrt(var + eps) per row (zero in the padding lanes), and 1 / sqrt(var + eps)."""
        mean = jnp.sum(x, axis=1, keepdims=True) / self.channels
        centered = jnp.where(self.in_map, x - mean, 0)
        inv_std = jax.lax.rsqrt(jnp.sum(centered * centered, axis=1, keepdims=True) / self.channels + epsilon)
        return centered * inv_std, inv_std


def _layer_norm_forward_kernel(x_ref, scale_ref, bias_ref, y_ref, *, epsilon, apply_gelu, fast_math, **tiling):
    here = _Rows(**tiling)
    acc = scale_ref.dtype
    x_hat, _ = here.standardize(here.load(x_ref, acc), epsilon)
    y = multiply_add(x_hat, here.load_channels(scale_ref, acc), here.load_channels(bias_ref, acc), fast_math)
    here.store(y_ref, y * normal_cdf(y, fast_math) if apply_gelu else y)


def _layer_norm_backward_kernel(x_ref, scale_ref, bias_ref, g_ref, dx_ref, sums_ref, *, epsilon, apply_gelu,
                                fast_math, **tiling):
    """dx = (g' - mean(g') - x_hat mean(g' x_hat)) / std with g' = g * scale, and this block's
    sums of g x_hat and g (the 'scale' and 'bias' gradients); with `apply_gelu`, g is first
    multiplied by GELU's slope at the recomputed normalized output."""
    here = _Rows(**tiling)
    acc = scale_ref.dtype
    x_hat, inv_std = here.standardize(here.load(x_ref, acc), epsilon)
    scale, g = here.load_channels(scale_ref, acc), here.load(g_ref, acc)
    if apply_gelu:
        y = multiply_add(x_hat, scale, here.load_channels(bias_ref, acc), fast_math)
        g = g * gelu_slope(y, normal_cdf(y, fast_math), fast_math)
    g_scaled = g * scale
    mean_g = jnp.sum(g_scaled, axis=1, keepdims=True) / here.channels
    mean_gx = jnp.sum(g_scaled * x_hat, axis=1, keepdims=True) / here.channels
    here.store(dx_ref, (g_scaled - mean_g - x_hat * mean_gx) * inv_std)
    block, lanes = pl.program_id(0), here.lanes
    ok = lanes < here.channels
    plt.store(sums_ref.at[block, 0, lanes], jnp.sum(g * x_hat, axis=0), mask=ok)
    plt.store(sums_ref.at[block, 1, lanes], jnp.sum(g, axis=0), mask=ok)


def _tiling(x):
    rows, channels = x.shape
    block_c = pl.next_power_of_2(channels)
    block_rows = max(1, _BLOCK_ELEMENTS // block_c)
    return dict(rows=rows, channels=channels, block_rows=block_rows, block_c=block_c), pl.cdiv(rows, block_rows)


def _call(kernel, x, out_shape, epsilon, apply_gelu, target: Target, *args):
    tiling, blocks = _tiling(x)
    kernel = functools.partial(kernel, epsilon=epsilon, apply_gelu=apply_gelu, fast_math=target.fast_math, **tiling)
    return pl.pallas_call(kernel, out_shape=out_shape, grid=(blocks,), interpret=target.interpret,
                          compiler_params=plt.CompilerParams())(x, *args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def pallas_layer_norm(x, scale, bias, epsilon: float, apply_gelu: bool, dtype, target: Target):
    """LayerNorm (then GELU) of (rows, channels) x; scale and bias in the accumulator dtype."""
    out_shape = jax.ShapeDtypeStruct(x.shape, dtype)
    return _call(_layer_norm_forward_kernel, x, out_shape, epsilon, apply_gelu, target, scale, bias)


def _forward(x, scale, bias, epsilon, apply_gelu, dtype, target):
    return pallas_layer_norm(x, scale, bias, epsilon, apply_gelu, dtype, target), (x, scale, bias)


def _backward(epsilon, apply_gelu, dtype, target, saved, g):
    x, scale, bias = saved
    _, blocks = _tiling(x)
    out_shape = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((blocks, 2, x.shape[1]), scale.dtype))
    dx, sums = _call(_layer_norm_backward_kernel, x, out_shape, epsilon, apply_gelu, target, scale, bias, g)
    d_scale, d_bias = jnp.sum(sums, axis=0)
    return dx, d_scale, d_bias


pallas_layer_norm.defvjp(_forward, _backward)
