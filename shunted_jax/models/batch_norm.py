"""BatchNorm over every axis but the channels, keeping its running statistics as PyTorch does.

Written here because `nn.BatchNorm` updates the running variance with the biased batch variance,
where PyTorch's BatchNorm2d (the official recipe) uses the unbiased one, n/(n-1) times it; both
normalise with the biased one. Statistics are at least float32; the variance is E[x^2] - E[x]^2,
one pass over the map as in nn.BatchNorm (PyTorch's two-pass variance reads the map once more;
in float64 the two agree far below the training parity tests' 1e-9). The variables are nn.BatchNorm's ('scale', 'bias'; batch_stats 'mean', 'var'), so
existing and converted checkpoints load unchanged.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


class BatchNorm(nn.Module):
    """`momentum` weighs the old running value (PyTorch's momentum 0.1 is 0.9 here)."""

    use_running_average: bool
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        features = (x.shape[-1],)
        scale = self.param("scale", nn.initializers.ones, features, self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, features, self.param_dtype)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, features, jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, features, jnp.float32)
        x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        if self.use_running_average:
            mean, var = running_mean.value, running_var.value
        else:
            axes = tuple(range(x.ndim - 1))
            count = x.size // x.shape[-1]
            if count < 2:
                raise ValueError(f"{self.name}: training BatchNorm needs more than one value per channel, "
                                 f"got input shape {x.shape}; use a larger batch or image.")
            mean = x.mean(axes)
            var = jnp.maximum(jnp.square(x).mean(axes) - jnp.square(mean), 0.0)
            if not self.is_initializing():
                running_mean.value = self._average(running_mean.value, mean)
                running_var.value = self._average(running_var.value, var * (count / (count - 1)))
        y = (x - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
        return y.astype(self.dtype)

    def _average(self, running, batch):
        return (self.momentum * running + (1 - self.momentum) * batch).astype(running.dtype)
