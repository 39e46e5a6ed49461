"""LayerNorm over the channels, optionally followed by the exact GELU, with a choice of implementation.

Parameters and numerics are nn.LayerNorm's with `use_fast_variance=False` (float32 statistics
with the two-pass variance, as torch computes it; 'scale' and 'bias' used in float32):
  "xla"     the same formulas in XLA. On an H100 XLA spends a reduction kernel on the mean, one
            on the variance and an element-wise pass on the output (BENCHMARKS.md, session 7).
  "pallas"  one Pallas (Triton) kernel per block of rows that holds its rows in registers: one
            read and one write of the map. Its backward is one kernel too (the gradient w.r.t.
            the input, and per-block sums for 'scale' and 'bias' that XLA adds up). Off the GPU
            Pallas' interpreter runs them (for tests).
  "auto"    "pallas" on one GPU for 16-bit outputs (`pallas_common.kernels_fit`), "xla" elsewhere.
"""
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from shunted_jax.models.layers import gelu
from shunted_jax.models.pallas_common import Target, accumulator, gelu_slope, kernels_fit, normal_cdf, target_for

Dtype = Any

NORM_IMPLS = ("auto", "xla", "pallas")

_BLOCK_ELEMENTS = 4096
"""Elements (rows x channels, padded to a power of two) per Pallas program."""


def choose_norm(implementation: str, dtype, backend: str, devices: int = 1) -> str:
    if implementation not in NORM_IMPLS:
        raise ValueError(f"Unknown norm implementation {implementation!r}; choose one of {NORM_IMPLS}.")
    if implementation == "auto":
        return "pallas" if kernels_fit(dtype, backend, devices) else "xla"
    return implementation


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


def _forward_kernel(x_ref, scale_ref, bias_ref, y_ref, *, epsilon, apply_gelu, fast_math, **tiling):
    here = _Rows(**tiling)
    acc = scale_ref.dtype
    x_hat, _ = here.standardize(here.load(x_ref, acc), epsilon)
    y = x_hat * here.load_channels(scale_ref, acc) + here.load_channels(bias_ref, acc)
    here.store(y_ref, y * normal_cdf(y, fast_math) if apply_gelu else y)


def _backward_kernel(x_ref, scale_ref, bias_ref, g_ref, dx_ref, sums_ref, *, epsilon, apply_gelu, fast_math,
                     **tiling):
    """dx = (g' - mean(g') - x_hat mean(g' x_hat)) / std with g' = g * scale, and this block's
    sums of g x_hat and g (the 'scale' and 'bias' gradients); with `apply_gelu`, g is first
    multiplied by GELU's slope at the recomputed normalized output."""
    here = _Rows(**tiling)
    acc = scale_ref.dtype
    x_hat, inv_std = here.standardize(here.load(x_ref, acc), epsilon)
    scale, g = here.load_channels(scale_ref, acc), here.load(g_ref, acc)
    if apply_gelu:
        y = x_hat * scale + here.load_channels(bias_ref, acc)
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
    return pl.pallas_call(kernel, out_shape=out_shape, grid=(blocks,), interpret=target.interpret)(x, *args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _pallas_layer_norm(x, scale, bias, epsilon: float, apply_gelu: bool, dtype, target: Target):
    """LayerNorm (then GELU) of (rows, channels) x; scale and bias in the accumulator dtype."""
    return _call(_forward_kernel, x, jax.ShapeDtypeStruct(x.shape, dtype), epsilon, apply_gelu, target, scale, bias)


def _forward(x, scale, bias, epsilon, apply_gelu, dtype, target):
    return _pallas_layer_norm(x, scale, bias, epsilon, apply_gelu, dtype, target), (x, scale, bias)


def _backward(epsilon, apply_gelu, dtype, target, saved, g):
    x, scale, bias = saved
    _, blocks = _tiling(x)
    out_shape = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((blocks, 2, x.shape[1]), scale.dtype))
    dx, sums = _call(_backward_kernel, x, out_shape, epsilon, apply_gelu, target, scale, bias, g)
    d_scale, d_bias = jnp.sum(sums, axis=0)
    return dx, d_scale, d_bias


_pallas_layer_norm.defvjp(_forward, _backward)


def _xla_layer_norm(x, scale, bias, epsilon, acc):
    """nn.LayerNorm's formulas (use_fast_variance=False)."""
    x = x.astype(acc)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * (jax.lax.rsqrt(var + epsilon) * scale) + bias


class LayerNorm(nn.Module):
    """nn.LayerNorm(epsilon, use_fast_variance=False), then the exact GELU with `apply_gelu`
    (fused into the Pallas kernel)."""
    epsilon: float
    apply_gelu: bool = False
    implementation: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (channels,), self.param_dtype)
        acc = accumulator(jnp.promote_types(x.dtype, self.dtype))
        scale, bias = scale.astype(jnp.promote_types(scale.dtype, acc)), bias.astype(jnp.promote_types(bias.dtype, acc))
        backend = jax.default_backend()
        if choose_norm(self.implementation, self.dtype, backend, jax.device_count()) == "pallas":
            y = _pallas_layer_norm(x.reshape(-1, channels), scale, bias, self.epsilon, self.apply_gelu, self.dtype,
                                   target_for(acc, backend))
            return y.reshape(x.shape)
        y = _xla_layer_norm(x, scale, bias, self.epsilon, acc).astype(self.dtype)
        return gelu(y) if self.apply_gelu else y


def layer_norm(eps: float, *, name: str, dtype: Dtype, param_dtype: Dtype, apply_gelu: bool = False) -> LayerNorm:
    """The models' LayerNorm: the two-pass variance, as torch computes it (E[x^2] - E[x]^2 loses
    float32 digits), then GELU with `apply_gelu`; "auto" picks the Pallas kernels."""
    return LayerNorm(eps, apply_gelu, dtype=dtype, param_dtype=param_dtype, name=name)
