"""Attention ablations: train every variant of configs/ablations.py on one budget and compare them.

    python -m shunted_jax.tools.ablate --setting small|demo|full --out DIR [--variants ssa,sra]
                                       [--set field=value ...]

Run from the repository root (the variants name config files under configs/). Each variant is
trained by `train.train_and_evaluate`, exactly as `train.py` would, in DIR/<label>; its
metrics.jsonl gives the curves, its checkpoint the weights whose attention is drawn. DIR gets
results.md (the table), results.json, curves.png, cost.png and attention_<label>.png.
notebooks/ablations.ipynb calls the same functions. Needs matplotlib (`pip install -e .[notebook]`).
"""
import argparse
import copy
import dataclasses
import json
import math
import pathlib
import runpy
import statistics

import jax
import numpy as np
import orbax.checkpoint as ocp

from shunted_jax import data, train
from shunted_jax.tools import summary
from shunted_jax.train import metrics

try:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
except ImportError as error:
    raise ImportError("shunted_jax.tools.ablate draws with matplotlib: pip install -e '.[notebook]'") from error

ABLATIONS_FILE = "configs/ablations.py"
MAPS_PER_STAGE = 6


@dataclasses.dataclass(frozen=True)
class Variant:
    """One design to compare: a train config file (`path:arg`) and overrides of its dotted fields."""
    label: str
    config: str
    overrides: dict
    description: str = ""


def existing_file(path: str) -> str:
    """The path itself, or an error saying where it was looked for (relative paths: the repo root)."""
    if not pathlib.Path(path).is_file():
        raise FileNotFoundError(f"{path} not found from {pathlib.Path.cwd()}: run from the repository root "
                                "(the ablations read the config files under configs/).")
    return path


def load_ablations(path: str = ABLATIONS_FILE):
    """(settings, variants) of an ablations file: {setting: overrides} and a tuple of Variants."""
    module = runpy.run_path(existing_file(path))
    return module["SETTINGS"], tuple(Variant(**fields) for fields in module["VARIANTS"])


def select(named: dict, names, what: str) -> list:
    """named[n] for each requested name, or an error listing the valid names."""
    unknown = [name for name in names if name not in named]
    if unknown:
        raise ValueError(f"Unknown {what} {unknown}; choose from {', '.join(named)}.")
    return [named[name] for name in names]


def select_variants(variants, labels=None) -> tuple:
    """The variants with these labels, in that order; all of them for None or empty."""
    if not labels:
        return tuple(variants)
    return tuple(select({v.label: v for v in variants}, labels, "variant(s)"))


def setting_overrides(settings: dict, setting: str) -> dict:
    """The budget of a named setting: overrides applied to every variant."""
    return select(settings, [setting], "setting")[0]


def with_overrides(config, overrides: dict):
    """A copy of a locked config with dotted fields replaced; an unknown field is an error, as on
    train.py's command line (config files list every model field)."""
    config = copy.deepcopy(config)
    config.update_from_flattened_dict(overrides)
    return config


def variant_config(variant: Variant, budget: dict, extra: dict | None = None):
    """The variant's train config: its file, its own overrides, the setting's, then `extra`."""
    config = train.load_config_file(variant.config)
    for overrides in (variant.overrides, budget, extra or {}):
        config = with_overrides(config, overrides)
    return config


def build_model(config):
    """The model `train.py` builds from this config (class count from the dataset)."""
    return train.create_model(config.model, data.dataset_info(config.data).num_classes)


def model_cost(model, image_size: int) -> dict:
    """Parameters and multiply-adds per image of the inference forward (shunted_jax.tools.summary).

    Tracing the model at the image size also raises, before any training, the model's errors for
    reduction rates that do not fit a stage grid or heads that do not split into the groups."""
    total = summary.summarize(model, (image_size, image_size))[-1]
    return {"params": total["params"], "macs": total["all"]}


def clean_intervals(train_records, eval_steps) -> list:
    """The train records whose log interval holds neither the first compile nor an evaluation.

    An evaluation at step e runs after the log line of step e, so it lands in the next interval."""
    kept = []
    for previous, record in zip(train_records, train_records[1:]):
        if not any(previous["step"] <= e < record["step"] for e in eval_steps):
            kept.append(record)
    return kept


def steady_images_per_second(train_records, eval_steps) -> float:
    """Median training images/s over the clean log intervals of a run (input pipeline included)."""
    clean = clean_intervals(train_records, eval_steps)
    if not clean:
        raise ValueError("No log interval is free of compilation and evaluation: log more often "
                         "(log_every_steps) than you evaluate, over at least two intervals.")
    return statistics.median(record["images_per_second"] for record in clean)


def run_summary(records) -> dict:
    """Final numbers and curves of one run from its metrics.jsonl records."""
    train_records = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    if not train_records or not evals:
        raise ValueError("The run logged no train or no eval record; did it finish?")
    return {
        "images_per_second": steady_images_per_second(train_records, [e["step"] for e in evals]),
        "top1": evals[-1]["top1"], "top5": evals[-1]["top5"], "eval_loss": evals[-1]["loss"],
        "train_loss": train_records[-1]["loss"], "steps": train_records[-1]["step"],
        "eval_count": int(evals[-1]["count"]),
        "loss_curve": [[r["step"], r["loss"]] for r in train_records],
        "top1_curve": [[e["step"], e["top1"]] for e in evals],
    }


def latest_checkpoint(workdir) -> pathlib.Path:
    """The state item of the last completed checkpoint (orbax names them by step)."""
    steps = [int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").glob("*") if p.name.isdigit()]
    if not steps:
        raise FileNotFoundError(f"No checkpoint in {workdir}/checkpoints.")
    return pathlib.Path(workdir) / "checkpoints" / str(max(steps)) / "state"


def trained_variables(workdir, use_ema: bool) -> dict:
    """The weights the run's final evaluation used, on one device whatever mesh saved them."""
    path = latest_checkpoint(workdir)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    handler = ocp.StandardCheckpointHandler()
    try:
        layout = handler.metadata(path)
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), layout)
        saved = handler.restore(path, args=ocp.args.StandardRestore(target))
    finally:
        handler.close()
    params = saved["ema_params"] if use_ema and saved.get("ema_params") is not None else saved["params"]
    return {"params": params, **({"batch_stats": saved["batch_stats"]} if saved["batch_stats"] else {})}


def evaluation_image(data_config, index: int = 0):
    """(image HxWx3 as the eval pipeline makes it, label) of one evaluation example."""
    seen = 0
    for batch in data.eval_iterator(data_config, global_batch_size=100):
        count = int(batch["mask"].sum())
        if index < seen + count:
            return np.asarray(batch["image"][index - seen]), int(batch["label"][index - seen])
        seen += count
    raise IndexError(f"The evaluation split has {seen} examples, not {index + 1}.")


def attention_probabilities(model, variables, image) -> dict:
    """{'block1': (probs, ...), ...}: per stage, one (heads, queries, keys) array per SSA group or
    branch, from the last block of the stage, for one image."""
    def forward(variables, images):
        return model.apply(variables, images, mutable=["intermediates"])[1]["intermediates"]

    sown = jax.jit(forward)(variables, image[None])
    return {name: tuple(np.asarray(probs[-1, 0]) for probs in sown[name]["attn"]["attention_probs"])
            for name in sorted(sown)}


def key_grid(num_keys: int, query_grid) -> tuple:
    """The (rows, cols) of a reduced key map: the factorisation of `num_keys` closest to the query
    grid's aspect (keys are the reduced map row-major)."""
    rows, cols = query_grid
    shapes = [(h, num_keys // h) for h in range(1, num_keys + 1) if num_keys % h == 0]
    return min(shapes, key=lambda shape: abs(math.log(shape[0] / shape[1]) - math.log(rows / cols)))


def attention_rows(probabilities: dict, stage_grids) -> list:
    """One row per stage: (title, query grid, [(title, key map)] for each group and head, as the
    centre query sees them); at most MAPS_PER_STAGE maps a row."""
    rows = []
    for (block, groups), grid in zip(probabilities.items(), stage_grids):
        centre = (grid[0] // 2) * grid[1] + grid[1] // 2
        maps = []
        for g, probs in enumerate(groups, start=1):
            keys = key_grid(probs.shape[-1], grid)
            group = f"group {g}, " if len(groups) > 1 else ""
            maps += [(f"{group}{keys[0]}x{keys[1]} keys, head {head + 1}", probs[head, centre].reshape(keys))
                     for head in range(len(probs))]
        rows.append((f"stage {block[len('block'):]}: {grid[0]}x{grid[1]} queries", grid, maps[:MAPS_PER_STAGE]))
    return rows


def displayable(image) -> np.ndarray:
    """A normalised HxWx3 image as grey levels in [0, 1]."""
    grey = image.mean(axis=-1)
    return (grey - grey.min()) / max(float(np.ptp(grey)), 1e-6)


def plot_attention(label: str, image, image_label: int, rows) -> Figure:
    """Per stage, the image and each group's heads: where the centre query (+) looks."""
    columns = 1 + max(len(maps) for _, _, maps in rows)
    figure = Figure(figsize=(max(1.9 * columns, 6.0), 2.0 * len(rows) + 0.6), layout="constrained")
    axes = figure.subplots(len(rows), columns, squeeze=False)
    grey = displayable(image)
    height, width = grey.shape
    extent = (0, width, height, 0)
    for axes_row, (title, grid, maps) in zip(axes, rows):
        query_xy = ((grid[1] // 2 + 0.5) * width / grid[1], (grid[0] // 2 + 0.5) * height / grid[0])
        for axis, (map_title, key_map) in zip(axes_row, [(title, None), *maps]):
            axis.imshow(grey, cmap="gray", extent=extent)
            if key_map is not None:
                axis.imshow(key_map, cmap="magma", alpha=0.6, vmin=0, extent=extent, interpolation="nearest")
            axis.plot(*query_xy, marker="+", color="cyan", markersize=9, markeredgewidth=2)
            axis.set_title(map_title, fontsize=7)
        for axis in axes_row:
            axis.set_axis_off()
    figure.suptitle(f"{label}: where the centre query (+) looks, last block of each stage\n"
                    f"test image of class {image_label}; colour from 0 to each map's largest weight", fontsize=9)
    return figure


def variant_colours(labels) -> dict:
    """One colour per variant, the same in every plot."""
    return {label: f"C{i % 10}" for i, label in enumerate(labels)}


def plot_curves(results) -> Figure:
    """Training loss and evaluation top-1 against steps, one line per variant."""
    figure = Figure(figsize=(11, 4), layout="constrained")
    loss_axis, top1_axis = figure.subplots(1, 2)
    colours = variant_colours([r["label"] for r in results])
    for result in results:
        for axis, curve in ((loss_axis, result["loss_curve"]), (top1_axis, result["top1_curve"])):
            steps, values = zip(*curve)
            axis.plot(steps, values, marker="o", markersize=3, label=result["label"], color=colours[result["label"]])
    loss_axis.set(xlabel="step", ylabel="training loss (mean over the log interval)", title="Training loss")
    top1_axis.set(xlabel="step", ylabel="top-1", title="Evaluation top-1")
    top1_axis.legend(fontsize=8)
    return figure


def plot_cost(results) -> Figure:
    """Measured training throughput, multiply-adds and parameters, one bar per variant."""
    figure = Figure(figsize=(12, 0.45 * len(results) + 1.5), layout="constrained")
    labels = [r["label"] for r in results]
    colours = list(variant_colours(labels).values())
    panels = (("images_per_second", 1, "%.0f", "train images/s (steady state, measured)"),
              ("macs", 1e6, "%.2f", "MMACs per image (inference)"),
              ("params", 1e6, "%.3f", "parameters (M)"))
    for axis, (key, unit, fmt, title) in zip(figure.subplots(1, len(panels), sharey=True), panels):
        bars = axis.barh(labels, [r[key] / unit for r in results], color=colours)
        axis.bar_label(bars, fmt=fmt, fontsize=8)
        axis.set_title(title, fontsize=10)
        axis.invert_yaxis()
    return figure


def save_figure(figure: Figure, path) -> pathlib.Path:
    """Renders with Agg (no display, no pyplot state) into a PNG file."""
    FigureCanvasAgg(figure).print_png(str(path))
    return pathlib.Path(path)


TABLE_COLUMNS = ("variant", "params", "MMACs", "train img/s", "eval top-1 %", "train loss", "eval loss")


def results_table(results) -> str:
    """The comparison as a markdown table, one row per variant."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "|".join(["---"] + ["---:"] * 6) + "|"]
    for r in results:
        cells = (r["label"], f"{r['params']:,}", f"{r['macs'] / 1e6:.2f}", f"{r['images_per_second']:.1f}",
                 f"{100 * r['top1']:.2f}", f"{r['train_loss']:.4f}", f"{r['eval_loss']:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def variants_markdown(variants) -> str:
    """What each variant is, as a markdown table: its config file, its overrides, what it shows."""
    lines = ["| variant | config | overrides | what it is |", "|---|---|---|---|"]
    for v in variants:
        overrides = ", ".join(f"`{key}={value}`" for key, value in v.overrides.items())
        cells = (v.label, f"`{v.config}`", overrides, v.description)
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)


def describe_budget(config, eval_count: int) -> str:
    """One line on what every variant got, and where it ran."""
    device = jax.devices()[0]
    duration = (f"{config.num_train_steps} steps" if config.num_train_steps >= 0
                else f"{config.num_epochs:g} epochs")
    return (f"{duration} of {config.global_batch_size} images at {config.data.image_size}x{config.data.image_size} "
            f"from {config.data.name} ({config.data.train_split}), evaluated on {eval_count:,} images "
            f"({config.data.eval_split or 'the evaluation split'}); {jax.device_count()} {device.platform} "
            f"device(s) ({device.device_kind}). Train img/s: median over the log intervals without "
            "compilation or evaluation, input pipeline included. MACs: inference forward, per image.")


def results_markdown(setting: str, budget_line: str, results) -> str:
    return f"Setting `{setting}`: {budget_line}\n\n{results_table(results)}\n"


@dataclasses.dataclass(frozen=True)
class Planned:
    """A variant ready to train: its config, its model and what the model costs."""
    variant: Variant
    config: object
    model: object
    cost: dict


def plan(variants, budget: dict, extra_overrides=None) -> list:
    """Configs, models and costs of every variant, so that a bad variant fails before any training."""
    planned = []
    for variant in variants:
        config = variant_config(variant, budget, extra_overrides)
        model = build_model(config)
        planned.append(Planned(variant, config, model, model_cost(model, config.data.image_size)))
    return planned


def run_variant(planned: Planned, workdir, image_index: int = 0) -> dict:
    """Trains one variant (resuming from `workdir` like train.py) and measures it; returns its record
    with its attention figure."""
    variant, config, model = planned.variant, planned.config, planned.model
    train.train_and_evaluate(config, workdir)
    result = {"label": variant.label, "config": variant.config, "description": variant.description,
              "overrides": dict(variant.overrides), "workdir": str(workdir), **planned.cost,
              **run_summary(metrics.read_metrics(pathlib.Path(workdir) / "metrics.jsonl"))}
    image, image_label = evaluation_image(config.data, image_index)
    probabilities = attention_probabilities(model, trained_variables(workdir, config.ema_decay > 0), image)
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", default="small", help="a setting of the ablations file: small, demo, full")
    parser.add_argument("--out", required=True, help="folder for the runs, the table and the plots")
    parser.add_argument("--variants", default="", help="comma-separated labels (default: all)")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="config overrides for every variant, e.g. num_train_steps=500")
    parser.add_argument("--ablations", default=ABLATIONS_FILE, help="the file of settings and variants")
    parser.add_argument("--image-index", type=int, default=0, help="which test image the attention maps show")
    args = parser.parse_args(argv)
    labels = [label.strip() for label in args.variants.split(",") if label.strip()]
    outcome = run_ablation(args.setting, args.out, labels, summary.parse_overrides(args.set), args.ablations,
                           args.image_index)
    print(outcome["markdown"])
    print("wrote " + ", ".join(str(path) for path in outcome["paths"].values()))


if __name__ == "__main__":
    main()
