# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""MONAI's ``CheckpointSaver`` writing atomically: a failed or killed save never corrupts or removes the previous
checkpoint, a checkpoint with NaN/inf tensors is refused, and a full disk is one line naming the file.

This module imports only the standard library, torch, Ignite, MONAI and its sibling ``atomic_io`` (relatively):
exported bundles ship both verbatim as ``scripts/atomic_checkpoint.py`` and ``scripts/atomic_io.py`` (see
:py:data:`medfm_ops.bundle.BUNDLE_SCRIPTS`), so that their own ``train.json`` saves as the package does without medfm
installed; a test holds the copies equal to these files.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import ignite.distributed as idist
from ignite.handlers.checkpoint import BaseSaveHandler, DiskSaver
from monai.handlers import CheckpointSaver

from .atomic_io import NonFiniteWeightsError, atomic_torch_save, non_finite_entries

__all__ = ["AtomicDiskSaver", "AtomicCheckpointSaver"]


class AtomicDiskSaver(BaseSaveHandler):
    """Wraps Ignite's ``DiskSaver``: writes through :func:`~medfm_ops.utils.atomic_torch_save` (temporary file in the
    same folder, fsync, ``os.replace``; a full disk is an ``OutputWriteError`` naming the file), refuses a checkpoint
    holding NaN/inf tensors before anything is written, and removes superseded files only AFTER the new one is safely
    on disk.

    Ignite's ``Checkpoint`` asks to remove the oldest file before it saves the new one (for MONAI's fixed-name
    best-model file: removes ``model.pt``, then writes it), so a save that fails or is killed would leave no
    checkpoint at all; removals are deferred to the next successful save here. A ``BaseSaveHandler`` itself: Ignite
    removes files only through handlers of that type.
    """

    def __init__(self, saver: Any) -> None:
        self.saver = saver
        self.pending_removals: list[str] = []
        self.saved: list[str] = []  # names written since the owner last cleared it

    def remove(self, filename: str) -> None:
        self.pending_removals.append(filename)

    def __call__(self, checkpoint: Any, filename: str, metadata: Any = None) -> None:
        bad = non_finite_entries(checkpoint)
        if bad:
            raise NonFiniteWeightsError(
                f"refusing to write checkpoint {filename}: {len(bad)} tensor(s) hold NaN/inf values (first: "
                f"{bad[:3]}); the previous checkpoints are kept. The run diverged (learning rate, NaN/inf input?)."
            )
        if isinstance(self.saver, DiskSaver) and not idist.has_xla_support:
            if self.saver.save_on_rank == idist.get_rank():  # a full disk: one line naming the file
                name = getattr(self.saver, "filename", None) or filename  # MONAI's fixed-name saver (model.pt)
                atomic_torch_save(checkpoint, Path(self.saver.dirname) / name, check_finite=False)
        else:
            self.saver(checkpoint, filename, metadata)
        self.saved.append(getattr(self.saver, "filename", None) or filename)  # MONAI: a fixed name (model.pt)
        pending, self.pending_removals = self.pending_removals, []
        if getattr(self.saver, "filename", None) is not None:
            return  # MONAI's fixed-name saver (model.pt): the new file replaced the old one atomically, keep it
        for old in pending:
            if old != filename:
                self.saver.remove(old)

    def __getattr__(self, name: str) -> Any:  # remove(), dirname, ... of the wrapped DiskSaver
        return getattr(self.saver, name)


class AtomicCheckpointSaver(CheckpointSaver):
    """
    MONAI's :class:`~monai.handlers.CheckpointSaver` whose files are written by :class:`AtomicDiskSaver`: atomically
    (a run that fails or is killed while saving never corrupts an existing checkpoint), superseded files removed only
    after the new one is written, a checkpoint with NaN/inf tensors refused
    (:class:`~medfm_ops.utils.NonFiniteWeightsError`) with the previous files kept, and a full disk one line naming
    the file (:class:`~medfm_ops.utils.OutputWriteError`: ``no space left on device while writing
    .../models/model.pt; the previous model.pt is intact``). Takes the same arguments.

    It logs one line (logger ``medfm.checkpoint``) each time the best model changes, i.e. when its key-metric file is
    written: ``best val_mean_dice 0.8123 at epoch 4: saved models/model.pt``; nothing on other validations.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for ckpt in self._checkpoints().values():
            ckpt.save_handler._atomic = True  # MONAI builds its DiskSavers with atomic=False (XLA saves through it)
            ckpt.save_handler = AtomicDiskSaver(ckpt.save_handler)
        self.best_logger = logging.getLogger("medfm.checkpoint")
        self._key_name = kwargs.get("key_metric_name")  # else the engine's key metric

    def metrics_completed(self, engine: Any) -> None:
        """Save the key-metric checkpoint when the metric improved, and say so in one line."""
        saver = self._key_metric_checkpoint.save_handler
        saver.saved.clear()
        super().metrics_completed(engine)
        if saver.saved:
            name = self._key_name or getattr(engine.state, "key_metric_name", None)
            value = getattr(engine.state, "metrics", {}).get(name) if name else None
            score = f" {name} {float(value):.4f}" if value is not None else ""
            path = os.path.join(saver.dirname, saver.saved[-1])
            self.best_logger.info(f"best{score} at epoch {engine.state.epoch}: saved {path}")

    def _checkpoints(self) -> dict[str, Any]:
        named = {"final": self._final_checkpoint, "key_metric": self._key_metric_checkpoint,
                 "interval": self._interval_checkpoint}  # fmt: skip
        return {k: v for k, v in named.items() if v is not None}
