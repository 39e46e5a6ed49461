"""The official optimiser: AdamW with decay on kernels only and a warm-up + cosine learning rate."""
import jax
import jax.numpy as jnp
import optax

# The official recipe scales the learning rate linearly with the global batch, relative to this one.
REFERENCE_BATCH_SIZE = 512


def peak_learning_rate(base_lr: float, global_batch_size: int) -> float:
    """Linear scaling rule of the official recipe: base_lr x global_batch / 512."""
    return base_lr * global_batch_size / REFERENCE_BATCH_SIZE


def warmup_cosine_schedule(*, peak_lr: float, total_steps: int, warmup_steps: int,
                           warmup_init_lr: float, min_lr: float) -> optax.Schedule:
    """Linear warm-up from `warmup_init_lr`, then cosine from `peak_lr` down to `min_lr`.

    As timm's CosineLRScheduler (warmup_prefix=False): the cosine phase is measured from step 0,
    not from the end of the warm-up, so the two phases meet at cos(pi * warmup / total).
    """
    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warmup = warmup_init_lr + (peak_lr - warmup_init_lr) * step / max(warmup_steps, 1)
        progress = jnp.minimum(step / max(total_steps, 1), 1.0)
        cosine = min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(step < warmup_steps, warmup, cosine)
    return schedule


def total_train_steps(config, steps_per_epoch: int) -> int:
    """config.num_train_steps when set (>= 0), otherwise config.num_epochs x steps_per_epoch."""
    if config.num_train_steps >= 0:
        return config.num_train_steps
    return max(1, round(config.num_epochs * steps_per_epoch))


def schedule_from_config(config, steps_per_epoch: int) -> optax.Schedule:
    """The recipe's schedule over the whole run: peak lr scaled by the global batch, warm-up in
    steps or epochs."""
    opt = config.optimizer
    warmup = opt.warmup_steps if opt.warmup_steps >= 0 else round(opt.warmup_epochs * steps_per_epoch)
    return warmup_cosine_schedule(
        peak_lr=peak_learning_rate(opt.base_lr, config.global_batch_size),
        total_steps=total_train_steps(config, steps_per_epoch), warmup_steps=warmup,
        warmup_init_lr=opt.warmup_init_lr, min_lr=opt.min_lr)


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
    """AdamW on `schedule`, preceded by global-norm clipping when `grad_clip_norm` > 0."""
    adamw = optax.adamw(schedule, b1=optimizer_config.b1, b2=optimizer_config.b2,
                        eps=optimizer_config.eps, weight_decay=optimizer_config.weight_decay,
                        mask=weight_decay_mask)
    if optimizer_config.grad_clip_norm > 0:
        return optax.chain(clip_by_global_norm_as_torch(optimizer_config.grad_clip_norm), adamw)
    return adamw
