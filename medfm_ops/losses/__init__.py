# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Losses for region-masked multi-label segmentation and knowledge distillation."""

from __future__ import annotations

from .distillation import SigmoidKLDivLoss, SoftmaxKLDivLoss, bernoulli_kl_with_logits
from .lorkd_seg_loss import LoRKDSegLoss
from .region_seg_loss import MaskedDiceBCELoss

__all__ = [
    "LoRKDSegLoss",
    "MaskedDiceBCELoss",
    "SigmoidKLDivLoss",
    "SoftmaxKLDivLoss",
    "bernoulli_kl_with_logits",
]

from .cka import CKALoss, linear_cka
from .classification import (
    LogitKDLoss,
    LoRKDClsLoss,
    RDLoss,
    SingleTaskCELoss,
    UnifiedCELoss,
    linear_decay,
    softmax_kl,
    task_cross_entropy,
)

__all__ += [
    "CKALoss",
    "LoRKDClsLoss",
    "LogitKDLoss",
    "RDLoss",
    "SingleTaskCELoss",
    "UnifiedCELoss",
    "linear_cka",
    "linear_decay",
    "softmax_kl",
    "task_cross_entropy",
]
