"""Test-wide JAX settings (8 simulated CPU devices, XLA:CPU's quicker optimisation level, a
persistent compilation cache) and the order in which the workers take the tests.

The settings must be made before JAX initialises its backends, hence at import of this file.
"""
import os
import pathlib

# LLVM's O1 instead of XLA:CPU's default O2: the tests' programs compile in a third of the time
# for parameter initialisation (all those random-number fusions) and run as fast.
QUICK_COMPILE_FLAGS = "--xla_backend_optimization_level=1"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {QUICK_COMPILE_FLAGS}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
JAX_CACHE = REPO / ".jax_cache"
jax.config.update("jax_compilation_cache_dir", str(JAX_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

DATA_DIR = pathlib.Path(__file__).resolve().parent / "data"

# The tests (and groups, see work_unit) that take minutes on 2 CPU cores, longest first, from
# `pytest --durations` of the whole suite; a test takes the rank of the first prefix it starts with.
# With `--dist loadgroup` a worker takes the next unit when it is free, so these go first and the
# quick tests fill in around them: both workers finish together.
LONGEST_FIRST = (
    "tests/test_ablate.py::test_notebook_small_setting_has_a_finite_row_per_variant",
    "tests/test_train_loop.py::test_two_processes_train_and_checkpoint_together",
    "tests/test_train_loop.py",
    "tests/test_faults.py",
    "tests/test_train_step.py",
    "tests/test_kernels_mesh.py",
    "tests/test_models.py::test_bfloat16_forward_and_backward_are_finite",
)


def work_unit(item) -> str:
    """The module, for a test that uses a module-scoped fixture (often a compiled step or a training
    run: one worker computes it once for all its tests); the test itself otherwise."""
    fixtures = item._fixtureinfo.name2fixturedefs.values()
    return item.module.__name__ if any(definitions[-1].scope == "module" for definitions in fixtures) else item.nodeid


def rank(nodeid: str) -> int:
    return next((i for i, prefix in enumerate(LONGEST_FIRST) if nodeid.startswith(prefix)), len(LONGEST_FIRST))


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items):
    """Each work unit an xdist group, the units with the longest tests first, the others in their order."""
    unit_rank = {}
    for item in items:
        unit = work_unit(item)
        if unit != item.nodeid:
            item.add_marker(pytest.mark.xdist_group(unit))
        unit_rank[unit] = min(unit_rank.get(unit, len(LONGEST_FIRST)), rank(item.nodeid))
    items.sort(key=lambda item: unit_rank[work_unit(item)])
