# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Resume a training run from a full-state checkpoint and write a run summary (atomically)."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch
from ignite.engine import Engine
from ignite.handlers import Checkpoint

from medfm_ops.utils.atomic_io import atomic_write_text

__all__ = ["resume_training", "write_training_summary", "atomic_write_text"]


def resume_training(state: dict[str, Any], checkpoint_path: str | os.PathLike | None) -> bool:
    """
    Load a full training state (as saved by the training checkpointer: warm-up/LoRKD* state, network, optimizer,
    scheduler, trainer) so that the run continues exactly where it stopped. ``None`` does nothing.

    Objects are loaded in the order of ``state``: put the warm-up handler first so LoRKD* ranks re-shape the experts
    before their weights are loaded.

    Raises:
        FileNotFoundError: when ``checkpoint_path`` does not exist.
        ValueError: when the checkpoint lacks an entry of ``state``.
    """
    if checkpoint_path is None or checkpoint_path == "":
        return False
    if not os.path.isfile(checkpoint_path):
        raise FileNotFoundError(f"resume_from: no checkpoint at {checkpoint_path}.")
    ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    missing = [k for k in state if k not in ckpt]
    if missing:
        raise ValueError(f"resume_from {checkpoint_path}: entries {missing} missing (has {sorted(ckpt)}).")
    to_load = {k: (getattr(v, "module", v) if k == "network" else v) for k, v in state.items()}
    Checkpoint.load_objects(to_load=to_load, checkpoint=ckpt)
    trainer = state.get("trainer")
    epoch = trainer.state.epoch if isinstance(trainer, Engine) else "?"
    logging.getLogger("medfm.resume").info(f"resumed from {checkpoint_path} at epoch {epoch}")
    return True


def write_training_summary(
    path: str | os.PathLike, trainer: Engine, evaluator: Engine | None = None, warmup: Any | None = None
) -> None:
    """Write ``{epochs, iterations, best validation metric, last metrics, ranks, loss drops}`` as JSON (atomically)."""
    summary: dict[str, Any] = {"epochs": trainer.state.epoch, "iterations": trainer.state.iteration}
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
            from medfm_ops.networks import eks_layers

            ranks = list(next(eks_layers(warmup.network))[1].ranks)
        summary.update({"expert_ranks": list(ranks), "warmup_loss_drops": warmup.loss_drops})
    atomic_write_text(path, json.dumps(summary, indent=2, default=float))
