# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Per-class Dice and normalised surface Dice (NSD, tolerance in mm) of one sample, LoRKD empty-GT convention."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.metrics import compute_dice, compute_surface_dice

__all__ = ["binary_dice_nsd"]


def _thresholds(tolerance_mm: float | Sequence[float], n_class: int) -> list[float]:
    if isinstance(tolerance_mm, (int, float)):
        values = [float(tolerance_mm)] * n_class
    else:
        values = [float(t) for t in tolerance_mm]
    if len(values) != n_class:
        raise ValueError(f"tolerance_mm has {len(values)} entries but there are {n_class} classes.")
    if any(not math.isfinite(t) or t < 0 for t in values):
        raise ValueError(f"tolerance_mm values must be finite and >= 0, got {values}.")
    return values


def binary_dice_nsd(
    pred: torch.Tensor,
    gt: torch.Tensor,
    spacing: Sequence[float] | np.ndarray | torch.Tensor | None = None,
    tolerance_mm: float | Sequence[float] = 1.0,
    surface: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Dice (DSC) and normalised surface Dice (NSD) of every class of one sample, with MONAI's
    :py:func:`monai.metrics.compute_dice` and :py:func:`monai.metrics.compute_surface_dice` (boundary voxels,
    Euclidean distances in the units of ``spacing``).

    Empty ground truth follows the LoRKD reference evaluation: a class whose ground truth is empty scores 1 if the
    prediction is empty as well, else 0, for both DSC and NSD (where MONAI would give NaN or 0).

    Args:
        pred: (C, *spatial) binary prediction (bool, or numbers where non-zero is foreground), 2D or 3D.
        gt: (C, *spatial) binary ground truth, same shape.
        spacing: voxel size along each spatial axis (mm), e.g. ``(1.5, 1.5, 3.0)``; ``None`` means 1 (voxel
            units). Defaults to ``None``.
        tolerance_mm: NSD tolerance in the units of ``spacing``: one value for all classes or one per class.
            Defaults to 1.0.
        surface: compute the NSD; False skips the surface distances (most of the cost on CPU) and returns NaN NSD
            for every class. Defaults to True.

    Returns:
        ``(dsc, nsd)``, two float32 tensors of shape (C,) on the device of ``pred``.

    Raises:
        ValueError: on shape mismatch, non-2D/3D input, a wrong ``spacing`` length, or invalid tolerances.

    Example::

        dsc, nsd = binary_dice_nsd(pred_mask, gt_mask, spacing=(0.8, 0.8, 2.5), tolerance_mm=1.0)
    """
    if not isinstance(pred, torch.Tensor) or not isinstance(gt, torch.Tensor):
        raise ValueError("pred and gt must be torch tensors.")
    if pred.shape != gt.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} and gt shape {tuple(gt.shape)} differ.")
    if pred.ndim not in (3, 4):
        raise ValueError(f"pred and gt must be (C, H, W) or (C, H, W, D), got {tuple(pred.shape)}.")
    n_class, spatial_dims = pred.shape[0], pred.ndim - 1
    thresholds = _thresholds(tolerance_mm, n_class)
    spacing_list: list[float] | None = None
    if spacing is not None:
        spacing_list = [float(s) for s in torch.as_tensor(spacing).flatten().tolist()]
        if len(spacing_list) != spatial_dims:
            raise ValueError(f"spacing has {len(spacing_list)} values, expected {spatial_dims} for {pred.ndim - 1}D.")
    pred_b = pred.as_tensor() if isinstance(pred, MetaTensor) else pred
    gt_b = gt.as_tensor() if isinstance(gt, MetaTensor) else gt
    pred_b, gt_b = pred_b != 0, gt_b.to(pred_b.device) != 0
    pred_any, gt_any = pred_b.flatten(1).any(dim=1), gt_b.flatten(1).any(dim=1)

    # empty ground truth: 1 if the prediction is empty too, else 0; one-sided empties give 0 for NSD as well
    empty_score = (pred_any == gt_any).float()
    dsc = compute_dice(pred_b[None].float(), gt_b[None].float(), include_background=True, ignore_empty=False)[0]
    dsc = torch.where(gt_any, dsc.float(), empty_score)
    if not surface:
        return dsc, torch.full_like(empty_score, math.nan)
    nsd = empty_score.clone()
    both = (pred_any & gt_any).nonzero().flatten()
    if both.numel() > 0:
        with warnings.catch_warnings():  # MONAI 1.5-1.6 warn from their own get_mask_edges call, on every case
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
            values = compute_surface_dice(
                pred_b[both][None].float(),
                gt_b[both][None].float(),
                class_thresholds=[thresholds[i] for i in both.tolist()],
                include_background=True,
                spacing=spacing_list,
            )[0]
        nsd[both] = values.to(nsd.device, nsd.dtype)
    return dsc, nsd
