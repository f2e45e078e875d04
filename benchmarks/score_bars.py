# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Grouped bar charts of scores over seeds (one group per method, one bar per region or summary), as PNG."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from benchmarks.learning_curve import mean_std, save_png

__all__ = ["plot_score_bars"]


def _finite(values: Sequence[float]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def plot_score_bars(
    path: str | os.PathLike,
    groups: Mapping[str, Mapping[str, Sequence[float]]],
    ylabel: str = "DSC (%)",
    title: str | None = None,
    references: Mapping[str, float] | None = None,
    dpi: int = 120,
) -> Path:
    """
    Plot one group of bars per method (x axis) with one bar per series (e.g. every region, then their mean): the bar
    is the mean over seeds, its error bar the population standard deviation over seeds (:func:`mean_std`). A series a
    method has no finite value for (e.g. a region it was not scored on) gets no bar; a series named ``"mean"`` is drawn
    hatched. Written as a PNG (atomically).

    Args:
        path: the PNG to write (parents created).
        groups: ``{method: {series: [value per seed, ...]}}``; methods left to right and series (legend) in
            first-seen order.
        ylabel: y-axis label. Defaults to ``"DSC (%)"``.
        title: figure title. Defaults to None (none).
        references: ``{label: value}`` drawn as dashed horizontal lines (e.g. the teacher's mean score). Defaults to
            None (none).
        dpi: resolution. Defaults to 120.

    Returns:
        ``path``.

    Raises:
        ValueError: when there is no group, or no finite value at all.

    Example::

        plot_score_bars("benchmarks/ablation.png", {"LoRKD": {"brain": [70.1, 71.3], "mean": [65.0, 66.2]},
                                                    "MTL": {"brain": [61.0, 60.2], "mean": [58.4, 57.9]}})
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not groups:
        raise ValueError("plot_score_bars needs at least one group.")
    series = list(dict.fromkeys(s for by_series in groups.values() for s in by_series))
    if not any(_finite(v) for by_series in groups.values() for v in by_series.values()):
        raise ValueError(f"plot_score_bars: no finite value in any of the groups {list(groups)}.")
    fig = Figure(figsize=(max(6.4, 1.1 * len(groups) + 3.0), 4.6), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(series)
    for j, name in enumerate(series):
        xs, means, stds = [], [], []
        for i, by_series in enumerate(groups.values()):
            values = _finite(by_series.get(name, ()))
            if values:
                xs.append(i + (j - (len(series) - 1) / 2) * width)
                mean, std = mean_std(values)
                means.append(mean)
                stds.append(std)
        ax.bar(xs, means, width=width, yerr=stds, capsize=2, label=name, error_kw={"linewidth": 0.8},
               hatch="//" if name == "mean" else None, edgecolor="black" if name == "mean" else None)
    for k, (label, value) in enumerate((references or {}).items()):
        ax.axhline(value, linestyle="--", linewidth=1.0, color=f"C{(len(series) + k) % 10}", label=label)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(list(groups), rotation=30, ha="right", fontsize="small")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_png(fig, path)
