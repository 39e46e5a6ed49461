"""The training loop behind `train.py`, one function from config to checkpoints, as big_vision's
and Flax's imagenet example's: config -> mesh -> data -> model and state -> restore -> steps,
with checkpoints and evaluations on the way."""
import contextlib
import json
import signal
import threading
import time

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from shunted_jax import data
from shunted_jax.train import (checkpoint, compilation_cache, config_check, console, evaluators, finetune,
                               metrics, optim, prefetch, resume, step, workdirs)
from shunted_jax.train.config_check import ConfigError
from shunted_jax.train.console import RunError


class NonFiniteLossError(RunError, FloatingPointError):
    """The loss became NaN or infinite; the last checkpoint before it is kept, the bad state is not saved."""


def initialize_distributed(distributed_config) -> None:
    """`jax.distributed.initialize` from config: explicit coordinator, auto-detection, or nothing."""
    if distributed_config.coordinator_address:
        jax.distributed.initialize(coordinator_address=distributed_config.coordinator_address,
                                   num_processes=distributed_config.num_processes,
                                   process_id=distributed_config.process_id)
    elif distributed_config.auto_detect:
        jax.distributed.initialize()


def check_evaluation_splits(config) -> None:
    """Every evaluator has a split to read (an empty split finds the dataset's own), before anything
    is compiled rather than at the first evaluation."""
    for name in config.evals:
        try:
            data.dataset_info(evaluators.eval_data_config(config, name), require_eval_split=True)
        except ValueError as error:
            raise ConfigError(f"config.evals.{name}: {error}") from error


class StopRequests(contextlib.AbstractContextManager):
    """Ctrl-C (SIGINT) and SIGTERM over a run.

    While the run sets up, Ctrl-C stops it (KeyboardInterrupt): there is nothing new to save.
    Python may run a signal handler inside a garbage-collection callback (JAX registers one), which
    swallows the exception it raises, so the request is also kept and `check()` raises it at the
    next stage of the setup. Once training has begun (`start_training`), SIGTERM and a first Ctrl-C
    ask to save and stop at the next step boundary (`requested`); a second Ctrl-C stops at once,
    without saving.

    With several processes all must stop at the same step, so from the first step JAX's preemption
    sync point decides instead; its coordination service catches SIGTERM itself, and Ctrl-C is
    Python's again. Python delivers signals to the main thread only: a run in another thread
    installs no handler.
    """
    REASONS = {signal.SIGTERM: "preemption requested", signal.SIGINT: "interrupted (Ctrl-C)"}

    def __init__(self):
        self.reason = None
        self._interrupted = False
        self._training = False
        self._previous = {}
        self._handles_signals = threading.current_thread() is threading.main_thread()

    def __enter__(self):
        if self._handles_signals:
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_signal)
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False

    def _on_signal(self, signum, frame):
        if signum == signal.SIGINT:
            again, self._interrupted = self._interrupted, True
            if again or not self._training:
                raise KeyboardInterrupt
            logging.warning("Ctrl-C: stopping once this step is done and saved; Ctrl-C again stops at once, "
                            "without saving")
        self.reason = self.reason or self.REASONS[signum]

    def check(self) -> None:
        """Raises KeyboardInterrupt for a Ctrl-C of the setup that a callback swallowed."""
        if self._interrupted and not self._training:
            raise KeyboardInterrupt

    def start_training(self) -> None:
        """From here on a first Ctrl-C, and SIGTERM, save and stop at the next step boundary."""
        self.check()
        if self._handles_signals:
            if jax.process_count() == 1:
                self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_signal)
            else:
                signal.signal(signal.SIGINT, self._previous[signal.SIGINT])
        self._training = True

    def requested(self, step_number: int) -> bool:
        if jax.process_count() > 1:
            if multihost_utils.reached_preemption_sync_point(step_number):
                self.reason = self.REASONS[signal.SIGTERM]
        return self.reason is not None


def read_checked(pending: list) -> dict:
    """Fetches queued step metrics, stops at the first non-finite loss, returns their means."""
    host = jax.device_get([m for _, m in pending])
    for (step_number, _), values in zip(pending, host):
        if not np.isfinite(values["loss"]):
            raise NonFiniteLossError(f"non-finite loss {float(values['loss'])} at step {step_number}; "
                                     "the last checkpoint before it is kept, this state is not saved")
    return {key: float(np.mean([values[key] for values in host])) for key in host[-1]}


def train_and_evaluate(config, workdir, eval_only: bool = False, keep_compiled_step: bool = False) -> dict:
    """Trains (resuming from the workdir's newest checkpoint that restores), evaluates and
    checkpoints; returns {evaluator name: results} of the last evaluation, or {} when stopped
    early by preemption.

    With `eval_only`, runs every evaluator once on the newest checkpoint instead of training; it
    creates and locks nothing, so it may read a workdir that a run is writing, or read-only storage.
    With `keep_compiled_step` (what `train.py` sets), the compiled train step is kept whole beside
    the compilation cache and a run with the same key loads it without tracing
    (`compilation_cache.compiled_step`), also when only the schedule's numbers or host-side fields
    differ (`step.program_config`). Its key sees this package's files, not code defined or patched
    at run time, as in a notebook: callers that change code so leave it off.
    """
    run_start = time.perf_counter()
    with contextlib.ExitStack() as cleanup:
        stop = cleanup.enter_context(StopRequests())
        config_check.check(config)
        initialize_distributed(config.distributed)
        compilation_cache.enable(config.compilation_cache_dir)
        if eval_only:
            workdir = workdirs.prepare_for_reading(workdir)
        else:
            workdir = workdirs.prepare_for_training(workdir)
        changes = {}
        if not eval_only:
            cleanup.enter_context(workdirs.hold(workdir))
            changes = resume.check_config(workdir, config)
        mesh = step.make_mesh(config.mesh)
        data.check_batch_size(config.global_batch_size, jax.process_count(), mesh.devices.size,
                              config.accumulation_steps)
        data.check_batch_size(config.eval_batch_size, jax.process_count(), mesh.devices.size, name="eval_batch_size")

        info = data.dataset_info(config.data)
        check_evaluation_splits(config)
        steps_per_epoch = data.steps_per_epoch(info.num_train_examples, config.global_batch_size)
        total_steps = optim.total_train_steps(config, steps_per_epoch)

        model = step.create_model(config.model, info.num_classes)
        abstract_state, state_sharding, train_step, initialise = step.prepare_training(
            config, model, mesh, image_size=info.image_size, num_classes=info.num_classes)
        schedule = step.replicated_schedule(config, mesh, steps_per_epoch)
        evals = evaluators.from_config(config, model, mesh, state_sharding, steps_per_epoch)

        manager = checkpoint.make_checkpoint_manager(workdir / "checkpoints", config.checkpoint,
                                                     read_only=eval_only)
        cleanup.callback(manager.close)
        model_meta = {"model": json.loads(json.dumps(config.model.to_dict()))}
        train_state = checkpoint.restore_newest(manager, abstract_state, model_meta, set_aside=not eval_only)
        if train_state is not None:
            logging.info("resumed from %s at step %d", manager.directory, int(train_state.step))
        elif eval_only:
            raise checkpoint.NoCheckpointError(f"no checkpoint to evaluate in {manager.directory}")
        else:
            train_state = initialise()
            if config.init_from:
                train_state = finetune.load_pretrained(train_state, state_sharding, config.init_from)
                logging.info("initialised from %s", config.init_from)
        start = int(jax.device_get(train_state.step))
        stop.check()

        writer = metrics.MetricsWriter(workdir, enabled=jax.process_index() == 0
                                       and (not eval_only or workdirs.can_record(workdir)))
        cleanup.callback(writer.close)
        if eval_only:
            return evaluators.run_all(evals, train_state, writer, start, total_steps, force=True)
        cleanup.callback(checkpoint.wait_for_saves, manager)  # before the manager closes
        resume.record_config(workdir, config, changes, start, writer)

        if start >= total_steps:
            logging.info("the run is complete: step %d of %d", start, total_steps)
            results = evaluate_once(evals, train_state, writer, workdir, start)
            console.log_run_summary(workdir, start, start, config.global_batch_size, (0.0, 0.0),
                                    time.perf_counter() - run_start)
            return results

        position = resume.stream_start(manager, start, steps_per_epoch, config.global_batch_size)
        batches = data.train_iterator(config.data, global_batch_size=config.global_batch_size,
                                      process_index=jax.process_index(), process_count=jax.process_count(),
                                      start=position)
        batches = prefetch.prefetch_to_device(
            batches, lambda local: step.global_batch(local, mesh, jax.process_count()), config.prefetch_to_device)
        cleanup.callback(batches.close)
        log_every = config.log_every_steps
        pending, results, saving = [], {}, None
        train_start, first_step_done, eval_seconds = time.perf_counter(), None, 0.0
        what = console.describe_step("train step", config, info.image_size, mesh)
        if keep_compiled_step:
            shapes = data.train_batch_spec(config.data, config.global_batch_size)
            batch_spec = {name: jax.ShapeDtypeStruct(shape, dtype, sharding=step.batch_sharding(mesh))
                          for name, (shape, dtype) in shapes.items()}
            train_step = compilation_cache.compiled_step(
                train_step, (train_state, batch_spec, schedule), name="train_step",
                config=step.program_config(config),
                context={"num_classes": info.num_classes, "image_size": info.image_size}, what=what)
        else:
            train_step = compilation_cache.announce_first_call(train_step, what)
        stop.start_training()
        last_time, last_step = time.perf_counter(), start
        for step_number in range(start + 1, total_steps + 1):
            train_state, step_metrics = train_step(train_state, next(batches), schedule)
            first_step_done = first_step_done or time.perf_counter()
            saving = checkpoint.check_save(manager, saving)
            pending.append((step_number, step_metrics))
            preempted = stop.requested(step_number)
            last = step_number == total_steps
            save_now = preempted or last or step_number % config.checkpoint.every_steps == 0
            if save_now or step_number % log_every == 0:
                means = read_checked(pending)
                pending = []
                now = time.perf_counter()
                seconds_per_step = (now - last_time) / (step_number - last_step)
                images_per_second = config.global_batch_size / seconds_per_step
                last_time, last_step = now, step_number
                writer.write(evaluators.TRAIN_KIND, step_number,
                             {**means, "images_per_second": images_per_second,
                              "epoch": step_number / steps_per_epoch})
                logging.info(metrics.progress_line(step_number, total_steps, steps_per_epoch, means,
                                                   images_per_second, seconds_per_step))
            if save_now:
                saving = checkpoint.save(manager, train_state, resume.checkpoint_meta(model_meta, position.advanced(
                    step_number - start, steps_per_epoch, config.global_batch_size)))
            if preempted:
                logging.info("%s: saved step %d and stopping", stop.reason, step_number)
                break
            eval_start = time.perf_counter()
            results.update(evaluators.run_all(evals, train_state, writer, step_number, total_steps))
            eval_seconds += time.perf_counter() - eval_start
        checkpoint.wait_for_saves(manager)
        now = time.perf_counter()
        console.log_run_summary(workdir, start, step_number, config.global_batch_size,
                                (now - train_start - eval_seconds, now - first_step_done - eval_seconds),
                                now - run_start, preempted=preempted)
        return {} if preempted else results


def evaluate_once(evals, train_state, writer, workdir, step_number: int) -> dict:
    """A complete run's final evaluation: taken from metrics.jsonl when every evaluator has
    recorded it, run (and recorded) otherwise."""
    path = workdir / "metrics.jsonl"
    records = metrics.read_metrics(path) if path.exists() else []
    recorded = {r["kind"]: r for r in records if r["step"] == step_number}
    if not all(e.name in recorded for e in evals):
        return evaluators.run_all(evals, train_state, writer, step_number, step_number, force=True)
    results = {}
    for evaluator in evals:
        results[evaluator.name] = {k: v for k, v in recorded[evaluator.name].items() if k not in ("kind", "step")}
        evaluators.log_results(evaluator.name, step_number, results[evaluator.name], "recorded")
    return results
