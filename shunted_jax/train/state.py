"""The training state and its sharded creation."""
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from shunted_jax import kernels, models
from shunted_jax.train import sharding


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


def create_model(model_config, num_classes: int, mesh=None):
    """`models.create(name, num_classes=..., **fields)` from a config.model ConfigDict; dtypes given
    by name, `kernels` resolved for the mesh the model's steps run on (None: one device)."""
    fields = model_config.to_dict()
    name = fields.pop("name")
    for key in ("dtype", "param_dtype"):
        if key in fields:
            fields[key] = jnp.dtype(fields[key])
    if "kernels" in fields:
        fields["kernels"] = kernels.resolve_for_mesh(fields["kernels"], mesh)
    return models.create(name, num_classes=num_classes, **fields)


def run_on_host(fn, *args):
    """`fn(*args)` jitted on the host CPU, as numpy arrays.

    Initialisation is thousands of small random-number kernels: XLA:CPU compiles them in seconds,
    where the GPU compiler spent 15-18 s on a scanned Shunted-S and 85-109 s on an unrolled one.
    """
    cpu = jax.local_devices(backend="cpu")[0]
    with jax.default_device(cpu):
        return jax.tree.map(np.asarray, jax.jit(fn)(*args))


def initial_variables(model, image_size: int, seed):
    """The model's freshly initialised variables (params, and batch_stats where it has BatchNorm)."""
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    return model.init({"params": jax.random.key(seed)}, images, train=False)


def place(host_tree, shardings):
    """Host arrays (identical in every process) as global arrays in the given shardings."""
    return jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: x[index]),
                        host_tree, shardings)


def create_train_state(model, tx: optax.GradientTransformation, mesh, *, image_size: int,
                       seed: int = 0, keep_ema: bool = False):
    """Initialises the state on the host CPU, then places each array in its target sharding.

    Returns (state, state_sharding); the sharding pytree is what steps and checkpoint restores use.
    """
    def init(seed):
        variables = initial_variables(model, image_size, seed)
        params = variables["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                          ema_params=params if keep_ema else None)

    target_sharding = sharding.state_sharding(jax.eval_shape(init, seed), mesh)
    return place(run_on_host(init, seed), target_sharding), target_sharding
