"""Report figures as PNGs, drawn with matplotlib's Agg canvas (no pyplot state, no display) and written atomically."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.manifold import TSNE

from clipmed.io import atomic_write

# File names the report looks for in `context["figures"]`.
PER_CLASS_PNG = "per_class.png"
EMBEDDINGS_PNG = "embeddings.png"
DATA_EFFICIENCY_PNG = "data_efficiency.png"


def per_class_figure(models: dict[str, dict], path: str | os.PathLike) -> None:
    """Grouped bars of per-class top-1 accuracy (%) per model (the paper's Figure 2); x labels carry test n.

    `models` maps a model name to its evaluate JSON (`classification_metrics`); all must share the classes.
    Classes without test rows get no bar.
    """
    classes = _shared_classes(models)
    first = next(iter(models.values()))
    width = 0.8 / len(models)
    x = np.arange(len(classes))
    fig = _figure(max(6.0, 0.45 * len(classes) * max(1, len(models)) / 2 + 2), 4.5)
    ax = fig.add_subplot()
    for i, (name, metrics) in enumerate(models.items()):
        values = [metrics["per_class"][c]["top1"] for c in classes]
        heights = [np.nan if v is None else 100 * v for v in values]
        ax.bar(x + (i - (len(models) - 1) / 2) * width, heights, width, label=name)
    rotate = len(classes) > 8
    sep = " " if rotate else "\n"
    ticks = [f"{c}{sep}(n={first['per_class'][c]['n']})" for c in classes]
    ax.set_xticks(x, ticks, rotation=45 if rotate else 0, ha="right" if rotate else "center")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Per-class top-1 accuracy on the test split")
    ax.legend()
    _save(fig, path)


def embedding_figure(
    embeddings: dict[str, np.ndarray],
    labels: np.ndarray,
    classes: Sequence[str],
    path: str | os.PathLike,
    seed: int = 0,
) -> None:
    """t-SNE of each model's [N, D] test image embeddings (L2-normalised), coloured by class, panels side by side."""
    labels = np.asarray(labels)
    colours = _colours(len(classes))
    fig = _figure(4.5 * len(embeddings) + 1.5, 4.5)
    axes = fig.subplots(1, len(embeddings), squeeze=False)[0]
    for ax, (name, emb) in zip(axes, embeddings.items()):
        points = _tsne(np.asarray(emb, dtype=np.float64), seed)
        for c, class_name in enumerate(classes):
            rows = labels == c
            if rows.any():
                ax.scatter(points[rows, 0], points[rows, 1], s=8, color=colours[c], label=class_name)
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside right center", markerscale=2, fontsize="small")
    _save(fig, path)


def data_efficiency_figure(
    points: dict[str, list[tuple[int, float, float, float]]], path: str | os.PathLike
) -> None:
    """Top-1 (%) with 95% interval error bars against the number of train rows, one line per objective.

    `points[objective]` holds `(n_train, top1, lo, hi)` with fractions in [0, 1]; the x axis is logarithmic
    when the sizes span a factor of 10 or more.
    """
    fig = _figure(6.0, 4.5)
    ax = fig.add_subplot()
    sizes = []
    for objective, rows in points.items():
        n, top1, lo, hi = (np.asarray(v, dtype=np.float64) for v in zip(*sorted(rows)))
        ax.errorbar(n, 100 * top1, yerr=100 * np.stack([top1 - lo, hi - top1]), marker="o", capsize=3, label=objective)
        sizes.extend(n)
    if sizes and max(sizes) >= 10 * min(sizes):
        ax.set_xscale("log")
    ax.set_xlabel("train rows")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("Data efficiency")
    ax.legend()
    _save(fig, path)


def reliability_figure(panels: dict[tuple[str, str], dict], path: str | os.PathLike) -> None:
    """Reliability diagrams: one panel per (dataset, model), rows datasets, columns models. Each panel shows
    accuracy against mean confidence per bin (`calibration.reliability`'s bins) with the diagonal of perfect
    calibration, and the ECE; with a fitted temperature, the calibrated bins too."""
    datasets = list(dict.fromkeys(d for d, _ in panels))
    models = list(dict.fromkeys(m for _, m in panels))
    fig = _figure(2.8 * len(models) + 0.5, 2.6 * len(datasets) + 0.3)
    axes = fig.subplots(len(datasets), len(models), squeeze=False)
    for (dataset, model), calibration in panels.items():
        ax = axes[datasets.index(dataset)][models.index(model)]
        ax.plot([0, 1], [0, 1], color="0.6", linewidth=1, linestyle="--")
        series = [("before", calibration["bins"], "tab:blue")]
        if calibration.get("bins_calibrated"):
            series.append((f"T = {calibration['temperature']:.2f}", calibration["bins_calibrated"], "tab:orange"))
        for label, bins, colour in series:
            used = [b for b in bins if b["n"]]
            ax.plot([b["confidence"] for b in used], [b["accuracy"] for b in used], marker="o", markersize=3,
                    color=colour, label=label)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(f"{dataset} · {model}\nECE {100 * calibration['ece']:.1f}%", fontsize=8)
        ax.tick_params(labelsize=7)
        if len(series) > 1:
            ax.legend(fontsize=6)
    for ax in axes[-1]:
        ax.set_xlabel("confidence", fontsize=8)
    for row in axes:
        row[0].set_ylabel("accuracy", fontsize=8)
    _save(fig, path)


def _tsne(embeddings: np.ndarray, seed: int) -> np.ndarray:
    normed = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    perplexity = max(1.0, min(30.0, (len(normed) - 1) / 3))  # t-SNE needs perplexity < N
    # PCA initialisation divides by the spread of the points: identical embeddings (a collapsed or untrained
    # model) would feed NaNs to sklearn's Barnes-Hut code, which crashes the process instead of raising.
    init = "pca" if normed.std(axis=0).max() > 1e-6 else "random"
    return TSNE(n_components=2, perplexity=perplexity, init=init, random_state=seed).fit_transform(normed)


def _shared_classes(models: dict[str, dict]) -> list[str]:
    if not models:
        raise ValueError("no models to plot")
    classes = [list(m["classes"]) for m in models.values()]
    if any(c != classes[0] for c in classes):
        raise ValueError("models were evaluated on different classes; per-class bars would not line up")
    return classes[0]


def _colours(n: int) -> list[tuple[float, float, float, float]]:
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(min(width, 30.0), height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike) -> None:
    # No "Software" metadata: the same figure gives the same bytes across matplotlib versions' stamps.
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, metadata={"Software": None}))
