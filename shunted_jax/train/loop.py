"""The training loop and the eval-only mode behind `train.py`."""
import contextlib
import dataclasses
import json
import pathlib
import signal
import time

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from shunted_jax import data
from shunted_jax.train import checkpoint, evaluate, finetune, metrics, sharding, step, state, workdirs


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the last checkpoint before it is kept, the bad state is not saved."""


def initialize_distributed(distributed_config) -> None:
    """`jax.distributed.initialize` from config: explicit coordinator, auto-detection, or nothing."""
    if distributed_config.coordinator_address:
        jax.distributed.initialize(coordinator_address=distributed_config.coordinator_address,
                                   num_processes=distributed_config.num_processes,
                                   process_id=distributed_config.process_id)
    elif distributed_config.auto_detect:
        jax.distributed.initialize()


def check_batch_size(batch_size: int, mesh, process_count: int, accumulation_steps: int, what: str) -> None:
    """Each (micro-)batch is split evenly over all devices and processes, or we stop here."""
    devices = mesh.devices.size
    micro = batch_size // accumulation_steps
    if batch_size % accumulation_steps or micro % devices or batch_size % process_count:
        raise ValueError(f"{what}={batch_size} must split into {accumulation_steps} micro-batch(es) "
                         f"each divisible by the {devices} devices of the mesh (and by {process_count} "
                         "process(es))")


@dataclasses.dataclass
class Run:
    """Everything built from a config before the first step."""
    config: object
    workdir: pathlib.Path
    info: data.DatasetInfo
    setup: step.TrainSetup
    manager: object
    model_meta: dict
    steps_per_epoch: int
    total_steps: int
    lock: workdirs.WorkdirLock | None


def build_run(config, workdir, for_training: bool = True) -> Run:
    """Validates the config against the devices and data, and builds model, state and checkpoints."""
    initialize_distributed(config.distributed)
    workdir = workdirs.prepare_for_training(workdir) if for_training else workdirs.prepare_for_reading(workdir)
    lock = workdirs.hold(workdir) if for_training else None
    mesh = sharding.make_mesh(config.mesh)
    check_batch_size(config.global_batch_size, mesh, jax.process_count(), config.accumulation_steps,
                     "global_batch_size")
    check_batch_size(config.eval_batch_size, mesh, jax.process_count(), 1, "eval_batch_size")
    info = data.dataset_info(config.data)
    steps_per_epoch = max(1, info.num_train_examples // config.global_batch_size)
    model = state.create_model(config.model, info.num_classes)
    setup = step.setup_training(model, config, mesh, image_size=info.image_size,
                                num_classes=info.num_classes, steps_per_epoch=steps_per_epoch)
    manager = checkpoint.make_checkpoint_manager(workdir / "checkpoints", config.checkpoint,
                                                 read_only=not for_training)
    model_meta = {"model": json.loads(json.dumps(config.model.to_dict()))}
    return Run(config=config, workdir=workdir, info=info, setup=setup, manager=manager,
               model_meta=model_meta, steps_per_epoch=steps_per_epoch,
               total_steps=step.total_train_steps(config, steps_per_epoch), lock=lock)


def restore_latest(run: Run, set_aside: bool):
    abstract = checkpoint.abstract_like(run.setup.state, run.setup.state_sharding)
    return checkpoint.restore_newest(run.manager, abstract, run.model_meta, set_aside=set_aside)


class PreemptionWatcher(contextlib.AbstractContextManager):
    """Turns SIGTERM into a request to save and stop at the next step boundary.

    With several processes all must stop at the same step, so JAX's preemption sync point decides
    instead; its coordination service catches SIGTERM itself, so no Python handler is installed.
    """

    def __init__(self):
        self._signalled = False
        self._previous = None

    def __enter__(self):
        if jax.process_count() == 1:
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc_info):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False

    def _on_sigterm(self, signum, frame):
        self._signalled = True

    def requested(self, step_number: int) -> bool:
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step_number)
        return self._signalled


def read_checked(pending: list) -> dict:
    """Fetches queued step metrics, stops at the first non-finite loss, returns their means."""
    host = jax.device_get([m for _, m in pending])
    for (step_number, _), values in zip(pending, host):
        if not np.isfinite(values["loss"]):
            raise NonFiniteLossError(f"non-finite loss {float(values['loss'])} at step {step_number}; "
                                     "the last checkpoint before it is kept, this state is not saved")
    return {key: float(np.mean([values[key] for values in host])) for key in host[-1]}


def run_evaluation(run: Run, train_state, writer: metrics.MetricsWriter, step_number: int) -> dict:
    batches = data.eval_iterator(run.config.data, global_batch_size=run.config.eval_batch_size,
                                 process_index=jax.process_index(), process_count=jax.process_count())
    results = evaluate.evaluate(run.setup.eval_step, train_state, batches, run.setup.batch_sharding,
                                jax.process_count())
    writer.write("eval", step_number, results)
    logging.info("eval at step %d: top1 %.4f top5 %.4f loss %.4f over %d examples", step_number,
                 results["top1"], results["top5"], results["loss"], results["count"])
    return results


def interval(steps: int, epochs: float, steps_per_epoch: int) -> int:
    """An interval given in steps (>= 0) or else in epochs, at least one step."""
    return max(1, steps if steps > 0 else round(epochs * steps_per_epoch))


def train_and_evaluate(config, workdir) -> dict:
    """Trains (resuming from the workdir's latest checkpoint), evaluates, checkpoints; returns the
    last eval results, or {} when stopped early by preemption."""
    run = build_run(config, workdir)
    if run.manager.latest_step() is not None:
        train_state = restore_latest(run, set_aside=True)
        logging.info("resumed from %s at step %d", run.manager.directory, int(train_state.step))
    elif config.init_from:
        train_state = finetune.load_pretrained(run.setup.state, run.setup.state_sharding, config.init_from)
        logging.info("initialised from %s", config.init_from)
    else:
        train_state = run.setup.state
    writer = metrics.MetricsWriter(run.workdir, enabled=jax.process_index() == 0)
    try:
        return _train(run, train_state, writer)
    finally:
        checkpoint.wait_for_saves(run.manager)
        run.manager.close()
        writer.close()
        run.lock.release()


def _train(run: Run, train_state, writer: metrics.MetricsWriter) -> dict:
    config = run.config
    start = int(jax.device_get(train_state.step))
    batches = data.train_iterator(config.data, global_batch_size=config.global_batch_size,
                                  process_index=jax.process_index(), process_count=jax.process_count(),
                                  start_step=start)
    log_every = max(1, config.log_every_steps)
    eval_every = interval(config.eval_every_steps, config.eval_every_epochs, run.steps_per_epoch)
    pending, results, saving = [], {}, None
    last_time, last_step = time.perf_counter(), start
    with PreemptionWatcher() as preemption:
        for step_number in range(start + 1, run.total_steps + 1):
            batch = sharding.global_batch(next(batches), run.setup.batch_sharding, jax.process_count())
            train_state, step_metrics = run.setup.train_step(train_state, batch)
            saving = checkpoint.check_save(run.manager, saving)
            pending.append((step_number, step_metrics))
            preempted = preemption.requested(step_number)
            last = step_number == run.total_steps
            save_now = preempted or last or step_number % config.checkpoint.every_steps == 0
            if save_now or step_number % log_every == 0:
                means = read_checked(pending)
                pending = []
                now = time.perf_counter()
                seconds_per_step = (now - last_time) / (step_number - last_step)
                images_per_second = config.global_batch_size / seconds_per_step
                last_time, last_step = now, step_number
                writer.write("train", step_number, {**means, "images_per_second": images_per_second,
                                                    "epoch": step_number / run.steps_per_epoch})
                logging.info(metrics.progress_line(step_number, run.total_steps, run.steps_per_epoch,
                                                   means, images_per_second, seconds_per_step))
            if save_now:
                saving = checkpoint.save(run.manager, train_state, run.model_meta)
            if preempted:
                logging.info("preemption requested: saved step %d and stopping", step_number)
                return {}
            if last or step_number % eval_every == 0:
                results = run_evaluation(run, train_state, writer, step_number)
    return results


def evaluate_checkpoint(config, workdir) -> dict:
    """Evaluates the latest checkpoint in `workdir` (the weights training would evaluate)."""
    run = build_run(config, workdir, for_training=False)
    if run.manager.latest_step() is None:
        raise checkpoint.NoCheckpointError(f"no checkpoint to evaluate in {run.manager.directory}")
    train_state = restore_latest(run, set_aside=False)
    writer = metrics.MetricsWriter(run.workdir,
                                   enabled=jax.process_index() == 0 and workdirs.can_record(run.workdir))
    try:
        return run_evaluation(run, train_state, writer, int(jax.device_get(train_state.step)))
    finally:
        run.manager.close()
        writer.close()
