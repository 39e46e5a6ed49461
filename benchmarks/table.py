"""The comparison table of BENCHMARKS.md ("Against PyTorch") from one machine: the official PyTorch
models and timm's PVTv2 in their best modes (`torch.compile`, and with CUDA graphs), and this
project, each timed by its own benchmark in a process of its own, one after another, then the
table with the ratios to the best PyTorch mode and the targets.

    python -m benchmarks.table --official PATH/SSA.py --json table.jsonl
        [--models shunted_t shunted_s shunted_b pvt_v2_b2] [--no-compile shunted_b] [--timeout 400]
        [--parts compile cudagraphs ours eager]
    python -m benchmarks.table --json table.jsonl --print     # the table of runs already made

Every run appends its result to `--json`, so a table can be made in several calls of the same
machine and printed at the end; a run cut by `--timeout` (torch.compile of shunted_b takes more
than 5 minutes) is recorded as not measured. This project's models run with uint8 batches and
normalisation alone on the device (`train_plain`'s input, no augmentation: PyTorch's step has
none either); its shunted_s runs twice, the second time from the persistent cache the first
filled, for the cached compile time. PyTorch's speed varies by host far more than this
project's, so a ratio holds only between runs of one machine.
"""
import argparse
import json
import pathlib
import shlex
import shutil
import subprocess
import sys
import tempfile

from shunted_jax.data import device_ops

TARGETS = {  # (part, model): ratio to the best PyTorch mode measured beside
    ("train", "shunted_s"): 2.0, ("inference", "shunted_s"): 2.0,
    ("train", "pvt_v2_b2"): 2.0, ("inference", "pvt_v2_b2"): 1.5,
}
COLD_COMPILE_TARGET = 30.0  # seconds, the shunted_s train step fed as PyTorch's
TORCH_MODES = {"eager": None, "compile": "default", "cudagraphs": "reduce-overhead"}
"""Each PyTorch part and its `torch.compile` mode (None: eager)."""
COLUMNS = {"eager": "PyTorch eager", "compile": "torch.compile", "cudagraphs": "torch.compile + CUDA graphs"}


def ours_command(model: str, json_path: str, cache_dir: str) -> list:
    return [sys.executable, "-m", "benchmarks.step", "--model", model, "--device-pp", device_ops.EVAL_PP,
            "--plain-device-pp", "", "--cache-dir", cache_dir, "--json", json_path]


def torch_command(model: str, official, mode, json_path: str) -> list:
    """The PyTorch benchmark's command, compiled in `mode` (None: eager)."""
    command = [sys.executable, "-m", "benchmarks.torch_reference", "--model", model, "--json", json_path]
    if official and model.startswith("shunted"):
        command += ["--official", official]
    return command + (["--compile", mode] if mode else [])


def run_logged(command: list, timeout: float, json_path: str, label: dict) -> None:
    """Runs one benchmark and adds `label` to the line it appends; a timeout or a failure is
    recorded as a line of its own, not measured."""
    print("$", shlex.join(command), flush=True)
    path = pathlib.Path(json_path)
    before = len(path.read_text().splitlines()) if path.exists() else 0
    try:
        completed = subprocess.run(command, timeout=timeout)
        failure = None if completed.returncode == 0 else f"exit status {completed.returncode}"
    except subprocess.TimeoutExpired:
        failure = f"not finished in {timeout:.0f} s"
    lines = path.read_text().splitlines() if path.exists() else []
    lines = lines[:before] + [json.dumps({**json.loads(line), **label}) for line in lines[before:]]
    if failure:
        print(f"  not measured: {failure}", flush=True)
        lines.append(json.dumps({**label, "not_measured": failure}))
    path.write_text("".join(line + "\n" for line in lines))


PARTS = ("compile", "cudagraphs", "ours", "eager")


def run_all(args) -> None:
    """Each model's compiles are cold: a persistent cache of its own, which also keeps XLA's
    autotuning results (models with the same layer shapes would otherwise share them)."""
    for model in args.models:
        for part, mode in TORCH_MODES.items():
            if part not in args.parts or (mode and model in args.no_compile):
                continue
            run_logged(torch_command(model, args.official, mode, args.json), args.timeout, args.json,
                       {"model": model, "framework": "torch", "compile": mode})
        if "ours" not in args.parts:
            continue
        cache_dir = tempfile.mkdtemp(prefix=f"jax_cache_{model}_")
        try:
            run_logged(ours_command(model, args.json, cache_dir), args.timeout, args.json,
                       {"model": model, "framework": "shunted_jax"})
            if model == "shunted_s":
                run_logged(ours_command(model, args.json, cache_dir) + ["--eval-batch", "0"], args.timeout,
                           args.json, {"model": model, "framework": "shunted_jax", "cached": True})
        finally:
            shutil.rmtree(cache_dir, ignore_errors=True)


def read_results(path: str) -> dict:
    """{(framework, model, the torch.compile mode or None (torch), "cold"/"cached" (ours)): result}.
    Lines of one kind merge, so that training and inference may run as separate processes (a
    timeout then loses one part, not both); the last line with a part wins it."""
    results = {}
    for line in pathlib.Path(path).read_text().splitlines():
        r = json.loads(line)
        if "framework" not in r:  # a line a benchmark wrote by itself, outside a table run
            continue
        kind = r.get("compile") if r["framework"] == "torch" else ("cached" if r.get("cached") else "cold")
        key = (r["framework"], r["model"], kind)
        results[key] = {**results.get(key, {}), **r}
    return results


def images_per_s(result, part: str):
    if not result or part not in result:
        return None
    return result[part]["images_per_s"]


def cell(value) -> str:
    return f"{value:,.0f}" if value else "–"


def best_torch(results: dict, model: str, part: str):
    """The fastest PyTorch figure measured for this model and part, or None."""
    figures = [images_per_s(results.get(("torch", model, mode)), part) for mode in TORCH_MODES.values()]
    return max(filter(None, figures), default=None)


def table(results: dict, models) -> str:
    shown = [part for part, mode in TORCH_MODES.items()
             if part != "eager" or any(("torch", m, mode) in results for m in models)]
    head = " | ".join(f"{COLUMNS[part]} train / infer" for part in shown)
    lines = [f"| model | {head} | shunted_jax train / infer | train ratio to the best PyTorch (target) "
             "| inference ratio (target) |", "| --- " * (len(shown) + 4) + "|"]
    for model in models:
        ours = results.get(("shunted_jax", model, "cold"))
        ratios = []
        for part in ("train", "inference"):
            mine, theirs, target = images_per_s(ours, part), best_torch(results, model, part), TARGETS.get((part, model))
            if not (mine and theirs):
                ratios.append("–" if target is None else f"– ({target:g}×)")
                continue
            ratio = mine / theirs
            verdict = "" if target is None else f" ({target:g}×, {'met' if ratio >= target else 'not met'})"
            ratios.append(f"{ratio:.2f}×{verdict}")
        runs = [results.get(("torch", model, TORCH_MODES[part])) for part in shown] + [ours]
        pairs = [f"{cell(images_per_s(r, 'train'))} / {cell(images_per_s(r, 'inference'))}" for r in runs]
        lines.append(f"| {model} | {' | '.join(pairs)} | {' | '.join(ratios)} |")
    lines.append("")
    for kind in ("cold", "cached"):
        result = results.get(("shunted_jax", "shunted_s", kind))
        if result and "train" in result:
            seconds = result["train"]["compile_s"]
            verdict = (f" (target {COLD_COMPILE_TARGET:g} s, {'met' if seconds <= COLD_COMPILE_TARGET else 'not met'})"
                       if kind == "cold" else "")
            lines.append(f"shunted_s train step (normalisation only) compile, {kind}: {seconds:.1f} s{verdict}")
    for (framework, model, kind), result in results.items():
        if "not_measured" in result:
            what = (f"torch.compile mode={kind}" if kind else "eager") if framework == "torch" else kind
            lines.append(f"not measured: {model}, {framework} {what}: {result['not_measured']}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", metavar="PATH/SSA.py", help="the official Shunted model file")
    parser.add_argument("--models", nargs="+", default=["shunted_t", "shunted_s", "shunted_b", "pvt_v2_b2"])
    parser.add_argument("--no-compile", nargs="*", default=[], metavar="MODEL", help="skip torch.compile for these")
    parser.add_argument("--parts", nargs="+", default=["compile", "cudagraphs", "ours"], choices=PARTS,
                        help="which runs to make: torch.compile, torch.compile with CUDA graphs, this project's, "
                             "PyTorch eager (a table may be made in several calls of one machine)")
    parser.add_argument("--timeout", type=float, default=400, help="seconds per benchmark run")
    parser.add_argument("--json", required=True, metavar="FILE", help="the JSON lines the runs append to")
    parser.add_argument("--print", action="store_true", help="only print the table of the runs in --json")
    args = parser.parse_args(argv)
    if not args.print:
        if set(TORCH_MODES) & set(args.parts) and any(m.startswith("shunted") for m in args.models) and not args.official:
            parser.error("the Shunted models need --official PATH/SSA.py "
                         "(a checkout of OliverRensu/Shunted-Transformer)")
        run_all(args)
    print(table(read_results(args.json), args.models))


if __name__ == "__main__":
    main()
