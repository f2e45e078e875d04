# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Checkpointing that never leaves a half-written file and never writes non-finite weights."""

from __future__ import annotations

from typing import Any

from monai.handlers import CheckpointSaver

from medfm_ops.utils.atomic_io import NonFiniteWeightsError, non_finite_entries

__all__ = ["AtomicCheckpointSaver"]


class _FiniteSaver:
    """Wraps Ignite's ``DiskSaver``: refuses a checkpoint holding NaN/inf tensors before anything is written."""

    def __init__(self, saver: Any) -> None:
        self.saver = saver

    def __call__(self, checkpoint: Any, filename: str, metadata: Any = None) -> None:
        bad = non_finite_entries(checkpoint)
        if bad:
            raise NonFiniteWeightsError(
                f"refusing to write checkpoint {filename}: {len(bad)} tensor(s) hold NaN/inf values (first: "
                f"{bad[:3]}); the previous checkpoints are kept. The run diverged (learning rate, NaN/inf input?)."
            )
        self.saver(checkpoint, filename, metadata)

    def __getattr__(self, name: str) -> Any:  # remove(), dirname, ... of the wrapped DiskSaver
        return getattr(self.saver, name)


class AtomicCheckpointSaver(CheckpointSaver):
    """
    MONAI's :class:`~monai.handlers.CheckpointSaver` whose files are written atomically: serialised to a temporary
    file in the same directory, then renamed over the target (Ignite's ``DiskSaver(atomic=True)``), so a run that
    fails or is killed while saving never corrupts an existing checkpoint; a checkpoint with NaN/inf tensors is
    refused (:class:`~medfm_ops.utils.NonFiniteWeightsError`) and nothing is written. Takes the same arguments.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for ckpt in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if ckpt is not None:
                ckpt.save_handler._atomic = True  # MONAI builds its DiskSavers with atomic=False
                ckpt.save_handler = _FiniteSaver(ckpt.save_handler)
