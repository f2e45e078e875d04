# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""KeyMetricEarlyStop: stops after ``patience`` validations without a better key metric; 0 keeps the fixed budget."""

from __future__ import annotations

import logging

import pytest
from ignite.engine import Engine, Events

from medfm_ops.engines import KeyMetricEarlyStop

#: the validator's key metric after each validation (one per trainer epoch)
SCORES = [0.50, 0.60, 0.60, 0.55, 0.90, 0.95, 0.97, 0.99, 0.99, 0.99]


def _run(patience: int, min_delta: float = 0.0) -> Engine:
    scores = iter(SCORES)
    validator = Engine(lambda engine, batch: None)

    @validator.on(Events.STARTED)
    def _name(engine: Engine) -> None:
        engine.state.key_metric_name = "val_mean_dice"

    @validator.on(Events.EPOCH_COMPLETED)
    def _score(engine: Engine) -> None:  # registered before the stopper's handler: the metric is ready for it
        engine.state.metrics["val_mean_dice"] = next(scores)

    trainer = Engine(lambda engine, batch: None)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda engine: validator.run([0]))  # as ValidationHandler
    KeyMetricEarlyStop(validator, patience=patience, min_delta=min_delta).attach(trainer)
    trainer.run([0], max_epochs=len(SCORES))
    return trainer


def test_stops_after_patience_validations_without_improvement(caplog):
    with caplog.at_level(logging.INFO, logger="medfm.train"):
        trainer = _run(patience=2)
    assert trainer.state.epoch == 4  # 0.60 at epoch 2 is the best; epochs 3 (0.60) and 4 (0.55) are not better
    assert "early stop at epoch 4/10" in caplog.text and trainer.state.early_stopped
    assert _run(patience=3).state.epoch == 10  # epoch 5 improves before the third miss
    assert _run(patience=3, min_delta=0.1).state.epoch == 4  # 0.60 is not more than 0.10 above the best 0.50


def test_patience_zero_keeps_the_fixed_budget(caplog):
    with caplog.at_level(logging.INFO, logger="medfm.train"):
        trainer = _run(patience=0)
    assert trainer.state.epoch == len(SCORES) and not getattr(trainer.state, "early_stopped", False)
    assert "early stop" not in caplog.text
    assert not getattr(_run(patience=3).state, "early_stopped", False)  # ran to the last epoch: not an early stop
    with pytest.raises(ValueError, match="patience must be >= 0"):
        KeyMetricEarlyStop(Engine(lambda e, b: None), patience=-1)


def test_training_summary_says_whether_the_run_stopped_early(tmp_path):
    """A run stopped by patience is complete (``early_stopped``): a benchmark reusing it must not retrain it."""
    import json

    from medfm_ops.engines import write_training_summary

    for patience, stopped, epochs in ((2, True, 4), (0, False, 10)):
        write_training_summary(tmp_path / "summary.json", _run(patience))
        summary = json.loads((tmp_path / "summary.json").read_text())
        assert (summary["early_stopped"], summary["epochs"], summary["max_epochs"]) == (stopped, epochs, 10)
