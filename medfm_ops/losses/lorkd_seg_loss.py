# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""LoRKD segmentation objective: region-masked Dice + BCE plus a weighted sigmoid KL distillation term."""

from __future__ import annotations

import torch
from torch.nn.modules.loss import _Loss

from medfm_ops.losses._masking import check_channel_mask, check_same_shape, per_sample_mean
from medfm_ops.losses.distillation import SigmoidKLDivLoss
from medfm_ops.losses.region_seg_loss import MaskedDiceBCELoss

__all__ = ["LoRKDSegLoss"]


class LoRKDSegLoss(_Loss):
    """
    ``total = task + beta * kl`` where ``task`` is :py:class:`MaskedDiceBCELoss` on the ground truth and ``kl`` is
    :py:class:`SigmoidKLDivLoss` towards a frozen teacher's logits, both restricted to the channels each case
    annotates (its region's classes, fewer with partial labels) and both averaged over the selected (sample, class)
    pairs and, within a pair, over the voxels (Dice over its voxel sums). So ``beta`` weighs a per-voxel KL against a
    per-voxel BCE and means the same at any crop size; the defaults (SAT's Dice form, ``beta = 0.1``, ``T = 1``) are
    the LoRKD paper's setting (see ``bundles/lorkd_seg/docs/README.md``, "Loss").

    After every call the detached values are kept for logging:

    - ``last_components``: ``{"task": float, "kl": float, "total": float}`` (``kl`` is 0.0 without teacher logits);
    - ``last_per_sample_task``: detached (B,) task loss of each sample (mean over its own channels), which a
      trainer can accumulate per region, e.g. to measure per-region loss drops for LoRKD* rank allocation.

    Example::

        loss_fn = LoRKDSegLoss(beta=0.1, temperature=1.0)
        loss = loss_fn(student_logits, target, channel_mask, teacher_logits=teacher_logits)
        loss.backward()
        logger.info(loss_fn.last_components)
    """

    def __init__(
        self,
        beta: float = 0.1,
        lambda_dice: float = 1.0,
        lambda_bce: float = 1.0,
        temperature: float = 1.0,
        smooth_nr: float = 1e-7,
        smooth_dr: float = 1e-7,
        squared_pred: bool = True,
    ) -> None:
        """
        Args:
            beta: weight of the distillation term; no less than 0. Defaults to 0.1.
            lambda_dice: weight of the Dice loss in the task term. Defaults to 1.0.
            lambda_bce: weight of the BCE in the task term. Defaults to 1.0.
            temperature: distillation temperature (> 0). Defaults to 1.0.
            smooth_nr: Dice numerator smoothing. Defaults to 1e-7 (SAT).
            smooth_dr: Dice denominator smoothing. Defaults to 1e-7 (SAT).
            squared_pred: squared Dice denominators ``sum(p**2) + sum(g**2)``. Defaults to True (SAT).

        Raises:
            ValueError: when ``beta`` is negative (and see :py:class:`MaskedDiceBCELoss`, :py:class:`SigmoidKLDivLoss`).
        """
        super().__init__()
        if beta < 0.0:
            raise ValueError(f"beta should be no less than 0.0, got {beta}.")
        self.beta = float(beta)
        self.task_loss = MaskedDiceBCELoss(
            lambda_dice=lambda_dice,
            lambda_bce=lambda_bce,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
            squared_pred=squared_pred,
        )
        self.kd_loss = SigmoidKLDivLoss(temperature=temperature)
        self.last_components: dict[str, float] = {}
        self.last_per_sample_task: torch.Tensor | None = None

    def forward(
        self,
        student_logits: torch.Tensor,
        target: torch.Tensor,
        channel_mask: torch.Tensor,
        teacher_logits: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            student_logits: (B, C, *spatial) student logits over the union of all regions' classes.
            target: (B, C, *spatial) binary float labels.
            channel_mask: (B, C) boolean mask of each sample's region channels; every row must select a channel.
            teacher_logits: (B, C, *spatial) teacher logits, or ``None`` for the task loss alone. Defaults to ``None``.

        Returns:
            scalar tensor ``task + beta * kl``.

        Raises:
            TypeError: when an input is not a tensor or the mask is not boolean.
            ValueError: when shapes disagree, or the mask selects nothing for some sample.
        """
        check_same_shape("student_logits", student_logits, "target", target)
        check_channel_mask(channel_mask, student_logits, require_each_sample=True)
        dice, bce = self.task_loss.pair_losses(student_logits, target, channel_mask)
        pair_task = self.task_loss.lambda_dice * dice + self.task_loss.lambda_bce * bce
        task = pair_task.mean()
        if teacher_logits is None:
            kl = torch.zeros((), dtype=task.dtype, device=task.device)
            total = task
        else:
            check_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
            kl = self.kd_loss(student_logits, teacher_logits, channel_mask)
            total = task + self.beta * kl
        values = torch.stack([task.detach(), kl.detach().to(task.dtype), total.detach()]).tolist()  # one sync
        self.last_components = dict(zip(("task", "kl", "total"), values))
        self.last_per_sample_task = per_sample_mean(pair_task.detach(), channel_mask)
        return total

    def per_sample_task_loss(
        self, logits: torch.Tensor, target: torch.Tensor, channel_mask: torch.Tensor
    ) -> torch.Tensor:
        """
        Task loss (Dice + BCE) of each sample over its own region channels, shape (B,).

        Args:
            logits: (B, C, *spatial) logits.
            target: (B, C, *spatial) binary float labels.
            channel_mask: (B, C) boolean mask; every row must select at least one channel.

        Returns:
            tensor of shape (B,) (differentiable; wrap in ``torch.no_grad()`` for bookkeeping).
        """
        return self.task_loss.per_sample_loss(logits, target, channel_mask)
