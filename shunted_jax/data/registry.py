"""Preprocessing strings ("decode|inception_crop(224)|flip_lr") parsed into registered ops.

An op factory is registered under a name; calling it with the string's arguments gives an
op `(features: dict, seed: Tensor[2]) -> dict`. Ops that need randomness draw it only from
`seed` with stateless TF random functions, so one example's augmentation depends only on
its seed, never on thread scheduling or on what ran before.
"""
from typing import Callable

from shunted_jax.data import device_ops
from shunted_jax.data.pp_syntax import parse_ops
from shunted_jax.data.tf_import import tensorflow

tf = tensorflow()

Op = Callable[[dict, "tf.Tensor"], dict]
DEVICE_OP_ADVICE = (f"the device ops, data.device_pp_train (e.g. {device_ops.TRAIN_PP!r}), after a uint8 host "
                    "string such as data.config.HOST_PP_TRAIN")
_FACTORIES: dict[str, Callable[..., Op]] = {}


def register(name: str):
    """Decorator: makes a factory of ops usable in preprocessing strings under `name`."""

    def add(factory):
        if name in _FACTORIES:
            raise ValueError(f"preprocessing op {name!r} is registered twice.")
        _FACTORIES[name] = factory
        return factory

    return add


def registered_names() -> list[str]:
    return sorted(_FACTORIES)


def parse(pp: str) -> list[tuple[str, Op]]:
    """Turns a "|"-separated preprocessing string into named ops; unknown names fail here, early,
    and a device op (RandAugment, random erasing) says where it goes."""
    device_only = {name: DEVICE_OP_ADVICE for name in device_ops.OPS if name not in _FACTORIES}
    return parse_ops(pp, _FACTORIES, "preprocessing", "decode|resize(224)|value_range(0,1)", device_only)


def build(pp: str) -> Callable[[dict, "tf.Tensor"], dict]:
    """One function applying every op of `pp`, each with its own seed split from the example's seed."""
    ops = parse(pp)

    def preprocess(features: dict, seed) -> dict:
        op_seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=len(ops))
        for index, (_, op) in enumerate(ops):
            features = op(features, op_seeds[index])
        return features

    return preprocess
