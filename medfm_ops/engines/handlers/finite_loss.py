# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Stop a training run at the first non-finite loss, naming the batch's files."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ignite.engine import Engine, Events
from monai.utils import CommonKeys

from medfm_ops.engines.lorkd_loss_adapter import NonFiniteLossError

__all__ = ["FiniteLossGuard"]


def _loss_value(output: Any) -> float | None:
    item = output[0] if isinstance(output, (list, tuple)) and output else output
    if isinstance(item, Mapping) and CommonKeys.LOSS in item:
        return float(item[CommonKeys.LOSS])
    return None


def _batch_files(batch: Any, key: str) -> list[str]:
    items = batch if isinstance(batch, (list, tuple)) else [batch]
    names: list[str] = []
    for item in items:
        meta = getattr(item.get(key) if isinstance(item, Mapping) else None, "meta", {}) or {}
        value = meta.get("filename_or_obj")
        names += [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)] if value else []
    return names


class FiniteLossGuard:
    """
    Ignite handler: after every iteration, raise :class:`~medfm_ops.engines.NonFiniteLossError` when the loss in
    ``engine.state.output`` is NaN or infinite; the message names the batch's image files and the usual causes.
    Attach it to a :class:`~monai.engines.SupervisedTrainer` whose loss function does not check by itself (the
    LoRKD loss adapter does).

    Args:
        image_key: batch key whose ``filename_or_obj`` meta names the cases. Defaults to ``"image"``.
    """

    def __init__(self, image_key: str = CommonKeys.IMAGE) -> None:
        self.image_key = image_key

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        loss = _loss_value(engine.state.output)
        if loss is None or math.isfinite(loss):
            return
        files = _batch_files(engine.state.batch, self.image_key)
        raise NonFiniteLossError(
            f"training loss is {loss} at epoch {engine.state.epoch}, iteration {engine.state.iteration}; batch files: "
            f"{files or '<unknown>'}. Check these images for NaN/inf voxels, or lower the learning rate."
        )
