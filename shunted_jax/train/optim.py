"""The official optimiser: AdamW with decay on kernels only and a warm-up + cosine learning rate."""
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

# The official recipe scales the learning rate linearly with the global batch, relative to this one.
REFERENCE_BATCH_SIZE = 512


def peak_learning_rate(base_lr: float, global_batch_size: int) -> float:
    """Linear scaling rule of the official recipe: base_lr x global_batch / 512."""
    return base_lr * global_batch_size / REFERENCE_BATCH_SIZE


class WarmupCosine(NamedTuple):
    """The learning rate at a step: linear warm-up from `warmup_init_lr`, then cosine from
    `peak_lr` down to `min_lr`.

    A pytree of numbers that is called like an optax schedule, so that the train step takes it as
    an input: a run of another length or learning rate changes its values, not the step's program.
    As timm's CosineLRScheduler (warmup_prefix=False): the cosine phase is measured from step 0,
    not from the end of the warm-up, so the two phases meet at cos(pi * warmup / total).
    """
    peak_lr: Any
    total_steps: Any
    warmup_steps: Any
    warmup_init_lr: Any
    min_lr: Any

    def __call__(self, step):
        step = jnp.asarray(step, jnp.float32)
        warmup = (self.warmup_init_lr
                  + (self.peak_lr - self.warmup_init_lr) * step / jnp.maximum(self.warmup_steps, 1))
        progress = jnp.minimum(step / jnp.maximum(self.total_steps, 1), 1.0)
        cosine = self.min_lr + 0.5 * (self.peak_lr - self.min_lr) * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(step < self.warmup_steps, warmup, cosine)


def total_train_steps(config, steps_per_epoch: int) -> int:
    """config.num_train_steps when set (>= 0), otherwise config.num_epochs x steps_per_epoch."""
    if config.num_train_steps >= 0:
        return config.num_train_steps
    return max(1, round(config.num_epochs * steps_per_epoch))


# The config fields that `schedule_from_config` reads, besides global_batch_size (which also sets
# the batch's shape). Their values reach the train step as its `schedule` argument, so they are
# left out of the key of the kept step (`step.NOT_IN_TRAIN_PROGRAM`).
SCHEDULE_FIELDS = ("num_epochs", "num_train_steps", "optimizer.base_lr", "optimizer.warmup_epochs",
                   "optimizer.warmup_steps", "optimizer.warmup_init_lr", "optimizer.min_lr")


def schedule_from_config(config, steps_per_epoch: int) -> WarmupCosine:
    """The recipe's schedule over the whole run, as float32 scalars: peak lr scaled by the global
    batch, warm-up in steps or epochs."""
    opt = config.optimizer
    warmup = opt.warmup_steps if opt.warmup_steps >= 0 else round(opt.warmup_epochs * steps_per_epoch)
    schedule = WarmupCosine(
        peak_lr=peak_learning_rate(opt.base_lr, config.global_batch_size),
        total_steps=total_train_steps(config, steps_per_epoch), warmup_steps=warmup,
        warmup_init_lr=opt.warmup_init_lr, min_lr=opt.min_lr)
    return jax.tree.map(np.float32, schedule)


def weight_decay_mask(params):
    """True for leaves named `kernel`, so biases, norm scales and BatchNorm parameters are not decayed.

    Decided by name, not by rank: blocks stacked by `nn.scan` give biases a leading depth axis.
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def clip_by_global_norm_as_torch(max_norm: float) -> optax.GradientTransformation:
    """Scales every gradient by min(1, max_norm / (G + 1e-6)), G the global norm: PyTorch's
    `clip_grad_norm_`, which the official recipe uses. `optax.clip_by_global_norm` divides by G."""
    def clip(updates, params=None):
        del params
        factor = jnp.minimum(1.0, max_norm / (optax.tree.norm(updates) + 1e-6))
        return jax.tree.map(lambda g: g * factor.astype(g.dtype), updates)
    return optax.stateless(clip)


def make_optimizer(optimizer_config, schedule: optax.Schedule) -> optax.GradientTransformation:
    """AdamW on `schedule`, preceded by global-norm clipping when `grad_clip_norm` > 0.

    The state's layout (the clipping's none, AdamW's count and moments, the schedule's count) is
    the same for every schedule, which `init` never calls."""
    adamw = optax.adamw(schedule, b1=optimizer_config.b1, b2=optimizer_config.b2,
                        eps=optimizer_config.eps, weight_decay=optimizer_config.weight_decay,
                        mask=weight_decay_mask)
    if optimizer_config.grad_clip_norm > 0:
        return optax.chain(clip_by_global_norm_as_torch(optimizer_config.grad_clip_norm), adamw)
    return adamw
