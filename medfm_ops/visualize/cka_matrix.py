# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Linear-CKA similarity between several models' features on the same inputs (the LoRKD papers' expert matrix)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from medfm_ops.losses.cka import linear_cka
from medfm_ops.visualize.png import colormap, tile_grid, write_png

__all__ = ["cka_matrix", "write_matrix_png"]


def cka_matrix(features: Mapping[str, torch.Tensor | np.ndarray]) -> tuple[list[str], np.ndarray]:
    """
    Pairwise :func:`~medfm_ops.losses.linear_cka` (float64) of feature matrices of the SAME ``N`` inputs.

    Args:
        features: ``{name: (N, D_name)}``; widths may differ (e.g. a foundation and its students' experts).

    Returns:
        ``(names, matrix)`` with ``matrix[i, j] = CKA(features[names[i]], features[names[j]])`` (symmetric, 1 on the
        diagonal for non-constant features).

    Raises:
        ValueError: for fewer than one entry or different numbers of rows (naming them).

    Example::

        names, m = cka_matrix({"expert a": fa, "expert b": fb})  # m.shape == (2, 2), m[0, 0] == 1
    """
    if not features:
        raise ValueError("cka_matrix needs at least one feature matrix.")
    names = list(features)
    mats = {k: torch.as_tensor(np.asarray(v) if not isinstance(v, torch.Tensor) else v).detach().double().flatten(1)
            for k, v in features.items()}  # fmt: skip
    rows = {k: int(v.shape[0]) for k, v in mats.items()}
    if len(set(rows.values())) != 1:
        raise ValueError(f"cka_matrix needs features of the same inputs (same N), got rows {rows}.")
    m = np.eye(len(names))
    for i in range(len(names)):
        for j in range(i, len(names)):
            m[i, j] = m[j, i] = float(linear_cka(mats[names[i]], mats[names[j]]))
    return names, m


def write_matrix_png(path: str | os.PathLike, matrix: np.ndarray, cell: int = 40) -> Path:
    """A ``(K, K)`` matrix of values in ``[0, 1]`` as a PNG heat map (``cell`` pixels per entry; dark blue 0, dark red
    1); the names and numbers belong in the caption."""
    m = np.asarray(matrix, dtype=float)
    if m.ndim != 2:
        raise ValueError(f"write_matrix_png expects a 2D matrix, got shape {m.shape}.")
    rows = [[np.broadcast_to(colormap(v), (cell, cell, 3)).copy() for v in r] for r in m]
    return write_png(path, tile_grid(rows, pad=2))
