"""One train step, whole: the train state, where its arrays live on the device mesh, the loss and
the jitted step. The recipe's other two pieces are `optim` (schedule, AdamW) and `mixup`.

    state, state_sharding, train_step, schedule = init_training(config, model, mesh, image_size=224,
                                                                num_classes=1000, steps_per_epoch=1251)
    state, metrics = train_step(state, synthetic_batch(mesh, 1024, 224, 1000), schedule)  # state is donated

The batch's images come from the host as uint8; the step applies `config.data.device_pp_train`
(`data.device_ops`: RandAugment, normalisation, random erasing) on the device before mixup/CutMix.

The learning-rate schedule is an input of the step (`optim.WarmupCosine`), not a constant in it:
runs of another length or learning rate run the same program, and `program_config` is the part of
the config that decides it (in the key of the step `train.py` keeps).

`train.loop` builds the step with `prepare_training` and `bench` with `init_training` (the same,
with the initial state and the schedule computed), so a benchmark times the step training runs.
"""
import functools
import math
import re
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from shunted_jax import models
from shunted_jax.data import device_ops
from shunted_jax.train import mixup, optim


@flax.struct.dataclass
class TrainState:
    """Everything a step changes. `batch_stats` is {} for models without BatchNorm (PVTv2);
    `ema_params` is None unless an exponential moving average of the weights is kept."""
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    ema_params: Any = None

    def variables(self, use_ema: bool = False) -> dict:
        """The Flax variables to apply the model with (the EMA weights when asked and kept)."""
        params = self.ema_params if use_ema and self.ema_params is not None else self.params
        if self.batch_stats:
            return {"params": params, "batch_stats": self.batch_stats}
        return {"params": params}


def create_model(model_config, num_classes: int):
    """`models.create(name, num_classes=..., **fields)` from a config.model ConfigDict; dtypes given
    by name."""
    fields = model_config.to_dict()
    name = fields.pop("name")
    for key in ("dtype", "param_dtype"):
        if key in fields:
            fields[key] = jnp.dtype(fields[key])
    return models.create(name, num_classes=num_classes, **fields)


# ---------------------------------------------------------------------------------------------
# Where arrays live: a ("data", "fsdp") mesh; batches split over all devices, parameters FSDP.

MESH_AXES = ("data", "fsdp")
# The batch is split over every device: both mesh axes.
BATCH_SPEC = PartitionSpec(MESH_AXES)


def make_mesh(mesh_config, devices=None) -> Mesh:
    """A ("data", "fsdp") mesh over `devices` (all of them by default); data=-1 takes what fsdp leaves."""
    devices = list(jax.devices() if devices is None else devices)
    fsdp = mesh_config.fsdp
    if fsdp < 1 or len(devices) % fsdp:
        raise ValueError(f"mesh.fsdp={fsdp} must be a positive divisor of the {len(devices)} devices")
    data = len(devices) // fsdp if mesh_config.data == -1 else mesh_config.data
    if data * fsdp != len(devices):
        raise ValueError(f"mesh data={data} x fsdp={fsdp} does not cover the {len(devices)} devices")
    return jax.make_mesh((data, fsdp), MESH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def _is_stacked(path) -> bool:
    """Whether a leaf belongs to blocks stacked by nn.scan ("block1".."block4", or "blocks"), whose
    leading axis is the depth."""
    return any(re.fullmatch(r"blocks?\d*", str(getattr(entry, "key", ""))) for entry in path)


def fsdp_spec(path, shape, fsdp_size: int, min_shard_size: int) -> PartitionSpec:
    """Shards the largest dimension divisible by `fsdp_size` over "fsdp", or replicates.

    Leaves smaller than `min_shard_size` elements stay replicated. The leading depth axis of stacked
    block parameters is used only when no other dimension divides.
    """
    if fsdp_size == 1 or math.prod(shape) < min_shard_size:
        return PartitionSpec()
    first = 1 if _is_stacked(path) and len(shape) > 1 else 0
    candidates = [d for d in range(first, len(shape)) if shape[d] % fsdp_size == 0]
    if not candidates and first == 1 and shape[0] % fsdp_size == 0:
        candidates = [0]
    if not candidates:
        return PartitionSpec()
    dim = max(candidates, key=lambda d: shape[d])
    return PartitionSpec(*([None] * dim), "fsdp")


def state_sharding(abstract_state, mesh: Mesh, min_shard_size: int = 2 ** 12):
    """NamedShardings for every leaf of a (possibly abstract) pytree: FSDP when mesh has fsdp > 1.

    Optimizer moments carry the parameter names in their paths, so they shard like their parameters.
    """
    fsdp_size = mesh.shape["fsdp"]
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(mesh, fsdp_spec(path, np.shape(leaf), fsdp_size, min_shard_size)),
        abstract_state)


def abstract_like(state, shardings):
    """Shape/dtype/sharding placeholders of a (possibly abstract) pytree, e.g. to restore a
    checkpoint into: the current mesh decides the layout."""
    return jax.tree.map(lambda leaf, target: jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype, sharding=target),
                        state, shardings)


def on_mesh(fn: Callable, mesh: Mesh) -> Callable:
    """`fn` traced with `mesh` as the mesh in context, for `jax.jit`: the model's Pallas kernels
    then run on each device's share of the batch (`shunted_jax.kernels.dispatch`)."""
    @functools.wraps(fn)
    def traced(*args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args)
    return traced


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, BATCH_SPEC)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def global_batch(local_batch: dict, mesh: Mesh, process_count: int) -> dict:
    """Assembles each process's local numpy batch into global arrays sharded over the batch axis."""
    sharding = batch_sharding(mesh)

    def to_global(array):
        array = np.asarray(array)
        shape = (array.shape[0] * process_count, *array.shape[1:])
        return jax.make_array_from_process_local_data(sharding, array, shape)
    return {name: to_global(value) for name, value in local_batch.items()}


def synthetic_batch(mesh: Mesh, global_batch_size: int, image_size: int, num_classes: int, seed: int = 0) -> dict:
    """A random global batch in the step's input sharding (for benchmarks and smoke tests): uint8
    images, as the host pipeline gives them to the device ops."""
    rng = np.random.default_rng(seed)
    batch = {"image": rng.integers(0, 256, (global_batch_size, image_size, image_size, 3), np.uint8),
             "label": rng.integers(0, num_classes, global_batch_size).astype(np.int32)}
    return jax.device_put(batch, batch_sharding(mesh))


# ---------------------------------------------------------------------------------------------
# The device's part of the preprocessing.

# The device augmentation's keys come from fold_in(key(seed), DEVICE_AUGMENT_STREAM), apart from
# the mixup and dropout keys, which come from fold_in(key(seed), step) with far smaller steps.
DEVICE_AUGMENT_STREAM = 2 ** 31 - 1


def apply_device_pp(pp: str, images, base_key, step_number):
    """`images` through the device ops of `pp` (data.device_ops), with per-example keys from
    (base_key, step_number, row of the global batch): alike on any mesh and after a resume.

    The device ops take uint8 images, as the host's uint8 strings give them. An empty `pp` applies
    nothing: uint8 images become float32, float images pass as they are (float64 in the parity
    tests). A float batch with a non-empty `pp` is refused rather than normalised twice.
    """
    if not pp:
        return images.astype(jnp.float32) if images.dtype == jnp.uint8 else images
    if images.dtype != jnp.uint8:
        raise ValueError(
            f"the device pp {pp!r} takes uint8 images, but the batch is {images.dtype}: its host pp "
            "already gives finished float images (data.synthetic_dtype='float32', or a host string "
            "ending in value_range/normalize). Use a uint8 host string (data.config.HOST_PP_*) or set the "
            "device pp to '' (data.device_pp_train='' or evals.NAME.device_pp='').")
    keys = device_ops.example_keys(base_key, step_number, jnp.arange(images.shape[0]))
    return device_ops.build(pp)(images, keys)


def check_device_pp(pp: str) -> None:
    """Unknown device ops and bad arguments fail here, before anything slow starts."""
    if pp:
        device_ops.parse(pp)


def device_preprocess(config, images, step_number):
    """The train step's device preprocessing (`config.data.device_pp_train`) of a global batch at
    `step_number`; its keys are a stream of config.seed apart from mixup's and dropout's."""
    augment_key = jax.random.fold_in(jax.random.key(config.seed), DEVICE_AUGMENT_STREAM)
    return apply_device_pp(config.data.device_pp_train, images, augment_key, step_number)


# ---------------------------------------------------------------------------------------------
# The initial state.

# Initialisation runs once, so LLVM's optimisations cost more than they save: shunted_s' initial
# state compiled in 22 s at level 0 against 59 s at XLA:CPU's default, and ran in 2.7 s, not 0.5 s
# (2 loaded CPU cores). The values agree with the optimised program's to float32 round-off.
HOST_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def run_on_host(fn, *args):
    """`fn(*args)` jitted on the host CPU, as numpy arrays.

    Initialisation is thousands of small random-number kernels, which XLA:CPU compiles far faster
    than a GPU compiler does.
    """
    cpu = jax.local_devices(backend="cpu")[0]
    with jax.default_device(cpu):
        return jax.tree.map(np.asarray, jax.jit(fn, compiler_options=HOST_COMPILER_OPTIONS)(*args))


def initial_variables(model, image_size: int, seed):
    """The model's freshly initialised variables (params, and batch_stats where it has BatchNorm)."""
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    return model.init({"params": jax.random.key(seed)}, images, train=False)


def place(host_tree, shardings):
    """Host arrays (identical in every process) as global arrays in the given shardings."""
    return jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: x[index]),
                        host_tree, shardings)


def train_state_shapes(model, tx: optax.GradientTransformation, mesh, *, image_size: int,
                       seed: int = 0, keep_ema: bool = False):
    """(abstract_state, state_sharding, initialise): the state's shapes, dtypes and shardings, known
    without computing it, and `initialise()`, which computes it.

    A resumed run restores into `abstract_state` and never initialises: initialisation is traced
    and compiled for the host CPU, seconds a restart need not spend. `initialise()` computes the
    state on the host CPU, then places each array in its target sharding.
    """
    def init(seed):
        variables = initial_variables(model, image_size, seed)
        params = variables["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                          ema_params=params if keep_ema else None)

    shapes = jax.eval_shape(init, seed)
    target_sharding = state_sharding(shapes, mesh)

    def initialise():
        return place(run_on_host(init, seed), target_sharding)

    return abstract_like(shapes, target_sharding), target_sharding, initialise


# ---------------------------------------------------------------------------------------------
# The loss and the step.

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

    micro_sharding = NamedSharding(mesh, PartitionSpec(None, MESH_AXES))

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


def make_train_step(model, config, mesh, state_sharding, num_classes: int, compiler_options: dict) -> Callable:
    """`step(state, batch, schedule) -> (state, metrics)`, jitted over `mesh` with the state donated.

    `batch` is {"image": uint8 (B, H, W, 3), "label": i32 (B,)} sharded over all devices. `schedule`
    is the learning rate as a pytree called on the step count (`optim.WarmupCosine` of replicated
    scalars, `replicated_schedule`): AdamW (`optim.make_optimizer` with `config.optimizer`) is built
    on it inside the step, so its numbers are inputs of the program rather than constants in it.
    The device preprocessing (`device_preprocess`), mixup/CutMix and label smoothing happen inside;
    randomness is `fold_in(key(config.seed), step)` (the device ops': `example_keys` of their own
    stream), so it is the same on any mesh and after a resume. Metrics: loss, grad_norm, lr
    (replicated scalars). XLA compiles it with `compiler_options` (see `parse_compiler_options`).
    """
    check_device_pp(config.data.device_pp_train)
    base_key = jax.random.key(config.seed)
    mix = config.mixup

    def train_step(state: TrainState, batch, schedule):
        tx = optim.make_optimizer(config.optimizer, schedule)
        mix_key, dropout_key = jax.random.split(jax.random.fold_in(base_key, state.step))
        images = device_preprocess(config, batch["image"], state.step)
        images, targets = mixup.mix_batch(
            mix_key, images, batch["label"], num_classes=num_classes,
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

    return jax.jit(on_mesh(train_step, mesh),
                   in_shardings=(state_sharding, batch_sharding(mesh), replicated(mesh)),
                   out_shardings=(state_sharding, replicated(mesh)),
                   donate_argnums=0, compiler_options=compiler_options)


def prepare_training(config, model, mesh, *, image_size: int, num_classes: int):
    """(abstract_state, state_sharding, train_step, initialise): the state's shapes and shardings
    (see `train_state_shapes`), the jitted step, exactly as `train.py` runs them, and `initialise()`
    for the initial state. The step takes the schedule as its third argument (`replicated_schedule`)."""
    compiler_options = parse_compiler_options(config.compiler_options)  # a malformed one fails first
    check_device_pp(config.data.device_pp_train)
    tx = optim.make_optimizer(config.optimizer, optax.constant_schedule(0.0))  # for its state's layout
    abstract_state, sharding, initialise = train_state_shapes(
        model, tx, mesh, image_size=image_size, seed=config.seed, keep_ema=config.ema_decay > 0)
    train_step = make_train_step(model, config, mesh, sharding, num_classes, compiler_options)
    return abstract_state, sharding, train_step, initialise


def replicated_schedule(config, mesh, steps_per_epoch: int) -> optim.WarmupCosine:
    """The recipe's schedule over the run (`optim.schedule_from_config`) as scalars replicated over
    `mesh`: the train step's third argument."""
    schedule = optim.schedule_from_config(config, steps_per_epoch)
    return place(schedule, jax.tree.map(lambda _: replicated(mesh), schedule))


def init_training(config, model, mesh, *, image_size: int, num_classes: int, steps_per_epoch: int):
    """(state, state_sharding, train_step, schedule): `prepare_training` with the initial state
    computed, and the recipe's schedule for epochs of `steps_per_epoch` steps (`replicated_schedule`)."""
    _, sharding, train_step, initialise = prepare_training(
        config, model, mesh, image_size=image_size, num_classes=num_classes)
    return initialise(), sharding, train_step, replicated_schedule(config, mesh, steps_per_epoch)


# ---------------------------------------------------------------------------------------------
# What of the config decides the train step's program.

# Config fields that do not decide the train step's program: the schedule's (an input of the step,
# `optim.SCHEDULE_FIELDS`) and those only the host reads: logging, checkpoints, evaluation, the
# input pipeline, where programs are cached, how processes meet. Building and tracing the step reads
# none of them (tests/test_train_program_key.py); the dataset reaches the program only through the
# batch (its shape and dtype, among the key's arguments) and its class count and image size (the
# key's context, `loop`).
NOT_IN_TRAIN_PROGRAM = (
    *optim.SCHEDULE_FIELDS, "log_every_steps", "checkpoint", "evals", "eval_batch_size", "init_from",
    "allow_config_change", "compilation_cache_dir", "prefetch_to_device", "distributed",
    "data.data_dir", "data.manual_dir", "data.train_split", "data.holdout_fraction", "data.pp_train",
    "data.shuffle_buffer", "data.seed", "data.repeated_aug", "data.on_corrupt", "data.prefetch",
    "data.num_parallel_calls", "data.num_train_examples", "data.num_eval_examples")


def program_config(config) -> ml_collections.ConfigDict:
    """A copy of `config` without `NOT_IN_TRAIN_PROGRAM` (those it has): the config part of the
    kept train step's key (`compilation_cache.program_key`)."""
    kept = ml_collections.ConfigDict(config.to_dict())
    for field in NOT_IN_TRAIN_PROGRAM:
        *parents, name = field.split(".")
        node = kept
        for parent in parents:
            node = node.get(parent, {})
        if name in node:
            del node[name]
    return kept
