"""Random in-memory data made with numpy only: for benchmarks, smoke tests and machines without TF.

Every batch is a pure function of (seed, process, step) for training and of (seed, batch) for
evaluation, so it resumes exactly and costs nothing to skip.
"""
import math
from typing import Iterator

import numpy as np

_TRAIN_STREAM, _EVAL_STREAM, _EVAL_LABELS_STREAM = 0, 1, 2


def _images(rng: np.random.Generator, count: int, image_size: int) -> np.ndarray:
    """Standard-normal pixels: the statistics of normalised real images, roughly."""
    return rng.standard_normal((count, image_size, image_size, 3), dtype=np.float32)


def train_batches(cfg, local_batch: int, process_index: int, start_step: int) -> Iterator[dict]:
    step = start_step
    while True:
        rng = np.random.default_rng([int(cfg.seed), _TRAIN_STREAM, process_index, step])
        yield {
            "image": _images(rng, local_batch, int(cfg.image_size)),
            "label": rng.integers(0, int(cfg.num_classes), local_batch, dtype=np.int32),
        }
        step += 1


def eval_counts(num_examples: int, process_count: int) -> list[int]:
    """Contiguous, near-equal shares: the first num_examples % process_count processes get one more."""
    base, extra = divmod(num_examples, process_count)
    return [base + (index < extra) for index in range(process_count)]


def eval_batches(cfg, local_batch: int, process_index: int, process_count: int) -> Iterator[dict]:
    num_examples = int(cfg.num_eval_examples)
    counts = eval_counts(num_examples, process_count)
    start = sum(counts[:process_index])
    labels = np.random.default_rng([int(cfg.seed), _EVAL_LABELS_STREAM]).integers(
        0, int(cfg.num_classes), num_examples, dtype=np.int32
    )[start : start + counts[process_index]]
    for batch in range(math.ceil(max(counts) / local_batch)):
        real = labels[batch * local_batch : (batch + 1) * local_batch]
        padding = local_batch - len(real)
        rng = np.random.default_rng([int(cfg.seed), _EVAL_STREAM, process_index, batch])
        images = _images(rng, local_batch, int(cfg.image_size))
        images[len(real) :] = 0.0
        yield {
            "image": images,
            "label": np.concatenate([real, np.zeros(padding, np.int32)]),
            "mask": np.arange(local_batch) < len(real),
        }
