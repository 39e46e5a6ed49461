"""The ablation's figures, drawn with matplotlib's Agg backend (no display, no pyplot state)."""
import pathlib

import numpy as np

try:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
except ImportError as error:
    raise ImportError("shunted_jax.tools.ablate draws with matplotlib: pip install -e '.[notebook]'") from error


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
