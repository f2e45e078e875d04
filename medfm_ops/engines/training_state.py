# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Resume a training run from a full-state checkpoint and write a run summary (atomically)."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import torch
from ignite.engine import Engine
from ignite.handlers import Checkpoint

from medfm_ops.engines.handlers.random_states import RandomStates
from medfm_ops.networks import eks_layers
from medfm_ops.utils.atomic_io import atomic_write_text
from medfm_ops.utils.hashing import file_sha256

__all__ = ["ValidationState", "resume_training", "write_training_summary", "atomic_write_text", "model_fingerprint"]


def model_fingerprint(path: str | os.PathLike) -> str:
    """SHA-256 of a model file (ties ``models/model.pt`` to the run summary that describes it)."""
    return file_sha256(path)


class ValidationState:
    """
    The validation record a resumed run must continue: the evaluator's best key metric (and its epoch) and the
    files its best-model saver keeps with their scores, and the early stopper's count. Put it in the training state
    (``train#state``) so that the first validation after a resume replaces ``model.pt`` only when it beats the best
    score before the interruption, and early stopping counts the validations before the interruption too.

    Args:
        evaluator: the MONAI evaluator run by the trainer's ``ValidationHandler``.
        saver: its :class:`~medfm_ops.engines.AtomicCheckpointSaver` of the best model. Defaults to None.
        early_stop: the trainer's :class:`~medfm_ops.engines.KeyMetricEarlyStop`. Defaults to None.
    """

    def __init__(self, evaluator: Engine, saver: Any = None, early_stop: Any = None) -> None:
        self.evaluator = evaluator
        self.saver = saver
        self.early_stop = early_stop

    def state_dict(self) -> dict[str, Any]:
        state = self.evaluator.state
        out: dict[str, Any] = {"best_metric": float(getattr(state, "best_metric", -1.0)),
                               "best_metric_epoch": int(getattr(state, "best_metric_epoch", -1))}  # fmt: skip
        if self.saver is not None:
            out["saver"] = self.saver.state_dict()
        if self.early_stop is not None:
            out["early_stop"] = self.early_stop.state_dict()
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.evaluator.state.best_metric = float(state_dict["best_metric"])
        self.evaluator.state.best_metric_epoch = int(state_dict["best_metric_epoch"])
        if self.saver is not None and "saver" in state_dict:
            self.saver.load_state_dict(state_dict["saver"])
        if self.early_stop is not None:
            if "early_stop" in state_dict:
                self.early_stop.load_state_dict(state_dict["early_stop"])
            else:
                logging.getLogger("medfm.resume").warning(
                    "the checkpoint holds no early-stopping count (written by an older medfm): early stopping counts "
                    "again from the first validation after the resume."
                )


def resume_training(
    state: dict[str, Any], checkpoint_path: str | os.PathLike | None, checkpointer: Any = None
) -> bool:
    """
    Load a full training state (as saved by the training checkpointer: warm-up/LoRKD* state, network, optimizer,
    scheduler, trainer) so that the run continues exactly where it stopped. ``None`` does nothing.

    Objects are loaded in the order of ``state``: put the warm-up handler first so LoRKD* ranks re-shape the experts
    before their weights are loaded. The random generators saved with the state (``"rng"``, added by
    :class:`~medfm_ops.engines.AtomicCheckpointSaver`) are restored last, so the resumed run draws the same data
    order, augmentations and dropout masks as an uninterrupted one (bit-exact). The trainer's state records the
    resume (``resumed_from``, ``resumed_epoch``) for :func:`write_training_summary`. With ``checkpointer`` (the
    :class:`~medfm_ops.engines.AtomicCheckpointSaver` of the training state), the resumed file is recorded as its
    latest, so it is removed once superseded.

    Raises:
        FileNotFoundError: when ``checkpoint_path`` does not exist.
        ValueError: when the checkpoint lacks an entry of ``state``.
    """
    if checkpoint_path is None or checkpoint_path == "":
        return False
    if not os.path.isfile(checkpoint_path):
        raise FileNotFoundError(f"resume_from: no checkpoint at {checkpoint_path}.")
    ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    missing = [k for k in state if k not in ckpt and k != "validation"]
    if missing:
        raise ValueError(f"resume_from {checkpoint_path}: entries {missing} missing (has {sorted(ckpt)}).")
    if "validation" in state and "validation" not in ckpt:  # a classification checkpoint of an older medfm
        logging.getLogger("medfm.resume").warning(
            f"{checkpoint_path} holds no validation record (written by an older medfm): the best score and the "
            "early-stopping count start again, so the first validation after the resume replaces model.pt."
        )
    to_load = {k: (getattr(v, "module", v) if k == "network" else v) for k, v in state.items() if k in ckpt}
    Checkpoint.load_objects(to_load=to_load, checkpoint=ckpt)
    trainer = state.get("trainer")
    epoch = trainer.state.epoch if isinstance(trainer, Engine) else "?"
    if isinstance(trainer, Engine):
        if "rng" in ckpt:
            RandomStates(trainer).load_state_dict(ckpt["rng"])
        else:
            logging.getLogger("medfm.resume").warning(
                f"{checkpoint_path} holds no random generator states (written by an older medfm): the resumed run "
                "continues correctly but is not bit-exact with an uninterrupted one."
            )
        trainer.state.resumed_from = str(checkpoint_path)
        trainer.state.resumed_epoch = int(trainer.state.epoch)
    if checkpointer is not None and isinstance(trainer, Engine):
        checkpointer.adopt_interval_checkpoint(str(checkpoint_path), trainer.state.epoch)
    logging.getLogger("medfm.resume").info(f"resumed from {checkpoint_path} at epoch {epoch}")
    return True


def write_training_summary(
    path: str | os.PathLike,
    trainer: Engine,
    evaluator: Engine | None = None,
    warmup: Any | None = None,
    model_path: str | os.PathLike | None = None,
) -> None:
    """
    Write ``{epochs, iterations, max_epochs, early_stopped, best validation metric, last metrics, ranks (applied, and LoRKD*'s formula ranks
    before any clip), loss drops}`` as JSON (atomically): the one training summary of every bundle, segmentation
    and classification (``write_cls_summary`` is its former name).

    With ``model_path`` the summary also says whether this run wrote that model (its file changed after the run
    started) and, if so, its SHA-256 (``model_sha256``): an export compares it with the file it is about to ship,
    so a model left over from an earlier run is never exported as this run's. It also records whether this run
    validated (``validated_this_run``) and the checkpoint it resumed from (``resumed_from``, ``resumed_epoch``), so
    a refused export can say why (never validated, or resumed without beating the best score before the resume).
    """
    summary: dict[str, Any] = {"epochs": trainer.state.epoch, "iterations": trainer.state.iteration,
                               "max_epochs": trainer.state.max_epochs,
                               "early_stopped": bool(getattr(trainer.state, "early_stopped", False)),
                               "resumed_from": getattr(trainer.state, "resumed_from", None),
                               "resumed_epoch": getattr(trainer.state, "resumed_epoch", None)}  # fmt: skip
    if model_path is not None:
        run_seconds = float(trainer.state.times.get("COMPLETED") or 0.0)
        started = time.time() - run_seconds - 1.0
        written = os.path.isfile(model_path) and os.path.getmtime(model_path) >= started
        summary["model_written_by_this_run"] = bool(written)
        summary["model_sha256"] = model_fingerprint(model_path) if written else None
        summary["validated_this_run"] = bool(evaluator is not None and evaluator.state.iteration > 0)
    if evaluator is not None:
        summary.update(
            {
                "best_metric": getattr(evaluator.state, "best_metric", None),
                "best_metric_epoch": getattr(evaluator.state, "best_metric_epoch", None),
                "last_metrics": {k: v for k, v in evaluator.state.metrics.items() if isinstance(v, (int, float))},
            }
        )
    if warmup is not None:
        ranks = warmup.ranks
        if ranks is None:
            first = next(eks_layers(warmup.network), None)  # None: a baseline network without experts
            ranks = list(first[1].ranks) if first is not None else None
        summary.update(
            {
                "expert_ranks": ranks,
                "lorkd_star_formula_ranks": getattr(warmup, "formula_ranks", None),
                "warmup_loss_drops": warmup.loss_drops,
            }
        )
    atomic_write_text(path, json.dumps(summary, indent=2, default=float))
