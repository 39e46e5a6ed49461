"""Test-wide JAX settings: 8 simulated CPU devices and a persistent compilation cache.

Both must be set before JAX initialises its backends, hence at import of this file.
"""
import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

_CACHE = pathlib.Path(__file__).resolve().parent.parent / ".jax_cache"
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

DATA_DIR = pathlib.Path(__file__).resolve().parent / "data"
