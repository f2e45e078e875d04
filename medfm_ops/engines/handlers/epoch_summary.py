# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""One log line per training epoch: mean loss and its components, learning rate, epoch time, validation score."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from ignite.engine import Engine, Events

__all__ = ["EpochSummaryHandler"]


class EpochSummaryHandler:
    """
    Log ONE line at the end of every training epoch, after the epoch's validation (if any)::

        epoch 3/40: loss 0.5123 (dice 0.3011, bce 0.1102, kl 0.1010), lr 9.14e-04, 12.3 s; val_mean_dice 0.8123 (best)
        epoch 4/40: loss 0.4990 (dice 0.2950, bce 0.1050, kl 0.0990), lr 9.00e-04, 12.1 s; val_mean_dice 0.8050 (best 0.8123, epoch 3)

    The loss values are the means over the epoch's iterations of what ``output_transform`` returns for each
    iteration; the learning rate is that of the optimizer's first param group at the end of the epoch; the time is
    Ignite's duration of the epoch's iterations (``engine.state.times["EPOCH_COMPLETED"]``, handlers excluded). The
    validation part appears on epochs where ``validator`` ran: its key metric (and ``metric_names``) with the best
    value so far. The line is registered as the LAST end-of-epoch handler when the run starts, so it follows the
    validation whatever the order of the handler list.

    Args:
        output_transform: engine output -> ``{name: scalar}`` for one iteration; the first entry is printed as the
            main value, the others in brackets. Defaults to ``{"loss": output["loss"]}``.
        optimizer: whose learning rate to print. Defaults to None (no learning rate).
        validator: the validation evaluator whose scores join the line. Defaults to None (losses only).
        metric_names: validation metrics printed after the key metric. Defaults to none.
        quiet_engines: lower the trainer's and the validator's Ignite loggers to WARNING, so that this line replaces
            their per-epoch lines ("Epoch[3] Complete", "Engine run resuming", "Got new best metric", "Saved
            checkpoint at epoch"). Defaults to True.
        name: logger name. Defaults to ``"medfm.train"``.

    Example::

        EpochSummaryHandler(lambda out: {"loss": out["loss"].item()}, optimizer=opt, validator=evaluator).attach(trainer)
    """

    def __init__(
        self,
        output_transform: Callable[[Any], dict[str, Any]] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        validator: Engine | None = None,
        metric_names: Sequence[str] = (),
        quiet_engines: bool = True,
        name: str = "medfm.train",
    ) -> None:
        self.output_transform = output_transform or (lambda out: {"loss": out["loss"]})
        self.optimizer = optimizer
        self.validator = validator
        self.metric_names = list(metric_names)
        self.quiet_engines = quiet_engines
        self.logger = logging.getLogger(name)
        self._sums: dict[str, float] = {}
        self._count = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._accumulate)
        engine.add_event_handler(Events.STARTED, self._register_last)
        if self.quiet_engines:
            for e in (engine, self.validator):
                if e is not None:
                    e.logger.setLevel(max(e.logger.getEffectiveLevel(), logging.WARNING))

    def _register_last(self, engine: Engine) -> None:
        """Add the line after every end-of-epoch handler attached so far (validation, checkpoints)."""
        if not engine.has_event_handler(self, Events.EPOCH_COMPLETED):
            engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _reset(self, engine: Engine) -> None:
        self._sums, self._count = {}, 0

    def _accumulate(self, engine: Engine) -> None:
        for k, v in self.output_transform(engine.state.output).items():
            self._sums[k] = self._sums.get(k, 0.0) + float(v)
        self._count += 1

    def _validation(self, epoch: int) -> str:
        """``"; val_mean_dice 0.8123 (best)"`` when the validator ran at ``epoch``, else ``""``."""
        state = getattr(self.validator, "state", None)
        if state is None or state.epoch != epoch or not state.metrics:
            return ""
        key = getattr(state, "key_metric_name", None)
        names = ([key] if key in state.metrics else []) + [n for n in self.metric_names if n in state.metrics and n != key]
        parts = [f"{n} {float(state.metrics[n]):.4f}" for n in names]
        if not parts:
            return ""
        best, best_epoch = getattr(state, "best_metric", None), getattr(state, "best_metric_epoch", -1)
        if key in names and best_epoch is not None and best_epoch > 0:
            parts[0] += " (best)" if best_epoch == epoch else f" (best {float(best):.4f}, epoch {best_epoch})"
        return "; " + ", ".join(parts)

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
        return text + self._validation(engine.state.epoch)

    def __call__(self, engine: Engine) -> None:
        self.logger.info(self.summary(engine))
