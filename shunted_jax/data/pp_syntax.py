"""The syntax of op strings ("name|name(1, 2.5, k=3)") and their parsing against a registry of op
factories, without TensorFlow: the device ops (data/device_ops.py), which run inside the jitted
step, read their strings as the host's preprocessing strings are read."""
import ast
from collections.abc import Mapping
from types import MappingProxyType
from typing import Callable, TypeVar

Op = TypeVar("Op")


def parse_call(spec: str, kind: str) -> tuple[str, list, dict]:
    """"name(1, 2.5, k=3)" -> ("name", [1, 2.5], {"k": 3}); arguments must be literals."""
    try:
        node = ast.parse(spec, mode="eval").body
    except SyntaxError as err:
        raise ValueError(f"cannot parse {kind} op {spec!r}: {err.msg}.") from err
    if isinstance(node, ast.Name):
        return node.id, [], {}
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        raise ValueError(f"{kind} op {spec!r} must look like name or name(arg, key=value).")
    try:
        args = [ast.literal_eval(arg) for arg in node.args]
        kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
    except ValueError as err:
        raise ValueError(f"arguments of {kind} op {spec!r} must be literal numbers or strings.") from err
    return node.func.id, args, kwargs


def parse_ops(pp: str, factories: dict[str, Callable[..., Op]], kind: str, example: str,
              elsewhere: Mapping[str, str] = MappingProxyType({})) -> list[tuple[str, Op]]:
    """The "|"-separated ops of `pp` as (spec, factory(*args, **kwargs)); an unknown name or bad
    arguments fail here, early, naming the `kind` of op; `example` is a valid string to suggest.
    `elsewhere` maps names that are ops of another kind, not this one, to where they belong."""
    specs = [spec.strip() for spec in pp.split("|") if spec.strip()]
    if not specs:
        raise ValueError(f"the {kind} string is empty; e.g. use {example!r}.")
    ops = []
    for spec in specs:
        name, args, kwargs = parse_call(spec, kind)
        if name in elsewhere:
            raise ValueError(f"{spec!r} in {pp!r} is not a {kind} op: put it in {elsewhere[name]}.")
        if name not in factories:
            raise ValueError(f"unknown {kind} op {name!r} in {pp!r}; known ops: {', '.join(sorted(factories))}.")
        try:
            ops.append((spec, factories[name](*args, **kwargs)))
        except TypeError as err:
            raise ValueError(f"bad arguments for {kind} op {spec!r}: {err}.") from err
    return ops
