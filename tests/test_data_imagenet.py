"""The real tfds `imagenet2012` builder, run offline on hand-made tar files in the official layout,
then read through train_iterator / eval_iterator."""
import collections
import io
import os
import tarfile

import numpy as np
import pytest
from helpers.data import jpeg_bytes, natural_image, small_config

from shunted_jax import data
from shunted_jax.data import config
from shunted_jax.data.prepare import main as prepare_main
from shunted_jax.data.tf_import import tensorflow_datasets

SYNSETS = ("n01440764", "n01443537", "n01484850")
IMAGES_PER_SYNSET = 4
NUM_VAL = 6


def _add_file(archive: tarfile.TarFile, name: str, payload: bytes) -> None:
    member = tarfile.TarInfo(name)
    member.size = len(payload)
    archive.addfile(member, io.BytesIO(payload))


def _synset_tar(synset: str, index: int) -> bytes:
    """One per-class tar, as inside ILSVRC2012_img_train.tar: JPEGs named <synset>_<n>.JPEG."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as inner:
        for n in range(IMAGES_PER_SYNSET):
            _add_file(inner, f"{synset}_{n}.JPEG", jpeg_bytes(natural_image(60, 80, seed=10 * index + n)))
    return buffer.getvalue()


def make_official_tars(manual_dir: str) -> None:
    """ILSVRC2012_img_train.tar (a tar of per-synset tars) and ILSVRC2012_img_val.tar (flat
    ILSVRC2012_val_%08d.JPEG files, labelled by tfds' shipped validation_labels.txt in name order)."""
    os.makedirs(manual_dir, exist_ok=True)
    with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_train.tar"), "w") as outer:
        for index, synset in enumerate(SYNSETS):
            _add_file(outer, f"{synset}.tar", _synset_tar(synset, index))
    with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_val.tar"), "w") as val:
        for n in range(1, NUM_VAL + 1):
            _add_file(val, f"ILSVRC2012_val_{n:08d}.JPEG", jpeg_bytes(natural_image(70, 50, seed=100 + n)))


def _tfds_label_file(name: str) -> list[str]:
    path = tensorflow_datasets().core.tfds_path(f"datasets/imagenet2012/{name}")
    return path.read_text().split()


@pytest.fixture(scope="module")
def imagenet_cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    make_official_tars(str(root / "manual"))
    prepare_main(["--name", "imagenet2012", "--data_dir", str(root / "tfds"), "--manual_dir", str(root / "manual")])
    return small_config(name="imagenet2012", data_dir=str(root / "tfds"), shuffle_buffer=16)


def test_prepared_imagenet_has_the_official_classes_and_splits(imagenet_cfg):
    info = data.dataset_info(imagenet_cfg)
    assert info == data.DatasetInfo(1000, len(SYNSETS) * IMAGES_PER_SYNSET, NUM_VAL, 32)


def test_imagenet_train_batches_carry_the_synset_labels(imagenet_cfg):
    synset_index = {synset: index for index, synset in enumerate(_tfds_label_file("labels.txt"))}
    expected = sorted(synset_index[s] for s in SYNSETS for _ in range(IMAGES_PER_SYNSET))
    batches = [batch for _, batch in zip(range(3), data.train_iterator(imagenet_cfg, 4, 0, 1))]
    assert all(b["image"].shape == (4, 32, 32, 3) and b["image"].dtype == np.uint8 for b in batches)
    assert sorted(np.concatenate([b["label"] for b in batches]).tolist()) == expected


def test_imagenet_eval_uses_the_validation_labels_over_two_processes(imagenet_cfg):
    synset_index = {synset: index for index, synset in enumerate(_tfds_label_file("labels.txt"))}
    expected = [synset_index[s] for s in _tfds_label_file("validation_labels.txt")[:NUM_VAL]]
    per_process = [list(data.eval_iterator(imagenet_cfg, 4, index, 2)) for index in range(2)]
    assert len(per_process[0]) == len(per_process[1]) == 2
    labels = [int(label) for batches in per_process for b in batches for label in b["label"][b["mask"]]]
    assert collections.Counter(labels) == collections.Counter(expected)


def test_imagenet_through_the_uint8_host_strings(imagenet_cfg):
    cfg = imagenet_cfg.copy_and_resolve_references()
    cfg.update(pp_train=config.HOST_PP_TRAIN, pp_eval=config.HOST_PP_EVAL, repeated_aug=3)
    train = next(data.train_iterator(cfg, 6))
    evaluated = next(data.eval_iterator(cfg, 4))
    for batch in (train, evaluated):
        assert batch["image"].shape[1:] == (32, 32, 3) and batch["image"].dtype == np.uint8
    assert np.array_equal(train["label"][0::3], train["label"][2::3])
