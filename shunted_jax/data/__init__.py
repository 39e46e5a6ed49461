"""Input pipelines for training and evaluation.

    cfg = data.default_config()
    info = data.dataset_info(cfg)
    train_it = data.train_iterator(cfg, global_batch_size=256, process_index=0, process_count=1)
    eval_it = data.eval_iterator(cfg, global_batch_size=256, process_index=0, process_count=1)

Importing this package does not import TensorFlow: only the tfds/folder datasets do, on
first use, so "synthetic" data works on machines without TF. docs/data.md has the details.
"""
import dataclasses
from typing import Iterator

from shunted_jax.data import config as _config
from shunted_jax.data import synthetic as _synthetic
from shunted_jax.data.config import check_batch_size, default_config, steps_per_epoch, with_defaults
from shunted_jax.data.stream import StreamPosition

__all__ = ["DatasetInfo", "StreamPosition", "check_batch_size", "dataset_info", "default_config", "eval_iterator",
           "steps_per_epoch", "train_batch_spec", "train_iterator", "with_defaults"]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """A dataset's sizes; num_eval_examples is None when an empty eval_split finds no split to
    evaluate on (training needs none; evaluating then fails, saying how to choose one)."""
    num_classes: int
    num_train_examples: int
    num_eval_examples: int | None
    image_size: int


def _is_synthetic(cfg) -> bool:
    return cfg.name == _config.SYNTHETIC_NAME


def dataset_info(cfg, require_eval_split: bool = False) -> DatasetInfo:
    """Sizes of the dataset cfg names; builds the demo dataset on first use. Its preprocessing
    strings are parsed here, so that a bad one (e.g. naming a device op) fails before a training
    run's slow start. With `require_eval_split`, a dataset with no split to evaluate on raises the
    ValueError saying how to choose one."""
    cfg = with_defaults(cfg)
    _config.validate(cfg)
    if _is_synthetic(cfg):
        return DatasetInfo(int(cfg.num_classes), int(cfg.num_train_examples), int(cfg.num_eval_examples), int(cfg.image_size))
    from shunted_jax.data import pipeline
    from shunted_jax.data.sources import make_source

    pipeline.check_preprocessing(cfg)

    source = make_source(cfg)
    if require_eval_split:
        source.require_eval_split()
    return DatasetInfo(source.num_classes, source.num_train, source.num_eval, int(cfg.image_size))


def train_iterator(cfg, global_batch_size: int, process_index: int = 0, process_count: int = 1, start_step: int = 0,
                   start: StreamPosition | None = None) -> Iterator[dict]:
    """Endless {"image": (B, H, W, 3), "label": int32 (B,)} with B = global_batch_size // process_count;
    the images are uint8 if data.pp_train gives uint8 (data.synthetic_dtype for synthetic data), else float32.

    With start_step=k it yields exactly what an uninterrupted run yields from step k on; with
    `start` (a StreamPosition) it starts there instead, e.g. where a run with another batch size
    stopped (synthetic data, the same batch at every step, ignores both).
    """
    cfg = with_defaults(cfg)
    _config.validate(cfg)
    _check_process(process_index, process_count)
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}.")
    if _is_synthetic(cfg):
        return _synthetic.train_batches(cfg, global_batch_size, process_index, process_count)
    from shunted_jax.data import pipeline

    return pipeline.train_batches(cfg, global_batch_size, process_index, process_count, start_step, start=start)


def train_batch_spec(cfg, global_batch_size: int) -> dict:
    """{name: (shape, numpy dtype)} of each array of a global training batch, known without reading
    the data: the train step compiles for it while the first batches are still on their way."""
    cfg = with_defaults(cfg)
    _config.validate(cfg)
    if _is_synthetic(cfg):
        one = next(_synthetic.train_batches(cfg, 1, 0, 1))
        example = {name: (array.shape[1:], array.dtype) for name, array in one.items()}
    else:
        from shunted_jax.data import pipeline

        example = pipeline.train_example_spec(cfg)
    return {name: ((global_batch_size, *shape), dtype) for name, (shape, dtype) in example.items()}


def eval_iterator(cfg, global_batch_size: int, process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
    """Finite {"image", "label", "mask": bool (B,)}: every evaluation example exactly once over all
    processes, padding masked out, the same number of batches on every process."""
    cfg = with_defaults(cfg)
    _config.validate(cfg)
    _check_process(process_index, process_count)
    if _is_synthetic(cfg):
        return _synthetic.eval_batches(cfg, global_batch_size, process_index, process_count)
    from shunted_jax.data import pipeline

    return pipeline.eval_batches(cfg, global_batch_size, process_index, process_count)


def _check_process(process_index: int, process_count: int) -> None:
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must lie in [0, process_count={process_count}).")
