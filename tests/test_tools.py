"""The summary tool: per-stage parameters and multiply-adds add up to the model's totals."""
from shunted_jax import models
from shunted_jax.tools import summary


def test_stage_rows_add_up_to_the_totals():
    rows = summary.summarize(models.create("shunted_s"))
    parts, total = rows[:-1], rows[-1]
    assert [r["part"] for r in parts] == ["stage1", "stage2", "stage3", "stage4", "head"]
    assert total["params"] == 22_401_256 == sum(r["params"] for r in parts)
    for kind in ("conv", "linear", "attention", "all"):
        assert total[kind] == sum(r[kind] for r in parts)
    assert parts[-1]["linear"] == 512 * 1000 and parts[-1]["conv"] == 0


def test_command_line_prints_the_published_figures(capsys):
    summary.main(["--model", "shunted_t"])
    out = capsys.readouterr().out
    assert "11,553,576" in out and "published: 11.5 M params, 2.1 GMACs" in out and "2.147 GMACs" in out


def test_overrides_change_the_count(capsys):
    summary.main(["--model", "shunted_t", "--set", "attention=sra", "--image-size", "256", "192"])
    out = capsys.readouterr().out
    assert "64x48" in out and "published" not in out
    assert "11,553,576" not in out


def test_single_stage_model_lists_every_part(capsys):
    summary.main(["--model", "vit_ti16"])
    lines = capsys.readouterr().out.splitlines()
    parts = [line.split()[0] for line in lines[3:]]
    assert parts == ["stage1", "head", "pos_embed", "total"]
    assert "5,717,032" in lines[-1]  # the total row adds the position embedding too


def _load_benchmark_script(name: str):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_xla_pass_times_sums_passes_by_name_and_lists_programs():
    xla_pass_times = _load_benchmark_script("xla_pass_times")
    log = [
        "I1125 02:55:58.3 hlo_pass_pipeline.cc:206] HLO pass: priority-fusion time: 1.5 min (90000000 us)",
        "I1125 02:55:58.4 hlo_pass_pipeline.cc:206] HLO pass: priority-fusion time: 250 ms (250000 us)",
        "I1125 02:55:58.5 hlo_pass_pipeline.cc:206] HLO pass: config-assigner time: 12.5 s (12500000 us)",
        "I1125 02:55:58.6 gpu_compiler.cc:2345] GpuCompiler::RunHloPasses for jit_train_step time: 2.17 min (130003255 us)",
        "unrelated line",
    ]
    seconds, runs, programs = xla_pass_times.pass_seconds(log)
    assert seconds == {"priority-fusion": 90.25, "config-assigner": 12.5}
    assert runs == {"priority-fusion": 2, "config-assigner": 1}
    assert programs == [("RunHloPasses", "jit_train_step", 2.17 * 60)]
    report = xla_pass_times.format_report(seconds, runs, programs, top=1).splitlines()
    assert report[-1].split() == ["priority-fusion", "90.25", "2"]


def test_bench_records_what_it_ran_and_passes_compiler_options_to_xla(tmp_path, capsys):
    import json

    import jax

    from benchmarks import step as bench

    dump = tmp_path / "dump"
    result = bench.main(["--model", "shunted_t", "--batch", "0", "--eval-batch", "8", "--image-size", "32",
                         "--steps", "1", "--cache-dir", "", "--json", str(tmp_path / "bench.jsonl"),
                         "--set", "depths=(1,1,1,1)", "--compiler-options", f"xla_dump_to={dump}"])
    assert json.loads((tmp_path / "bench.jsonl").read_text()) == json.loads(json.dumps(result))
    assert result["inference"]["images_per_s"] > 0 and "train" not in result
    assert (result["kernels"], result["scan_unroll"]) == ("auto", 64)
    assert result["compiler_options"] == f"xla_dump_to={dump}"
    assert any("jit_inference" in path.name for path in dump.iterdir())
    assert "kernels=auto scan_unroll=64" in capsys.readouterr().out
