"""Training: sharded jitted steps, the official recipe, checkpoints, evaluation and the loop.

Entry points: `train_and_evaluate(config, workdir)` and `evaluate_checkpoint(config, workdir)`
(what `train.py` runs), `step.setup_training` for benchmarks that time the exact train step, and
`load_config_file` for tools that read the same config files.
"""
from shunted_jax.train.config_file import load_config_file
from shunted_jax.train.loop import NonFiniteLossError, evaluate_checkpoint, train_and_evaluate
from shunted_jax.train.state import TrainState, create_model, create_train_state
from shunted_jax.train.step import TrainSetup, make_eval_step, make_train_step, setup_training, synthetic_batch

__all__ = ["NonFiniteLossError", "TrainSetup", "TrainState", "create_model", "create_train_state",
           "evaluate_checkpoint", "load_config_file", "make_eval_step", "make_train_step", "setup_training",
           "synthetic_batch", "train_and_evaluate"]
