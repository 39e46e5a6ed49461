"""Model names -> configured modules. Every field of a model can be overridden by name."""
import ast
import dataclasses
from typing import Dict, List, Tuple, Type

import flax.linen as nn
import jax.numpy as jnp

from shunted_jax import kernels
from shunted_jax.models import pvt_v2, shunted, vit
from shunted_jax.models.pyramid import PyramidVisionTransformer
from shunted_jax.models.vit import VisionTransformer

_VARIANTS: Dict[str, Tuple[Type[nn.Module], dict]] = {
    **{name: (PyramidVisionTransformer, fields) for name, fields in {**shunted.VARIANTS, **pvt_v2.VARIANTS}.items()},
    **{name: (VisionTransformer, fields) for name, fields in vit.VARIANTS.items()},
}
OFFICIAL_FAMILY = PyramidVisionTransformer  # the variants with released PyTorch checkpoints


def list_models(official_only: bool = False) -> List[str]:
    """All names, or only those of the official models (the ones `convert` can load)."""
    return sorted(n for n, (cls, _) in _VARIANTS.items() if not official_only or cls is OFFICIAL_FAMILY)


def _lookup(name: str):
    if name not in _VARIANTS:
        raise ValueError(f"Unknown model {name!r}. Valid names: {', '.join(list_models())}.")
    return _VARIANTS[name]


def variant_fields(name: str) -> dict:
    """The settings of a named variant (a copy)."""
    return dict(_lookup(name)[1])


def model_fields(name: str) -> dict:
    """Every field of the variant's model class but `num_classes` (the dataset sets it), the
    variant's settings over the class defaults, dtypes by name: what a config lists so that each
    field can be overridden by name."""
    cls, fields = _lookup(name)
    defaults = {f.name: f.default for f in dataclasses.fields(cls)
                if f.name not in ("parent", "name", "num_classes") and f.default is not dataclasses.MISSING}
    merged = {**defaults, **fields}
    return {key: jnp.dtype(value).name if key.endswith("dtype") else value for key, value in merged.items()}


def create(name: str, **overrides) -> nn.Module:
    """Build a named variant, e.g. create("shunted_s", num_classes=10, drop_path_rate=0.2)."""
    cls, fields = _lookup(name)
    valid = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(f"Unknown model field(s) {unknown} for {name!r}. Valid fields: {', '.join(sorted(valid))}.")
    model = cls(**{**fields, **overrides})
    kernels.parse(model.kernels)
    return model


def feature_info(name: str, **overrides) -> list:
    """Each stage's channels (`num_chs`), stride (`reduction`) and output module, as timm's
    `feature_info`: what a detection or segmentation head is built from."""
    model = create(name, **overrides)
    if not isinstance(model, PyramidVisionTransformer):
        raise ValueError(f"{name!r} is single-scale and has no stages; the pyramid models are "
                         f"{', '.join(list_models(official_only=True))}")
    return model.feature_info()


def parse_overrides(items) -> dict:
    """`field=value` strings -> model overrides, values read as Python literals."""
    overrides = {}
    for item in items:
        field, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"a model field override is field=value, got {item!r}")
        try:
            overrides[field] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[field] = value
    return overrides
