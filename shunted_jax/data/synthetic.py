"""Random in-memory data made with numpy only: for benchmarks, smoke tests and machines without TF.

An iterator makes its images once and yields the same read-only arrays at every step, so that a
training run on synthetic data measures the step, not numpy (a float32 batch of 128 at 224^2
takes numpy a third of a second). Training batches are a pure function of (seed, process) and
evaluation batches of (seed, process, batch), so both resume exactly and cost nothing to skip.
"""
import itertools
import math
from typing import Iterator

import numpy as np

from shunted_jax.data.config import local_batch_size

_TRAIN_STREAM, _EVAL_STREAM, _EVAL_LABELS_STREAM = 0, 1, 2


def _read_only(array: np.ndarray) -> np.ndarray:
    """Shared by every step: nobody may change it in place."""
    array.setflags(write=False)
    return array


def _images(rng: np.random.Generator, count: int, image_size: int, dtype: str) -> np.ndarray:
    """float32: standard-normal pixels, roughly the statistics of normalised real images;
    uint8: uniform pixels, as the uint8 host pipeline gives before normalisation."""
    shape = (count, image_size, image_size, 3)
    if dtype == "uint8":
        return _read_only(rng.integers(0, 256, shape, dtype=np.uint8))
    return _read_only(rng.standard_normal(shape, dtype=np.float32))


def train_batches(cfg, global_batch_size: int, process_index: int, process_count: int) -> Iterator[dict]:
    """This process's share of the global batch: the same batch at every step, so any step resumes it."""
    local_batch = local_batch_size(global_batch_size, process_count)
    rng = np.random.default_rng([int(cfg.seed), _TRAIN_STREAM, process_index])
    batch = {
        "image": _images(rng, local_batch, int(cfg.image_size), cfg.synthetic_dtype),
        "label": _read_only(rng.integers(0, int(cfg.num_classes), local_batch, dtype=np.int32)),
    }
    return (dict(batch) for _ in itertools.count())


def eval_counts(num_examples: int, process_count: int) -> list[int]:
    """Contiguous, near-equal shares: the first num_examples % process_count processes get one more."""
    base, extra = divmod(num_examples, process_count)
    return [base + (index < extra) for index in range(process_count)]


def eval_batches(cfg, global_batch_size: int, process_index: int, process_count: int) -> Iterator[dict]:
    """Every batch has the same images; labels differ, and padding (mask False) is all zeros."""
    local_batch = local_batch_size(global_batch_size, process_count)
    num_examples = int(cfg.num_eval_examples)
    counts = eval_counts(num_examples, process_count)
    start = sum(counts[:process_index])
    labels = np.random.default_rng([int(cfg.seed), _EVAL_LABELS_STREAM]).integers(
        0, int(cfg.num_classes), num_examples, dtype=np.int32
    )[start : start + counts[process_index]]
    rng = np.random.default_rng([int(cfg.seed), _EVAL_STREAM, process_index])
    images = _images(rng, local_batch, int(cfg.image_size), cfg.synthetic_dtype)
    starts = range(0, math.ceil(max(counts) / local_batch) * local_batch, local_batch)
    return (_padded(images, labels[first : first + local_batch]) for first in starts)


def _padded(images: np.ndarray, real_labels: np.ndarray) -> dict:
    """A batch of `images` whose first len(real_labels) examples are real (mask True), the rest zeros."""
    mask = np.arange(len(images)) < len(real_labels)
    return {
        "image": images if mask.all() else np.where(mask[:, None, None, None], images, images.dtype.type(0)),
        "label": np.concatenate([real_labels, np.zeros(len(images) - len(real_labels), np.int32)]),
        "mask": mask,
    }
