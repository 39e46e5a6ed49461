"""Building blocks shared by every model family: initialisers, convs, norms, drop path.

Each helper pins down one detail that the official PyTorch code fixes and Flax's
defaults get wrong (GELU form, LayerNorm eps, symmetric padding, the depthwise fan-out).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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


def dense(features: int, *, name: str, dtype: Dtype, param_dtype: Dtype) -> nn.Dense:
    return nn.Dense(features, kernel_init=dense_kernel_init, dtype=dtype, param_dtype=param_dtype, name=name)


class DenseWithDeferredBias(nn.Module):
    """nn.Dense's parameters ('kernel', 'bias') and product, with the bias returned instead of
    added: for a consumer that adds it itself (the Pallas depthwise kernel after fc1)."""

    features: int
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", dense_kernel_init, (x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ()))), bias


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
