"""shunted_jax: the Shunted Transformer and PVT's attention designs in JAX/Flax."""

__version__ = "0.1.0"
