"""The Pallas depthwise kernels (run by Pallas' interpreter on the CPU) against XLA's convolution."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.models import fixture_model_and_variables
from helpers.models import outputs_and_grads as module_outputs_and_grads

from shunted_jax import kernels
from shunted_jax.kernels.common import local_device, target_for
from shunted_jax.kernels.depthwise import Tiling, _edge_table, _pallas_conv, _pallas_weight_grad
from shunted_jax.models.layers import DepthwiseConv3x3


def outputs_and_grads(module, variables, x, cotangent, input_bias=None):
    """`helpers.models.outputs_and_grads` of the conv of u = x + input_bias, the bias handed over
    as fc1 hands it (a `kernels.PendingBias`) when given: the gradients w.r.t. x and input_bias."""
    u = x if input_bias is None else kernels.PendingBias(x, input_bias)
    return module_outputs_and_grads(module, variables, u, cotangent)


@pytest.mark.parametrize("shape, residual, apply_gelu, input_bias", [
    ((2, 7, 7, 64), False, False, False),  # the stage-4 grid, one 64-channel block
    ((2, 6, 10, 96), True, False, True),   # H != W, a width that is no power of two, 32-channel blocks,
                                           # the producer's bias in the edge table
    ((1, 5, 3, 32), True, True, True),     # the FFN: GELU(u + DWConv(u)), u = fc1's product + its bias
    ((2, 4, 6, 64), False, True, True),    # PVTv2's FFN: GELU(DWConv(u))
    ((1, 1, 1, 32), True, True, True),     # maps of one pixel, one row and one column: neighbours in
    ((1, 1, 4, 32), True, False, True),    # the padding on every side, above and below, left and right
    ((1, 3, 1, 32), False, True, True),
])
def test_pallas_kernels_match_xla_convolution_in_float64(shape, residual, apply_gelu, input_bias):
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        x, cotangent = (jnp.asarray(rng.standard_normal(shape)) for _ in range(2))
        b = jnp.asarray(rng.standard_normal(shape[-1])) if input_bias else None
        xla, pallas = (DepthwiseConv3x3(shape[-1], residual, apply_gelu, dtype=jnp.float64, param_dtype=jnp.float64,
                                        kernels=f"depthwise={impl}") for impl in ("xla", "pallas"))
        variables = xla.init(jax.random.key(0), x)
        variables = jax.tree.map(lambda a: a + jnp.asarray(rng.standard_normal(a.shape)), variables)  # a bias
        want, _, want_grads = outputs_and_grads(xla, variables, x, cotangent, b)
        inferred, trained, got_grads = outputs_and_grads(pallas, variables, x, cotangent, b)
        assert inferred.dtype == trained.dtype == jnp.float64
        # The fused GELU and its slope use an erfc fit (relative error 1.1e-7 in float64); the
        # rest is exact.
        for got in (inferred, trained):
            np.testing.assert_allclose(got, want, rtol=2e-7 if apply_gelu else 0, atol=1e-12)
        for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
            np.testing.assert_allclose(g, w, atol=(2e-7 * np.abs(w).max() if apply_gelu else 0) + 1e-11)


def test_edge_table_stays_in_the_accumulator_dtype_under_x64():
    """A float64 table (or GELU constant) would reach the float32 kernel of a bfloat16 map."""
    with jax.enable_x64(True):
        taps, bias = jnp.ones((9, 32), jnp.bfloat16), jnp.ones((32,), jnp.bfloat16)
        assert _edge_table(taps, bias, bias, residual=True).dtype == jnp.float32


def test_pallas_kernels_in_bfloat16_stay_close_to_float32():
    """On a GPU this runs the Triton kernels themselves: bfloat16 forward and gradients against
    XLA's convolution in float32 on the same (bfloat16-rounded) numbers."""
    shape = (2, 9, 9, 64)
    x, cotangent = (jax.random.normal(jax.random.key(i), shape).astype(jnp.bfloat16) for i in (1, 2))
    input_bias = jax.random.normal(jax.random.key(3), shape[-1:]).astype(jnp.bfloat16)
    xla = DepthwiseConv3x3(64, True, True, kernels="depthwise=xla")
    pallas = DepthwiseConv3x3(64, True, True, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, kernels="depthwise=pallas")
    variables = jax.tree.map(lambda a: a.astype(jnp.bfloat16), xla.init(jax.random.key(0), x))
    as_float32 = lambda tree: jax.tree.map(lambda a: np.asarray(a, np.float32), tree)  # noqa: E731
    want, _, want_grads = outputs_and_grads(xla, *as_float32((variables, x, cotangent, input_bias)))
    inferred, trained, got_grads = outputs_and_grads(pallas, variables, x, cotangent, input_bias)
    assert inferred.dtype == trained.dtype == jnp.bfloat16
    got = as_float32((inferred, trained, got_grads))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves((want, want, want_grads))):
        assert np.abs(g - w).max() <= 0.01 * np.abs(w).max()


def test_depthwise_conv_refuses_a_map_of_another_width():
    conv = DepthwiseConv3x3(32, kernels="depthwise=pallas")
    with pytest.raises(ValueError, match="32 channels, got shape"):
        conv.init(jax.random.key(0), jnp.zeros((1, 5, 5, 64)))


def grouped_convolutions(model, variables, images):
    jaxpr = str(jax.make_jaxpr(lambda v, x: model.apply(v, x))(variables, images))
    return sum(int(groups) > 1 for groups in re.findall(r"feature_group_count=(\d+)", jaxpr))


def test_every_depthwise_conv_of_the_model_takes_the_pallas_path():
    """The tiny Shunted fixture with kernels="depthwise=pallas": no grouped convolution is left in
    the program, and the official float64 logits still hold."""
    with jax.enable_x64(True):
        arrays, model, variables, images = fixture_model_and_variables("tiny_shunted_64x48", jnp.float64)
        pallas = model.clone(kernels="depthwise=pallas")
        assert grouped_convolutions(model, variables, images) > 0
        assert grouped_convolutions(pallas, variables, images) == 0
        logits = jax.jit(pallas.apply)(variables, images)
        np.testing.assert_allclose(logits, arrays["logits_fp64"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("conv_tiling, grad_tiling", [
    (Tiling(block_w=4, block_c=32, warps=8), Tiling(block_w=4, block_c=32, warps=4, block_h=2)),
    (Tiling(block_w=2, block_c=64, warps=4), Tiling(block_w=8, block_c=64, warps=8, block_h=1)),
])
def test_every_tiling_computes_the_same_sums(conv_tiling, grad_tiling):
    """Strips of columns (the last one partly outside a 6-wide map), of rows, and other channel
    blocks give the default tiling's results in float64: forward exactly, the weight gradient's
    sums (added in another order) to rounding."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        x, g, slope = (jnp.asarray(rng.standard_normal((2, 4, 6, 64))) for _ in range(3))
        taps, bias = jnp.asarray(rng.standard_normal((9, 64))), jnp.asarray(rng.standard_normal(64))
        target = target_for(jnp.float64, local_device())
        conv = functools.partial(_pallas_conv, x, taps, bias, True, target, apply_gelu=True, keep_slope=True)
        for got, want in zip(conv(tiling=conv_tiling), conv()):
            np.testing.assert_array_equal(got, want)
        for got, want in zip(_pallas_weight_grad(x, g, slope, target, grad_tiling),
                             _pallas_weight_grad(x, g, slope, target)):
            np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13)


def test_a_tiling_that_does_not_divide_the_map_is_refused():
    x = jnp.zeros((1, 4, 4, 64), jnp.float32)
    target = target_for(jnp.float32, local_device())
    with pytest.raises(ValueError, match="does not tile a map"):
        _pallas_conv(x, jnp.zeros((9, 64)), jnp.zeros(64), False, target, tiling=Tiling(4, 48, 4))
