"""Multiply-adds per image, counted from the traced program.

Counts what `torch.utils.flop_counter` counts (halved to MACs): matrix products and
convolutions; LayerNorm, softmax, activations and additions are free. Reading the jaxpr
instead of a hand-written formula means any ablation variant is counted correctly.
Matrix products with batch dimensions are the attention's (q k^T and A v); those without are
linear layers. Pooling written as a product (PVTv2-li's adaptive pool) is not counted.
"""
import re
from collections import defaultdict
from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from shunted_jax.models.attention import POOL_SCOPE

_STAGE = re.compile(r"(?:patch_embed|block|norm)(\d)\b")


def _sub_jaxprs(params):
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if hasattr(item, "eqns"):
                yield item
            elif hasattr(item, "jaxpr") and hasattr(item.jaxpr, "eqns"):
                yield item.jaxpr


def _eqn_macs(eqn) -> Tuple[str, int]:
    out = eqn.outvars[0].aval.shape
    if eqn.primitive.name == "dot_general":
        (lhs_contract, _), (lhs_batch, _) = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        kind = "attention" if lhs_batch else "linear"
        return kind, int(np.prod(out)) * int(np.prod([lhs[d] for d in lhs_contract]))
    kernel = eqn.invars[1].aval.shape
    out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
    return "conv", int(np.prod(out)) * int(np.prod(kernel)) // kernel[out_feature_dim]


def _stage_of(eqn) -> str:
    name = str(eqn.source_info.name_stack)
    match = _STAGE.search(name)
    return f"stage{match.group(1)}" if match else ("head" if "head" in name else "other")


def _walk(jaxpr, multiplier, totals):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("dot_general", "conv_general_dilated") and POOL_SCOPE not in str(
                eqn.source_info.name_stack):
            kind, macs = _eqn_macs(eqn)
            totals[(_stage_of(eqn), kind)] += macs * multiplier
        inner = multiplier * eqn.params.get("length", 1) if eqn.primitive.name == "scan" else multiplier
        for sub in _sub_jaxprs(eqn.params):
            _walk(sub, inner, totals)


def abstract_variables(model, image_hw=(224, 224)):
    """The shapes and dtypes of `model`'s variables for one image of `image_hw`, computed by
    tracing alone."""
    images = jax.ShapeDtypeStruct((1, *image_hw, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init({"params": jax.random.key(0)}, x), images)


def count_macs(model, image_hw=(224, 224), variables=None) -> Dict[str, Dict[str, int]]:
    """MACs per image of `model`'s inference forward at `image_hw`; `variables` (abstract or not),
    where the caller has them, saves tracing the initialisation again.

    Returns {"total": {"conv", "linear", "attention", "all"}, "stage1": {...}, ..., "head": {...}}.
    """
    # fused and Pallas kernels are custom calls the count cannot see; the space-to-depth stem
    # conv multiplies zero taps
    exact = dict(kernels="exact")
    if hasattr(model, "stem_space_to_depth"):
        exact["stem_space_to_depth"] = False
    model = model.clone(**exact)
    images = jax.ShapeDtypeStruct((1, *image_hw, 3), jnp.float32)
    variables = abstract_variables(model, image_hw) if variables is None else variables
    jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x))(variables, images)
    totals = defaultdict(int)
    _walk(jaxpr.jaxpr, 1, totals)
    table: Dict[str, Dict[str, int]] = defaultdict(lambda: {"conv": 0, "linear": 0, "attention": 0})
    for (part, kind), macs in totals.items():
        table[part][kind] += macs
        table["total"][kind] += macs
    for row in table.values():
        row["all"] = row["conv"] + row["linear"] + row["attention"]
    return dict(table)
