"""Models: `create(name, **overrides)`, `list_models()`, `feature_info(name)`, and the layers they are built from."""
from shunted_jax.models.pyramid import PyramidVisionTransformer
from shunted_jax.models.registry import (create, feature_info, list_models, model_fields, parse_overrides,
                                         variant_fields)

__all__ = ["PyramidVisionTransformer", "create", "feature_info", "list_models", "model_fields", "parse_overrides",
           "variant_fields"]
