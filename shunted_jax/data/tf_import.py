"""The one place TensorFlow is imported: lazily, and hidden from every accelerator.

JAX owns the GPUs/TPUs. If TensorFlow saw them it would reserve their memory, so it is
restricted to the CPU right after import, before anything else in TF runs.
"""
import functools
import os
import sys


@functools.lru_cache(maxsize=None)
def tensorflow():
    """Returns the tensorflow module with GPUs and TPUs made invisible to it."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
    except ImportError as err:
        raise ImportError(
            "This dataset is read with TensorFlow Datasets, which is not installed here. "
            "Install it with `pip install tensorflow-cpu tensorflow-datasets`, "
            'or use data.name="synthetic", which needs no TensorFlow.'
        ) from err
    for device_type in ("GPU", "TPU"):
        try:
            tf.config.set_visible_devices([], device_type)
        except (RuntimeError, ValueError):
            pass  # no such devices, or TF already initialised them: nothing to hide then
    return tf


@functools.lru_cache(maxsize=None)
def tensorflow_datasets():
    """Returns tensorflow_datasets, importing TensorFlow first so the device restriction comes first.
    Its progress bars are off when stderr is not a terminal: a log file would keep every redraw."""
    tensorflow()
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise ImportError("Install TensorFlow Datasets with `pip install tensorflow-datasets`.") from err
    if not sys.stderr.isatty():
        tfds.disable_progress_bar()
    return tfds
