"""The training config, checked before anything is built or compiled.

Every numeric field with a valid range, the model, the data, the op strings and the compiler
options: each bad field is one line of the ConfigError, naming the field, its value and what it
takes, so that one run shows every mistake at once.
"""
from shunted_jax import data, models
from shunted_jax.config_ranges import AT_LEAST_ONE, BELOW_ONE, FRACTION, NON_NEGATIVE, POSITIVE, Range, out_of_range
from shunted_jax.data import config as data_config
from shunted_jax.train import step
from shunted_jax.train.console import RunError


class ConfigError(RunError, ValueError):
    """Config values that cannot run; one line per bad field, naming it, its value and what it takes."""


# Fields absent from a config (another model family's fields) are skipped; the data section's are
# data.config.RANGES, checked with the rest of it by data.config.problems.
RANGES = {
    "global_batch_size": AT_LEAST_ONE, "eval_batch_size": AT_LEAST_ONE, "accumulation_steps": AT_LEAST_ONE,
    "num_train_steps": Range(0, special=(-1,)), "log_every_steps": AT_LEAST_ONE, "prefetch_to_device": AT_LEAST_ONE,
    "seed": NON_NEGATIVE, "label_smoothing": BELOW_ONE, "ema_decay": BELOW_ONE,
    "optimizer.base_lr": POSITIVE, "optimizer.b1": BELOW_ONE, "optimizer.b2": BELOW_ONE, "optimizer.eps": POSITIVE,
    "optimizer.weight_decay": NON_NEGATIVE, "optimizer.warmup_epochs": NON_NEGATIVE,
    "optimizer.warmup_steps": Range(0, special=(-1,)), "optimizer.warmup_init_lr": NON_NEGATIVE,
    "optimizer.min_lr": NON_NEGATIVE, "optimizer.grad_clip_norm": NON_NEGATIVE,
    "mixup.mixup_alpha": NON_NEGATIVE, "mixup.cutmix_alpha": NON_NEGATIVE, "mixup.prob": FRACTION,
    "mixup.switch_prob": FRACTION,
    "model.drop_path_rate": BELOW_ONE, "model.scan_unroll": AT_LEAST_ONE,
    "checkpoint.every_steps": AT_LEAST_ONE, "checkpoint.keep": AT_LEAST_ONE,
    "mesh.data": Range(1, special=(-1,)), "mesh.fsdp": AT_LEAST_ONE,
    "distributed.num_processes": AT_LEAST_ONE, "distributed.process_id": NON_NEGATIVE,
}


def range_problems(config) -> list[str]:
    """One line per field outside its range: those of RANGES, the data section's, the duration and
    the evaluators' periods."""
    problems = out_of_range(config, RANGES, "config.")
    problems += [f"config.{line}" if line.startswith("data.") else line
                 for line in data_config.problems(data.with_defaults(config.data))]
    if config.num_train_steps < 0 and not POSITIVE.holds(config.num_epochs):
        problems.append(f"config.num_epochs={config.num_epochs!r} trains nothing: give a positive number of epochs, "
                        "or config.num_train_steps (0 only evaluates)")
    for name, spec in config.evals.items():
        if spec.every_steps <= 0 and not POSITIVE.holds(spec.every_epochs):
            problems.append(f"config.evals.{name}.every_epochs={spec.every_epochs!r} is out of range; valid: "
                            f"{POSITIVE} (or set config.evals.{name}.every_steps > 0)")
    return problems


def _model_problems(config) -> list[str]:
    """The model's name and fields, by building it (a constructor call: nothing is traced), and the
    smallest image it takes."""
    name = config.model.name
    if name not in models.list_models():
        return [f"config.model.name={name!r} is not a model: choose one of {', '.join(models.list_models())}"]
    try:
        model = step.create_model(config.model, num_classes=2)
    except (TypeError, ValueError) as error:
        return [f"config.model: {error}"]
    size = config.data.image_size
    minimum = model.min_input_size()
    if isinstance(size, int) and size < minimum:
        return [f"config.data.image_size={size} is smaller than the {minimum} pixels {name} with these fields takes"]
    return []


def _op_string_problems(config) -> list[str]:
    """Device op strings always; host preprocessing strings when the data is read from files (only
    those pipelines read them, and only they may import TensorFlow)."""
    device_strings = {"data.device_pp_train": config.data.device_pp_train,
                      **{f"evals.{name}.device_pp": spec.device_pp for name, spec in config.evals.items()}}
    host_strings = {}
    if config.data.name != data_config.SYNTHETIC_NAME:
        host_strings["data.pp_train"] = config.data.pp_train
    for name, spec in config.evals.items():
        if (spec.dataset or config.data.name) != data_config.SYNTHETIC_NAME:
            host_strings[f"evals.{name}.pp"] = spec.pp
    problems = []
    for field, text in device_strings.items():
        try:
            step.check_device_pp(text)
        except ValueError as error:
            problems.append(f"config.{field}={text!r}: {error}")
    if host_strings:
        from shunted_jax.data import ops, registry  # noqa: F401 - TensorFlow's; ops registers the op names

        for field, text in host_strings.items():
            try:
                registry.parse(data_config.format_pp(text, config.data))
            except (ValueError, KeyError, IndexError) as error:
                problems.append(f"config.{field}={text!r}: {error}")
    return problems


def _other_problems(config) -> list[str]:
    problems = []
    try:
        step.parse_compiler_options(config.compiler_options)
    except ValueError as error:
        problems.append(f"config.compiler_options={config.compiler_options!r}: {error}")
    distributed = config.distributed
    if distributed.coordinator_address and not 0 <= distributed.process_id < distributed.num_processes:
        problems.append(f"config.distributed.process_id={distributed.process_id} is out of range; valid: "
                        f"0 ... config.distributed.num_processes - 1 = {distributed.num_processes - 1}")
    return problems


def check(config) -> None:
    """Raises a ConfigError with one line per bad field; returns when the config can run.

    The numbers first: a field out of range can make the model or data checks fail in other words."""
    problems = range_problems(config)
    if not problems:
        problems = _model_problems(config) + _op_string_problems(config) + _other_problems(config)
    if problems:
        raise ConfigError("\n".join(problems))
