# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""The LoRKD segmentation loss behind the one task loss adapter (:class:`~medfm_ops.engines.TaskLossAdapter`)."""

from __future__ import annotations

from medfm_ops.engines.loss_adapter import NonFiniteLossError, TaskLossAdapter
from medfm_ops.losses import LoRKDSegLoss

__all__ = ["LoRKDLossAdapter", "NonFiniteLossError"]

#: the batch entries :class:`~medfm_ops.losses.LoRKDSegLoss` takes, in order
SEG_LOSS_KEYS = ("pred", "label", "channel_mask", "teacher_logits")


class LoRKDLossAdapter(TaskLossAdapter):
    """
    :class:`~medfm_ops.engines.TaskLossAdapter` over :class:`~medfm_ops.losses.LoRKDSegLoss` with the targets of
    :class:`~medfm_ops.engines.TaskPrepareBatch` (``kind="segmentation"``, ``targets_as_dict=True``: ``label``
    (B, C, *spatial), ``channel_mask`` (B, C), ``region`` (B,), optional ``teacher_logits`` and ``filenames``): the task loss on the
    sample's region channels + beta * KL to the teacher logits when present.

    Args:
        loss: the LoRKD loss. Defaults to ``LoRKDSegLoss()`` (beta = 0.1).
    """

    def __init__(self, loss: LoRKDSegLoss | None = None) -> None:
        super().__init__(loss if loss is not None else LoRKDSegLoss(), input_keys=SEG_LOSS_KEYS, task_key="region")
