# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Early stopping on the validator's key metric, switched off by a patience of 0 (so a bundle config can always
list it)."""

from __future__ import annotations

import logging
from typing import Any

from ignite.engine import Engine, Events
from ignite.handlers import EarlyStopping

__all__ = ["KeyMetricEarlyStop"]


class KeyMetricEarlyStop:
    """
    Stop training when the validator's key metric (``validator.state.key_metric_name``, the one the best checkpoint
    follows) has not risen more than ``min_delta`` above its best for ``patience`` validations in a row. Attach it
    to the TRAINER (a ``train_handlers`` entry next to ``ValidationHandler``, so the config has no trainer <->
    validator reference cycle); the model kept is the best checkpoint, as without it.

    Ignite's :class:`~ignite.handlers.EarlyStopping` does the counting (``cumulative``: compared with the best, not
    with the previous validation); this adapter reads the key metric by name, logs one line when it stops the run,
    and does nothing when ``patience`` is 0 or None (the fixed-epoch budget). Its count and best score are part of
    the training state (:meth:`state_dict`, saved through :class:`~medfm_ops.engines.ValidationState`), so a resumed
    run stops at the same epoch as an uninterrupted one.

    Args:
        validator: the evaluator run by the trainer's ``ValidationHandler``.
        patience: validations without improvement before stopping; 0 or None: never stop early. Defaults to 0.
        min_delta: smallest increase that counts as an improvement. Defaults to 0.0.
        name: logger name. Defaults to ``"medfm.train"``.

    Raises:
        ValueError: on a negative ``patience`` or ``min_delta``.
    """

    def __init__(self, validator: Engine, patience: int | None = 0, min_delta: float = 0.0,
                 name: str = "medfm.train") -> None:  # fmt: skip
        if patience is not None and int(patience) < 0:
            raise ValueError(f"early-stopping patience must be >= 0 validations (0: off), got {patience}.")
        if min_delta < 0:
            raise ValueError(f"early-stopping min_delta must be >= 0, got {min_delta}.")
        self.validator, self.patience, self.min_delta = validator, int(patience or 0), float(min_delta)
        self.logger = logging.getLogger(name)
        self.stopper: EarlyStopping | None = None
        self._pending: dict[str, Any] | None = None  # a state loaded before attach()

    @staticmethod
    def key_metric(engine: Engine) -> float:
        """The validator's key metric after a validation run."""
        name = getattr(engine.state, "key_metric_name", None)
        if name is None or name not in engine.state.metrics:
            raise KeyError(f"early stopping needs the validator's key metric; metrics are {sorted(engine.state.metrics)}.")
        return float(engine.state.metrics[name])

    def attach(self, engine: Engine) -> None:
        """Attach to the trainer ``engine``: its validator's runs are counted, ``engine`` is the one stopped."""
        if self.patience == 0:
            return
        stopper = EarlyStopping(self.patience, self.key_metric, engine, threshold=self.min_delta, cumulative=True)
        self.stopper = stopper
        if self._pending is not None:
            self.load_state_dict(self._pending)
        self.validator.add_event_handler(Events.COMPLETED, stopper)
        engine.add_event_handler(Events.COMPLETED, self._report)

    def state_dict(self) -> dict[str, Any]:
        """``{"counter": validations without improvement, "best_score": best key metric or None}``."""
        if self.stopper is None:
            return dict(self._pending or {"counter": 0, "best_score": None})
        return {"counter": int(self.stopper.counter), "best_score": self.stopper.best_score}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue counting from a saved :meth:`state_dict` (kept until :meth:`attach` when not attached yet)."""
        if self.stopper is None:
            self._pending = dict(state_dict)
            return
        self.stopper.counter = int(state_dict.get("counter", 0))
        best = state_dict.get("best_score")
        self.stopper.best_score = None if best is None else float(best)

    def _report(self, trainer: Engine) -> None:
        """Log the stop and mark it on the trainer's state (``early_stopped``, read by the training summary)."""
        if trainer.state.epoch < trainer.state.max_epochs:
            trainer.state.early_stopped = True
            self.logger.info(
                f"early stop at epoch {trainer.state.epoch}/{trainer.state.max_epochs}: no better validation "
                f"metric in {self.patience} validations; the best checkpoint is the model."
            )
