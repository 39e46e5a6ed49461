"""benchmarks.table: the runs' results recorded under their labels, and the table with the ratios
to the best PyTorch mode and the targets marked (no timing is run or asserted)."""
import json
import sys

import pytest

from benchmarks import table


def result(model, train, inference, **label):
    parts = {"train": {"images_per_s": train, "compile_s": 50.0}, "inference": {"images_per_s": inference}}
    return {"model": model, **{k: v for k, v in parts.items() if v["images_per_s"]}, **label}


def test_a_run_s_line_gets_its_label_and_a_failed_run_a_line_of_its_own(tmp_path):
    path = tmp_path / "runs.jsonl"
    write = f"open({str(path)!r}, 'a').write('{{\"model\": \"shunted_t\"}}\\n')"
    table.run_logged([sys.executable, "-c", write], 60, str(path), {"framework": "shunted_jax", "cached": True})
    failing = {"framework": "torch", "model": "shunted_b", "compile": "default"}
    table.run_logged([sys.executable, "-c", "raise SystemExit(3)"], 60, str(path), failing)
    table.run_logged([sys.executable, "-c", "import time; time.sleep(30)"], 0.5, str(path),
                     {"framework": "torch", "model": "shunted_b", "compile": None})
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == [{"model": "shunted_t", "framework": "shunted_jax", "cached": True},
                     {"framework": "torch", "model": "shunted_b", "compile": "default", "not_measured": "exit status 3"},
                     {"framework": "torch", "model": "shunted_b", "compile": None,
                      "not_measured": "not finished in 0 s"}]


def test_the_table_gives_ratios_to_the_best_pytorch_mode_and_marks_the_targets(tmp_path, capsys):
    path = tmp_path / "runs.jsonl"
    runs = [result("shunted_s", 1300, 8400, framework="torch", compile="default"),
            result("shunted_s", 1500, 0, framework="torch", compile="reduce-overhead"),
            result("shunted_s", 0, 8000, framework="torch", compile="reduce-overhead"),
            result("shunted_s", 3900, 12600, framework="shunted_jax"),
            {**result("shunted_s", 3000, 0, framework="shunted_jax", cached=True),
             "train": {"images_per_s": 3000, "compile_s": 9.5}},
            result("pvt_v2_b2", 2000, 10000, framework="torch", compile="default"),
            result("pvt_v2_b2", 3000, 16000, framework="shunted_jax"),
            {"framework": "torch", "model": "shunted_b", "compile": "default", "not_measured": "not finished in 400 s"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in runs))
    table.main(["--json", str(path), "--print", "--models", "shunted_s", "pvt_v2_b2", "shunted_b"])
    out = capsys.readouterr().out
    assert ("| model | torch.compile train / infer | torch.compile + CUDA graphs train / infer "
            "| shunted_jax train / infer |") in out
    # Training against CUDA graphs' 1,500, inference against plain torch.compile's 8,400; CUDA
    # graphs' two parts, run as separate processes, share a cell.
    assert ("| shunted_s | 1,300 / 8,400 | 1,500 / 8,000 | 3,900 / 12,600 | 2.60× (2×, met) "
            "| 1.50× (2×, not met) |") in out
    assert "| pvt_v2_b2 | 2,000 / 10,000 | – / – | 3,000 / 16,000 | 1.50× (2×, not met) | 1.60× (1.5×, met) |" in out
    assert "compile, cold: 50.0 s (target 30 s, not met)" in out and "compile, cached: 9.5 s\n" in out
    assert "not measured: shunted_b, torch torch.compile mode=default: not finished in 400 s" in out
    assert "PyTorch eager" not in out


def test_our_commands_are_what_the_benchmark_parses():
    """The flags table.py passes exist, and say what the table claims: normalisation alone, the
    given cache."""
    from benchmarks import step
    from shunted_jax.data import device_ops

    ours = step.make_parser().parse_args(table.ours_command("shunted_s", "runs.jsonl", "/tmp/cache")[3:])
    assert (ours.model, ours.device_pp, ours.plain_device_pp, ours.cache_dir, ours.json) == (
        "shunted_s", device_ops.EVAL_PP, "", "/tmp/cache", "runs.jsonl")


def test_the_pytorch_commands_are_what_its_benchmark_parses():
    """The PyTorch side's flags exist: the official file for the Shunted models only."""
    pytest.importorskip("torch", reason="benchmarks.torch_reference needs PyTorch")
    from benchmarks import torch_reference

    parse = torch_reference.make_parser().parse_args
    shunted = parse(table.torch_command("shunted_b", "SSA.py", "reduce-overhead", "runs.jsonl")[3:])
    pvt = parse(table.torch_command("pvt_v2_b2", "SSA.py", None, "runs.jsonl")[3:])
    assert (shunted.model, shunted.official, shunted.compile) == ("shunted_b", "SSA.py", "reduce-overhead")
    assert (pvt.model, pvt.official, pvt.compile, pvt.json) == ("pvt_v2_b2", None, None, "runs.jsonl")


def test_parts_choose_which_runs_are_made(tmp_path, monkeypatch):
    """A table made in several calls: each call makes only the runs of its parts, and only the
    PyTorch runs of a Shunted model need the official file."""
    made = []
    monkeypatch.setattr(table, "run_logged", lambda command, timeout, path, label: made.append(label))
    path = tmp_path / "runs.jsonl"
    path.write_text("")
    path = str(path)
    table.main(["--json", path, "--models", "shunted_s", "pvt_v2_b2", "--parts", "ours"])
    assert made == [{"model": "shunted_s", "framework": "shunted_jax"},
                    {"model": "shunted_s", "framework": "shunted_jax", "cached": True},
                    {"model": "pvt_v2_b2", "framework": "shunted_jax"}]
    made.clear()
    table.main(["--json", path, "--official", "SSA.py", "--models", "shunted_s", "shunted_b", "--parts", "compile",
                "cudagraphs", "--no-compile", "shunted_b"])
    assert made == [{"model": "shunted_s", "framework": "torch", "compile": "default"},
                    {"model": "shunted_s", "framework": "torch", "compile": "reduce-overhead"}]
    with pytest.raises(SystemExit):
        table.main(["--json", path, "--models", "shunted_t", "--parts", "eager"])
