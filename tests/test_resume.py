"""A resume that would change the run: the trajectory fields compared with the workdir's record,
and the data stream counted in examples, so that another batch size goes on with the next unseen
example. (Whole runs: test_faults.)"""
import json

import ml_collections
import numpy as np
import pytest
from helpers.data import natural_image, small_config, write_jpeg

from shunted_jax import data
from shunted_jax.data import StreamPosition
from shunted_jax.train import resume


def test_positions_count_examples_across_epochs_of_any_batch_size():
    assert StreamPosition.at_step(37, 16, 128) == StreamPosition(2, 5 * 128)
    assert StreamPosition.at_step(16, 16, 128) == StreamPosition(1, 0)
    for steps in range(40):  # from the start, advancing is what an uninterrupted run does
        assert StreamPosition().advanced(steps, 16, 128) == StreamPosition.at_step(steps, 16, 128)
    # The run: checkpoint at step 4 of batch 128 (512 examples), resumed at batch 64.
    resumed = StreamPosition.at_step(4, 468, 128).fitted(937, 64)
    assert resumed == StreamPosition(0, 512)
    assert [resumed.advanced(k, 937, 64).example for k in (1, 2)] == [576, 640]  # not 384-511 again
    # An epoch of 3 batches of 6 (18 examples) resumed at example 8: one whole batch is left in it.
    assert StreamPosition(0, 8).fitted(3, 6).advanced(1, 3, 6) == StreamPosition(1, 0)
    assert StreamPosition(0, 14).fitted(3, 6) == StreamPosition(1, 0)


@pytest.fixture(scope="module")
def eighteen_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    for n in range(18):
        write_jpeg(f"{root}/train/{'ab'[n % 2]}/{n}.jpg", natural_image(40, 50, seed=n))
    return small_config(name=f"folder:{root}", data_dir=str(root / "checks"),
                        pp_train="decode|resize(32)|flip_lr|value_range(0,1)")


def examples(batches) -> list:
    return [(label, image.tobytes()) for batch in batches for label, image in zip(batch["label"], batch["image"])]


@pytest.mark.parametrize("second_batch", [4, 6])
def test_a_stream_resumed_with_another_batch_size_goes_on_with_the_next_unseen_example(eighteen_images, second_batch):
    """One step of 8, then batches of 4 (epochs of 16) or 6 (epochs of 18): the examples are those
    of one uninterrupted epoch, each once, in order."""
    cfg = eighteen_images
    first = examples([next(data.train_iterator(cfg, 8))])
    position = StreamPosition.at_step(1, 2, 8).fitted(18 // second_batch, second_batch)
    left = (18 // second_batch * second_batch - 8) // second_batch
    resumed = data.train_iterator(cfg, second_batch, start=position)
    after = examples([next(resumed) for _ in range(left)])
    uninterrupted = data.train_iterator(cfg, 2)
    epoch = examples([next(uninterrupted) for _ in range(9)])
    assert first + after == epoch[:8 + left * second_batch]
    next_epoch = data.train_iterator(cfg, second_batch, start_step=18 // second_batch)
    assert examples([next(resumed)]) == examples([next(next_epoch)])


def config(**overrides):
    values = {"global_batch_size": 128, "seed": 0, "log_every_steps": 50, "allow_config_change": False,
              "optimizer": {"base_lr": 8e-3}, "checkpoint": {"every_steps": 500},
              "data": {"name": "fashion_mnist_demo", "prefetch": 2}, "model": {"depths": (1, 1, 1, 1)}}
    for key, value in overrides.items():
        section, _, field = key.rpartition(".")
        (values[section] if section else values)[field] = value
    return ml_collections.ConfigDict(values)


def test_trajectory_fields_are_compared_and_the_others_may_change():
    recorded = resume.as_record(config())
    free = config(log_every_steps=1, **{"checkpoint.every_steps": 2, "data.prefetch": 8, "model.depths": (2, 2, 2, 2)})
    assert resume.trajectory_changes(recorded, free) == {}
    changed = config(global_batch_size=64, seed=1, **{"optimizer.base_lr": 4e-3, "data.name": "synthetic"})
    assert resume.trajectory_changes(recorded, changed) == {
        "data.name": ("fashion_mnist_demo", "synthetic"), "global_batch_size": (128, 64),
        "optimizer.base_lr": (8e-3, 4e-3), "seed": (0, 1)}
    del recorded["seed"]  # a field added to the configs after the record was written is not compared
    assert "seed" not in resume.trajectory_changes(recorded, changed)


def test_a_changed_trajectory_is_refused_before_anything_is_built_unless_allowed(tmp_path):
    (tmp_path / "checkpoints" / "4").mkdir(parents=True)
    (tmp_path / resume.RECORD_NAME).write_text(json.dumps(resume.as_record(config())))
    with pytest.raises(resume.ConfigChangeError) as refused:
        resume.check_config(tmp_path, config(global_batch_size=64, **{"optimizer.base_lr": 4e-3}))
    assert str(refused.value) == (
        f"--workdir {tmp_path} was trained with another config: config.global_batch_size 128 -> 64, "
        f"config.optimizer.base_lr 0.008 -> 0.004. Resume with the values recorded in {tmp_path / 'config.json'}, "
        "or give this run another --workdir; to go on with the new values on purpose, add "
        "--config.allow_config_change=True (the change is recorded there and in metrics.jsonl)")
    allowed = config(global_batch_size=64, allow_config_change=True)
    assert resume.check_config(tmp_path, allowed) == {"global_batch_size": (128, 64)}
    (tmp_path / "checkpoints" / "4").rmdir()  # nothing to resume: any config starts afresh
    assert resume.check_config(tmp_path, config(global_batch_size=64)) == {}
    assert np.isclose(json.loads((tmp_path / "config.json").read_text())["optimizer"]["base_lr"], 8e-3)


def test_a_damaged_config_record_is_named_with_what_to_do(tmp_path):
    (tmp_path / "checkpoints" / "4").mkdir(parents=True)
    (tmp_path / resume.RECORD_NAME).write_text('{"global_batch_size": 12')
    with pytest.raises(resume.ConfigChangeError, match=f"{tmp_path / 'config.json'} is not a readable config record "
                                                       r"\(.*\): restore it, or delete it"):
        resume.check_config(tmp_path, config())
