"""benchmarks.profile_summary: GPU kernel time per step by kind, from a synthetic trace in the form
`jax.profiler.trace(..., create_perfetto_trace=True)` writes (no profiler is run)."""
import gzip
import json
import os

import pytest

from benchmarks import profile_summary

GPU, HOST, STREAM, XLA_OPS, PYTHON = 1, 2, 10, 20, 30
# One step's kernels on the GPU's stream: (name, µs, kind).
STEP = [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", 3000, "matmuls (cuBLAS, Triton GEMM fusions)"),
    ("triton_gemm_dot_general_7", 1000, "matmuls (cuBLAS, Triton GEMM fusions)"),
    ("_depthwise_conv_kernel", 2000, "Pallas depthwise conv"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128_4x1x1_kernel0_0", 1500,
     "cuDNN (attention, convolutions)"),
    ("_depthwise_weight_grad_kernel", 1000, "Pallas depthwise weight gradient"),
    ("_layer_norm_forward_kernel", 500, "Pallas LayerNorm"),
    ("_attention_backward_kernel", 400, "Pallas short-key attention"),
    ("input_reduce_fusion_5", 300, "XLA reduction fusions"),
    ("loop_multiply_fusion_12", 250, "XLA elementwise fusions"),
    ("loop_transpose_fusion_2", 200, "transposes and copies"),
    ("scatter_add_fusion", 100, "XLA scatter"),
    ("rng_bit_generator", 50, "other"),
]
STEP_MS = 10.3


def metadata(name, pid, value, tid=None):
    event = {"ph": "M", "name": name, "pid": pid, "args": {"name": value}}
    return event if tid is None else {**event, "tid": tid}


def kernel(name, dur, pid=GPU, tid=STREAM, ts=0):
    return {"ph": "X", "name": name, "pid": pid, "tid": tid, "ts": ts, "dur": dur}


def trace_events(steps=2):
    """Two steps of STEP on the GPU's stream, plus what must not count: the GPU's "XLA Ops" timeline
    (the same work again) and a host thread with a kernel-like name."""
    events = [metadata("process_name", GPU, "/device:GPU:0 NVIDIA H200"),
              metadata("thread_name", GPU, "Stream #1(Compute)", STREAM),
              metadata("thread_name", GPU, "XLA Ops", XLA_OPS),
              metadata("process_name", HOST, "/host:CPU"),
              metadata("thread_name", HOST, "python", PYTHON)]
    for step in range(steps):
        events += [kernel(name, dur, ts=step * 20_000 + i) for i, (name, dur, _) in enumerate(STEP)]
        events += [kernel("loop_multiply_fusion_12", 90_000, tid=XLA_OPS, ts=step * 20_000),
                   kernel("cublasGemmEx", 50_000, pid=HOST, tid=PYTHON, ts=step * 20_000)]
    return events


def write_trace(path, events):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        json.dump(events, f)


@pytest.mark.parametrize("name,kind", [(name, kind) for name, _, kind in STEP])
def test_each_kernel_name_gets_its_kind(name, kind):
    assert profile_summary.classify(name) == kind
    assert profile_summary.classify(name.upper()) == kind


def test_kernel_time_per_step_is_summed_by_kind_without_the_xla_ops_timeline_or_the_host():
    rows = profile_summary.summarise_events(trace_events(steps=2), steps=2)
    by_kind = {row["kind"]: row for row in rows}
    expected = {}
    for _, dur, kind in STEP:
        ms, kernels = expected.get(kind, (0.0, 0))
        expected[kind] = (ms + dur / 1e3, kernels + 1)
    assert set(by_kind) == set(expected)
    for kind, (ms, kernels) in expected.items():
        assert by_kind[kind]["ms_per_step"] == pytest.approx(ms)
        assert by_kind[kind]["kernels_per_step"] == kernels
        assert by_kind[kind]["share"] == pytest.approx(ms / STEP_MS)
    assert sum(row["ms_per_step"] for row in rows) == pytest.approx(STEP_MS)
    assert [row["kind"] for row in rows[:3]] == ["matmuls (cuBLAS, Triton GEMM fusions)", "Pallas depthwise conv",
                                                "cuDNN (attention, convolutions)"]
    assert [row["ms_per_step"] for row in rows] == sorted((row["ms_per_step"] for row in rows), reverse=True)


def test_the_table_has_a_row_per_kind_and_the_total_line():
    rows = profile_summary.summarise_events(trace_events(steps=3), steps=3)
    lines = profile_summary.format_summary(rows, "shunted_s train").splitlines()
    assert lines[0] == "shunted_s train"
    assert "| kind | ms per step | share | kernels per step |" in lines
    assert "| matmuls (cuBLAS, Triton GEMM fusions) | 4.00 | 39% | 2 |" in lines
    assert "| other | 0.05 | 0% | 1 |" in lines
    assert lines[-1] == f"| total | {STEP_MS:.2f} | | {len(STEP)} |"


def test_top_kernels_are_the_costliest_names_over_the_whole_trace():
    top = profile_summary.top_kernels(trace_events(steps=2), 2)
    assert [(name, pytest.approx(ms), count) for name, ms, count in top] == [
        (STEP[0][0], 6.0, 2), ("_depthwise_conv_kernel", 4.0, 2)]


def test_a_device_without_stream_threads_counts_all_but_its_derived_timelines():
    events = [metadata("process_name", GPU, "/device:GPU:0 NVIDIA H200"),
              metadata("thread_name", GPU, "Stream #1(Compute)", STREAM),
              metadata("thread_name", GPU, "Launch stats", 11),
              metadata("process_name", 3, "/device:GPU:1 NVIDIA H200"),
              metadata("thread_name", 3, "XLA Modules", 1), metadata("thread_name", 3, "Steps", 2),
              metadata("thread_name", 3, "XLA Ops", 3), metadata("thread_name", 3, "Source code", 4),
              kernel("triton_gemm_dot_1", 1000),
              kernel("loop_add_fusion", 7000, tid=11),  # the first device has streams: only they count
              kernel("input_reduce_fusion", 2000, pid=3, tid=5),  # no thread name: counts
              kernel("_layer_norm_forward_kernel", 500, pid=3, tid=6)]
    events += [kernel("jit_train_step", 9000, pid=3, tid=tid) for tid in (1, 2, 3, 4)]
    rows = {row["kind"]: row for row in profile_summary.summarise_events(events, steps=1)}
    # Two GPUs ran kernels: per step and GPU is half of each sum.
    assert {kind: row["ms_per_step"] for kind, row in rows.items()} == {
        "matmuls (cuBLAS, Triton GEMM fusions)": 0.5, "XLA reduction fusions": 1.0, "Pallas LayerNorm": 0.25}


def test_summarise_reads_the_newest_trace_in_either_json_form(tmp_path):
    old = tmp_path / "plugins" / "profile" / "run0" / "perfetto_trace.json.gz"
    write_trace(old, [metadata("process_name", GPU, "/device:GPU:0"), kernel("_layer_norm_kernel", 99_000, tid=1)])
    os.utime(old, (1_000_000, 1_000_000))
    write_trace(tmp_path / "plugins" / "profile" / "run1" / "perfetto_trace.json.gz",
                {"displayTimeUnit": "ns", "traceEvents": trace_events(steps=2)})
    rows = profile_summary.summarise(tmp_path, steps=2)
    assert sum(row["ms_per_step"] for row in rows) == pytest.approx(STEP_MS)
    assert {row["kind"]: row["ms_per_step"] for row in rows}["Pallas LayerNorm"] == pytest.approx(0.5)


def test_a_trace_json_gz_is_the_fallback_and_none_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        profile_summary.find_trace(tmp_path)
    path = tmp_path / "plugins" / "profile" / "run1" / "host.trace.json.gz"
    write_trace(path, trace_events(steps=1))
    assert profile_summary.find_trace(tmp_path) == path
    assert sum(row["ms_per_step"] for row in profile_summary.summarise(tmp_path, steps=1)) == pytest.approx(STEP_MS)


def test_command_line_prints_the_table_and_the_top_kernels(tmp_path, capsys):
    write_trace(tmp_path / "plugins" / "profile" / "run1" / "perfetto_trace.json.gz", trace_events(steps=2))
    profile_summary.main([str(tmp_path), "--steps", "2", "--top", "2"])
    out = capsys.readouterr().out
    assert f"| total | {STEP_MS:.2f} | | {len(STEP)} |" in out
    assert f"| `{STEP[0][0]}` | matmuls (cuBLAS, Triton GEMM fusions) | 6.00 | 2 |" in out
    assert "| `_depthwise_conv_kernel` | Pallas depthwise conv | 4.00 | 2 |" in out
    assert "_depthwise_weight_grad_kernel`" not in out


def test_the_newest_run_wins_and_within_it_the_perfetto_file(tmp_path):
    runs = tmp_path / "plugins" / "profile"
    write_trace(runs / "run0" / "perfetto_trace.json.gz", [])
    os.utime(runs / "run0" / "perfetto_trace.json.gz", (1_000_000, 1_000_000))
    write_trace(runs / "run1" / "host.trace.json.gz", [])
    assert profile_summary.find_trace(tmp_path) == runs / "run1" / "host.trace.json.gz"
    write_trace(runs / "run1" / "perfetto_trace.json.gz", [])
    os.utime(runs / "run1" / "perfetto_trace.json.gz", (2_000_000, 2_000_000))
    assert profile_summary.find_trace(tmp_path) == runs / "run1" / "perfetto_trace.json.gz"


def test_nccl_collectives_are_a_kind_of_their_own():
    assert profile_summary.classify("ncclDevKernel_AllReduce_Sum_f32_RING_LL") == "NCCL collectives"
