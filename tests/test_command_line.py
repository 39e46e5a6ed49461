"""train.py's bad input ends in one `error:` line: bad flags, config fields and config files while
the command line is parsed; values found bad while the run sets up; Ctrl-C, before and during
training. `--verbose` keeps the tracebacks."""
import signal
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from helpers.processes import LONG_RUN, REPO, VIT_DEMO, run_train, start_train, stop_mid_run, wait_for_line
from shunted_jax.train import command_line, console

DEMO = f"--config={REPO / 'configs' / 'shunted_t.py'}:demo"


def parse(monkeypatch, *args):
    """command_line.parse_flags on train.py's flags, defined afresh (ml_collections reads sys.argv)."""
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", lock_config=True, flag_values=flag_values)
    flags.DEFINE_string("workdir", None, "", flag_values=flag_values)
    flags.DEFINE_bool("verbose", False, "", flag_values=flag_values)
    argv = ["train.py", *args, "--workdir=/tmp/unused"]
    monkeypatch.setattr(sys, "argv", argv)
    return command_line.parse_flags(argv, flag_values)


@pytest.mark.parametrize("args, line", [
    ((DEMO, "--config.optimiser.base_lr=1"),
     'error: --config.optimiser.base_lr=1: the config has no field \'optimiser\'. Did you mean "optimizer" instead '
     'of "optimiser"?'),
    ((DEMO, "--config.foo=1"), "error: --config.foo=1: the config has no field 'foo'. docs/training.md lists the fields"),
    ((DEMO, "--config.global_batch_size=1.5"),
     "error: flag --config.global_batch_size=1.5: invalid literal for int() with base 10: '1.5'"),
    ((DEMO, "--bogus=1"), "error: Unknown command line flag 'bogus'"),
    ((f"--config={REPO / 'configs' / 'shunted_s.py'}:demo",),
     f"error: --config={REPO / 'configs' / 'shunted_s.py'}:demo: {REPO / 'configs' / 'shunted_s.py'}: unknown "
     "argument 'demo'; valid arguments: none: it takes no argument"),
    (("--config=configs/no_such_file.py",),
     "error: --config=configs/no_such_file.py: cannot read configs/no_such_file.py ([Errno 2] No such file or "
     "directory: 'configs/no_such_file.py'); relative paths start at "),
])
def test_bad_flags_fields_and_config_files_end_in_one_line(monkeypatch, args, line):
    with pytest.raises(SystemExit) as stopped:
        parse(monkeypatch, *args)
    assert str(stopped.value.code).startswith(line) and "\n" not in str(stopped.value.code)


def test_a_config_file_that_does_not_load_is_named(monkeypatch, tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(:\n")
    with pytest.raises(SystemExit) as stopped:
        parse(monkeypatch, f"--config={broken}")
    assert str(stopped.value.code).startswith(f"error: --config={broken}: cannot load it: SyntaxError: ")


def test_verbose_keeps_the_traceback(monkeypatch):
    with pytest.raises(KeyError, match="optimiser"):
        parse(monkeypatch, DEMO, "--config.optimiser.base_lr=1", "--verbose")


@pytest.mark.parametrize("error, lines, status", [
    (console.RunError("config.a=1 is out of range\nconfig.b=2 is out of range"),
     "error: config.a=1 is out of range\nerror: config.b=2 is out of range", 1),
    (ValueError("The dataset is not prepared. Prepare it with:\n  python -m prepare"),
     "error: The dataset is not prepared. Prepare it with:\n  python -m prepare", 1),
    (FileNotFoundError("no such file: x"), "error: no such file: x", 1),
    (KeyboardInterrupt(), f"error: {command_line.INTERRUPTED}", 130),
])
def test_run_errors_bad_values_storage_errors_and_ctrl_c_end_in_error_lines(capsys, error, lines, status):
    with pytest.raises(SystemExit) as stopped:
        with command_line.reported_errors(verbose=False):
            raise error
    assert stopped.value.code == status and capsys.readouterr().err == lines + "\n"
    with pytest.raises(type(error)):
        with command_line.reported_errors(verbose=True):
            raise error


def test_other_errors_keep_their_traceback():
    with pytest.raises(TypeError):
        with command_line.reported_errors(verbose=False):
            raise TypeError("a bug")


@pytest.mark.parametrize("flag, last_line", [
    ("--config.model.name=foo", "error: config.model.name='foo' is not a model: choose one of "),
    ("--config.optimizer.base_lr=-1", "error: config.optimizer.base_lr=-1.0 is out of range; valid: > 0"),
    ("--config.data.device_pp_train=value_range(0,1)|normalise",
     "error: config.data.device_pp_train='value_range(0,1)|normalise': unknown device op 'normalise'"),
    ("--config.optimiser.base_lr=1", "error: --config.optimiser.base_lr=1: the config has no field 'optimiser'."),
])
def test_train_py_ends_bad_input_with_one_line(tmp_path, flag, last_line):
    result = run_train(tmp_path / "w", flag, check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and lines[-1].startswith(last_line), result.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in result.stderr
    verbose = run_train(tmp_path / "w", flag, "--verbose", check=False)
    assert verbose.returncode != 0 and "Traceback (most recent call last)" in verbose.stderr
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_ctrl_c_during_training_saves_and_stops_like_sigterm_and_before_it_stops_in_one_line(tmp_path):
    _, lines = stop_mid_run(tmp_path, signal.SIGINT, "interrupted (Ctrl-C): saved step")
    assert any("Ctrl-C again stops at once" in line for line in lines)

    # Interrupted while it sets up again (restoring, building the iterator, compiling): one line,
    # or, once its first step has begun, saved as above.
    restarted = start_train(tmp_path, *LONG_RUN, config=VIT_DEMO)
    wait_for_line(restarted, "resumed from")
    restarted.send_signal(signal.SIGINT)
    rest = restarted.stderr.read()
    restarted.wait()
    assert "Traceback" not in rest
    if restarted.returncode == 0:
        assert "interrupted (Ctrl-C): saved step" in rest
    else:
        assert restarted.returncode == 130 and rest.strip().splitlines()[-1] == f"error: {command_line.INTERRUPTED}"
