"""The 3x3 depthwise convolution (stride 1, padding 1) as Pallas (Triton) kernels: the forward
pass with the FFN's GELU, residual and fc1's bias fused in, and the backward pass with GELU's
derivative fused in, for maps with a multiple of 32 channels.

They need no autotuning (cuDNN's depthwise algorithms are autotuned per shape, which lengthens
the first compile and may pick a slow one), and they are bound by instructions more than by
memory, hence masked loads and approximate PTX instructions inside the GELU. Off the GPU,
Pallas' interpreter runs them (for tests).
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from shunted_jax.kernels.common import Target, accumulator, gelu_slope, multiply_add, normal_cdf, traced_once

_CHANNEL_BLOCKS = (64, 32)
"""Channels per Pallas program, the largest that divides C; every depthwise conv of the
released models has a multiple of 32 channels."""
MIN_CHANNEL_BLOCK = min(_CHANNEL_BLOCKS)


def _channel_block(channels: int):
    return next((b for b in _CHANNEL_BLOCKS if channels % b == 0), None)


def takes(channels: int) -> bool:
    """Whether the kernels tile a map of this many channels."""
    return _channel_block(channels) is not None


def _tap_rows(row, height):
    """The three input rows around output row `row`, clipped into the map, and their validity."""
    rows = [row + dy for dy in (-1, 0, 1)]
    return [(jnp.clip(r, 0, height - 1), (r >= 0) & (r < height)) for r in rows]


def _load_shifted(ref, batch, row, row_ok, columns, dx, width, lanes, acc):
    """Input row `row` shifted by dx along W: (len(columns), len(lanes)) in `acc`, zero outside.

    Rows and channels are both index arrays, clipped into the map, and the load is masked
    outside it (cheaper than zeroing the values after it): no load leaves the array, and Pallas'
    interpreter (which does not mix index arrays with slices) runs the same kernel.
    """
    col = columns + dx
    ok = row_ok & (col >= 0) & (col < width)
    mask = jnp.broadcast_to(ok[:, None], (len(columns), len(lanes)))
    return plt.load(ref.at[batch, row, jnp.clip(col, 0, width - 1)[:, None], lanes[None, :]], mask=mask,
                    other=0).astype(acc)


def _shifted_taps(ref, batch, row, columns, height, width, lanes, acc):
    """The 9 rows of `ref` around `row`, shifted by (dy, dx) in row-major order."""
    return [_load_shifted(ref, batch, r, ok, columns, dx, width, lanes, acc)
            for r, ok in _tap_rows(row, height) for dx in (-1, 0, 1)]


class Tiling(NamedTuple):
    """How a kernel splits a map: `block_w` columns (a power of two) and `block_c` channels per
    program, `warps` warps each; the weight gradient's programs sum over `block_h` rows."""
    block_w: int
    block_c: int
    warps: int
    block_h: int = 1


class _Row:
    """Where a Pallas program works: one row of one image, a strip of columns, one block of
    channels. Rows are the grid's first axis, so programs launched together share their input
    rows in the cache."""

    def __init__(self, ref, height, width, block_w, block_c, fast_math):
        self.fast_math = fast_math
        self.row, self.batch = pl.program_id(0), pl.program_id(1)
        self.lanes = pl.program_id(2) * block_c + jnp.arange(block_c)
        self.columns = pl.program_id(3) * block_w + jnp.arange(block_w)
        self.height, self.width = height, width
        self.acc = accumulator(ref.dtype)

    def stencil(self, ref, w_ref, start, residual: bool):
        """`start` plus the sum over taps k of the shifted rows of `ref` times w[k], and with
        `residual` the unshifted row too (as 1 added to the centre tap): one multiply-add a tap."""
        terms = _shifted_taps(ref, self.batch, self.row, self.columns, self.height, self.width, self.lanes, self.acc)
        acc = start
        for k, x in enumerate(terms):
            w = w_ref[k, self.lanes].astype(self.acc)
            acc = multiply_add(x, (w + 1 if residual and k == 4 else w)[None, :], acc, self.fast_math)
        return acc

    def bias(self, b_ref):
        """The bias row: b_ref[c], or from an edge table (`_edge_table`) the entry for this row's
        and each column's neighbours in the map."""
        if len(b_ref.shape) == 1:
            return b_ref[self.lanes].astype(self.acc)[None, :]
        above, below = (self.row > 0).astype(jnp.int32), (self.row < self.height - 1).astype(jnp.int32)
        entry = lambda left, right: b_ref[above, below, left, right, self.lanes].astype(self.acc)[None, :]  # noqa: E731
        left, right = (self.columns > 0)[:, None], (self.columns < self.width - 1)[:, None]
        return jnp.where(left, jnp.where(right, entry(1, 1), entry(1, 0)), jnp.where(right, entry(0, 1), entry(0, 0)))

    def store(self, o_ref, value):
        _store_row(o_ref, self.batch, self.row, self.columns, self.width, self.lanes, value)


def _store_row(ref, batch, row, columns, width, lanes, value):
    plt.store(ref.at[batch, row, columns[:, None], lanes[None, :]], value.astype(ref.dtype),
              mask=(columns < width)[:, None])


def _conv_kernel(x_ref, w_ref, b_ref, *out_refs, residual, apply_gelu, fast_math, **tiling):
    """z = sum of the 9 shifted input rows times their taps, plus the bias (a vector or an edge
    table) and, with `residual`, the input; writes GELU(z) = z Phi(z) with `apply_gelu` (else z),
    and, when a second output is asked for, GELU's slope Phi(z) + z phi(z) for the backward."""
    here = _Row(x_ref, fast_math=fast_math, **tiling)
    z = here.stencil(x_ref, w_ref, here.bias(b_ref), residual)
    if not apply_gelu:
        here.store(out_refs[0], z)
        return
    cdf = normal_cdf(z, fast_math)
    here.store(out_refs[0], z * cdf)
    if len(out_refs) == 2:
        here.store(out_refs[1], gelu_slope(z, cdf, fast_math))


def _weight_grad_kernel(*refs, with_slope, fast_math, height, width, block_w, block_c, block_h):
    """One strip of `block_h` rows and `block_w` columns of one image, one block of channels: the
    sums over it of g times each of the 9 shifted inputs and of g alone. Products are summed row
    by row in (block_w, block_c) accumulators and reduced over the columns once at the end.
    `with_slope`: g is the incoming gradient times GELU's slope (a third input), rounded to the
    map's dtype and also written out (a second output) for the input gradient's kernel."""
    if with_slope:
        x_ref, g_ref, slope_ref, o_ref, dz_ref = refs
    else:
        x_ref, g_ref, o_ref = refs
    batch, lanes = pl.program_id(0), pl.program_id(1) * block_c + jnp.arange(block_c)
    strip, first_row = pl.program_id(2), pl.program_id(3) * block_h
    acc_dtype, columns = o_ref.dtype, strip * block_w + jnp.arange(block_w)

    def add_row(i, sums):
        row = first_row + i
        g = _load_shifted(g_ref, batch, row, True, columns, 0, width, lanes, acc_dtype)
        if with_slope:
            g = g * _load_shifted(slope_ref, batch, row, True, columns, 0, width, lanes, acc_dtype)
            g = g.astype(dz_ref.dtype)
            _store_row(dz_ref, batch, row, columns, width, lanes, g)
            g = g.astype(acc_dtype)
        taps = _shifted_taps(x_ref, batch, row, columns, height, width, lanes, acc_dtype)
        return tuple(multiply_add(g, x, s, fast_math) for s, x in zip(sums, taps)) + (sums[-1] + g,)

    zeros = jnp.zeros((block_w, block_c), acc_dtype)
    sums = jax.lax.fori_loop(0, block_h, add_row, (zeros,) * 10)
    part = (batch * pl.num_programs(3) + pl.program_id(3)) * pl.num_programs(2) + strip
    for k, s in enumerate(sums):
        o_ref[part, k, lanes] = jnp.sum(s, axis=0)


def conv_tiling(shape) -> Tiling:
    """The forward and input-gradient kernels' tiling of a (B, H, W, C) map."""
    _, _, width, channels = shape
    return Tiling(block_w=pl.next_power_of_2(width), block_c=_channel_block(channels), warps=4)


def weight_grad_tiling(shape) -> Tiling:
    """The weight gradient's tiling: whole images, 16 elements of each accumulator per thread
    with 4 to 8 warps (fewer spill registers over a 64 x 64 tile, more are slower over a
    32 x 64 one: BENCHMARKS.md)."""
    _, height, width, channels = shape
    block_w, block_c = pl.next_power_of_2(width), _channel_block(channels)
    return Tiling(block_w, block_c, warps=min(8, max(4, block_w * block_c // (32 * 16))), block_h=height)


def _check_tiling(shape, tiling: Tiling) -> None:
    _, height, _, channels = shape
    if channels % tiling.block_c or height % tiling.block_h or tiling.block_w & (tiling.block_w - 1):
        raise ValueError(f"{tiling} does not tile a map of shape {shape}: block_c must divide the channels, "
                         "block_h the rows, and block_w must be a power of two.")


@traced_once("target", "tiling")
def _pallas_weight_grad(x, g, slope, target: Target, tiling: Tiling | None = None):
    """(10, C): the 9 tap gradients and the bias gradient, per strip from the kernel, summed by
    XLA, and the gradient at z (g, or g times GELU's slope when `slope` is given)."""
    batch, height, width, channels = x.shape
    tiling = tiling or weight_grad_tiling(x.shape)
    _check_tiling(x.shape, tiling)
    grid = (batch, channels // tiling.block_c, pl.cdiv(width, tiling.block_w), height // tiling.block_h)
    sums = jax.ShapeDtypeStruct((batch * grid[2] * grid[3], 10, channels), accumulator(x.dtype))
    with_slope = slope is not None
    kernel = functools.partial(_weight_grad_kernel, with_slope=with_slope, fast_math=target.fast_math,
                               height=height, width=width,
                               block_w=tiling.block_w, block_c=tiling.block_c, block_h=tiling.block_h)
    call = pl.pallas_call(kernel, out_shape=(sums, jax.ShapeDtypeStruct(g.shape, g.dtype)) if with_slope else sums,
                          grid=grid, interpret=target.interpret,
                          compiler_params=plt.CompilerParams(num_warps=tiling.warps))
    sums, g = call(x, g, slope) if with_slope else (call(x, g), g)
    return jnp.sum(sums, axis=0), g


@traced_once("residual", "target", "apply_gelu", "keep_slope", "tiling")
def _pallas_conv(x, taps, bias, residual, target: Target, apply_gelu=False, keep_slope=False,
                 tiling: Tiling | None = None):
    batch, height, width, channels = x.shape
    tiling = tiling or conv_tiling(x.shape)
    _check_tiling(x.shape, tiling)
    kernel = functools.partial(_conv_kernel, residual=residual, apply_gelu=apply_gelu, fast_math=target.fast_math,
                               height=height, width=width, block_w=tiling.block_w, block_c=tiling.block_c)
    out = jax.ShapeDtypeStruct(x.shape, x.dtype)
    grid = (height, batch, channels // tiling.block_c, pl.cdiv(width, tiling.block_w))
    return pl.pallas_call(kernel, out_shape=(out, out) if keep_slope else out, grid=grid,
                          interpret=target.interpret,
                          compiler_params=plt.CompilerParams(num_warps=tiling.warps))(x, taps, bias)


def _edge_table(taps, bias, input_bias, residual):
    """(2, 2, 2, 2, C) bias table for an input whose own bias `input_bias` is still to be added.

    DWConv(v + b) + bias (+ v + b) = DWConv(v) + bias (+ v) + [b * (the taps that see the map)
    (+ b)]. The bracket depends on the pixel only through whether its neighbours above, below,
    left and right are in the map (index 1) or in the zero padding (index 0), so the kernel adds
    table[above, below, left, right] and the producer (fc1) skips its bias-add pass over the
    hidden map.
    """
    acc = accumulator(taps.dtype)
    w, b = taps.reshape(3, 3, -1).astype(acc), input_bias.astype(acc)
    seen = jnp.asarray([[[before, 1, after] for after in (0, 1)] for before in (0, 1)], acc)  # (2, 2, 3)
    table = bias.astype(acc) + b * jnp.einsum("abi,lrj,ijc->ablrc", seen, seen, w)
    return table + b if residual else table


def _edge_sums(g, acc):
    """Sums of g over the first and last rows, the first and last columns, and the four corners
    of the map: {dy: (C,)}, {dx: (C,)}, {(dy, dx): (C,)} keyed by the side (-1 first, 1 last).

    Summed per image first, then over the batch behind an optimization barrier, so that XLA
    does not merge the two: as one reduction with only C outputs it runs on few thread blocks,
    per image it has B x C outputs.
    """
    ends = (0, -1)
    per_image = ([jnp.sum(g[:, i], 1, acc) for i in ends] + [jnp.sum(g[:, :, i], 1, acc) for i in ends]
                 + [g[:, i, j].astype(acc) for i in ends for j in ends])
    sums = jnp.sum(jax.lax.optimization_barrier(jnp.stack(per_image, 1)), 0)
    sides = (-1, 1)
    rows, columns = dict(zip(sides, sums[0:2])), dict(zip(sides, sums[2:4]))
    return rows, columns, dict(zip([(dy, dx) for dy in sides for dx in sides], sums[4:8]))


def _sums_where_taps_see_the_map(g, total):
    """(9, C): for each tap (dy, dx), the sum of g over the pixels p whose neighbour p + (dy, dx)
    is in the map (`total`, the sum over all of them, minus the excluded edge rows and columns).
    The input bias' share of the tap gradients and its own gradient, without a pass over a map."""
    rows, columns, corners = _edge_sums(g, total.dtype)
    sums = []
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            s = total - rows.get(dy, 0) - columns.get(dx, 0)
            sums.append(s + corners[dy, dx] if dy and dx else s)
    return jnp.stack(sums)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def pallas_depthwise(x, taps, bias, input_bias, residual: bool, apply_gelu: bool, target: Target):
    """z = depthwise3x3(u) + bias (+ u with `residual`), or GELU(z) with `apply_gelu`, where
    u = x + input_bias (or x); taps (9, C) in row-major (dy, dx) order.

    `input_bias` goes into the kernel's bias (`_edge_table`, added in the accumulator dtype), so
    no pass over the map adds it, trained or not. Differentiated, the forward kernel also writes
    GELU's slope at z. The backward's first kernel multiplies the incoming gradient by the slope
    and sums the tap and bias gradients (over x; the input bias' share, and its own gradient,
    come from `_sums_where_taps_see_the_map`); the gradient w.r.t. u is then the same
    convolution with the taps reversed.
    """
    return _pallas_conv(x, taps, _bias_or_table(taps, bias, input_bias, residual), residual, target, apply_gelu)


def _bias_or_table(taps, bias, input_bias, residual):
    return bias if input_bias is None else _edge_table(taps, bias, input_bias, residual)


def _forward(x, taps, bias, input_bias, residual, apply_gelu, target):
    out = _pallas_conv(x, taps, _bias_or_table(taps, bias, input_bias, residual), residual, target, apply_gelu,
                       keep_slope=apply_gelu)
    y, slope = out if apply_gelu else (out, None)
    return y, (x, taps, bias, slope, input_bias)


def _backward(residual, apply_gelu, target, saved, g):
    x, taps, bias, slope, input_bias = saved
    sums, g = _pallas_weight_grad(x, g, slope, target)
    du = _pallas_conv(g, taps[::-1], jnp.zeros(taps.shape[1:], taps.dtype), residual, target)
    d_taps, d_bias = sums[:9], sums[9]
    d_input_bias = None
    if input_bias is not None:
        # u = x + b: b's share of tap k's gradient is b times the sum of g where tap k sees the
        # map; and sum(du) = sum_k taps[k] * (that sum) (+ sum(g) with the residual).
        seen = _sums_where_taps_see_the_map(g, d_bias)
        d_taps = d_taps + input_bias.astype(seen.dtype) * seen
        d_input = jnp.sum(taps.astype(seen.dtype) * seen, 0)
        d_input_bias = (d_input + d_bias if residual else d_input).astype(input_bias.dtype)
    return du, d_taps.astype(taps.dtype), d_bias.astype(bias.dtype), d_input_bias


pallas_depthwise.defvjp(_forward, _backward)
