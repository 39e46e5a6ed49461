"""The pipeline benchmark runs end to end and reports its figures consistently (no timing is asserted)."""
import re

from benchmarks import data as bench
from shunted_jax.data import device_ops

TINY = ["--image_size", "32", "--jpeg_width", "64", "--jpeg_height", "48", "--batch", "6", "--warmup", "1", "--batches", "2"]


def per_core_rates(report: str) -> list[float]:
    return [float(rate) for rate in re.findall(r"(\d+) images/s per core \(images per CPU-second", report)]


def test_bench_reports_throughput_per_core_and_cores_needed(capsys):
    bench.main(TINY)
    report = capsys.readouterr().out
    assert "decode_and_inception_crop(32)|flip_lr" in report and "JPEG 64x48 -> 32x32" in report
    assert "repeated_aug 3" in report
    (per_core,) = per_core_rates(report)
    cores = int(re.search(r"2000 images/s needs (\d+) cores", report).group(1))
    assert (cores - 1) * (per_core - 0.5) < 2000 <= cores * (per_core + 0.5), "the fewest cores that reach 2000 images/s"


def test_device_pp_finishes_every_batch_on_the_cpu(capsys, monkeypatch):
    finished = []
    real_finish = bench.device_finish

    def counting_finish(device_pp, batch_size):
        finish = real_finish(device_pp, batch_size)
        return lambda batch: finished.append(finish(batch).shape)

    monkeypatch.setattr(bench, "device_finish", counting_finish)
    bench.main(TINY + ["--device_pp", device_ops.TRAIN_PP])
    assert f"device ops {device_ops.TRAIN_PP}" in capsys.readouterr().out
    assert finished == [(6, 32, 32, 3)] * 3, "the warm-up batch and the 2 timed ones"


def test_compare_ends_with_the_speed_up_of_decoding_once(capsys):
    bench.main(TINY + ["--compare"])
    lines = capsys.readouterr().out.strip().splitlines()
    report = "\n".join(lines)
    assert report.count("decode_and_inception_crop(32)|flip_lr") == 2
    per_copy, once = per_core_rates(report)
    pattern = r"per-core speed-up of decoding once over a decode-and-crop per copy: (\d+\.\d\d)x"
    speed_up = float(re.fullmatch(pattern, lines[-1]).group(1))
    assert abs(speed_up - once / per_copy) <= 0.01 + 0.5 * (once + per_copy) / per_copy**2
