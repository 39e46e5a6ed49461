"""How the models' operations run: Pallas kernels, cuDNN or XLA, chosen in one place (`dispatch`).

Models call `attention`, `depthwise_conv3x3` and `layer_norm` with their `kernels` field. Traced
under a mesh in context, each Pallas kernel runs on each device's share of the batch.
"""
from shunted_jax.kernels.dispatch import (
    IMPLEMENTATIONS,
    Choice,
    PendingBias,
    attention,
    depthwise_conv3x3,
    exact_attention,
    layer_norm,
    parse,
)

__all__ = ["IMPLEMENTATIONS", "Choice", "PendingBias", "attention", "depthwise_conv3x3", "exact_attention",
           "layer_norm", "parse"]
