"""Where an XLA compile spends its time, from XLA's own timers in a log.

    TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=gpu_compiler=1,hlo_pass_pipeline=1 \\
        python -m benchmarks.step --model shunted_s --cache-dir '' 2> xla.log
    python -m benchmarks.xla_pass_times xla.log [--top 10]

With that logging XLA prints one "HLO pass: NAME time: ..." line as each pass ends and, on GPU,
"GpuCompiler::RunHloPasses / RunBackend for MODULE time: ..." per compiled program. This sums
the passes by name (over every program in the log: nested pipelines count inside their parents
too) and lists the per-program totals. The lines are written as each timer ends, so the log of
a run stopped mid-compile still shows the passes that finished. On GPU, "config-assigner" is
autotuning (gemm, convolution and fusion configurations) and "priority-fusion" is the fusion
pass driven by XLA's cost model.
"""
import argparse
import collections
import re
from typing import Dict, Iterable, List, Tuple

_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0}
_PASS = re.compile(r"HLO pass: (\S+) time: ([\d.]+) (us|ms|s|min)\b")
_PROGRAM = re.compile(r"GpuCompiler::(RunHloPasses|RunBackend) for (\S+) time: ([\d.]+) (us|ms|s|min)\b")


def pass_seconds(lines: Iterable[str]) -> Tuple[Dict[str, float], Dict[str, int], List[Tuple[str, str, float]]]:
    """(seconds per pass name, runs per pass name, [(phase, program, seconds)]) from log lines."""
    seconds, runs, programs = collections.Counter(), collections.Counter(), []
    for line in lines:
        match = _PASS.search(line)
        if match:
            seconds[match.group(1)] += float(match.group(2)) * _UNITS[match.group(3)]
            runs[match.group(1)] += 1
            continue
        match = _PROGRAM.search(line)
        if match:
            programs.append((match.group(1), match.group(2), float(match.group(3)) * _UNITS[match.group(4)]))
    return dict(seconds), dict(runs), programs


def format_report(seconds: Dict[str, float], runs: Dict[str, int], programs, top: int) -> str:
    lines = [f"{phase:<12} {seconds_:8.1f} s  {program}" for phase, program, seconds_ in programs]
    lines.append(f"{'pass':<40} {'seconds':>8} {'runs':>6}")
    for name, total in sorted(seconds.items(), key=lambda item: -item[1])[:top]:
        lines.append(f"{name:<40} {total:8.2f} {runs[name]:>6}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log", help="stderr of a run made with the logging above")
    parser.add_argument("--top", type=int, default=10, help="passes to list, slowest first")
    args = parser.parse_args(argv)
    with open(args.log, errors="replace") as f:
        seconds, runs, programs = pass_seconds(f)
    if not seconds and not programs:
        raise SystemExit(f"{args.log} holds no XLA timer lines: run with TF_CPP_MIN_LOG_LEVEL=0 and "
                         "TF_CPP_VMODULE=gpu_compiler=1,hlo_pass_pipeline=1 (see --help).")
    print(format_report(seconds, runs, programs, args.top))


if __name__ == "__main__":
    main()
