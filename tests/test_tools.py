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
