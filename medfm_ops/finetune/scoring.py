# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Per-class DSC and NSD of written label maps against the site's label files, in the images' own space."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import nibabel as nib
import numpy as np
import torch

from medfm_ops.metrics.dice_nsd import binary_dice_nsd

__all__ = ["score_label_maps"]


def _one_hot(labels: np.ndarray, n: int) -> torch.Tensor:
    values = torch.as_tensor(np.asarray(labels).astype(np.int64))
    return torch.stack([values == k for k in range(1, n + 1)])


def score_label_maps(
    predictions: Sequence[str | os.PathLike],
    labels: Sequence[str | os.PathLike],
    class_names: Sequence[str],
    tolerance_mm: float = 1.0,
) -> dict[str, Any]:
    """
    Score label maps (values 0..n) against reference label files on the same voxel grid, per class: DSC and NSD
    (tolerance in mm, spacing from the reference file's header), with the LoRKD empty-reference convention of
    :py:func:`~medfm_ops.metrics.dice_nsd.binary_dice_nsd`.

    Args:
        predictions: predicted label maps, one per case (e.g. from a bundle's ``inference.json``).
        labels: reference label maps, same order.
        class_names: names of labels 1..n.
        tolerance_mm: NSD tolerance in mm. Defaults to 1.0.

    Returns:
        ``{"table": [{"class", "n", "dsc_mean", "dsc_std", "nsd_mean", "nsd_std"}], "mean_dsc", "mean_nsd",
        "cases": [{"label", "dsc": [...], "nsd": [...]}]}``; means over cases, then over classes.

    Raises:
        ValueError: when the lists differ in length, or a prediction's grid differs from its reference's (the
            message names both files).
    """
    if len(predictions) != len(labels) or not labels:
        raise ValueError(f"need one prediction per label file, got {len(predictions)} and {len(labels)}.")
    n = len(class_names)
    dsc_rows, nsd_rows, cases = [], [], []
    for pred_path, label_path in zip(predictions, labels):
        ref = nib.load(str(label_path))
        pred = nib.load(str(pred_path))
        if pred.shape[:3] != ref.shape[:3] or not np.allclose(pred.affine, ref.affine, atol=1e-4):
            raise ValueError(
                f"prediction {pred_path} (shape {pred.shape}, affine {pred.affine.round(3).tolist()}) is not on the "
                f"grid of {label_path} (shape {ref.shape}, affine {ref.affine.round(3).tolist()})."
            )
        spacing = [float(z) for z in ref.header.get_zooms()[:3]]
        pred_arr = np.asarray(pred.dataobj).reshape(pred.shape[:3])
        ref_arr = np.asarray(ref.dataobj).reshape(ref.shape[:3])
        dsc, nsd = binary_dice_nsd(_one_hot(pred_arr, n), _one_hot(ref_arr, n), spacing, tolerance_mm)
        dsc_rows.append(dsc.double())
        nsd_rows.append(nsd.double())
        cases.append({"label": str(label_path), "dsc": dsc.tolist(), "nsd": nsd.tolist()})
    dsc_all, nsd_all = torch.stack(dsc_rows), torch.stack(nsd_rows)
    std = (lambda x: x.std(dim=0, unbiased=False)) if len(cases) > 1 else (lambda x: torch.zeros(x.shape[1]))
    table = [
        {"class": name, "n": len(cases), "dsc_mean": float(dsc_all[:, i].mean()), "dsc_std": float(std(dsc_all)[i]),
         "nsd_mean": float(nsd_all[:, i].mean()), "nsd_std": float(std(nsd_all)[i])}
        for i, name in enumerate(class_names)
    ]  # fmt: skip
    return {
        "table": table,
        "mean_dsc": float(dsc_all.mean()),
        "mean_nsd": float(nsd_all.mean()),
        "cases": cases,
    }
