# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Checkpointing of the medfm trainings: atomic, finite files (the bundle-shippable
:class:`medfm_ops.utils.atomic_checkpoint.AtomicCheckpointSaver`) plus the training state a bit-exact resume needs."""

from __future__ import annotations

import os
from typing import Any

from ignite.engine import Engine

from medfm_ops.engines.handlers.random_states import RandomStates
from medfm_ops.utils import atomic_checkpoint

__all__ = ["AtomicCheckpointSaver"]


class AtomicCheckpointSaver(atomic_checkpoint.AtomicCheckpointSaver):
    """
    MONAI's :class:`~monai.handlers.CheckpointSaver` whose files are written atomically, never with NaN/inf tensors,
    superseded files removed only after the new one is written, a full disk one line naming the file
    (:class:`medfm_ops.utils.atomic_checkpoint.AtomicCheckpointSaver`, which exported bundles ship as
    ``scripts/``), and one log line (logger ``medfm.checkpoint``) each time the best model changes. Takes the same
    arguments.

    A full training state (a ``save_dict`` with an Ignite ``Engine``, e.g. ``"trainer"``) also gets an ``"rng"``
    entry, the run's :class:`~medfm_ops.engines.handlers.random_states.RandomStates`, so that
    :func:`~medfm_ops.engines.resume_training` continues the same random sequence (bit-exact resume). The
    best-model file (one entry) stays a plain state dict. The saver's record of its files is a state dict too
    (``state_dict``/``load_state_dict``), so a resumed run continues it.
    """

    def attach(self, engine: Engine) -> None:
        if any(isinstance(v, Engine) for v in self.save_dict.values()) and "rng" not in self.save_dict:
            for name in ("final", "interval"):
                ckpt = self._checkpoints().get(name)
                if ckpt is not None:
                    ckpt.to_save = {**ckpt.to_save, "rng": RandomStates(engine)}
        super().attach(engine)

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
