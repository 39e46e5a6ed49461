"""The pipeline benchmark runs end to end and reports its figures (no timing is asserted)."""
import re

from shunted_jax.data import bench


def test_bench_reports_throughput_per_core_and_cores_needed(capsys):
    bench.main(["--image_size", "32", "--jpeg_width", "64", "--jpeg_height", "48", "--batch", "4", "--warmup", "1", "--batches", "2"])
    report = capsys.readouterr().out
    assert "randaug(2,9,0.5)" in report and "JPEG 64x48 -> 32x32" in report
    per_core = float(re.search(r"(\d+) images/s per core \(images per CPU-second", report).group(1))
    cores = int(re.search(r"2000 images/s needs (\d+) cores", report).group(1))
    assert per_core > 0 and cores >= 1
