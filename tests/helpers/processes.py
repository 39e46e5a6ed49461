"""Helpers of the tests that run train.py as real processes on a demo model."""
import os
import pathlib
import subprocess
import sys

from conftest import JAX_CACHE, QUICK_COMPILE_FLAGS

REPO = pathlib.Path(__file__).resolve().parents[2]

DEMO = "configs/shunted_t.py:demo"
# The quickest model to compile (one stage of three scanned blocks), for tests of the training
# system that any model serves.
VIT_DEMO = "configs/vit.py:demo"

# A demo config on synthetic data, 16 examples a step: small enough to compile and run in seconds.
SMALL_RUN = ["--config.data.name=synthetic", "--config.data.num_classes=10",
             "--config.data.num_train_examples=256", "--config.data.num_eval_examples=40",
             "--config.global_batch_size=16", "--config.eval_batch_size=16",
             "--config.log_every_steps=1", "--config.mixup.mixup_alpha=0.8", "--config.mixup.cutmix_alpha=1.0",
             "--config.model.drop_path_rate=0.1"]

# Runs train.py with TensorFlow made unimportable: synthetic-data training must not need it.
WITHOUT_TENSORFLOW = ("import runpy, sys; sys.modules['tensorflow'] = sys.modules['tensorflow_datasets'] = None; "
                      "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def subprocess_env(num_devices: int) -> dict:
    """Each subprocess sees `num_devices` CPU devices and compiles as the tests do."""
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={num_devices} {QUICK_COMPILE_FLAGS}"}


def train_command(workdir, *flags, without_tensorflow=False, compilation_cache=True, config=DEMO) -> list:
    """train.py on `config` (a config file with its argument, relative to the repository), SMALL_RUN
    and `flags`. With `compilation_cache`, its cache is the tests' own: the first run of a train
    step anywhere in the suite compiles it and keeps it whole there (as train.py keeps a step beside
    its cache), and every later run of that step loads it."""
    python = [sys.executable, "-c", WITHOUT_TENSORFLOW] if without_tensorflow else [sys.executable]
    return [*python, str(REPO / "train.py"), f"--config={REPO / config}",
            f"--workdir={workdir}", f"--config.compilation_cache_dir={JAX_CACHE if compilation_cache else ''}",
            *SMALL_RUN, *flags]


def run_train(workdir, *flags, num_devices=2, without_tensorflow=False, check=True,
              config=DEMO) -> subprocess.CompletedProcess:
    """Runs train.py to its end; with `check`, asserts it succeeded."""
    result = subprocess.run(train_command(workdir, *flags, without_tensorflow=without_tensorflow, config=config),
                            env=subprocess_env(num_devices), cwd=REPO, capture_output=True, text=True)
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def start_train(workdir, *flags, num_devices=2, compilation_cache=True, config=DEMO) -> subprocess.Popen:
    return subprocess.Popen(train_command(workdir, *flags, compilation_cache=compilation_cache, config=config),
                            env=subprocess_env(num_devices), cwd=REPO, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)


def wait_for_line(process: subprocess.Popen, text: str) -> list:
    """Reads the process's log until a line contains `text`; returns the lines read."""
    lines = []
    for line in process.stderr:
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"{text!r} never logged:\n{''.join(lines[-40:])}")


def checkpoint_steps(workdir) -> list:
    return sorted(int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


LONG_RUN = ("--config.num_train_steps=100000", "--config.checkpoint.every_steps=1000")


def stop_mid_run(workdir, signum: int, said: str, *flags) -> tuple[int, list]:
    """Starts a long run of the ViT demo, sends it `signum` once step 3 is logged and waits for the
    line that says `said` and the step it saved; asserts the process ended cleanly. Returns that
    step and the lines of its log."""
    process = start_train(workdir, *LONG_RUN, *flags, config=VIT_DEMO)
    wait_for_line(process, "step 3/100000")
    process.send_signal(signum)
    lines = wait_for_line(process, said)
    lines += process.stderr.read().splitlines(keepends=True)
    assert process.wait() == 0
    saved_step = int(next(line for line in lines if said in line).split("saved step ")[1].split()[0])
    assert 3 <= saved_step < 100000 and checkpoint_steps(workdir) == [saved_step]
    return saved_step, lines
