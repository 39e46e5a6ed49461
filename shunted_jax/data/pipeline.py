"""tf.data input pipelines: per-process, deterministic, resumable mid-epoch.

Training runs epoch by epoch. Epoch e of process p reads the source shuffled with a seed
derived from (cfg.seed, p, e), keeps the first steps_per_epoch * local_batch examples (the
few left over are dropped, different ones each epoch) and augments example i of the epoch
with stateless randomness seeded from (cfg.seed, p, e, i). A batch is therefore a pure
function of (cfg.seed, p, step), so resuming at step k re-reads only the skipped records
of the current epoch and decodes none of them.
"""
import math
from typing import Iterator

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


def steps_per_epoch(num_train: int, local_batch: int, process_count: int) -> int:
    """Full local batches every process can make from its share of the training split."""
    steps = (num_train // process_count) // local_batch
    if steps == 0:
        raise ValueError(
            f"the training split has {num_train} examples, {num_train // process_count} per process: "
            f"too few for one local batch of {local_batch}; lower the batch size."
        )
    return steps


def _train_epoch_batches(source, cfg, preprocess, epoch, first_step, steps, local_batch, process_index, process_count):
    shuffle_seed = derived_seed(cfg.seed, process_index, epoch, _SHUFFLE_STREAM)
    augment_seed = derived_seed(cfg.seed, process_index, epoch, _AUGMENT_STREAM)
    repeats = int(cfg.repeated_aug)
    examples = source.train_epoch(shuffle_seed, int(cfg.shuffle_buffer), process_index, process_count)
    examples = _repeat_each(examples.take(math.ceil(steps * local_batch / repeats)), repeats)
    examples = examples.take(steps * local_batch).skip(first_step * local_batch)
    examples = examples.enumerate(start=first_step * local_batch)
    batches = (
        examples.map(
            lambda index, ex: _finalise(preprocess(ex, tf.stack([tf.constant(augment_seed, tf.int64), index]))),
            num_parallel_calls=_parallel_calls(cfg),
            deterministic=True,
        )
        .batch(local_batch, drop_remainder=True)
        .prefetch(_prefetch(cfg))
    )
    return batches.as_numpy_iterator()


def train_batches(cfg, local_batch: int, process_index: int, process_count: int, start_step: int) -> Iterator[dict]:
    source = make_source(cfg)
    preprocess = registry.build(config_lib.format_pp(cfg.pp_train, cfg))
    steps = steps_per_epoch(source.num_train, local_batch, process_count)
    epoch, first_step = divmod(start_step, steps)

    def epochs():
        nonlocal epoch, first_step
        while True:
            yield from _train_epoch_batches(source, cfg, preprocess, epoch, first_step, steps, local_batch, process_index, process_count)
            epoch, first_step = epoch + 1, 0

    return epochs()


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
