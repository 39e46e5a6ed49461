"""What an ablation compares: the variants and settings of an ablations file, each variant's config
and model, and what the model costs."""
import copy
import dataclasses
import pathlib
import runpy

from shunted_jax import data, train
from shunted_jax.tools import summary

ABLATIONS_FILE = "configs/ablations.py"


@dataclasses.dataclass(frozen=True)
class Variant:
    """One design to compare: a train config file (`path:arg`) and overrides of its dotted fields."""
    label: str
    config: str
    overrides: dict
    description: str = ""


def existing_file(path: str) -> str:
    """The path itself, or an error saying where it was looked for (relative paths: the repo root)."""
    if not pathlib.Path(path).is_file():
        raise FileNotFoundError(f"{path} not found from {pathlib.Path.cwd()}: run from the repository root "
                                "(the ablations read the config files under configs/).")
    return path


def load_ablations(path: str = ABLATIONS_FILE):
    """(settings, variants) of an ablations file: {setting: overrides} and a tuple of Variants."""
    module = runpy.run_path(existing_file(path))
    return module["SETTINGS"], tuple(Variant(**fields) for fields in module["VARIANTS"])


def select(named: dict, names, what: str) -> list:
    """named[n] for each requested name, or an error listing the valid names."""
    unknown = [name for name in names if name not in named]
    if unknown:
        raise ValueError(f"Unknown {what} {unknown}; choose from {', '.join(named)}.")
    return [named[name] for name in names]


def select_variants(variants, labels=None) -> tuple:
    """The variants with these labels, in that order; all of them for None or empty."""
    if not labels:
        return tuple(variants)
    return tuple(select({v.label: v for v in variants}, labels, "variant(s)"))


def setting_overrides(settings: dict, setting: str) -> dict:
    """The budget of a named setting: overrides applied to every variant."""
    return select(settings, [setting], "setting")[0]


def with_overrides(config, overrides: dict):
    """A copy of a locked config with dotted fields replaced; an unknown field is an error, as on
    train.py's command line (config files list every model field)."""
    config = copy.deepcopy(config)
    config.update_from_flattened_dict(overrides)
    return config


def variant_config(variant: Variant, budget: dict, extra: dict | None = None):
    """The variant's train config: its file, its own overrides, the setting's, then `extra`."""
    config = train.load_config_file(variant.config)
    for overrides in (variant.overrides, budget, extra or {}):
        config = with_overrides(config, overrides)
    return config


def build_model(config):
    """The model `train.py` builds from this config (class count from the dataset)."""
    return train.create_model(config.model, data.dataset_info(config.data).num_classes)


def model_cost(model, image_size: int) -> dict:
    """Parameters and multiply-adds per image of the inference forward (shunted_jax.tools.summary).

    Tracing the model at the image size also raises, before any training, the model's errors for
    reduction rates that do not fit a stage grid or heads that do not split into the groups."""
    total = summary.summarize(model, (image_size, image_size))[-1]
    return {"params": total["params"], "macs": total["all"]}


@dataclasses.dataclass(frozen=True)
class Planned:
    """A variant ready to train: its config, its model and what the model costs."""
    variant: Variant
    config: object
    model: object
    cost: dict


def plan(variants, budget: dict, extra_overrides=None) -> list:
    """Configs, models and costs of every variant, so that a bad variant fails before any training."""
    planned = []
    for variant in variants:
        config = variant_config(variant, budget, extra_overrides)
        model = build_model(config)
        planned.append(Planned(variant, config, model, model_cost(model, config.data.image_size)))
    return planned
