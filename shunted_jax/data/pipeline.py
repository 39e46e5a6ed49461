"""tf.data input pipelines: per-process, deterministic, resumable mid-epoch.

Training runs epoch by epoch. Epoch e of process p reads the source shuffled with a seed
derived from (cfg.seed, p, e), keeps the first steps_per_epoch * local_batch examples (the
few left over are dropped, different ones each epoch) and augments example i of the epoch
with stateless randomness seeded from (cfg.seed, p, e, i). A batch is therefore a pure
function of (cfg.seed, p, step), so resuming at step k re-reads only the skipped records
of the current epoch and decodes none of them.
"""
import dataclasses
import math
from typing import Callable, Iterator

import numpy as np

from shunted_jax.data import config as config_lib
from shunted_jax.data import registry
from shunted_jax.data.sources import make_source
from shunted_jax.data.tf_import import tensorflow

tf = tensorflow()

_SHUFFLE_STREAM, _AUGMENT_STREAM, _EVAL_STREAM = 0, 1, 2


def derived_seed(*numbers: int) -> int:
    """A well-mixed 31-bit seed from a tuple of small integers."""
    return int(np.random.SeedSequence([int(n) for n in numbers]).generate_state(1)[0] >> 1)


def _parallel_calls(cfg) -> int:
    return tf.data.AUTOTUNE if int(cfg.num_parallel_calls) < 0 else int(cfg.num_parallel_calls)


def _prefetch(cfg) -> int:
    return tf.data.AUTOTUNE if int(cfg.prefetch) < 0 else int(cfg.prefetch)


def _repeat_each(dataset, times: int):
    """Each example `times` times in a row (repeated augmentation: the copies get different seeds)."""
    if times == 1:
        return dataset
    return dataset.flat_map(lambda example: tf.data.Dataset.from_tensors(example).repeat(times))


def _finalise(features: dict) -> dict:
    return {"image": tf.cast(features["image"], tf.float32), "label": tf.cast(features["label"], tf.int32)}


@dataclasses.dataclass(frozen=True)
class _TrainPlan:
    """What stays fixed across the epochs of one process's training iterator."""

    source: object
    cfg: object
    preprocess: Callable
    steps: int
    local_batch: int
    process_index: int
    process_count: int

    def epoch_batches(self, epoch: int, first_step: int) -> Iterator[dict]:
        cfg, batch = self.cfg, self.local_batch
        shuffle_seed = derived_seed(cfg.seed, self.process_index, epoch, _SHUFFLE_STREAM)
        augment_seed = tf.constant(derived_seed(cfg.seed, self.process_index, epoch, _AUGMENT_STREAM), tf.int64)
        repeats = int(cfg.repeated_aug)
        examples = self.source.train_epoch(shuffle_seed, int(cfg.shuffle_buffer), self.process_index, self.process_count)
        examples = _repeat_each(examples.take(math.ceil(self.steps * batch / repeats)), repeats)
        examples = examples.take(self.steps * batch).skip(first_step * batch).enumerate(start=first_step * batch)
        augmented = examples.map(
            lambda index, ex: _finalise(self.preprocess(ex, tf.stack([augment_seed, index]))),
            num_parallel_calls=_parallel_calls(cfg),
            deterministic=True,
        )
        return augmented.batch(batch, drop_remainder=True).prefetch(_prefetch(cfg)).as_numpy_iterator()


def _endless(plan: _TrainPlan, epoch: int, first_step: int) -> Iterator[dict]:
    while True:
        yield from plan.epoch_batches(epoch, first_step)
        epoch, first_step = epoch + 1, 0


def train_batches(cfg, local_batch: int, process_index: int, process_count: int, start_step: int) -> Iterator[dict]:
    """Sets everything up now, so that bad input fails here rather than at the first batch."""
    source = make_source(cfg)
    preprocess = registry.build(config_lib.format_pp(cfg.pp_train, cfg))
    steps = config_lib.steps_per_epoch(source.num_train, local_batch * process_count, process_count)
    plan = _TrainPlan(source, cfg, preprocess, steps, local_batch, process_index, process_count)
    return _endless(plan, *divmod(start_step, steps))


def _padding(element_spec: dict, count: int):
    """`count` all-zero examples with mask False, shaped like the real ones."""
    shapes = {key: spec.shape for key, spec in element_spec.items()}
    if not all(shape.is_fully_defined() for shape in shapes.values()):
        raise ValueError(
            f"the evaluation preprocessing gives images of unknown shape {shapes['image']}; "
            "end data.pp_eval with a fixed-size op such as center_crop(SIZE) or resize(SIZE)."
        )
    zeros = {key: tf.zeros(spec.shape, spec.dtype) for key, spec in element_spec.items()}
    zeros["mask"] = tf.constant(False)
    return tf.data.Dataset.from_tensors(zeros).repeat(count)


def eval_batches(cfg, local_batch: int, process_index: int, process_count: int) -> Iterator[dict]:
    source = make_source(cfg)
    preprocess = registry.build(config_lib.format_pp(cfg.pp_eval, cfg))
    counts = source.eval_counts(process_count)
    num_batches = math.ceil(max(counts) / local_batch)
    eval_seed = tf.constant([derived_seed(cfg.seed, _EVAL_STREAM), 0], tf.int64)
    examples = source.eval_examples(process_index, process_count).map(
        lambda ex: {**_finalise(preprocess(ex, eval_seed)), "mask": tf.constant(True)},
        num_parallel_calls=_parallel_calls(cfg),
        deterministic=True,
    )
    padded = examples.concatenate(_padding(examples.element_spec, num_batches * local_batch - counts[process_index]))
    return padded.batch(local_batch, drop_remainder=True).prefetch(_prefetch(cfg)).as_numpy_iterator()
