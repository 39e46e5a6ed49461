"""A run's numbers from its metrics.jsonl, and the comparison as markdown."""
import statistics

import jax

# The evaluator whose results the comparison reports and whose split the attention image comes from.
EVALUATOR = "val"


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
    evals = [r for r in records if r["kind"] == EVALUATOR]
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
            f"({config.evals[EVALUATOR].split or 'the evaluation split'}); {jax.device_count()} {device.platform} "
            f"device(s) ({device.device_kind}). Train img/s: median over the log intervals without "
            "compilation or evaluation, input pipeline included. MACs: inference forward, per image.")


def results_markdown(setting: str, budget_line: str, results) -> str:
    return f"Setting `{setting}`: {budget_line}\n\n{results_table(results)}\n"
