"""Train or evaluate a Shunted Transformer / PVTv2 model.

    python train.py --config configs/shunted_t.py --workdir /tmp/shunted_t
    python train.py --config configs/shunted_t.py:demo --workdir /tmp/demo
    python train.py --config configs/shunted_t.py --workdir /tmp/shunted_t --mode=eval
    python train.py --config configs/pvt_v2.py:variant=b2 --config.global_batch_size=256 --workdir ...

See docs/training.md.
"""
import sys

try:
    from absl import app, flags
    from ml_collections import config_flags

    from shunted_jax import train
    from shunted_jax.train import command_line, console
except KeyboardInterrupt:
    sys.exit("error: interrupted (Ctrl-C) while starting: nothing was run")

config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/shunted_t.py:demo.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl and TensorBoard go here; resumes from it.")
flags.DEFINE_enum("mode", "train", ["train", "eval"], "train (and evaluate), or run the evaluators on the latest checkpoint.")
flags.DEFINE_bool("verbose", False, command_line.VERBOSE_HELP)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    verbose = flags.FLAGS.verbose
    with command_line.reported_errors(verbose):
        if len(argv) > 1:
            raise ValueError(f"unexpected arguments {argv[1:]}: give every setting as a flag, e.g. --workdir=DIR")
        console.quiet_logging(verbose)
        train.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir, eval_only=flags.FLAGS.mode == "eval",
                                 keep_compiled_step=True)


if __name__ == "__main__":
    app.run(main, flags_parser=command_line.parse_flags)
