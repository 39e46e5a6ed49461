"""Preprocessing strings ("decode|inception_crop(224)|flip_lr") parsed into registered ops.

An op factory is registered under a name; calling it with the string's arguments gives an
op `(features: dict, seed: Tensor[2]) -> dict`. Ops that need randomness draw it only from
`seed` with stateless TF random functions, so one example's augmentation depends only on
its seed, never on thread scheduling or on what ran before.
"""
import ast
from typing import Callable

from shunted_jax.data.tf_import import tensorflow

tf = tensorflow()

Op = Callable[[dict, "tf.Tensor"], dict]
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


def _parse_call(spec: str) -> tuple[str, list, dict]:
    """"name(1, 2.5, k=3)" -> ("name", [1, 2.5], {"k": 3}); arguments must be literals."""
    try:
        node = ast.parse(spec, mode="eval").body
    except SyntaxError as err:
        raise ValueError(f"cannot parse preprocessing op {spec!r}: {err.msg}.") from err
    if isinstance(node, ast.Name):
        return node.id, [], {}
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        raise ValueError(f"preprocessing op {spec!r} must look like name or name(arg, key=value).")
    try:
        args = [ast.literal_eval(arg) for arg in node.args]
        kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
    except ValueError as err:
        raise ValueError(f"arguments of preprocessing op {spec!r} must be literal numbers or strings.") from err
    return node.func.id, args, kwargs


def parse(pp: str) -> list[tuple[str, Op]]:
    """Turns a "|"-separated preprocessing string into named ops; unknown names fail here, early."""
    specs = [spec.strip() for spec in pp.split("|") if spec.strip()]
    if not specs:
        raise ValueError("the preprocessing string is empty; e.g. use 'decode|resize(224)|value_range(0,1)'.")
    ops = []
    for spec in specs:
        name, args, kwargs = _parse_call(spec)
        if name not in _FACTORIES:
            raise ValueError(f"unknown preprocessing op {name!r} in {pp!r}; known ops: {', '.join(registered_names())}.")
        try:
            ops.append((spec, _FACTORIES[name](*args, **kwargs)))
        except TypeError as err:
            raise ValueError(f"bad arguments for preprocessing op {spec!r}: {err}.") from err
    return ops


def build(pp: str) -> Callable[[dict, "tf.Tensor"], dict]:
    """One function applying every op of `pp`, each with its own seed split from the example's seed."""
    ops = parse(pp)

    def preprocess(features: dict, seed) -> dict:
        op_seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=len(ops))
        for index, (_, op) in enumerate(ops):
            features = op(features, op_seeds[index])
        return features

    return preprocess
