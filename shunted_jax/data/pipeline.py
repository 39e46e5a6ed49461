"""tf.data input pipelines: per-process, deterministic, resumable mid-epoch.

Training runs epoch by epoch. Epoch e of process p reads the source shuffled with a seed
derived from (cfg.seed, p, e), keeps the first steps_per_epoch * local_batch examples (the
few left over are dropped, different ones each epoch) and augments example i of the epoch
with stateless randomness seeded from (cfg.seed, p, e, i). A batch is therefore a pure
function of (cfg.seed, p, step), so resuming at step k re-reads only the skipped records
of the current epoch and decodes none of them.

With repeated augmentation (repeated_aug = n) record r of the epoch becomes examples
r*n ... r*n + n-1, cut from one decode of the record.
"""
import dataclasses
import math
import os
from typing import Callable, Iterator

import numpy as np

from shunted_jax.data import config as config_lib
from shunted_jax.data import registry
from shunted_jax.data.ops import decode_to_uint8
from shunted_jax.data.sources import make_source
from shunted_jax.data.stream import StreamPosition
from shunted_jax.data.tf_import import closed_at_exit, tensorflow

tf = tensorflow()

_SHUFFLE_STREAM, _AUGMENT_STREAM, _EVAL_STREAM = 0, 1, 2


def derived_seed(*numbers: int) -> int:
    """A well-mixed 31-bit seed from a tuple of small integers."""
    return int(np.random.SeedSequence([int(n) for n in numbers]).generate_state(1)[0] >> 1)


def _parallel_calls(cfg) -> int:
    return tf.data.AUTOTUNE if int(cfg.num_parallel_calls) < 0 else int(cfg.num_parallel_calls)


def _prefetch(cfg) -> int:
    return tf.data.AUTOTUNE if int(cfg.prefetch) < 0 else int(cfg.prefetch)


def available_cores() -> int:
    """The cores this process may run on (fewer than the machine's under a CPU affinity mask)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _with_options(dataset):
    """The threading the fast JAX input pipelines use (big_vision, Flax's ImageNet example): a
    private pool of one thread per core, so tf.data does not share TensorFlow's global pools,
    and each op single-threaded, so the cores go to parallel examples. No prefetch is injected
    beyond the fixed data.prefetch batches, which bounds the memory."""
    options = tf.data.Options()
    options.deterministic = True
    options.threading.private_threadpool_size = available_cores()
    options.threading.max_intra_op_parallelism = 1
    options.experimental_optimization.inject_prefetch = False
    return dataset.with_options(options)


def _finalise(features: dict) -> dict:
    """uint8 images stay uint8 (a quarter of the bytes to the device); others become float32."""
    image = features["image"]
    if image.dtype != tf.uint8:
        image = tf.cast(image, tf.float32)
    return {"image": image, "label": tf.cast(features["label"], tf.int32)}


def record_copies(preprocess: Callable, repeats: int, decode_once: bool, augment_seed):
    """(record index r, record) -> `repeats` examples stacked, example r*repeats + j augmented with
    seed (augment_seed, r*repeats + j). decode_once decodes the record once for all of them;
    otherwise each copy decodes it again (the decoding ops take either)."""

    def make(record_index, record):
        if decode_once and repeats > 1:
            record = {**record, "image": decode_to_uint8(record["image"])}
        examples = [
            _finalise(preprocess(record, tf.stack([augment_seed, record_index * repeats + copy])))
            for copy in range(repeats)
        ]
        return {key: tf.stack([example[key] for example in examples]) for key in examples[0]}

    return make


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

    decode_once: bool

    def epoch_batches(self, epoch: int, first_example: int) -> Iterator[dict]:
        """This process's batches of the epoch from its example `first_example` on. Skips whole
        records before decoding; only a record split by the resume point is decoded, for its
        copies after that point."""
        cfg, batch = self.cfg, self.local_batch
        shuffle_seed = derived_seed(cfg.seed, self.process_index, epoch, _SHUFFLE_STREAM)
        augment_seed = tf.constant(derived_seed(cfg.seed, self.process_index, epoch, _AUGMENT_STREAM), tf.int64)
        repeats = int(cfg.repeated_aug)
        first_record, copies_to_skip = divmod(first_example, repeats)
        records = self.source.train_epoch(shuffle_seed, int(cfg.shuffle_buffer), self.process_index, self.process_count)
        records = records.take(math.ceil(self.steps * batch / repeats)).skip(first_record).enumerate(start=first_record)
        examples = records.map(
            record_copies(self.preprocess, repeats, self.decode_once, augment_seed),
            num_parallel_calls=_parallel_calls(cfg),
            deterministic=True,
        ).unbatch()
        examples = examples.skip(copies_to_skip).take(self.steps * batch - first_example)
        batches = examples.batch(batch, drop_remainder=True).prefetch(_prefetch(cfg))
        return _with_options(batches).as_numpy_iterator()


def _endless(plan: _TrainPlan, epoch: int, first_example: int) -> Iterator[dict]:
    while True:
        yield from plan.epoch_batches(epoch, first_example)
        epoch, first_example = epoch + 1, 0


def train_batches(
    cfg, global_batch_size: int, process_index: int, process_count: int, start_step: int, decode_once: bool = True,
    start: StreamPosition | None = None,
) -> Iterator[dict]:
    """Sets everything up now, so that bad input fails here rather than at the first batch.

    The stream starts where an uninterrupted run stands after `start_step` steps, or at `start`
    when given (data.stream). decode_once=False decodes a record again for each repeated-augmentation
    copy, as the data benchmark's reference: the same batches at a higher cost, but for the border
    pixels of a decode_and_inception_crop of a JPEG, which decodes only the crop (ops.decode_and_crop).
    """
    local_batch = config_lib.local_batch_size(global_batch_size, process_count)
    source = make_source(cfg)
    preprocess = registry.build(config_lib.format_pp(cfg.pp_train, cfg))
    steps = config_lib.steps_per_epoch(source.num_train, global_batch_size)
    plan = _TrainPlan(source, cfg, preprocess, steps, local_batch, process_index, process_count, decode_once)
    position = (start or StreamPosition.at_step(start_step, steps, global_batch_size)).fitted(steps, global_batch_size)
    return closed_at_exit(_endless(plan, position.epoch, position.example // process_count))


def train_example_spec(cfg) -> dict:
    """{name: (shape, numpy dtype)} of one training example, read off the pipeline's graph: no record
    is read. The images' shape must be fixed, as the train step is compiled for it."""
    preprocess = registry.build(config_lib.format_pp(cfg.pp_train, cfg))
    records = make_source(cfg).train_epoch(0, 1, 0, 1).enumerate()
    spec = records.map(record_copies(preprocess, 1, True, tf.constant(0, tf.int64))).element_spec
    if not spec["image"].shape.is_fully_defined():
        raise ValueError(
            f"data.pp_train gives images of unknown shape {spec['image'].shape[1:]}; end it with a fixed-size op "
            "such as decode_and_inception_crop(SIZE), resize(SIZE) or center_crop(SIZE)."
        )
    return {name: (tuple(value.shape[1:]), np.dtype(value.dtype.as_numpy_dtype)) for name, value in spec.items()}


def check_preprocessing(cfg) -> None:
    """Parses cfg's preprocessing strings (the ops are registered by now), so that a bad one fails
    here, before a training run's slow start."""
    for pp in (cfg.pp_train, cfg.pp_eval):
        registry.parse(config_lib.format_pp(pp, cfg))


def _padding(element_spec: dict, count: int):
    """`count` all-zero examples with mask False, shaped like the real ones."""
    shapes = {key: spec.shape for key, spec in element_spec.items()}
    if not all(shape.is_fully_defined() for shape in shapes.values()):
        raise ValueError(
            f"the evaluation preprocessing gives images of unknown shape {shapes['image']}; "
            "end the evaluation preprocessing string (evals.NAME.pp in a training config, pp_eval in a data "
            "config) with a fixed-size op such as center_crop(SIZE) or resize(SIZE)."
        )
    zeros = {key: tf.zeros(spec.shape, spec.dtype) for key, spec in element_spec.items()}
    zeros["mask"] = tf.constant(False)
    return tf.data.Dataset.from_tensors(zeros).repeat(count)


def eval_batches(cfg, global_batch_size: int, process_index: int, process_count: int) -> Iterator[dict]:
    local_batch = config_lib.local_batch_size(global_batch_size, process_count)
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
    return closed_at_exit(_numpy_batches(padded.batch(local_batch, drop_remainder=True).prefetch(_prefetch(cfg))))


def _numpy_batches(dataset) -> Iterator[dict]:
    yield from _with_options(dataset).as_numpy_iterator()
