"""Every Pallas kernel, forward and backward, lowers for a CUDA GPU to a Triton call, whatever
Pallas' default GPU backend (Mosaic GPU in some JAX releases, which these kernels are not
written for). Lowering needs no GPU, so this runs on the CPU."""
import functools

import jax
import jax.numpy as jnp
import pytest

from shunted_jax.kernels.common import Target
from shunted_jax.kernels.depthwise import pallas_depthwise
from shunted_jax.kernels.norm import pallas_layer_norm
from shunted_jax.kernels.short_attention import short_attention

COMPILED = Target(interpret=False, fast_math=True)
BF16 = jnp.bfloat16


def _depthwise(x):
    channels = x.shape[-1]
    taps, bias = jnp.ones((9, channels), BF16), jnp.zeros((channels,), BF16)
    return pallas_depthwise(x, taps, bias, bias, residual=True, apply_gelu=True, target=COMPILED)


def _layer_norm(x):
    scale, bias = jnp.ones(x.shape[-1:], jnp.float32), jnp.zeros(x.shape[-1:], jnp.float32)
    return pallas_layer_norm(x, scale, bias, 1e-6, apply_gelu=True, dtype=BF16, target=COMPILED)


def _attention(x):
    return short_attention(x, x[:, :49], x[:, :49], 0.125, COMPILED)


@pytest.fixture
def mosaic_gpu_by_default():
    """Pallas' GPU default switched to Mosaic GPU, restored after the test."""
    before = jax.config.jax_pallas_use_mosaic_gpu
    jax.config.update("jax_pallas_use_mosaic_gpu", True)
    yield
    jax.config.update("jax_pallas_use_mosaic_gpu", before)


@pytest.mark.parametrize("kernel, shape", [(_depthwise, (2, 8, 8, 64)), (_layer_norm, (128, 64)),
                                           (_attention, (2, 64, 2, 32))])
def test_each_kernel_lowers_to_triton_for_cuda(mosaic_gpu_by_default, kernel, shape):
    loss = lambda x: jnp.sum(kernel(x).astype(jnp.float32))  # noqa: E731
    x = jax.ShapeDtypeStruct(shape, BF16)
    for function in (kernel, jax.grad(loss)):
        text = jax.jit(function).trace(x).lower(lowering_platforms=("cuda",)).as_text()
        targets = {line.split("custom_call @")[1].split("(")[0] for line in text.splitlines() if "custom_call @" in line}
        assert targets == {"__gpu$xla.gpu.triton"}, targets
