"""Training: one sharded jitted step (`step`, `optim`, `mixup`), evaluators from config,
checkpoints and the loop.

Entry points: `train_and_evaluate(config, workdir, eval_only=False, keep_compiled_step=False)`
(what `train.py` runs, keeping its compiled step), `step.init_training` for benchmarks that time
the exact train step, and `load_config_file` for tools that read the same config files.
"""
from shunted_jax.train.config_file import load_config_file
from shunted_jax.train.loop import NonFiniteLossError, train_and_evaluate
from shunted_jax.train.step import TrainState, create_model, init_training, synthetic_batch

__all__ = ["NonFiniteLossError", "TrainState", "create_model", "init_training", "load_config_file",
           "synthetic_batch", "train_and_evaluate"]
