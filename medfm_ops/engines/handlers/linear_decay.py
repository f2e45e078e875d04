# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Linear decay of loss weights over the epochs (RD: alpha, beta and gamma from their configured values to 0)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ignite.engine import Engine, Events

from medfm_ops.losses.classification import linear_decay

__all__ = ["LinearDecayHandler"]


class LinearDecayHandler:
    """
    At the start of every epoch set ``target.<name>`` for each of ``names`` to ``w0 *``
    :func:`~medfm_ops.losses.linear_decay` ``(epoch, max_epochs, start, end)`` with ``w0`` the attribute's value
    when the handler was built (the configured weight): ``w0 * start`` in the first epoch, ``w0 * end`` in the last,
    and a weight configured as 0 (an ablation) stays 0. Stateless apart from ``w0`` (the value follows from the
    trainer's epoch, so a resumed run continues the schedule).

    Args:
        target: object holding the weights (e.g. :class:`~medfm_ops.losses.RDLoss`).
        names: attribute names. Defaults to ``("alpha", "beta", "gamma")``.
        start: first factor. Defaults to 1.
        end: last factor. Defaults to 0.

    Raises:
        AttributeError: when ``target`` has no attribute of that name.
    """

    def __init__(self, target: Any, names: Sequence[str] = ("alpha", "beta", "gamma"), start: float = 1.0, end: float = 0.0) -> None:
        for n in names:
            if not hasattr(target, n):
                raise AttributeError(f"{type(target).__name__} has no attribute '{n}' to schedule.")
        self.target, self.names, self.start, self.end = target, tuple(names), float(start), float(end)
        self.initial = {n: float(getattr(target, n)) for n in self.names}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        value = linear_decay(engine.state.epoch, engine.state.max_epochs, self.start, self.end)
        for n in self.names:
            setattr(self.target, n, self.initial[n] * value)
