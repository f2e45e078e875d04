# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Linear decay of loss weights over the epochs (RD: alpha and beta from 1 to 0)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ignite.engine import Engine, Events

from medfm_ops.losses.cls_losses import linear_decay

__all__ = ["LinearDecayHandler"]


class LinearDecayHandler:
    """
    At the start of every epoch set ``target.<name>`` for each of ``names`` to :func:`~medfm_ops.losses.linear_decay`
    ``(epoch, max_epochs, start, end)``: ``start`` in the first epoch, ``end`` in the last. Stateless (the value
    follows from the trainer's epoch, so a resumed run continues the schedule).

    Args:
        target: object holding the weights (e.g. :class:`~medfm_ops.losses.RDLoss`).
        names: attribute names. Defaults to ``("alpha", "beta")``.
        start: first value. Defaults to 1.
        end: last value. Defaults to 0.
    """

    def __init__(self, target: Any, names: Sequence[str] = ("alpha", "beta"), start: float = 1.0, end: float = 0.0) -> None:
        for n in names:
            if not hasattr(target, n):
                raise AttributeError(f"{type(target).__name__} has no attribute '{n}' to schedule.")
        self.target, self.names, self.start, self.end = target, tuple(names), float(start), float(end)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        value = linear_decay(engine.state.epoch, engine.state.max_epochs, self.start, self.end)
        for n in self.names:
            setattr(self.target, n, value)
