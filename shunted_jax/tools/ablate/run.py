"""Training the variants one after another and writing the comparison."""
import json
import pathlib

from shunted_jax import train
from shunted_jax.tools.ablate.attention import (attention_probabilities, attention_rows, evaluation_image,
                                                trained_variables)
from shunted_jax.tools.ablate.plots import plot_attention, plot_cost, plot_curves, save_figure
from shunted_jax.tools.ablate.results import describe_budget, results_markdown, run_summary, variants_markdown
from shunted_jax.tools.ablate.variants import (ABLATIONS_FILE, Planned, load_ablations, plan, select_variants,
                                               setting_overrides)
from shunted_jax.train import metrics


def run_variant(planned: Planned, workdir, image_index: int = 0) -> dict:
    """Trains one variant (resuming from `workdir` like train.py) and measures it; returns its record
    with its attention figure."""
    variant, config, model = planned.variant, planned.config, planned.model
    train.train_and_evaluate(config, workdir)
    result = {"label": variant.label, "config": variant.config, "description": variant.description,
              "overrides": dict(variant.overrides), "workdir": str(workdir), **planned.cost,
              **run_summary(metrics.read_metrics(pathlib.Path(workdir) / "metrics.jsonl"))}
    image, image_label = evaluation_image(config, image_index)
    probabilities = attention_probabilities(model, trained_variables(config, workdir), image)
    rows = attention_rows(probabilities, model.stage_grids(*image.shape[:2]))
    return {**result, "attention_figure": plot_attention(variant.label, image, image_label, rows)}


def write_outputs(out_dir, setting: str, budget_line: str, results, variants) -> dict:
    """results.md (the table, then what each variant is), results.json and the plots in `out_dir`;
    returns {name: path}."""
    out_dir = pathlib.Path(out_dir)
    paths = {"results.md": out_dir / "results.md", "results.json": out_dir / "results.json"}
    paths["results.md"].write_text(f"{results_markdown(setting, budget_line, results)}\n{variants_markdown(variants)}\n",
                                   encoding="utf-8")
    records = [{k: v for k, v in r.items() if k != "attention_figure"} for r in results]
    paths["results.json"].write_text(json.dumps({"setting": setting, "budget": budget_line, "variants": records},
                                                indent=1), encoding="utf-8")
    paths["curves.png"] = save_figure(plot_curves(results), out_dir / "curves.png")
    paths["cost.png"] = save_figure(plot_cost(results), out_dir / "cost.png")
    for r in results:
        name = f"attention_{r['label']}.png"
        paths[name] = save_figure(r["attention_figure"], out_dir / name)
    return paths


def run_ablation(setting: str, out_dir, labels=None, extra_overrides=None, ablations_file: str = ABLATIONS_FILE,
                 image_index: int = 0) -> dict:
    """Trains the chosen variants one after another in out_dir/<label> and writes the outputs there;
    returns {'results', 'paths', 'markdown'}."""
    settings, variants = load_ablations(ablations_file)
    planned = plan(select_variants(variants, labels), setting_overrides(settings, setting), extra_overrides)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for number, item in enumerate(planned, start=1):
        workdir = out_dir / item.variant.label
        print(f"[{number}/{len(planned)}] {item.variant.label}: training in {workdir}", flush=True)
        results.append(run_variant(item, workdir, image_index))
        print(f"    eval top-1 {results[-1]['top1']:.4f}, {results[-1]['images_per_second']:.1f} train img/s",
              flush=True)
    budget_line = describe_budget(planned[0].config, results[0]["eval_count"])
    paths = write_outputs(out_dir, setting, budget_line, results, [item.variant for item in planned])
    return {"results": results, "paths": paths, "markdown": results_markdown(setting, budget_line, results)}
