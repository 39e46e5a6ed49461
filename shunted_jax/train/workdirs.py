"""The work directory: checked before anything expensive starts, and held by one training run at a time.

Two runs writing one workdir replace each other's checkpoints and interleave their metrics, so a
training run holds an OS lock (`fcntl.flock`) on `WORKDIR/run.lock` for as long as it runs. The
kernel releases it when the process ends, however it ends, so a killed run never blocks its own
restart; the file's text only names the current holder for the message a second run shows.
"""
import datetime
import errno
import fcntl
import os
import pathlib
import shlex
import socket
import sys

import jax
from absl import logging

from shunted_jax.train.console import RunError

LOCK_NAME = "run.lock"

# errno values of filesystems that do not implement flock (some network filesystems).
_LOCKS_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class WorkdirError(RunError):
    """The workdir cannot be used: not a directory, not writable, or held by another run."""


def _not_a_directory(workdir: pathlib.Path) -> pathlib.Path | None:
    """The workdir or the first of its parents that exists but is not a directory, if any."""
    for path in [*reversed(workdir.parents), workdir]:
        if path.exists() and not path.is_dir():
            return path
    return None


def _check_is_directory(workdir: pathlib.Path) -> None:
    blocking = _not_a_directory(workdir)
    if blocking is not None:
        what = "is a file" if blocking == workdir else f"is inside {blocking}, which is a file"
        raise WorkdirError(f"--workdir {workdir} {what}, not a directory: give a directory path")


def prepare_for_training(workdir) -> pathlib.Path:
    """Creates the work directory and proves it writable."""
    workdir = pathlib.Path(workdir).resolve()
    _check_is_directory(workdir)
    probe = workdir / f".write_probe_{jax.process_index()}"
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise WorkdirError(f"--workdir {workdir} is not writable: {error}") from error
    return workdir


def prepare_for_reading(workdir) -> pathlib.Path:
    """Checks the work directory exists, creating and writing nothing (it may be read-only)."""
    workdir = pathlib.Path(workdir).resolve()
    _check_is_directory(workdir)
    if not workdir.exists():
        raise WorkdirError(f"no checkpoint to evaluate: --workdir {workdir} does not exist")
    return workdir


def can_record(workdir: pathlib.Path) -> bool:
    """Whether evaluation can append to the workdir's metrics; says so once when it cannot."""
    if os.access(workdir, os.W_OK):
        return True
    logging.warning("--workdir %s is read-only: the evaluation is logged here but not added to metrics.jsonl",
                    workdir)
    return False


def holder_description() -> str:
    """Who holds a workdir: host, process id, start time and command line."""
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return (f"process {os.getpid()} on {socket.gethostname()}, started {started} "
            f"(command: {shlex.join([sys.executable, *sys.argv])})")


class WorkdirLock:
    """Holds `WORKDIR/run.lock` from construction until `release()` (or the process's end).

    Only process 0 of a multi-host run takes it (`enabled`): the processes are one run, and orbax
    writes checkpoints from the primary process.
    """

    def __init__(self, workdir: pathlib.Path, enabled: bool = True):
        self.path = workdir / LOCK_NAME
        self._file = None
        if not enabled:
            return
        self._file = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self.path.read_text(errors="replace").strip() or "another process (not yet named)"
            self.release()
            raise WorkdirError(f"--workdir {workdir} is in use by {holder}. Wait for that run to finish "
                               "or stop it, or give this run another --workdir") from None
        except OSError as error:
            if error.errno not in _LOCKS_UNSUPPORTED:
                self.release()
                raise
            logging.warning("the filesystem of %s refuses locks (%s): nothing stops a second run from "
                            "writing into this workdir at the same time", workdir, error.strerror)
            return
        self._file.truncate(0)
        self._file.write(holder_description() + "\n")
        self._file.flush()

    def release(self) -> None:
        """Closing the file releases the lock; its text stays until the next holder overwrites it."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.release()
        return False


def hold(workdir: pathlib.Path) -> WorkdirLock:
    """The lock of a training run, held by process 0 for all processes."""
    return WorkdirLock(workdir, enabled=jax.process_index() == 0)
