# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Checkpointing that never leaves a half-written file."""

from __future__ import annotations

from typing import Any

from monai.handlers import CheckpointSaver

__all__ = ["AtomicCheckpointSaver"]


class AtomicCheckpointSaver(CheckpointSaver):
    """
    MONAI's :class:`~monai.handlers.CheckpointSaver` whose files are written atomically: serialised to a temporary
    file in the same directory, then renamed over the target (Ignite's ``DiskSaver(atomic=True)``), so a run that
    fails or is killed while saving never corrupts an existing checkpoint. Takes the same arguments.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for ckpt in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if ckpt is not None:
                ckpt.save_handler._atomic = True  # MONAI builds its DiskSavers with atomic=False
