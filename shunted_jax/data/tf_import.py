"""The one place TensorFlow is imported: lazily, and hidden from every accelerator; and where its
iterators are closed before Python exits.

JAX owns the GPUs/TPUs. If TensorFlow saw them it would reserve their memory, so it is
restricted to the CPU right after import, before anything else in TF runs.

tensorflow 2.21: a tf.data iterator destroyed while Python finalizes waits forever for its threads
when they run Python (the PIL resize is a `tf.numpy_function`), since they cannot take the
interpreter then: a script that still holds a train or evaluation iterator when it ends hangs (a
split of a few batches shows it at once). `closed_at_exit` closes such iterators first, while their
threads can still finish. It can go when tests/test_data_pipeline.py's
`test_a_script_that_ends_holding_its_iterators_exits` passes with `closed_at_exit` returning its
argument unregistered.
"""
import atexit
import functools
import os
import sys
import weakref
from typing import Generator

_OPEN_ITERATORS = weakref.WeakSet()


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


def closed_at_exit(batches: Generator) -> Generator:
    """`batches` (a generator over a tf.data iterator), closed when Python exits if still open."""
    _OPEN_ITERATORS.add(batches)
    return batches


@atexit.register
def _close_open_iterators() -> None:
    for batches in list(_OPEN_ITERATORS):
        if not batches.gi_running:  # one a daemon thread is reading stays: closing it would raise
            batches.close()
