"""Model names -> configured modules. Every field of the pyramid can be overridden by name."""
import dataclasses
from typing import Dict, List

from shunted_jax.models import pvt_v2, shunted
from shunted_jax.models.pyramid import PyramidVisionTransformer

_VARIANTS: Dict[str, dict] = {**shunted.VARIANTS, **pvt_v2.VARIANTS}
_FIELDS = {f.name for f in dataclasses.fields(PyramidVisionTransformer)} - {"parent", "name"}


def list_models() -> List[str]:
    return sorted(_VARIANTS)


def variant_fields(name: str) -> dict:
    """The official settings of a named variant (a copy)."""
    if name not in _VARIANTS:
        raise ValueError(f"Unknown model {name!r}. Valid names: {', '.join(list_models())}.")
    return dict(_VARIANTS[name])


def create(name: str, **overrides) -> PyramidVisionTransformer:
    """Build a named variant, e.g. create("shunted_s", num_classes=10, drop_path_rate=0.2)."""
    fields = variant_fields(name)
    unknown = sorted(set(overrides) - _FIELDS)
    if unknown:
        raise ValueError(f"Unknown model field(s) {unknown} for {name!r}. Valid fields: {', '.join(sorted(_FIELDS))}.")
    fields.update(overrides)
    return PyramidVisionTransformer(**fields)
