"""Where raw examples come from: a tfds dataset or a folder of class sub-folders.

A source yields, per process, raw examples {"image": encoded bytes, "label": int} as tf.data
datasets: one shuffled dataset per training epoch (a pure function of the epoch's seed) and
one evaluation dataset in a fixed order.
"""
import dataclasses
import functools
import hashlib
import json
import logging
import os

import numpy as np

from shunted_jax.data import config as config_lib
from shunted_jax.data.ops import decode_to_rgb
from shunted_jax.data.tf_import import tensorflow, tensorflow_datasets

tf = tensorflow()
tfds = tensorflow_datasets()

EVAL_SPLIT_CANDIDATES = ("validation", "val", "test")
# The training images a folder dataset holds out (data.holdout_fraction) form this split.
HOLDOUT_SPLIT = "holdout"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")


class DatasetNotPreparedError(FileNotFoundError):
    """The dataset's prepared files are missing: it has to be prepared once before training; the
    message says how."""


def _deterministic_options():
    options = tf.data.Options()
    options.deterministic = True
    return options


def _resolve_split(requested: str, available, kind: str, dataset: str) -> str:
    """The requested split (a tfds slice such as "train[:90%]" names its split before the bracket)."""
    base = requested.split("[")[0]
    if base not in available:
        raise ValueError(f"{dataset} has no {kind} split {base!r}; it has {sorted(available)}.")
    return requested


def _resolve_eval_split(requested: str, available, dataset: str) -> str | None:
    """The requested evaluation split, or for an empty one the first of validation/val/test (then
    the held-out images, where there are some) that the dataset has; None when it has none."""
    if requested:
        return _resolve_split(requested, available, "evaluation", dataset)
    return next((c for c in (*EVAL_SPLIT_CANDIDATES, HOLDOUT_SPLIT) if c in available), None)


def no_eval_split(dataset: str, available) -> ValueError:
    """What to do when a dataset has no split to evaluate on: the fields that choose one exist in
    training configs (evals.NAME.split) and data configs (eval_split) alike."""
    return ValueError(
        f"{dataset} has no evaluation split (none of {', '.join(EVAL_SPLIT_CANDIDATES)}; it has {sorted(available)}): "
        "name one as the evaluator's split (evals.NAME.split in a training config, eval_split in a data config), "
        "hold out part of the training images (data.holdout_fraction, for folder: datasets), or train "
        "without evaluators (--config.evals={})."
    )


def preparation_instructions(name: str, data_dir: str, manual_dir: str) -> str:
    command = f"python -m shunted_jax.data.prepare --name {name} --data_dir {data_dir}"
    if name == "imagenet2012":
        manual = manual_dir or "/path/to/manual_dir"
        return (
            f"ImageNet 2012 is not prepared in {data_dir}. Download ILSVRC2012_img_train.tar (138 GB) and "
            f"ILSVRC2012_img_val.tar (6.3 GB) from https://image-net.org/download-images (free registration), "
            f"put both files, unextracted, in {manual}, then run once:\n  {command} --manual_dir {manual}\n"
            "It writes about 150 GB of TFRecords and takes a few hours; see docs/data.md."
        )
    return f"The tfds dataset {name!r} is not prepared in {data_dir}. Prepare it once with:\n  {command}"


def unknown_name_message(name: str) -> str:
    """Short on purpose: tfds' own error lists every dataset it knows, hundreds of lines."""
    return (
        f"data.name={name!r} is not a dataset this project or tfds knows. Use {config_lib.DEMO_NAME!r} (the demo), "
        f"{config_lib.SYNTHETIC_NAME!r}, '{config_lib.FOLDER_PREFIX}/path/to/root' or a tfds name; tfds' names are "
        "listed by:\n  python -c \"import tensorflow_datasets as tfds; print(tfds.list_builders())\""
    )


class _Source:
    """What the sources share: `num_eval` is None when there is no split to evaluate on, and
    `_no_eval_split` the ValueError that says how to choose one."""

    num_eval: int | None
    _no_eval_split: ValueError

    def require_eval_split(self) -> None:
        """Raises the ValueError that says how to choose an evaluation split when there is none."""
        if self.num_eval is None:
            raise self._no_eval_split


class TfdsSource(_Source):
    """A tfds image-classification dataset read with per-process splits."""

    def __init__(self, cfg):
        if cfg.name == config_lib.DEMO_NAME:
            from shunted_jax.data import fashion_mnist_demo  # noqa: F401  (registers the builder)
        try:
            self.builder = tfds.builder(cfg.name, data_dir=cfg.data_dir)
        except tfds.core.registered.DatasetNotFoundError:
            raise ValueError(unknown_name_message(cfg.name)) from None
        if not self.builder.is_prepared():
            if cfg.name != config_lib.DEMO_NAME:
                raise DatasetNotPreparedError(preparation_instructions(cfg.name, cfg.data_dir, cfg.manual_dir))
            prepare_builder(self.builder, cfg.manual_dir)
        info = self.builder.info
        self.image_key, self.label_key = info.supervised_keys or ("image", "label")
        self.num_classes = info.features[self.label_key].num_classes
        self.train_split = _resolve_split(cfg.train_split, info.splits.keys(), "training", cfg.name)
        self.num_train = info.splits[self.train_split].num_examples
        self.eval_split = _resolve_eval_split(cfg.eval_split, info.splits.keys(), cfg.name)
        self.num_eval = None if self.eval_split is None else info.splits[self.eval_split].num_examples
        self._no_eval_split = no_eval_split(cfg.name, info.splits.keys())

    def _read(self, split: str, shuffle_seed):
        read_config = tfds.ReadConfig(
            shuffle_seed=shuffle_seed, options=_deterministic_options(), try_autocache=False, add_tfds_id=False
        )
        dataset = self.builder.as_dataset(
            split=split,
            shuffle_files=shuffle_seed is not None,
            read_config=read_config,
            decoders={self.image_key: tfds.decode.SkipDecoding()},
        )
        return dataset.map(lambda ex: {"image": ex[self.image_key], "label": tf.cast(ex[self.label_key], tf.int32)})

    def train_epoch(self, shuffle_seed: int, shuffle_buffer: int, process_index: int, process_count: int):
        """This process's share of the training split, file order and examples shuffled by the seed."""
        split = tfds.split_for_jax_process(self.train_split, process_index=process_index, process_count=process_count)
        return self._read(split, shuffle_seed).shuffle(shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)

    def _eval_splits(self, process_count: int):
        self.require_eval_split()
        return tfds.even_splits(self.eval_split, n=process_count, drop_remainder=False)

    def eval_counts(self, process_count: int) -> list[int]:
        """How many evaluation examples each process reads."""
        return [self.builder.info.splits[split].num_examples for split in self._eval_splits(process_count)]

    def eval_examples(self, process_index: int, process_count: int):
        return self._read(self._eval_splits(process_count)[process_index], None)


def prepare_builder(builder, manual_dir: str) -> None:
    """Builds the tfds dataset, reading manually downloaded files from `manual_dir` if given."""
    if builder.name == config_lib.DEMO_NAME:
        from shunted_jax.data.fashion_mnist_demo import source_dir

        manual_dir = source_dir(manual_dir)
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir or None)
    builder.download_and_prepare(download_config=download_config)


@dataclasses.dataclass(frozen=True)
class _FolderSplit:
    paths: np.ndarray
    labels: np.ndarray


def _list_images(split_dir: str, class_names: list[str]) -> _FolderSplit:
    paths, labels = [], []
    for label, class_name in enumerate(class_names):
        class_dir = os.path.join(split_dir, class_name)
        if not os.path.isdir(class_dir):
            continue
        for file_name in sorted(os.listdir(class_dir)):
            if file_name.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(os.path.join(class_dir, file_name))
                labels.append(label)
    return _FolderSplit(np.array(paths, dtype=object), np.array(labels, dtype=np.int32))


def _listing_signature(paths) -> str:
    digest = hashlib.sha256()
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def find_undecodable(paths) -> list[str]:
    """The paths whose contents TensorFlow cannot decode as an image (one full, parallel decode pass)."""
    if len(paths) == 0:
        return []
    decodable = (
        tf.data.Dataset.from_tensor_slices(list(paths))
        .map(lambda p: (p, tf.shape(decode_to_rgb(tf.io.read_file(p)))), num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
        .ignore_errors()
    )
    good = {path.decode() for path, _ in decodable.as_numpy_iterator()}
    return sorted(set(paths) - good)


def cached_undecodable(paths, cache_dir: str) -> list[str]:
    """find_undecodable, remembered in cache_dir until any file is added, removed or modified."""
    signature = _listing_signature(paths)
    cache_path = os.path.join(cache_dir, f"{signature}.json")
    if os.path.exists(cache_path):
        with open(cache_path) as f:
            return json.load(f)
    bad = find_undecodable(paths)
    os.makedirs(cache_dir, exist_ok=True)
    with open(cache_path, "w") as f:
        json.dump(bad, f)
    return bad


@functools.cache
def _report_skipped(bad: tuple[str, ...]) -> None:
    """Logs each list of skipped files once per process: a run opens its dataset several times
    (its sizes, the training iterator, every evaluation) and the list would repeat each time."""
    listing = "\n  ".join(bad)
    logging.getLogger(__name__).warning(
        "shunted_jax.data: skipping %d file(s) that are not decodable images:\n  %s", len(bad), listing
    )


def _drop_corrupt(split: _FolderSplit, on_corrupt: str, cache_dir: str) -> _FolderSplit:
    bad = cached_undecodable(list(split.paths), cache_dir)
    if not bad:
        return split
    if on_corrupt == "fail":
        raise ValueError(f"{len(bad)} file(s) are not decodable images (data.on_corrupt='fail'):\n  " + "\n  ".join(bad))
    _report_skipped(tuple(bad))
    keep = ~np.isin(split.paths, bad)
    return _FolderSplit(split.paths[keep], split.labels[keep])


def _check_every_class_has_images(train_dir: str, class_names: list[str], labels: np.ndarray) -> None:
    """A training class folder without images would still get an output of the model's head,
    one that no example ever trains."""
    empty = [name for label, name in enumerate(class_names) if not np.any(labels == label)]
    if empty:
        raise ValueError(
            f"{len(empty)} class folder(s) under {train_dir} hold no decodable images "
            f"({', '.join(IMAGE_EXTENSIONS)}): {', '.join(empty)}. Every training sub-folder is a class; "
            "add images to these folders or remove them."
        )


def hold_out(split: _FolderSplit, fraction: float) -> tuple[_FolderSplit, _FolderSplit]:
    """(kept, held out): of each class's n images, the floor(fraction * n) whose file names hash
    lowest, so the choice depends on nothing but the names: not on the order of listing, the
    machine or the run, and never on the seed."""
    held = np.zeros(len(split.paths), bool)
    for label in np.unique(split.labels):
        members = np.flatnonzero(split.labels == label)
        digests = [hashlib.sha256(os.path.basename(split.paths[i]).encode()).hexdigest() for i in members]
        held[members[np.argsort(digests, kind="stable")[: int(fraction * len(members))]]] = True
    return (_FolderSplit(split.paths[~held], split.labels[~held]), _FolderSplit(split.paths[held], split.labels[held]))


class FolderSource(_Source):
    """Images in ROOT/<split>/<class>/<file>; the classes are the sorted sub-folders of the training
    split. With data.holdout_fraction > 0, that fraction of each training class (`hold_out`) is
    not trained on and forms the split "holdout"."""

    def __init__(self, cfg):
        self.root = cfg.name[len(config_lib.FOLDER_PREFIX) :]
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"data.name={cfg.name!r}: the folder {self.root} does not exist.")
        available = [d for d in os.listdir(self.root) if os.path.isdir(os.path.join(self.root, d))]
        train_split = _resolve_split(cfg.train_split, available, "training", self.root)
        train_dir = os.path.join(self.root, train_split)
        self.class_names = sorted(d for d in os.listdir(train_dir) if os.path.isdir(os.path.join(train_dir, d)))
        if not self.class_names:
            raise ValueError(f"{train_dir} has no class sub-folders; expected {train_dir}/<class_name>/<image files>.")
        cache_dir = os.path.join(cfg.data_dir, "folder_checks")
        self.train = _drop_corrupt(_list_images(train_dir, self.class_names), cfg.on_corrupt, cache_dir)
        if len(self.train.paths) == 0:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {train_dir}/<class_name>/.")
        held_out = None
        if cfg.holdout_fraction > 0:
            self.train, held_out = hold_out(self.train, cfg.holdout_fraction)
            available.append(HOLDOUT_SPLIT)
        _check_every_class_has_images(train_dir, self.class_names, self.train.labels)
        eval_split = _resolve_eval_split(cfg.eval_split, available, self.root)
        if eval_split is None:
            self.eval = None
        elif eval_split == HOLDOUT_SPLIT and held_out is not None:
            self.eval = held_out
        else:
            self.eval = _drop_corrupt(_list_images(os.path.join(self.root, eval_split), self.class_names),
                                      cfg.on_corrupt, cache_dir)
        self._no_eval_split = no_eval_split(self.root, available)
        self.num_classes = len(self.class_names)
        self.num_train = len(self.train.paths)
        self.num_eval = None if self.eval is None else len(self.eval.paths)

    @staticmethod
    def _read(paths, labels):
        return tf.data.Dataset.from_tensor_slices((list(paths), labels)).map(
            lambda path, label: {"image": tf.io.read_file(path), "label": label},
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )

    def train_epoch(self, shuffle_seed: int, shuffle_buffer: int, process_index: int, process_count: int):
        """This process's files (every process_count-th), fully permuted by the seed; no buffer needed."""
        paths, labels = self.train.paths[process_index::process_count], self.train.labels[process_index::process_count]
        order = np.random.default_rng(shuffle_seed).permutation(len(paths))
        return self._read(paths[order], labels[order])

    def _eval_split(self) -> _FolderSplit:
        self.require_eval_split()
        return self.eval

    def eval_counts(self, process_count: int) -> list[int]:
        return [len(self._eval_split().paths[index::process_count]) for index in range(process_count)]

    def eval_examples(self, process_index: int, process_count: int):
        split = self._eval_split()
        return self._read(split.paths[process_index::process_count], split.labels[process_index::process_count])


def make_source(cfg):
    if cfg.name.startswith(config_lib.FOLDER_PREFIX):
        return FolderSource(cfg)
    return TfdsSource(cfg)
