"""Where progress goes: a log line, `metrics.jsonl` (one JSON record per line) and TensorBoard."""
import json
import os
import pathlib

from absl import logging

from shunted_jax.train import workarounds
from shunted_jax.train.console import RunError, format_duration, short_cause


def _tensorboard_writer(directory: pathlib.Path):
    """A tensorboardX writer (no TensorFlow needed), or None with a warning when it is not installed."""
    try:
        tensorboardX = workarounds.import_tensorboardx()
    except ImportError:
        logging.warning("tensorboardX is not installed: no TensorBoard summaries, only metrics.jsonl")
        return None
    return tensorboardX.SummaryWriter(str(directory))


def _ends_mid_line(file) -> bool:
    """Whether a file opened for binary reading and appending is not empty and lacks a final newline."""
    if file.seek(0, os.SEEK_END) == 0:
        return False
    file.seek(-1, os.SEEK_END)
    return file.read(1) != b"\n"


class MetricsWriteError(RunError):
    """metrics.jsonl cannot be written: the run stops rather than go on without its records."""


class MetricsWriter:
    """Writes records {"kind": "train"|"eval", "step": int, ...scalars} on the chief process only.

    After a resume, steps since the last checkpoint are written again: readers keep the last
    record per (kind, step). metrics.jsonl is opened, appended to and closed at every record, so a
    file deleted or replaced during the run gets the later records (with one warning); a file that
    cannot be written stops the run with a MetricsWriteError, from the start if it cannot be opened.
    """

    def __init__(self, workdir, enabled: bool):
        self.enabled = enabled
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self._written = None
        self._tensorboard = None
        if enabled:
            self._append("")
            self._tensorboard = _tensorboard_writer(pathlib.Path(workdir) / "tensorboard")

    def _state(self):
        """The file the path names now, as (device, inode, size), or None when there is none."""
        try:
            status = self.path.stat()
        except FileNotFoundError:
            return None
        return status.st_dev, status.st_ino, status.st_size

    def _append(self, text: str) -> None:
        try:
            now = self._state()
            if self._written is not None and (now is None or now[:2] != self._written[:2] or now[2] < self._written[2]):
                logging.warning("%s was deleted or replaced during the run: the records from now on are appended "
                                "to the file now there", self.path)
            with open(self.path, "a+b") as file:
                if _ends_mid_line(file):  # a record a killed run left half written stays on its own line
                    text = "\n" + text
                file.write(text.encode())
            self._written = self._state()
        except OSError as error:
            raise MetricsWriteError(f"writing {self.path} failed: {short_cause(error)}. Fix the storage and rerun: "
                                    "it resumes from the last checkpoint, if there is one") from error

    def write(self, kind: str, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": int(step), **{k: float(v) for k, v in metrics.items()}}
        self._append(json.dumps(record) + "\n")
        if self._tensorboard is not None:
            for name, value in metrics.items():
                self._tensorboard.add_scalar(f"{kind}/{name}", float(value), int(step))
            self._tensorboard.flush()

    def note(self, kind: str, step: int, details: dict) -> None:
        """A record of something that happened to the run (JSON values, not scalars), in metrics.jsonl only."""
        if self.enabled:
            self._append(json.dumps({"kind": kind, "step": int(step), **details}) + "\n")

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


def read_metrics(path) -> list[dict]:
    """The records of a metrics.jsonl file, the last one per (kind, step), in step order. A line
    that is not a record (half written by a killed run, or damaged) is skipped, with one warning
    naming the file and the lines."""
    latest, damaged = {}, []
    for number, line in enumerate(pathlib.Path(path).read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        try:
            record = json.loads(line)
            latest[(record["kind"], record["step"])] = record
        except (ValueError, KeyError, TypeError):
            damaged.append(number)
    if damaged:
        logging.warning("%s: skipped line(s) %s, which are not metrics records", path, ", ".join(map(str, damaged)))
    return sorted(latest.values(), key=lambda record: (record["step"], record["kind"]))


def progress_line(step: int, total_steps: int, steps_per_epoch: int, metrics: dict,
                  images_per_second: float, seconds_per_step: float) -> str:
    """'step 100/1000 epoch 1.00 loss 2.3456 lr 1.2e-04 grad_norm 0.91 images/s 512.3 ETA 0:12:34'."""
    return (f"step {step}/{total_steps} epoch {step / steps_per_epoch:.2f} loss {metrics['loss']:.4f} "
            f"lr {metrics['lr']:.3e} grad_norm {metrics['grad_norm']:.3f} images/s {images_per_second:.1f} "
            f"ETA {format_duration((total_steps - step) * seconds_per_step)}")
