# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Dice + BCE over the sigmoid channels of each sample's own region (SAT-style union-of-classes output)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch.nn.modules.loss import _Loss

from medfm_ops.losses._masking import (
    as_plain_tensor,
    check_channel_mask,
    check_same_shape,
    pair_mean,
    per_sample_mean,
)

__all__ = ["MaskedDiceBCELoss"]


class MaskedDiceBCELoss(_Loss):
    """
    Weighted sum of a sigmoid Dice loss and a binary cross entropy (with logits), restricted to the
    (sample, channel) pairs selected by a boolean ``channel_mask``.

    The network predicts one sigmoid channel per class of the union of all regions' classes (no background
    channel). Each sample belongs to one region and only that region's channels enter its loss: for every selected
    pair ``(b, c)`` the Dice loss (MONAI :py:class:`monai.losses.DiceLoss`, computed per pair over the spatial dims)
    and the voxel-averaged BCE are computed, and the loss is

    ``lambda_dice * mean_pairs(dice) + lambda_bce * mean_pairs(bce)``

    where the mean runs over the selected pairs only (pooled over the batch, as SAT's ``segmentation_loss``).
    Channels that are not selected do not enter the computation at all, so their gradients are exactly zero.

    The default Dice is SAT's binary Dice (the segmentation code LoRKD builds on): with ``p = sigmoid(logits)`` and
    ``g`` the label of a pair, ``1 - (2 * sum(p * g) + 1e-7) / (sum(p**2) + sum(g**2) + 1e-7)`` (squared
    denominators, ``smooth = 1e-7`` in numerator and denominator); ``squared_pred=False`` and other smoothing give
    MONAI's usual form ``1 - (2 * sum(p * g) + smooth_nr) / (sum(p) + sum(g) + smooth_dr)``.

    Note that a selected channel whose class is absent from a sample's label contributes a Dice loss close to 1
    unless the prediction is empty too (the usual behaviour of a smoothed soft Dice).

    Example::

        loss_fn = MaskedDiceBCELoss()
        logits = torch.randn(2, 5, 8, 8, 8, requires_grad=True)
        target = torch.zeros(2, 5, 8, 8, 8)
        mask = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)
        loss = loss_fn(logits, target, mask)  # scalar
        per_sample = loss_fn.per_sample_loss(logits, target, mask)  # shape (2,)
    """

    def __init__(
        self,
        lambda_dice: float = 1.0,
        lambda_bce: float = 1.0,
        smooth_nr: float = 1e-7,
        smooth_dr: float = 1e-7,
        squared_pred: bool = True,
    ) -> None:
        """
        Args:
            lambda_dice: weight of the Dice loss; no less than 0. Defaults to 1.0.
            lambda_bce: weight of the binary cross entropy; no less than 0. Defaults to 1.0.
            smooth_nr: constant added to the Dice numerator. Defaults to 1e-7 (SAT).
            smooth_dr: constant added to the Dice denominator. Defaults to 1e-7 (SAT).
            squared_pred: use squared predictions and targets in the Dice denominator. Defaults to ``True`` (SAT).

        Raises:
            ValueError: when ``lambda_dice`` or ``lambda_bce`` is negative, or both are 0.
        """
        super().__init__()
        if lambda_dice < 0.0:
            raise ValueError(f"lambda_dice should be no less than 0.0, got {lambda_dice}.")
        if lambda_bce < 0.0:
            raise ValueError(f"lambda_bce should be no less than 0.0, got {lambda_bce}.")
        if lambda_dice == 0.0 and lambda_bce == 0.0:
            raise ValueError("lambda_dice and lambda_bce are both 0: the loss would be identically 0.")
        self.lambda_dice = float(lambda_dice)
        self.lambda_bce = float(lambda_bce)
        self.dice = DiceLoss(
            include_background=True,
            sigmoid=True,
            squared_pred=squared_pred,
            reduction="none",
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
            batch=False,
        )

    def pair_losses(
        self, logits: torch.Tensor, target: torch.Tensor, channel_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Dice and BCE of every selected (sample, channel) pair.

        Args:
            logits: (B, C, *spatial) raw network outputs (before sigmoid).
            target: (B, C, *spatial) binary float labels (zeros in other regions' channels).
            channel_mask: (B, C) boolean mask of the channels of each sample's region.

        Returns:
            ``(dice, bce)``, two tensors of shape (N,), N = ``channel_mask.sum()``, in the row-major order of
            ``channel_mask.nonzero()``. Half-precision inputs are computed in float32.

        Raises:
            TypeError: when an input is not a tensor or the mask is not boolean.
            ValueError: when shapes disagree or the mask selects nothing.
        """
        check_same_shape("logits", logits, "target", target)
        check_channel_mask(channel_mask, logits)
        logits, target = as_plain_tensor(logits), as_plain_tensor(target)
        selected = logits[channel_mask]  # (N, *spatial)
        if selected.dtype in (torch.float16, torch.bfloat16):
            selected = selected.float()
        selected_target = target[channel_mask].to(selected.dtype)
        # DiceLoss sees the N pairs as the channels of one item: one Dice value per pair.
        dice = self.dice(selected.unsqueeze(0), selected_target.unsqueeze(0)).reshape(-1)
        bce = pair_mean(F.binary_cross_entropy_with_logits(selected, selected_target, reduction="none"))
        return dice, bce

    def forward(self, logits: torch.Tensor, target: torch.Tensor, channel_mask: torch.Tensor) -> torch.Tensor:
        """
        Args:
            logits: (B, C, *spatial) raw network outputs (before sigmoid).
            target: (B, C, *spatial) binary float labels.
            channel_mask: (B, C) boolean mask of the channels of each sample's region.

        Returns:
            scalar tensor: ``lambda_dice * dice + lambda_bce * bce``, each averaged over the selected pairs.

        Raises:
            TypeError: when an input is not a tensor or the mask is not boolean.
            ValueError: when shapes disagree or the mask selects nothing.
        """
        dice, bce = self.pair_losses(logits, target, channel_mask)
        return self.lambda_dice * dice.mean() + self.lambda_bce * bce.mean()

    def per_sample_loss(self, logits: torch.Tensor, target: torch.Tensor, channel_mask: torch.Tensor) -> torch.Tensor:
        """
        The same loss averaged over each sample's own selected channels (e.g. to track per-region loss drops).

        Args:
            logits: (B, C, *spatial) raw network outputs.
            target: (B, C, *spatial) binary float labels.
            channel_mask: (B, C) boolean mask; every row must select at least one channel.

        Returns:
            tensor of shape (B,).

        Raises:
            ValueError: when some sample selects no channel (see also :py:meth:`pair_losses`).
        """
        check_same_shape("logits", logits, "target", target)
        check_channel_mask(channel_mask, logits, require_each_sample=True)
        dice, bce = self.pair_losses(logits, target, channel_mask)
        return per_sample_mean(self.lambda_dice * dice + self.lambda_bce * bce, channel_mask)
