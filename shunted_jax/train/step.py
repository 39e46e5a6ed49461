"""The jitted train and eval steps, and `setup_training`, which builds everything a loop or a
benchmark needs for one model, config and mesh.

Benchmark use (times exactly the step training runs)::

    setup = setup_training(model, config, mesh, image_size=224, num_classes=1000, steps_per_epoch=1251)
    batch = synthetic_batch(setup, config.global_batch_size, 224, 1000)
    state, metrics = setup.train_step(setup.state, batch)   # state is donated: keep the returned one
"""
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from shunted_jax.train import mixup, optim, sharding
from shunted_jax.train.state import TrainState, create_train_state


def _loss_and_grads(model, params, batch_stats, images, targets, rng):
    """Soft-target cross-entropy of one (micro-)batch, its gradients and the updated BatchNorm stats."""
    def loss_fn(params):
        variables = {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}
        logits, updates = model.apply(variables, images, train=True, rngs={"dropout": rng},
                                      mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), targets).mean()
        return loss, updates.get("batch_stats", batch_stats)
    (loss, new_batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, new_batch_stats, grads


def _accumulated_loss_and_grads(model, params, batch_stats, images, targets, rng, num_micro: int, mesh):
    """Mean loss and gradients over `num_micro` micro-batches, computed one after another.

    Micro-batch j takes examples j, j + num_micro, ... so every device holds a share of each one.
    With equal-sized micro-batches the result equals one step on the whole batch (BatchNorm
    statistics and drop-path draws aside, which are per micro-batch).
    """
    if num_micro == 1:
        return _loss_and_grads(model, params, batch_stats, images, targets, rng)

    micro_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, sharding.MESH_AXES))

    def split(x):
        x = x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:])
        return jax.lax.with_sharding_constraint(jnp.swapaxes(x, 0, 1), micro_sharding)

    def body(carry, micro):
        loss_sum, grads_sum, batch_stats = carry
        micro_images, micro_targets, micro_rng = micro
        loss, batch_stats, grads = _loss_and_grads(model, params, batch_stats, micro_images,
                                                   micro_targets, micro_rng)
        return (loss_sum + loss, jax.tree.map(jnp.add, grads_sum, grads), batch_stats), None

    init = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params), batch_stats)
    micro_batches = (split(images), split(targets), jax.random.split(rng, num_micro))
    (loss_sum, grads_sum, batch_stats), _ = jax.lax.scan(body, init, micro_batches)
    return loss_sum / num_micro, batch_stats, jax.tree.map(lambda g: g / num_micro, grads_sum)


def parse_compiler_options(text: str) -> dict:
    """XLA options for `jax.jit` from a config string: "name=value name=value", the XLA_FLAGS
    syntax (leading dashes optional). true/false become booleans, which is what XLA accepts
    here; XLA itself rejects unknown names and bad values when it compiles."""
    options = {}
    for item in text.split():
        name, sep, value = item.lstrip("-").partition("=")
        if not sep or not name.startswith("xla_"):
            raise ValueError(f"compiler option {item!r} is not of the form xla_name=value; "
                             "separate several options with spaces")
        if name in options:
            raise ValueError(f"compiler option {name} is given twice in {text!r}")
        options[name] = {"true": True, "false": False}.get(value.lower(), value)
    return options


def make_train_step(model, config, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    mesh, state_sharding, num_classes: int, compiler_options: dict) -> Callable:
    """`step(state, batch) -> (state, metrics)`, jitted over `mesh` with the state donated.

    `batch` is {"image": f32 (B, H, W, 3), "label": i32 (B,)} sharded over all devices. Mixup/CutMix
    and label smoothing happen inside; randomness is `fold_in(key(config.seed), step)`, so it is
    the same on any mesh and after a resume. Metrics: loss, grad_norm, lr (replicated scalars).
    XLA compiles it with `compiler_options` (see `parse_compiler_options`).
    """
    base_key = jax.random.key(config.seed)
    mix = config.mixup

    def train_step(state: TrainState, batch):
        mix_key, dropout_key = jax.random.split(jax.random.fold_in(base_key, state.step))
        images, targets = mixup.mix_batch(
            mix_key, batch["image"], batch["label"], num_classes=num_classes,
            mixup_alpha=mix.mixup_alpha, cutmix_alpha=mix.cutmix_alpha, prob=mix.prob,
            switch_prob=mix.switch_prob, label_smoothing=config.label_smoothing)
        loss, batch_stats, grads = _accumulated_loss_and_grads(
            model, state.params, state.batch_stats, images, targets, dropout_key,
            config.accumulation_steps, mesh)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema_params = state.ema_params
        if ema_params is not None:
            ema_params = optax.incremental_update(params, ema_params, 1.0 - config.ema_decay)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                                  opt_state=opt_state, ema_params=ema_params)
        return new_state, metrics

    return jax.jit(train_step,
                   in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
                   out_shardings=(state_sharding, sharding.replicated(mesh)),
                   donate_argnums=0, compiler_options=compiler_options)


def make_eval_step(model, mesh, state_sharding, use_ema: bool, compiler_options: dict) -> Callable:
    """`eval_step(state, batch) -> sums` of top-1 and top-5 hits, loss and examples over the
    examples whose `mask` is true (padding is excluded), as replicated scalars."""
    def eval_step(state: TrainState, batch):
        logits = model.apply(state.variables(use_ema), batch["image"], train=False).astype(jnp.float32)
        labels, mask = batch["label"], batch["mask"].astype(jnp.float32)
        top = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
        hits = top == labels[:, None]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return {"top1": jnp.sum(hits[:, 0] * mask), "top5": jnp.sum(hits.any(axis=-1) * mask),
                "loss": jnp.sum(loss * mask), "count": jnp.sum(mask)}

    return jax.jit(eval_step, in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
                   out_shardings=sharding.replicated(mesh), compiler_options=compiler_options)


@dataclasses.dataclass
class TrainSetup:
    """What one training run needs: the initial state, its sharding, the steps and the schedule."""
    state: TrainState
    state_sharding: Any
    batch_sharding: jax.sharding.NamedSharding
    train_step: Callable
    eval_step: Callable
    schedule: optax.Schedule
    mesh: jax.sharding.Mesh


def schedule_from_config(config, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    """The recipe's schedule: peak lr scaled by the global batch, warm-up in steps or epochs."""
    opt = config.optimizer
    warmup = opt.warmup_steps if opt.warmup_steps >= 0 else round(opt.warmup_epochs * steps_per_epoch)
    return optim.warmup_cosine_schedule(
        peak_lr=optim.peak_learning_rate(opt.base_lr, config.global_batch_size),
        total_steps=total_steps, warmup_steps=warmup, warmup_init_lr=opt.warmup_init_lr,
        min_lr=opt.min_lr)


def total_train_steps(config, steps_per_epoch: int) -> int:
    """config.num_train_steps when set (>= 0), otherwise config.num_epochs x steps_per_epoch."""
    if config.num_train_steps >= 0:
        return config.num_train_steps
    return max(1, round(config.num_epochs * steps_per_epoch))


def setup_training(model, config, mesh, *, image_size: int, num_classes: int,
                   steps_per_epoch: int) -> TrainSetup:
    """Builds schedule, optimiser, sharded state and jitted steps exactly as `train.py` uses them."""
    compiler_options = parse_compiler_options(config.compiler_options)  # a malformed one fails first
    schedule = schedule_from_config(config, steps_per_epoch, total_train_steps(config, steps_per_epoch))
    tx = optim.make_optimizer(config.optimizer, schedule)
    state, state_sharding = create_train_state(model, tx, mesh, image_size=image_size, seed=config.seed,
                                               keep_ema=config.ema_decay > 0)
    return TrainSetup(
        state=state, state_sharding=state_sharding, batch_sharding=sharding.batch_sharding(mesh),
        train_step=make_train_step(model, config, tx, schedule, mesh, state_sharding, num_classes,
                                   compiler_options),
        eval_step=make_eval_step(model, mesh, state_sharding, config.ema_decay > 0, compiler_options),
        schedule=schedule, mesh=mesh)


def synthetic_batch(setup: TrainSetup, global_batch_size: int, image_size: int, num_classes: int,
                    seed: int = 0) -> dict:
    """A random global batch in the step's input sharding (for benchmarks and smoke tests)."""
    rng = np.random.default_rng(seed)
    batch = {"image": rng.standard_normal((global_batch_size, image_size, image_size, 3), np.float32),
             "label": rng.integers(0, num_classes, global_batch_size).astype(np.int32)}
    return jax.device_put(batch, setup.batch_sharding)
