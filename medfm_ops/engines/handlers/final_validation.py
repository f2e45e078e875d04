# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Validate once more at the end of training when the last epoch was not a validation epoch."""

from __future__ import annotations

from ignite.engine import Engine, Events

__all__ = ["FinalValidationHandler"]


class FinalValidationHandler:
    """
    Ignite handler for a trainer that validates every ``interval`` epochs (MONAI ``ValidationHandler``): when
    training completes on an epoch that was not validated, run ``validator`` once more, so every run ends with its
    own best model (``epochs=6, interval=4`` would otherwise ignore epochs 5-6; ``epochs < interval`` would write no
    model at all).

    Args:
        validator: the evaluator run by the trainer's ``ValidationHandler``.
        interval: that handler's validation interval in epochs.
    """

    def __init__(self, validator: Engine, interval: int) -> None:
        self.validator = validator
        self.interval = max(1, int(interval))

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if engine.state.epoch % self.interval != 0:
            self.validator.run(engine.state.epoch)
