"""Benchmarks, run from the repository root: `python -m benchmarks.step`, `.data`, `.kernels`,
`.torch_reference`, `.xla_pass_times` (each module says what it measures)."""
