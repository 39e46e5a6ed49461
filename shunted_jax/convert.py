"""Official PyTorch checkpoints <-> Flax variables, and to disk as a checkpoint we can load.

The mapping is generated from the Flax model itself: every Flax leaf names the one official
key it comes from (`_key_map`), and both directions read that one map, so a checkpoint is
accepted only when its keys and shapes are exactly the model's (a missing, unexpected or
mis-shaped key is an error that names it). BatchNorm's `num_batches_tracked` counters have no
Flax variable: `torch_to_flax` drops them, `flax_to_torch` writes them back from one number.

    python -m shunted_jax.convert --model shunted_s shunted_s.pth /path/to/out
"""
import argparse
import json
import pathlib
import sys
from typing import Dict, Iterator, List, Mapping, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from shunted_jax import models
from shunted_jax.models.pyramid import MULTI_SCALE_KINDS, official_ssa_rates

StateDict = Mapping[str, np.ndarray]
FlaxPath = Tuple[str, ...]  # (collection, module, ..., leaf)

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
# A kernel's Flax axes, by PyTorch's: Linear (out, in) -> (in, out); Conv (O, I/g, kh, kw) -> (kh, kw, I/g, O).
_KERNEL_AXES = {2: (1, 0), 4: (2, 3, 1, 0)}
_STEM_CONV_SLOTS = 3  # each stem unit is conv, BatchNorm, ReLU in one torch Sequential
BATCHES_TRACKED = "num_batches_tracked"
# Fields the official code fixes for each model: any other value has keys that mean other weights.
_OFFICIAL_FIELDS = ("attention", "ffn", "stem")
# What the official Shunted code hard-codes: a conv stem 64 channels wide, SSA for these reduction ratios.
_OFFICIAL_STEM_WIDTH = 64
_OFFICIAL_SSA_SR_RATIOS = (1, 2, 4, 8)


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys or shapes are not those of the requested model."""


class NoOfficialLayoutError(ValueError):
    """The model differs from the official code in a field it fixes, so no official checkpoint holds it."""


def _no_official_layout(field: str, value, why: str) -> "NoOfficialLayoutError":
    return NoOfficialLayoutError(f"model field {field}={value!r} has no official PyTorch layout: {why} "
                                 f"(config.model.{field} in a train.py run)")


def check_official(name: str, model_overrides: Mapping) -> None:
    """Refuses a model that the official code cannot express: under the official keys its weights
    would be read as other layers' (or not load at all)."""
    if name not in models.list_models(official_only=True):
        raise NoOfficialLayoutError(f"{name!r} has no official PyTorch model; those are "
                                    f"{', '.join(models.list_models(official_only=True))}")
    official = models.variant_fields(name)
    for field in _OFFICIAL_FIELDS:
        value = model_overrides.get(field, official[field])
        if value != official[field]:
            raise _no_official_layout(field, value, f"the official {name} has {field}={official[field]!r}")
    model = models.create(name, **model_overrides)
    if model.stem == "conv" and model.embed_dims[0] != _OFFICIAL_STEM_WIDTH:
        raise _no_official_layout("embed_dims", model.embed_dims, f"the official {name}'s conv stem is "
                                  f"{_OFFICIAL_STEM_WIDTH} channels wide, so embed_dims[0] must be {_OFFICIAL_STEM_WIDTH}")
    if model.attention in MULTI_SCALE_KINDS:
        if not set(model.sr_ratios) <= set(_OFFICIAL_SSA_SR_RATIOS):
            raise _no_official_layout("sr_ratios", model.sr_ratios, f"the official {name}'s attention takes the "
                                      f"ratios {_OFFICIAL_SSA_SR_RATIOS} only")
        official_rates = tuple(official_ssa_rates(r) for r in model.sr_ratios)
        if model.stage_rates() != official_rates:
            raise _no_official_layout("ssa_rates", model.ssa_rates, f"the official {name} splits each stage's heads "
                                      f"at the rates {official_rates}, set by sr_ratios")


def _template(model) -> Dict[FlaxPath, jax.ShapeDtypeStruct]:
    size = model.min_input_size()
    shapes = jax.eval_shape(
        lambda: model.init({"params": jax.random.key(0)}, jnp.zeros((1, size, size, 3)), train=False)
    )
    return traverse_util.flatten_dict(dict(shapes))


def _stem_num_conv(template) -> int:
    return sum(1 for p in template if p[:2] == ("params", "patch_embed1") and p[2].startswith("conv_")
               and p[-1] == "kernel") - 1


def _torch_module_name(modules: Tuple[str, ...], num_conv: int) -> str:
    """Flax module path (without the block index) -> the official dotted module name."""
    names = []
    for i, m in enumerate(modules):
        parent = modules[i - 1] if i else None
        if parent == "patch_embed1" and num_conv >= 0 and (m.startswith(("conv_", "bn_")) or m == "proj"):
            kind, _, k = m.partition("_")
            slot = _STEM_CONV_SLOTS * (num_conv + 1) if m == "proj" else _STEM_CONV_SLOTS * int(k) + (kind == "bn")
            names += ["conv", str(slot)]
        elif parent == "mlp" and m == "dwconv":
            names += ["dwconv", "dwconv"]
        else:
            names.append(m)
    return ".".join(names)


def _is_stacked(path: FlaxPath) -> bool:
    return path[1].startswith("block")


def _official_keys(path: FlaxPath, shape, num_conv: int) -> Iterator[str]:
    """The official key(s) of one Flax leaf: one per block for the scanned block stacks."""
    modules, leaf = path[1:-1], path[-1]
    suffix = _LEAF_TO_TORCH[leaf]
    if _is_stacked(path):
        rest = _torch_module_name(modules[1:], num_conv)
        for j in range(shape[0]):
            yield f"{modules[0]}.{j}.{rest}.{suffix}"
    else:
        yield f"{_torch_module_name(modules, num_conv)}.{suffix}"


def _key_map(model) -> Dict[FlaxPath, Tuple[List[str], Tuple[int, ...]]]:
    """Every Flax leaf of `model`: its shape and official key(s), one per block (in block order)
    for a scanned stack. Both directions of the conversion read this one map."""
    template = _template(model)
    num_conv = _stem_num_conv(template)
    return {path: (list(_official_keys(path, spec.shape, num_conv)), tuple(spec.shape))
            for path, spec in template.items()}


def _parts(path: FlaxPath, flax_shape) -> Tuple[int, ...]:
    """The Flax shape of the array under each official key of a leaf (a stack's block)."""
    return tuple(flax_shape[1:] if _is_stacked(path) else flax_shape)


def _flax_axes(leaf: str, ndim: int):
    """The transpose from a PyTorch tensor of this leaf to its Flax array, or None (same layout)."""
    return _KERNEL_AXES.get(ndim) if leaf == "kernel" else None


def _to_flax(array: np.ndarray, leaf: str) -> np.ndarray:
    axes = _flax_axes(leaf, array.ndim)
    return array if axes is None else array.transpose(axes)


def _to_torch(array: np.ndarray, leaf: str) -> np.ndarray:
    """The inverse of `_to_flax`, as a C-ordered copy of its own (a view would carry its whole stack along)."""
    axes = _flax_axes(leaf, array.ndim)
    return np.array(array if axes is None else array.transpose(np.argsort(axes)), order="C")


def _torch_shape(flax_shape, leaf: str) -> Tuple[int, ...]:
    return _to_torch(np.empty(flax_shape, np.bool_), leaf).shape


def _unwrap_torch(state_dict: Mapping) -> Mapping:
    """Accept {'model': sd} / {'state_dict': sd} wrappers and DDP's 'module.' prefix."""
    for wrapper in ("model", "state_dict"):
        if wrapper in state_dict and isinstance(state_dict[wrapper], Mapping):
            state_dict = state_dict[wrapper]
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def _unwrap(state_dict: Mapping) -> Dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in _unwrap_torch(state_dict).items()}


def torch_to_flax(state_dict: StateDict, name: str, **model_overrides) -> dict:
    """Convert an official state dict (key -> numpy array, PyTorch layouts) into Flax variables
    for `models.create(name, **model_overrides)`. The class count is read from `head.weight`."""
    check_official(name, model_overrides)
    state = _unwrap(state_dict)
    if "head.weight" in state and "num_classes" not in model_overrides:
        model_overrides["num_classes"] = state["head.weight"].shape[0]

    flat, used, missing, misshaped = {}, set(), [], []
    for path, (keys, flax_shape) in _key_map(models.create(name, **model_overrides)).items():
        leaf_shape = _parts(path, flax_shape)
        arrays = []
        for key in keys:
            if key not in state:
                missing.append(key)
                continue
            used.add(key)
            array = _to_flax(state[key], path[-1])
            if array.shape != leaf_shape:
                misshaped.append(f"{key}: checkpoint {tuple(state[key].shape)}, "
                                 f"model expects {_torch_shape(leaf_shape, path[-1])}")
                continue
            arrays.append(array)
        if len(arrays) == len(keys):
            flat[path] = np.stack(arrays) if _is_stacked(path) else arrays[0]
    unexpected = sorted(k for k in set(state) - used if not k.endswith(BATCHES_TRACKED))
    _raise_on_mismatch(f"The checkpoint does not match {name!r}", missing, unexpected, misshaped)
    return traverse_util.unflatten_dict(flat)


def batches_tracked(state_dict: StateDict) -> int:
    """The BatchNorm counters' value (the largest, 0 without BatchNorm): what `torch_to_flax` drops."""
    return max((int(np.asarray(v)) for k, v in _unwrap_torch(state_dict).items() if k.endswith(BATCHES_TRACKED)),
               default=0)


def flax_to_torch(variables: Mapping, name: str, num_batches_tracked: int = 0, **model_overrides) -> Dict[str, np.ndarray]:
    """The official state dict (key -> numpy array, PyTorch layouts) of Flax variables of
    `models.create(name, **model_overrides)`: the inverse of `torch_to_flax`, bit for bit. Every
    BatchNorm gets `num_batches_tracked` as its counter (PyTorch reads it only with momentum=None,
    which the official models do not use). The class count is read from the head."""
    check_official(name, model_overrides)
    flat = {path: np.asarray(leaf) for path, leaf in traverse_util.flatten_dict(dict(variables)).items()}
    head = flat.get(("params", "head", "kernel"))
    if head is not None and "num_classes" not in model_overrides:
        model_overrides["num_classes"] = head.shape[-1]
    key_map = _key_map(models.create(name, **model_overrides))

    state, misshaped = {}, []
    for path, (keys, flax_shape) in key_map.items():
        if path not in flat:
            continue
        array = flat[path]
        if array.shape != flax_shape:
            misshaped.append(f"{'/'.join(path)}: variables {array.shape}, model expects {flax_shape}")
            continue
        for key, part in zip(keys, array if _is_stacked(path) else [array]):
            state[key] = _to_torch(part, path[-1])
            if path[-1] == "mean":
                state[key.replace("running_mean", BATCHES_TRACKED)] = np.asarray(num_batches_tracked, np.int64)
    missing = sorted("/".join(p) for p in set(key_map) - set(flat))
    unexpected = sorted("/".join(p) for p in set(flat) - set(key_map))
    _raise_on_mismatch(f"The variables do not match {name!r}", missing, unexpected, misshaped)
    return state


def _raise_on_mismatch(title: str, missing, unexpected, misshaped):
    problems = []
    for kind, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if items:
            shown = "\n  ".join(items[:20]) + (f"\n  ... and {len(items) - 20} more" if len(items) > 20 else "")
            problems.append(f"{len(items)} {kind} key(s):\n  {shown}")
    if problems:
        raise CheckpointMismatchError(f"{title}:\n" + "\n".join(problems))


class UnreadableCheckpointError(ValueError):
    """The checkpoint file exists but cannot be read in its format; the message names it and why."""


def read_state_dict(path) -> Dict[str, np.ndarray]:
    """Read a released checkpoint: .pth/.pt/.bin (needs PyTorch), .npz or .safetensors (no PyTorch).

    A file that its format's reader refuses (empty, truncated, another format) raises
    UnreadableCheckpointError naming the file and the reader's complaint.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint file at {path}.")
    if path.suffix not in (".npz", ".safetensors", ".pth", ".pt", ".bin"):
        raise ValueError(f"Unsupported checkpoint format {path.suffix!r}: use .pth/.pt/.bin, .npz or .safetensors.")
    reader = {".npz": _read_npz, ".safetensors": _read_safetensors}.get(path.suffix, _read_torch)
    try:
        return reader(path)
    except ImportError:
        raise
    except Exception as error:  # noqa: BLE001 - each format's reader fails in its own way
        raise _unreadable(f"{path} ({path.stat().st_size:,} bytes) is not a readable {path.suffix} checkpoint",
                          error) from error


def _unreadable(what: str, error: Exception) -> UnreadableCheckpointError:
    """`what` is wrong, and the first line of the reader's own complaint."""
    reason = (str(error).strip().splitlines() or [""])[0]
    return UnreadableCheckpointError(f"{what}: {type(error).__name__}: {reason}")


def _read_npz(path: pathlib.Path) -> Dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def _read_safetensors(path: pathlib.Path) -> Dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


def _read_torch(path: pathlib.Path) -> Dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            "Reading a .pth checkpoint needs PyTorch: pip install 'shunted_jax[torch]' "
            "(or convert it to .safetensors/.npz elsewhere)."
        ) from e
    # The official main.py also stores its argparse.Namespace: allow exactly that class.
    with torch.serialization.safe_globals([argparse.Namespace]):
        raw = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.float().numpy() if v.is_floating_point() else v.numpy()
            for k, v in _unwrap_torch(raw).items() if isinstance(v, torch.Tensor)}


def save_variables(variables: dict, out_dir, model_name: str, num_batches_tracked: int = 0) -> pathlib.Path:
    """Write converted variables where training (config.init_from) and evaluation can load them;
    `model.json` keeps the model's name and the BatchNorm counter, for `shunted_jax.export`."""
    import orbax.checkpoint as ocp

    out = pathlib.Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(out / "variables", variables, force=True)
    (out / "model.json").write_text(json.dumps({"model": model_name, BATCHES_TRACKED: num_batches_tracked}))
    return out


def converted_metadata(path) -> dict:
    """The `model.json` of a directory written by `save_variables`; a damaged one is named."""
    meta_file = pathlib.Path(path).absolute() / "model.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{meta_file.parent} is not a converted checkpoint (no model.json): run "
                                "`python -m shunted_jax.convert --model NAME CKPT OUT` first.")
    try:
        meta = json.loads(meta_file.read_text())
        if not isinstance(meta, dict) or "model" not in meta:
            raise ValueError("it names no model")
    except ValueError as error:
        raise _unreadable(f"{meta_file} is not the model.json of a converted checkpoint", error) from error
    return meta


def load_variables(path, expected_model: str = None) -> dict:
    """Load variables written by `save_variables`, as numpy arrays."""
    import orbax.checkpoint as ocp

    path = pathlib.Path(path).absolute()
    saved_model = converted_metadata(path)["model"]
    if expected_model is not None and saved_model != expected_model:
        raise CheckpointMismatchError(f"{path} holds a {saved_model!r} checkpoint, not {expected_model!r}.")
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            restored = checkpointer.restore(path / "variables")
    except Exception as error:  # noqa: BLE001 - orbax and tensorstore fail in many ways on damaged files
        raise _unreadable(f"{path / 'variables'} cannot be restored", error) from error
    return jax.tree_util.tree_map(np.asarray, restored)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, choices=models.list_models(official_only=True))
    parser.add_argument("checkpoint", help="official .pth, .npz or .safetensors file")
    parser.add_argument("out", help="directory to write the converted checkpoint to")
    args = parser.parse_args(argv)
    try:
        state_dict = read_state_dict(args.checkpoint)
        variables = torch_to_flax(state_dict, args.model)
    except (OSError, ValueError, ImportError) as error:
        sys.exit(f"error: {error}")
    out = save_variables(variables, args.out, args.model, batches_tracked(state_dict))
    count = sum(x.size for x in jax.tree_util.tree_leaves(variables["params"]))
    print(f"Converted {args.model} ({count:,} parameters) to {out}")


if __name__ == "__main__":
    main()
