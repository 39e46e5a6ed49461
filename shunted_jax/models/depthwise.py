"""The 3x3 depthwise convolution (stride 1, padding 1) of the FFN and of V's local enhancement.

Implementations, with the same parameters ('kernel' (3, 3, 1, C), 'bias' (C,)):
  "xla"     lax.conv_general_dilated, i.e. cuDNN on a GPU. The exact path, and the model default.
  "pallas"  Pallas (Triton) kernels for the forward pass (with the FFN's GELU fused in) and the
            backward pass, for maps with a multiple of 32 channels. They need no autotuning:
            on an H100 a cold shunted_s train-step compile took 65-100 s with them and 133 s
            with cuDNN's depthwise algorithms, of which autotuning picked, on one machine of
            session 4, one that took 45 ms of a 98 ms step (BENCHMARKS.md, sessions 4 and 5).
            Elsewhere than on a GPU, Pallas' interpreter runs them (slow: for tests). They use
            Pallas' Triton backend, which jax 0.11 deprecates in favour of Mosaic GPU (it warns).
  "auto"    `choose_depthwise`: "pallas" on one GPU for 16-bit maps it tiles, "xla" elsewhere.
            On several devices XLA's convolution stays: a Pallas call has no sharding rule, so
            XLA would gather a batch-sharded map onto every device.
"""
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from shunted_jax.models.layers import conv_kernel_init, gelu

Dtype = Any

DEPTHWISE_IMPLS = ("auto", "xla", "pallas")

_CHANNEL_BLOCKS = (64, 32)
"""Channels per Pallas program, the largest that divides C; every depthwise conv of the
released models has a multiple of 32 channels."""


def _channel_block(channels: int):
    return next((b for b in _CHANNEL_BLOCKS if channels % b == 0), None)


def choose_depthwise(implementation: str, channels: int, dtype, backend: str, devices: int = 1) -> str:
    """Resolves "auto" (float32 and float64 stay on XLA's exact convolution, as does any program
    over several devices) and checks the choice."""
    if implementation not in DEPTHWISE_IMPLS:
        raise ValueError(f"Unknown depthwise implementation {implementation!r}; choose one of {DEPTHWISE_IMPLS}.")
    tiled = _channel_block(channels) is not None
    if implementation == "auto":
        fits = backend == "gpu" and devices == 1 and jnp.dtype(dtype).itemsize == 2 and tiled
        return "pallas" if fits else "xla"
    if implementation == "pallas" and not tiled:
        raise ValueError(f"depthwise_impl='pallas' needs a multiple of {min(_CHANNEL_BLOCKS)} channels, this map has "
                         f"{channels}: use depthwise_impl='xla' or 'auto'.")
    return implementation


def _accumulator(dtype):
    """float32 sums for 16-bit maps (as cuDNN); float64 maps keep float64."""
    return jnp.promote_types(dtype, jnp.float32)


def _tap_rows(row, height):
    """The three input rows around output row `row`, clipped into the map, and their validity."""
    rows = [row + dy for dy in (-1, 0, 1)]
    return [(jnp.clip(r, 0, height - 1), (r >= 0) & (r < height)) for r in rows]


def _load_shifted(ref, batch, row, row_ok, columns, dx, width, lanes, acc):
    """Input row `row` shifted by dx along W: (len(columns), len(lanes)) in `acc`, zero outside.

    Rows and channels are both index arrays, clipped into the map, and the outside is zeroed
    afterwards: no load leaves the array, and Pallas' interpreter (which does not mix index
    arrays with slices) runs the same kernel.
    """
    col = columns + dx
    ok = row_ok & (col >= 0) & (col < width)
    x = ref[batch, row, jnp.clip(col, 0, width - 1)[:, None], lanes[None, :]]
    return jnp.where(ok[:, None], x.astype(acc), 0)


def _shifted_taps(ref, batch, row, columns, height, width, lanes, acc):
    """The 9 rows of `ref` around `row`, shifted by (dy, dx) in row-major order."""
    return [_load_shifted(ref, batch, r, ok, columns, dx, width, lanes, acc)
            for r, ok in _tap_rows(row, height) for dx in (-1, 0, 1)]


class _Row:
    """Where a Pallas program works: one row of one image, one block of channels."""

    def __init__(self, ref, height, width, block_w, block_c):
        self.batch, self.row = pl.program_id(0), pl.program_id(1)
        self.lanes = pl.program_id(2) * block_c + jnp.arange(block_c)
        self.columns = jnp.arange(block_w)
        self.height, self.width = height, width
        self.acc = _accumulator(ref.dtype)

    def stencil(self, ref, w_ref):
        """The sum over taps k of the shifted rows of `ref` times w[k], and the unshifted row."""
        terms = _shifted_taps(ref, self.batch, self.row, self.columns, self.height, self.width, self.lanes, self.acc)
        acc = jnp.zeros(terms[0].shape, self.acc)
        for k, x in enumerate(terms):
            acc += x * w_ref[k, self.lanes].astype(self.acc)[None, :]
        return acc, terms[4]

    def store(self, o_ref, value):
        plt.store(o_ref.at[self.batch, self.row, self.columns[:, None], self.lanes[None, :]], value.astype(o_ref.dtype),
                  mask=(self.columns < self.width)[:, None])


# Chebyshev fit of erfc(a) = t exp(-a^2 + P(t)), t = 1 / (1 + a / 2), a >= 0, with a relative
# error below 1.2e-7 (Numerical Recipes' erfcc): Pallas' Triton lowering has no erf.
_ERFC_COEFFS = (-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806, 0.27886807, -1.13520398,
                1.48851587, -0.82215223, 0.17087277)


def _gelu(z):
    """Exact-form GELU z * Phi(z) through the erfc fit: relative error below 3e-5 in float32 (and
    1.1e-7 in float64) everywhere, where a bfloat16 output rounds at 4e-3."""
    a = jnp.abs(z) * (0.5 ** 0.5)
    t = 1.0 / (1.0 + 0.5 * a)
    poly = _ERFC_COEFFS[-1]
    for c in _ERFC_COEFFS[-2::-1]:
        poly = poly * t + c
    tail = 0.5 * t * jnp.exp(poly - a * a)  # Phi(-|z|)
    return z * jnp.where(z >= 0, 1.0 - tail, tail)


def _conv_kernel(x_ref, w_ref, b_ref, *out_refs, residual, apply_gelu, **tiling):
    """z = sum of the 9 shifted input rows times their taps, plus the bias (and the input);
    writes GELU(z) with `apply_gelu`, and z too when a second output is asked for."""
    here = _Row(x_ref, **tiling)
    z, center = here.stencil(x_ref, w_ref)
    z += b_ref[here.lanes].astype(here.acc)[None, :]
    if residual:
        z += center
    here.store(out_refs[0], _gelu(z) if apply_gelu else z)
    if len(out_refs) == 2:
        here.store(out_refs[1], z)


def _weight_grad_kernel(x_ref, g_ref, o_ref, *, height, width, block_w, block_c):
    """One image, one block of channels: the sums over the map of g times each of the 9
    shifted inputs and of g alone. Products are summed row by row in (W, C) accumulators and
    reduced over W once at the end."""
    batch, lanes = pl.program_id(0), pl.program_id(1) * block_c + jnp.arange(block_c)
    acc_dtype, columns = o_ref.dtype, jnp.arange(block_w)

    def add_row(row, sums):
        g = _load_shifted(g_ref, batch, row, True, columns, 0, width, lanes, acc_dtype)
        taps = _shifted_taps(x_ref, batch, row, columns, height, width, lanes, acc_dtype)
        return tuple(s + g * x for s, x in zip(sums, taps + [1]))

    zeros = jnp.zeros((block_w, block_c), acc_dtype)
    sums = jax.lax.fori_loop(0, height, add_row, (zeros,) * 10)
    for k, s in enumerate(sums):
        o_ref[batch, k, lanes] = jnp.sum(s, axis=0)


def _tiling(x):
    batch, height, width, channels = x.shape
    block_c = _channel_block(channels)
    tiling = dict(height=height, width=width, block_w=pl.next_power_of_2(width), block_c=block_c)
    return tiling, (batch, height, channels // block_c)


def _pallas_weight_grad(x, g, interpret):
    """(10, C): the 9 tap gradients and the bias gradient, per image from the kernel, summed by XLA.
    32-channel blocks: ten (W, C) float32 accumulators must fit in registers."""
    tiling, (batch, _, _) = _tiling(x)
    tiling["block_c"] = min(_CHANNEL_BLOCKS)
    channels = x.shape[-1]
    out = jax.ShapeDtypeStruct((batch, 10, channels), _accumulator(x.dtype))
    kernel = functools.partial(_weight_grad_kernel, **tiling)
    sums = pl.pallas_call(kernel, out_shape=out, grid=(batch, channels // tiling["block_c"]), interpret=interpret,
                          compiler_params=plt.CompilerParams(num_warps=8))(x, g)
    return jnp.sum(sums, axis=0)


def _pallas_conv(x, taps, bias, residual, interpret, apply_gelu=False, keep_preactivation=False):
    tiling, grid = _tiling(x)
    kernel = functools.partial(_conv_kernel, residual=residual, apply_gelu=apply_gelu, **tiling)
    out = jax.ShapeDtypeStruct(x.shape, x.dtype)
    return pl.pallas_call(kernel, out_shape=(out, out) if keep_preactivation else out, grid=grid,
                          interpret=interpret)(x, taps, bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _pallas_depthwise(x, taps, bias, residual=False, apply_gelu=False, interpret=False):
    """z = depthwise3x3(x) + bias (+ x with `residual`), or GELU(z) with `apply_gelu`; taps (9, C)
    in row-major (dy, dx) order.

    Differentiated, the forward kernel also writes z. The backward takes GELU's derivative at
    z (in XLA); the gradient w.r.t. x is then the same convolution with the taps reversed, and
    one reduction kernel gives the tap and bias gradients.
    """
    return _pallas_conv(x, taps, bias, residual, interpret, apply_gelu)


def _forward(x, taps, bias, residual, apply_gelu, interpret):
    if not apply_gelu:
        return _pallas_conv(x, taps, bias, residual, interpret), (x, taps, bias, None)
    y, z = _pallas_conv(x, taps, bias, residual, interpret, apply_gelu, keep_preactivation=True)
    return y, (x, taps, bias, z)


def _backward(residual, apply_gelu, interpret, saved, g):
    x, taps, bias, z = saved
    if apply_gelu:
        _, gelu_vjp = jax.vjp(gelu, z.astype(_accumulator(z.dtype)))
        g = gelu_vjp(g.astype(_accumulator(g.dtype)))[0].astype(g.dtype)
    dx = _pallas_conv(g, taps[::-1], jnp.zeros(taps.shape[1:], taps.dtype), residual, interpret)
    sums = _pallas_weight_grad(x, g, interpret)
    return dx, sums[:9].astype(taps.dtype), sums[9].astype(bias.dtype)


_pallas_depthwise.defvjp(_forward, _backward)


class DepthwiseConv3x3(nn.Module):
    """nn.Conv(features, 3x3, padding 1, groups=features) with a choice of implementation.
    `residual` adds the input to the output (Shunted's FFN computes u + DWConv(u)), and
    `apply_gelu` applies the exact GELU after that (fused into the Pallas kernel)."""
    features: int
    implementation: str = "xla"
    residual: bool = False
    apply_gelu: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        if x.ndim != 4 or x.shape[-1] != self.features:
            raise ValueError(f"DepthwiseConv3x3({self.features}) takes an NHWC map with {self.features} channels, "
                             f"got shape {x.shape}.")
        kernel = self.param("kernel", conv_kernel_init(self.features), (3, 3, 1, self.features), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        backend = jax.default_backend()
        if choose_depthwise(self.implementation, self.features, x.dtype, backend, jax.device_count()) == "pallas":
            interpret = backend != "gpu"
            return _pallas_depthwise(x, kernel.reshape(9, self.features), bias, self.residual, self.apply_gelu,
                                    interpret)
        y = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=self.features)
        y = y + bias
        if self.residual:
            y = x + y
        return gelu(y) if self.apply_gelu else y

