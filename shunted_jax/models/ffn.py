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

from shunted_jax.models.depthwise import DepthwiseConv3x3
from shunted_jax.models.layers import DenseWithDeferredBias, dense, gelu

Dtype = Any

FFN_KINDS = ("detail", "pvt", "pvt_linear", "plain")


class FeedForward(nn.Module):
    hidden_dim: int
    kind: str = "detail"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    depthwise_impl: str = "xla"

    @nn.compact
    def __call__(self, x):
        if self.kind not in FFN_KINDS:
            raise ValueError(f"Unknown FFN kind {self.kind!r}; choose one of {FFN_KINDS}.")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.kind in ("detail", "pvt"):
            # fc1's bias goes to the depthwise conv: the Pallas kernel folds it into its own bias
            # instead of a pass over the hidden map
            u, fc1_bias = DenseWithDeferredBias(self.hidden_dim, name="fc1", **kw)(x)
            y = DepthwiseConv3x3(self.hidden_dim, self.depthwise_impl, residual=self.kind == "detail",
                                 apply_gelu=True, name="dwconv", **kw)(u, input_bias=fc1_bias)
        else:
            u = dense(self.hidden_dim, name="fc1", **kw)(x)
            if self.kind == "plain":
                y = gelu(u)
            else:
                y = DepthwiseConv3x3(self.hidden_dim, self.depthwise_impl, apply_gelu=True, name="dwconv",
                                     **kw)(nn.relu(u))
        return dense(x.shape[-1], name="fc2", **kw)(y)
