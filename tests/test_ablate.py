"""The ablations: the notebook runs end to end in its small setting; the tool's pieces on their own."""
import math
import os
import pathlib

import nbformat
import numpy as np
import pytest
from conftest import JAX_CACHE, QUICK_COMPILE_FLAGS
from nbclient import NotebookClient

from shunted_jax import train
from shunted_jax.tools import ablate

REPO = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "ablations.ipynb"
ABLATIONS = str(REPO / "configs" / "ablations.py")


def kernel_env() -> dict:
    """The notebook's kernel: one CPU device (not the tests' eight), the tests' compile settings,
    and the repository importable."""
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count=1 {QUICK_COMPILE_FLAGS}",
            "JAX_COMPILATION_CACHE_DIR": str(JAX_CACHE), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def with_parameters(notebook, **values):
    """The notebook with a cell setting `values` right after its 'parameters' cell, as papermill does."""
    index = next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
    source = "\n".join(f"{name} = {value!r}" for name, value in values.items())
    notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    return notebook


def markdown_outputs(notebook) -> list:
    return [output["data"]["text/markdown"] for cell in notebook.cells if cell.cell_type == "code"
            for output in cell.get("outputs", []) if "text/markdown" in output.get("data", {})]


def table_rows(markdown: str) -> list:
    """The body rows of the first markdown table that starts with the results header, as cell lists."""
    lines = markdown.splitlines()
    start = lines.index("| " + " | ".join(ablate.TABLE_COLUMNS) + " |")
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_notebook_small_setting_has_a_finite_row_per_variant(tmp_path):
    # An empty compilation_cache_dir leaves the cache to $JAX_COMPILATION_CACHE_DIR (kernel_env).
    notebook = with_parameters(nbformat.read(NOTEBOOK, as_version=4), setting="small", out_dir=str(tmp_path),
                               overrides={"compilation_cache_dir": ""})
    # No per-cell time limit: a cell trains seven models, and how long that takes depends on the machine.
    NotebookClient(notebook, kernel_name="python3", timeout=None, startup_timeout=3600,
                   resources={"metadata": {"path": str(REPO)}}).execute(env=kernel_env())
    _, variants = ablate.load_ablations(ABLATIONS)
    labels = [v.label for v in variants]
    results = [text for text in markdown_outputs(notebook) if "| variant | params" in text]
    assert len(results) == 1, "the notebook shows one results table"
    rows = table_rows(results[0])
    assert [row[0] for row in rows] == labels
    for row in rows:
        numbers = [float(cell.replace(",", "")) for cell in row[1:]]
        assert len(numbers) == len(ablate.TABLE_COLUMNS) - 1 and all(map(math.isfinite, numbers)), row
        params, macs, images_per_second, top1 = numbers[:4]
        assert params > 1e5 and macs > 1 and images_per_second > 0 and 0 <= top1 <= 100, row
    assert table_rows((tmp_path / "results.md").read_text()) == rows
    pictures = [output for cell in notebook.cells for output in cell.get("outputs", [])
                if "image/png" in output.get("data", {})]
    assert len(pictures) == 2 + len(labels)  # curves, cost, one attention figure per variant
    for name in ["curves.png", "cost.png", *(f"attention_{label}.png" for label in labels)]:
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


@pytest.fixture(scope="module")
def small_plan():
    """Every variant's config under the small setting, with its model traced at the image size."""
    settings, variants = ablate.load_ablations(ABLATIONS)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)  # the variants name their config files relative to the repository root
        return ablate.plan(variants, ablate.setting_overrides(settings, "small"))


def test_every_variant_is_a_config_override_of_its_train_config(small_plan):
    by_label = {item.variant.label: item for item in small_plan}
    assert set(by_label) == {"ssa", "sra", "ssa_3scale", "ssa_1scale", "plain_ffn", "aggregator", "vit"}
    for item in small_plan:
        assert item.config.data.image_size == 64 and item.config.num_train_steps == 3
        assert "{image_size}" in item.config.data.pp_train  # the images really are resized to 64 px
    # The designs differ where they should and only there.
    assert by_label["ssa"].model.stage_rates() == ((8, 4), (4, 2), (2, 1), (1,))
    assert by_label["sra"].model.attention == "sra"
    assert by_label["ssa_3scale"].model.stage_rates()[:2] == ((8, 4, 2), (4, 2, 1))
    assert by_label["ssa_1scale"].model.stage_rates() == ((8,), (4,), (2,), (1,))
    assert by_label["plain_ffn"].model.ffn == "plain" and by_label["ssa"].model.ffn == "detail"
    assert by_label["aggregator"].model.attention == "aggregator"
    assert by_label["vit"].model.patch_size == 16
    # Matched budget: parameters within 15% of the official SSA's; the aggregator costs more.
    base = by_label["ssa"].cost
    for item in small_plan:
        assert abs(item.cost["params"] / base["params"] - 1) < 0.15, item.variant.label
    assert by_label["aggregator"].cost["macs"] > base["macs"] > by_label["sra"].cost["macs"]


def test_unknown_names_list_the_valid_ones():
    settings, variants = ablate.load_ablations(ABLATIONS)
    with pytest.raises(ValueError, match="choose from ssa, sra, ssa_3scale"):
        ablate.select_variants(variants, ["ssa", "swin"])
    with pytest.raises(ValueError, match="choose from small, demo, full"):
        ablate.setting_overrides(settings, "huge")
    assert [v.label for v in ablate.select_variants(variants, ["vit", "ssa"])] == ["vit", "ssa"]


def test_a_misspelled_field_is_refused_and_overrides_leave_the_original_alone():
    config = train.load_config_file(str(REPO / "configs/shunted_t.py") + ":demo")
    with pytest.raises(KeyError, match="optimiser"):
        ablate.with_overrides(config, {"optimiser.base_lr": 1.0})
    changed = ablate.with_overrides(config, {"model.ssa_rates": ((4,), (2,), (1,), (1,)), "num_train_steps": 3})
    assert changed.model.ssa_rates == ((4,), (2,), (1,), (1,)) and changed.num_train_steps == 3
    assert config.model.ssa_rates is None and config.num_train_steps == -1  # the original is untouched


def test_throughput_leaves_out_the_compile_and_evaluation_intervals():
    train = [{"step": s, "images_per_second": ips} for s, ips in [(3, 5.0), (6, 100.0), (9, 20.0), (12, 110.0)]]
    # Step 3 includes compilation; the evaluation after step 6 slows the interval ending at 9.
    assert ablate.clean_intervals(train, [6, 12]) == [train[1], train[3]]
    assert ablate.steady_images_per_second(train, [6, 12]) == 105.0
    with pytest.raises(ValueError, match="log more often"):
        ablate.steady_images_per_second(train[:2], [3])


def test_results_table_has_a_row_per_record():
    record = {"params": 313204, "macs": 6.79e6, "images_per_second": 65.25, "top1": 0.8123,
              "train_loss": 0.91234, "eval_loss": 0.6}
    table = ablate.results_table([{"label": "ssa", **record}, {"label": "vit", **record, "top1": 0.5}])
    assert table_rows(table) == [["ssa", "313,204", "6.79", "65.2", "81.23", "0.9123", "0.6000"],
                                 ["vit", "313,204", "6.79", "65.2", "50.00", "0.9123", "0.6000"]]


def test_attention_rows_cut_each_group_to_its_key_grid():
    two_groups = (np.full((1, 16, 4), 0.25), np.full((1, 16, 16), 1 / 16))
    rows = ablate.attention_rows({"block1": two_groups, "block2": (np.eye(4)[None],)}, [(4, 4), (2, 2)])
    assert [title for title, _, _ in rows] == ["stage 1: 4x4 queries", "stage 2: 2x2 queries"]
    assert [(title, key_map.shape) for title, key_map in rows[0][2]] == [
        ("group 1, 2x2 keys, head 1", (2, 2)), ("group 2, 4x4 keys, head 1", (4, 4))]
    # The centre query of a 2x2 grid is token 3 (row 1, column 1): it looks at key 3 alone.
    np.testing.assert_array_equal(rows[1][2][0][1], [[0, 0], [0, 1]])
    assert ablate.key_grid(8, (4, 8)) == (2, 4) and ablate.key_grid(49, (7, 7)) == (7, 7)
