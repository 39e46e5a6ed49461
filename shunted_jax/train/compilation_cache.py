"""JAX's persistent compilation cache, so that a restarted run loads its compiled steps instead of
compiling them again (a minute for a large model on a GPU)."""
import os

import jax

DEFAULT_DIR = os.path.join(os.path.expanduser("~"), ".cache", "shunted_jax", "jax")
# Programs that compile faster than this are not worth a file each.
MIN_COMPILE_SECONDS = 1.0


def enable(directory: str) -> None:
    """Caches compiled programs in `directory` (a leading ~ is expanded). An empty `directory`
    leaves JAX's own setting as it is: off, unless $JAX_COMPILATION_CACHE_DIR or an earlier
    `jax.config.update` chose one. Call before the first compile."""
    if directory:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(directory))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
