"""PNG plots of results a person would rather see than read (curves, metric tables)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers or in CI
import matplotlib.pyplot as plt  # noqa: E402


def plot_curve(
    series: Mapping[str, Sequence[float]],
    path: Path,
    xlabel: str,
    ylabel: str,
    title: str,
) -> Path:
    """Line plot of one or more named series against their index (1-based)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, values in series.items():
        ax.plot(range(1, len(values) + 1), values, label=name)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_metric_bars(
    table: Mapping[str, Mapping[str, float]],
    metrics: Sequence[str],
    path: Path,
    title: str,
    intervals: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
) -> Path:
    """Grouped bar chart: one group per method, one bar per metric; ``intervals[method]
    [metric]`` = (low, high), when given, is drawn as an error bar."""
    methods = list(table)
    fig, ax = plt.subplots(figsize=(1.4 * len(methods) + 2, 3.8))
    width = 0.8 / len(metrics)
    for j, metric in enumerate(metrics):
        xs = [i + (j - (len(metrics) - 1) / 2) * width for i in range(len(methods))]
        values = [table[m][metric] for m in methods]
        yerr = None
        if intervals is not None:
            yerr = [
                [v - intervals[m][metric][0] for m, v in zip(methods, values, strict=True)],
                [intervals[m][metric][1] - v for m, v in zip(methods, values, strict=True)],
            ]
        bars = ax.bar(xs, values, width, label=metric, yerr=yerr, capsize=3)
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xticks(range(len(methods)), methods, rotation=15)
    ax.set(title=title, ylabel="score")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
