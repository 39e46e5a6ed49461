"""What a run prints: our progress, warnings and errors, and none of the libraries' internal chatter."""
import logging
import pathlib
import re
import sys

from absl import logging as absl_logging

from shunted_jax.train import workarounds


# Tensorstore appends its full JSON spec and source locations to every error: noise in one line.
_STORAGE_DETAILS = re.compile(r"\s*\[(tensorstore_spec|source locations)=.*$")


class RunError(Exception):
    """A failure whose message names what failed and what to do; train.py shows it as one line."""


def short_cause(error: BaseException, limit: int = 240) -> str:
    """The first line of an error's message, as 'Type: message', to quote inside one log line.

    An error raised from another is quoted by its innermost cause (orbax wraps tensorstore's errors
    in a generic one). A long line keeps its start and its end: tensorstore nests causes in one
    message, and the end holds the innermost (e.g. "No space left on device").
    """
    while error.__cause__ is not None:
        error = error.__cause__
    text = _STORAGE_DETAILS.sub("", (str(error).strip().splitlines() or [""])[0])
    if len(text) > limit:
        text = f"{text[:limit // 3]} ... {text[-(limit * 2 // 3):]}"
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def quiet_logging(verbose: bool) -> None:
    """Unless verbose, silences orbax's log lines, JAX's and TensorFlow Datasets' INFO lines,
    asyncio's "exception was never retrieved" reports and the errors of orbax's abandoned
    coroutines; a failed save or restore then shows as our one line instead of hundreds."""
    if verbose:
        return
    absl_logging.get_absl_handler().addFilter(workarounds.LibraryRecordFilter())
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    sys.unraisablehook = workarounds.drop_orbax_leftovers(sys.unraisablehook)


def describe_step(name: str, config, image_size: int, mesh) -> str:
    """What a compile is of: 'the train step of shunted_t (128 images of 32x32 a step, 1 cpu device(s))'."""
    return (f"the {name} of {config.model.name} ({config.global_batch_size} images of {image_size}x{image_size} "
            f"a step, {mesh.devices.size} {mesh.devices.flat[0].platform} device(s))")


def format_duration(seconds: float) -> str:
    """H:MM:SS."""
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def log_run_summary(workdir, start: int, end: int, batch_size: int, train_seconds: tuple, wall_seconds: float,
                    preempted: bool = False) -> None:
    """Logs the last lines of a training run: the steps it trained from `start` to `end` and how fast
    (`train_seconds`: the training time with and after the first step, evaluations left out), the
    wall time, and where its outputs are."""
    workdir = pathlib.Path(workdir)
    steps = end - start
    if steps == 0:
        done = f"nothing to train: the run was already complete at step {end}"
    else:
        with_first, after_first = train_seconds
        done = (f"{'stopped for preemption' if preempted else 'finished'}: trained steps {start + 1}-{end} "
                f"({steps * batch_size:,} images) in {format_duration(with_first)}, "
                f"{steps * batch_size / with_first:.1f} images/s with the first step's compile")
        if steps > 1:
            done += f", {(steps - 1) * batch_size / after_first:.1f} images/s after it"
    tensorboard = workdir / "tensorboard"
    events = (f"; TensorBoard events in {tensorboard} (tensorboard --logdir {workdir})"
              if tensorboard.is_dir() else "")
    absl_logging.info("%s; wall time %s", done, format_duration(wall_seconds))
    absl_logging.info("checkpoints in %s, metrics in %s%s", workdir / "checkpoints", workdir / "metrics.jsonl", events)
