"""Random in-memory data made with numpy only: for benchmarks, smoke tests and machines without TF.

An iterator makes its images once and yields the same read-only arrays at every step, so that a
training run on synthetic data measures the step, not numpy (a float32 batch of 128 at 224^2
takes numpy a third of a second). Training batches are a pure function of (seed, process) and
evaluation batches of (seed, process, batch), so both resume exactly and cost nothing to skip.
"""
import math
from typing import Iterator

import numpy as np

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


def train_batches(cfg, local_batch: int, process_index: int, start_step: int) -> Iterator[dict]:
    """The same batch at every step, from start_step on as from step 0."""
    del start_step
    rng = np.random.default_rng([int(cfg.seed), _TRAIN_STREAM, process_index])
    batch = {
        "image": _images(rng, local_batch, int(cfg.image_size), cfg.synthetic_dtype),
        "label": _read_only(rng.integers(0, int(cfg.num_classes), local_batch, dtype=np.int32)),
    }
    while True:
        yield dict(batch)


def eval_counts(num_examples: int, process_count: int) -> list[int]:
    """Contiguous, near-equal shares: the first num_examples % process_count processes get one more."""
    base, extra = divmod(num_examples, process_count)
    return [base + (index < extra) for index in range(process_count)]


def eval_batches(cfg, local_batch: int, process_index: int, process_count: int) -> Iterator[dict]:
    """Every batch has the same images; labels differ, and padding (mask False) is all zeros."""
    num_examples = int(cfg.num_eval_examples)
    counts = eval_counts(num_examples, process_count)
    start = sum(counts[:process_index])
    labels = np.random.default_rng([int(cfg.seed), _EVAL_LABELS_STREAM]).integers(
        0, int(cfg.num_classes), num_examples, dtype=np.int32
    )[start : start + counts[process_index]]
    rng = np.random.default_rng([int(cfg.seed), _EVAL_STREAM, process_index])
    images = _images(rng, local_batch, int(cfg.image_size), cfg.synthetic_dtype)
    for batch in range(math.ceil(max(counts) / local_batch)):
        real = labels[batch * local_batch : (batch + 1) * local_batch]
        mask = np.arange(local_batch) < len(real)
        yield {
            "image": images if mask.all() else np.where(mask[:, None, None, None], images, images.dtype.type(0)),
            "label": np.concatenate([real, np.zeros(local_batch - len(real), np.int32)]),
            "mask": mask,
        }
