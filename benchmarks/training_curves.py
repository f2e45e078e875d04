# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Validation curves of bundle training runs: per-epoch scalars read back from the TensorBoard event files that the
bundles' ``TensorBoardStatsHandler`` writes into a run's ``output_dir``, and a PNG with one panel per task."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from benchmarks.learning_curve import save_png

__all__ = ["read_scalar", "plot_training_curves"]


def read_scalar(log_dir: str | os.PathLike, tag: str) -> list[tuple[int, float]]:
    """
    The ``(step, value)`` points of one scalar ``tag`` over every event file in ``log_dir`` (a resumed run writes a
    new file: the files are read oldest first and a later file's value replaces an earlier one at the same step),
    sorted by step. Empty when no file holds the tag.

    Raises:
        FileNotFoundError: when ``log_dir`` holds no TensorBoard event file.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(Path(log_dir).glob("events.out.tfevents.*"), key=os.path.getmtime)
    if not files:
        raise FileNotFoundError(f"{log_dir}: no TensorBoard event file (events.out.tfevents.*); was it a run's output_dir?")
    points: dict[int, float] = {}
    for f in files:
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})  # 0: keep every point
        acc.Reload()
        if tag in acc.Tags().get("scalars", []):
            points.update({int(e.step): float(e.value) for e in acc.Scalars(tag)})
    return sorted(points.items())


def plot_training_curves(
    path: str | os.PathLike,
    panels: Mapping[str, Mapping[str, Sequence[Sequence[float]]]],
    ylabel: str = "validation AUC",
    xlabel: str = "epoch",
    dpi: int = 110,
) -> Path:
    """
    One panel per key of ``panels`` (side by side), one line per run: ``{panel: {label: [(epoch, value), ...]}}``;
    the run's best point is marked; lines 11-20 repeat the colours dashed, 21-30 dotted. Non-finite values are left
    out. Written as a PNG (atomically).

    Raises:
        ValueError: when there is no panel or a panel has no finite point.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not panels:
        raise ValueError("plot_training_curves needs at least one panel.")
    fig = Figure(figsize=(5.2 * len(panels), 4.2), dpi=dpi)
    FigureCanvasAgg(fig)
    for i, (title, lines) in enumerate(panels.items()):
        ax = fig.add_subplot(1, len(panels), i + 1)
        drawn = 0
        for j, (label, pts) in enumerate(lines.items()):
            xy = [(float(x), float(y)) for x, y in pts if math.isfinite(float(y))]
            if not xy:
                continue
            style = ("-", "--", ":")[j // 10 % 3]  # the 11th line on: the colours again, another line style
            ax.plot([x for x, _ in xy], [y for _, y in xy], linewidth=1.3, color=f"C{j % 10}", linestyle=style, label=label)
            bx, by = max(xy, key=lambda p: p[1])
            ax.plot([bx], [by], marker="o", markersize=4, color=f"C{j % 10}")
            drawn += 1
        if not drawn:
            raise ValueError(f"panel '{title}' has no finite point.")
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right", fontsize="x-small")
    return save_png(fig, path)
