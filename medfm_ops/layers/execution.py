# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Execution modes of an EKS layer: the strategies to run a mixed-task batch (layer-level constants only).

Choosing a mode for a whole network (:func:`medfm_ops.networks.set_execution`,
:func:`medfm_ops.networks.select_execution`) is network-level and lives in :mod:`medfm_ops.networks.execution`.
"""

from __future__ import annotations

__all__ = ["EXECUTION_MODES", "check_execution_mode"]

#: Strategies to run a mixed-task batch; all give the same result up to float rounding.
#: ``grouped``: one grouped convolution with ``groups = B`` and per-sample kernels (the paper's aggregation).
#: ``per_task``: samples sorted into one sub-batch per task present, one plain convolution each.
EXECUTION_MODES = ("grouped", "per_task")


def check_execution_mode(mode: str, name: str = "execution") -> str:
    """Return ``mode`` when it is one of :data:`EXECUTION_MODES`.

    Args:
        mode: the mode to check.
        name: the argument name quoted in the error. Defaults to ``"execution"``.

    Raises:
        ValueError: when ``mode`` is not one of :data:`EXECUTION_MODES`.
    """
    if mode not in EXECUTION_MODES:
        raise ValueError(f"{name} must be one of {EXECUTION_MODES}, got {mode!r}.")
    return mode
