"""Flax checkpoints -> the official PyTorch state dict, for PyTorch detection and segmentation
frameworks and timm that load the official checkpoints.

    python -m shunted_jax.export --model shunted_t /ckpt/shunted_t exported/shunted_t

reads a `train.py` workdir's latest checkpoint (the EMA weights when the run kept them, unless
--no-ema) or a directory written by `shunted_jax.convert`, and writes OUT.safetensors (no PyTorch
needed) and, when PyTorch is installed, OUT.pth: a plain state dict under the official key names
(for PVTv2 those of whai362/PVT, which timm's `pvt_v2_*` models load). A model that the official
code cannot express (`convert.check_official`) is refused, naming the field.
"""
import argparse
import dataclasses
import pathlib
import sys
import types
from typing import Mapping

import jax
import numpy as np
from absl import logging as absl_logging

from shunted_jax import convert, models
from shunted_jax.train import checkpoint, console

# Suffixes of OUT that name one of the files rather than the pair.
_OUTPUT_SUFFIXES = (".safetensors", ".pth")
# Fields of a run's model that change neither its parameters' names nor their shapes.
_NON_LAYOUT_FIELDS = ("name", "param_dtype", *checkpoint.EXECUTION_FIELDS)


class ExportError(ValueError):
    """The source cannot be exported as asked; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """What an export needs from a source: the variables, the model they belong to and where from."""

    variables: dict
    model_overrides: dict
    num_batches_tracked: int
    description: str


def _frozen(value):
    """JSON's lists as the tuples the model fields are."""
    return tuple(_frozen(v) for v in value) if isinstance(value, list) else value


def layout_overrides(model_fields: Mapping) -> dict:
    """The fields of a run's model (its config.model, as saved in a checkpoint) that decide the
    names and shapes of its parameters: the overrides `flax_to_torch` takes for it."""
    return {k: _frozen(v) for k, v in model_fields.items() if k not in _NON_LAYOUT_FIELDS}


def read_converted(path: pathlib.Path, name: str) -> Checkpoint:
    """A directory written by `shunted_jax.convert`: the official model, its BatchNorm counter kept."""
    variables = convert.load_variables(path, expected_model=name)
    counter = convert.converted_metadata(path).get(convert.BATCHES_TRACKED, 0)
    return Checkpoint(variables, {}, counter, "converted checkpoint")


def read_run(workdir: pathlib.Path, name: str, use_ema) -> Checkpoint:
    """The latest checkpoint of a `train.py` workdir: the EMA weights when kept (unless `use_ema` is
    False), its model fields from the checkpoint's metadata, the step count as BatchNorm's counter."""
    options = types.SimpleNamespace(keep=1, asynchronous=False)
    with checkpoint.make_checkpoint_manager(workdir / "checkpoints", options, read_only=True) as manager:
        step = manager.latest_step()
        if step is None:
            raise ExportError(f"{workdir / 'checkpoints'} holds no checkpoint yet: train first, or export a "
                              "directory written by shunted_jax.convert")
        fields = checkpoint.load_meta(manager, step)["model"]
        if fields["name"] != name:
            raise ExportError(f"{workdir} trained {fields['name']!r}, not {name!r}: pass --model {fields['name']}")
        overrides = layout_overrides(fields)
        convert.check_official(name, overrides)  # before reading any array
        try:
            state = checkpoint.load_state(manager, step)
        except Exception as error:  # noqa: BLE001 - whatever broke the files, say which step and why
            raise ExportError(f"checkpoint step {step} in {manager.directory} cannot be read: "
                              f"{console.short_cause(error)}") from error
    kept_ema = state.get("ema_params") is not None
    if use_ema and not kept_ema:
        raise ExportError(f"{workdir} kept no EMA of the weights (config.ema_decay was 0): export without --ema")
    ema = kept_ema and use_ema is not False
    variables = {"params": state["ema_params"] if ema else state["params"]}
    if state.get("batch_stats"):
        variables["batch_stats"] = state["batch_stats"]
    return Checkpoint(variables, overrides, step, f"{'EMA' if ema else 'trained'} weights of step {step}")


def read_checkpoint(source, name: str, use_ema=None) -> Checkpoint:
    """A `train.py` workdir or a directory written by `shunted_jax.convert`, told apart by their files."""
    source = pathlib.Path(source).absolute()
    if (source / "model.json").is_file():
        if use_ema:
            raise ExportError(f"{source} is a converted checkpoint, which has no EMA: export without --ema")
        return read_converted(source, name)
    if (source / "checkpoints").is_dir():
        return read_run(source, name, use_ema)
    raise ExportError(f"{source} is neither a train.py workdir (no checkpoints/) nor a directory written by "
                      "`python -m shunted_jax.convert` (no model.json)")


def output_stem(out) -> pathlib.Path:
    """OUT without a .safetensors/.pth suffix: the files are OUT.safetensors and OUT.pth."""
    out = pathlib.Path(out)
    return out.with_suffix("") if out.suffix in _OUTPUT_SUFFIXES else out


def write_state_dict(state_dict: dict, out) -> list:
    """OUT.safetensors always, OUT.pth when PyTorch is installed; returns the paths written."""
    from safetensors.numpy import save_file

    stem = output_stem(out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = [stem.with_name(stem.name + ".safetensors")]
    save_file(state_dict, str(written[0]), metadata={"format": "pt"})
    try:
        import torch
    except ImportError:
        return written
    written.append(stem.with_name(stem.name + ".pth"))
    torch.save({key: torch.from_numpy(array) for key, array in state_dict.items()}, written[1])
    return written


def export(source, name: str, out, use_ema=None) -> str:
    """Reads `source`, writes the official state dict to OUT.safetensors (and OUT.pth); returns a
    one-line summary."""
    found = read_checkpoint(source, name, use_ema)
    state_dict = convert.flax_to_torch(found.variables, name, found.num_batches_tracked, **found.model_overrides)
    written = write_state_dict(state_dict, out)
    count = sum(np.size(leaf) for leaf in jax.tree.leaves(found.variables["params"]))
    files = " and ".join(str(path) for path in written)
    missing_pth = "" if len(written) > 1 else " (no .pth: PyTorch is not installed; pip install 'shunted_jax[torch]')"
    return (f"Exported {name} ({found.description}, {count:,} parameters, {len(state_dict)} tensors) "
            f"to {files}{missing_pth}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, choices=models.list_models(official_only=True))
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                        help="the EMA of the weights (the default when the run kept one) or, with --no-ema, "
                             "the trained weights")
    parser.add_argument("source", help="a train.py workdir, or a directory written by shunted_jax.convert")
    parser.add_argument("out", help="path of the files to write, without suffix: OUT.safetensors and OUT.pth")
    args = parser.parse_args(argv)
    try:
        print(export(args.source, args.model, args.out, args.ema))
    except (ExportError, convert.NoOfficialLayoutError, convert.CheckpointMismatchError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    absl_logging.use_absl_handler()  # as train.py's absl app, so that orbax's chatter is dropped as there
    console.quiet_logging(verbose=False)
    main()
