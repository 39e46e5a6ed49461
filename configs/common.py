"""Fields shared by every config: the official ImageNet recipe, and the Fashion-MNIST demo.

Config files parse their argument with `parse_arg`, call `imagenet_config(...)` and, for the
":demo" argument, `to_demo(...)`; then lock.
"""
import ml_collections

from shunted_jax import data, models
from shunted_jax.data import config as data_config
from shunted_jax.data import device_ops

# The demo's recipe (no RandAugment, no erasing): resize and flip on the host, uint8 out;
# value range and normalisation on the device.
DEMO_DEVICE_PP = "value_range(0,1)|normalize"
# The default config.compilation_cache_dir (its ~ is expanded when a run starts); benchmarks/step.py's too.
COMPILATION_CACHE_DIR = "~/.cache/shunted_jax/jax"


def parse_arg(arg: str | None, config_file: str, **spec) -> ml_collections.ConfigDict:
    """The config file's argument, e.g. 'variant=b2,demo', checked against its declared keys.

    `spec` maps each key to its default: a bool is a flag ('demo' alone means demo=True), a tuple
    lists the allowed values (the first is the default), any other value gives the type the string
    converts to. An unknown key or value fails at once, naming the valid ones.
    """
    parsed = {key: default[0] if isinstance(default, tuple) else default for key, default in spec.items()}
    for item in filter(None, (part.strip() for part in (arg or "").split(","))):
        key, has_value, value = (part.strip() for part in item.partition("="))
        if key not in spec:
            valid = ", ".join(sorted(spec)) or "none: it takes no argument"
            raise ValueError(f"{config_file}: unknown argument {key!r}; valid arguments: {valid}")
        default = spec[key]
        if isinstance(default, tuple):
            if value not in default:
                raise ValueError(f"{config_file}: unknown {key} {value!r}; choose one of {', '.join(default)}")
            parsed[key] = value
        elif isinstance(default, bool):
            if has_value and value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"{config_file}: {key} is a flag: give {key} alone, or {key}=true / false")
            parsed[key] = not has_value or value.lower() in ("true", "1")
        else:
            parsed[key] = type(default)(value)
    return ml_collections.ConfigDict(parsed)


def evaluator(pp: str, *, device_pp: str = device_ops.EVAL_PP, dataset: str = "", split: str = "",
              every_steps: int = -1, every_epochs: float = 1.0) -> ml_collections.ConfigDict:
    """One entry of config.evals (shunted_jax.train.evaluators): `pp` on the host, `device_pp` in the
    eval step; dataset "" is the training data's, split "" the first of validation/val/test it has;
    every_steps > 0 wins over every_epochs."""
    return ml_collections.ConfigDict({"dataset": dataset, "split": split, "pp": pp, "device_pp": device_pp,
                                      "every_steps": every_steps, "every_epochs": every_epochs})


def imagenet_config(model_name: str, *, drop_path_rate: float, grad_clip_norm: float = 0.0):
    """The official ImageNet-1k recipe (Shunted / PVTv2 papers, DeiT-style training) at 224 pixels."""
    config = ml_collections.ConfigDict()
    # Every field of the model is listed, so any of them can be overridden from the command line.
    config.model = ml_collections.ConfigDict(
        {"name": model_name, **models.model_fields(model_name), "drop_path_rate": drop_path_rate,
         "dtype": "bfloat16", "kernels": "auto", "scan_unroll": 64})
    # XLA options for every jitted program of a run, "name=value ..." as in XLA_FLAGS. XLA:GPU's
    # Triton normalisation rewriter lengthens the train step's compile and gains no speed
    # (BENCHMARKS.md); other backends lack the pass.
    config.compiler_options = "xla_disable_hlo_passes=triton-softmax-rewriter"

    config.data = data.default_config()
    for field in data_config.EVAL_FIELDS:  # each evaluator names its own
        del config.data[field]
    config.data.name = "imagenet2012"
    config.data.image_size = 224
    config.data.repeated_aug = 3
    # The host decodes, crops and flips to uint8 (data.pp_train's default, HOST_PP_TRAIN); the device
    # ops (data.device_ops) do RandAugment, normalisation and random erasing in the train step. A
    # float host string needs device_pp_train="".
    config.data.device_pp_train = device_ops.TRAIN_PP
    config.prefetch_to_device = 2  # global batches put on the devices ahead of the step
    # Compiled programs persist here, so a restarted run does not compile again; "" leaves JAX's own
    # setting (off unless $JAX_COMPILATION_CACHE_DIR is set).
    config.compilation_cache_dir = COMPILATION_CACHE_DIR

    config.global_batch_size = 1024
    config.eval_batch_size = 1024
    # Durations: a step count >= 0 wins over the epoch count.
    config.num_epochs = 300.0
    config.num_train_steps = -1
    config.accumulation_steps = 1  # micro-batches per step (same global batch, less memory)

    config.optimizer = ml_collections.ConfigDict({
        "base_lr": 5e-4,  # x global_batch_size / 512
        "b1": 0.9, "b2": 0.999, "eps": 1e-8,
        "weight_decay": 0.05,  # kernels only
        "warmup_epochs": 5.0, "warmup_steps": -1,
        "warmup_init_lr": 1e-6, "min_lr": 1e-5,
        "grad_clip_norm": grad_clip_norm,  # 0 = off
    })
    config.label_smoothing = 0.1
    config.mixup = ml_collections.ConfigDict(
        {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "prob": 1.0, "switch_prob": 0.5})
    config.ema_decay = 0.0  # e.g. 0.9999 keeps (and evaluates) an EMA of the weights
    config.seed = 0

    config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})
    config.checkpoint = ml_collections.ConfigDict({"every_steps": 1000, "keep": 3, "asynchronous": True})
    config.log_every_steps = 100
    # Evaluation sets by name, each logged as name/top1, ...; config.eval_batch_size for all of them.
    config.evals = ml_collections.ConfigDict({"val": evaluator(data_config.HOST_PP_EVAL)})
    config.init_from = ""  # a checkpoint converted by shunted_jax.convert, for fine-tuning
    # A resume whose config changes the run's trajectory is refused unless this is set (train/resume.py).
    config.allow_config_change = False
    config.distributed = ml_collections.ConfigDict(
        {"coordinator_address": "", "num_processes": 1, "process_id": 0, "auto_detect": False})
    return config


def to_demo(config, model_overrides: dict):
    """Fashion-MNIST at 32x32 with a small model: minutes on a laptop CPU, float32, no mixup."""
    config.model.update({"drop_path_rate": 0.0, "dtype": "float32", "scan_unroll": 1, **model_overrides})
    config.data.name = "fashion_mnist_demo"
    config.data.image_size = 32
    config.data.repeated_aug = 1
    config.data.pp_train = data_config.HOST_PP_DEMO_TRAIN
    config.data.device_pp_train = DEMO_DEVICE_PP
    config.evals = ml_collections.ConfigDict(
        {"val": evaluator(data_config.HOST_PP_DEMO_EVAL, device_pp=DEMO_DEVICE_PP)})
    config.global_batch_size = 128
    config.eval_batch_size = 1000
    config.num_epochs = 1.0
    config.optimizer.base_lr = 8e-3
    config.optimizer.warmup_epochs = 0.1
    config.mixup.update({"mixup_alpha": 0.0, "cutmix_alpha": 0.0})
    config.checkpoint.every_steps = 500
    config.log_every_steps = 50
    return config
