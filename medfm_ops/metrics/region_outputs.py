# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""From a MONAI engine's output to the input of :class:`~medfm_ops.metrics.RegionSegMetrics`: per-sample
predictions, labels, region ids and spacings (mm, from each MetaTensor's affine)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing

__all__ = ["region_metric_output_transform", "merge_batch", "as_samples"]


def _spacing_from(item: Any, spatial_dims: int, batched: bool) -> list[list[float]] | None:
    """Per-sample spacing from a MetaTensor's affine (kept up to date by MONAI's spatial transforms)."""
    if not isinstance(item, MetaTensor):
        return None
    affine = item.affine
    affines = [affine] if affine.ndim == 2 else list(affine)
    if batched and len(affines) == 1:
        affines = affines * item.shape[0]
    return [affine_to_spacing(a, r=spatial_dims).tolist() for a in affines]


def region_metric_output_transform(
    output: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    pred_key: str = "pred",
    label_key: str = "label",
    region_key: str = "region",
    image_key: str = "image",
    spacing_key: str = "spacing",
    mask_key: str = "channel_mask",
) -> dict[str, Any]:
    """
    Build the input of :py:class:`RegionSegMetrics` from a MONAI engine's (batch-merged) output.

    MONAI 1.6's ``SupervisedEvaluator`` sets ``engine.state.output`` to ``{"image", "label", "pred"}`` only: a list
    of per-sample dicts with ``decollate=True`` (the default), one batched dict with ``decollate=False``. Other
    batch keys (the region/task id) stay in ``engine.state.batch``; :py:class:`RegionSegMetrics` merges them in
    before calling this transform (``merge_batch=True``).

    The spacing is read, in this order, from a ``spacing_key`` entry, else from the affine of the ``label``,
    ``pred`` or ``image`` MetaTensor (MONAI spatial transforms update the affine). A MetaTensor created without an
    affine has the identity affine, i.e. spacing 1.

    Args:
        output: per-sample dicts (each ``pred``/``label`` of shape (C, *spatial)), or one dict with batched
            (B, C, *spatial) ``pred``/``label`` and (B,) region ids.
        pred_key: key of the logits. Defaults to ``"pred"``.
        label_key: key of the binary labels. Defaults to ``"label"``.
        region_key: key of the region (task) id. Defaults to ``"region"``.
        image_key: key of the image, used as a last spacing source. Defaults to ``"image"``.
        spacing_key: key of an explicit spacing, (spatial_dims,) per sample or (B, spatial_dims). Defaults to
            ``"spacing"``.
        mask_key: key of the per-case (C,) / (B, C) bool mask of the annotated channels (partial labels, written by
            :py:class:`~medfm_ops.data.RegionLabelToChannelsd`); optional. Defaults to ``"channel_mask"``.

    Returns:
        ``{"y_pred", "y", "region", "spacing"}``: ``y_pred``/``y`` a list of (C, *spatial) tensors or batched
        tensors, ``region`` a (B,) long tensor, ``spacing`` a (B, spatial_dims) float64 tensor; plus
        ``"channel_mask"``, a (B, C) bool tensor, when every sample has a ``mask_key`` entry.

    Raises:
        KeyError: when a needed key is missing.
        ValueError: when no spacing source is found.

    Example (bundle config, other key names)::

        "output_transform": {"_target_": "medfm_ops.metrics.region_metric_output_transform",
                             "_mode_": "partial", "region_key": "task_id"}
    """
    samples = [output] if isinstance(output, Mapping) else list(output)
    batched = isinstance(output, Mapping)
    preds, labels, regions, spacings, masks = [], [], [], [], []
    for sample in samples:
        for key in (pred_key, label_key, region_key):
            if key not in sample:
                raise KeyError(f"region_metric_output_transform: key '{key}' not in output keys {list(sample)}.")
        pred, label = sample[pred_key], sample[label_key]
        spatial_dims = pred.ndim - (2 if batched else 1)
        n = pred.shape[0] if batched else 1
        spacing = None
        if sample.get(spacing_key) is not None:
            spacing = torch.as_tensor(sample[spacing_key], dtype=torch.float64).reshape(n, -1).tolist()
        for item in (label, pred, sample.get(image_key)):
            spacing = spacing or _spacing_from(item, spatial_dims, batched)
        if spacing is None:
            raise ValueError(
                f"no voxel spacing: give '{spacing_key}' or MetaTensors with an affine under '{label_key}'/"
                f"'{pred_key}'/'{image_key}'."
            )
        preds.append(pred)
        labels.append(label)
        regions.extend(torch.as_tensor(sample[region_key]).reshape(-1).tolist())
        spacings.extend(spacing)
        if sample.get(mask_key) is not None:
            masks.append(torch.as_tensor(sample[mask_key]).reshape(n, -1).bool().cpu())
    out = {
        "y_pred": preds[0] if batched else preds,
        "y": labels[0] if batched else labels,
        "region": torch.as_tensor(regions, dtype=torch.long),
        "spacing": torch.as_tensor(spacings, dtype=torch.float64),
    }
    if masks and len(masks) == len(samples):
        out["channel_mask"] = torch.cat(masks)
    return out


def merge_batch(output: Any, batch: Any) -> Any:
    """Add the keys of ``engine.state.batch`` that ``engine.state.output`` lacks (dicts or equal-length dict lists)."""
    if isinstance(output, Mapping) and isinstance(batch, Mapping):
        return {**batch, **output}
    if (
        isinstance(output, Sequence)
        and isinstance(batch, Sequence)
        and len(output) == len(batch)
        and all(isinstance(o, Mapping) for o in output)
        and all(isinstance(b, Mapping) for b in batch)
    ):
        return [{**b, **o} for o, b in zip(output, batch)]
    return output


def as_samples(x: Any, name: str) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return list(x)
    if isinstance(x, Sequence) and all(isinstance(t, torch.Tensor) for t in x):
        return list(x)
    raise TypeError(f"{name} must be a (B, C, *spatial) tensor or a sequence of (C, *spatial) tensors.")
