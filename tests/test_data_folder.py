"""`folder:` datasets: class sub-folders of JPEGs, with undecodable files reported by name."""
import os

import numpy as np
import pytest
from helpers.data import natural_image, small_config, write_jpeg

from shunted_jax import data
from shunted_jax.data import config
from shunted_jax.data.sources import find_undecodable

CLASSES = ("cat", "dog")


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> str:
    """ROOT/{train,val}/{cat,dog}/*.jpg plus a text file posing as a JPEG and a truncated JPEG."""
    root = str(tmp_path_factory.mktemp("folder"))
    for split, count in (("train", 6), ("val", 3)):
        for label, name in enumerate(CLASSES):
            for n in range(count):
                write_jpeg(f"{root}/{split}/{name}/{n}.jpg", natural_image(40 + 10 * label, 50, seed=n + 20 * label))
    with open(f"{root}/train/cat/notes.jpg", "w") as f:
        f.write("this is not an image")
    with open(f"{root}/train/dog/0.jpg", "rb") as f:
        head = f.read(200)
    with open(f"{root}/train/dog/truncated.jpg", "wb") as f:
        f.write(head)
    with open(f"{root}/train/dog/readme.txt", "w") as f:
        f.write("ignored: not an image extension")
    return root


def folder_config(root, tmp_path, **overrides):
    return small_config(**{"name": f"folder:{root}", "data_dir": str(tmp_path), "eval_split": "", **overrides})


def test_undecodable_files_are_found_by_name(image_root):
    paths = [f"{image_root}/train/cat/0.jpg", f"{image_root}/train/cat/notes.jpg", f"{image_root}/train/dog/truncated.jpg"]
    assert find_undecodable(paths) == sorted(paths[1:])


def test_skip_drops_corrupt_files(image_root, tmp_path):
    info = data.dataset_info(folder_config(image_root, tmp_path, on_corrupt="skip"))
    assert info == data.DatasetInfo(num_classes=2, num_train_examples=12, num_eval_examples=6, image_size=32)


def test_skipped_files_are_reported_once_per_split(tmp_path, caplog):
    """A run opens its dataset for its sizes, for training and for every evaluation."""
    root = tmp_path / "corrupt"
    for split in ("train", "val"):
        write_jpeg(f"{root}/{split}/cat/0.jpg", natural_image(40, 50))
        (root / split / "cat" / "empty.jpg").write_bytes(b"")
        (root / split / "cat" / "notes.png").write_text("not an image")
    cfg = folder_config(root, tmp_path)
    data.dataset_info(cfg)
    next(data.train_iterator(cfg, 1))
    for _ in range(3):
        list(data.eval_iterator(cfg, 1))
    reports = [record.getMessage() for record in caplog.records if "skipping" in record.getMessage()]
    for split in ("train", "val"):
        names = [f"{root}/{split}/cat/empty.jpg", f"{root}/{split}/cat/notes.png"]
        assert sum(all(name in report for name in names) for report in reports) == 1, reports
    assert len(reports) == 2


def test_fail_names_the_corrupt_files(image_root, tmp_path):
    with pytest.raises(ValueError, match=r"(?s)not decodable.*notes\.jpg.*truncated\.jpg"):
        data.train_iterator(folder_config(image_root, tmp_path, on_corrupt="fail"), 4)


def test_folder_batches_and_labels(image_root, tmp_path):
    cfg = folder_config(image_root, tmp_path)
    epoch = [batch for _, batch in zip(range(3), data.train_iterator(cfg, 4))]
    assert epoch[0]["image"].shape == (4, 32, 32, 3) and epoch[0]["image"].dtype == np.uint8
    assert sorted(np.concatenate([b["label"] for b in epoch]).tolist()) == [0] * 6 + [1] * 6
    evaluated = list(data.eval_iterator(cfg, 4, 1, 2))
    assert len(evaluated) == 2 and sum(b["mask"].sum() for b in evaluated) == 3


def test_folder_batches_through_the_uint8_host_strings(image_root, tmp_path):
    cfg = folder_config(image_root, tmp_path, pp_train=config.HOST_PP_TRAIN, pp_eval=config.HOST_PP_EVAL, repeated_aug=3)
    train = next(data.train_iterator(cfg, 6))
    evaluated = next(data.eval_iterator(cfg, 4))
    for batch in (train, evaluated):
        assert batch["image"].shape[1:] == (32, 32, 3) and batch["image"].dtype == np.uint8
    assert np.array_equal(train["label"][0::3], train["label"][1::3])
    assert not np.array_equal(train["image"][0::3], train["image"][1::3])


def test_a_training_class_without_images_is_refused_by_name(tmp_path):
    root = tmp_path / "classes"
    for name in ("cat", "dog"):
        write_jpeg(f"{root}/train/{name}/0.jpg", natural_image(40, 50))
    os.makedirs(root / "train" / "bird")
    (root / "train" / "fish").mkdir()
    (root / "train" / "fish" / "broken.jpg").write_bytes(b"")
    os.makedirs(root / "val" / "cat")
    write_jpeg(f"{root}/val/dog/0.jpg", natural_image(40, 50))
    with pytest.raises(ValueError, match=r"2 class folder\(s\) .* no decodable images .*: bird, fish\. .*add images .* or remove them"):
        data.dataset_info(folder_config(root, tmp_path))
    (root / "train" / "bird").rmdir()
    write_jpeg(f"{root}/train/fish/1.jpg", natural_image(40, 50))
    info = data.dataset_info(folder_config(root, tmp_path))
    assert info.num_classes == 3 and info.num_eval_examples == 1


def test_missing_folder_and_missing_classes_are_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.dataset_info(folder_config(tmp_path / "absent", tmp_path))
    os.makedirs(tmp_path / "empty" / "train")
    os.makedirs(tmp_path / "empty" / "val")
    with pytest.raises(ValueError, match="no class sub-folders"):
        data.dataset_info(folder_config(tmp_path / "empty", tmp_path))


@pytest.fixture(scope="module")
def train_only_root(tmp_path_factory) -> str:
    """ROOT/train/{cat,dog}/*.jpg, 8 images each, and no evaluation split."""
    root = str(tmp_path_factory.mktemp("train_only"))
    for label, name in enumerate(CLASSES):
        for n in range(8):
            write_jpeg(f"{root}/train/{name}/{name}{n}.jpg", natural_image(40, 50, seed=n + 20 * label))
    return root


def test_a_folder_without_an_evaluation_split_trains_and_says_how_to_evaluate(train_only_root, tmp_path):
    cfg = folder_config(train_only_root, tmp_path)
    info = data.dataset_info(cfg)
    assert (info.num_train_examples, info.num_eval_examples) == (16, None)
    assert next(data.train_iterator(cfg, 4))["image"].shape == (4, 32, 32, 3)
    with pytest.raises(ValueError, match=r"has no evaluation split .*evals\.NAME\.split.*data\.holdout_fraction.*"
                                         r"--config\.evals=\{\}"):
        data.dataset_info(cfg, require_eval_split=True)
    with pytest.raises(ValueError, match="has no evaluation split"):
        next(data.eval_iterator(cfg, 4))
    assert data.dataset_info(folder_config(train_only_root, tmp_path, eval_split="train")).num_eval_examples == 16


def test_a_held_out_fraction_of_each_class_is_the_evaluation_split_and_is_not_trained_on(train_only_root, tmp_path):
    from shunted_jax.data.sources import FolderSource

    cfg = folder_config(train_only_root, tmp_path, holdout_fraction=0.25)
    info = data.dataset_info(cfg)
    assert (info.num_train_examples, info.num_eval_examples) == (12, 4)
    source = FolderSource(cfg)
    trained, held = set(source.train.paths), set(source.eval.paths)
    assert not trained & held and len(trained | held) == 16
    assert sorted(source.eval.labels.tolist()) == [0, 0, 1, 1]
    assert held == set(FolderSource(folder_config(train_only_root, tmp_path, holdout_fraction=0.25, seed=7)).eval.paths)
    assert held == set(FolderSource(folder_config(train_only_root, tmp_path, holdout_fraction=0.25,
                                                  eval_split="holdout")).eval.paths)
    labels = np.concatenate([b["label"] for _, b in zip(range(3), data.train_iterator(cfg, 4))])
    assert sorted(labels.tolist()) == [0] * 6 + [1] * 6
    evaluated = list(data.eval_iterator(cfg, 4))
    assert sum(int(b["mask"].sum()) for b in evaluated) == 4


def test_holding_out_is_for_folder_datasets():
    with pytest.raises(ValueError, match=r"data.holdout_fraction holds out images of folder: datasets.*train\[:90%\]"):
        data.dataset_info(small_config(name="synthetic", holdout_fraction=0.1))


def test_a_folder_without_evaluation_split_trains_without_evaluators(tmp_path):
    """The evaluators' splits are checked before anything is compiled; `--config.evals={}` has none.
    The ViT demo, ten classes and batches of 16, as test_train_loop's runs on synthetic data: the
    same programs, which JAX's compilation cache may hold."""
    from configs import vit
    from shunted_jax.train import checkpoint, loop

    root = tmp_path / "ten_classes"
    for label in range(10):
        for n in range(2):
            write_jpeg(f"{root}/train/class{label}/{n}.jpg", natural_image(40, 50, seed=n + 20 * label))
    config = vit.get_config("demo")
    config.unlock()
    config.data.update({"name": f"folder:{root}", "data_dir": str(tmp_path)})
    config.update({"global_batch_size": 16, "eval_batch_size": 16, "num_train_steps": 1, "log_every_steps": 1,
                   "compilation_cache_dir": ""})
    with pytest.raises(ValueError, match=r"config\.evals\.val: .* has no evaluation split"):
        loop.train_and_evaluate(config, tmp_path / "default_evaluator")
    config.evals = {}
    assert loop.train_and_evaluate(config, tmp_path / "no_evaluator") == {}
    assert checkpoint.all_steps_on_disk(tmp_path / "no_evaluator" / "checkpoints") == [1]
