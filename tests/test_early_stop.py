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
    return _validated_run(SCORES, patience, len(SCORES), min_delta=min_delta)[0]


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


def _validated_run(scores: list[float], patience: int, max_epochs: int, state: dict | None = None,
                   min_delta: float = 0.0):
    """A trainer validated once per epoch on ``scores``; ``state``: a saved early-stopping state, loaded before
    the trainer runs (as ``resume_training`` does). Returns the trainer and its stopper."""
    values = iter(scores)
    validator = Engine(lambda engine, batch: None)

    @validator.on(Events.STARTED)
    def _name(engine: Engine) -> None:
        engine.state.key_metric_name = "val_mean_dice"

    @validator.on(Events.EPOCH_COMPLETED)
    def _score(engine: Engine) -> None:  # registered before the stopper's handler: the metric is ready for it
        engine.state.metrics["val_mean_dice"] = next(values)

    trainer = Engine(lambda engine, batch: None)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda engine: validator.run([0]))  # as ValidationHandler
    stopper = KeyMetricEarlyStop(validator, patience=patience, min_delta=min_delta)
    if state is not None:
        stopper.load_state_dict(state)  # before attach: kept until the ignite stopper exists
    stopper.attach(trainer)
    trainer.run([0], max_epochs=max_epochs)
    return trainer, stopper


def test_a_resumed_run_stops_where_an_uninterrupted_one_does():
    """The count of validations without improvement is part of the training state: interrupted after epoch 3 (one
    miss counted) and resumed, the run stops at epoch 4 like the uninterrupted one, not two validations later."""
    from medfm_ops.engines import ValidationState

    assert _validated_run(SCORES, patience=2, max_epochs=10)[0].state.epoch == 4
    _, first = _validated_run(SCORES[:3], patience=2, max_epochs=3)
    validator = Engine(lambda e, b: None)
    saved = ValidationState(validator, early_stop=first).state_dict()  # what the training checkpoint holds
    assert saved["early_stop"] == {"counter": 1, "best_score": 0.60}
    restored = KeyMetricEarlyStop(validator, patience=2)
    ValidationState(validator, early_stop=restored).load_state_dict(saved)
    resumed, _ = _validated_run(SCORES[3:], patience=2, max_epochs=7, state=restored.state_dict())
    assert resumed.state.epoch == 1 and resumed.state.early_stopped  # epoch 4 of the uninterrupted run
    fresh, _ = _validated_run(SCORES[3:], patience=2, max_epochs=7)  # the old behaviour: the count starts again
    assert fresh.state.epoch == 7


def test_an_older_checkpoint_without_the_count_warns(caplog):
    from medfm_ops.engines import ValidationState

    validator = Engine(lambda e, b: None)
    stopper = KeyMetricEarlyStop(validator, patience=2)
    with caplog.at_level(logging.WARNING, logger="medfm.resume"):
        ValidationState(validator, early_stop=stopper).load_state_dict({"best_metric": 0.5, "best_metric_epoch": 2})
    assert "no early-stopping count" in caplog.text and stopper.state_dict() == {"counter": 0, "best_score": None}
