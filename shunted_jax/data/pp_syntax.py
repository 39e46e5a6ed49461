"""The syntax of op strings ("name|name(1, 2.5, k=3)"), without TensorFlow, so that the device ops
(data/device_ops.py), which run inside the jitted step, parse their strings as the host's are parsed."""
import ast


def split_specs(pp: str) -> list[str]:
    """"a|b(1)| c" -> ["a", "b(1)", "c"]; empty pieces are dropped."""
    return [spec.strip() for spec in pp.split("|") if spec.strip()]


def parse_call(spec: str) -> tuple[str, list, dict]:
    """"name(1, 2.5, k=3)" -> ("name", [1, 2.5], {"k": 3}); arguments must be literals."""
    try:
        node = ast.parse(spec, mode="eval").body
    except SyntaxError as err:
        raise ValueError(f"cannot parse op {spec!r}: {err.msg}.") from err
    if isinstance(node, ast.Name):
        return node.id, [], {}
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        raise ValueError(f"op {spec!r} must look like name or name(arg, key=value).")
    try:
        args = [ast.literal_eval(arg) for arg in node.args]
        kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
    except ValueError as err:
        raise ValueError(f"arguments of op {spec!r} must be literal numbers or strings.") from err
    return node.func.id, args, kwargs
