"""Models: `create(name, **overrides)`, `list_models()`, and the layers they are built from."""
from shunted_jax.models.pyramid import PyramidVisionTransformer
from shunted_jax.models.registry import create, list_models, model_fields, parse_overrides, variant_fields

__all__ = ["PyramidVisionTransformer", "create", "list_models", "model_fields", "parse_overrides", "variant_fields"]
