"""How the models' operations run: Pallas kernels, cuDNN or XLA, chosen in one place (`dispatch`).

Models call `attention`, `depthwise_conv3x3` and `layer_norm` with their `kernels` field; the
training code resolves that field for its mesh with `resolve_for_mesh` before creating the model.
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
    resolve_for_mesh,
)

__all__ = ["IMPLEMENTATIONS", "Choice", "PendingBias", "attention", "depthwise_conv3x3", "exact_attention",
           "layer_norm", "parse", "resolve_for_mesh"]
