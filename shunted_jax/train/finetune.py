"""Fine-tuning: start from converted official weights, with a new head when the class count differs."""
import jax
import numpy as np
from flax import traverse_util

from shunted_jax import convert

HEAD_PREFIX = ("params", "head")


def _joined(keys) -> str:
    return ", ".join("/".join(key) for key in keys) or "none"


def merge_pretrained(initial: dict, pretrained: dict, source: str) -> dict:
    """The `initial` variables (arrays, possibly sharded over hosts) with every leaf taken from
    `pretrained`, except a head whose shape differs (another class count): it keeps its fresh
    initialisation.

    Raises ValueError naming missing, unexpected and mis-shaped keys when the checkpoint belongs to
    another model.
    """
    initial_flat = traverse_util.flatten_dict(initial)
    pretrained_flat = traverse_util.flatten_dict(pretrained)
    missing = sorted(set(initial_flat) - set(pretrained_flat))
    unexpected = sorted(set(pretrained_flat) - set(initial_flat))
    misshaped, merged = [], {}
    for key, leaf in initial_flat.items():
        if key not in pretrained_flat:
            continue
        value = np.asarray(pretrained_flat[key])
        if value.shape == leaf.shape:
            merged[key] = value.astype(leaf.dtype)
        elif key[:2] == HEAD_PREFIX:
            merged[key] = leaf
        else:
            misshaped.append(f"{'/'.join(key)} {value.shape} != {leaf.shape}")
    if missing or unexpected or misshaped:
        raise ValueError(f"{source} does not match the model: missing keys: {_joined(missing)}; "
                         f"unexpected keys: {_joined(unexpected)}; shape mismatches: "
                         f"{', '.join(misshaped) or 'none'}")
    return traverse_util.unflatten_dict(merged)


def load_pretrained(state, state_sharding, path: str):
    """The state with params (and BatchNorm statistics) from a converted official checkpoint."""
    merged = merge_pretrained(state.variables(), convert.load_variables(path), path)
    params = jax.device_put(merged["params"], state_sharding.params)
    batch_stats = state.batch_stats
    if "batch_stats" in merged:
        batch_stats = jax.device_put(merged["batch_stats"], state_sharding.batch_stats)
    ema_params = None if state.ema_params is None else jax.device_put(merged["params"],
                                                                      state_sharding.ema_params)
    return state.replace(params=params, batch_stats=batch_stats, ema_params=ema_params)
