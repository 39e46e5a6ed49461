"""GPU kernel time per step, summed by kind, from a `jax.profiler` trace.

    python -m benchmarks.profile_summary TRACE_DIR --steps N [--top 15]

TRACE_DIR is the directory given to `jax.profiler.trace(TRACE_DIR, create_perfetto_trace=True)`
around N steps; the newest trace under it is read. BENCHMARKS.md's profiles report kernel time by
kind (matmuls, cuDNN, each Pallas kernel, XLA fusions, copies); the trace viewer shows it only
kernel by kernel, so this sums the kernels of the GPU's streams by their names and lists the
costliest kernel names after the table.
"""
import argparse
import collections
import gzip
import json
import pathlib
from typing import Dict, List, Tuple

# (kind, substrings of the lower-cased kernel name), first match wins. cuDNN comes before the matmuls
# because its attention kernels on Hopper are named "cudnn_..._sdpa_sm90_..." and "sm90_" is a
# matmul marker.
KINDS = [
    ("cuDNN (attention, convolutions)", ("cudnn", "fmha", "sdpa", "flash", "conv2d", "convolve")),
    ("matmuls (cuBLAS, Triton GEMM fusions)", ("gemm", "cublas", "cutlass", "xmma", "matmul", "sm90_", "sm80_")),
    ("Pallas depthwise conv", ("_conv_kernel",)),
    ("Pallas depthwise weight gradient", ("_weight_grad_kernel",)),
    ("Pallas LayerNorm", ("layer_norm",)),
    ("Pallas short-key attention", ("attention_kernel", "attention_backward_kernel", "short_attention")),
    ("NCCL collectives", ("nccl",)),
    ("XLA scatter", ("scatter",)),
    ("transposes and copies", ("transpose", "copy", "memcpy", "memset")),
    ("XLA reduction fusions", ("reduce", "reduction")),
    ("XLA elementwise fusions", ("fusion", "loop_")),
]
OTHER = "other"
# Timelines the profiler derives from the kernels themselves: counting them would count kernels twice.
DERIVED_THREADS = {"XLA Modules", "XLA Ops", "Steps", "TensorFlow Ops", "Framework Name Scope", "Source code"}


def classify(name: str) -> str:
    """The kind of a kernel, from its name alone (the trace carries nothing else that says it)."""
    lowered = name.lower()
    for kind, markers in KINDS:
        if any(marker in lowered for marker in markers):
            return kind
    return OTHER


def find_trace(trace_dir) -> pathlib.Path:
    """The trace of the newest run under `trace_dir` (each `jax.profiler.trace` call adds a run
    directory): its perfetto_trace.json.gz, else its *.trace.json.gz."""
    root = pathlib.Path(trace_dir)
    paths = list(root.rglob("perfetto_trace.json.gz")) + list(root.rglob("*.trace.json.gz"))
    if not paths:
        raise FileNotFoundError(f"no perfetto_trace.json.gz or *.trace.json.gz under {root}")
    newest = max(paths, key=lambda path: path.stat().st_mtime).parent
    in_newest = [path for path in paths if path.parent == newest]
    return min(in_newest, key=lambda path: path.name != "perfetto_trace.json.gz")


def load_events(path) -> list:
    """The trace's events: the file holds either the list itself or an object with "traceEvents"."""
    with gzip.open(path, "rt") as f:
        trace = json.load(f)
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def _metadata_names(events: list, kind: str) -> Dict[tuple, str]:
    """{(pid, tid): name} of the "thread_name" metadata events, {(pid,): name} of the "process_name" ones."""
    fields = ("pid",) if kind == "process_name" else ("pid", "tid")
    return {tuple(e.get(field) for field in fields): e.get("args", {}).get("name", "")
            for e in events if e.get("ph") == "M" and e.get("name") == kind}


def kernel_events(events: list) -> list:
    """The X events that are GPU kernels: those on a device's "Stream" threads or, where a device names no
    thread that way, those on its threads that are not derived timelines."""
    processes, threads = _metadata_names(events, "process_name"), _metadata_names(events, "thread_name")
    devices = {pid for (pid,), name in processes.items() if "GPU" in name or "/device:" in name}
    with_streams = {pid for (pid, _), name in threads.items() if pid in devices and name.startswith("Stream")}

    def counted(event) -> bool:
        pid, thread = event.get("pid"), threads.get((event.get("pid"), event.get("tid")), "")
        if pid not in devices:
            return False
        return thread.startswith("Stream") if pid in with_streams else thread not in DERIVED_THREADS

    return [e for e in events if e.get("ph") == "X" and counted(e)]


def _sums(kernels: list, key) -> Tuple[collections.Counter, collections.Counter]:
    """(µs, count) of the kernels per key(kernel name)."""
    micros, counts = collections.Counter(), collections.Counter()
    for event in kernels:
        name = key(event.get("name", ""))
        micros[name] += event.get("dur", 0)
        counts[name] += 1
    return micros, counts


def summarise_events(events: list, steps: int) -> List[dict]:
    """Per kind of kernel: ms and kernels per step and GPU (the mean over the GPUs that ran
    kernels) and share of the kernel time, costliest first."""
    kernels = kernel_events(events)
    micros, counts = _sums(kernels, classify)
    total, per_step = sum(micros.values()), steps * max(1, len({event.get("pid") for event in kernels}))
    rows = [{"kind": kind, "ms_per_step": micros[kind] / 1e3 / per_step, "kernels_per_step": counts[kind] / per_step,
             "share": micros[kind] / total if total else 0.0} for kind in counts]
    return sorted(rows, key=lambda row: -row["ms_per_step"])


def summarise(trace_dir, steps: int) -> List[dict]:
    """`summarise_events` of the newest trace under `trace_dir`."""
    return summarise_events(load_events(find_trace(trace_dir)), steps)


def top_kernels(events: list, n: int) -> List[Tuple[str, float, int]]:
    """(name, total ms, count) of the n kernel names with the most time: what to look at within a kind."""
    micros, counts = _sums(kernel_events(events), lambda name: name)
    return [(name, total / 1e3, counts[name]) for name, total in micros.most_common(n)]


def format_summary(rows: List[dict], title: str) -> str:
    """A Markdown table in BENCHMARKS.md's form, with the total line."""
    lines = [title, "", "| kind | ms per step | share | kernels per step |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['kind']} | {r['ms_per_step']:.2f} | {r['share']:.0%} | {r['kernels_per_step']:,.0f} |"
              for r in rows]
    total_ms, total_kernels = sum(r["ms_per_step"] for r in rows), sum(r["kernels_per_step"] for r in rows)
    lines.append(f"| total | {total_ms:.2f} | | {total_kernels:,.0f} |")
    return "\n".join(lines)


def format_top(kernels: List[Tuple[str, float, int]]) -> str:
    """The kernel names of `top_kernels` as a Markdown table, with their kinds."""
    lines = ["| kernel | kind | total ms | count |", "| --- | --- | --- | --- |"]
    lines += [f"| `{name}` | {classify(name)} | {ms:.2f} | {count:,} |" for name, ms, count in kernels]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace_dir", help="the directory given to jax.profiler.trace")
    parser.add_argument("--steps", type=int, required=True, help="steps the trace covers, to divide the sums by")
    parser.add_argument("--top", type=int, default=15, help="kernel names to list, costliest first")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    path = find_trace(args.trace_dir)
    events = load_events(path)
    rows = summarise_events(events, args.steps)
    if not rows:
        raise SystemExit(f"{path} holds no GPU kernels: was it traced on a GPU?")
    print(format_summary(rows, f"GPU kernel time per step over {args.steps} steps, {path}"))
    print()
    print(format_top(top_kernels(events, args.top)))


if __name__ == "__main__":
    main()
