"""How `train.py` ends when its input is bad or the run fails: one `error:` line, not a traceback.

Bad flags, config fields and config files are reported while absl parses the command line
(`parse_flags`); a run's own errors, bad values found while it sets up, storage failures and
Ctrl-C when it ends (`reported_errors`). `--verbose` shows the full tracebacks instead.
"""
import contextlib
import pathlib
import sys

from absl import flags

from shunted_jax.train.console import RunError

VERBOSE_HELP = "Also show orbax's and asyncio's own log lines, JAX's and TFDS's INFO lines, and full tracebacks."
INTERRUPTED = ("interrupted (Ctrl-C) before a checkpoint could be saved: the steps since the last checkpoint are "
               "lost; running the command again resumes from that checkpoint")


def verbose_requested(argv) -> bool:
    """Whether argv asks for --verbose, read on its own: the other flags may be the bad input."""
    alone = flags.FlagValues()
    flags.DEFINE_bool("verbose", False, VERBOSE_HELP, flag_values=alone)
    try:
        alone(list(argv), known_only=True)
    except flags.Error:
        return False
    return alone.verbose


def flag_value(argv, name: str) -> str | None:
    """The value given to --name in argv (`--name=value` or `--name value`), or None."""
    for index, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and index + 1 < len(argv):
            return argv[index + 1]
    return None


def _unknown_field(error: LookupError, argv) -> str:
    """ml_collections' KeyError for an override of a field the config lacks ("'optimiser'" and maybe
    a second line "Did you mean ...?"), as one line naming the flag."""
    cause = error.args[0] if isinstance(error, AttributeError) and error.args else error
    text = str(cause.args[0]) if isinstance(cause, LookupError) and cause.args else str(cause)
    key, _, hint = text.partition("\n")
    key = key.strip("'\"")
    flag = next((arg for arg in argv if arg.startswith("--config.")
                 and key in arg.split("=", 1)[0].split(".")[1:]), f"--config...{key}")
    advice = hint.strip() or "docs/training.md lists the fields"
    return f"{flag}: the config has no field {key!r}. {advice}"


def _last_line(text: str) -> str:
    """The last line of a message that embeds a traceback: its exception, without the type's name."""
    last = [line for line in text.strip().splitlines() if line.strip()][-1].strip()
    name, colon, message = last.partition(": ")
    return message if colon and name.isidentifier() else last


def flag_error_message(error: Exception, argv) -> str:
    """One line for an error raised while absl parsed `argv` (or while the config file loaded)."""
    config = flag_value(argv, "config")
    if isinstance(error, (KeyError, AttributeError)):
        return _unknown_field(error, argv)
    if isinstance(error, OSError):  # ml_collections keeps a config file it could not open until it is read
        path = (config or "").partition(":")[0]
        return (f"--config={config}: cannot read {path} ({_last_line(str(error))}); relative paths start at "
                f"{pathlib.Path.cwd()}")
    text = str(error)
    if "Traceback (most recent call last)" in text:  # ml_collections embeds a config file's error
        return f"--config={config}: {_last_line(text)}"
    if isinstance(error, flags.Error):
        return " ".join(line.strip() for line in text.splitlines() if line.strip())
    return f"--config={config}: cannot load it: {type(error).__name__}: {text}"


def parse_flags(argv, flag_values=flags.FLAGS) -> list:
    """absl's parsing of `argv` into `flag_values`; a bad flag, config field or config file ends the
    program with one `error:` line (with --verbose, with the traceback)."""
    try:
        remaining = flag_values(argv)
        flag_values["config"].value.lock()  # a config file that failed to open raises when first used
    except Exception as error:  # noqa: BLE001 - whatever a config file raises is reported the same way
        if verbose_requested(argv):
            raise
        sys.exit(f"error: {flag_error_message(error, argv)}")
    return remaining


def error_report(error: BaseException) -> str:
    """The lines train.py ends with: `error: ` before each line of a RunError (one problem a line),
    or before the first line of another error, whose other lines (e.g. a command to run) follow."""
    if isinstance(error, KeyboardInterrupt):
        return f"error: {INTERRUPTED}"
    lines = str(error).strip().splitlines() or [type(error).__name__]
    if isinstance(error, RunError):
        return "\n".join(f"error: {line}" for line in lines)
    return "\n".join([f"error: {lines[0]}", *lines[1:]])


@contextlib.contextmanager
def reported_errors(verbose: bool):
    """Ends the program with `error_report`'s lines for a RunError, a ValueError (a value that
    cannot be used, found while the run sets up), an OSError (a file or storage failure) or Ctrl-C;
    other errors, and every error with `verbose`, keep their traceback."""
    try:
        yield
    except (RunError, ValueError, OSError, KeyboardInterrupt) as error:
        if verbose:
            raise
        print(error_report(error), file=sys.stderr)
        sys.exit(130 if isinstance(error, KeyboardInterrupt) else 1)
