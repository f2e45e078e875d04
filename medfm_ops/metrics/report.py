# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Writing metric tables (CSV + markdown, atomically) and aggregating per-class rows by region."""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from medfm_ops.utils.atomic_io import atomic_write_text

__all__ = ["format_markdown", "region_summary", "write_table"]


def _columns(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None) -> list[str]:
    if columns is not None:
        return list(columns)
    if not rows:
        raise ValueError("rows is empty and no columns were given: cannot infer the table header.")
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)


def _md_cell(value: Any, float_format: str) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else format(value, float_format)
    return "" if value is None else str(value).replace("|", "\\|").replace("\n", " ")


def format_markdown(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, float_format: str = ".4f"
) -> str:
    """
    Render rows as a markdown table with padded, aligned columns (numeric columns right-aligned).

    Args:
        rows: one mapping per table row.
        columns: column order; ``None`` uses the keys in first-seen order. Defaults to ``None``.
        float_format: format spec for floats. Defaults to ``".4f"`` (4 decimals).

    Returns:
        the table text, ending with a newline.

    Raises:
        ValueError: when ``rows`` is empty and ``columns`` is ``None``.
    """
    cols = _columns(rows, columns)
    cells = [[_md_cell(row.get(c), float_format) for c in cols] for row in rows]
    numeric = [
        bool(rows) and all(isinstance(row.get(c), (int, float)) and not isinstance(row.get(c), bool) for row in rows)
        for c in cols
    ]
    widths = [max([len(c), 3] + [len(r[i]) for r in cells]) for i, c in enumerate(cols)]

    def line(values: Sequence[str]) -> str:
        padded = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "| " + " | ".join(padded) + " |"

    rule = "| " + " | ".join(("-" * (w - 1) + ":") if num else "-" * w for w, num in zip(widths, numeric)) + " |"
    return "\n".join([line(cols), rule] + [line(r) for r in cells]) + "\n"


def write_table(
    rows: Sequence[Mapping[str, Any]],
    csv_path: str | os.PathLike,
    md_path: str | os.PathLike | None = None,
    columns: Sequence[str] | None = None,
) -> None:
    """
    Write rows to a CSV file (full precision) and optionally a markdown file (floats to 4 decimals).

    Each file is written to a temporary file in the destination directory and moved into place with
    ``os.replace``, so readers never see a partial table and no temporary file is left behind.

    Args:
        rows: one mapping per table row, e.g. :py:meth:`RegionSegMetrics.table`.
        csv_path: destination CSV path; parent directories are created.
        md_path: optional destination markdown path. Defaults to ``None``.
        columns: column order; ``None`` uses the keys in first-seen order. Defaults to ``None``.

    Raises:
        ValueError: when ``rows`` is empty and ``columns`` is ``None``.
    """
    cols = _columns(rows, columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(csv_path, buffer.getvalue())
    if md_path is not None:
        atomic_write_text(md_path, format_markdown(rows, cols))


def region_summary(
    rows: Sequence[Mapping[str, Any]],
    value_keys: Sequence[str] = ("dsc_mean", "nsd_mean"),
    overall: str | None = "mean",
) -> list[dict[str, Any]]:
    """
    Aggregate per-class rows into per-region rows: each value is the unweighted mean over the region's classes.

    Args:
        rows: per-class rows with a ``"region"`` key and the ``value_keys`` (e.g. :py:meth:`RegionSegMetrics.table`).
        value_keys: keys to average. Defaults to ``("dsc_mean", "nsd_mean")``.
        overall: if not ``None``, append a row with this ``region`` name holding the unweighted mean over the
            regions of the region means. Defaults to ``"mean"``.

    Returns:
        list of ``{"region", "n_classes", *value_keys}`` dicts, regions in first-seen order.

    Raises:
        KeyError: when a row lacks ``"region"`` or one of ``value_keys``.
    """
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["region"], []).append(row)
    out: list[dict[str, Any]] = []
    for region, members in groups.items():
        entry: dict[str, Any] = {"region": region, "n_classes": len(members)}
        for key in value_keys:
            entry[key] = sum(float(m[key]) for m in members) / len(members)
        out.append(entry)
    if overall is not None and out:
        total: dict[str, Any] = {"region": overall, "n_classes": sum(e["n_classes"] for e in out)}
        for key in value_keys:
            total[key] = sum(e[key] for e in out) / len(out)
        out.append(total)
    return out
