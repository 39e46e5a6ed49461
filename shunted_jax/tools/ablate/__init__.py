"""Attention ablations: train every variant of configs/ablations.py on one budget and compare them.

    python -m shunted_jax.tools.ablate --setting small|demo|full --out DIR [--variants ssa,sra]
                                       [--set field=value ...]

Run from the repository root (the variants name config files under configs/). Each variant is
trained by `train.train_and_evaluate`, exactly as `train.py` would, in DIR/<label>; its
metrics.jsonl gives the curves, its checkpoint the weights whose attention is drawn. DIR gets
results.md (the table), results.json, curves.png, cost.png and attention_<label>.png.
notebooks/ablations.ipynb calls the same functions: `variants` (what is compared), `run`
(training and outputs), `results` (numbers and markdown), `attention` (attention maps), `plots`.
Needs matplotlib (`pip install -e .[notebook]`).
"""
from shunted_jax.tools.ablate.attention import attention_probabilities, attention_rows, key_grid, trained_variables
from shunted_jax.tools.ablate.results import (EVALUATOR, TABLE_COLUMNS, clean_intervals, results_table, run_summary,
                                              steady_images_per_second, variants_markdown)
from shunted_jax.tools.ablate.run import run_ablation, run_variant
from shunted_jax.tools.ablate.variants import (ABLATIONS_FILE, Variant, load_ablations, plan, select_variants,
                                               setting_overrides, with_overrides)

__all__ = ["ABLATIONS_FILE", "EVALUATOR", "TABLE_COLUMNS", "Variant", "attention_probabilities", "attention_rows",
           "clean_intervals", "key_grid", "load_ablations", "plan", "results_table", "run_ablation", "run_summary",
           "run_variant", "select_variants", "setting_overrides", "steady_images_per_second", "trained_variables",
           "variants_markdown", "with_overrides"]
