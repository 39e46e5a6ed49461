"""Evaluators built from `config.evals`, as big_vision's: each a dataset split with its own
preprocessing and period, logged under its own name. `pp` runs on the host (uint8 out),
`device_pp` (data.device_ops, normalisation) in the jitted eval step; an empty `device_pp` takes
the host's images as they are (train.step.apply_device_pp).

    config.evals.val = {"dataset": "", "split": "", "pp": "decode_uint8|...", "device_pp": "value_range(0,1)|normalize",
                        "every_steps": -1, "every_epochs": 1.0}

An empty dataset is the training data's (`config.data.name`); an empty split is the first of
validation, val and test that the dataset has. Each evaluator runs every `every_steps` (> 0) or
else every `every_epochs`, and after the last step. Its top1, top5 (fractions), loss (mean) and
count go to metrics.jsonl as {"kind": name, ...} and to TensorBoard as `name/top1`, ...
"""
import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from shunted_jax import data
from shunted_jax.train import step

# metrics.jsonl's kind and TensorBoard's prefix of the train step's metrics; no evaluator may take it.
TRAIN_KIND = "train"


def eval_images(device_pp: str, images):
    """An evaluation batch through its device ops (deterministic: the keys are fixed)."""
    return step.apply_device_pp(device_pp, images, jax.random.key(0), 0)


def make_eval_step(model, mesh, state_sharding, use_ema: bool, compiler_options: dict,
                   device_pp: str) -> Callable:
    """`eval_step(state, batch) -> sums` of top-1 and top-5 hits, loss and examples over the
    examples whose `mask` is true (padding is excluded), as replicated scalars; the images go
    through the device ops of `device_pp` first."""
    step.check_device_pp(device_pp)

    def eval_step(state: step.TrainState, batch):
        images = eval_images(device_pp, batch["image"])
        logits = model.apply(state.variables(use_ema), images, train=False).astype(jnp.float32)
        labels, mask = batch["label"], batch["mask"].astype(jnp.float32)
        top = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
        hits = top == labels[:, None]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return {"top1": jnp.sum(hits[:, 0] * mask), "top5": jnp.sum(hits.any(axis=-1) * mask),
                "loss": jnp.sum(loss * mask), "count": jnp.sum(mask)}

    return jax.jit(step.on_mesh(eval_step, mesh), in_shardings=(state_sharding, step.batch_sharding(mesh)),
                   out_shardings=step.replicated(mesh), compiler_options=compiler_options)


def eval_data_config(config, name: str):
    """The data config `data.eval_iterator` reads for evaluator `name`: the training data's, with
    the evaluator's dataset, split and preprocessing."""
    if name not in config.evals:
        raise ValueError(f"no evaluator {name!r} in config.evals; it has {sorted(config.evals)}")
    spec = config.evals[name]
    return data.with_defaults(config.data, name=spec.dataset or config.data.name, eval_split=spec.split,
                              pp_eval=spec.pp)


@dataclasses.dataclass(frozen=True)
class Evaluator:
    """One evaluation set: where its batches come from, when it runs, and the jitted eval step."""
    name: str
    data_config: object
    every_steps: int
    batch_size: int
    eval_step: Callable
    mesh: jax.sharding.Mesh

    def due(self, step_number: int, last_step: int) -> bool:
        return step_number == last_step or step_number % self.every_steps == 0

    def run(self, state) -> dict:
        """top1, top5, loss and count over every example of the split exactly once (padding masked);
        every process must yield as many batches."""
        batches = data.eval_iterator(self.data_config, global_batch_size=self.batch_size,
                                     process_index=jax.process_index(), process_count=jax.process_count())
        totals = {"top1": 0.0, "top5": 0.0, "loss": 0.0, "count": 0.0}
        for local_batch in batches:
            sums = jax.device_get(self.eval_step(state, step.global_batch(local_batch, self.mesh,
                                                                          jax.process_count())))
            for key in totals:
                totals[key] += float(np.asarray(sums[key], np.float64))
        count = totals["count"]
        if count == 0:
            raise ValueError(f"evaluator {self.name!r}: its split yielded no examples")
        return {"top1": totals["top1"] / count, "top5": totals["top5"] / count,
                "loss": totals["loss"] / count, "count": int(count)}


def interval(steps: int, epochs: float, steps_per_epoch: int) -> int:
    """An interval given in steps (> 0) or else in epochs, at least one step."""
    return max(1, steps if steps > 0 else round(epochs * steps_per_epoch))


def from_config(config, model, mesh, state_sharding, steps_per_epoch: int) -> list[Evaluator]:
    """One Evaluator per entry of config.evals; those with the same device pp share one eval step."""
    if TRAIN_KIND in config.evals:
        raise ValueError(f"config.evals.{TRAIN_KIND}: the name {TRAIN_KIND!r} is the train step's metrics; "
                         "give the evaluator another name")
    compiler_options = step.parse_compiler_options(config.compiler_options)
    eval_steps = {}
    for spec in config.evals.values():
        if spec.device_pp not in eval_steps:
            eval_steps[spec.device_pp] = make_eval_step(model, mesh, state_sharding, config.ema_decay > 0,
                                                        compiler_options, spec.device_pp)
    return [Evaluator(name=name, data_config=eval_data_config(config, name),
                      every_steps=interval(spec.every_steps, spec.every_epochs, steps_per_epoch),
                      batch_size=config.eval_batch_size, eval_step=eval_steps[spec.device_pp], mesh=mesh)
            for name, spec in config.evals.items()]


def run_all(evaluators, state, writer, step_number: int, last_step: int, force: bool = False) -> dict:
    """Runs the evaluators due at `step_number` (all of them with `force`), writes and logs each;
    returns {name: results}."""
    results = {}
    for evaluator in evaluators:
        if force or evaluator.due(step_number, last_step):
            results[evaluator.name] = evaluator.run(state)
            writer.write(evaluator.name, step_number, results[evaluator.name])
            log_results(evaluator.name, step_number, results[evaluator.name])
    return results


def log_results(name: str, step_number: int, results: dict, how: str = "eval") -> None:
    """'val: eval at step 6: top1 ... over N examples' (`how` says whether it ran now or was recorded)."""
    logging.info("%s: %s at step %d: top1 %.4f top5 %.4f loss %.4f over %d examples", name, how, step_number,
                 *(results[key] for key in ("top1", "top5", "loss", "count")))
