"""What the project does around its dependencies' behaviour, in one place: each names the version
it was written against and how to tell when it can go.

tensorboardX 2.6.5 imports PyTorch whenever PyTorch is installed (its writer accepts torch
tensors): seconds of every start, for a writer of Python floats. `import_tensorboardx` imports it
as if PyTorch were absent. It can go when, with PyTorch installed,
`python -X importtime -c "import tensorboardX" 2>&1 | grep -w torch` prints nothing.

orbax-checkpoint 0.12.8 and tensorflow-datasets 4.9.10 log through absl's one logger (`from absl
import logging` in each module), so only a record's source file tells theirs from ours:
`LibraryRecordFilter` drops orbax's records and the INFO lines of tfds and JAX. It can go when
they log through loggers of their own, which `logging.getLogger(name).setLevel` quiets: when
`grep -rl "from absl import logging"` over their installed packages finds nothing.

orbax-checkpoint 0.12.8: when one read of a restore fails, orbax closes its event loop with the
other reads pending; each is collected later and its coroutine reports "Encountered error while
reading array index" to sys.unraisablehook (one per array shard: thousands of traceback lines).
A failed save leaves "Event loop is closed" reports the same way. `drop_orbax_leftovers` drops
them. It can go when a run resuming past a damaged checkpoint (tests/test_faults.py,
`truncate_a_data_file`) prints no such report with the hook left out of `console.quiet_logging`.

jaxlib 0.10.2: XLA:CPU serializes an executable that JAX's persistent cache served without its
functions, and the copy fails when run ("Function ... not found"); a CUDA one serialized whole,
and the loaded copy trained to the same losses (BENCHMARKS.md, "Restart"). ROCm and TPUs are
unchecked. `keeps_served_steps` says where such a step may be kept. It can go when
tests/test_compilation_cache.py::test_a_kept_step_that_does_not_run_is_deleted_and_compiled_instead
fails because XLA:CPU's copy runs.
"""
import logging
import pathlib
import sys

# Platforms whose executables served by JAX's persistent cache serialize whole.
PLATFORMS_KEEPING_SERVED_STEPS = ("cuda",)

# Libraries whose INFO lines say what they do at every start ("Unable to initialize backend
# 'tpu'", "Load dataset info from ..."); their warnings and errors still print.
_INFO_CHATTY = frozenset({"jax", "tensorflow_datasets"})


def import_tensorboardx():
    """tensorboardX, imported without PyTorch unless PyTorch is already imported."""
    if "torch" in sys.modules:
        import tensorboardX
        return tensorboardX
    sys.modules["torch"] = None  # makes `import torch` raise ImportError
    try:
        import tensorboardX
    finally:
        del sys.modules["torch"]
    return tensorboardX


def _folders(path: str) -> set:
    """The folder names on a source file's path (its package and those above it)."""
    return set(pathlib.PurePath(path.replace("\\", "/")).parts[:-1])


class LibraryRecordFilter(logging.Filter):
    """Drops the log records emitted from orbax's source files (its per-save INFO lines and the
    per-array ERROR lines of a failed write, which our own one-line error replaces), and the INFO
    records of `_INFO_CHATTY`'s packages."""

    def filter(self, record: logging.LogRecord) -> bool:
        folders = _folders(record.pathname)
        if "orbax" in folders:
            return False
        return record.levelno > logging.INFO or not folders & _INFO_CHATTY


def _is_orbax_leftover(info) -> bool:
    """Whether an unraisable error comes from orbax's work abandoned after a failure."""
    code = getattr(info.object, "cr_code", None)
    if code is not None and "orbax" in _folders(code.co_filename):
        return True
    return isinstance(info.exc_value, RuntimeError) and "Event loop is closed" in str(info.exc_value)


def drop_orbax_leftovers(hook):
    """`hook` (a sys.unraisablehook) without the reports of `_is_orbax_leftover`; any other
    unraisable error still reaches it."""
    def unraisable(info):
        if not _is_orbax_leftover(info):
            hook(info)
    return unraisable


def platform_name(device) -> str:
    """Where `device` runs: "cpu", "tpu", or a GPU's runtime ("cuda", "rocm"), as JAX names both
    GPU platforms "gpu"; a GPU of another runtime stays "gpu"."""
    client = device.client
    version = client.platform_version.lower()
    runtime = next((name for name in ("cuda", "rocm") if name in version), "gpu")
    return runtime if client.platform == "gpu" else client.platform


def keeps_served_steps(device) -> bool:
    """Whether an executable for `device` that JAX's persistent cache served may be kept."""
    return platform_name(device) in PLATFORMS_KEEPING_SERVED_STEPS
