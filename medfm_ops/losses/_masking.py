# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Shared checks and (sample, channel) selection for region-masked sigmoid losses."""

from __future__ import annotations

import torch
from monai.data import MetaTensor

__all__ = ["as_plain_tensor", "check_channel_mask", "check_same_shape", "pair_mean", "per_sample_mean"]


def as_plain_tensor(x: torch.Tensor) -> torch.Tensor:
    """Return ``x`` without MONAI metadata (an autograd-preserving view for a MetaTensor).

    Boolean indexing of a batched MetaTensor tries to index its metadata as well; losses only need the values.
    """
    return x.as_tensor() if isinstance(x, MetaTensor) else x


def check_same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    """Check that ``a`` is a (B, C, *spatial) tensor and that ``b`` has exactly the same shape.

    Raises:
        TypeError: when either argument is not a ``torch.Tensor``.
        ValueError: when ``a`` has fewer than 3 dimensions or the shapes differ.
    """
    for name, x in ((name_a, a), (name_b, b)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}.")
    if a.ndim < 3:
        raise ValueError(
            f"{name_a} must have shape (B, C, *spatial) with at least one spatial dim, got {tuple(a.shape)}."
        )
    if a.shape != b.shape:
        raise ValueError(f"{name_b} shape {tuple(b.shape)} must equal {name_a} shape {tuple(a.shape)}.")


def check_channel_mask(channel_mask: torch.Tensor, logits: torch.Tensor, require_each_sample: bool = False) -> None:
    """Validate a (B, C) boolean channel mask against (B, C, *spatial) logits.

    Args:
        channel_mask: boolean tensor of shape (B, C); True marks the channels of each sample's region.
        logits: the (B, C, *spatial) tensor the mask applies to.
        require_each_sample: whether every sample must select at least one channel. Defaults to ``False``
            (only the whole mask must select something).

    Raises:
        TypeError: when ``channel_mask`` is not a boolean tensor.
        ValueError: when its shape is not (B, C), or nothing (or, with ``require_each_sample``, some row) is selected.
    """
    if not isinstance(channel_mask, torch.Tensor) or channel_mask.dtype != torch.bool:
        got = channel_mask.dtype if isinstance(channel_mask, torch.Tensor) else type(channel_mask).__name__
        raise TypeError(f"channel_mask must be a torch.bool tensor of shape (B, C), got {got}.")
    if tuple(channel_mask.shape) != tuple(logits.shape[:2]):
        raise ValueError(
            f"channel_mask shape {tuple(channel_mask.shape)} must be (B, C) = {tuple(logits.shape[:2])} of the logits."
        )
    if not bool(channel_mask.any()):
        raise ValueError("channel_mask selects no (sample, channel) pair: every entry is False.")
    if require_each_sample:
        empty = (~channel_mask.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"channel_mask selects no channel for sample(s) {empty}; a per-sample loss is undefined.")


def pair_mean(values: torch.Tensor) -> torch.Tensor:
    """Reduce (N, *spatial) per-pair voxel values to (N,) by averaging over the voxels."""
    return values.flatten(1).mean(dim=1)


def per_sample_mean(pair_values: torch.Tensor, channel_mask: torch.Tensor) -> torch.Tensor:
    """Average (N,) per-pair values into (B,) per-sample values.

    Args:
        pair_values: values of the N selected pairs, in the row-major order of ``channel_mask.nonzero()``.
        channel_mask: the (B, C) boolean mask that selected the pairs; every row must select at least one channel.

    Returns:
        tensor of shape (B,).
    """
    sample_index = channel_mask.nonzero()[:, 0]
    batch_size = channel_mask.shape[0]
    sums = torch.zeros(batch_size, dtype=pair_values.dtype, device=pair_values.device)
    sums = sums.index_add(0, sample_index, pair_values)
    counts = channel_mask.sum(dim=1).to(pair_values.dtype)
    return sums / counts
