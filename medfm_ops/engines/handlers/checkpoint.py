# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Checkpointing that never leaves a half-written file and never writes non-finite weights."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import ignite.distributed as idist
from ignite.engine import Engine
from ignite.handlers.checkpoint import BaseSaveHandler, DiskSaver
from monai.handlers import CheckpointSaver

from medfm_ops.engines.handlers.random_states import RandomStates
from medfm_ops.utils.atomic_io import NonFiniteWeightsError, atomic_torch_save, non_finite_entries

__all__ = ["AtomicCheckpointSaver"]


class _FiniteSaver(BaseSaveHandler):
    """Wraps Ignite's ``DiskSaver``: refuses a checkpoint holding NaN/inf tensors before anything is written, and
    removes superseded files only AFTER the new one is safely on disk.

    Ignite's ``Checkpoint`` asks to remove the oldest file before it saves the new one, so a save that fails (a full
    disk, non-finite weights) or is killed would leave no checkpoint at all; removals are deferred to the next
    successful save here. A ``BaseSaveHandler`` itself: Ignite removes files only through handlers of that type.
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
    MONAI's :class:`~monai.handlers.CheckpointSaver` whose files are written atomically: serialised to a temporary
    file in the same directory, then renamed over the target (Ignite's ``DiskSaver(atomic=True)``), so a run that
    fails or is killed while saving never corrupts an existing checkpoint; superseded files are removed only after
    the new one is written (Ignite removes first), and a checkpoint with NaN/inf tensors is refused
    (:class:`~medfm_ops.utils.NonFiniteWeightsError`) with the previous files kept. A full disk stops the run with
    one line naming the file (:class:`~medfm_ops.utils.OutputWriteError`). Takes the same arguments.

    A full training state (a ``save_dict`` with an Ignite ``Engine``, e.g. ``"trainer"``) also gets an ``"rng"``
    entry, the run's :class:`~medfm_ops.engines.handlers.random_states.RandomStates`, so that
    :func:`~medfm_ops.engines.resume_training` continues the same random sequence (bit-exact resume). The
    best-model file (one entry) stays a plain state dict.

    It logs one line (logger ``medfm.checkpoint``) each time the best model changes, i.e. when its key-metric file is
    written: ``best val_mean_dice 0.8123 at epoch 4: saved models/model.pt``; nothing on other validations.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for ckpt in self._checkpoints().values():
            ckpt.save_handler._atomic = True  # MONAI builds its DiskSavers with atomic=False
            ckpt.save_handler = _FiniteSaver(ckpt.save_handler)
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

    def attach(self, engine: Engine) -> None:
        if any(isinstance(v, Engine) for v in self.save_dict.values()) and "rng" not in self.save_dict:
            for name in ("final", "interval"):
                ckpt = self._checkpoints().get(name)
                if ckpt is not None:
                    ckpt.to_save = {**ckpt.to_save, "rng": RandomStates(engine)}
        super().attach(engine)

    def _checkpoints(self) -> dict[str, Any]:
        named = {"final": self._final_checkpoint, "key_metric": self._key_metric_checkpoint,
                 "interval": self._interval_checkpoint}  # fmt: skip
        return {k: v for k, v in named.items() if v is not None}

    def state_dict(self) -> dict[str, Any]:
        """The files each internal checkpoint keeps (with their scores), so a resumed run continues the record."""
        return {name: ckpt.state_dict() for name, ckpt in self._checkpoints().items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for name, ckpt in self._checkpoints().items():
            if name in state_dict:
                ckpt.load_state_dict(state_dict[name])

    def adopt_interval_checkpoint(self, path: str, step: int) -> bool:
        """
        Record an existing interval checkpoint (e.g. the one a run resumes from) as saved at ``step``, so that it is
        removed like any superseded one once ``n_saved`` newer files exist. Returns False when ``path`` is not in
        this saver's directory or the saver keeps no interval checkpoints.
        """
        ckpt = self._interval_checkpoint
        if ckpt is None or os.path.dirname(os.path.abspath(path)) != os.path.abspath(ckpt.save_handler.dirname):
            return False
        state = ckpt.state_dict()
        key = next(iter(state))  # Ignite names it "_saved" (older releases "saved")
        saved = [tuple(x) for x in state[key]]
        name = os.path.basename(path)
        if all(f != name for _, f in saved):
            ckpt.load_state_dict({key: sorted(saved + [(int(step), name)])})
        return True
