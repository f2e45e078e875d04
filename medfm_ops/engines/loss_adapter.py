# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""One adapter between MONAI's ``loss_function(pred, targets)`` call and a task-aware loss, segmentation or
classification: the loss names the batch entries it reads (``input_keys``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["TaskLossAdapter", "ClsLossAdapter", "NonFiniteLossError"]


class NonFiniteLossError(FloatingPointError):
    """Raised when a training loss is NaN/Inf; the message names the cases of the batch."""


class TaskLossAdapter(nn.Module):
    """
    ``forward(pred, targets)`` for :class:`monai.engines.SupervisedTrainer` with the dict targets of a task batch
    preparation (``targets_as_dict=True``): calls ``loss(*entries)`` with the entries named by ``input_keys`` (the
    targets, plus the network output: a dict as it is, a tensor under ``"pred"``, ``"logits"`` and ``"z_s"``), and
    stops with :class:`NonFiniteLossError` naming the batch's files and task ids when the loss is not finite. After
    each call ``last_components`` (floats), ``last_per_sample_task`` and ``last_regions`` (the batch's ``(B,)`` task
    ids) are available to handlers (epoch summary, LoRKD* loss-drop tracking).

    Args:
        loss: the loss; a loss with an ``input_keys`` attribute (:mod:`medfm_ops.losses`) needs no ``input_keys``.
        input_keys: the batch entries ``loss`` takes, in order. Defaults to ``loss.input_keys``.
        task_key: the targets' entry holding the ``(B,)`` task ids. Defaults to ``"task_id"``.

    Raises:
        TypeError: when neither ``input_keys`` nor ``loss.input_keys`` is given; (on call) when the targets are
            not a dict.

    Example (a bundle's ``loss``)::

        {"_target_": "medfm_ops.engines.TaskLossAdapter", "loss": {"_target_": "medfm_ops.losses.LoRKDSegLoss"},
         "task_key": "region"}
    """

    def __init__(self, loss: nn.Module, input_keys: Sequence[str] | None = None, task_key: str = "task_id") -> None:
        super().__init__()
        keys = input_keys if input_keys is not None else getattr(loss, "input_keys", None)
        if not keys:
            raise TypeError(f"{type(loss).__name__} has no input_keys: pass input_keys (the batch entries it takes).")
        self.loss, self.input_keys, self.task_key = loss, tuple(keys), task_key
        self.last_regions: torch.Tensor | None = None

    @property
    def last_components(self) -> dict[str, float]:
        return getattr(self.loss, "last_components", {})

    @property
    def last_per_sample_task(self) -> torch.Tensor | None:
        return getattr(self.loss, "last_per_sample_task", None)

    def forward(self, pred: Any, targets: dict[str, Any]) -> torch.Tensor:
        if not isinstance(targets, dict):
            raise TypeError(f"{type(self).__name__} expects dict targets: use the batch preparation with "
                            "targets_as_dict=True.")  # fmt: skip
        entries = dict(targets)
        entries.update(pred if isinstance(pred, dict) else {"pred": pred, "logits": pred, "z_s": pred})
        value = self.loss(*[entries.get(k) for k in self.input_keys])
        tasks = targets.get(self.task_key)
        self.last_regions = tasks.detach() if isinstance(tasks, torch.Tensor) else None
        if not math.isfinite(float(value.detach())):
            ids = [] if self.last_regions is None else self.last_regions.tolist()
            raise NonFiniteLossError(
                f"training loss is {float(value.detach())} (components {self.last_components}) for the batch "
                f"{targets.get('filenames', [])} (tasks {ids}): check these images for NaN/Inf intensities, lower "
                "the learning rate, or disable AMP."
            )
        return value


#: the former classification-only name of the one task loss adapter (kept while bundle configs switch)
ClsLossAdapter = TaskLossAdapter
