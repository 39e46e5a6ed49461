"""train.py end to end on synthetic data: resume after SIGKILL, SIGTERM, eval mode, two processes, errors."""
import gc
import json
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from configs import common, shunted_t, vit  # noqa: E402
from helpers.processes import (VIT_DEMO, checkpoint_steps, run_train, start_train, stop_mid_run,  # noqa: E402
                               subprocess_env, train_command, wait_for_line)
from shunted_jax import data  # noqa: E402
from shunted_jax.train import checkpoint, loop, metrics, step, workdirs  # noqa: E402


def saved_params(workdir, step: int) -> dict:
    """The parameters of a finished checkpoint, as numpy, whatever mesh wrote them."""
    manager = checkpoint.make_checkpoint_manager(pathlib.Path(workdir) / "checkpoints",
                                                 shunted_t.get_config().checkpoint)
    with manager:
        return jax.tree.map(np.asarray, checkpoint.load_state(manager, step)["params"])


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """An uninterrupted 12-step run, checkpointing every 4 steps, without TensorFlow."""
    workdir = tmp_path_factory.mktemp("straight")
    run_train(workdir, "--config.num_train_steps=12", "--config.checkpoint.every_steps=4", without_tensorflow=True)
    return workdir


def test_straight_run_writes_metrics_checkpoints_and_tensorboard(straight_run):
    records = metrics.read_metrics(straight_run / "metrics.jsonl")
    train_records = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "val"]
    assert [r["step"] for r in train_records] == list(range(1, 13))
    assert all(np.isfinite(r["loss"]) and r["lr"] > 0 and r["images_per_second"] > 0 for r in train_records)
    assert evals[-1]["step"] == 12 and evals[-1]["count"] == 40 and 0 <= evals[-1]["top1"] <= evals[-1]["top5"] <= 1
    assert checkpoint_steps(straight_run) == [4, 8, 12]
    assert any((straight_run / "tensorboard").iterdir())


def test_tensorboard_summaries_do_not_import_pytorch(tmp_path):
    """tensorboardX imports PyTorch when it is installed (seconds of every start-up)."""
    pytest.importorskip("torch")
    script = ("import sys; from shunted_jax.train import metrics; "
              f"w = metrics.MetricsWriter({str(tmp_path)!r}, enabled=True); w.write('train', 1, {{'loss': 1.0}}); "
              "w.close(); print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
    assert any((tmp_path / "tensorboard").iterdir())


def test_sigkill_then_restart_ends_with_the_same_parameters(straight_run, tmp_path):
    flags = ("--config.num_train_steps=12", "--config.checkpoint.every_steps=4")
    process = start_train(tmp_path / "run", *flags)
    wait_for_line(process, "step 9/12")
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert max(checkpoint_steps(tmp_path / "run")) < 12
    resumed = run_train(tmp_path / "run", *flags)
    # The restart compiles nothing: it loads the step kept whole or, where JAX's cache served the
    # step to the run that would have kept it, JAX's cached program.
    assert "resumed from" in resumed.stderr
    assert re.search(r"loaded the (compiled train_step|train step)", resumed.stderr), resumed.stderr[-2000:]
    want, got = saved_params(straight_run, 12), saved_params(tmp_path / "run", 12)
    for got_leaf, want_leaf in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(got_leaf, want_leaf, atol=1e-6)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    saved_step, lines = stop_mid_run(tmp_path, signal.SIGTERM, "preemption requested: saved step")
    assert f"stopped for preemption: trained steps 1-{saved_step} ({saved_step * 16:,} images)" in "".join(lines)


def test_eval_mode_reproduces_the_final_evaluation(straight_run):
    evaluated = run_train(straight_run, "--config.num_train_steps=12", "--mode=eval", num_devices=1)
    evals = [r for r in map(json.loads, (straight_run / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "val"]
    assert "eval at step 12" in evaluated.stderr
    assert evals[-1]["top1"] == pytest.approx(evals[-2]["top1"]) and evals[-1]["count"] == 40


def test_the_demo_model_is_refused_by_the_export_naming_its_stem_width(straight_run, tmp_path):
    """The official Shunted stem is 64 channels wide: the demo's 16 would not load (test_export
    exports the workdirs of models the official code expresses)."""
    from shunted_jax import export

    with pytest.raises(SystemExit, match=r"error: model field embed_dims=\(16, 32, 64, 96\) .*conv stem is 64 "
                                         r"channels wide, so embed_dims\[0\] must be 64 \(config.model.embed_dims"):
        export.main(["--model", "shunted_t", str(straight_run), str(tmp_path / "demo")])
    assert list(tmp_path.iterdir()) == []


def test_two_processes_train_and_checkpoint_together(tmp_path):
    """Two processes of two devices each train one model (the ViT demo, the quickest to compile);
    its LayerNorms are the Pallas kernel (Pallas' interpreter here), each run on its device's share
    of a batch split over both hosts."""
    # Without the persistent compilation cache both processes compile everything: with it, one
    # process loaded what the other compiled and reached the first collective minutes earlier on a
    # loaded machine, past the 30 s in which the CPU collectives must meet.
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    processes = [start_train(tmp_path, "--config.num_train_steps=4", "--config.checkpoint.every_steps=2",
                             "--config.model.kernels=norm=pallas",
                             f"--config.distributed.coordinator_address=localhost:{port}",
                             "--config.distributed.num_processes=2", f"--config.distributed.process_id={index}",
                             num_devices=2, compilation_cache=False, config=VIT_DEMO)
                 for index in range(2)]
    logs = [process.communicate()[1] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert checkpoint_steps(tmp_path) == [2, 4]
    records = metrics.read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    assert [r["count"] for r in records if r["kind"] == "val"] == [40]


def test_misspelled_config_field_fails_before_training(tmp_path):
    result = subprocess.run(train_command(tmp_path, "--config.optimiser.base_lr=1"), env=subprocess_env(1),
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode != 0 and "optimiser" in result.stderr
    assert not (tmp_path / "checkpoints").exists()


def small_config():
    """The ViT demo (the quickest model to compile; the straight run above trains the Shunted demo)
    on synthetic data, on the tests' 8 devices."""
    config = vit.get_config("demo")
    config.unlock()
    config.data.update({"name": "synthetic", "num_classes": 10, "num_train_examples": 64,
                        "num_eval_examples": 16})
    config.update({"global_batch_size": 16, "eval_batch_size": 16, "num_train_steps": 6, "log_every_steps": 1,
                   "compilation_cache_dir": ""})  # keeps conftest's cache
    config.checkpoint.every_steps = 2
    return config


def test_clear_errors_for_batch_size_model_name_and_workdir(tmp_path):
    config = small_config()
    config.global_batch_size = 12
    with pytest.raises(ValueError, match="global_batch_size=12 .* 8 devices"):
        loop.train_and_evaluate(config, tmp_path / "batch")
    config = small_config()
    config.model.name = "shunted_xl"
    with pytest.raises(loop.ConfigError, match="config.model.name='shunted_xl' is not a model"):
        loop.train_and_evaluate(config, tmp_path / "model")
    (tmp_path / "file").write_text("")
    with pytest.raises(workdirs.WorkdirError, match="which is a file"):
        loop.train_and_evaluate(small_config(), tmp_path / "file" / "workdir")
    config = small_config()
    config.data.num_train_examples = 8
    with pytest.raises(ValueError, match="8 examples.*too few for one global batch of 16"):
        loop.train_and_evaluate(config, tmp_path / "split")


@pytest.mark.parametrize("field, value, message", [
    ("global_batch_size", 0, "global_batch_size=0 is out of range; valid: >= 1"),
    ("eval_batch_size", -1, "eval_batch_size=-1 is out of range; valid: >= 1"),
    ("num_epochs", 0.0, "num_epochs=0.0 trains nothing"),
    ("checkpoint.every_steps", 0, "checkpoint.every_steps=0 is out of range; valid: >= 1"),
])
def test_values_that_cannot_run_fail_before_anything_is_built(tmp_path, field, value, message):
    config = small_config()
    config.num_train_steps = -1
    config.update_from_flattened_dict({field: value})
    with pytest.raises(loop.ConfigError, match=message):
        loop.train_and_evaluate(config, tmp_path)
    assert not tmp_path.joinpath("checkpoints").exists()


def test_zero_steps_evaluates_and_a_complete_run_reports_its_recorded_evaluation(tmp_path, caplog):
    config = small_config()
    config.num_train_steps = 0
    with caplog.at_level("INFO"):
        first = loop.train_and_evaluate(config, tmp_path)
    assert first["val"]["count"] == 16
    assert "val: eval at step 0" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO"):
        again = loop.train_and_evaluate(config, tmp_path)
    assert "the run is complete: step 0 of 0" in caplog.text
    assert "val: recorded at step 0" in caplog.text and "val: eval at step 0" not in caplog.text
    assert again["val"]["top1"] == pytest.approx(first["val"]["top1"])
    assert [r["step"] for r in metrics.read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "val"] == [0]


def test_a_run_says_what_it_compiles_and_ends_with_its_speed_and_outputs(tmp_path, monkeypatch, caplog):
    """A resumed run also restores without computing the initial state."""
    config = small_config()
    config.num_train_steps = 2
    with caplog.at_level("INFO"):
        loop.train_and_evaluate(config, tmp_path)
    lines = [record.getMessage() for record in caplog.records]
    what = "the train step of vit_ti16 (16 images of 32x32 a step, 8 cpu device(s))"
    compiling = lines.index(f"compiling {what}")
    assert re.fullmatch(rf"(compiled|loaded) {re.escape(what)}( from JAX's compilation cache)? in [0-9.]+ s",
                        next(line for line in lines[compiling + 1:] if what in line))
    summary = [record.getMessage() for record in caplog.records if record.module == "console"]
    assert re.fullmatch(r"finished: trained steps 1-2 \(32 images\) in \d+:\d\d:\d\d, [0-9.]+ images/s with the first "
                        r"step's compile, [0-9.]+ images/s after it; wall time \d+:\d\d:\d\d", summary[0])
    assert summary[1] == (f"checkpoints in {tmp_path}/checkpoints, metrics in {tmp_path}/metrics.jsonl; TensorBoard "
                         f"events in {tmp_path}/tensorboard (tensorboard --logdir {tmp_path})")
    caplog.clear()
    monkeypatch.setattr("shunted_jax.train.step.run_on_host",
                        lambda *args: pytest.fail("the resumed run initialised its state"))
    with caplog.at_level("INFO"):
        loop.train_and_evaluate(config, tmp_path)
    assert "resumed from" in caplog.text and "the run is complete: step 2 of 2" in caplog.text
    assert "nothing to train: the run was already complete at step 2; wall time" in caplog.text
    assert "compiling" not in caplog.text


def test_every_evaluator_runs_on_its_own_period_and_logs_under_its_name(tmp_path, monkeypatch):
    scalars = []

    class RecordingWriter:
        def add_scalar(self, tag, value, step):
            scalars.append((tag, step))

        def flush(self):
            pass

        def close(self):
            pass

    monkeypatch.setattr(metrics, "_tensorboard_writer", lambda directory: RecordingWriter())
    config = small_config()
    config.evals.val.every_steps = 2
    config.evals.holdout = common.evaluator(config.evals.val.pp, split="test[:8]", every_steps=4)
    results = loop.train_and_evaluate(config, tmp_path)
    records = metrics.read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "val"] == [2, 4, 6]
    assert [r["step"] for r in records if r["kind"] == "holdout"] == [4, 6]
    assert {"val/top1", "holdout/top5", "train/loss"} <= {tag for tag, _ in scalars}
    assert ("holdout/top1", 6) in scalars and ("holdout/top1", 2) not in scalars
    assert set(results) == {"val", "holdout"} and results["holdout"]["count"] == 16


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real_iterator = data.train_iterator

    def poisoned(*args, **kwargs):
        for index, batch in enumerate(real_iterator(*args, **kwargs), start=1):  # a fresh run: step 1 first
            if index == 3:
                batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
            yield batch

    monkeypatch.setattr(data, "train_iterator", poisoned)
    config = small_config()  # float images, which can be NaN, taken as they are
    config.data.update({"synthetic_dtype": "float32", "device_pp_train": ""})
    with pytest.raises(loop.NonFiniteLossError, match="at step 3"):
        loop.train_and_evaluate(config, tmp_path)
    assert checkpoint_steps(tmp_path) == [2]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowed interrupt
def test_a_ctrl_c_that_a_garbage_collection_callback_swallowed_still_stops_the_setup(tmp_path, monkeypatch):
    """Python may run the Ctrl-C handler inside a garbage-collection callback (JAX registers one),
    which reports the KeyboardInterrupt as ignored and goes on; the run stops all the same, before
    its first step."""
    interrupts = []

    def interrupt_once(phase, info):
        if not interrupts:
            interrupts.append(phase)
            signal.raise_signal(signal.SIGINT)

    real_create_model = step.create_model

    def create_model_during_a_collection(*args, **kwargs):
        gc.callbacks.append(interrupt_once)
        try:
            gc.collect()
        finally:
            gc.callbacks.remove(interrupt_once)
        return real_create_model(*args, **kwargs)

    monkeypatch.setattr(step, "create_model", create_model_during_a_collection)
    with pytest.raises(KeyboardInterrupt):
        loop.train_and_evaluate(small_config(), tmp_path)
    assert interrupts and checkpoint_steps(tmp_path) == []
    records = tmp_path / "metrics.jsonl"
    assert not records.exists() or not [r for r in metrics.read_metrics(records) if r["kind"] == "train"]


def test_a_run_in_another_thread_goes_on_without_signal_handlers(tmp_path):
    """Python delivers signals to the main thread only, and lets only it install handlers."""
    config = small_config()
    config.global_batch_size = 12  # stops at the batch check, after the handlers would be installed
    errors = []

    def run():
        try:
            loop.train_and_evaluate(config, tmp_path)
        except Exception as error:  # handed to the test's thread
            errors.append(error)

    handler = signal.getsignal(signal.SIGINT)
    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert len(errors) == 1 and "global_batch_size=12" in str(errors[0]), errors
    assert signal.getsignal(signal.SIGINT) is handler


def test_train_batches_reach_the_step_through_the_device_prefetch(tmp_path, monkeypatch):
    from shunted_jax.train import prefetch
    sizes, handed = [], []
    real = prefetch.prefetch_to_device

    def recording(batches, to_device, size):
        sizes.append(size)
        for batch in real(batches, to_device, size):
            handed.append((type(batch["image"]), batch["image"].dtype, batch["image"].shape))
            yield batch

    monkeypatch.setattr(prefetch, "prefetch_to_device", recording)
    config = small_config()
    config.update({"num_train_steps": 2, "prefetch_to_device": 3})
    loop.train_and_evaluate(config, tmp_path)
    assert sizes == [3]
    assert len(handed) >= 2 and all(issubclass(kind, jax.Array) for kind, _, _ in handed)
    assert handed[0][1:] == (np.uint8, (16, 32, 32, 3))  # uint8 over the wire


def test_compilation_cache_dir_of_the_config_reaches_jax(tmp_path):
    before = jax.config.jax_compilation_cache_dir
    before_min_seconds = jax.config.jax_persistent_cache_min_compile_time_secs
    config = small_config()
    config.global_batch_size = 12  # stops at the batch check, right after the cache is set
    try:
        config.compilation_cache_dir = ""
        with pytest.raises(ValueError, match="global_batch_size=12"):
            loop.train_and_evaluate(config, tmp_path / "keep")
        assert jax.config.jax_compilation_cache_dir == before
        config.compilation_cache_dir = str(tmp_path / "cache")
        with pytest.raises(ValueError, match="global_batch_size=12"):
            loop.train_and_evaluate(config, tmp_path / "set")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cache")
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before_min_seconds)


@pytest.mark.parametrize("config_file", ["shunted_t", "vit"])
def test_configs_list_every_model_field_and_resize_to_the_image_size(config_file):
    """Any model field can be overridden from train.py's command line, and the demo follows data.image_size."""
    import dataclasses
    import importlib

    from shunted_jax import models
    from shunted_jax.data import config as data_config

    config = importlib.import_module(f"configs.{config_file}").get_config("demo")
    model_class = type(models.create(config.model.name))
    fields = {f.name for f in dataclasses.fields(model_class)} - {"parent", "name", "num_classes"}
    assert set(config.model) - {"name"} == fields
    config.unlock()
    config.data.image_size = 48
    assert "resize(48)" in data_config.format_pp(config.data.pp_train, config.data)
    assert "resize(48)" in data_config.format_pp(config.evals.val.pp, config.data)
