"""Feed-forward layers on an NHWC map.

kinds:
  "detail"      Shunted's detail-specific FFN:  fc1 -> GELU(u + DWConv(u)) -> fc2
  "pvt"         PVTv2's FFN:                    fc1 -> GELU(DWConv(u)) -> fc2
  "pvt_linear"  PVTv2-li's FFN:                 fc1 -> ReLU -> GELU(DWConv(.)) -> fc2
  "plain"       the transformer MLP:            fc1 -> GELU -> fc2
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from shunted_jax.models.layers import DenseWithPendingBias, DepthwiseConv3x3, dense, gelu

Dtype = Any

FFN_KINDS = ("detail", "pvt", "pvt_linear", "plain")


class FeedForward(nn.Module):
    hidden_dim: int
    kind: str = "detail"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x):
        if self.kind not in FFN_KINDS:
            raise ValueError(f"Unknown FFN kind {self.kind!r}; choose one of {FFN_KINDS}.")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dwconv = DepthwiseConv3x3(self.hidden_dim, residual=self.kind == "detail", apply_gelu=True,
                                  kernels=self.kernels, name="dwconv", **kw)
        if self.kind == "plain":
            y = gelu(dense(self.hidden_dim, name="fc1", **kw)(x))
        elif self.kind == "pvt_linear":
            y = dwconv(nn.relu(dense(self.hidden_dim, name="fc1", **kw)(x)))
        else:
            u = DenseWithPendingBias(self.hidden_dim, name="fc1", **kw)(x)
            y = dwconv(u)  # GELU(u + DWConv(u)), or GELU(DWConv(u)) for "pvt"
        return dense(x.shape[-1], name="fc2", **kw)(y)
