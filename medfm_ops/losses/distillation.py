# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Knowledge-distillation divergences between a frozen teacher's logits and a student's logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.utils import LossReduction, look_up_option
from torch.nn.modules.loss import _Loss

from medfm_ops.losses._masking import as_plain_tensor, check_channel_mask, check_same_shape, pair_mean

__all__ = ["SigmoidKLDivLoss", "SoftmaxKLDivLoss", "bernoulli_kl_with_logits"]


def _check_temperature(temperature: float) -> float:
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    return float(temperature)


def bernoulli_kl_with_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """
    Element-wise ``KL(Bernoulli(sigmoid(t)) || Bernoulli(sigmoid(s)))`` computed from logits.

    Uses ``p_t * (logsigmoid(t) - logsigmoid(s)) + (1 - p_t) * (logsigmoid(-t) - logsigmoid(-s))`` with
    ``1 - p_t = sigmoid(-t)``, which stays accurate for saturated logits and is exactly 0 where ``s == t``.
    Tiny negative values from rounding are clamped to 0. No detaching happens here.

    Args:
        student_logits: tensor of any shape.
        teacher_logits: tensor of the same shape.

    Returns:
        tensor of the same shape, non-negative.
    """
    p_t = torch.sigmoid(teacher_logits)
    q_t = torch.sigmoid(-teacher_logits)
    kl = p_t * (F.logsigmoid(teacher_logits) - F.logsigmoid(student_logits)) + q_t * (
        F.logsigmoid(-teacher_logits) - F.logsigmoid(-student_logits)
    )
    return kl.clamp_min(0.0)


class SigmoidKLDivLoss(_Loss):
    """
    Voxel-wise Bernoulli KL divergence ``KL(teacher || student)`` between sigmoid mask predictions, for
    distilling a multi-label (one sigmoid channel per class) segmentation teacher.

    Both logits are divided by ``temperature``; the KL is averaged over the voxels of every selected
    (sample, channel) pair, then over the selected pairs, and multiplied by ``temperature ** 2`` (Hinton et al.) so
    that gradient magnitudes do not depend on the temperature. The teacher logits are detached: no gradient ever
    flows into the teacher. The voxel mean (not a sum) puts the KL on the scale of a voxel-averaged BCE, whatever
    the crop size, so that a weight such as LoRKD's ``beta = 0.1`` keeps its meaning.

    Example::

        kd = SigmoidKLDivLoss(temperature=2.0)
        loss = kd(student_logits, teacher_logits, channel_mask)  # (B, C, *sp), (B, C, *sp), (B, C) -> scalar
    """

    def __init__(self, temperature: float = 1.0) -> None:
        """
        Args:
            temperature: softening temperature (> 0). Defaults to 1.0.

        Raises:
            ValueError: when ``temperature`` is not positive.
        """
        super().__init__()
        self.temperature = _check_temperature(temperature)

    def pair_losses(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, channel_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """
        Voxel-averaged, ``T**2``-scaled KL of every selected (sample, channel) pair.

        Args:
            student_logits: (B, C, *spatial) student logits.
            teacher_logits: (B, C, *spatial) teacher logits (detached here).
            channel_mask: (B, C) boolean mask of the channels to distil; ``None`` selects all. Defaults to ``None``.

        Returns:
            tensor of shape (N,) in the row-major order of ``channel_mask.nonzero()``.

        Raises:
            TypeError: when an input is not a tensor or the mask is not boolean.
            ValueError: when shapes disagree or the mask selects nothing.
        """
        check_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
        student, teacher = as_plain_tensor(student_logits), as_plain_tensor(teacher_logits).detach()
        if channel_mask is None:
            channel_mask = torch.ones(student.shape[:2], dtype=torch.bool, device=student.device)
        check_channel_mask(channel_mask, student)
        s, t = student[channel_mask], teacher[channel_mask]
        if s.dtype in (torch.float16, torch.bfloat16):
            s = s.float()
        t = t.to(s.dtype)
        kl = bernoulli_kl_with_logits(s / self.temperature, t / self.temperature)
        return pair_mean(kl) * self.temperature**2

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, channel_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """
        Args:
            student_logits: (B, C, *spatial) student logits.
            teacher_logits: (B, C, *spatial) teacher logits (detached here).
            channel_mask: (B, C) boolean mask of the channels to distil; ``None`` selects all. Defaults to ``None``.

        Returns:
            scalar tensor, ``>= 0``, exactly 0 when the logits are equal.

        Raises:
            TypeError: when an input is not a tensor or the mask is not boolean.
            ValueError: when shapes disagree or the mask selects nothing.
        """
        return self.pair_losses(student_logits, teacher_logits, channel_mask).mean()


class SoftmaxKLDivLoss(_Loss):
    """
    ``KL(softmax(t / T) || softmax(s / T)) * T**2`` for classification logits of shape (B, K).

    The teacher logits are detached. With ``reduction="mean"`` the per-sample KL (summed over classes) is
    averaged over the batch (PyTorch's ``"batchmean"``).

    Example::

        kd = SoftmaxKLDivLoss(temperature=4.0)
        loss = kd(torch.randn(8, 10), torch.randn(8, 10))
    """

    def __init__(self, temperature: float = 1.0, reduction: LossReduction | str = LossReduction.MEAN) -> None:
        """
        Args:
            temperature: softening temperature (> 0). Defaults to 1.0.
            reduction: {``"mean"``, ``"sum"``, ``"none"``} over the batch; ``"none"`` returns shape (B,).
                Defaults to ``"mean"``.

        Raises:
            ValueError: when ``temperature`` is not positive or ``reduction`` is unknown.
        """
        super().__init__(reduction=look_up_option(reduction, LossReduction).value)
        self.temperature = _check_temperature(temperature)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """
        Args:
            student_logits: (B, K) student logits.
            teacher_logits: (B, K) teacher logits (detached here).

        Returns:
            scalar tensor, or shape (B,) with ``reduction="none"``.

        Raises:
            ValueError: when the inputs are not 2D or their shapes differ.
        """
        if student_logits.ndim != 2 or student_logits.shape != teacher_logits.shape:
            raise ValueError(
                "student_logits and teacher_logits must both have shape (B, K), got "
                f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}."
            )
        log_q = F.log_softmax(student_logits / self.temperature, dim=1)
        log_p = F.log_softmax(teacher_logits.detach() / self.temperature, dim=1)
        per_sample = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(dim=1) * self.temperature**2
        if self.reduction == LossReduction.MEAN.value:
            return per_sample.mean()
        if self.reduction == LossReduction.SUM.value:
            return per_sample.sum()
        return per_sample
