# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""One log line per training epoch: mean loss and its components, learning rate, epoch time."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from ignite.engine import Engine, Events

__all__ = ["EpochSummaryHandler"]


class EpochSummaryHandler:
    """
    Log ONE line at the end of every training epoch (next to a progress bar, instead of a line per iteration)::

        epoch 3/40: loss 0.5123 (dice 0.3011, bce 0.1102, kl 0.1010), lr 9.14e-04, 12.3 s

    The loss values are the means over the epoch's iterations of what ``output_transform`` returns for each
    iteration; the learning rate is that of the optimizer's first param group at the end of the epoch; the time is
    Ignite's duration of the epoch's iterations (``engine.state.times["EPOCH_COMPLETED"]``, handlers excluded).

    Args:
        output_transform: engine output -> ``{name: scalar}`` for one iteration; the first entry is printed as the
            main value, the others in brackets. Defaults to ``{"loss": output["loss"]}``.
        optimizer: whose learning rate to print. Defaults to None (no learning rate).
        name: logger name. Defaults to ``"medfm.train"``.

    Example::

        EpochSummaryHandler(lambda out: {"loss": out["loss"].item()}, optimizer=opt).attach(trainer)
    """

    def __init__(
        self,
        output_transform: Callable[[Any], dict[str, Any]] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        name: str = "medfm.train",
    ) -> None:
        self.output_transform = output_transform or (lambda out: {"loss": out["loss"]})
        self.optimizer = optimizer
        self.logger = logging.getLogger(name)
        self._sums: dict[str, float] = {}
        self._count = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._accumulate)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _reset(self, engine: Engine) -> None:
        self._sums, self._count = {}, 0

    def _accumulate(self, engine: Engine) -> None:
        for k, v in self.output_transform(engine.state.output).items():
            self._sums[k] = self._sums.get(k, 0.0) + float(v)
        self._count += 1

    def summary(self, engine: Engine) -> str:
        """The line for the epoch that just ended."""
        means = {k: v / max(self._count, 1) for k, v in self._sums.items()}
        parts = [f"epoch {engine.state.epoch}/{engine.state.max_epochs}:"]
        if means:
            (main, value), *rest = means.items()
            parts.append(f"{main} {value:.4f}" + (f" ({', '.join(f'{k} {v:.4f}' for k, v in rest)})" if rest else ""))
        text = " ".join(parts)
        if self.optimizer is not None:
            text += f", lr {self.optimizer.param_groups[0]['lr']:.2e}"
        seconds = engine.state.times.get(Events.EPOCH_COMPLETED.name)
        if seconds is not None:
            text += f", {seconds:.1f} s"
        return text

    def __call__(self, engine: Engine) -> None:
        self.logger.info(self.summary(engine))
