# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Adapter between MONAI's ``loss_function(pred, targets)`` call and the LoRKD segmentation loss."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from medfm_ops.losses import LoRKDSegLoss

__all__ = ["LoRKDLossAdapter", "NonFiniteLossError"]


class NonFiniteLossError(FloatingPointError):
    """Raised when a training loss is NaN/Inf; the message names the cases of the batch."""


class LoRKDLossAdapter(nn.Module):
    """
    ``forward(pred, targets)`` for :class:`monai.engines.SupervisedTrainer` with targets from
    :class:`~medfm_ops.engines.RegionPrepareBatch` (``targets_as_dict=True``).

    Computes :class:`~medfm_ops.losses.LoRKDSegLoss` (task loss on the sample's region channels + beta * KL to the
    teacher logits when present) and stops with :class:`NonFiniteLossError` naming the batch's files when the loss is
    not finite. After each call ``last_components`` (floats) and ``last_per_sample_task`` / ``last_regions`` ((B,)
    tensors) are available to handlers (logging, LoRKD* loss-drop tracking).

    Args:
        loss: the LoRKD loss. Defaults to ``LoRKDSegLoss()`` (beta = 0.1).
    """

    def __init__(self, loss: LoRKDSegLoss | None = None) -> None:
        super().__init__()
        self.loss = loss if loss is not None else LoRKDSegLoss()
        self.last_regions: torch.Tensor | None = None

    @property
    def last_components(self) -> dict[str, float]:
        return self.loss.last_components

    @property
    def last_per_sample_task(self) -> torch.Tensor | None:
        return self.loss.last_per_sample_task

    def forward(self, pred: torch.Tensor, targets: dict[str, Any]) -> torch.Tensor:
        """
        Args:
            pred: (B, C, *spatial) student logits.
            targets: dict with ``label`` (B, C, *spatial), ``channel_mask`` (B, C), ``region`` (B,), optional
                ``teacher_logits`` (B, C, *spatial) and ``filenames``.
        """
        if not isinstance(targets, dict):
            raise TypeError("LoRKDLossAdapter expects dict targets: use RegionPrepareBatch(targets_as_dict=True).")
        value = self.loss(pred, targets["label"], targets["channel_mask"], teacher_logits=targets.get("teacher_logits"))
        self.last_regions = targets["region"].detach()
        if not math.isfinite(float(value.detach())):
            raise NonFiniteLossError(
                f"training loss is {float(value.detach())} (components {self.last_components}) for the batch "
                f"{targets.get('filenames', [])} (regions {self.last_regions.tolist()}): check these images for "
                "NaN/Inf intensities, lower the learning rate, or disable AMP."
            )
        return value
