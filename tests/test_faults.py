"""Faults of real train.py processes: two runs on one workdir, a killed holder, damaged checkpoints,
a full disk, evaluation of missing, empty and read-only workdirs, metrics.jsonl deleted or
unwritable, and resumes that would change the run."""
import contextlib
import functools
import json
import logging
import pathlib
import shutil
import signal
import subprocess
import tempfile
import types

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
import pytest

from helpers import processes
from helpers.processes import checkpoint_steps, wait_for_line
from shunted_jax.train import checkpoint, console, metrics, workarounds

STEPS = ("--config.num_train_steps=6", "--config.checkpoint.every_steps=2")
# Faults of the training system, whatever the model: the ViT demo compiles quickest.
run_train = functools.partial(processes.run_train, config=processes.VIT_DEMO)
start_train = functools.partial(processes.start_train, config=processes.VIT_DEMO)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An uninterrupted 6-step run with checkpoints 2, 4 and 6: the result every recovery must reach."""
    workdir = tmp_path_factory.mktemp("trained")
    run_train(workdir, *STEPS)
    return workdir


def copy_of(trained, destination: pathlib.Path, drop_steps=()) -> pathlib.Path:
    """A copy of the trained workdir without some steps' checkpoints and their metrics."""
    shutil.copytree(trained, destination)
    for step in drop_steps:
        shutil.rmtree(destination / "checkpoints" / str(step))
    return destination


def final_eval(workdir) -> dict:
    return [r for r in metrics.read_metrics(workdir / "metrics.jsonl") if r["kind"] == "val"][-1]


def assert_same_final_eval(workdir, trained) -> None:
    got, want = final_eval(workdir), final_eval(trained)
    assert got["step"] == want["step"] == 6
    assert got["top1"] == want["top1"] and got["loss"] == pytest.approx(want["loss"], abs=1e-5)


def error_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and lines, result.stderr[-3000:]
    return lines[-1]


def test_a_second_run_fails_naming_the_holder_and_a_killed_holder_blocks_nothing(trained, tmp_path):
    workdir = copy_of(trained, tmp_path / "w", drop_steps=[6])
    first = start_train(workdir, *STEPS)
    wait_for_line(first, "resumed from")
    first.send_signal(signal.SIGSTOP)  # it holds the workdir, however quickly it would have finished
    second = run_train(workdir, *STEPS, check=False)
    last = error_line(second)
    assert last.startswith("error: --workdir") and f"in use by process {first.pid} on" in last
    assert "another --workdir" in last and len(second.stderr.splitlines()) < 60
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert f"process {first.pid} " in (workdir / "run.lock").read_text()
    restarted = run_train(workdir, *STEPS)
    assert "resumed from" in restarted.stderr
    assert f"process {first.pid} " not in (workdir / "run.lock").read_text()
    assert checkpoint_steps(workdir) == [2, 4, 6]
    assert_same_final_eval(workdir, trained)


def truncate_a_data_file(step_directory: pathlib.Path) -> None:
    data_file = max((p for p in (step_directory / "state").rglob("d/*") if p.is_file()),
                    key=lambda p: p.stat().st_size)
    data_file.write_bytes(data_file.read_bytes()[:100])


def garble_metadata(step_directory: pathlib.Path) -> None:
    (step_directory / "state" / "_METADATA").write_text('{"tree_metadata": {garbled')


@pytest.mark.parametrize("damage", [truncate_a_data_file, garble_metadata])
def test_a_damaged_latest_checkpoint_is_set_aside_and_the_one_before_resumed(trained, tmp_path, damage):
    workdir = copy_of(trained, tmp_path / "w")
    damage(workdir / "checkpoints" / "6")
    resumed = run_train(workdir, *STEPS)
    warnings = [line for line in resumed.stderr.splitlines() if "cannot be restored" in line]
    assert len(warnings) == 1 and "checkpoint step 6 " in warnings[0] and "6.damaged-1" in warnings[0]
    assert "resumed from" in resumed.stderr and "at step 4" in resumed.stderr
    assert len(resumed.stderr.splitlines()) < 60
    assert (workdir / "checkpoints" / "6.damaged-1" / "state").is_dir()
    assert checkpoint_steps(workdir) == [2, 4, 6]
    assert_same_final_eval(workdir, trained)


def test_the_console_filter_drops_library_chatter_and_keeps_our_lines_and_library_warnings():
    def shown(path, level=logging.INFO):
        record = logging.LogRecord("absl", level, path, 1, "message", None, None)
        return workarounds.LibraryRecordFilter().filter(record)

    site = "/usr/lib/python3.11/site-packages"
    assert shown("/work/shunted_jax/train/loop.py")  # the progress line
    assert not shown(f"{site}/jax/_src/xla_bridge.py")  # "Unable to initialize backend 'tpu'"
    assert not shown(f"{site}/tensorflow_datasets/core/dataset_info.py")
    assert shown(f"{site}/jax/_src/xla_bridge.py", logging.WARNING)
    assert shown(f"{site}/tensorflow_datasets/core/reader.py", logging.ERROR)
    assert not shown(f"{site}/orbax/checkpoint/checkpointer.py", logging.ERROR)


def test_the_errors_of_abandoned_orbax_reads_are_dropped_and_no_others():
    """When one read of a restore fails, orbax closes its event loop with the other reads pending;
    each is collected later and reports an error to sys.unraisablehook (on a loaded machine,
    thousands of lines). train.py's hook drops those reports, and only those."""
    serialization = pytest.importorskip("orbax.checkpoint._src.serialization.serialization")
    abandoned_read = serialization._read_array_index_and_device_put(  # never started: only its code is looked at
        [], (), None, global_shape=(), new_shard_shape=(), dtype=None, byte_limiter=None, strict=True, dll=None,
        memory_kind=None)

    async def our_coroutine():
        pass

    other = our_coroutine()
    reports = []
    hook = workarounds.drop_orbax_leftovers(reports.append)

    def report(obj, error):
        return types.SimpleNamespace(exc_type=type(error), exc_value=error, exc_traceback=None, err_msg=None, object=obj)

    hook(report(abandoned_read, Exception("Encountered error while reading array index")))
    hook(report(None, RuntimeError("Event loop is closed")))
    assert reports == []
    kept = [report(other, Exception("ours")), report(None, RuntimeError("something else"))]
    for each in kept:
        hook(each)
    assert reports == kept
    abandoned_read.close()
    other.close()


def test_when_no_checkpoint_restores_one_message_lists_them_all(trained, tmp_path):
    workdir = copy_of(trained, tmp_path / "w")
    for step in (2, 4, 6):
        garble_metadata(workdir / "checkpoints" / str(step))
    result = run_train(workdir, *STEPS, check=False)
    last = error_line(result)
    assert last.startswith("error: no checkpoint in") and all(f"step {s} (" in last for s in (2, 4, 6))
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == [
        "2.damaged-1", "4.damaged-1", "6.damaged-1"]
    assert len(result.stderr.splitlines()) < 60


def test_a_checkpoint_of_another_model_stops_the_restore_and_is_not_set_aside(tmp_path):
    manager = checkpoint.make_checkpoint_manager(tmp_path, ml_collections.ConfigDict({"keep": 3, "asynchronous": False}))
    for step in (2, 4):
        manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave({"w": jnp.ones(3)}),
                                                   meta=ocp.args.JsonSave({"model": {"depth": 1}})))
    abstract = {"w": jax.ShapeDtypeStruct((3,), jnp.float32)}
    with pytest.raises(checkpoint.CheckpointMismatchError, match="another model .*depth: 1 != 2"):
        checkpoint.restore_newest(manager, abstract, {"model": {"depth": 2}}, set_aside=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2", "4"]
    manager.close()


@contextlib.contextmanager
def mounted(*mount_arguments):
    """A temporary mount point with `mount_arguments` mounted on it; skips the test where mounting
    is not allowed (not root, or no mount command)."""
    point = pathlib.Path(tempfile.mkdtemp(prefix="faults_mount_"))
    try:
        mounting = subprocess.run(["mount", *mount_arguments, str(point)], capture_output=True, text=True)
    except FileNotFoundError:
        mounting = None
    if mounting is None or mounting.returncode != 0:
        point.rmdir()
        # A full disk needs a small filesystem of its own; without root there is none to make, and the
        # skip says so in the report (-ra). CI runs as root and runs this test.
        pytest.skip(f"cannot mount here ({mounting.stderr.strip() if mounting else 'no mount command'})")
    try:
        yield point
    finally:
        subprocess.run(["umount", str(point)], check=True)
        point.rmdir()


def test_a_full_disk_stops_at_the_failed_save_with_one_line(tmp_path):
    with mounted("-t", "tmpfs", "-o", "size=2m", "tmpfs") as small_disk:
        result = run_train(small_disk / "w", *STEPS, check=False)
        checkpoints = small_disk / "w" / "checkpoints"
        last = error_line(result)
        assert last.startswith(f"error: saving checkpoint step 2 to {checkpoints / '2'} failed")
        assert "No space left on device" in last
        assert not [p.name for p in checkpoints.iterdir() if not p.name.isdigit()]
        assert len(result.stderr.splitlines()) < 60


@pytest.mark.parametrize("exists, says", [(False, "no checkpoint to evaluate: --workdir {workdir} does not exist"),
                                          (True, "no checkpoint to evaluate in {workdir}/checkpoints")])
def test_eval_of_a_missing_or_empty_workdir_says_there_is_no_checkpoint_and_creates_nothing(tmp_path, exists, says):
    workdir = tmp_path / "w"
    if exists:
        workdir.mkdir()
    result = run_train(workdir, *STEPS, "--mode=eval", check=False)
    assert error_line(result) == "error: " + says.format(workdir=workdir)
    assert sorted(tmp_path.rglob("*")) == ([workdir] if exists else [])


def test_eval_on_read_only_storage_skips_a_damaged_latest_checkpoint(trained, tmp_path):
    workdir = copy_of(trained, tmp_path / "w")
    truncate_a_data_file(workdir / "checkpoints" / "6")
    before = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))
    with mounted("--bind", "-o", "ro", str(workdir)) as read_only:
        with pytest.raises(OSError):
            (read_only / "probe").write_text("")
        result = run_train(read_only, *STEPS, "--mode=eval")
    assert "checkpoint step 6 " in result.stderr and "cannot be restored" in result.stderr
    assert "eval at step 4" in result.stderr and "read-only" in result.stderr
    assert sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*")) == before


@pytest.mark.parametrize("fault", ["deleted", "replaced"])
def test_metrics_records_survive_a_deleted_or_replaced_file(tmp_path, caplog, fault):
    writer = metrics.MetricsWriter(tmp_path, enabled=True)
    writer.write("train", 1, {"loss": 1.0})
    path = tmp_path / "metrics.jsonl"
    path.unlink()
    if fault == "replaced":
        path.write_text('{"kind": "note", "step": 0}\n')
    with caplog.at_level(logging.WARNING):
        writer.write("train", 2, {"loss": 2.0})
        writer.write("train", 3, {"loss": 3.0})
    writer.close()
    assert [r["step"] for r in metrics.read_metrics(path) if r["kind"] == "train"] == [2, 3]
    warnings = [r.getMessage() for r in caplog.records if "deleted or replaced" in r.getMessage()]
    assert len(warnings) == 1 and str(path) in warnings[0]


def test_metrics_that_cannot_be_written_stop_with_one_error(tmp_path):
    writer = metrics.MetricsWriter(tmp_path, enabled=True)
    (tmp_path / "metrics.jsonl").unlink()
    (tmp_path / "metrics.jsonl").mkdir()
    with pytest.raises(console.RunError, match=r"writing .*metrics.jsonl failed: IsADirectoryError"):
        writer.write("train", 1, {"loss": 1.0})


def test_a_run_whose_metrics_cannot_be_written_stops_before_training_with_one_line(tmp_path):
    workdir = tmp_path / "w"
    (workdir / "metrics.jsonl").mkdir(parents=True)
    result = run_train(workdir, *STEPS, check=False)
    last = error_line(result)
    assert last.startswith(f"error: writing {workdir / 'metrics.jsonl'} failed: IsADirectoryError")
    assert "Traceback" not in result.stderr and checkpoint_steps(workdir) == []


def test_a_resume_that_would_change_the_trajectory_is_refused_and_leaves_the_workdir_as_it_was(trained, tmp_path):
    workdir = copy_of(trained, tmp_path / "w", drop_steps=[6])
    before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file() and p.name != "run.lock"}
    result = run_train(workdir, *STEPS, "--config.global_batch_size=32", "--config.optimizer.base_lr=0.004",
                       check=False)
    last = error_line(result)
    assert last == (f"error: --workdir {workdir} was trained with another config: config.global_batch_size 16 -> 32, "
                    f"config.optimizer.base_lr 0.008 -> 0.004. Resume with the values recorded in "
                    f"{workdir / 'config.json'}, or give this run another --workdir; to go on with the new values on "
                    "purpose, add --config.allow_config_change=True (the change is recorded there and in metrics.jsonl)")
    assert len(result.stderr.splitlines()) == 1
    assert {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file() and p.name != "run.lock"} == before


def test_fields_that_do_not_change_the_trajectory_may_change_on_resume(trained, tmp_path):
    workdir = copy_of(trained, tmp_path / "w", drop_steps=[6])
    run_train(workdir, *STEPS, "--config.log_every_steps=2", "--config.checkpoint.keep=5", "--config.eval_batch_size=8",
              "--config.prefetch_to_device=1", "--config.evals.val.every_steps=3")
    manager_options = ml_collections.ConfigDict({"keep": 3, "asynchronous": False})
    with checkpoint.make_checkpoint_manager(workdir / "checkpoints", manager_options, read_only=True) as resumed, \
            checkpoint.make_checkpoint_manager(trained / "checkpoints", manager_options, read_only=True) as straight:
        got, want = checkpoint.load_state(resumed, 6), checkpoint.load_state(straight, 6)
    for got_leaf, want_leaf in zip(jax.tree.leaves(got["params"]), jax.tree.leaves(want["params"])):
        assert jnp.array_equal(got_leaf, want_leaf)
    assert json.loads((workdir / "config.json").read_text())["log_every_steps"] == 2


def test_an_allowed_change_is_recorded_and_the_data_goes_on_from_the_next_unseen_example(trained, tmp_path):
    workdir = copy_of(trained, tmp_path / "w", drop_steps=[6])
    result = run_train(workdir, *STEPS, "--config.global_batch_size=32", "--config.allow_config_change=True")
    assert "resuming at step 4 with another config, as config.allow_config_change allows: " \
           "config.global_batch_size 16 -> 32" in result.stderr
    [change] = [r for r in metrics.read_metrics(workdir / "metrics.jsonl") if r["kind"] == "config_change"]
    assert change == {"kind": "config_change", "step": 4, "changes": {"global_batch_size": [16, 32]}}
    assert json.loads((workdir / "config.json").read_text())["global_batch_size"] == 32
    manager = checkpoint.make_checkpoint_manager(workdir / "checkpoints", ml_collections.ConfigDict(
        {"keep": 3, "asynchronous": False}), read_only=True)
    # 4 steps of 16 examples, then 2 of 32: 128 examples into the epoch (step 6 of 32 alone would say 192).
    assert checkpoint.load_meta(manager, 6)["stream"] == {"epoch": 0, "example": 128}
    assert checkpoint.load_meta(manager, 4)["stream"] == {"epoch": 0, "example": 64}
    manager.close()


def test_a_record_left_half_written_is_skipped_and_later_records_stay_whole(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 1, "loss": 1.0}\n{"kind": "train", "st')  # killed mid-write
    writer = metrics.MetricsWriter(tmp_path, enabled=True)
    writer.write("train", 2, {"loss": 2.0})
    writer.close()
    with caplog.at_level(logging.WARNING):
        assert [r["step"] for r in metrics.read_metrics(path)] == [1, 2]
    assert f"{path}: skipped line(s) 2, which are not metrics records" in caplog.text
