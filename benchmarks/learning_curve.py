# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Learning curves (a score against the number of training cases, one line per method, spread over seeds): the
mean and standard deviation per point, and a PNG plot with error bars (matplotlib, no display needed)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medfm_ops.utils.atomic_io import atomic_write

__all__ = ["mean_std", "compare_over_seeds", "per_seed_words", "plot_learning_curve", "save_png"]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """
    Mean and population standard deviation (``ddof=0``, as ``statistics.pstdev``) of a point's values over seeds.

    Raises:
        ValueError: when ``values`` is empty or holds a non-finite value.
    """
    vals = [float(v) for v in values]
    if not vals or not all(math.isfinite(v) for v in vals):
        raise ValueError(f"mean_std needs at least one finite value, got {list(values)}.")
    mean = sum(vals) / len(vals)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))



def compare_over_seeds(values: Sequence[float], reference: Sequence[float], factor: float = 2.0) -> tuple[float, float, str]:
    """
    Compare a row's scores over seeds with a reference row's: ``(mean difference, larger standard deviation,
    verdict)``, the verdict ``"above"`` / ``"below"`` when the difference exceeds ``factor`` times the larger
    population standard deviation of the two rows, else ``"tie"`` (the rule every medfm result table reads by).

    Raises:
        ValueError: when either row is empty or holds a non-finite value (see :func:`mean_std`).
    """
    (mean, std), (ref_mean, ref_std) = mean_std(values), mean_std(reference)
    diff, spread = mean - ref_mean, max(std, ref_std)
    return diff, spread, "above" if diff > factor * spread else "below" if diff < -factor * spread else "tie"


def per_seed_words(values: Mapping[int, float], reference: Mapping[int, float], scale: float = 1.0,
                   digits: int = 3) -> str | None:
    """
    A description, not a verdict: a row's score minus a reference row's score trained with the same seed, over the
    seeds both have with finite values: ``"above on k of n seeds, mean difference +d (from lo to hi)"``, the
    differences times ``scale`` (e.g. 100 for points of %). None with fewer than two such seeds.
    """
    d = [scale * (values[s] - reference[s]) for s in sorted(values)
         if s in reference and math.isfinite(values[s]) and math.isfinite(reference[s])]  # fmt: skip
    if len(d) < 2:
        return None
    return (f"above on {sum(x > 0 for x in d)} of {len(d)} seeds, mean difference {sum(d) / len(d):+.{digits}f} "
            f"(from {min(d):+.{digits}f} to {max(d):+.{digits}f})")


def plot_learning_curve(
    path: str | os.PathLike,
    curves: Mapping[str, Mapping[int, Sequence[float]]],
    xlabel: str = "training cases (N)",
    ylabel: str = "DSC (%)",
    title: str | None = None,
    x_labels: Mapping[int, str] | None = None,
    dpi: int = 120,
    references: Mapping[str, float] | None = None,
) -> Path:
    """
    Plot one line per curve (mean over seeds at every N, error bars = standard deviation over seeds) and write it
    as a PNG (atomically). The x axis is logarithmic with a tick at every N; lines are shifted slightly sideways so
    that overlapping error bars stay readable.

    Args:
        path: the PNG to write (parents created).
        curves: ``{name: {N: [value per seed, ...]}}``; the names are the legend, in this order.
        xlabel: x-axis label. Defaults to ``"training cases (N)"``.
        ylabel: y-axis label. Defaults to ``"DSC (%)"``.
        title: figure title. Defaults to None (none).
        x_labels: tick label per N (e.g. ``{50: "all (50)"}``). Defaults to the numbers.
        dpi: resolution. Defaults to 120.
        references: ``{name: value}`` drawn as dashed horizontal lines in the legend (e.g. a score before any
            training). Defaults to None (none).

    Returns:
        ``path``.

    Raises:
        ValueError: when there is no curve, a curve has no point, an N is not a positive integer, or a point has no
            finite value (naming the curve and N).

    Example::

        plot_learning_curve("docs/site_curve.png", {"scratch": {5: [61.0, 58.2, 63.1], 10: [70.4, 71.0, 69.9]}})
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not curves:
        raise ValueError("plot_learning_curve needs at least one curve.")
    points: dict[str, list[tuple[int, float, float]]] = {}
    for name, by_n in curves.items():
        if not by_n:
            raise ValueError(f"curve '{name}' has no point.")
        rows = []
        for n, values in sorted(by_n.items()):
            if isinstance(n, bool) or int(n) != n or int(n) < 1:
                raise ValueError(f"curve '{name}': N must be a positive integer, got {n!r}.")
            try:
                rows.append((int(n), *mean_std(values)))
            except ValueError as e:
                raise ValueError(f"curve '{name}', N={n}: {e}") from None
        points[name] = rows
    all_n = sorted({n for rows in points.values() for n, _, _ in rows})
    fig = Figure(figsize=(6.4, 4.4), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    k = len(points)
    for i, (name, rows) in enumerate(points.items()):
        shift = 1.0 + 0.025 * (i - (k - 1) / 2)  # multiplicative: the axis is logarithmic
        ax.errorbar([n * shift for n, _, _ in rows], [m for _, m, _ in rows], yerr=[s for _, _, s in rows],
                    marker="o", markersize=4, capsize=3, linewidth=1.5, label=name)  # fmt: skip
    for j, (name, value) in enumerate((references or {}).items()):
        ax.axhline(float(value), linestyle="--", linewidth=1.0, color=f"C{(k + j) % 10}", label=name)
    ax.set_xscale("log")
    ax.set_xlim(min(all_n) / 1.4, max(all_n) * 1.4)  # the sideways shifts stay small, also for a single N
    ax.set_xticks(all_n)
    ax.set_xticklabels([(x_labels or {}).get(n, str(n)) for n in all_n])
    ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    return save_png(fig, path)


def save_png(fig: Any, path: str | os.PathLike) -> Path:
    """Lay out a matplotlib ``fig`` and write it to ``path`` as a PNG, atomically (parents created)."""
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png")
    return Path(path)
